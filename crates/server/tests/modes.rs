//! Start-mode auth and signing, sync PUTs, injected time, invoke API, metrics.

mod common;

use cairn_server::clock::ManualClock;
use cairn_server::store::SqliteStore;
use cairn_server::{Config, Server};
use common::{FakeApp, FakeFn, Step, TestServer};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const KEY: &str = "signkey-test-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

async fn start_mode() -> (Server, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("db")).unwrap());
    let mut cfg = Config::start(
        "127.0.0.1:0".parse().unwrap(),
        KEY.into(),
        vec!["evkey".into()],
    );
    cfg.retry_interval = Some(Duration::from_millis(50));
    let server = Server::start(cfg, store).await.unwrap();
    let base = format!("http://{}", server.addr());
    (server, base, dir)
}

#[tokio::test]
async fn start_mode_enforces_keys_and_signs_calls() {
    let (_server, base, _dir) = start_mode().await;
    let http = reqwest::Client::new();
    let bearer = format!(
        "Bearer {}",
        cairn_protocol::signature::hash_signing_key(KEY).unwrap()
    );

    let app = FakeApp::start_with_key(
        "signed",
        vec![FakeFn::new("f", "s/go", vec![Step::Run("a", json!(1))])],
        Some(KEY),
    )
    .await;
    let r = http
        .post(format!("{base}/fn/register"))
        .json(&app.register_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "sync without bearer accepted");
    let r = http
        .post(format!("{base}/fn/register"))
        .header("authorization", &bearer)
        .json(&app.register_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Python sends the hash without prefix.
    let bare = bearer.replace("signkey-test-", "");
    assert_eq!(
        http.get(format!("{base}/v1/events"))
            .header("authorization", bare)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/v1/events"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let r = http
        .get(format!("{base}/v1/events"))
        .header("authorization", "Bearer nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let r = http
        .post(format!("{base}/e/wrong"))
        .json(&json!({"name": "s/go"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{base}/e/evkey"))
        .json(&json!({"name": "s/go"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["ids"][0]
        .as_str()
        .unwrap()
        .to_string();

    let run = ended_run(&http, &base, &bearer, &id).await;
    assert_eq!(run["status"], "Completed");
    assert_eq!(app.counters.lock().bad_signatures, 0);

    // An app holding a different key refuses every call; the run fails saying why.
    let other = "signkey-test-ffff";
    let app2 = FakeApp::start_with_key(
        "wrongkey",
        vec![FakeFn::new("f", "w/go", vec![Step::Run("a", json!(1))])],
        Some(other),
    )
    .await;
    let mut body = app2.register_body();
    body["functions"][0]["retries"] = json!(0);
    http.post(format!("{base}/fn/register"))
        .header("authorization", &bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    let r = http
        .post(format!("{base}/e/evkey"))
        .json(&json!({"name": "w/go"}))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    let run = ended_run(&http, &base, &bearer, &id).await;
    assert_eq!(run["status"], "Failed");
    assert!(
        run["output"]["message"].as_str().unwrap().contains("401"),
        "{run}"
    );
    assert_eq!(app2.counters.lock().bad_signatures, 1);
}

#[tokio::test]
async fn sync_url_prefers_in_band_and_falls_back_to_out_of_band() {
    let ts = TestServer::start().await;
    let app = FakeApp::start("inband", vec![FakeFn::new("f", "x/y", vec![])]).await;
    ts.server.sync_url(&app.url).await.unwrap();
    let puts = app.counters.lock().puts.clone();
    assert_eq!(puts.len(), 1, "in-band sync needs one PUT");
    assert_eq!(puts[0].0, json!({"url": app.url}));
    assert_eq!((puts[0].1.as_str(), puts[0].2.as_str()), ("dev", "in_band"));
    assert_eq!(
        ts.get("/v1/apps/inband/functions").await["data"][0]["id"],
        "inband-f"
    );

    // An app that refuses in-band (Python in dev mode) gets an out-of-band PUT
    // and registers itself.
    let app = FakeApp::start("oob", vec![FakeFn::new("g", "x/z", vec![])]).await;
    app.counters.lock().refuse_in_band = true;
    app.sync_to(&ts.base);
    ts.server.sync_url(&app.url).await.unwrap();
    let puts = app.counters.lock().puts.clone();
    assert_eq!(
        puts.iter().map(|p| p.2.as_str()).collect::<Vec<_>>(),
        ["in_band", ""]
    );
    assert_eq!(
        ts.get("/v1/apps/oob/functions").await["data"][0]["id"],
        "oob-g"
    );
    let dev = ts.get("/dev").await;
    assert_eq!(dev["functions"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn injected_clock_drives_long_sleeps_and_hourly_cron() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("db")).unwrap());
    // 2030-01-01T00:00:00Z, a round hour.
    let clock = ManualClock::new(1_893_456_000_000);
    let server = Server::start_with_clock(
        Config::dev("127.0.0.1:0".parse().unwrap()),
        store,
        Arc::new(clock.clone()),
    )
    .await
    .unwrap();
    let ts_base = format!("http://{}", server.addr());
    let mut cron = FakeFn::new("hourly", "unused", vec![Step::Run("t", json!(1))]);
    cron.triggers = json!([{"cron": "0 * * * *"}]);
    let app = FakeApp::start(
        "clock",
        vec![
            FakeFn::new(
                "sleepy",
                "c/sleep",
                vec![Step::Sleep("nap", "3h"), Step::Run("after", json!("woke"))],
            ),
            cron,
        ],
    )
    .await;
    let http = reqwest::Client::new();
    http.post(format!("{ts_base}/fn/register"))
        .json(&app.register_body())
        .send()
        .await
        .unwrap();
    let r: Value = http
        .post(format!("{ts_base}/e/k"))
        .json(&json!({"name": "c/sleep"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = r["ids"][0].as_str().unwrap().to_string();
    let get = |p: String| {
        let http = http.clone();
        async move {
            http.get(p)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    // Let the first call reach the sleep.
    let mut run_id = String::new();
    for _ in 0..200 {
        let v = get(format!("{ts_base}/v1/events/{id}/runs")).await;
        if let Some(r) = v["data"].as_array().and_then(|a| a.first()) {
            run_id = r["run_id"].as_str().unwrap().to_string();
            let actions = get(format!("{ts_base}/v0/runs/{run_id}/actions")).await;
            if actions.as_object().is_some_and(|o| o.is_empty())
                && app.counters.lock().calls.get("clock-sleepy") == Some(&1)
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        get(format!("{ts_base}/v1/runs/{run_id}")).await["data"]["status"],
        "Running"
    );
    assert_eq!(app.executed("after"), 0);

    // Three simulated hours, one at a time: the sleep ends and three ticks fire.
    for _ in 0..3 {
        clock.advance(Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut status = Value::Null;
    for _ in 0..200 {
        status = get(format!("{ts_base}/v1/runs/{run_id}")).await["data"]["status"].clone();
        if status != "Running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, "Completed");
    let ticks = get(format!("{ts_base}/v1/events?name=inngest/scheduled.timer")).await;
    let ids: Vec<&str> = ticks["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "2030-01-01T03:00:00Z",
            "2030-01-01T02:00:00Z",
            "2030-01-01T01:00:00Z"
        ]
    );
}

#[tokio::test]
async fn invoke_api_and_metrics() {
    let ts = TestServer::start().await;
    let app = FakeApp::start(
        "inv",
        vec![FakeFn::new(
            "target",
            "never/sent",
            vec![Step::Run("a", json!(1))],
        )],
    )
    .await;
    ts.register(&app).await;
    let r: Value = ts
        .http
        .post(format!("{}/invoke/inv-target", ts.base))
        .json(&json!({"data": {"q": 5}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], 200);
    let runs = ts.runs_of(r["id"].as_str().unwrap(), 1).await;
    let run = ts.finished(runs[0]["run_id"].as_str().unwrap()).await;
    assert_eq!(run["status"], "Completed");
    assert_eq!(run["output"]["event"]["q"], 5);
    let missing = ts
        .http
        .post(format!("{}/invoke/inv-nope", ts.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // An invocation is not a received event; send one so the counter exists even when this
    // test runs alone (the recorder is shared by every test in the binary).
    ts.send(json!({"name": "nobody/listens", "data": {}})).await;

    let text = ts
        .http
        .get(format!("{}/metrics", ts.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "cairn_events_received_total",
        "cairn_sdk_calls_total",
        "cairn_runs_completed_total",
        "cairn_queue_depth",
    ] {
        assert!(text.contains(name), "metric {name} missing:\n{text}");
    }
    // The store is SQLite, so its heap (page caches, statements, schema) is reported.
    let heap: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("cairn_sqlite_heap_bytes "))
        .unwrap_or_else(|| panic!("cairn_sqlite_heap_bytes missing:\n{text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(heap > 0.0, "SQLite heap reported as {heap}");
}

/// Polls the first run of an event through the authenticated API until it is no longer
/// `Running` (about five seconds at most); `Null` if it never ends.
async fn ended_run(http: &reqwest::Client, base: &str, bearer: &str, id: &str) -> Value {
    for _ in 0..200 {
        let v: Value = http
            .get(format!("{base}/v1/events/{id}/runs"))
            .header("authorization", bearer)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(r) = v["data"].as_array().and_then(|a| a.first()) {
            if r["status"] != "Running" {
                return r.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Value::Null
}
