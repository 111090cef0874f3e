//! The dashboard (`/ui`): its session and CSRF rules over plain HTTP, and the pages in a
//! real browser (headless Chromium through chromedriver, from Debian's `chromium` and
//! `chromium-driver`), with screenshots of every page at desktop and phone widths under
//! `target/tmp/dashboard/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::wire::StepError;
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::{Value, json};
use testkit::RedisServer;
use testkit::fakes::worker::Answer;
use testkit::system::CAPABILITIES;

use crate::helpers::*;

/// Signs in over HTTP; returns the cookie pair (`ensemble_session=…`) and the CSRF token.
async fn sign_in(master: &TestMaster, key: &str) -> (String, String) {
    let r = master
        .http
        .post(format!("{}/ui/login", master.url))
        .json(&json!({ "key": key }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP gets no Secure cookie");
    let pair = set.split(';').next().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    (pair, body["csrf"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn a_dashboard_session_is_an_operator_credential_and_changes_need_its_csrf_token() {
    let redis = RedisServer::start();
    let (master, _workers) = spawn_app(&redis).await;
    let url = |path: &str| format!("{}{path}", master.url);

    // Sign-in: an operator key only; a client key is not enough, a wrong key is no key.
    for (key, status) in [(ALICE, 403), ("not-a-key-at-all", 401), ("", 401)] {
        let r = master
            .http
            .post(url("/ui/login"))
            .json(&json!({ "key": key }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{key}");
        assert!(r.headers().get(SET_COOKIE).is_none());
    }
    for (body, status) in [
        ("{\"key\": 1}", 422),
        ("{\"key\": \"x\", \"role\": \"admin\"}", 422),
        ("not json", 400),
    ] {
        let r = master
            .http
            .post(url("/ui/login"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
    }
    let huge = json!({ "key": "k".repeat(4 << 20) });
    let r = master
        .http
        .post(url("/ui/login"))
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // Behind the load balancer's HTTPS, the cookie is Secure.
    let r = master
        .http
        .post(url("/ui/login"))
        .header("x-forwarded-proto", "https")
        .json(&json!({ "key": OPERATOR }))
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );

    let (cookie, csrf) = sign_in(&master, OPERATOR).await;
    // Reads with the cookie alone.
    for path in ["/queues", "/workers", "/ui/session"] {
        let r = master
            .http
            .get(url(path))
            .header(COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let session: Value = master
        .http
        .get(url("/ui/session"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["csrf"], csrf.as_str());

    // An operator reads any client's task.
    let id = master.submit(json!({ "input": { "q": 1 } })).await;
    let r = master
        .http
        .get(url(&format!("/task/{id}")))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A change without the token (a forged cross-site request could send the cookie, not the
    // header) is refused and changes nothing.
    let parked = master
        .submit(json!({
            "steps": [{ "id": "hold", "needs": [], "wait": { "timeout_ms": 600_000 } }],
            "input": {}
        }))
        .await;
    for token in [None, Some("0".repeat(64)), Some(csrf.to_uppercase())] {
        let mut request = master
            .http
            .delete(url(&format!("/task/{parked}")))
            .header(COOKIE, &cookie);
        if let Some(t) = &token {
            request = request.header("x-csrf-token", t);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 403, "{token:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "csrf");
    }
    assert_eq!(master.view(&parked).await.status.as_str(), "waiting");
    let r = master
        .http
        .delete(url(&format!("/task/{parked}")))
        .header(COOKIE, &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(master.view(&parked).await.status.as_str(), "cancelled");

    // The cookie is not a client credential: it submits nothing.
    let r = master
        .http
        .post(url("/task"))
        .header(COOKIE, &cookie)
        .header("x-csrf-token", &csrf)
        .json(&json!({ "input": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A forged or tampered cookie is refused with a 401 that says to sign in again.
    let (name, value) = cookie.split_once('=').unwrap();
    let forged = format!(
        "{name}=v1.99999999999.{}.{}",
        "a".repeat(32),
        "b".repeat(64)
    );
    // The signature's last hex digit changed (to another digit, whatever it was).
    let last = if value.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{name}={}{last}", &value[..value.len() - 1]);
    for bad in [
        forged,
        tampered,
        format!("{name}="),
        format!("{name}={}", "x".repeat(10_000)),
    ] {
        let r = master
            .http
            .get(url("/queues"))
            .header(COOKIE, &bad)
            .send()
            .await
            .unwrap();
        assert!(
            r.status() == 401 || r.status() == 431,
            "{}: {}",
            r.status(),
            &bad[..40.min(bad.len())]
        );
    }

    // Sign-out clears the cookie in the browser.
    let r = master
        .http
        .post(url("/ui/logout"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(
        r.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    master.stop().await;
}

/// Guessing operator keys through the sign-in form is slowed down: after ten failures the
/// master refuses every sign-in, the right key too, with `429` and `Retry-After`, so the
/// answers stop telling a guess from the key. The key still works as a bearer token.
#[tokio::test]
async fn guessing_operator_keys_at_the_sign_in_is_refused_after_ten_failures() {
    let redis = RedisServer::start();
    let (master, _workers) = spawn_app(&redis).await;
    let login = |key: String| {
        master
            .http
            .post(format!("{}/ui/login", master.url))
            .json(&json!({ "key": key }))
            .send()
    };
    for guess in 0..10 {
        let r = login(format!("guess-{guess}")).await.unwrap();
        assert_eq!(r.status(), 401, "guess {guess}");
    }
    for key in ["guess-10".to_string(), OPERATOR.to_string()] {
        let r = login(key.clone()).await.unwrap();
        assert_eq!(r.status(), 429, "{key}");
        assert!(r.headers().get(SET_COOKIE).is_none());
        let wait: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=6).contains(&wait), "Retry-After {wait}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "too_many_sign_ins", "{body}");
    }
    let r = master
        .http
        .get(format!("{}/queues", master.url))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_page_allows_no_inline_script_no_framing_and_no_other_origin() {
    let redis = RedisServer::start();
    let master = TestMaster::start(test_config(&redis.settings())).await;
    let r = master
        .http
        .get(format!("{}/ui", master.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the page itself needs no credential");
    let h = r.headers().clone();
    let csp = h["content-security-policy"].to_str().unwrap();
    for rule in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(rule), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let page = r.text().await.unwrap();
    assert!(!page.contains("<script>"), "no inline script");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no CDN"
    );
    for (path, kind) in [("/ui/app.js", "javascript"), ("/ui/app.css", "css")] {
        let r = master
            .http
            .get(format!("{}{path}", master.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().contains(kind));
        let text = r.text().await.unwrap();
        assert!(
            !text.contains("https://"),
            "{path} loads nothing from elsewhere"
        );
    }
    // Without a session the data routes stay closed.
    for path in ["/queues", "/ui/session", "/workers"] {
        let r = master
            .http
            .get(format!("{}{path}", master.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    master.stop().await;
}

// ---- in a real browser ---------------------------------------------------------------------

/// chromedriver on a free loopback port, stopped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Self {
        let port = testkit::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver is needed for the dashboard's browser test: \
                 apt-get install chromium chromium-driver",
            );
        // Made at once, so that its `Drop` stops the child on every path below.
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        for _ in 0..100 {
            if http
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return driver;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not start on {}", driver.url);
    }

    async fn browser(&self, profile: &std::path::Path) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "args": [
                    "--headless=new",
                    // Root in CI has no user namespace sandbox.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("headless chromium did not start")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves the page at desktop and at phone width as `<name>-desktop.png`, `<name>-phone.png`.
async fn shoot(browser: &Client, name: &str) {
    let dir = screenshots();
    for (suffix, width, height) in [("desktop", 1280, 900), ("phone", 390, 844)] {
        browser.set_window_size(width, height).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The page fits the phone's width: nothing but tables (which scroll in their own box)
        // is wider than the viewport.
        let overflow = browser
            .execute(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
                vec![],
            )
            .await
            .unwrap();
        assert!(
            overflow.as_f64().unwrap_or(0.0) <= 1.0,
            "{name} is {overflow} px wider than a {width} px screen"
        );
        let png = browser.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}-{suffix}.png")), png).unwrap();
    }
    browser.set_window_size(1280, 900).await.unwrap();
}

/// Waits until `script` (a JavaScript expression's body that returns a value) returns
/// something truthy, and returns it; panics with `what` after `within`.
async fn until(browser: &Client, what: &str, within: Duration, script: &str) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = browser.execute(script, vec![]).await.unwrap();
        let truthy = match &v {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the element `css` selects.
async fn click(browser: &Client, css: &str) {
    let element = browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} to click: {e}"));
    element.click().await.unwrap();
}

/// Waits up to 10 s for an element `css` selects, and returns it.
async fn appear(browser: &Client, css: &str) -> fantoccini::elements::Element {
    browser
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} did not appear: {e}"))
}

async fn go(browser: &Client, base: &str, hash: &str) {
    browser.goto(&format!("{base}/ui#{hash}")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_tasks_run_and_redrives_a_dead_letter_in_a_real_browser() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    // The default pipeline's workers take their time, so the page shows steps running.
    let mut workers = Vec::new();
    for capability in CAPABILITIES {
        let slow = Behavior::Succeed {
            delay: Duration::from_millis(700),
        };
        workers.push(
            TestWorker::start(
                &format!("w-{capability}"),
                &[capability],
                4,
                slow,
                &settings,
                &master.url,
            )
            .await,
        );
    }
    // `flaky` fails for good until the test mends it.
    let broken = Arc::new(AtomicBool::new(true));
    let is_broken = broken.clone();
    let flaky = Answer::new(move |step| {
        if is_broken.load(Ordering::SeqCst) {
            Err(StepError::permanent("agent", "the flaky agent is broken"))
        } else {
            Ok(json!({ "mended": true, "step": step.step }))
        }
    });
    workers.push(
        TestWorker::start(
            "w-flaky",
            &["flaky"],
            2,
            flaky.into(),
            &settings,
            &master.url,
        )
        .await,
    );
    // `parked` holds one step for ever and has no room for more.
    workers.push(
        TestWorker::start(
            "w-parked",
            &["parked"],
            1,
            Behavior::Hang,
            &settings,
            &master.url,
        )
        .await,
    );

    // Fixed figures for the overview: one step in flight and two queued behind it, one dead
    // letter.
    for n in 0..3 {
        master
            .submit(json!({ "steps": ["parked"], "input": { "n": n } }))
            .await;
    }
    let dead = master
        .submit(json!({ "steps": ["flaky"], "input": { "q": "dead" } }))
        .await;
    assert_eq!(
        master
            .wait(&dead, Duration::from_secs(20))
            .await
            .status
            .as_str(),
        "failed"
    );

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.browser(profile.path()).await;
    let base = master.url.clone();

    // Sign in: a client key is refused on the page, an operator key opens the overview.
    go(&browser, &base, "/").await;
    let key = appear(&browser, "#key").await;
    shoot(&browser, "sign-in").await;
    key.send_keys(ALICE).await.unwrap();
    click(&browser, "#login button").await;
    until(&browser, "a client key is refused", Duration::from_secs(10),
        "return document.querySelector('#login-error')?.textContent.includes('not an operator key')").await;
    let key = browser.find(Locator::Css("#key")).await.unwrap();
    key.clear().await.unwrap();
    key.send_keys(OPERATOR).await.unwrap();
    click(&browser, "#login button").await;
    appear(&browser, "#queues").await;
    // The session cookie is out of the page's reach (HttpOnly).
    let cookies = browser
        .execute("return document.cookie", vec![])
        .await
        .unwrap();
    assert!(
        !cookies
            .as_str()
            .unwrap_or_default()
            .contains("ensemble_session"),
        "{cookies}"
    );

    // The overview's numbers are `GET /queues`'s.
    let expected: Value = master.operator_json("/queues").await;
    let fields = [
        "queued",
        "delayed",
        "in_flight",
        "dead_lettered",
        "live_workers",
        "backlog_per_worker",
    ];
    let rows = expected["queues"].as_array().unwrap();
    for cap in ["parked", "flaky"] {
        assert!(rows.iter().any(|r| r["capability"] == cap), "{expected}");
    }
    let shown = until(&browser, "the overview shows every queue", Duration::from_secs(10), &format!(
        "const rows = {{}};
         for (const tr of document.querySelectorAll('#queues tbody tr')) {{
           rows[tr.dataset.cap] = {{}};
           for (const td of tr.querySelectorAll('td')) rows[tr.dataset.cap][td.dataset.field] = Number(td.dataset.value);
         }}
         return Object.keys(rows).length >= {} ? rows : null;", rows.len())).await;
    for row in rows {
        let cap = row["capability"].as_str().unwrap();
        for field in fields {
            assert_eq!(
                shown[cap][field].as_f64(),
                row[field].as_f64(),
                "{cap} {field}: page {shown} vs /queues {expected}"
            );
        }
    }
    assert_eq!(shown["parked"]["queued"], 2);
    assert_eq!(shown["parked"]["in_flight"], 1);
    assert_eq!(shown["flaky"]["dead_lettered"], 1);

    // A task's steps turn to succeeded on its page, live: the page is never reloaded.
    let id = master
        .submit(json!({ "steps": CAPABILITIES, "input": { "topic": "dashboards" } }))
        .await;
    go(&browser, &base, &format!("/task/{id}")).await;
    browser
        .execute("window.__sameLoad = true; return true", vec![])
        .await
        .unwrap();
    let first = until(&browser, "the task's steps are drawn", Duration::from_secs(10),
        "const s = [...document.querySelectorAll('#graph .columns .step')]; return s.length === 4 ? s.map(e => e.dataset.status) : null").await;
    assert!(
        first.as_array().unwrap().iter().any(|s| s != "succeeded"),
        "the page must open before the task ends to show it live: {first}"
    );
    until(
        &browser,
        "the second step runs",
        Duration::from_secs(20),
        "return document.querySelectorAll('#graph .step[data-status=succeeded]').length >= 1",
    )
    .await;
    shoot(&browser, "task-running").await;
    until(&browser, "every step succeeded, live", Duration::from_secs(30),
        "return document.querySelectorAll('#graph .columns .step[data-status=succeeded]').length === 4
            && document.querySelector('#task-status')?.dataset.status === 'succeeded'").await;
    assert_eq!(
        browser
            .execute("return window.__sameLoad === true", vec![])
            .await
            .unwrap(),
        true
    );
    // A step's detail: its worker, output and timing.
    click(&browser, "#graph .step[data-step]").await;
    until(
        &browser,
        "the step's detail",
        Duration::from_secs(5),
        "return document.querySelector('#step-detail .detail')?.textContent.includes('w-plan')",
    )
    .await;
    let bars = browser
        .execute(
            "return document.querySelectorAll('#waterfall .row').length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(bars, 4);
    shoot(&browser, "task-detail").await;

    // The overview's charts count finished tasks from the operators' event stream.
    go(&browser, &base, "/").await;
    until(
        &browser,
        "the charts count the finished task",
        Duration::from_secs(15),
        "return Number(document.querySelector('#fig-rate')?.textContent) > 0",
    )
    .await;
    shoot(&browser, "overview").await;

    // Tasks: search by status finds the finished task.
    go(&browser, &base, "/tasks?status=succeeded").await;
    until(
        &browser,
        "the search lists the task",
        Duration::from_secs(10),
        &format!("return !!document.querySelector('#tasks tr[data-task=\"{id}\"]')"),
    )
    .await;
    let statuses = browser
        .execute(
            "return [...document.querySelectorAll('#tasks tbody tr')].map(r => r.dataset.status)",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        statuses
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s == "succeeded"),
        "{statuses}"
    );
    shoot(&browser, "tasks").await;

    // Workers: every live worker.
    go(&browser, &base, "/workers").await;
    let listed = until(
        &browser,
        "the workers page lists them",
        Duration::from_secs(10),
        "const n = document.querySelectorAll('#workers tbody tr').length; return n >= 6 ? n : null",
    )
    .await;
    let live: Value = master.operator_json("/workers").await;
    assert_eq!(
        listed.as_u64().unwrap() as usize,
        live["workers"].as_array().unwrap().len()
    );
    shoot(&browser, "workers").await;

    // Dead letters: the failed task with its error; redriven from the page, it runs again.
    go(&browser, &base, "/dead").await;
    until(&browser, "the dead letter and its error", Duration::from_secs(10),
        &format!("return document.querySelector('tr[data-task=\"{dead}\"]')?.textContent.includes('the flaky agent is broken')")).await;
    shoot(&browser, "dead-letters").await;
    broken.store(false, Ordering::SeqCst);
    click(
        &browser,
        &format!("tr[data-task=\"{dead}\"] button.redrive"),
    )
    .await;
    let link = appear(&browser, "#redriven-link").await;
    link.click().await.unwrap();
    until(
        &browser,
        "the redriven task succeeds",
        Duration::from_secs(20),
        "return document.querySelector('#task-status')?.dataset.status === 'succeeded'",
    )
    .await;
    assert_eq!(master.view(&dead).await.status.as_str(), "succeeded");

    // Signing out ends the session: the page asks to sign in again.
    click(&browser, "#signout").await;
    appear(&browser, "#key").await;
    let status = browser
        .execute_async(
            "const done = arguments[0]; fetch('/queues').then(r => done(r.status))",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, 401);

    browser.close().await.unwrap();
    drop(driver);
    master.stop().await;
}
