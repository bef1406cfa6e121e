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
        // CAIRN_TEST_NODE_LOGS=dir keeps each node's log (with every call it makes and every
        // lease it loses) in dir/node-PORT.log, to trace a failure back to the node.
        let logs = std::env::var("CAIRN_TEST_NODE_LOGS").ok().map(|dir| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(format!("{dir}/node-{port}.log"))
                .expect("open node log")
        });
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("start")
            .args(["--port", &port.to_string()])
            .args(["--database-url", db_url])
            .args(["--signing-key", KEY, "--event-key", EVENT_KEY])
            .args(["--retry-interval", "1", "--lease-seconds", "2"])
            .args(["--db-pool-size", "4"])
            .env(
                "CAIRN_LOG",
                if logs.is_some() {
                    "warn,cairn_server::executor=debug,cairn_server::queue=debug"
                } else {
                    "warn"
                },
            )
            .stdout(Stdio::null())
            .stderr(logs.map_or_else(Stdio::null, Stdio::from))
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
    // The cause, not only "error connecting to server".
    assert!(
        err.contains("cannot connect to PostgreSQL")
            && err.contains(&format!("127.0.0.1:{port}"))
            && err.contains("refused"),
        "{err}"
    );
}

#[test]
fn start_refuses_a_wrong_tls_setting_before_connecting() {
    let start = |url: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("start")
            .args(["--database-url", url])
            .args(["--signing-key", KEY, "--event-key", EVENT_KEY])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{url} accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = start("postgres://postgres:secret@127.0.0.1:5432/test?sslmode=on");
    assert!(err.contains("invalid sslmode \"on\""), "{err}");
    assert!(!err.contains("secret"), "the password was echoed: {err}");
    let err = start(
        "postgres://postgres@127.0.0.1:5432/test?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch.pem",
    );
    assert!(err.contains("sslrootcert /no/such.pem"), "{err}");
}

/// Three nodes on one database; every few seconds one of them is killed with SIGKILL and
/// restarted while thousands of runs with sleeps, waits and invokes flow through, so their
/// steps hop between nodes and whatever a dead node held (leases, accepted but unmatched
/// events, cron turns) is taken over by the others. The outcome is read from the database
/// itself: every acknowledged event has exactly one completed run with the right output,
/// finalised once, and every cron second fired exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_killed_repeatedly_every_run_finishes_exactly_once() {
    // CI's size is the 5,000; CAIRN_MULTI_NODE_RUNS changes it for a quick try or a
    // longer soak by hand.
    let total: i64 = std::env::var("CAIRN_MULTI_NODE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    // Unfinished runs allowed at once. The load is paced to what the nodes finish, so queueing
    // never outgrows the invoke's timeout: a run that fails here failed for a real reason.
    const IN_FLIGHT: i64 = 150;
    const BATCH: i64 = 25;

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
                    Step::Wait("w", "multi/go", Some("async.data.n == event.data.n"), "3s"),
                    Step::Invoke("i", "multi-child", json!({"k": 1}), "60s"),
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
    let pg = {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    };
    let running = || async {
        pg.query_one(
            "SELECT count(*) FROM runs WHERE status = 'Running' AND fn_slug <> 'multi-tick'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };

    let began = Instant::now();
    let deadline = began + Duration::from_secs(1200);
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut n = 0i64;
    let mut kills = 0usize;
    let mut next_kill = Instant::now() + Duration::from_millis(rand::random_range(1500..3500));
    let mut down: Option<(usize, Instant)> = None;
    let mut sent_to = 0usize;
    let mut go_later = std::collections::VecDeque::new();
    // Keep killing until every run has ended, so recovery itself is also interrupted.
    loop {
        let unfinished = running().await;
        if n >= total && unfinished == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{unfinished} runs still unfinished after {:?}, {n} sent",
            began.elapsed()
        );
        if let Some((victim, back_at)) = down {
            if Instant::now() >= back_at {
                nodes[victim] = Some(Node::start(&url, ports[victim]).await);
                down = None;
            }
        } else if Instant::now() >= next_kill {
            let victim = kills % nodes.len();
            nodes[victim].take().unwrap().kill9();
            kills += 1;
            // Down for a moment, so the others see its leases lapse; then back.
            down = Some((
                victim,
                Instant::now() + Duration::from_millis(rand::random_range(100..1500)),
            ));
            next_kill = Instant::now() + Duration::from_millis(rand::random_range(2000..4000));
        }
        // The wait of each run is matched by a `go` sent about when the run reaches it (after
        // its 1 s sleep); under load some come too early or too late and the wait times out.
        // Both outcomes are right; a wait resumed by another run's `go` is not.
        let go: Vec<Value> = std::iter::from_fn(|| {
            go_later
                .front()
                .is_some_and(|(_, at)| *at <= Instant::now())
                .then(|| go_later.pop_front().unwrap())
        })
        .map(|(k, _)| json!({"name": "multi/go", "data": {"n": k}}))
        .collect();
        if !go.is_empty() {
            let alive: Vec<&Node> = nodes.iter().flatten().collect();
            send(&alive[sent_to % alive.len()].base, Value::Array(go)).await;
        }
        if n < total && unfinished < IN_FLIGHT {
            let alive: Vec<&Node> = nodes.iter().flatten().collect();
            sent_to += 1;
            let base = alive[sent_to % alive.len()].base.clone();
            let batch: Vec<Value> = (n + 1..=(n + BATCH).min(total))
                .map(|k| json!({"name": "multi/start", "data": {"n": k}}))
                .collect();
            for id in send(&base, Value::Array(batch)).await {
                n += 1;
                acked.push((id, n));
                go_later.push_back((n, Instant::now() + Duration::from_millis(1500)));
            }
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let elapsed = began.elapsed();
    if let Some((victim, _)) = down {
        nodes[victim] = Some(Node::start(&url, ports[victim]).await);
    }

    // Every acknowledged event: exactly one run, completed, with every step's output.
    let rows = pg
        .query(
            "SELECT trigger_event, run_id, status, output FROM runs WHERE fn_slug = 'multi-flow'",
            &[],
        )
        .await
        .unwrap();
    let mut by_event: std::collections::HashMap<String, Vec<(String, String, Value)>> =
        Default::default();
    for r in &rows {
        let output: Option<String> = r.get(3);
        by_event.entry(r.get(0)).or_default().push((
            r.get(1),
            r.get(2),
            output.map_or(Value::Null, |o| serde_json::from_str(&o).unwrap()),
        ));
    }
    assert_eq!(rows.len(), acked.len(), "runs of the flow function");
    let mut waits_matched = 0;
    for (event_id, n) in &acked {
        let runs = by_event.get(event_id).map(Vec::as_slice).unwrap_or(&[]);
        assert_eq!(runs.len(), 1, "event {n} started {} runs", runs.len());
        let (_, status, out) = &runs[0];
        assert_eq!(status, "Completed", "event {n}: {out}");
        assert_eq!(out["steps"]["c"], json!({"data": "C"}), "event {n}: {out}");
        assert_eq!(
            out["steps"]["i"]["data"]["steps"]["ch"],
            json!({"data": "CH"}),
            "event {n}: the invoke's result: {out}"
        );
        assert_eq!(out["event"]["n"], *n);
        let w = &out["steps"]["w"];
        assert!(
            w.is_null() || w["data"]["n"] == *n,
            "wait resumed by the wrong event: {w}"
        );
        waits_matched += usize::from(!w.is_null());
    }
    // The `go` events are timed to arrive while most runs wait; if none matched, the matching
    // path was not exercised (or is broken).
    assert!(
        waits_matched * 10 >= acked.len(),
        "only {waits_matched} of {} waits matched",
        acked.len()
    );
    let children: i64 = pg
        .query_one(
            "SELECT count(*) FROM runs WHERE fn_slug = 'multi-child' AND status = 'Completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(children, total, "one completed child per invoke");

    // Finalisation ran once per run: exactly one function.finished event each.
    let finished: Vec<String> = pg
        .query(
            "SELECT body FROM events WHERE name = 'inngest/function.finished'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str::<Value>(r.get(0)).unwrap())
        .filter(|e| e["data"]["function_id"] == "multi-flow")
        .map(|e| e["data"]["run_id"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<&String> = finished.iter().collect();
    assert_eq!(finished.len(), acked.len(), "finished events");
    assert_eq!(unique.len(), acked.len());

    // Every node runs the cron loop: each second's tick was stored once and started one run.
    // A tick is stored first and applied (its run created, the event marked processed) in a
    // commit of its own, so the nodes, still running, may have ticks not yet applied: those
    // have no run yet, and there are only the last few of them.
    let ticks = pg
        .query(
            "SELECT e.internal_id, e.body, e.processed, (SELECT count(*) FROM runs r
               WHERE r.fn_slug = 'multi-tick' AND r.trigger_event = e.internal_id)
             FROM events e WHERE e.name = 'inngest/scheduled.timer'",
            &[],
        )
        .await
        .unwrap();
    let mut seconds = Vec::new();
    let mut pending = 0;
    for t in &ticks {
        let body: Value = serde_json::from_str(t.get(1)).unwrap();
        let (applied, runs): (bool, i64) = (t.get(2), t.get(3));
        if applied {
            assert_eq!(runs, 1, "tick {} started {runs} runs", body["id"]);
        } else {
            assert_eq!(runs, 0, "tick {} not applied but started runs", body["id"]);
            pending += 1;
        }
        let at = chrono::DateTime::parse_from_rfc3339(body["id"].as_str().unwrap()).unwrap();
        seconds.push(at.timestamp());
    }
    // A node killed right after storing a tick leaves it to the others' next poll (2 s).
    assert!(pending <= 5, "{pending} ticks were never applied");
    seconds.sort_unstable();
    let fired = seconds.len();
    seconds.dedup();
    assert_eq!(seconds.len(), fired, "a tick fired twice");
    let span = (seconds.last().unwrap() - seconds.first().unwrap() + 1) as usize;
    // A second is skipped only if no node's cron loop woke within it (upstream skips missed
    // ticks too); with three nodes, at most one of them down, that should be rare.
    let skipped = span - fired;
    assert!(
        skipped * 20 <= span,
        "{skipped} of {span} cron seconds never fired"
    );

    {
        let c = app.counters.lock();
        assert!(
            c.violations.is_empty(),
            "memoised results lost: {:?}",
            c.violations
        );
        // A step body runs again only when a kill landed between the app running it and the
        // commit of its result, i.e. it was in flight on the killed node (at most 64 calls each).
        let reruns: Vec<(&String, &usize)> = c
            .executed
            .iter()
            .filter(|(k, v)| k.contains('/') && **v > 1)
            .collect();
        let rerun_total: usize = reruns.iter().map(|(_, v)| **v - 1).sum();
        eprintln!(
            "{total} runs in {elapsed:?} with {kills} kills: {rerun_total} step re-executions, \
             {waits_matched} waits matched, {fired} cron ticks over {span} s ({skipped} skipped)"
        );
        assert!(
            rerun_total <= kills * 64,
            "{rerun_total} step re-executions for {kills} kills: {reruns:?}"
        );
    }
    drop(nodes);
    db.drop_db().await;
}
