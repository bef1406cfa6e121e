//! Function definitions: triggers, flow control and the handler.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cairn_protocol::duration::format as dur;
use cairn_protocol::function as proto;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::ctx::{Ctx, RawInput};
use crate::event::FunctionFailed;
use crate::Error;

pub(crate) type ErasedHandler =
    Arc<dyn Fn(RawInput) -> BoxFuture<'static, Result<Value, Error>> + Send + Sync>;

/// A function ready to be served. Cheap to clone.
#[derive(Clone)]
pub struct Function {
    pub(crate) inner: Arc<FunctionInner>,
}

pub(crate) struct FunctionInner {
    pub(crate) slug: String,
    pub(crate) config: Config,
    pub(crate) handler: ErasedHandler,
    pub(crate) on_failure: Option<ErasedHandler>,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("slug", &self.inner.slug)
            .finish_non_exhaustive()
    }
}

impl Function {
    /// The composite id the server knows this function by: `<app id>-<function id>`.
    pub fn slug(&self) -> &str {
        &self.inner.slug
    }

    /// The slug of the on-failure handler, if there is one (`<slug>-failure`).
    pub fn failure_slug(&self) -> Option<String> {
        self.inner
            .on_failure
            .as_ref()
            .map(|_| format!("{}-failure", self.inner.slug))
    }

    /// The wire configuration (§4.4) of this function and its failure handler, with the
    /// handler reachable at `url`.
    pub fn configs(&self, url: &str) -> Vec<proto::FunctionConfig> {
        let c = &self.inner.config;
        let slug = &self.inner.slug;
        let steps = |fn_slug: &str, retries: Option<u32>| {
            let sep = if url.contains('?') { '&' } else { '?' };
            let mut m = BTreeMap::new();
            m.insert(
                "step".to_string(),
                proto::StepConfig {
                    id: "step".into(),
                    name: "step".into(),
                    runtime: proto::Runtime {
                        kind: "http".into(),
                        url: Some(format!("{url}{sep}fnId={fn_slug}&stepId=step")),
                    },
                    retries: retries.map(|attempts| proto::Retries { attempts }),
                },
            );
            m
        };
        let main = proto::FunctionConfig {
            id: slug.clone(),
            name: c.name.clone().unwrap_or_else(|| c.id.clone()),
            triggers: c.triggers.clone(),
            steps: steps(slug, c.retries),
            concurrency: match c.concurrency.len() {
                0 => None,
                _ => Some(proto::Concurrency::Many(c.concurrency.clone())),
            },
            throttle: c.throttle.clone(),
            rate_limit: c.rate_limit.clone(),
            debounce: c.debounce.clone(),
            batch_events: c.batch_events.clone(),
            priority: c.priority.clone(),
            idempotency: c.idempotency.clone(),
            cancel: c.cancel.clone(),
            timeouts: c.timeouts.clone(),
            singleton: c.singleton.clone(),
            retries: None,
        };
        let mut out = vec![main];
        if let Some(failure_slug) = self.failure_slug() {
            out.push(proto::FunctionConfig {
                id: failure_slug.clone(),
                name: format!("{} (failure)", c.name.as_deref().unwrap_or(&c.id)),
                triggers: vec![proto::Trigger::Event {
                    event: cairn_protocol::event::names::FUNCTION_FAILED.to_string(),
                    expression: Some(format!("event.data.function_id == '{slug}'")),
                }],
                // As the JS SDK does: one retry for a failure handler.
                steps: steps(&failure_slug, Some(1)),
                concurrency: None,
                throttle: None,
                rate_limit: None,
                debounce: None,
                batch_events: None,
                priority: None,
                idempotency: None,
                cancel: Vec::new(),
                timeouts: None,
                singleton: None,
                retries: None,
            });
        }
        out
    }
}

/// A reference to a function to invoke: by [`Function`] or by its slug (`<app>-<id>`), which
/// can name a function of another app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionRef(pub String);

impl FunctionRef {
    pub fn new(slug: impl Into<String>) -> Self {
        FunctionRef(slug.into())
    }
}
impl From<&Function> for FunctionRef {
    fn from(f: &Function) -> Self {
        FunctionRef(f.slug().to_string())
    }
}
impl From<&str> for FunctionRef {
    fn from(s: &str) -> Self {
        FunctionRef(s.to_string())
    }
}
impl From<String> for FunctionRef {
    fn from(s: String) -> Self {
        FunctionRef(s)
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Config {
    pub(crate) id: String,
    pub(crate) name: Option<String>,
    pub(crate) triggers: Vec<proto::Trigger>,
    pub(crate) retries: Option<u32>,
    pub(crate) concurrency: Vec<proto::ConcurrencyLimit>,
    pub(crate) throttle: Option<proto::Throttle>,
    pub(crate) rate_limit: Option<proto::RateLimit>,
    pub(crate) debounce: Option<proto::Debounce>,
    pub(crate) batch_events: Option<proto::BatchEvents>,
    pub(crate) priority: Option<proto::Priority>,
    pub(crate) idempotency: Option<String>,
    pub(crate) cancel: Vec<proto::Cancel>,
    pub(crate) timeouts: Option<proto::Timeouts>,
    pub(crate) singleton: Option<proto::Singleton>,
    /// Save steps as they run within one call instead of one call per step (§13).
    pub(crate) checkpointing: bool,
}

/// Where a concurrency limit applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Per function (the default).
    Fn,
    /// Across the environment; needs a key.
    Env,
    /// Across the account; needs a key.
    Account,
}

/// A concurrency limit: at most `limit` steps running at once, per `key` if given.
#[derive(Debug, Clone)]
pub struct Concurrency(proto::ConcurrencyLimit);

impl Concurrency {
    pub fn new(limit: u32) -> Self {
        Concurrency(proto::ConcurrencyLimit {
            limit,
            key: None,
            scope: None,
        })
    }
    /// A CEL expression; each value gets its own limit.
    pub fn key(mut self, expr: impl Into<String>) -> Self {
        self.0.key = Some(expr.into());
        self
    }
    pub fn scope(mut self, scope: Scope) -> Self {
        self.0.scope = Some(
            match scope {
                Scope::Fn => "fn",
                Scope::Env => "env",
                Scope::Account => "account",
            }
            .to_string(),
        );
        self
    }
}

/// Start at most `limit` runs per `period` (excess runs wait).
#[derive(Debug, Clone)]
pub struct Throttle(proto::Throttle);

impl Throttle {
    pub fn new(limit: u32, period: Duration) -> Self {
        Throttle(proto::Throttle {
            limit,
            period: dur(period),
            burst: None,
            key: None,
        })
    }
    pub fn burst(mut self, burst: u32) -> Self {
        self.0.burst = Some(burst);
        self
    }
    pub fn key(mut self, expr: impl Into<String>) -> Self {
        self.0.key = Some(expr.into());
        self
    }
}

/// Start at most `limit` runs per `period` (excess runs are dropped).
#[derive(Debug, Clone)]
pub struct RateLimit(proto::RateLimit);

impl RateLimit {
    pub fn new(limit: u32, period: Duration) -> Self {
        RateLimit(proto::RateLimit {
            limit,
            period: dur(period),
            key: None,
        })
    }
    pub fn key(mut self, expr: impl Into<String>) -> Self {
        self.0.key = Some(expr.into());
        self
    }
}

/// Wait until events stop arriving for `period`, then run once with the last one.
#[derive(Debug, Clone)]
pub struct Debounce(proto::Debounce);

impl Debounce {
    pub fn new(period: Duration) -> Self {
        Debounce(proto::Debounce {
            period: dur(period),
            key: None,
            timeout: None,
        })
    }
    pub fn key(mut self, expr: impl Into<String>) -> Self {
        self.0.key = Some(expr.into());
        self
    }
    /// Run anyway once this long has passed since the first event.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.0.timeout = Some(dur(timeout));
        self
    }
}

/// Run once per batch of up to `max_size` events, or after `timeout`.
#[derive(Debug, Clone)]
pub struct Batch(proto::BatchEvents);

impl Batch {
    pub fn new(max_size: u32, timeout: Duration) -> Self {
        Batch(proto::BatchEvents {
            max_size,
            timeout: dur(timeout),
            key: None,
            condition: None,
        })
    }
    pub fn key(mut self, expr: impl Into<String>) -> Self {
        self.0.key = Some(expr.into());
        self
    }
    /// Only batch events for which this CEL expression holds.
    pub fn when(mut self, expr: impl Into<String>) -> Self {
        self.0.condition = Some(expr.into());
        self
    }
}

/// Cancel a running run when an event arrives.
#[derive(Debug, Clone)]
pub struct CancelOn(proto::Cancel);

impl CancelOn {
    pub fn event(name: impl Into<String>) -> Self {
        CancelOn(proto::Cancel {
            event: name.into(),
            condition: None,
            timeout: None,
        })
    }
    /// A CEL condition over `event` (the run's trigger) and `async` (the incoming event).
    pub fn when(mut self, expr: impl Into<String>) -> Self {
        self.0.condition = Some(expr.into());
        self
    }
    /// Cancel when the incoming event's `field` equals the trigger's (e.g. `"data.id"`).
    pub fn matching(mut self, field: &str) -> Self {
        self.0.condition = Some(format!("event.{field} == async.{field}"));
        self
    }
    /// Stop listening after this long.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.0.timeout = Some(dur(timeout));
        self
    }
}

/// What a singleton function does when a run for the same key is already going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingletonMode {
    /// Drop the new run.
    Skip,
    /// Cancel the running one and start the new run.
    Cancel,
}

/// Defines a function; finish with [`FunctionBuilder::handler`].
///
/// ```
/// use std::time::Duration;
/// use cairn_sdk::{Client, Concurrency, Ctx, Throttle};
/// use serde_json::{json, Value};
///
/// let client = Client::builder("shop").dev(true).build().unwrap();
/// let f = client
///     .function("send-receipt")
///     .name("Send receipt")
///     .event_if("shop/order.paid", "event.data.total > 0")
///     .retries(3)
///     .concurrency(Concurrency::new(5).key("event.data.customer"))
///     .throttle(Throttle::new(10, Duration::from_secs(60)))
///     .handler(|ctx: Ctx<Value>| async move { Ok(json!({"order": ctx.event.data["id"]})) });
/// assert_eq!(f.slug(), "shop-send-receipt");
/// let cfg = &f.configs("http://localhost:3000/api/inngest")[0];
/// assert_eq!(cfg.steps["step"].retries.unwrap().attempts, 3);
/// ```
#[must_use = "a function builder does nothing until .handler() is called"]
pub struct FunctionBuilder {
    app_id: String,
    config: Config,
    on_failure: Option<ErasedHandler>,
}

impl FunctionBuilder {
    pub(crate) fn new(app_id: &str, id: String) -> Self {
        FunctionBuilder {
            app_id: app_id.to_string(),
            config: Config {
                id,
                checkpointing: true,
                ..Default::default()
            },
            on_failure: None,
        }
    }

    /// The display name (defaults to the id).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }
    /// Run on every event with this name.
    pub fn event(mut self, name: impl Into<String>) -> Self {
        self.config.triggers.push(proto::Trigger::Event {
            event: name.into(),
            expression: None,
        });
        self
    }
    /// Run on events with this name for which the CEL expression holds (`event.data.x > 1`).
    pub fn event_if(mut self, name: impl Into<String>, expr: impl Into<String>) -> Self {
        self.config.triggers.push(proto::Trigger::Event {
            event: name.into(),
            expression: Some(expr.into()),
        });
        self
    }
    /// Run on a cron schedule (`"0 * * * *"`, optionally prefixed `TZ=Europe/Paris `).
    pub fn cron(mut self, schedule: impl Into<String>) -> Self {
        self.config.triggers.push(proto::Trigger::Cron {
            cron: schedule.into(),
            jitter: None,
        });
        self
    }
    /// Retries after the first attempt, per step (0–20; the server's default is 4).
    pub fn retries(mut self, retries: u32) -> Self {
        self.config.retries = Some(retries.min(proto::MAX_RETRIES));
        self
    }
    /// Adds a concurrency limit (a function may have two).
    pub fn concurrency(mut self, limit: Concurrency) -> Self {
        self.config.concurrency.push(limit.0);
        self
    }
    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.config.throttle = Some(throttle.0);
        self
    }
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.config.rate_limit = Some(limit.0);
        self
    }
    pub fn debounce(mut self, debounce: Debounce) -> Self {
        self.config.debounce = Some(debounce.0);
        self
    }
    pub fn batch_events(mut self, batch: Batch) -> Self {
        self.config.batch_events = Some(batch.0);
        self
    }
    /// A CEL expression giving seconds to move a run ahead (positive) or behind in the queue.
    pub fn priority(mut self, run_expr: impl Into<String>) -> Self {
        self.config.priority = Some(proto::Priority {
            run: Some(run_expr.into()),
        });
        self
    }
    /// A CEL expression; at most one run per value per 24 hours.
    pub fn idempotency(mut self, expr: impl Into<String>) -> Self {
        self.config.idempotency = Some(expr.into());
        self
    }
    /// Adds a cancellation rule.
    pub fn cancel_on(mut self, cancel: CancelOn) -> Self {
        self.config.cancel.push(cancel.0);
        self
    }
    /// Cancel a run that has not started within `start` or not finished within `finish`.
    pub fn timeouts(mut self, start: Option<Duration>, finish: Option<Duration>) -> Self {
        self.config.timeouts = Some(proto::Timeouts {
            start: start.map(dur),
            finish: finish.map(dur),
        });
        self
    }
    /// Whether a call may run several steps in a row, saving each to the server as it
    /// finishes (on by default, as in the JS SDK v4).
    ///
    /// Each step's result is stored before the code after it runs either way. Checkpointing
    /// only saves the server a round trip and the SDK a replay of the function per step. It
    /// applies when the server offers it (Cairn and Inngest do); off, every step that runs
    /// ends its call with a 206 answer.
    ///
    /// ```
    /// use cairn_sdk::{Client, Ctx};
    /// use serde_json::Value;
    ///
    /// let client = Client::builder("shop").dev(true).build().unwrap();
    /// let f = client
    ///     .function("one-step-per-call")
    ///     .event("shop/order.paid")
    ///     .checkpointing(false)
    ///     .handler(|_ctx: Ctx<Value>| async move { Ok(Value::Null) });
    /// assert_eq!(f.slug(), "shop-one-step-per-call");
    /// ```
    pub fn checkpointing(mut self, on: bool) -> Self {
        self.config.checkpointing = on;
        self
    }
    /// At most one run at a time per key (or per function without a key).
    pub fn singleton(mut self, key: Option<&str>, mode: SingletonMode) -> Self {
        self.config.singleton = Some(proto::Singleton {
            key: key.map(str::to_string),
            mode: match mode {
                SingletonMode::Skip => "skip",
                SingletonMode::Cancel => "cancel",
            }
            .to_string(),
        });
        self
    }

    /// A handler run once the function has failed for good. It is registered as its own
    /// function, `<slug>-failure`, triggered by `inngest/function.failed`.
    pub fn on_failure<H, Fut, R>(mut self, handler: H) -> Self
    where
        H: Fn(Ctx<FunctionFailed>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Error>> + Send + 'static,
        R: Serialize,
    {
        self.on_failure = Some(erase(handler));
        self
    }

    /// The function's body. It receives a [`Ctx`] whose event data is deserialised into `T`.
    pub fn handler<T, H, Fut, R>(self, handler: H) -> Function
    where
        T: DeserializeOwned + Send + 'static,
        H: Fn(Ctx<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Error>> + Send + 'static,
        R: Serialize,
    {
        let slug = format!("{}-{}", self.app_id, self.config.id);
        Function {
            inner: Arc::new(FunctionInner {
                slug,
                config: self.config,
                handler: erase(handler),
                on_failure: self.on_failure,
            }),
        }
    }
}

fn erase<T, H, Fut, R>(handler: H) -> ErasedHandler
where
    T: DeserializeOwned + Send + 'static,
    H: Fn(Ctx<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, Error>> + Send + 'static,
    R: Serialize,
{
    Arc::new(move |raw: RawInput| match Ctx::<T>::from_raw(raw) {
        Ok(ctx) => handler(ctx)
            .map(|res| res.and_then(|v| serde_json::to_value(v).map_err(Error::from)))
            .boxed(),
        Err(e) => futures::future::ready(Err(e)).boxed(),
    })
}
