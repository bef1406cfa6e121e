//! Kill the real `cairn` binary with SIGKILL mid-run, restart it, and check
//! that every acknowledged event's run finishes exactly once with no memoised
//! step lost.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use common::{FakeApp, FakeFn, Step};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Cairn {
    child: Child,
    base: String,
}

impl Cairn {
    async fn start(db: &Path, port: u16) -> Cairn {
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("dev")
            .args(["--port", &port.to_string()])
            .args(["--database-url", &format!("sqlite://{}", db.display())])
            .args(["--retry-interval", "1", "--lease-seconds", "1"])
            .env("CAIRN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cairn");
        // Owned by the guard at once, so every path (including panics) reaps it.
        let server = Cairn {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http
                .get(format!("{}/health", server.base))
                .send()
                .await
                .is_ok()
            {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cairn did not come up on {}", server.base);
    }

    fn kill9(mut self) {
        // Child::kill sends SIGKILL on Unix: no chance to flush or shut down.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Cairn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(base: &str, path: &str) -> Value {
    reqwest::get(format!("{base}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_then_every_run_finishes_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cairn.db");
    let port = free_port();
    let app = FakeApp::start(
        "crash",
        vec![FakeFn::new(
            "flow",
            "crash/start",
            vec![
                Step::Run("a", json!("A")),
                Step::Sleep("s", "1s"),
                Step::Run("b", json!("B")),
                Step::Wait("w", "crash/go", Some("async.data.n == event.data.n"), "2s"),
                Step::Run("c", json!("C")),
            ],
        )],
    )
    .await;
    let http = reqwest::Client::new();
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut n = 0i64;
    for round in 0..4 {
        let server = Cairn::start(&db, port).await;
        if round == 0 {
            let r = http
                .post(format!("{}/fn/register", server.base))
                .json(&app.register_body())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        for _ in 0..8 {
            n += 1;
            let r = http
                .post(format!("{}/e/dev", server.base))
                .json(&json!([{"name": "crash/start", "data": {"n": n}}, {"name": "crash/go", "data": {"n": n - 4}}]))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body: Value = r.json().await.unwrap();
            acked.push((body["ids"][0].as_str().unwrap().to_string(), n));
            tokio::time::sleep(Duration::from_millis(rand::random_range(10..80))).await;
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(100..900))).await;
        server.kill9();
    }

    let server = Cairn::start(&db, port).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut run_ids = HashSet::new();
    for (event_id, n) in &acked {
        let run = loop {
            let runs = get(&server.base, &format!("/v1/events/{event_id}/runs")).await;
            let runs = runs["data"].as_array().cloned().unwrap_or_default();
            assert!(runs.len() <= 1, "event {n} started {} runs", runs.len());
            if let Some(r) = runs.first() {
                if r["status"] != "Running" {
                    break r.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "event {n} ({event_id}) never finished: {runs:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(run["status"], "Completed", "event {n}: {run}");
        assert_eq!(run["output"]["steps"]["c"], json!({"data": "C"}));
        assert_eq!(run["output"]["event"]["n"], *n);
        let w = &run["output"]["steps"]["w"];
        assert!(
            w.is_null() || w["data"]["n"] == *n,
            "wait resumed by the wrong event: {w}"
        );
        run_ids.insert(run["run_id"].as_str().unwrap().to_string());
    }
    assert_eq!(run_ids.len(), acked.len());

    // Exactly one finished event per run.
    let mut finished = Vec::new();
    for _ in 0..100 {
        let evs = get(
            &server.base,
            "/v1/events?name=inngest/function.finished&limit=1000",
        )
        .await;
        finished = evs["data"].as_array().cloned().unwrap_or_default();
        if finished.len() >= acked.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished_runs: Vec<&str> = finished
        .iter()
        .map(|e| e["data"]["run_id"].as_str().unwrap())
        .collect();
    let unique: HashSet<&str> = finished_runs.iter().copied().collect();
    assert_eq!(
        finished_runs.len(),
        acked.len(),
        "finished events: {}",
        finished_runs.len()
    );
    assert_eq!(unique.len(), acked.len());

    let c = app.counters.lock();
    assert!(
        c.violations.is_empty(),
        "memoised results lost: {:?}",
        c.violations
    );
    // A step body runs again only if the kill landed between the app running it
    // and the commit of its result; there were 4 kills.
    let reruns: usize = c
        .executed
        .iter()
        .filter(|(k, _)| k.contains('/'))
        .map(|(_, v)| v.saturating_sub(1))
        .sum();
    assert!(reruns <= 4, "{reruns} step re-executions for 4 kills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_ticks_are_not_doubled_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cairn.db");
    let port = free_port();
    let mut f = FakeFn::new("tick", "unused", vec![Step::Run("t", json!(1))]);
    f.triggers = json!([{"cron": "* * * * * *"}]);
    let app = FakeApp::start("cron", vec![f]).await;
    let http = reqwest::Client::new();
    for round in 0..3 {
        let server = Cairn::start(&db, port).await;
        if round == 0 {
            http.post(format!("{}/fn/register", server.base))
                .json(&app.register_body())
                .send()
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2300)).await;
        server.kill9();
    }
    let server = Cairn::start(&db, port).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let evs = get(
        &server.base,
        "/v1/events?name=inngest/scheduled.timer&limit=1000",
    )
    .await;
    let ticks: Vec<String> = evs["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<&String> = ticks.iter().collect();
    assert_eq!(unique.len(), ticks.len(), "a tick fired twice: {ticks:?}");
    assert!(ticks.len() >= 6, "too few ticks: {ticks:?}");
    // Every tick started exactly one run.
    for e in evs["data"].as_array().unwrap() {
        let id = e["internal_id"].as_str().unwrap();
        let mut runs = 0;
        for _ in 0..100 {
            runs = get(&server.base, &format!("/v1/events/{id}/runs")).await["data"]
                .as_array()
                .unwrap()
                .len();
            if runs > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(runs, 1, "tick {} started {runs} runs", e["id"]);
    }
}
