//! The HTTP side: one URL answering introspection (GET), sync (PUT) and calls (POST).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{OriginalUri, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use cairn_protocol::signature::{self, hash_event_key, hash_signing_key, strip_key_prefix};
use cairn_protocol::{headers, CallRequest, FunctionConfig, Introspection, STEP_DISCOVERY};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::{now_secs, Client, Mode, SDK_HEADER, SDK_LANGUAGE, SDK_VERSION};
use crate::engine::{self, Checkpoint, Exec, Input, Outcome};
use crate::function::{ErasedHandler, Function};

const FRAMEWORK: &str = "axum";
/// The execution version this SDK speaks (parallel steps coalesced by the server).
const REQ_VERSION: &str = "2";

/// Tuning for [`serve_with`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Origin the server should call (`https://app.example.com`); overrides the client's
    /// `INNGEST_SERVE_ORIGIN` and the request's `Host`.
    pub serve_origin: Option<String>,
    /// Path the handler is mounted on (`/api/inngest`); overrides the client's
    /// `INNGEST_SERVE_PATH` and the request's own path.
    pub serve_path: Option<String>,
    /// Largest request body accepted; larger ones get 413. Servers inline at most 4 MiB of
    /// run state, so the default of 16 MiB leaves room for JSON overhead.
    pub max_body_bytes: usize,
    /// How long a targeted call waits for its step before answering "step not found".
    pub step_not_found_timeout: Duration,
    /// How long a checkpointing call goes on running steps; the next step that finishes
    /// after this is answered with a 206, and the server calls again. Keep it well under the
    /// server's call timeout and any proxy's request timeout. Default 10 s, as the JS SDK.
    pub checkpoint_max_runtime: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            serve_origin: None,
            serve_path: None,
            max_body_bytes: 16 * 1024 * 1024,
            step_not_found_timeout: Duration::from_secs(10),
            checkpoint_max_runtime: Duration::from_secs(10),
        }
    }
}

/// Serves `functions` as an axum [`Router`] (which is also a tower `Service`).
///
/// Mount it on the path you register with the server:
///
/// ```
/// use cairn_sdk::{Client, Ctx};
/// use serde_json::{json, Value};
///
/// let client = Client::builder("my-app").dev(true).build().unwrap();
/// let hello = client
///     .function("hello")
///     .event("demo/hello")
///     .handler(|ctx: Ctx<Value>| async move {
///         let step = ctx.step();
///         let greeting: String = step.run("greet", || async { Ok("hello".to_string()) }).await?;
///         Ok(json!({ "greeting": greeting }))
///     });
/// let app: axum::Router = axum::Router::new()
///     .nest_service("/api/inngest", cairn_sdk::serve(client, [hello]));
/// ```
pub fn serve(client: Client, functions: impl IntoIterator<Item = Function>) -> Router {
    serve_with(client, functions, ServeOptions::default())
}

/// [`serve`] with options.
pub fn serve_with(
    client: Client,
    functions: impl IntoIterator<Item = Function>,
    options: ServeOptions,
) -> Router {
    let functions: Vec<Function> = functions.into_iter().collect();
    let mut handlers = HashMap::new();
    for f in &functions {
        handlers.insert(f.slug().to_string(), (f.clone(), false));
        if let Some(slug) = f.failure_slug() {
            handlers.insert(slug, (f.clone(), true));
        }
    }
    let handler = Arc::new(Handler {
        client,
        functions,
        handlers,
        options,
    });
    Router::new().fallback(handle).with_state(handler)
}

struct Handler {
    client: Client,
    functions: Vec<Function>,
    /// Slug → (function, is its failure handler).
    handlers: HashMap<String, (Function, bool)>,
    options: ServeOptions,
}

/// A response under construction: status, JSON body, extra headers.
struct Reply {
    status: StatusCode,
    body: Bytes,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(status: StatusCode, body: &impl serde::Serialize) -> Self {
        // Serialising our own values cannot fail; fall back to `null` rather than panic.
        let body = serde_json::to_vec(body).unwrap_or_else(|_| b"null".to_vec());
        Reply {
            status,
            body: Bytes::from(body),
            headers: Vec::new(),
        }
    }
    fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Reply::json(
            status,
            &json!({"code": code, "message": message.into(), "status": status.as_u16()}),
        )
    }
    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

async fn handle(
    State(h): State<Arc<Handler>>,
    OriginalUri(original_uri): OriginalUri,
    req: Request<Body>,
) -> Response {
    let (parts, body) = req.into_parts();
    // Nested routers see a stripped path; the original one is what the server must call.
    let path = original_uri.path().to_string();
    let query: HashMap<String, String> = Query::try_from_uri(&parts.uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let (reply, signing_key) = match read_body(body, h.options.max_body_bytes).await {
        Err(reply) => (reply, None),
        Ok(body) => match parts.method {
            Method::GET => h.introspect(&parts.headers, &body),
            Method::PUT => h.sync(&parts.headers, &query, &path, &body).await,
            Method::POST => h.call(&parts.headers, &query, body).await,
            _ => (
                Reply::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "use GET, PUT or POST",
                ),
                None,
            ),
        },
    };
    finish(reply, signing_key)
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, Reply> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("request body exceeds {limit} bytes"),
        )),
        Err(e) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("reading the request body: {e}"),
        )),
    }
}

/// Adds the headers every answer carries, and signs it when the request was signed.
fn finish(reply: Reply, signing_key: Option<String>) -> Response {
    let mut res = Response::new(Body::from(reply.body.clone()));
    *res.status_mut() = reply.status;
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(headers::SDK, HeaderValue::from_static(SDK_HEADER));
    h.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static(SDK_HEADER),
    );
    h.insert(headers::REQ_VERSION, HeaderValue::from_static(REQ_VERSION));
    h.insert(headers::FRAMEWORK, HeaderValue::from_static(FRAMEWORK));
    for (name, value) in reply.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    if let Some(key) = signing_key {
        let sig = signature::sign_raw(&key, &reply.body, now_secs());
        if let Ok(v) = HeaderValue::from_str(&sig) {
            h.insert(headers::SIGNATURE, v);
        }
    }
    res
}

fn unauthorized(e: signature::SignatureError) -> (Reply, Option<String>) {
    (
        Reply::json(
            StatusCode::UNAUTHORIZED,
            &json!({"code": "sig_verification_failed", "message": "Unauthorized", "error": e.to_string()}),
        ),
        None,
    )
}

impl Handler {
    fn mode(&self) -> Mode {
        self.client.inner.mode
    }

    /// In cloud mode, checks the signature and returns the key that made it, to sign the
    /// answer with. In dev mode nothing is checked and nothing is signed.
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Option<String>, signature::SignatureError> {
        if self.mode() == Mode::Dev {
            return Ok(None);
        }
        let c = &self.client.inner;
        let keys: Vec<&str> = [&c.signing_key, &c.signing_key_fallback]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        let header = headers
            .get(headers::SIGNATURE)
            .and_then(|v| v.to_str().ok());
        let i = signature::verify(header, body, &keys, now_secs())?;
        Ok(Some(keys[i].to_string()))
    }

    fn function_count(&self) -> usize {
        self.handlers.len()
    }

    fn configs(&self, url: &str) -> Vec<FunctionConfig> {
        self.functions.iter().flat_map(|f| f.configs(url)).collect()
    }

    fn capabilities() -> Value {
        json!({"trust_probe": "v1", "in_band_sync": "v1"})
    }

    fn introspection(&self, authenticated: bool) -> Introspection {
        let c = &self.client.inner;
        let mut i = Introspection {
            extra: json!({"is_mode_explicit": true, "native_crypto": true, "is_streaming": false}),
            has_event_key: c.event_key.is_some(),
            has_signing_key: c.signing_key.is_some(),
            has_signing_key_fallback: Some(c.signing_key_fallback.is_some()),
            function_count: self.function_count(),
            mode: self.mode().as_str().to_string(),
            schema_version: cairn_protocol::sync::INTROSPECTION_SCHEMA_VERSION.to_string(),
            authentication_succeeded: None,
            api_origin: None,
            app_id: None,
            capabilities: None,
            event_api_origin: None,
            event_key_hash: None,
            framework: None,
            sdk_language: None,
            sdk_version: None,
            signing_key_hash: None,
            signing_key_fallback_hash: None,
        };
        if authenticated {
            let key_hash = |k: &Option<String>| {
                k.as_deref()
                    .and_then(hash_signing_key)
                    .map(|h| strip_key_prefix(&h).to_string())
            };
            i.authentication_succeeded = Some(true);
            i.api_origin = Some(c.api_origin.clone());
            i.app_id = Some(c.app_id.clone());
            i.capabilities = Some(Self::capabilities());
            i.event_api_origin = Some(c.event_origin.clone());
            i.event_key_hash = c.event_key.as_deref().map(hash_event_key);
            i.framework = Some(FRAMEWORK.to_string());
            i.sdk_language = Some(SDK_LANGUAGE.to_string());
            i.sdk_version = Some(SDK_VERSION.to_string());
            i.signing_key_hash = key_hash(&c.signing_key);
            i.signing_key_fallback_hash = key_hash(&c.signing_key_fallback);
        }
        i
    }

    fn introspect(&self, headers: &HeaderMap, body: &[u8]) -> (Reply, Option<String>) {
        let signed = headers.contains_key(headers::SIGNATURE);
        match (self.mode(), signed) {
            (Mode::Cloud, true) => match self.verify(headers, body) {
                Ok(key) => (Reply::json(StatusCode::OK, &self.introspection(true)), key),
                Err(_) => {
                    let mut i = self.introspection(false);
                    i.authentication_succeeded = Some(false);
                    (Reply::json(StatusCode::OK, &i), None)
                }
            },
            _ => (
                Reply::json(StatusCode::OK, &self.introspection(false)),
                None,
            ),
        }
    }

    /// The URL the server should call, from options, the client, or the request itself.
    fn app_url(&self, headers: &HeaderMap, path: &str) -> String {
        let c = &self.client.inner;
        let origin = self
            .options
            .serve_origin
            .clone()
            .or_else(|| c.serve_origin.clone())
            .unwrap_or_else(|| {
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
                let proto = header("x-forwarded-proto").unwrap_or("http");
                let host = header("x-forwarded-host")
                    .or_else(|| header("host"))
                    .unwrap_or("localhost");
                format!("{proto}://{host}")
            });
        let path = self
            .options
            .serve_path
            .clone()
            .or_else(|| c.serve_path.clone())
            .unwrap_or_else(|| path.to_string());
        let origin = origin.trim_end_matches('/');
        if path.is_empty() || path.starts_with('/') {
            format!("{origin}{path}")
        } else {
            format!("{origin}/{path}")
        }
    }

    async fn sync(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
        path: &str,
        body: &[u8],
    ) -> (Reply, Option<String>) {
        let in_band = headers
            .get(headers::SYNC_KIND)
            .is_some_and(|v| v.as_bytes() == headers::SYNC_KIND_IN_BAND.as_bytes());
        if in_band {
            return self.sync_in_band(headers, body);
        }
        let url = self.app_url(headers, path);
        let deploy_id = query
            .get("deployId")
            .filter(|d| !d.is_empty() && d.as_str() != "undefined")
            .cloned();
        let register = cairn_protocol::RegisterRequest {
            url: url.clone(),
            deploy_type: "ping".into(),
            framework: FRAMEWORK.into(),
            app_name: self.client.app_id().to_string(),
            functions: self.configs(&url),
            sdk: format!("{SDK_LANGUAGE}:v{SDK_VERSION}"),
            v: "0.1".into(),
            deploy_id: deploy_id.clone(),
            capabilities: Some(Self::capabilities()),
            app_version: None,
        };
        let server_kind = headers
            .get(headers::SERVER_KIND)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let endpoint = format!("{}/fn/register", self.client.api_origin());
        let result = self
            .client
            .api_request(|http| {
                let mut req = http
                    .post(&endpoint)
                    .header(headers::SYNC_KIND, headers::SYNC_KIND_OUT_OF_BAND)
                    .json(&register);
                if let Some(id) = &deploy_id {
                    req = req.query(&[("deployId", id)]);
                }
                if let Some(kind) = &server_kind {
                    req = req.header(headers::EXPECTED_SERVER_KIND, kind);
                }
                req
            })
            .await;
        let reply = match result {
            Err(e) => Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "sync_failed",
                format!("could not reach {endpoint}: {e}"),
            ),
            Ok(res) => {
                let http_status = res.status().as_u16();
                let body: Value = res.json().await.unwrap_or(Value::Null);
                // Servers put the real outcome in the body's `status`; trust it over HTTP's.
                let status = body
                    .get("status")
                    .and_then(Value::as_u64)
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(http_status);
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let modified = body
                    .get("modified")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let message = body
                    .get("error")
                    .or_else(|| body.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or(if status.is_success() {
                        "Successfully registered"
                    } else {
                        "sync failed"
                    })
                    .to_string();
                Reply::json(status, &json!({"message": message, "modified": modified}))
            }
        };
        (
            reply.header(headers::SYNC_KIND, headers::SYNC_KIND_OUT_OF_BAND),
            None,
        )
    }

    fn sync_in_band(&self, headers: &HeaderMap, body: &[u8]) -> (Reply, Option<String>) {
        // In-band sync hands out the app's configuration, so it must be signed (in cloud mode).
        let key = match self.verify(headers, body) {
            Ok(key) => key,
            Err(e) => return unauthorized(e),
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct InBandRequest {
            url: String,
        }
        let req: InBandRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                return (
                    Reply::error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
                    None,
                )
            }
        };
        let c = &self.client.inner;
        let response = cairn_protocol::InBandSyncResponse {
            app_id: c.app_id.clone(),
            app_version: None,
            capabilities: Self::capabilities(),
            env: c.env.clone(),
            framework: FRAMEWORK.into(),
            functions: self.configs(&req.url),
            inspection: serde_json::to_value(self.introspection(true)).unwrap_or(Value::Null),
            platform: None,
            sdk_author: "cairn".into(),
            sdk_language: SDK_LANGUAGE.into(),
            sdk_version: SDK_VERSION.into(),
            sdk: Some(format!("{SDK_LANGUAGE}:v{SDK_VERSION}")),
            url: req.url,
        };
        (
            Reply::json(StatusCode::OK, &response)
                .header(headers::SYNC_KIND, headers::SYNC_KIND_IN_BAND),
            key,
        )
    }

    async fn call(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
        body: Bytes,
    ) -> (Reply, Option<String>) {
        let key = match self.verify(headers, &body) {
            Ok(key) => key,
            Err(e) => return unauthorized(e),
        };
        if let Some(probe) = query.get("probe") {
            let reply = if probe == "trust" {
                Reply {
                    status: StatusCode::OK,
                    body: Bytes::new(),
                    headers: Vec::new(),
                }
            } else {
                Reply::error(
                    StatusCode::BAD_REQUEST,
                    "unknown_probe",
                    format!("unknown probe {probe:?}"),
                )
            };
            return (reply, key);
        }
        let reply = self.run(headers, query, body).await;
        (reply, key)
    }

    async fn run(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
        body: Bytes,
    ) -> Reply {
        let Some(fn_id) = query.get("fnId") else {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "missing_fn_id",
                "no fnId in the query",
            );
        };
        let Some((function, is_failure)) = self.handlers.get(fn_id) else {
            return Reply::json(
                StatusCode::NOT_FOUND,
                &json!({
                    "type": "internal",
                    "name": "Error",
                    "code": "function_not_found",
                    "message": format!("Function {fn_id:?} was not found in this app"),
                    "status": 404,
                }),
            )
            .header(headers::NO_RETRY, "false");
        };
        let step_id = query
            .get("stepId")
            .cloned()
            .or_else(|| {
                headers
                    .get(headers::STEP_ID)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| STEP_DISCOVERY.to_string());
        let req: CallRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("malformed call request: {e}"),
                )
                .header(headers::NO_RETRY, "false")
            }
        };
        // The body is parsed; its bytes are garbage from here on.
        drop(body);
        let CallRequest {
            event,
            events,
            mut steps,
            ctx,
            use_api,
            ..
        } = req;
        let mut events = events;
        let mut stack = ctx.stack.stack;
        if use_api || ctx.use_api {
            match crate::api::fetch_run_data(&self.client, &ctx.run_id).await {
                Ok((fetched_steps, fetched_events)) => {
                    if stack.is_empty() {
                        stack = fetched_steps.keys().cloned().collect();
                    }
                    steps = fetched_steps;
                    if !fetched_events.is_empty() {
                        events = fetched_events;
                    }
                }
                Err(e) => {
                    return Reply::error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "api_fetch_failed",
                        format!("fetching large run state: {e}"),
                    )
                    .header(headers::NO_RETRY, "false")
                }
            }
        }
        let retries = function.inner.config.retries;
        let max_attempts = ctx
            .max_attempts
            .or_else(|| retries.map(|r| if *is_failure { 2 } else { r + 1 }));
        let handler: &ErasedHandler = if *is_failure {
            match &function.inner.on_failure {
                Some(h) => h,
                None => &function.inner.handler,
            }
        } else {
            &function.inner.handler
        };
        let discovery = step_id == STEP_DISCOVERY;
        // Checkpoint only where the JS SDK would: a discovery call that may run steps, from a
        // server that sent both ids (§13.1).
        let checkpoint = match (ctx.fn_id, ctx.qi_id) {
            (Some(fn_id), Some(qi_id))
                if discovery
                    && !fn_id.is_empty()
                    && !ctx.disable_immediate_execution
                    && function.inner.config.checkpointing =>
            {
                Some(Checkpoint {
                    fn_id,
                    qi_id,
                    until: tokio::time::Instant::now() + self.options.checkpoint_max_runtime,
                })
            }
            _ => None,
        };
        let exec = Exec {
            target: (!discovery).then_some(step_id),
            disable_immediate_execution: ctx.disable_immediate_execution,
            attempt: ctx.attempt,
            max_attempts,
            step_not_found_after: self.options.step_not_found_timeout,
            checkpoint,
        };
        let input = Input {
            event,
            events,
            steps,
            stack,
            run_id: ctx.run_id,
        };
        let outcome = engine::execute(handler, &self.client, input, exec).await;
        outcome_reply(outcome)
    }
}

fn retry_after_secs(d: Duration) -> String {
    // Servers read whole seconds and clamp to at least one.
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1).to_string()
}

fn outcome_reply(outcome: Outcome) -> Reply {
    match outcome {
        Outcome::Complete(value) => Reply::json(StatusCode::OK, &value),
        Outcome::Failed(err) => {
            let retriable = err.is_retriable();
            let status = if retriable {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::BAD_REQUEST
            };
            let mut reply = Reply::json(status, &err.to_user_error())
                .header(headers::NO_RETRY, if retriable { "false" } else { "true" });
            if let Some(d) = err.retry_delay() {
                reply = reply.header(headers::RETRY_AFTER, retry_after_secs(d));
            }
            reply
        }
        Outcome::Ran {
            op,
            retry_after,
            no_retry,
        } => {
            let has_error = op.error.is_some();
            let mut reply = Reply::json(StatusCode::PARTIAL_CONTENT, &[op]);
            if has_error {
                reply = reply.header(headers::NO_RETRY, if no_retry { "true" } else { "false" });
            }
            if let Some(d) = retry_after {
                reply = reply.header(headers::RETRY_AFTER, retry_after_secs(d));
            }
            reply
        }
        Outcome::Planned(ops) => Reply::json(StatusCode::PARTIAL_CONTENT, &ops),
        Outcome::StepNotFound { requested, found } => Reply::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({
                "error": format!("Could not find step {requested:?} to run"),
                "requestedStep": requested,
                "totalFoundSteps": found.len(),
                "foundSteps": found,
            }),
        )
        .header(headers::NO_RETRY, "false"),
    }
}
