//! Test helpers: serve a router on loopback and play the server's part with reqwest.
#![allow(dead_code)]

use axum::Router;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

pub const KEY: &str =
    "signkey-test-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
pub const FALLBACK_KEY: &str =
    "signkey-test-fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

/// Serves `app` on an ephemeral loopback port and returns its base URL.
pub async fn listen(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}")
}

/// Serves the SDK handler at `/api/inngest` and returns that URL.
pub async fn serve_sdk(handler: Router) -> String {
    let base = listen(Router::new().nest_service("/api/inngest", handler)).await;
    format!("{base}/api/inngest")
}

pub fn hash(id: &str) -> String {
    cairn_protocol::step_id::hash(id)
}

/// A call request body the way the server builds one.
pub struct CallBuilder {
    pub event: Value,
    pub steps: serde_json::Map<String, Value>,
    pub stack: Vec<String>,
    pub attempt: u32,
    pub max_attempts: Option<u32>,
    pub disable_immediate_execution: bool,
    pub use_api: bool,
    /// `ctx.fn_id` and `ctx.qi_id`: a server that takes checkpoints sends both.
    pub checkpoint: Option<(String, String)>,
}

impl CallBuilder {
    pub fn new(data: Value) -> Self {
        CallBuilder {
            event: json!({"name": "demo/seed", "data": data, "id": "01EVENT", "ts": 1_700_000_000_000i64, "user": {}}),
            steps: Default::default(),
            stack: Vec::new(),
            attempt: 0,
            max_attempts: Some(4),
            disable_immediate_execution: false,
            use_api: false,
            checkpoint: None,
        }
    }
    /// Memoises `memo` under the user step id `id` and appends it to the stack.
    pub fn memo(mut self, id: &str, memo: Value) -> Self {
        let h = hash(id);
        self.steps.insert(h.clone(), memo);
        self.stack.push(h);
        self
    }
    pub fn data(self, id: &str, data: Value) -> Self {
        self.memo(id, json!({ "data": data }))
    }
    pub fn attempt(mut self, attempt: u32, max: u32) -> Self {
        self.attempt = attempt;
        self.max_attempts = Some(max);
        self
    }
    pub fn build(&self) -> Value {
        let mut ctx = json!({
            "run_id": "01RUN",
            "attempt": self.attempt,
            "disable_immediate_execution": self.disable_immediate_execution,
            "use_api": self.use_api,
            "stack": {"stack": self.stack, "current": self.stack.len()},
            "step_id": "step",
            "env": "",
        });
        if let Some(m) = self.max_attempts {
            ctx["max_attempts"] = json!(m);
        }
        if let Some((fn_id, qi_id)) = &self.checkpoint {
            ctx["fn_id"] = json!(fn_id);
            ctx["qi_id"] = json!(qi_id);
        }
        json!({
            "event": self.event,
            "events": [self.event],
            "steps": self.steps,
            "ctx": ctx,
            "version": 2,
            "use_api": self.use_api,
        })
    }
}

pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub raw: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The ops of a 206 answer.
    pub fn ops(&self) -> &Vec<Value> {
        assert_eq!(
            self.status, 206,
            "expected ops, got {} {}",
            self.status, self.body
        );
        self.body.as_array().expect("206 body is an array")
    }
}

/// POSTs a call for `fn_slug` at `step_id`, optionally signed with `key`.
pub async fn call(
    url: &str,
    fn_slug: &str,
    step_id: &str,
    body: &Value,
    key: Option<&str>,
) -> Answer {
    let bytes = serde_json::to_vec(body).unwrap();
    let mut req = reqwest::Client::new()
        .post(format!("{url}?fnId={fn_slug}&stepId={step_id}"))
        .header("content-type", "application/json")
        .body(bytes.clone());
    if let Some(key) = key {
        let canonical = cairn_protocol::signature::canonical_json(body);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        req = req.header(
            "x-inngest-signature",
            cairn_protocol::signature::sign(key, &canonical, now),
        );
    }
    answer(req.send().await.unwrap()).await
}

pub async fn answer(res: reqwest::Response) -> Answer {
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let raw = res.bytes().await.unwrap().to_vec();
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        raw,
    }
}
