//! The real `cairn start` binary on PostgreSQL: one node completing runs, a clear refusal
//! when the database is unreachable, and three nodes sharing one database while one of
//! them is killed with SIGKILL and restarted, again and again.
//!
//! Each test gets a database of its own on the server named by `CAIRN_TEST_PG_URL`
//! (default: the local server). Without a reachable server these tests fail, they do not
//! skip: CI starts PostgreSQL before running them.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use common::{FakeApp, FakeFn, Step};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "signkey-test-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const EVENT_KEY: &str = "evkey";

fn server_url() -> String {
    std::env::var("CAIRN_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn bearer() -> String {
    format!(
        "Bearer {}",
        cairn_protocol::signature::hash_signing_key(KEY).unwrap()
    )
}

/// A database of its own for one test, dropped at the end.
struct TestDb {
    name: String,
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = match tokio_postgres::connect(&server_url(), tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => panic!(
            "these tests need PostgreSQL at {} (set CAIRN_TEST_PG_URL or start it): {e}",
            server_url()
        ),
    };
    tokio::spawn(conn);
    client
}

impl TestDb {
    async fn create() -> TestDb {
        let name = format!(
            "cairn_test_{}",
            ulid::Ulid::new().to_string().to_lowercase()
        );
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TestDb { name }
    }

    /// The server URL with this test's database in place of the default one.
    fn url(&self) -> String {
        let base = server_url();
        let cut = base.rfind('/').expect("database URL has a path");
        let query = base[cut..]
            .find('?')
            .map(|q| &base[cut + q..])
            .unwrap_or("");
        format!("{}/{}{}", &base[..cut], self.name, query)
    }

    async fn drop_db(self) {
        admin()
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `cairn start` process, killed when dropped.
struct Node {
    child: Child,
    base: String,
}

impl Node {
    fn spawn(db_url: &str, port: u16) -> Node {
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("start")
            .args(["--port", &port.to_string()])
            .args(["--database-url", db_url])
            .args(["--signing-key", KEY, "--event-key", EVENT_KEY])
            .args(["--retry-interval", "1", "--lease-seconds", "2"])
            .args(["--db-pool-size", "4"])
            .env("CAIRN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cairn");
        Node {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn start(db_url: &str, port: u16) -> Node {
        let node = Node::spawn(db_url, port);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http
                .get(format!("{}/health", node.base))
                .send()
                .await
                .is_ok()
            {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cairn did not come up on {}", node.base);
    }

    fn kill9(mut self) {
        // Child::kill sends SIGKILL on Unix: no chance to flush or shut down.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(base: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}{path}"))
        .header("authorization", bearer())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn register(base: &str, app: &FakeApp) {
    let r = reqwest::Client::new()
        .post(format!("{base}/fn/register"))
        .header("authorization", bearer())
        .json(&app.register_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

/// Send events; returns the internal ids of the accepted ones.
async fn send(base: &str, events: Value) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(format!("{base}/e/{EVENT_KEY}"))
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Wait until the one run of `event_id` has ended and return it.
async fn ended_run(base: &str, event_id: &str, deadline: Instant) -> Value {
    loop {
        let runs = get(base, &format!("/v1/events/{event_id}/runs")).await;
        let runs = runs["data"].as_array().cloned().unwrap_or_default();
        assert!(
            runs.len() <= 1,
            "event {event_id} started {} runs",
            runs.len()
        );
        if let Some(r) = runs.first() {
            if r["status"] != "Running" {
                return r.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "event {event_id} never finished: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_on_postgres_completes_a_run() {
    let db = TestDb::create().await;
    let app = FakeApp::start_with_key(
        "pg",
        vec![FakeFn::new(
            "flow",
            "pg/start",
            vec![
                Step::Run("a", json!("A")),
                Step::Sleep("s", "1s"),
                Step::Run("b", json!("B")),
            ],
        )],
        Some(KEY),
    )
    .await;
    let node = Node::start(&db.url(), free_port()).await;
    register(&node.base, &app).await;
    let ids = send(&node.base, json!({"name": "pg/start", "data": {"n": 1}})).await;
    let run = ended_run(
        &node.base,
        &ids[0],
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["steps"]["b"], json!({"data": "B"}));
    assert_eq!(app.executed("a"), 1);
    assert_eq!(app.executed("b"), 1);
    drop(node);
    db.drop_db().await;
}

#[test]
fn start_refuses_an_unreachable_database_clearly() {
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("start")
        .args([
            "--database-url",
            &format!("postgres://postgres@127.0.0.1:{port}/nothing"),
        ])
        .args(["--signing-key", KEY, "--event-key", EVENT_KEY])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to PostgreSQL") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

/// Three nodes on one database take turns being killed with SIGKILL mid-run and restarted.
/// Runs sleep and wait for events, so their steps hop between nodes; whatever a dead node
/// held (leases, accepted but unmatched events) is taken over by the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_killed_repeatedly_every_run_finishes_exactly_once() {
    let db = TestDb::create().await;
    let url = db.url();
    let mut tick = FakeFn::new("tick", "unused", vec![Step::Run("t", json!(1))]);
    tick.triggers = json!([{"cron": "* * * * * *"}]);
    let app = FakeApp::start_with_key(
        "multi",
        vec![
            FakeFn::new(
                "flow",
                "multi/start",
                vec![
                    Step::Run("a", json!("A")),
                    Step::Sleep("s", "1s"),
                    Step::Run("b", json!("B")),
                    Step::Wait("w", "multi/go", Some("async.data.n == event.data.n"), "2s"),
                    Step::Invoke("i", "multi-child", json!({"k": 1})),
                    Step::Run("c", json!("C")),
                ],
            ),
            FakeFn::new("child", "multi/child", vec![Step::Run("ch", json!("CH"))]),
            tick,
        ],
        Some(KEY),
    )
    .await;
    let ports = [free_port(), free_port(), free_port()];
    // The first node syncs the app; the others load it from the database as they start.
    let first = Node::start(&url, ports[0]).await;
    register(&first.base, &app).await;
    let mut nodes: Vec<Option<Node>> = vec![Some(first)];
    for port in &ports[1..] {
        nodes.push(Some(Node::start(&url, *port).await));
    }

    const ROUNDS: usize = 6;
    // CI's size; set CAIRN_MULTI_NODE_PER_ROUND (up to 80: the events API lists at most
    // 1,000 finished events, two per run with the invoked child) for a longer soak by hand.
    let per_round: usize = std::env::var("CAIRN_MULTI_NODE_PER_ROUND")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut n = 0i64;
    for round in 0..ROUNDS {
        for i in 0..per_round {
            n += 1;
            // Spread events over the nodes alive this round.
            let base = nodes
                .iter()
                .flatten()
                .nth(i % nodes.iter().flatten().count())
                .unwrap()
                .base
                .clone();
            let ids = send(
                &base,
                json!([{"name": "multi/start", "data": {"n": n}}, {"name": "multi/go", "data": {"n": n - 4}}]),
            )
            .await;
            acked.push((ids[0].clone(), n));
            tokio::time::sleep(Duration::from_millis(rand::random_range(5..40))).await;
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(200..1200))).await;
        let victim = round % nodes.len();
        nodes[victim].take().unwrap().kill9();
        // Down for a moment, so the others see its leases lapse; then back.
        tokio::time::sleep(Duration::from_millis(rand::random_range(100..1500))).await;
        nodes[victim] = Some(Node::start(&url, ports[victim]).await);
    }

    let base = nodes[0].as_ref().unwrap().base.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut run_ids = HashSet::new();
    for (event_id, n) in &acked {
        let run = ended_run(&base, event_id, deadline).await;
        assert_eq!(run["status"], "Completed", "event {n}: {run}");
        assert_eq!(run["output"]["steps"]["c"], json!({"data": "C"}));
        assert_eq!(
            run["output"]["steps"]["i"]["data"]["steps"]["ch"],
            json!({"data": "CH"}),
            "event {n}: the invoke's result: {run}"
        );
        assert_eq!(run["output"]["event"]["n"], *n);
        let w = &run["output"]["steps"]["w"];
        assert!(
            w.is_null() || w["data"]["n"] == *n,
            "wait resumed by the wrong event: {w}"
        );
        run_ids.insert(run["run_id"].as_str().unwrap().to_string());
    }
    assert_eq!(run_ids.len(), acked.len());

    // Finalisation ran once per run: exactly one function.finished event each.
    let flow_finished = || async {
        let evs = get(
            &base,
            "/v1/events?name=inngest/function.finished&limit=1000",
        )
        .await;
        evs["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["data"]["function_id"] == "multi-flow")
            .collect::<Vec<Value>>()
    };
    let mut finished = Vec::new();
    for _ in 0..100 {
        finished = flow_finished().await;
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
    assert_eq!(finished_runs.len(), acked.len(), "finished events");
    assert_eq!(unique.len(), acked.len());

    // Every node runs the cron loop: each second's tick was stored once and started one run.
    let ticks = get(&base, "/v1/events?name=inngest/scheduled.timer&limit=1000").await;
    let ticks = ticks["data"].as_array().cloned().unwrap_or_default();
    let tick_ids: Vec<&str> = ticks.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let unique_ticks: HashSet<&str> = tick_ids.iter().copied().collect();
    assert_eq!(unique_ticks.len(), tick_ids.len(), "a tick fired twice");
    assert!(tick_ids.len() >= 5, "too few ticks: {tick_ids:?}");
    for e in &ticks {
        let id = e["internal_id"].as_str().unwrap();
        let mut runs = 0;
        for _ in 0..100 {
            runs = get(&base, &format!("/v1/events/{id}/runs")).await["data"]
                .as_array()
                .map_or(0, Vec::len);
            if runs > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(runs, 1, "tick {} started {runs} runs", e["id"]);
    }

    {
        let c = app.counters.lock();
        assert!(
            c.violations.is_empty(),
            "memoised results lost: {:?}",
            c.violations
        );
        // A step body runs again only when a kill landed between the app running it and the
        // commit of its result, i.e. it was in flight on the killed node.
        let reruns: Vec<(&String, &usize)> = c
            .executed
            .iter()
            .filter(|(k, v)| k.contains('/') && **v > 1)
            .collect();
        let total: usize = reruns.iter().map(|(_, v)| **v - 1).sum();
        eprintln!(
            "{} runs, {total} step re-executions after {ROUNDS} kills",
            acked.len()
        );
        assert!(
            total <= ROUNDS * 4,
            "{total} step re-executions for {ROUNDS} kills: {reruns:?}"
        );
    }
    drop(nodes);
    db.drop_db().await;
}
