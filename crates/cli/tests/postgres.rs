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
