//! A scripted app that speaks the SDK side of the protocol (§6–§7), so the
//! server can be driven end to end without a real SDK. Each function is a list
//! of steps replayed against the memo map the server sends, like a real SDK.

#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use cairn_protocol::{step_id, CallRequest};
use cairn_server::store::SqliteStore;
use cairn_server::{Config, Server};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// One step of a scripted function.
#[derive(Clone)]
pub enum Step {
    /// `step.run(id)` returning the value.
    Run(&'static str, Value),
    /// `step.run(id)` that throws `fails` times before returning the value.
    Flaky(&'static str, usize, Value),
    /// `step.sleep(id, duration)`.
    Sleep(&'static str, &'static str),
    /// `step.waitForEvent(id, {event, if, timeout})`.
    Wait(
        &'static str,
        &'static str,
        Option<&'static str>,
        &'static str,
    ),
    /// `step.invoke(id, {function, data, timeout})`.
    Invoke(&'static str, &'static str, Value, &'static str),
    /// `Promise.all` of `step.run`s with these ids returning their values.
    Parallel(Vec<(&'static str, Value)>),
    /// The function throws (non-retriable if the flag is set).
    Throw(bool),
    /// The first time it is reached, answer `[DiscoveryRequest]` (JS v4 after maxRuntime).
    Discovery(&'static str),
    /// Finish with `206 [RunComplete]` instead of a 200 (JS v4 checkpointing).
    RunComplete(Value),
}

/// A scripted function.
#[derive(Clone)]
pub struct FakeFn {
    /// Function id without the app prefix.
    pub id: &'static str,
    /// Sync triggers.
    pub triggers: Value,
    /// Steps in code order.
    pub steps: Vec<Step>,
    /// Execution version reported in `X-Inngest-Req-Version`.
    pub version: i64,
    /// Extra config keys (cancel, retries, timeouts).
    pub extra: Value,
}

impl FakeFn {
    pub fn new(id: &'static str, event: &str, steps: Vec<Step>) -> Self {
        FakeFn {
            id,
            triggers: json!([{"event": event}]),
            steps,
            version: 1,
            extra: json!({}),
        }
    }
}

#[derive(Default)]
pub struct Counters {
    /// Executions of each step body, by step id.
    pub executed: HashMap<String, usize>,
    /// Calls received per function.
    pub calls: HashMap<String, usize>,
    /// Memo hashes already sent per run; a later call missing one means a
    /// committed step result was lost and the step would run again.
    pub seen: HashMap<String, std::collections::HashSet<String>>,
    /// Descriptions of lost memos.
    pub violations: Vec<String>,
    /// Each run's calls in arrival order (milliseconds since the app started, queue item,
    /// attempt, memos carried), so a lost memo can be told from a stale call.
    pub history: HashMap<String, Vec<(u128, String, u32, usize)>>,
    /// Calls refused for a bad signature.
    pub bad_signatures: usize,
    /// Bodies, server-kind and sync-kind headers of sync PUTs received.
    pub puts: Vec<(Value, String, String)>,
    /// Answer in-band sync requests (else refuse them with 401, as Python does in dev mode).
    pub refuse_in_band: bool,
}

#[derive(Clone)]
struct AppState {
    app: String,
    fns: Arc<HashMap<String, FakeFn>>,
    counters: Arc<Mutex<Counters>>,
    /// When set, calls must carry a valid signature with this key.
    key: Option<String>,
    /// Where to POST /fn/register when a sync PUT arrives.
    server: Arc<Mutex<Option<String>>>,
    register: Arc<Mutex<Value>>,
    /// When the app started: calls are timed from here.
    started: std::time::Instant,
}

pub struct FakeApp {
    pub url: String,
    pub app: String,
    pub fns: Vec<FakeFn>,
    pub counters: Arc<Mutex<Counters>>,
    server: Arc<Mutex<Option<String>>>,
}

impl FakeApp {
    pub async fn start(app: &str, fns: Vec<FakeFn>) -> FakeApp {
        Self::start_with_key(app, fns, None).await
    }

    /// An app that verifies call signatures with `key`.
    pub async fn start_with_key(app: &str, fns: Vec<FakeFn>, key: Option<&str>) -> FakeApp {
        let counters: Arc<Mutex<Counters>> = Arc::default();
        let map = fns
            .iter()
            .map(|f| (format!("{app}-{}", f.id), f.clone()))
            .collect();
        let server: Arc<Mutex<Option<String>>> = Arc::default();
        let register: Arc<Mutex<Value>> = Arc::default();
        let state = AppState {
            app: app.to_string(),
            fns: Arc::new(map),
            counters: counters.clone(),
            key: key.map(str::to_string),
            server: server.clone(),
            register: register.clone(),
            started: std::time::Instant::now(),
        };
        let router = Router::new()
            .route("/api/inngest", post(handle).put(sync))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        let fake = FakeApp {
            url: format!("http://{addr}/api/inngest"),
            app: app.to_string(),
            fns,
            counters,
            server,
        };
        *register.lock() = fake.register_body();
        fake
    }

    /// Make sync PUTs register with this server base URL.
    pub fn sync_to(&self, base: &str) {
        *self.server.lock() = Some(base.to_string());
    }

    /// The `/fn/register` body for this app.
    pub fn register_body(&self) -> Value {
        let functions: Vec<Value> = self
            .fns
            .iter()
            .map(|f| {
                let slug = format!("{}-{}", self.app, f.id);
                let mut v = json!({
                    "id": slug, "name": f.id, "triggers": f.triggers,
                    "steps": {"step": {"id": "step", "name": "step",
                        "runtime": {"type": "http", "url": format!("{}?fnId={slug}&stepId=step", self.url)}}},
                });
                if let (Some(o), Some(extra)) = (v.as_object_mut(), f.extra.as_object()) {
                    for (k, val) in extra {
                        o.insert(k.clone(), val.clone());
                    }
                }
                v
            })
            .collect();
        json!({"url": self.url, "deployType": "ping", "framework": "axum", "appName": self.app,
               "functions": functions, "sdk": "rust:v0.0.1", "v": "0.1"})
    }

    pub fn executed(&self, step: &str) -> usize {
        self.counters
            .lock()
            .executed
            .get(step)
            .copied()
            .unwrap_or(0)
    }
}

fn sdk_response(
    status: u16,
    version: i64,
    body: Value,
    extra: &[(&'static str, &str)],
) -> Response {
    let mut resp = (StatusCode::from_u16(status).unwrap(), body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert("x-inngest-sdk", "inngest-fake:v0.0.1".parse().unwrap());
    h.insert(
        "x-inngest-req-version",
        version.to_string().parse().unwrap(),
    );
    h.insert("content-type", "application/json".parse().unwrap());
    for (k, v) in extra {
        h.insert(*k, v.parse().unwrap());
    }
    resp
}

async fn sync(State(st): State<AppState>, h: HeaderMap, body: Bytes) -> Response {
    let header = |k: &str| {
        h.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let parsed = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (kind, sync_kind) = (
        header("x-inngest-server-kind"),
        header("x-inngest-sync-kind"),
    );
    let refuse = st.counters.lock().refuse_in_band;
    st.counters
        .lock()
        .puts
        .push((parsed, kind, sync_kind.clone()));
    let reg = st.register.lock().clone();
    if sync_kind == "in_band" {
        if refuse {
            return (StatusCode::UNAUTHORIZED, r#"{"message":"Unauthorized"}"#).into_response();
        }
        let reply = json!({"app_id": reg["appName"], "framework": "axum", "functions": reg["functions"],
            "sdk_author": "cairn", "sdk_language": "fake", "sdk_version": "0.0.1", "url": reg["url"],
            "capabilities": {"in_band_sync": "v1"}, "inspection": {}, "env": null});
        return sdk_response(200, 1, reply, &[("x-inngest-sync-kind", "in_band")]);
    }
    let server = st.server.lock().clone();
    let Some(server) = server else {
        return (StatusCode::OK, "{}").into_response();
    };
    let url = format!("{server}/fn/register");
    let r = reqwest::Client::new()
        .post(url)
        .json(&reg)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    sdk_response(
        200,
        1,
        json!({"message": "synced", "modified": v["modified"]}),
        &[],
    )
}

async fn handle(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(key) = &st.key {
        let sig = h.get("x-inngest-signature").and_then(|v| v.to_str().ok());
        let now = chrono::Utc::now().timestamp();
        if cairn_protocol::signature::verify(sig, &body, &[key.as_str()], now).is_err() {
            st.counters.lock().bad_signatures += 1;
            return (StatusCode::UNAUTHORIZED, r#"{"message":"Unauthorized"}"#).into_response();
        }
    }
    let req: CallRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let slug = q.get("fnId").cloned().unwrap_or_default();
    let Some(f) = st.fns.get(&slug) else {
        return (StatusCode::NOT_FOUND, "no fn").into_response();
    };
    let target = q.get("stepId").cloned().unwrap_or_else(|| "step".into());
    {
        let mut c = st.counters.lock();
        *c.calls.entry(slug.clone()).or_default() += 1;
        let run = req.ctx.run_id.clone();
        c.history.entry(run.clone()).or_default().push((
            st.started.elapsed().as_millis(),
            req.ctx.qi_id.clone().unwrap_or_default(),
            req.ctx.attempt,
            req.steps.len(),
        ));
        let seen = c.seen.entry(run.clone()).or_default().clone();
        for h in &seen {
            if !req.steps.contains_key(h) {
                let calls = format!("{:?}", c.history[&run]);
                c.violations
                    .push(format!("run {run}: memo {h} missing; calls: {calls}"));
            }
        }
        c.seen
            .entry(run)
            .or_default()
            .extend(req.steps.keys().cloned());
    }
    let run_id = req.ctx.run_id.clone();
    let memo = |id: &str| req.steps.get(&step_id::hash(id)).cloned();
    let v = f.version;
    let exec = |id: &str| {
        let mut c = st.counters.lock();
        *c.executed.entry(format!("{run_id}/{id}")).or_default() += 1;
        *c.executed.entry(id.to_string()).or_default() += 1;
        c.executed[id]
    };
    let _ = &st.app;

    if target != "step" {
        // Targeted call: find the planned step and run just that.
        for s in &f.steps {
            if let Step::Parallel(items) = s {
                for (id, val) in items {
                    if step_id::hash(id) == target {
                        exec(id);
                        return sdk_response(
                            206,
                            v,
                            json!([{"id": target, "op": "StepRun", "name": id, "data": val}]),
                            &[],
                        );
                    }
                }
            }
            if let Step::Run(id, val) = s {
                if step_id::hash(id) == target {
                    exec(id);
                    return sdk_response(
                        206,
                        v,
                        json!([{"id": target, "op": "StepRun", "name": id, "data": val}]),
                        &[],
                    );
                }
            }
        }
        return sdk_response(
            500,
            v,
            json!({"error": "step not found"}),
            &[("x-inngest-no-retry", "false")],
        );
    }

    let mut outputs = serde_json::Map::new();
    for s in &f.steps {
        match s {
            Step::Run(id, val) => {
                if let Some(m) = memo(id) {
                    outputs.insert(id.to_string(), m);
                    continue;
                }
                let h = step_id::hash(id);
                if req.ctx.disable_immediate_execution {
                    return sdk_response(
                        206,
                        v,
                        json!([{"id": h, "op": "StepPlanned", "name": id}]),
                        &[],
                    );
                }
                exec(id);
                return sdk_response(
                    206,
                    v,
                    json!([{"id": h, "op": "StepRun", "name": id, "data": val}]),
                    &[],
                );
            }
            Step::Flaky(id, fails, val) => {
                if let Some(m) = memo(id) {
                    outputs.insert(id.to_string(), m);
                    continue;
                }
                let h = step_id::hash(id);
                let n = exec(id);
                if n <= *fails {
                    let last = req.ctx.attempt + 1 >= req.ctx.max_attempts.unwrap_or(5);
                    let op = if last { "StepFailed" } else { "StepError" };
                    return sdk_response(
                        206,
                        v,
                        json!([{"id": h, "op": op, "name": id, "error": {"name": "Error", "message": format!("flaky {n}")}}]),
                        &[("x-inngest-no-retry", "false")],
                    );
                }
                return sdk_response(
                    206,
                    v,
                    json!([{"id": h, "op": "StepRun", "name": id, "data": val}]),
                    &[],
                );
            }
            Step::Sleep(id, dur) => {
                if let Some(m) = memo(id) {
                    outputs.insert(id.to_string(), m);
                    continue;
                }
                return sdk_response(
                    206,
                    v,
                    json!([{"id": step_id::hash(id), "op": "Sleep", "name": dur, "opts": {}}]),
                    &[],
                );
            }
            Step::Wait(id, event, cond, timeout) => {
                if let Some(m) = memo(id) {
                    outputs.insert(id.to_string(), m);
                    continue;
                }
                let mut opts = json!({"timeout": timeout});
                if let Some(c) = cond {
                    opts["if"] = json!(c);
                }
                return sdk_response(
                    206,
                    v,
                    json!([{"id": step_id::hash(id), "op": "WaitForEvent", "name": event, "opts": opts}]),
                    &[],
                );
            }
            Step::Invoke(id, fn_id, data, timeout) => {
                if let Some(m) = memo(id) {
                    outputs.insert(id.to_string(), m);
                    continue;
                }
                return sdk_response(
                    206,
                    v,
                    json!([{"id": step_id::hash(id), "op": "InvokeFunction",
                            "opts": {"function_id": fn_id, "payload": {"data": data}, "timeout": timeout}}]),
                    &[],
                );
            }
            Step::Parallel(items) => {
                let missing: Vec<Value> = items
                    .iter()
                    .filter(|(id, _)| memo(id).is_none())
                    .map(
                        |(id, _)| json!({"id": step_id::hash(id), "op": "StepPlanned", "name": id}),
                    )
                    .collect();
                if !missing.is_empty() {
                    return sdk_response(206, v, Value::Array(missing), &[]);
                }
                for (id, _) in items {
                    outputs.insert(id.to_string(), memo(id).unwrap());
                }
            }
            Step::Discovery(id) => {
                if exec(id) == 1 {
                    let op = json!([{"id": step_id::hash(id), "op": "DiscoveryRequest"}]);
                    return sdk_response(206, v, op, &[]);
                }
            }
            Step::RunComplete(out) => {
                let op = json!([{"id": cairn_protocol::RUN_COMPLETE_ID, "op": "RunComplete", "data": out}]);
                return sdk_response(206, v, op, &[]);
            }
            Step::Throw(no_retry) => {
                return sdk_response(
                    if *no_retry { 400 } else { 500 },
                    v,
                    json!({"name": "Error", "message": "function blew up"}),
                    &[(
                        "x-inngest-no-retry",
                        if *no_retry { "true" } else { "false" },
                    )],
                );
            }
        }
    }
    let event_data = req.event.data.clone();
    sdk_response(200, v, json!({"steps": outputs, "event": event_data}), &[])
}

/// A server on a temp SQLite database, with a short fixed retry interval.
pub struct TestServer {
    pub server: Server,
    pub base: String,
    pub http: reqwest::Client,
    pub _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path().join("cairn.db")).unwrap());
        let mut cfg = Config::dev("127.0.0.1:0".parse().unwrap());
        cfg.retry_interval = Some(Duration::from_millis(100));
        let server = Server::start(cfg, store).await.unwrap();
        let base = format!("http://{}", server.addr());
        TestServer {
            server,
            base,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub async fn register(&self, app: &FakeApp) {
        let r = self
            .http
            .post(format!("{}/fn/register", self.base))
            .json(&app.register_body())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "register failed: {body}");
        assert_eq!(body["ok"], true);
    }

    pub async fn send(&self, event: Value) -> Vec<String> {
        let r = self
            .http
            .post(format!("{}/e/test", self.base))
            .json(&event)
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

    pub async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Runs started by an event, waiting until at least `n` exist.
    pub async fn runs_of(&self, event_id: &str, n: usize) -> Vec<Value> {
        for _ in 0..400 {
            let v = self.get(&format!("/v1/events/{event_id}/runs")).await;
            if let Some(a) = v["data"].as_array() {
                if a.len() >= n {
                    return a.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("event {event_id} did not start {n} runs");
    }

    /// Wait until the run is no longer Running and return it.
    pub async fn finished(&self, run_id: &str) -> Value {
        for _ in 0..800 {
            let v = self.get(&format!("/v1/runs/{run_id}")).await;
            if v["data"]["status"] != "Running" {
                return v["data"].clone();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("run {run_id} did not finish");
    }

    /// Send one event and wait for the one run it starts to end.
    pub async fn run_to_end(&self, event: Value) -> Value {
        let ids = self.send(event).await;
        let runs = self.runs_of(&ids[0], 1).await;
        self.finished(runs[0]["run_id"].as_str().unwrap()).await
    }
}
