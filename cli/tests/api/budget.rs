//! A task's model spend, end to end: the master, an llm-gateway on the same Redis (its
//! usage ledger on) and the four llm workers. The gateway records each step's call under
//! the task and step the worker names; the master shows it; a task's budget stops the
//! calls that come after it is spent, and the step that made one fails for good.

use std::time::Duration;

use common::wire::{StepStatus, TaskStatus, TaskView};
use llm_gateway::config::Price;
use serde_json::{Value, json};
use testkit::RedisOptions;
use testkit::system::{Store, System};

/// The mock model's price: $2 per million tokens in, $8 out.
fn priced(config: &mut llm_gateway::Config) {
    config.prices.insert(
        "mock-1".into(),
        Price {
            input_usd_per_mtok: 2.0,
            output_usd_per_mtok: 8.0,
        },
    );
}

async fn submit(http: &reqwest::Client, system: &System, body: Value) -> String {
    let r = http
        .post(format!("{}/task", system.master_url()))
        .bearer_auth(&system.api_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn finished(http: &reqwest::Client, system: &System, id: &str) -> TaskView {
    let url = format!("{}/task/{id}", system.master_url());
    testkit::eventually(Duration::from_secs(30), || async {
        let view: TaskView = http
            .get(&url)
            .bearer_auth(&system.api_key)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        view.finished_at_ms.is_some().then_some(view)
    })
    .await
    .expect("the task finishes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_view_shows_each_steps_model_spend_and_a_budget_stops_the_task() {
    let system = System::builder()
        .store(Store::OwnRedis(RedisOptions::default()))
        .workers(4)
        .gateway_config(priced)
        .start()
        .await
        .unwrap();
    let http = reqwest::Client::new();

    // No budget: every step's call is in the ledger, and the totals add up.
    let id = submit(
        &http,
        &system,
        json!({"steps": ["plan", "retrieve", "evaluate", "finalize"], "input": "why?"}),
    )
    .await;
    let view = finished(&http, &system, &id).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");
    let mut tokens = 0;
    let mut cost = 0.0;
    for step in &view.steps {
        let usage = step.usage.as_ref().expect("each step's model call");
        assert_eq!(usage.calls, 1, "{step:?}");
        assert!(
            usage.prompt_tokens > 0 && usage.completion_tokens > 0,
            "{usage:?}"
        );
        let priced =
            (usage.prompt_tokens as f64 * 2.0 + usage.completion_tokens as f64 * 8.0) / 1e6;
        assert!((usage.cost_usd - priced).abs() < 1e-9, "{usage:?}");
        tokens += usage.total_tokens;
        cost += usage.cost_usd;
    }
    let total = view.usage.expect("the task's totals");
    assert_eq!(total.total.calls, 4);
    assert_eq!(total.total.total_tokens, tokens);
    assert!((total.total.cost_usd - cost).abs() < 1e-9);
    assert_eq!(total.budget, None);

    // A budget of one token: the first call is let through (nothing is spent yet), the
    // next is refused, and the step that made it fails without retries.
    let id = submit(
        &http,
        &system,
        json!({"steps": ["plan", "retrieve", "evaluate"], "input": "why?",
               "budget": {"max_tokens": 1}}),
    )
    .await;
    let view = finished(&http, &system, &id).await;
    assert_eq!(view.status, TaskStatus::Failed, "{view:?}");
    assert_eq!(view.steps[0].status, StepStatus::Succeeded);
    let refused = &view.steps[1];
    assert_eq!(refused.status, StepStatus::Failed);
    assert_eq!(refused.attempts, 1, "a spent budget is not retried");
    let error = refused.error.as_ref().unwrap();
    assert_eq!(error.kind.as_deref(), Some("budget_exceeded"), "{error:?}");
    assert!(!error.retryable);
    assert_eq!(
        view.steps[2].status,
        StepStatus::Pending,
        "the step after never ran"
    );
    assert_eq!(view.steps[2].attempts, 0);
    let usage = view.usage.expect("the budget and the spend");
    assert_eq!(usage.total.calls, 1, "only the first call was made");
    assert_eq!(usage.budget.unwrap().max_tokens, Some(1));
    system.stop().await;
}
