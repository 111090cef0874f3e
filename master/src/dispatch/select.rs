//! Worker selection, kept pure so it can be unit-tested: which live workers get the next
//! steps of a capability.

use std::collections::HashMap;

use common::wire::{Capability, WorkerId, WorkerRecord};

/// Whether `worker` may be given a new step of `capability`: it serves it, is neither
/// draining nor degraded (its results cannot reach a master, so a step sent to it would only
/// wait for its lease to lapse) nor unavailable (its agent is down), and the caller does not
/// skip it.
fn available(
    worker: &WorkerRecord,
    capability: &Capability,
    skip: &dyn Fn(&WorkerId) -> bool,
) -> bool {
    !worker.draining
        && worker.degraded.is_none()
        && worker.unavailable.is_none()
        && worker.serves(capability)
        && !skip(&worker.id)
}

/// Assigns up to `wanted` steps of `capability` to workers that serve it, are not draining,
/// degraded or skipped, and have free slots (`max_concurrency` minus `load`). Each step goes to the
/// worker with the fewest steps in flight at that moment (ties: the order of `workers`), so
/// a batch spreads evenly.
pub(crate) fn assign(
    capability: &Capability,
    workers: &[WorkerRecord],
    load: &HashMap<String, u32>,
    skip: &dyn Fn(&WorkerId) -> bool,
    wanted: usize,
) -> Vec<WorkerId> {
    let mut candidates: Vec<(u32, u32, &WorkerId)> = workers
        .iter()
        .filter(|w| available(w, capability, skip))
        .map(|w| {
            let busy = load.get(w.id.as_str()).copied().unwrap_or(0);
            (busy, w.max_concurrency, &w.id)
        })
        .filter(|(busy, max, _)| busy < max)
        .collect();
    let mut out = Vec::with_capacity(wanted);
    while out.len() < wanted {
        let Some(best) = candidates
            .iter_mut()
            .filter(|(busy, max, _)| busy < max)
            .min_by_key(|(busy, _, _)| *busy)
        else {
            break;
        };
        best.0 += 1;
        out.push(best.2.clone());
    }
    out
}

/// Free slots for a capability across the workers [`assign`] may choose.
pub(crate) fn free_slots(
    capability: &Capability,
    workers: &[WorkerRecord],
    load: &HashMap<String, u32>,
    skip: &dyn Fn(&WorkerId) -> bool,
) -> usize {
    workers
        .iter()
        .filter(|w| available(w, capability, skip))
        .map(|w| {
            w.max_concurrency
                .saturating_sub(load.get(w.id.as_str()).copied().unwrap_or(0)) as usize
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, caps: &[&str], max: u32) -> WorkerRecord {
        WorkerRecord {
            id: WorkerId::new(id).unwrap(),
            url: format!("http://{id}"),
            capabilities: caps.iter().map(|c| Capability::new(*c).unwrap()).collect(),
            max_concurrency: max,
            in_flight: vec![],
            version: "t".into(),
            started_at_ms: 0,
            draining: false,
            heartbeat_at_ms: 0,
            degraded: None,
            unavailable: None,
            max_batch: 0,
        }
    }

    fn none(_: &WorkerId) -> bool {
        false
    }

    #[test]
    fn fewest_in_flight_first_and_capacity_respected() {
        let plan = Capability::new("plan").unwrap();
        let workers = vec![
            worker("a", &["plan"], 2),
            worker("b", &["plan"], 3),
            worker("c", &["retrieve"], 8),
        ];
        let load = HashMap::from([("a".to_string(), 1), ("b".to_string(), 0)]);
        let got: Vec<String> = assign(&plan, &workers, &load, &none, 10)
            .into_iter()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(
            got,
            ["b", "a", "b", "b"],
            "b first (idle), never more than capacity"
        );
        assert_eq!(free_slots(&plan, &workers, &load, &none), 4);
    }

    #[test]
    fn draining_skipped_and_unserved_get_nothing() {
        let plan = Capability::new("plan").unwrap();
        let mut draining = worker("d", &["plan"], 4);
        draining.draining = true;
        let workers = vec![
            draining,
            worker("s", &["plan"], 4),
            worker("r", &["retrieve"], 4),
        ];
        let skip = |w: &WorkerId| w.as_str() == "s";
        assert!(assign(&plan, &workers, &HashMap::new(), &skip, 3).is_empty());
        assert_eq!(free_slots(&plan, &workers, &HashMap::new(), &skip), 0);
    }

    #[test]
    fn degraded_workers_get_no_steps_and_offer_no_slots() {
        let plan = Capability::new("plan").unwrap();
        let mut degraded = worker("bad", &["plan"], 8);
        degraded.degraded = Some("cannot deliver results to http://m/result: refused".into());
        let workers = vec![degraded.clone(), worker("good", &["plan"], 2)];
        let load = HashMap::new();
        let got: Vec<String> = assign(&plan, &workers, &load, &none, 5)
            .into_iter()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(
            got,
            ["good", "good"],
            "only the healthy worker, up to its capacity"
        );
        assert_eq!(free_slots(&plan, &workers, &load, &none), 2);

        let alone = vec![degraded];
        assert!(assign(&plan, &alone, &load, &none, 1).is_empty());
        assert_eq!(
            free_slots(&plan, &alone, &load, &none),
            0,
            "a degraded worker's idle slots are not capacity"
        );
    }

    #[test]
    fn a_worker_whose_agent_is_down_gets_no_steps_until_it_is_back() {
        let critique = Capability::new("critique").unwrap();
        let mut sidecar = worker("sidecar", &["critique"], 4);
        sidecar.unavailable = Some("agent http://127.0.0.1:9000/health: connection refused".into());
        let workers = vec![sidecar.clone()];
        let load = HashMap::new();
        assert!(assign(&critique, &workers, &load, &none, 1).is_empty());
        assert_eq!(free_slots(&critique, &workers, &load, &none), 0);
        sidecar.unavailable = None;
        assert_eq!(assign(&critique, &[sidecar], &load, &none, 1).len(), 1);
    }
}
