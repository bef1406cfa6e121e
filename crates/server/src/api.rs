//! HTTP edges: the Inngest-compatible event, sync and REST APIs.

use crate::store::{
    AppRecord, FunctionRecord, MemoJson, NewEvent, Run, RunStatus, StoredEvent, Watch,
};
use crate::{Engine, Mode};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_protocol::{headers, signature, RegisterRequest};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// Largest single event accepted.
pub const MAX_EVENT_BYTES: usize = 512 * 1024;
/// Largest request body (a batch of events or a sync).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

type S = State<Arc<Engine>>;

/// Build the router for an engine.
pub fn router(engine: Arc<Engine>) -> Router {
    let authed = Router::new()
        .route("/fn/register", post(register))
        .route("/invoke/{slug}", post(invoke))
        .route("/v0/runs/{id}/actions", get(run_actions))
        .route("/v0/runs/{id}/batch", get(run_batch))
        .route("/v0/runs/{id}", axum::routing::delete(cancel_run))
        .route("/v1/events", get(list_events))
        .route("/v1/events/{id}", get(get_event))
        .route("/v1/events/{id}/runs", get(event_runs))
        .route("/v1/events/{id}/skipped", get(event_skips))
        .route("/v1/runs/{id}", get(get_run).delete(cancel_run))
        .route("/v1/runs/{id}/queue", get(run_queue))
        .route("/v1/apps/{app}/functions", get(app_functions))
        .route("/v1/checkpoint/{id}/async", post(checkpoint_async))
        .route_layer(middleware::from_fn_with_state(engine.clone(), bearer_auth));
    Router::new()
        .route("/e/{key}", post(ingest))
        .route("/dev", get(dev_info))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .merge(authed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(engine.clone(), server_kind))
        .with_state(engine)
}

fn kind(engine: &Engine) -> &'static str {
    match engine.config.mode {
        Mode::Dev => "dev",
        Mode::Start => "cloud",
    }
}

async fn server_kind(State(engine): S, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(
        headers::SERVER_KIND,
        HeaderValue::from_static(kind(&engine)),
    );
    resp
}

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    let msg = msg.into();
    (
        status,
        Json(json!({"status": status.as_u16(), "error": msg, "message": msg})),
    )
        .into_response()
}

async fn bearer_auth(State(engine): S, req: Request, next: Next) -> Response {
    if engine.config.mode == Mode::Start {
        let key = engine.config.signing_key.as_deref().unwrap_or_default();
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .unwrap_or_default();
        if token.is_empty() || !signature::bearer_matches(token, key) {
            return err(
                StatusCode::UNAUTHORIZED,
                "unauthorized: missing or invalid signing key bearer token",
            );
        }
    }
    next.run(req).await
}

/// Validate and normalise one incoming event; `Err` says what is wrong.
fn normalise_event(mut v: Value, now: i64, internal_id: &str) -> Result<Value, String> {
    let Some(obj) = v.as_object_mut() else {
        return Err("event must be a JSON object".into());
    };
    let name = match obj.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => return Err("event is missing a name".into()),
    };
    if name.starts_with(cairn_protocol::event::RESERVED_PREFIX) {
        return Err(format!(
            "event name {name:?} uses the reserved inngest/ prefix"
        ));
    }
    if name.len() > 512 {
        return Err("event name is longer than 512 characters".into());
    }
    match obj.get_mut("data") {
        None | Some(Value::Null) => {
            obj.insert("data".into(), json!({}));
        }
        Some(Value::Object(d)) => {
            d.remove("_inngest");
        }
        Some(_) => return Err("event data must be an object".into()),
    }
    if !matches!(obj.get("user"), Some(Value::Object(_))) {
        obj.insert("user".into(), json!({}));
    }
    match obj.get("ts") {
        Some(Value::Number(n)) if n.as_i64().is_some_and(|t| t > 0) => {}
        _ => {
            obj.insert("ts".into(), json!(now));
        }
    }
    match obj.get("id") {
        Some(Value::String(s)) if !s.is_empty() => {}
        _ => {
            obj.insert("id".into(), json!(internal_id));
        }
    }
    Ok(v)
}

/// Deterministic event ids from `X-Inngest-Event-Id-Seed: <unix ms>,<base64 of 10 bytes>`:
/// a retried send of the same batch gets the same ids and is stored once.
fn seeded_ids(seed: &str, n: usize) -> Option<Vec<String>> {
    use base64::Engine as _;
    let (ms, entropy) = seed.split_once(',')?;
    let ms: u64 = ms.trim().parse().ok()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(entropy.trim())
        .ok()?;
    let bytes: [u8; 10] = bytes.try_into().ok()?;
    let base = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]);
    Some(
        (0..n)
            .map(|i| {
                let mut b = bytes;
                b[6..10].copy_from_slice(&base.wrapping_add(i as u32).to_be_bytes());
                let mut random = [0u8; 16];
                random[6..].copy_from_slice(&b);
                ulid::Ulid::from_parts(ms, u128::from_be_bytes(random)).to_string()
            })
            .collect(),
    )
}

async fn ingest(
    State(engine): S,
    Path(key): Path<String>,
    hdrs: HeaderMap,
    body: Bytes,
) -> Response {
    if engine.config.mode == Mode::Start && !engine.config.event_keys.iter().any(|k| k == &key) {
        return err(StatusCode::UNAUTHORIZED, "Event key not found");
    }
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    let raw = match parsed {
        Value::Array(a) => a,
        v @ Value::Object(_) => vec![v],
        _ => {
            return err(
                StatusCode::BAD_REQUEST,
                "body must be an event object or an array of events",
            )
        }
    };
    if raw.is_empty() {
        return (StatusCode::OK, Json(json!({"ids": [], "status": 200}))).into_response();
    }
    let now = engine.now();
    let seeded = hdrs
        .get(headers::EVENT_ID_SEED)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| seeded_ids(s, raw.len()));
    let mut events = Vec::with_capacity(raw.len());
    for (i, v) in raw.into_iter().enumerate() {
        let size = serde_json::to_vec(&v).map(|b| b.len()).unwrap_or(0);
        if size > MAX_EVENT_BYTES {
            return err(
                StatusCode::BAD_REQUEST,
                format!("event {i} is {size} bytes; the limit is {MAX_EVENT_BYTES}"),
            );
        }
        let internal_id = match &seeded {
            Some(ids) => ids[i].clone(),
            None => ulid::Ulid::new().to_string(),
        };
        match normalise_event(v, now, &internal_id) {
            Ok(event) => events.push(NewEvent {
                internal_id,
                event,
                received_at: now,
                target_fn: None,
            }),
            Err(e) => return err(StatusCode::BAD_REQUEST, format!("event {i}: {e}")),
        }
    }
    let ids: Vec<String> = events.iter().map(|e| e.internal_id.clone()).collect();
    let n = events.len();
    // Plan each event's runs now so that storing it and starting them is one commit; the
    // sequence number is not known yet and is filled in by the store.
    let planned: Vec<(NewEvent, Vec<crate::store::NewRun>)> = events
        .into_iter()
        .map(|e| {
            let runs = crate::matcher::plan_new_event(&engine, &e, now);
            (e, runs)
        })
        .collect();
    // Free workers start the new runs straight from the commit that created them.
    let mut permits = engine
        .workers
        .try_take(planned.iter().map(|(_, r)| r.len()).sum());
    let lease_until = engine.lease_until(now);
    let lease = (engine.owner.clone(), lease_until, permits.len());
    // Acknowledge only after commit.
    let left = match engine
        .store
        .insert_and_apply(planned, engine.pause_matcher(), now, lease)
        .await
    {
        Ok((leased, left)) => {
            for item in leased {
                let Some(permit) = permits.pop() else { break };
                crate::queue::spawn(engine.clone(), permit, item, lease_until);
            }
            left
        }
        Err(e) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("storing events: {e}"),
            )
        }
    };
    if !permits.is_empty() {
        drop(permits);
        engine.workers.freed(&engine.queue_wake);
    }
    metrics::counter!("cairn_events_received_total").increment(n as u64);
    // Runs handed straight to workers need no loop to find them.
    if left.queue {
        engine.queue_wake.notify_one();
    }
    if left.matcher {
        engine.events_wake.notify_one();
    }
    (StatusCode::OK, Json(json!({"ids": ids, "status": 200}))).into_response()
}

/// A function the sync refuses: which one, which field (if one is to blame), and why.
struct Invalid {
    function: String,
    field: Option<String>,
    message: String,
}

fn validate_function(f: &cairn_protocol::FunctionConfig) -> Result<(), Invalid> {
    let invalid = |field: Option<&str>, message: String| Invalid {
        function: f.id.clone(),
        field: field.map(str::to_string),
        message,
    };
    if f.id.is_empty() {
        return Err(invalid(Some("id"), "function without an id".into()));
    }
    if f.url().is_none() {
        return Err(invalid(Some("steps"), "no step runtime URL".into()));
    }
    if f.triggers.is_empty() {
        return Err(invalid(Some("triggers"), "no triggers".into()));
    }
    for (i, t) in f.triggers.iter().enumerate() {
        match t {
            cairn_protocol::Trigger::Event { event, expression } => {
                if event.is_empty() {
                    return Err(invalid(
                        Some(&format!("triggers[{i}].event")),
                        "empty trigger event".into(),
                    ));
                }
                if let Some(e) = expression.as_deref().filter(|e| !e.trim().is_empty()) {
                    crate::matcher::check_expr(e)
                        .map_err(|m| invalid(Some(&format!("triggers[{i}].expression")), m))?;
                }
            }
            cairn_protocol::Trigger::Cron { cron, .. } => {
                crate::timers::parse_cron(cron)
                    .map_err(|m| invalid(Some(&format!("triggers[{i}].cron")), m))?;
            }
        }
    }
    crate::flow::validate::check(f).map_err(|e| invalid(Some(&e.field), e.message))
}

/// Why a sync was refused, answered as JSON naming the function and field.
struct SyncError {
    status: StatusCode,
    message: String,
    invalid: Option<Invalid>,
}

impl SyncError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        SyncError {
            status,
            message: message.into(),
            invalid: None,
        }
    }

    fn into_response(self) -> Response {
        let mut body = json!({"status": self.status.as_u16(), "error": self.message,
            "message": self.message});
        if let Some(i) = self.invalid {
            body["function"] = json!(i.function);
            body["field"] = json!(i.field);
        }
        (self.status, Json(body)).into_response()
    }
}

async fn register(State(engine): S, hdrs: HeaderMap, body: Bytes) -> Response {
    if let Some(expected) = hdrs
        .get(headers::EXPECTED_SERVER_KIND)
        .and_then(|v| v.to_str().ok())
    {
        if !expected.is_empty() && expected != kind(&engine) {
            return err(
                StatusCode::BAD_REQUEST,
                format!("Expected server kind {}, got {expected}", kind(&engine)),
            );
        }
    }
    let raw: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("invalid sync body: {e}")),
    };
    let req: RegisterRequest = match serde_json::from_value(raw.clone()) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("invalid sync body: {e}")),
    };
    match apply_sync(&engine, req, raw).await {
        Ok((app, modified)) => Json(json!({
            "ok": true, "modified": modified, "app_id": app,
            "sync_id": ulid::Ulid::new().to_string(), "status": 200,
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Validate and store a sync (out-of-band body or converted in-band reply).
/// Returns the app name and whether anything changed.
async fn apply_sync(
    engine: &Engine,
    req: RegisterRequest,
    mut raw: Value,
) -> Result<(String, bool), SyncError> {
    if req.app_name.trim().is_empty() {
        return Err(SyncError::new(
            StatusCode::BAD_REQUEST,
            "appName is required",
        ));
    }
    for f in &req.functions {
        if let Err(i) = validate_function(f) {
            let field = i
                .field
                .as_deref()
                .map(|f| format!(" {f}:"))
                .unwrap_or_default();
            return Err(SyncError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "At least one function is invalid: function {}:{field} {}",
                    i.function, i.message
                ),
                invalid: Some(i),
            });
        }
    }
    if let Some(o) = raw.as_object_mut() {
        // Telemetry that changes between identical syncs must not flip `modified`.
        o.remove("featureObservations");
    }
    let checksum = hex::encode(Sha256::digest(signature::canonical_json(&raw)));
    let app = AppRecord {
        name: req.app_name.clone(),
        url: req.url.clone(),
        sdk: req.sdk.clone(),
        checksum,
        synced_at: engine.now(),
    };
    let functions = req
        .functions
        .iter()
        .map(|f| FunctionRecord {
            slug: f.id.clone(),
            app: req.app_name.clone(),
            config: serde_json::to_value(f).unwrap_or(Value::Null),
        })
        .collect();
    let internal = |e: crate::store::StoreError| {
        SyncError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    };
    let modified = engine
        .store
        .sync_app(app, functions)
        .await
        .map_err(internal)?;
    engine
        .registry
        .reload(engine.store.as_ref())
        .await
        .map_err(internal)?;
    engine.cron_wake.notify_one();
    tracing::info!(app = %req.app_name, functions = req.functions.len(), modified, "app synced");
    Ok((req.app_name, modified))
}

async fn dev_info(State(engine): S) -> Response {
    if engine.config.mode != Mode::Dev {
        return err(StatusCode::NOT_FOUND, "not a dev server");
    }
    let functions: Vec<Value> = engine
        .registry
        .all()
        .iter()
        .map(|f| json!({"id": f.slug, "name": f.config.name}))
        .collect();
    Json(json!({"version": env!("CARGO_PKG_VERSION"), "server": "cairn", "functions": functions}))
        .into_response()
}

#[derive(Deserialize)]
struct InvokeBody {
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    user: Option<Value>,
}

async fn invoke(State(engine): S, Path(slug): Path<String>, body: Bytes) -> Response {
    if engine.registry.get(&slug).is_none() {
        return err(StatusCode::NOT_FOUND, format!("function {slug} not found"));
    }
    let b: InvokeBody = if body.is_empty() {
        InvokeBody {
            data: None,
            user: None,
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return err(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
        }
    };
    let now = engine.now();
    let internal_id = ulid::Ulid::new().to_string();
    let mut data = b.data.filter(Value::is_object).unwrap_or(json!({}));
    data["_inngest"] = json!({"fn_id": slug});
    let event = NewEvent {
        internal_id: internal_id.clone(),
        event: json!({"name": "inngest/function.invoked", "id": internal_id, "data": data,
                      "user": b.user.unwrap_or(json!({})), "ts": now}),
        received_at: now,
        target_fn: Some(slug),
    };
    if let Err(e) = engine.store.insert_events(vec![event]).await {
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("storing event: {e}"),
        );
    }
    engine.events_wake.notify_one();
    Json(json!({"id": internal_id, "status": 200})).into_response()
}

fn wrap(data: Value) -> Response {
    Json(json!({"data": data, "metadata": {"fetched_at": chrono::Utc::now().to_rfc3339()}}))
        .into_response()
}

fn ms_to_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

fn run_json(r: &Run) -> Value {
    json!({
        "run_id": r.run_id,
        "function_id": r.fn_slug,
        "status": r.status.as_str(),
        "output": r.output,
        "event_id": r.events.first().and_then(|e| e.get("id")).cloned(),
        "event_ids": r.events.iter().filter_map(|e| e.get("id")).collect::<Vec<_>>(),
        "run_started_at": ms_to_rfc3339(r.created_at),
        "ended_at": r.ended_at.map(ms_to_rfc3339),
    })
}

fn event_json(e: &StoredEvent) -> Value {
    let mut v = e.event.clone();
    if let Some(o) = v.as_object_mut() {
        o.insert("internal_id".into(), json!(e.internal_id));
        o.insert("received_at".into(), json!(ms_to_rfc3339(e.received_at)));
    }
    v
}

async fn run_actions(State(engine): S, Path(id): Path<String>) -> Response {
    match engine.store.get_run(&id).await {
        Ok(Some(_)) => {}
        Ok(None) => return err(StatusCode::NOT_FOUND, "run not found"),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    match engine.store.steps(&id).await {
        Ok(steps) => {
            let steps: Vec<(&str, &str)> = steps
                .iter()
                .map(|(h, m)| (h.as_str(), m.as_str()))
                .collect();
            (
                [("content-type", "application/json")],
                cairn_protocol::call::steps_body(&steps),
            )
                .into_response()
        }
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn run_batch(State(engine): S, Path(id): Path<String>) -> Response {
    match engine.store.get_run(&id).await {
        Ok(Some(r)) => Json(Value::Array(r.events)).into_response(),
        Ok(None) => err(StatusCode::NOT_FOUND, "run not found"),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct RunQuery {
    /// Hold the answer until the run has ended or this many milliseconds passed.
    wait_ms: Option<u64>,
}

/// Longest `wait_ms` honoured: long enough to replace polling, short enough for proxies.
const MAX_RUN_WAIT: Duration = Duration::from_secs(60);

/// A run; with `?wait_ms=N`, answered when the run ends (or after N ms, still running),
/// so clients need not poll.
async fn get_run(State(engine): S, Path(id): Path<String>, Query(q): Query<RunQuery>) -> Response {
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_RUN_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let waiter = (!wait.is_zero()).then(|| engine.run_waiters.register(&id));
    // Watched (see `Store::watch_run`) once found running: from then on its end wakes the
    // waiter wherever it is committed.
    let mut watched = false;
    loop {
        let woken = waiter.as_ref().map(|w| w.notified());
        tokio::pin!(woken);
        let Some(w) = woken.as_mut().as_pin_mut() else {
            return run_response(&engine, &id).await;
        };
        w.enable();
        if !watched {
            match engine.store.watch_run(&id, &engine.owner).await {
                Ok(Watch::Watched) => watched = true,
                // This process's worker wakes the waiter when it lets go of the run; then
                // it watches again.
                Ok(Watch::Here) if tokio::time::Instant::now() < deadline => {}
                Ok(Watch::Here) => return run_response(&engine, &id).await,
                // Ended, or no such run: the read says which.
                Ok(Watch::Ended) => return run_response(&engine, &id).await,
                Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        } else {
            match run_answer(&engine, &id).await {
                Ok(run)
                    if run.status != RunStatus::Running
                        || tokio::time::Instant::now() >= deadline =>
                {
                    return wrap(run_json(&run))
                }
                Ok(_) => {}
                Err(r) => return r,
            }
        }
        wait_for_end(&engine, woken.as_pin_mut(), deadline).await;
    }
}

/// The answer for the run as it is now.
async fn run_response(engine: &Engine, id: &str) -> Response {
    match run_answer(engine, id).await {
        Ok(run) => wrap(run_json(&run)),
        Err(r) => r,
    }
}

/// The run, or the answer to give when it cannot be read.
async fn run_answer(engine: &Engine, id: &str) -> Result<Run, Response> {
    match engine.store.get_run(id).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(err(StatusCode::NOT_FOUND, "run not found")),
        Err(e) => Err(err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// Until `woken` (a waiter's end announcement) fires, the deadline passes, or it is time to
/// re-read the run anyway: ends nobody announces (see `recheck_every`) wake nobody.
async fn wait_for_end(
    engine: &Engine,
    woken: Option<std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>>,
    deadline: tokio::time::Instant,
) {
    let recheck = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .min(engine.run_waiters.recheck_every());
    tokio::select! {
        _ = async { if let Some(w) = woken { w.await } } => {}
        _ = tokio::time::sleep(recheck) => {}
    }
}

async fn cancel_run(State(engine): S, Path(id): Path<String>) -> Response {
    match engine.store.get_run(&id).await {
        Ok(Some(r)) if r.status != RunStatus::Running => {
            return err(
                StatusCode::CONFLICT,
                format!("run is already {}", r.status.as_str()),
            )
        }
        Ok(Some(_)) => {}
        Ok(None) => return err(StatusCode::NOT_FOUND, "run not found"),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    match engine.store.cancel_run(&id, engine.now()).await {
        Ok(_) => {
            engine.queue_wake.notify_one();
            metrics::counter!("cairn_runs_cancelled_total").increment(1);
            wrap(json!({"run_id": id, "status": "Cancelled"}))
        }
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct CheckpointBody {
    #[serde(default)]
    qi_id: Option<String>,
    #[serde(default)]
    steps: Vec<cairn_protocol::Op>,
}

/// Steps a JS v4 SDK ran inside one call, saved as they happen (§13.2). The
/// call's own response still decides what comes next.
async fn checkpoint_async(State(engine): S, Path(id): Path<String>, body: Bytes) -> Response {
    use cairn_protocol::Opcode;
    let bad = |msg: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": msg, "data": {"run_id": id}, "status": 400})),
        )
            .into_response()
    };
    let req: CheckpointBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad(format!("invalid checkpoint body: {e}")),
    };
    let dispatch = req
        .qi_id
        .as_deref()
        .and_then(crate::executor::parse_dispatch_ref);
    // With a dispatch the store checks it in the write (a run that ended has no queue items
    // left, so its calls are stale); without one, check the run here.
    if dispatch.is_none() {
        match engine.store.get_run(&id).await {
            Ok(Some(r)) if r.status == RunStatus::Running => {}
            Ok(_) => return bad("run not found or not running".into()),
            Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
    let mut apply = crate::store::Apply {
        run_id: id.clone(),
        reset_attempt: dispatch.as_ref().map(|(item, _)| item.clone()),
        dispatch,
        ..Default::default()
    };
    for op in &req.steps {
        match &op.op {
            Opcode::StepRun => apply.memos.push((
                op.id.clone(),
                MemoJson::data(op.data.as_ref().unwrap_or(&Value::Null)),
            )),
            Opcode::Step => apply.memos.push((
                op.id.clone(),
                MemoJson::new(op.data.as_ref().unwrap_or(&Value::Null)),
            )),
            Opcode::StepFailed => apply.memos.push((
                op.id.clone(),
                MemoJson::error(
                    &op.error
                        .as_ref()
                        .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
                        .unwrap_or(Value::Null),
                ),
            )),
            Opcode::StepPlanned | Opcode::DeferAdd | Opcode::DeferAbort | Opcode::None => {}
            other => {
                return bad(format!(
                    "cannot checkpoint async steps ({})",
                    other.as_str()
                ))
            }
        }
    }
    match engine
        .store
        .apply(apply, engine.pause_matcher(), engine.now())
        .await
    {
        Ok(()) => StatusCode::OK.into_response(),
        // The server already gave up on the call that sent this (timeout, retry).
        Err(crate::store::StoreError::LeaseLost(_)) => (
            StatusCode::CONFLICT,
            Json(
                json!({"error": "stale dispatch: this call was already retried or finished",
                        "data": {"run_id": id}, "status": 409}),
            ),
        )
            .into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
    name: Option<String>,
}

async fn list_events(State(engine): S, Query(q): Query<EventsQuery>) -> Response {
    match engine
        .store
        .list_events(q.limit.unwrap_or(50).min(1000), q.name)
        .await
    {
        Ok(evs) => wrap(Value::Array(evs.iter().map(event_json).collect())),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn get_event(State(engine): S, Path(id): Path<String>) -> Response {
    match engine.store.get_event(&id).await {
        Ok(Some(e)) => wrap(event_json(&e)),
        Ok(None) => err(StatusCode::NOT_FOUND, "event not found"),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The runs an event started; with `?wait_ms=N`, answered once all of them have ended (or
/// after N ms, some still running), so a client can send an event and wait for its outcome
/// in two requests. Runs flow control has not started yet (a debounce, a batch) are not
/// waited for: they are not the event's runs until they exist.
async fn event_runs(
    State(engine): S,
    Path(id): Path<String>,
    Query(q): Query<RunQuery>,
) -> Response {
    let ev = match engine.store.get_event(&id).await {
        Ok(Some(e)) => e,
        Ok(None) => return err(StatusCode::NOT_FOUND, "event not found"),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_RUN_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    // The running run being waited for, registered before the read that found it running,
    // and whether it is watched for good (not `Watch::Here`).
    let mut waiter: Option<(String, crate::waiters::Waiter<'_>, bool)> = None;
    loop {
        let next = {
            let woken = waiter.as_ref().map(|(_, w, _)| w.notified());
            tokio::pin!(woken);
            if let Some(w) = woken.as_mut().as_pin_mut() {
                w.enable();
            }
            let runs = match engine.store.runs_for_event(&ev.internal_id).await {
                Ok(runs) => runs,
                Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            };
            let now = tokio::time::Instant::now();
            let running = runs.iter().find(|r| r.status == RunStatus::Running);
            let Some(running) = running.filter(|_| !wait.is_zero() && now < deadline) else {
                return wrap(Value::Array(runs.iter().map(run_json).collect()));
            };
            match &waiter {
                Some((id, _, true)) if *id == running.run_id => {
                    wait_for_end(&engine, woken.as_pin_mut(), deadline).await;
                    None
                }
                _ => Some(running.run_id.clone()),
            }
        };
        if let Some(run_id) = next {
            // Not registered when it was read (or not watched for good): register, then
            // watch it (which tells whether it is still running), so an end between the
            // read and the watch is not missed.
            if waiter.as_ref().map(|(id, _, _)| id) != Some(&run_id) {
                waiter = None;
            }
            let (_, w, watched) = waiter.get_or_insert_with(|| {
                (run_id.clone(), engine.run_waiters.register(&run_id), false)
            });
            let woken = w.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match engine.store.watch_run(&run_id, &engine.owner).await {
                Ok(Watch::Watched) => {
                    *watched = true;
                    wait_for_end(&engine, Some(woken), deadline).await;
                }
                Ok(Watch::Here) => wait_for_end(&engine, Some(woken), deadline).await,
                // Ended in between: read the runs again.
                Ok(Watch::Ended) => {}
                Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
    }
}

/// Runs flow control dropped for an event, and why.
async fn event_skips(State(engine): S, Path(id): Path<String>) -> Response {
    let ev = match engine.store.get_event(&id).await {
        Ok(Some(e)) => e,
        Ok(None) => return err(StatusCode::NOT_FOUND, "event not found"),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match engine.store.skips_for_event(&ev.internal_id).await {
        Ok(skips) => wrap(Value::Array(
            skips
                .iter()
                .map(|s| {
                    json!({"function_id": s.fn_slug, "reason": s.reason.as_str(),
                           "skipped_at": ms_to_rfc3339(s.at)})
                })
                .collect(),
        )),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Why a run is not moving: each of its queue items and what holds it.
async fn run_queue(State(engine): S, Path(id): Path<String>) -> Response {
    let run = match engine.store.get_run(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return err(StatusCode::NOT_FOUND, "run not found"),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match engine.store.run_queue(&id, engine.now()).await {
        Ok(items) => {
            let items: Vec<Value> = items
                .iter()
                .map(|i| {
                    json!({"id": i.id, "kind": i.kind, "available_at": ms_to_rfc3339(i.available_at),
                           "attempt": i.attempt, "leased": i.leased, "waiting_on": i.waiting_on})
                })
                .collect();
            wrap(json!({"run_id": run.run_id, "status": run.status.as_str(), "items": items}))
        }
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn app_functions(State(engine): S, Path(app): Path<String>) -> Response {
    let fns: Vec<Value> = engine
        .registry
        .all()
        .iter()
        .filter(|f| f.app == app)
        .map(|f| json!({"id": f.slug, "slug": f.slug, "name": f.config.name, "triggers": f.config.triggers}))
        .collect();
    wrap(Value::Array(fns))
}

async fn metrics(State(engine): S) -> Response {
    if let Ok(depth) = engine.store.queue_depth().await {
        metrics::gauge!("cairn_queue_depth").set(depth as f64);
    }
    // Zero when this process has no SQLite connection (a PostgreSQL node): not reported then.
    let sqlite_heap = crate::store::sqlite::heap_bytes();
    if sqlite_heap > 0 {
        metrics::gauge!("cairn_sqlite_heap_bytes").set(sqlite_heap as f64);
    }
    // Counted by the PostgreSQL store without touching the recorder on every statement.
    let statements = crate::store::postgres::statements_sent();
    if statements > 0 {
        metrics::counter!("cairn_db_statements_total").absolute(statements);
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        crate::metrics_export::render(),
    )
        .into_response()
}

/// Sync an app by URL (`cairn dev -u`): ask for an in-band sync first (the
/// app answers with its config in the PUT reply); if the app refuses or does
/// not do in-band (Python in dev mode answers 401), fall back to an
/// out-of-band PUT, after which the app POSTs `/fn/register` itself.
pub async fn ping_app(engine: &Engine, url: &str) -> anyhow::Result<String> {
    let resp = send_put(engine, url, true).await?;
    let in_band = resp
        .headers()
        .get(headers::SYNC_KIND)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == headers::SYNC_KIND_IN_BAND);
    if resp.status().is_success() && in_band {
        let raw: Value = resp.json().await?;
        let reply: cairn_protocol::InBandSyncResponse = serde_json::from_value(raw.clone())?;
        let req = reply.into_register_request();
        let raw_req = serde_json::to_value(&req)?;
        return match apply_sync(engine, req, raw_req).await {
            Ok((app, _)) => Ok(format!("in-band sync of app {app}")),
            Err(e) => anyhow::bail!("in-band sync of {url} rejected: {}", e.message),
        };
    }
    let resp = send_put(engine, url, false).await?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("sync of {url} failed: HTTP {status}: {text}");
    }
    Ok(text)
}

async fn send_put(engine: &Engine, url: &str, in_band: bool) -> anyhow::Result<reqwest::Response> {
    let body = signature::canonical_json(&json!({"url": url}));
    let mut req = engine
        .http
        .put(url)
        .header("content-type", "application/json")
        .header(headers::SERVER_KIND, kind(engine));
    if in_band {
        req = req.header(headers::SYNC_KIND, headers::SYNC_KIND_IN_BAND);
    }
    if let Some(key) = &engine.config.signing_key {
        let t = chrono::Utc::now().timestamp();
        req = req.header(headers::SIGNATURE, signature::sign(key, &body, t));
    }
    Ok(req.body(body).send().await?)
}
