//! Harness for end-to-end tests: starts the real `cairn` binary and example apps as child
//! processes on free loopback ports, and talks to them over HTTP.
//!
//! The binaries come from the workspace's own build (`cargo build --workspace --bins`, which
//! `scripts/test-all` runs first); they are looked up next to the test executable.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A path to a workspace binary built in the same profile as the running test.
pub fn binary(name: &str) -> PathBuf {
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before these tests",
        path.display()
    );
    path
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process that is killed and reaped when dropped, so a failing test leaves nothing behind.
pub struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    /// Spawns `cmd`, sending its output to the test's stderr.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails the test if the process has already exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early with {status}", self.name);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `cairn dev` with its state in a temporary directory.
pub struct Cairn {
    pub url: String,
    pub proc: Proc,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("cairn-e2e-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An example app of the Rust SDK, serving `/api/inngest` on its own port in dev mode.
pub struct App {
    pub url: String,
    pub proc: Proc,
}

impl App {
    /// Starts example binary `name`, pointed at the Cairn server at `cairn_url`.
    pub async fn start(name: &str, cairn_url: &str, extra_env: &[(&str, &str)]) -> App {
        let port = free_port();
        let mut cmd = Command::new(binary(name));
        cmd.env("PORT", port.to_string())
            .env("INNGEST_DEV", "1")
            .env("INNGEST_BASE_URL", cairn_url);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(name, &mut cmd);
        let url = format!("http://127.0.0.1:{port}/api/inngest");
        wait_until_up(&url, Duration::from_secs(20)).await;
        App { url, proc }
    }
}

impl Cairn {
    /// Starts `cairn dev` on `port` (see [`free_port`]), syncing the given app URLs.
    ///
    /// Apps need Cairn's URL before they can sync, so callers pick the port first, start
    /// the apps pointed at `http://127.0.0.1:{port}`, then start Cairn.
    pub async fn dev(port: u16, sdk_urls: &[&str]) -> Cairn {
        let dir = TempDir::new("dev");
        let mut cmd = Command::new(binary("cairn"));
        cmd.arg("dev")
            .arg("--port")
            .arg(port.to_string())
            .arg("--database-url")
            .arg(format!(
                "sqlite://{}",
                dir.path().join("cairn.db").display()
            ))
            .arg("--retry-interval")
            .arg("1");
        for u in sdk_urls {
            cmd.arg("-u").arg(u);
        }
        let proc = Proc::spawn("cairn", &mut cmd);
        let url = format!("http://127.0.0.1:{port}");
        wait_until_up(&format!("{url}/health"), Duration::from_secs(20)).await;
        Cairn {
            url,
            proc,
            _dir: dir,
        }
    }

    /// Sends one event and returns its id.
    pub async fn send(&self, name: &str, data: Value) -> String {
        let res: Value = http()
            .post(format!("{}/e/test-key", self.url))
            .json(&json!({"name": name, "data": data}))
            .send()
            .await
            .expect("event API reachable")
            .json()
            .await
            .expect("event API answers JSON");
        assert_eq!(res["status"], 200, "event refused: {res}");
        res["ids"][0].as_str().expect("an event id").to_string()
    }

    /// Waits until the event has started exactly `runs` runs and all of them have ended;
    /// returns the runs.
    pub async fn wait_runs_ended(
        &self,
        event_id: &str,
        runs: usize,
        within: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Ok(res) = http()
                .get(format!("{}/v1/events/{event_id}/runs", self.url))
                .send()
                .await
            {
                if let Ok(body) = res.json::<Value>().await {
                    let list = body["data"].as_array().cloned().unwrap_or_default();
                    if list.len() >= runs && list.iter().all(|r| r["status"] != "Running") {
                        return list;
                    }
                    last = body;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("runs of event {event_id} did not end within {within:?}; last answer: {last}");
    }

    /// Waits until a function's app is known to the server.
    pub async fn wait_synced(&self, app: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(res) = http()
                .get(format!("{}/v1/apps/{app}/functions", self.url))
                .send()
                .await
            {
                if res.status().is_success() {
                    let body: Value = res.json().await.unwrap_or(Value::Null);
                    if body["data"].as_array().is_some_and(|a| !a.is_empty()) {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("app {app} was not synced within {within:?}");
    }
}

/// GETs a URL and parses its JSON body; `Null` when the server is unreachable or the body is
/// not JSON, so pollers can simply try again.
pub async fn get_json(url: &str) -> Value {
    match http().get(url).send().await {
        Ok(res) => res.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// A shared HTTP client.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
}

async fn wait_until_up(url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if http().get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} did not come up within {within:?}");
}
