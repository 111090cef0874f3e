//! The usage ledger against a real redis-server: what chat (streamed or not) and embeddings
//! calls record per key, model, day, task and step; `GET /v1/usage`; key daily and task
//! budgets, shared by two gateways on one Redis; the 400s; and a Redis outage.

use common::config::Secret;
use common::redis::client as redis;
use common::redis::{RedisPool, RedisSettings};
use llm_gateway::Config;
use llm_gateway::config::{KeyConfig, Price, ProviderKind};
use serde_json::{Value, json};
use testkit::redis::RedisServer;

use crate::helpers::{
    TOKEN, TestApp, ask, ask_stream, openai_error, spawn_app, test_config, with_alias,
};

const OPERATOR: &str = "ledger-operator-token";
const TEAM: &str = "team-a";
const TEAM_TOKEN: &str = "team-a-token";
const CAPPED: &str = "capped";
const CAPPED_TOKEN: &str = "capped-token";
/// $0.30 in and $2.50 out per million tokens.
const PRICE: Price = Price {
    input_usd_per_mtok: 0.30,
    output_usd_per_mtok: 2.50,
};

/// Aliases `mock` (priced `mock-1`), `free` (unpriced `mock-free`), `embed` (priced
/// `mock-embed`); keys `default`, `team-a` and `capped` (no budgets); the ledger on
/// `settings`.
fn ledger_config(settings: &RedisSettings) -> Config {
    let mut config = test_config();
    config = with_alias(config, "mock", &[(ProviderKind::Mock, "mock-1")]);
    config = with_alias(config, "free", &[(ProviderKind::Mock, "mock-free")]);
    config = with_alias(config, "embed", &[(ProviderKind::Mock, "mock-embed")]);
    config.prices.insert("mock-1".into(), PRICE);
    config.prices.insert("mock-embed".into(), PRICE);
    for (name, token) in [(TEAM, TEAM_TOKEN), (CAPPED, CAPPED_TOKEN)] {
        config.keys.insert(
            name.into(),
            KeyConfig {
                token: Secret::new(token),
                ..KeyConfig::default()
            },
        );
    }
    config.gateway_operator_token = Secret::new(OPERATOR);
    config.use_redis = true;
    config.redis = settings.clone();
    config
}

/// `POST` to `path` with `token` and extra headers.
async fn post(
    app: &TestApp,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(format!("{}{path}", app.address))
        .bearer_auth(token)
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// A chat call expected to answer `200`; its `usage` (streamed: from the final chunk).
async fn chat_ok(app: &TestApp, token: &str, headers: &[(&str, &str)], body: Value) -> Value {
    let stream = body["stream"] == json!(true);
    let response = post(app, "/v1/chat/completions", token, headers, body).await;
    assert_eq!(response.status(), 200);
    if stream {
        let text = response.text().await.unwrap();
        let events = crate::helpers::sse_data(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        last["usage"].clone()
    } else {
        response.json::<Value>().await.unwrap()["usage"].clone()
    }
}

/// `GET /v1/usage?<query>` with `token`.
async fn usage(app: &TestApp, token: &str, query: &str) -> reqwest::Response {
    app.http
        .get(format!("{}/v1/usage?{query}", app.address))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// `GET /v1/usage?<query>` as the operator, expecting `200`.
async fn report(app: &TestApp, query: &str) -> Value {
    let response = usage(app, OPERATOR, query).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{query}: {body}");
    body
}

/// The row of `key` and `model` in a report.
fn row<'a>(report: &'a Value, key: &str, model: &str) -> &'a Value {
    report["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key && r["model"] == model)
        .unwrap_or_else(|| panic!("no row {key} {model} in {report}"))
}

/// Nano-dollars of `prompt` and `completion` tokens at [`PRICE`].
fn nanos(prompt: u64, completion: u64) -> i64 {
    (prompt as f64 * 300.0 + completion as f64 * 2500.0).round() as i64
}

fn tokens(usage: &Value, field: &str) -> u64 {
    usage[field].as_u64().unwrap()
}

async fn hgetall(pool: &RedisPool, key: &str) -> std::collections::HashMap<String, i64> {
    let mut conn = pool.get().await.unwrap();
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn ttl(pool: &RedisPool, key: &str) -> i64 {
    let mut conn = pool.get().await.unwrap();
    redis::cmd("TTL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn hset(pool: &RedisPool, key: &str, field: &str, value: i64) {
    let mut conn = pool.get().await.unwrap();
    let _: i64 = redis::cmd("HSET")
        .arg(key)
        .arg(field)
        .arg(value)
        .query_async(&mut conn)
        .await
        .unwrap();
}

fn task_key(settings: &RedisSettings, task: &str) -> String {
    common::usage::task_usage_key(&settings.key_prefix, task)
}

fn today() -> String {
    llm_gateway::ledger::Day::today().to_string()
}

#[tokio::test]
async fn chat_streamed_or_not_and_embeddings_are_recorded_per_key_model_day_task_and_step() {
    let server = RedisServer::start();
    let settings = server.settings();
    let pool = RedisPool::new(&settings).unwrap();
    let app = spawn_app(ledger_config(&settings)).await;

    let task = [
        ("x-ensemble-task-id", "task-1"),
        ("x-ensemble-step-id", "plan"),
    ];
    let a = chat_ok(&app, TOKEN, &task, ask("mock", "plan the trip")).await;
    let chain = [("x-ensemble-task-id", "task-1"), ("x-ensemble-step", "1")];
    let b = chat_ok(
        &app,
        TEAM_TOKEN,
        &chain,
        ask_stream("mock", "book it, quickly"),
    )
    .await;
    let c = chat_ok(&app, TEAM_TOKEN, &[], ask_stream("free", "no price here")).await;
    let response = post(
        &app,
        "/v1/embeddings",
        TEAM_TOKEN,
        &task,
        json!({"model": "embed", "input": ["one", "two words"]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let e: Value = response.json().await.unwrap();
    let e = &e["usage"];

    // The day's report: one row per key and provider model, with the answers' figures.
    let day = report(&app, "").await;
    assert_eq!(day["from"], today());
    assert_eq!(day["to"], today());
    assert_eq!(day["data"].as_array().unwrap().len(), 4, "{day}");
    let default_mock = row(&day, "default", "mock/mock-1");
    assert_eq!(default_mock["date"], today());
    assert_eq!(default_mock["prompt_tokens"], a["prompt_tokens"]);
    assert_eq!(default_mock["completion_tokens"], a["completion_tokens"]);
    assert_eq!(default_mock["total_tokens"], a["total_tokens"]);
    assert_eq!(default_mock["calls"], 1);
    let expected = nanos(tokens(&a, "prompt_tokens"), tokens(&a, "completion_tokens"));
    assert!(expected > 0);
    assert_eq!(
        default_mock["cost_usd"].as_f64().unwrap(),
        expected as f64 / 1e9
    );
    let team_mock = row(&day, TEAM, "mock/mock-1");
    assert_eq!(team_mock["prompt_tokens"], b["prompt_tokens"]);
    assert_eq!(team_mock["completion_tokens"], b["completion_tokens"]);
    let team_free = row(&day, TEAM, "mock/mock-free");
    assert_eq!(team_free["total_tokens"], c["total_tokens"]);
    assert_eq!(team_free["cost_usd"], 0.0);
    let team_embed = row(&day, TEAM, "mock/mock-embed");
    assert_eq!(team_embed["prompt_tokens"], e["prompt_tokens"]);
    assert_eq!(team_embed["completion_tokens"], 0);
    assert_eq!(day["total"]["calls"], 4);
    let all_tokens = [&a, &b, &c, e]
        .iter()
        .map(|u| tokens(u, "total_tokens"))
        .sum::<u64>();
    assert_eq!(day["total"]["total_tokens"], all_tokens);

    // The task's hash, in the layout the master reads: totals and per step, with a TTL as
    // the gateway created it.
    let hash = hgetall(&pool, &task_key(&settings, "task-1")).await;
    let in_ =
        tokens(&a, "prompt_tokens") + tokens(&b, "prompt_tokens") + tokens(e, "prompt_tokens");
    assert_eq!(hash["in"] as u64, in_, "{hash:?}");
    assert_eq!(hash["calls"], 3);
    assert_eq!(hash["step:plan:calls"], 2);
    assert_eq!(
        hash["step:1:out"] as u64,
        tokens(&b, "completion_tokens"),
        "{hash:?}"
    );
    assert_eq!(
        hash["step:1:cost_nanos"],
        nanos(tokens(&b, "prompt_tokens"), tokens(&b, "completion_tokens"))
    );
    let task_ttl = ttl(&pool, &task_key(&settings, "task-1")).await;
    assert!(task_ttl > 0 && task_ttl <= 7 * 24 * 3600, "{task_ttl}");
    // The day's hash lives for the retention after its day.
    let day_ttl = ttl(
        &pool,
        &format!("{}:gw:usage:{}", settings.key_prefix, today()),
    )
    .await;
    assert!(
        day_ttl > 400 * 86_400 && day_ttl <= 401 * 86_400,
        "{day_ttl}"
    );

    // A hash the master made at submit (to hold a budget) is given no TTL by the gateway.
    let held = task_key(&settings, "task-2");
    hset(&pool, &held, "budget_tokens", 1_000_000).await;
    chat_ok(
        &app,
        TOKEN,
        &[("x-ensemble-task-id", "task-2")],
        ask("mock", "hi"),
    )
    .await;
    assert_eq!(ttl(&pool, &held).await, -1);
    assert_eq!(hgetall(&pool, &held).await["calls"], 1);

    let metrics = app.metrics().await;
    for series in [
        "ensemble_gateway_cost_nanos_total{key=\"team-a\",provider=\"mock\",model=\"mock-1\"}",
        "ensemble_gateway_key_tokens_total{key=\"team-a\",direction=\"in\"}",
        "ensemble_gateway_unpriced_calls_total{model=\"mock-free\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
}

#[tokio::test]
async fn the_usage_report_filters_checks_its_token_and_its_dates() {
    let server = RedisServer::start();
    let settings = server.settings();
    let app = spawn_app(ledger_config(&settings)).await;
    chat_ok(&app, TOKEN, &[], ask("mock", "one")).await;
    chat_ok(&app, TEAM_TOKEN, &[], ask("mock", "two")).await;
    chat_ok(&app, TEAM_TOKEN, &[], ask("free", "three")).await;

    let team = report(&app, "key=team-a").await;
    assert_eq!(team["data"].as_array().unwrap().len(), 2, "{team}");
    assert!(
        team["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["key"] == TEAM)
    );
    assert_eq!(team["total"]["calls"], 2);
    // A model by its full ledger name or by the provider's bare name.
    for model in ["mock%2Fmock-1", "mock-1"] {
        let mock = report(&app, &format!("model={model}")).await;
        let keys: Vec<&str> = mock["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap())
            .collect();
        // Sorted by date, key, model.
        assert_eq!(keys, ["default", TEAM], "{mock}");
    }
    let both = report(&app, "key=team-a&model=mock-free").await;
    assert_eq!(both["data"].as_array().unwrap().len(), 1);
    let ten_days_ago = llm_gateway::ledger::Day::at(
        std::time::SystemTime::now() - std::time::Duration::from_secs(10 * 86_400),
    );
    let range = report(&app, &format!("from={ten_days_ago}&to={}", today())).await;
    assert_eq!(range["total"]["calls"], 3);
    let none = report(&app, "from=2020-01-01&to=2020-03-31").await;
    assert_eq!(none["data"], json!([]));
    assert_eq!(none["total"]["calls"], 0);

    // Only the operator's token: not a caller key, not none.
    for token in [TOKEN, TEAM_TOKEN, "wrong"] {
        openai_error(usage(&app, token, "").await, 401).await;
    }
    let anonymous = app
        .http
        .get(format!("{}/v1/usage", app.address))
        .send()
        .await
        .unwrap();
    openai_error(anonymous, 401).await;

    for (query, param) in [
        ("from=2026-02-30", "from"),
        ("to=12/01/2026", "to"),
        ("from=2026-03-02&to=2026-03-01", "from"),
        ("from=2026-01-01&to=2026-04-03", "to"),
        ("from=2026-01-01&from=2026-01-02", "from"),
        ("day=2026-01-01", "day"),
    ] {
        let body = openai_error(usage(&app, OPERATOR, query).await, 400).await;
        assert_eq!(body["error"]["param"], param, "{query}: {body}");
    }
    // 92 days is the most.
    report(&app, "from=2026-01-01&to=2026-04-02").await;

    // Without USE_REDIS there is no ledger to read.
    let mut config = ledger_config(&settings);
    config.use_redis = false;
    let plain = spawn_app(config).await;
    let body = openai_error(usage(&plain, OPERATOR, "").await, 400).await;
    assert_eq!(body["error"]["code"], "ledger_disabled");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("USE_REDIS"),
        "{body}"
    );
}

#[tokio::test]
async fn a_key_daily_token_budget_is_shared_by_two_gateways_and_refuses_once_spent() {
    // One call's tokens, learnt from a gateway without the ledger (the mock is
    // deterministic).
    let learn = spawn_app(with_alias(
        test_config(),
        "mock",
        &[(ProviderKind::Mock, "mock-1")],
    ))
    .await;
    let one = tokens(
        &chat_ok(&learn, TOKEN, &[], ask("mock", "count me")).await,
        "total_tokens",
    );

    let server = RedisServer::start();
    let settings = server.settings();
    let mut config = ledger_config(&settings);
    config.keys.get_mut(CAPPED).unwrap().daily_max_tokens = Some(2 * one);
    let a = spawn_app(config.clone()).await;
    let b = spawn_app(config).await;

    chat_ok(&a, CAPPED_TOKEN, &[], ask("mock", "count me")).await;
    chat_ok(&b, CAPPED_TOKEN, &[], ask_stream("mock", "count me")).await;
    // 2 × one spent of 2 × one: refused, by either gateway, streamed or not.
    for (app, body) in [
        (&a, ask("mock", "count me")),
        (&b, ask_stream("mock", "count me")),
    ] {
        let response = post(app, "/v1/chat/completions", CAPPED_TOKEN, &[], body).await;
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=86_400).contains(&retry_after), "{retry_after}");
        let body = openai_error(response, 429).await;
        assert_eq!(body["error"]["code"], "budget_exceeded");
        assert_eq!(body["error"]["type"], "insufficient_quota");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("daily token budget of gateway key `capped`"),
            "{message}"
        );
        assert!(
            message.contains(&format!("{} of {}", 2 * one, 2 * one)),
            "{message}"
        );
    }
    // Embeddings are held to it too; other keys are not.
    let response = post(
        &a,
        "/v1/embeddings",
        CAPPED_TOKEN,
        &[],
        json!({"model": "embed", "input": "x"}),
    )
    .await;
    openai_error(response, 429).await;
    chat_ok(&b, TEAM_TOKEN, &[], ask("mock", "count me")).await;
    // Refusals are not counted as spend.
    let day = report(&a, "key=capped").await;
    assert_eq!(day["total"]["calls"], 2);
    assert!(
        a.metrics()
            .await
            .contains("ensemble_gateway_budget_refusals_total{scope=\"key_daily\"}")
    );
}

#[tokio::test]
async fn a_task_budget_the_master_wrote_refuses_for_good_once_spent() {
    let server = RedisServer::start();
    let settings = server.settings();
    let pool = RedisPool::new(&settings).unwrap();
    let app = spawn_app(ledger_config(&settings)).await;

    hset(&pool, &task_key(&settings, "budgeted"), "budget_tokens", 1).await;
    let task = [("x-ensemble-task-id", "budgeted"), ("x-ensemble-step", "0")];
    chat_ok(&app, TOKEN, &task, ask("mock", "first")).await;
    let response = post(
        &app,
        "/v1/chat/completions",
        TOKEN,
        &task,
        ask("mock", "second"),
    )
    .await;
    assert!(response.headers().get("retry-after").is_none());
    let body = openai_error(response, 429).await;
    assert_eq!(body["error"]["code"], "budget_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("token budget of task `budgeted`"),
        "{message}"
    );
    // The same key, without the task, is not held to the task's budget.
    chat_ok(&app, TOKEN, &[], ask("mock", "second")).await;

    // A dollar budget on a priced model: refused once spent.
    let dollars = task_key(&settings, "dollars");
    hset(&pool, &dollars, "budget_cost_nanos", 1).await;
    let task = [("x-ensemble-task-id", "dollars")];
    chat_ok(&app, TEAM_TOKEN, &task, ask("mock", "first")).await;
    let body = openai_error(
        post(
            &app,
            "/v1/chat/completions",
            TEAM_TOKEN,
            &task,
            ask("mock", "x"),
        )
        .await,
        429,
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cost budget of task `dollars`"),
        "{body}"
    );
    // A dollar budget cannot be enforced on a model without a price.
    let body = openai_error(
        post(
            &app,
            "/v1/chat/completions",
            TEAM_TOKEN,
            &task,
            ask("free", "x"),
        )
        .await,
        400,
    )
    .await;
    assert_eq!(body["error"]["code"], "model_unpriced");
    assert_eq!(body["error"]["param"], "model");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("mock/mock-free") && message.contains("[prices.\"mock-free\"]"),
        "{message}"
    );
}

#[tokio::test]
async fn a_key_dollar_budget_refuses_unpriced_models_and_bad_task_headers_are_400() {
    let server = RedisServer::start();
    let settings = server.settings();
    let mut config = ledger_config(&settings);
    config.keys.get_mut(CAPPED).unwrap().daily_max_cost_usd = Some(1.0);
    let app = spawn_app(config.clone()).await;
    let body = openai_error(
        post(
            &app,
            "/v1/chat/completions",
            CAPPED_TOKEN,
            &[],
            ask("free", "x"),
        )
        .await,
        400,
    )
    .await;
    assert_eq!(body["error"]["code"], "model_unpriced");
    chat_ok(&app, CAPPED_TOKEN, &[], ask("mock", "x")).await;
    // An unknown alias is still the router's 404, not a budget matter.
    let body = openai_error(
        post(
            &app,
            "/v1/chat/completions",
            CAPPED_TOKEN,
            &[],
            ask("nope", "x"),
        )
        .await,
        404,
    )
    .await;
    assert_eq!(body["error"]["code"], "model_not_found");

    for (headers, param) in [
        (vec![("x-ensemble-task-id", "a:b")], "x-ensemble-task-id"),
        (vec![("x-ensemble-task-id", "")], "x-ensemble-task-id"),
        (
            vec![("x-ensemble-task-id", &*"x".repeat(65))],
            "x-ensemble-task-id",
        ),
        (
            vec![("x-ensemble-task-id", "t"), ("x-ensemble-step-id", "a:b")],
            "x-ensemble-step-id",
        ),
        (
            vec![("x-ensemble-task-id", "t"), ("x-ensemble-step", "")],
            "x-ensemble-step",
        ),
    ] {
        let body = openai_error(
            post(
                &app,
                "/v1/chat/completions",
                TOKEN,
                &headers,
                ask("mock", "x"),
            )
            .await,
            400,
        )
        .await;
        assert_eq!(body["error"]["param"], param, "{headers:?}: {body}");
    }

    // Without USE_REDIS there is no ledger, and the task headers are not read.
    let mut plain = config;
    plain.use_redis = false;
    plain.keys.get_mut(CAPPED).unwrap().daily_max_cost_usd = None;
    let plain = spawn_app(plain).await;
    chat_ok(
        &plain,
        TOKEN,
        &[("x-ensemble-task-id", "a:b")],
        ask("mock", "x"),
    )
    .await;
}

#[test]
fn a_budget_without_use_redis_refuses_to_start_naming_it() {
    use common::config::Settings;
    let mut config = test_config();
    config.daily_max_tokens = Some(10);
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.contains("DAILY_MAX_TOKENS") && err.contains("USE_REDIS"),
        "{err}"
    );
    let mut config = test_config();
    config.keys.insert(
        "k".into(),
        KeyConfig {
            token: Secret::new("k-token"),
            daily_max_cost_usd: Some(2.0),
            ..KeyConfig::default()
        },
    );
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("keys.k.daily_max_cost_usd"), "{err}");
    let mut config = test_config();
    config.prices.insert(
        "m".into(),
        Price {
            input_usd_per_mtok: -1.0,
            output_usd_per_mtok: 0.0,
        },
    );
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("prices.\"m\".input_usd_per_mtok"), "{err}");
}

#[tokio::test]
async fn a_redis_outage_refuses_budgeted_calls_with_503_answers_plain_ones_and_recovers() {
    let mut server = RedisServer::start();
    let settings = server.settings();
    let mut config = ledger_config(&settings);
    config.keys.get_mut(CAPPED).unwrap().daily_max_tokens = Some(1_000_000);
    let app = spawn_app(config).await;
    chat_ok(&app, CAPPED_TOKEN, &[], ask("mock", "before")).await;

    server.kill();
    let response = post(
        &app,
        "/v1/chat/completions",
        CAPPED_TOKEN,
        &[],
        ask("mock", "x"),
    )
    .await;
    assert_eq!(response.headers()["retry-after"], "1");
    let body = openai_error(response, 503).await;
    assert_eq!(body["error"]["code"], "store_unavailable");
    // A call with a task header may have a budget: it cannot be checked either.
    let task = [("x-ensemble-task-id", "t-1")];
    openai_error(
        post(
            &app,
            "/v1/chat/completions",
            TEAM_TOKEN,
            &task,
            ask("mock", "x"),
        )
        .await,
        503,
    )
    .await;
    // A call no budget applies to is answered; only its record is lost (and counted).
    chat_ok(&app, TEAM_TOKEN, &[], ask("mock", "during")).await;
    chat_ok(&app, TEAM_TOKEN, &[], ask_stream("mock", "during")).await;
    assert!(
        app.metrics()
            .await
            .contains("ensemble_gateway_ledger_errors_total")
    );
    openai_error(usage(&app, OPERATOR, "").await, 503).await;

    server.restart();
    chat_ok(&app, CAPPED_TOKEN, &[], ask("mock", "after")).await;
    chat_ok(&app, TEAM_TOKEN, &task, ask("mock", "after")).await;
    // The restarted Redis kept nothing (no AOF): only what came after.
    let day = report(&app, "").await;
    assert_eq!(day["total"]["calls"], 2, "{day}");
}
