//! The whole engine (HTTP API, matcher, queue, executor) on the PostgreSQL store, driving a
//! scripted SDK-protocol app: the paths the store suite does not reach on its own.

mod common;
mod pg_support;

use common::{FakeApp, FakeFn, Step};
use pg_support::{finish, pg_server};
use serde_json::json;

#[tokio::test]
async fn steps_sleeps_waits_invokes_and_retries_complete() {
    let (ts, schema) = pg_server().await;
    let child = FakeFn::new("child", "test/child", vec![Step::Run("c1", json!(7))]);
    let parent = FakeFn::new(
        "parent",
        "test/parent",
        vec![
            Step::Run("a", json!("A")),
            Step::Sleep("s", "200ms"),
            Step::Flaky("f", 1, json!("F")),
            Step::Wait(
                "w",
                "test/go",
                Some("async.data.id == event.data.id"),
                "10s",
            ),
            Step::Invoke("i", "app-child", json!({"x": 1}), "2s"),
            Step::Run("b", json!("B")),
        ],
    );
    let app = FakeApp::start("app", vec![parent, child]).await;
    ts.register(&app).await;
    let ids = ts
        .send(json!({"name": "test/parent", "data": {"id": 5}}))
        .await;
    let run_id = ts.runs_of(&ids[0], 1).await[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    // The wait's event may arrive while the wait is being set up: it must still resume it.
    for _ in 0..40 {
        ts.send(json!({"name": "test/go", "data": {"id": 5}})).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if ts.get(&format!("/v1/runs/{run_id}")).await["data"]["status"] != "Running" {
            break;
        }
    }
    let run = ts.finished(&run_id).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["steps"]["w"]["data"]["id"], json!(5));
    assert_eq!(
        run["output"]["steps"]["i"]["data"]["steps"],
        json!({"c1": {"data": 7}}),
        "{run}"
    );
    assert_eq!(run["output"]["steps"]["b"], json!({"data": "B"}));
    for id in ["a", "b", "c1"] {
        assert_eq!(app.executed(id), 1, "step {id}");
    }
    assert_eq!(app.executed("f"), 2, "one failure, one success");
    assert!(app.counters.lock().violations.is_empty());
    finish(ts, schema).await;
}

#[tokio::test]
async fn parallel_steps_version_2_coalesce() {
    let (ts, schema) = pg_server().await;
    let mut f = FakeFn::new(
        "par",
        "test/par",
        vec![
            Step::Parallel(vec![("p", json!(1)), ("p:1", json!(2)), ("p:2", json!(3))]),
            Step::Run("after", json!("z")),
        ],
    );
    f.version = 2;
    let app = FakeApp::start("app", vec![f]).await;
    ts.register(&app).await;
    let run = ts.run_to_end(json!({"name": "test/par"})).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["steps"]["p:2"], json!({"data": 3}));
    assert_eq!(run["output"]["steps"]["after"], json!({"data": "z"}));
    for id in ["p", "p:1", "p:2", "after"] {
        assert_eq!(app.executed(id), 1, "step {id}");
    }
    finish(ts, schema).await;
}

#[tokio::test]
async fn cancel_by_event_and_keyed_concurrency() {
    let (ts, schema) = pg_server().await;
    let mut cancellable = FakeFn::new(
        "cancellable",
        "test/c",
        vec![Step::Sleep("s", "30s"), Step::Run("never", json!(0))],
    );
    cancellable.extra =
        json!({"cancel": [{"event": "test/cancel", "if": "async.data.id == event.data.id"}]});
    let mut limited = FakeFn::new(
        "limited",
        "test/limited",
        vec![
            Step::Run("l1", json!(1)),
            Step::Sleep("ls", "100ms"),
            Step::Run("l2", json!(2)),
        ],
    );
    limited.extra = json!({"concurrency": [{"limit": 1, "key": "event.data.tenant"}]});
    let app = FakeApp::start("app", vec![cancellable, limited]).await;
    ts.register(&app).await;

    let ids = ts.send(json!({"name": "test/c", "data": {"id": 1}})).await;
    let run = ts.runs_of(&ids[0], 1).await[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    ts.send(json!({"name": "test/cancel", "data": {"id": 1}}))
        .await;
    assert_eq!(ts.finished(&run).await["status"], "Cancelled");

    let mut runs = Vec::new();
    for n in 0..6 {
        let ids = ts
            .send(json!({"name": "test/limited", "data": {"tenant": n % 2}}))
            .await;
        runs.push(
            ts.runs_of(&ids[0], 1).await[0]["run_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for r in &runs {
        let run = ts.finished(r).await;
        assert_eq!(run["status"], "Completed", "{run}");
    }
    assert_eq!(app.executed("l2"), 6);
    assert_eq!(app.executed("never"), 0);
    finish(ts, schema).await;
}

/// A sync received by one node reaches another node sharing the database within a poll
/// interval, and that node then starts runs of the synced function.
#[tokio::test]
async fn a_sync_on_one_node_reaches_the_others() {
    let (a, schema) = pg_server().await;
    let mut cfg = cairn_server::Config::dev("127.0.0.1:0".parse().unwrap());
    cfg.poll_interval = std::time::Duration::from_millis(300);
    let (b, b_base) = pg_support::another_node(&schema, cfg).await;
    let app = FakeApp::start(
        "late",
        vec![FakeFn::new(
            "f",
            "test/late",
            vec![Step::Run("s", json!(1))],
        )],
    )
    .await;
    a.register(&app).await;
    let http = reqwest::Client::new();
    let mut seen = false;
    for _ in 0..100 {
        let v: serde_json::Value = http
            .get(format!("{b_base}/v1/apps/late/functions"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["data"].as_array().is_some_and(|a| !a.is_empty()) {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(seen, "node B never saw the function synced on node A");
    assert!(b.engine().registry.get("late-f").is_some());
    b.shutdown().await;
    finish(a, schema).await;
}

/// A run ended on one node answers a `wait_ms` request held by another at once: the end is
/// announced through the database, not found by the other node's next re-read (5 s apart
/// when the feed runs). A node listens for those announcements only while it holds such a
/// request: every listening node is woken for every run's end.
#[tokio::test]
async fn a_run_ended_on_one_node_answers_a_wait_on_another() {
    use cairn_server::store::{PgOptions, PostgresStore};
    use std::time::{Duration, Instant};
    let (a, schema) = pg_server().await;
    let b_store = std::sync::Arc::new(
        PostgresStore::connect(
            &pg_support::pg_url(),
            PgOptions {
                pool_size: 4,
                schema: Some(schema.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    let b = cairn_server::Server::start(
        cairn_server::Config::dev("127.0.0.1:0".parse().unwrap()),
        b_store.clone(),
    )
    .await
    .unwrap();
    let b_base = format!("http://{}", b.addr());
    let app = FakeApp::start(
        "ends",
        vec![FakeFn::new(
            "f",
            "test/ends",
            vec![Step::Wait("w", "test/never", None, "1h")],
        )],
    )
    .await;
    a.register(&app).await;
    let ids = a.send(json!({"name": "test/ends"})).await;
    let run_id = a.runs_of(&ids[0], 1).await[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    // The run is parked on its wait; B is asked to hold the answer until it ends.
    assert!(
        !b_store.relaying_run_ends(),
        "B listens for run ends while nobody waits on it"
    );
    let waiting = tokio::spawn({
        let url = format!("{b_base}/v1/runs/{run_id}?wait_ms=20000");
        async move {
            let v: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            (v, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "B answered before the run ended");
    assert!(
        b_store.relaying_run_ends(),
        "B holds a wait but does not listen"
    );
    let cancelled_at = Instant::now();
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/runs/{run_id}", a.base))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let (v, answered_at) = waiting.await.unwrap();
    assert_eq!(v["data"]["status"], "Cancelled", "{v}");
    let after = answered_at - cancelled_at;
    assert!(
        after < Duration::from_secs(3),
        "B answered {after:?} after the cancel on A"
    );
    b.shutdown().await;
    finish(a, schema).await;
}
