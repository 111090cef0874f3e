//! `GET /v1/usage?from=&to=&key=&model=`: the operators' view of the usage ledger, per UTC
//! day, gateway key and provider model (behind `GATEWAY_OPERATOR_TOKEN`, see `app.rs`).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::error::GatewayError;
use crate::ledger::{Day, MAX_REPORT_DAYS, ReportQuery};
use crate::routes::respond;

/// The handler.
pub async fn usage(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    respond(answer(&state, query).await)
}

async fn answer(
    state: &AppState,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, GatewayError> {
    let Some(ledger) = &state.ledger else {
        return Err(GatewayError::LedgerDisabled);
    };
    let Query(pairs) = query.map_err(|e| GatewayError::InvalidRequest {
        message: format!("invalid query string: {}", e.body_text()),
        param: None,
    })?;
    let query = parse(pairs, Day::today())?;
    let report = ledger.report(&query).await?;
    Ok(Json(report).into_response())
}

/// The query, checked: dates are `YYYY-MM-DD` (default today; `from` alone runs to today,
/// `to` alone is one day), `from` is not after `to`, at most [`MAX_REPORT_DAYS`] days, no
/// parameter twice and no unknown one.
fn parse(pairs: Vec<(String, String)>, today: Day) -> Result<ReportQuery, GatewayError> {
    let mut from = None;
    let mut to = None;
    let mut key = None;
    let mut model = None;
    for (name, value) in pairs {
        let slot = match name.as_str() {
            "from" => &mut from,
            "to" => &mut to,
            "key" => &mut key,
            "model" => &mut model,
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(GatewayError::invalid(
                    &shown,
                    format!("unknown query parameter `{shown}`: use from, to, key, model"),
                ));
            }
        };
        if slot.replace(value).is_some() {
            return Err(GatewayError::invalid(
                &name,
                format!("`{name}` is given more than once"),
            ));
        }
    }
    let date = |name: &str, value: Option<String>| -> Result<Option<Day>, GatewayError> {
        value
            .map(|v| {
                Day::parse(&v).ok_or_else(|| {
                    GatewayError::invalid(
                        name,
                        format!("`{name}` must be a date YYYY-MM-DD (UTC), 1970 to 9999"),
                    )
                })
            })
            .transpose()
    };
    let (from, to) = match (date("from", from)?, date("to", to)?) {
        (Some(from), Some(to)) => (from, to),
        (Some(from), None) => (from, today.max(from)),
        (None, Some(to)) => (to, to),
        (None, None) => (today, today),
    };
    if from > to {
        return Err(GatewayError::invalid(
            "from",
            format!("`from` ({from}) is after `to` ({to})"),
        ));
    }
    let days = from.until(to) + 1;
    if days > MAX_REPORT_DAYS {
        return Err(GatewayError::invalid(
            "to",
            format!("{from} to {to} is {days} days; ask for at most {MAX_REPORT_DAYS} at a time"),
        ));
    }
    let nonempty = |v: Option<String>| v.filter(|v| !v.is_empty());
    Ok(ReportQuery {
        from,
        to,
        key: nonempty(key),
        model: nonempty(model),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_query_defaults_to_today_and_refuses_bad_ranges() {
        let today = Day::parse("2026-12-02").unwrap();
        let q = parse(vec![], today).unwrap();
        assert_eq!((q.from, q.to), (today, today));
        let q = parse(pairs(&[("from", "2026-11-01")]), today).unwrap();
        assert_eq!(q.to, today);
        let q = parse(pairs(&[("to", "2026-11-01"), ("key", "a")]), today).unwrap();
        assert_eq!(q.from, q.to);
        assert_eq!(q.key.as_deref(), Some("a"));
        for (bad, param) in [
            (vec![("from", "2026-11-31")], "from"),
            (vec![("to", "yesterday")], "to"),
            (vec![("from", "2026-12-02"), ("to", "2026-12-01")], "from"),
            (vec![("from", "2026-01-01"), ("to", "2026-12-01")], "to"),
            (vec![("key", "a"), ("key", "b")], "key"),
            (vec![("form", "2026-01-01")], "form"),
        ] {
            match parse(pairs(&bad), today) {
                Err(GatewayError::InvalidRequest { param: got, .. }) => {
                    assert_eq!(got.as_deref(), Some(param), "{bad:?}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // Exactly 92 days is allowed.
        parse(
            pairs(&[("from", "2026-09-02"), ("to", "2026-12-02")]),
            today,
        )
        .unwrap();
        assert!(
            parse(
                pairs(&[("from", "2026-09-01"), ("to", "2026-12-02")]),
                today
            )
            .is_err()
        );
    }
}
