//! The client: who the app is, where the server is, and which keys it holds.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use cairn_protocol::headers;
use cairn_protocol::signature::hash_signing_key;
use serde_json::Value;

use crate::event::{IntoEvents, SendEventResult};
use crate::function::FunctionBuilder;
use crate::Error;

/// The SDK's name and version as sent in `X-Inngest-SDK` and `User-Agent`.
pub const SDK_HEADER: &str = concat!("inngest-rs:v", env!("CARGO_PKG_VERSION"));
/// The SDK's language tag (`sdk_language`) in sync bodies.
pub const SDK_LANGUAGE: &str = "rs";
/// The SDK's version.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

const DEV_ORIGIN: &str = "http://localhost:8288";
const CLOUD_API_ORIGIN: &str = "https://api.inngest.com";
const CLOUD_EVENT_ORIGIN: &str = "https://inn.gs";
/// The dev server accepts any event key; the official SDKs send this one.
const DEV_EVENT_KEY: &str = "NO_EVENT_KEY_SET";
const SEND_ATTEMPTS: u32 = 5;

/// Whether requests must be signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Local development against a dev server: no signatures are checked.
    Dev,
    /// Production: every call must carry a valid `X-Inngest-Signature`.
    Cloud,
}

impl Mode {
    /// `"dev"` or `"cloud"`, as in introspection.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Dev => "dev",
            Mode::Cloud => "cloud",
        }
    }
}

/// Why a client could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cloud mode needs a signing key: set INNGEST_SIGNING_KEY, or INNGEST_DEV=1 for local development")]
    MissingSigningKey,
    #[error("the app id must not be empty")]
    EmptyAppId,
    #[error("invalid URL {0:?}")]
    InvalidUrl(String),
}

/// An app's connection to Cairn or Inngest. Cheap to clone.
///
/// ```
/// use cairn_sdk::{Client, Mode};
/// let client = Client::builder("my-app").dev(true).build().unwrap();
/// assert_eq!(client.mode(), Mode::Dev);
/// assert_eq!(client.api_origin(), "http://localhost:8288");
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
}

pub(crate) struct ClientInner {
    pub(crate) app_id: String,
    pub(crate) mode: Mode,
    pub(crate) api_origin: String,
    pub(crate) event_origin: String,
    pub(crate) signing_key: Option<String>,
    pub(crate) signing_key_fallback: Option<String>,
    pub(crate) event_key: Option<String>,
    pub(crate) serve_origin: Option<String>,
    pub(crate) serve_path: Option<String>,
    pub(crate) env: Option<String>,
    pub(crate) http: reqwest::Client,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        f.debug_struct("Client")
            .field("app_id", &self.inner.app_id)
            .field("mode", &self.inner.mode)
            .field("api_origin", &self.inner.api_origin)
            .field("event_origin", &self.inner.event_origin)
            .finish_non_exhaustive()
    }
}

/// Configures a [`Client`]. Start from [`Client::builder`] (nothing from the environment)
/// or [`ClientBuilder::from_env`] (the official SDKs' `INNGEST_*` variables).
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    app_id: String,
    dev: Option<bool>,
    base_url: Option<String>,
    api_base_url: Option<String>,
    event_api_base_url: Option<String>,
    signing_key: Option<String>,
    signing_key_fallback: Option<String>,
    event_key: Option<String>,
    serve_origin: Option<String>,
    serve_path: Option<String>,
    env: Option<String>,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl ClientBuilder {
    /// A builder seeded from `INNGEST_DEV`, `INNGEST_BASE_URL`, `INNGEST_API_BASE_URL`,
    /// `INNGEST_EVENT_API_BASE_URL`, `INNGEST_SIGNING_KEY`, `INNGEST_SIGNING_KEY_FALLBACK`,
    /// `INNGEST_EVENT_KEY`, `INNGEST_SERVE_ORIGIN`, `INNGEST_SERVE_PATH` and `INNGEST_ENV`.
    ///
    /// `INNGEST_DEV` may be `1`/`true` (dev mode), `0`/`false` (cloud mode) or a URL (dev mode
    /// against that server). Without it the mode is cloud, as in the v4 JS SDK.
    pub fn from_env(app_id: impl Into<String>) -> Self {
        let mut b = ClientBuilder {
            app_id: app_id.into(),
            ..Default::default()
        };
        if let Some(dev) = env_var("INNGEST_DEV") {
            let lower = dev.trim().to_ascii_lowercase();
            if lower.starts_with("http://") || lower.starts_with("https://") {
                b.dev = Some(true);
                b.base_url = Some(dev.trim().to_string());
            } else {
                b.dev = Some(!matches!(lower.as_str(), "0" | "false" | "no" | "off"));
            }
        }
        if let Some(url) = env_var("INNGEST_BASE_URL") {
            b.base_url = Some(url);
        }
        b.api_base_url = env_var("INNGEST_API_BASE_URL");
        b.event_api_base_url = env_var("INNGEST_EVENT_API_BASE_URL");
        b.signing_key = env_var("INNGEST_SIGNING_KEY");
        b.signing_key_fallback = env_var("INNGEST_SIGNING_KEY_FALLBACK");
        b.event_key = env_var("INNGEST_EVENT_KEY");
        b.serve_origin = env_var("INNGEST_SERVE_ORIGIN");
        b.serve_path = env_var("INNGEST_SERVE_PATH");
        b.env = env_var("INNGEST_ENV");
        b
    }

    /// Dev mode (no signatures) or cloud mode.
    pub fn dev(mut self, dev: bool) -> Self {
        self.dev = Some(dev);
        self
    }
    /// One origin for both the API and the event API, e.g. `http://localhost:8288`.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }
    /// The API origin (`/fn/register`, `/v0/runs/…`), overriding [`Self::base_url`].
    pub fn api_base_url(mut self, url: impl Into<String>) -> Self {
        self.api_base_url = Some(url.into());
        self
    }
    /// The event API origin (`/e/{key}`), overriding [`Self::base_url`].
    pub fn event_api_base_url(mut self, url: impl Into<String>) -> Self {
        self.event_api_base_url = Some(url.into());
        self
    }
    pub fn signing_key(mut self, key: impl Into<String>) -> Self {
        self.signing_key = Some(key.into());
        self
    }
    pub fn signing_key_fallback(mut self, key: impl Into<String>) -> Self {
        self.signing_key_fallback = Some(key.into());
        self
    }
    pub fn event_key(mut self, key: impl Into<String>) -> Self {
        self.event_key = Some(key.into());
        self
    }
    /// The origin the server should call this app on, e.g. `https://app.example.com`.
    pub fn serve_origin(mut self, origin: impl Into<String>) -> Self {
        self.serve_origin = Some(origin.into());
        self
    }
    /// The path the handler is mounted on, e.g. `/api/inngest`.
    pub fn serve_path(mut self, path: impl Into<String>) -> Self {
        self.serve_path = Some(path.into());
        self
    }
    /// The environment (branch) name sent as `X-Inngest-Env`.
    pub fn env(mut self, env: impl Into<String>) -> Self {
        self.env = Some(env.into());
        self
    }

    /// Builds the client. Cloud mode without a signing key is refused: it could never
    /// accept a call.
    pub fn build(self) -> Result<Client, ConfigError> {
        if self.app_id.trim().is_empty() {
            return Err(ConfigError::EmptyAppId);
        }
        let mode = if self.dev.unwrap_or(false) {
            Mode::Dev
        } else {
            Mode::Cloud
        };
        if mode == Mode::Cloud && self.signing_key.is_none() {
            return Err(ConfigError::MissingSigningKey);
        }
        let (default_api, default_event) = match mode {
            Mode::Dev => (DEV_ORIGIN, DEV_ORIGIN),
            Mode::Cloud => (CLOUD_API_ORIGIN, CLOUD_EVENT_ORIGIN),
        };
        let origin = |specific: Option<String>, default: &str| -> Result<String, ConfigError> {
            let url = specific
                .or_else(|| self.base_url.clone())
                .unwrap_or_else(|| default.to_string());
            let trimmed = url.trim().trim_end_matches('/').to_string();
            if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
                return Err(ConfigError::InvalidUrl(url));
            }
            Ok(trimmed)
        };
        let api_origin = origin(self.api_base_url.clone(), default_api)?;
        let event_origin = origin(self.event_api_base_url.clone(), default_event)?;
        let http = reqwest::Client::builder()
            .user_agent(SDK_HEADER)
            .build()
            .map_err(|_| ConfigError::InvalidUrl(api_origin.clone()))?;
        Ok(Client {
            inner: Arc::new(ClientInner {
                app_id: self.app_id,
                mode,
                api_origin,
                event_origin,
                signing_key: self.signing_key,
                signing_key_fallback: self.signing_key_fallback,
                event_key: self.event_key,
                serve_origin: self.serve_origin,
                serve_path: self.serve_path,
                env: self.env,
                http,
            }),
        })
    }
}

impl Client {
    /// A builder that reads nothing from the environment.
    pub fn builder(app_id: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            app_id: app_id.into(),
            ..Default::default()
        }
    }

    /// A client configured from the `INNGEST_*` environment variables (see
    /// [`ClientBuilder::from_env`]).
    pub fn from_env(app_id: impl Into<String>) -> Result<Client, ConfigError> {
        ClientBuilder::from_env(app_id).build()
    }

    /// Starts defining a function of this app. `id` is the function's id within the app;
    /// the server knows it as `<app id>-<id>`.
    pub fn function(&self, id: impl Into<String>) -> FunctionBuilder {
        FunctionBuilder::new(&self.inner.app_id, id.into())
    }

    pub fn app_id(&self) -> &str {
        &self.inner.app_id
    }
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }
    pub fn api_origin(&self) -> &str {
        &self.inner.api_origin
    }
    pub fn event_origin(&self) -> &str {
        &self.inner.event_origin
    }

    /// Sends one event or many to `POST {event origin}/e/{event key}`.
    ///
    /// Retried up to five times on network errors and 5xx answers. Every attempt carries the
    /// same `X-Inngest-Event-Id-Seed`, so the server gives a retried batch the same ids and
    /// does not store it twice.
    pub async fn send(&self, events: impl IntoEvents) -> Result<SendEventResult, Error> {
        let events = events.into_events()?;
        self.send_values(events).await
    }

    pub(crate) async fn send_values(
        &self,
        mut events: Vec<Value>,
    ) -> Result<SendEventResult, Error> {
        let key = match (&self.inner.event_key, self.inner.mode) {
            (Some(k), _) => k.clone(),
            (None, Mode::Dev) => DEV_EVENT_KEY.to_string(),
            (None, Mode::Cloud) => {
                return Err(Error::non_retriable(
                    "cannot send events: INNGEST_EVENT_KEY is not set",
                ))
            }
        };
        let now = now_ms();
        for e in &mut events {
            if let Value::Object(map) = e {
                map.entry("ts").or_insert(Value::from(now));
                map.entry("data")
                    .or_insert_with(|| Value::Object(Default::default()));
                if map.get("data").is_some_and(Value::is_null) {
                    map.insert("data".into(), Value::Object(Default::default()));
                }
            }
        }
        let seed = format!(
            "{now},{}",
            base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 10]>())
        );
        let url = format!("{}/e/{}", self.inner.event_origin, key);
        let body = serde_json::to_vec(&events)?;
        let mut last_err = Error::msg("event API was not reached");
        for attempt in 0..SEND_ATTEMPTS {
            if attempt > 0 {
                let jitter = rand::random::<u64>() % 50;
                tokio::time::sleep(Duration::from_millis((100 << (attempt - 1)) + jitter)).await;
            }
            let res = self
                .with_sdk_headers(self.inner.http.post(&url))
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(headers::EVENT_ID_SEED, &seed)
                .body(body.clone())
                .send()
                .await;
            let res = match res {
                Ok(r) => r,
                Err(e) => {
                    last_err = Error::msg(format!("sending events: {e}"));
                    continue;
                }
            };
            let status = res.status();
            let text = res.text().await.unwrap_or_default();
            let reply: Option<cairn_protocol::SendEventsReply> = serde_json::from_str(&text).ok();
            let failed = reply.as_ref().and_then(|r| r.error.clone());
            if status.is_success() && failed.is_none() {
                let ids = reply.map(|r| r.ids).unwrap_or_default();
                return Ok(SendEventResult { ids });
            }
            let message = failed.unwrap_or(text);
            last_err = Error::msg(format!("event API answered {status}: {message}"));
            if status.is_client_error() && status != http::StatusCode::TOO_MANY_REQUESTS {
                // Bad key or bad event: the same bytes will fail the same way.
                return Err(last_err);
            }
        }
        Err(last_err)
    }

    /// Adds the headers every SDK request carries.
    pub(crate) fn with_sdk_headers(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let req = req.header(headers::SDK, SDK_HEADER);
        match &self.inner.env {
            Some(env) => req.header(headers::ENV, env),
            None => req,
        }
    }

    /// Sends an authenticated API request, retrying once with the fallback key on 401/403.
    pub(crate) async fn api_request(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let keys = [&self.inner.signing_key, &self.inner.signing_key_fallback];
        let mut last = None;
        for key in keys.into_iter().flatten() {
            let req = self.with_sdk_headers(build(&self.inner.http));
            let req = match hash_signing_key(key) {
                Some(hashed) => req.bearer_auth(hashed),
                None => req.bearer_auth(key),
            };
            let res = req.send().await?;
            let s = res.status();
            if s == http::StatusCode::UNAUTHORIZED || s == http::StatusCode::FORBIDDEN {
                last = Some(res);
                continue;
            }
            return Ok(res);
        }
        match last {
            Some(res) => Ok(res),
            // No key at all (dev mode): a key-less dev server needs none.
            None => self.with_sdk_headers(build(&self.inner.http)).send().await,
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn now_secs() -> i64 {
    now_ms() / 1000
}
