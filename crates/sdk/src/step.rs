//! Step tools: the durable building blocks of a function.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use pin_project_lite::pin_project;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::engine::{Registration, RunCell, SlotPoll, StepKind};
use crate::event::{IntoEvents, SendEventResult};
use crate::function::FunctionRef;
use crate::{Error, Event};

/// The step tools of one run: a cheap, cloneable, *weak* handle.
///
/// Each tool takes an id that names the step durably: the server memoises the step's result
/// under it, and on the next call the step returns that result instead of running again.
/// Using the same id several times (in a loop) is fine: the n-th use becomes `id:n`.
///
/// Steps written together run in parallel: `futures::join!(step.run("a", ..), step.run("b", ..))`
/// reports both to the server at once, which calls back for each.
///
/// A `Step` does not keep its run alive. Used after the request that owned the run has been
/// answered (say, from a task it was moved into), every tool returns [`Error::RunFinished`].
#[derive(Clone)]
pub struct Step {
    run: Weak<RunCell>,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("live", &(self.run.strong_count() > 0))
            .finish()
    }
}

impl Step {
    pub(crate) fn new(run: Weak<RunCell>) -> Self {
        Step { run }
    }

    /// Whether the request that owns this run is still being answered.
    pub fn is_live(&self) -> bool {
        self.run.upgrade().is_some_and(|cell| cell.lock().is_some())
    }

    fn register(&self, id: &str, kind: StepKind) -> Result<Registration, Error> {
        let cell = self.run.upgrade().ok_or(Error::RunFinished)?;
        let mut guard = cell.lock();
        let st = guard.as_mut().ok_or(Error::RunFinished)?;
        let slot = st.register(id, kind);
        Ok(Registration {
            run: self.run.clone(),
            slot,
        })
    }

    /// Runs `f` once, durably: its result is memoised and returned on every later call.
    ///
    /// A failure (`Err`) is retried by the server while attempts remain; after the last one,
    /// or at once for [`Error::non_retriable`], the step fails for good and awaiting it returns
    /// [`Error::Step`].
    ///
    /// ```no_run
    /// # use cairn_sdk::{Ctx, Error};
    /// # async fn f(ctx: Ctx) -> Result<(), Error> {
    /// let step = ctx.step();
    /// let user: String = step.run("load-user", || async { Ok("ada".to_string()) }).await?;
    /// # Ok(()) }
    /// ```
    pub fn run<T, F, Fut>(&self, id: &str, f: F) -> RunStep<T, F, Fut>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
        T: Serialize + DeserializeOwned,
    {
        RunStep {
            reg: self.register(id, StepKind::Run).map_err(Some),
            f: Some(f),
            fut: None,
            _t: PhantomData,
        }
    }

    /// Pauses the run for `duration`; the server calls back afterwards.
    pub fn sleep(&self, id: &str, duration: Duration) -> AsyncStep<()> {
        let name = cairn_protocol::duration::format(duration);
        let opts = json!({ "duration": name });
        self.async_step(id, StepKind::Sleep { name, opts }, |_| Ok(()))
    }

    /// Pauses the run until `until` (in the past: not at all).
    pub fn sleep_until(&self, id: &str, until: DateTime<Utc>) -> AsyncStep<()> {
        // An absolute time travels in `name` only; servers parse long date-like names as instants.
        let name = until.to_rfc3339_opts(SecondsFormat::Millis, true);
        self.async_step(
            id,
            StepKind::Sleep {
                name,
                opts: json!({}),
            },
            |_| Ok(()),
        )
    }

    /// Waits for an event; `None` if the timeout passes first.
    ///
    /// ```no_run
    /// # use cairn_sdk::{Ctx, Error, Wait};
    /// # use std::time::Duration;
    /// # async fn f(ctx: Ctx) -> Result<(), Error> {
    /// let approval = ctx.step()
    ///     .wait_for_event::<serde_json::Value>(
    ///         "approve",
    ///         Wait::event("app/approved").matching("data.id").timeout(Duration::from_secs(3600)),
    ///     )
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn wait_for_event<T>(&self, id: &str, wait: Wait) -> AsyncStep<Option<Event<T>>>
    where
        T: DeserializeOwned,
    {
        let mut opts = serde_json::Map::new();
        opts.insert("event".into(), Value::String(wait.event.clone()));
        opts.insert("timeout".into(), Value::String(wait.timeout));
        if let Some(cond) = wait.condition {
            opts.insert("if".into(), Value::String(cond));
        }
        self.async_step(
            id,
            StepKind::WaitForEvent {
                event: wait.event,
                opts: Value::Object(opts),
            },
            |v| match v {
                Value::Null => Ok(None),
                v => serde_json::from_value(v).map(Some).map_err(|e| {
                    Error::non_retriable(format!("waited-for event does not match its type: {e}"))
                }),
            },
        )
    }

    /// Invokes another function with `data` and returns its output.
    pub fn invoke<T>(
        &self,
        id: &str,
        target: impl Into<FunctionRef>,
        data: impl Serialize,
    ) -> AsyncStep<T>
    where
        T: DeserializeOwned,
    {
        self.invoke_with(id, Invoke::new(target).data(data))
    }

    /// Invokes another function with full options (timeout, user).
    pub fn invoke_with<T>(&self, id: &str, invoke: Invoke) -> AsyncStep<T>
    where
        T: DeserializeOwned,
    {
        let mut payload = serde_json::Map::new();
        payload.insert("data".into(), invoke.data);
        if let Some(user) = invoke.user {
            payload.insert("user".into(), user);
        }
        let mut opts = serde_json::Map::new();
        opts.insert("function_id".into(), Value::String(invoke.target.0));
        opts.insert("payload".into(), Value::Object(payload));
        if let Some(t) = invoke.timeout {
            opts.insert("timeout".into(), Value::String(t));
        }
        self.async_step(
            id,
            StepKind::Invoke {
                opts: Value::Object(opts),
            },
            decode::<T>,
        )
    }

    /// Sends one event or many, durably (sent once, however often the function replays).
    pub fn send_event(&self, id: &str, events: impl IntoEvents) -> SendEventStep {
        let prepared = events.into_events();
        let client = self
            .run
            .upgrade()
            .and_then(|cell| cell.lock().as_ref().map(|st| st.client.clone()));
        let send: SendFn = Box::new(move || {
            async move {
                let client = client.ok_or(Error::RunFinished)?;
                client.send_values(prepared?).await
            }
            .boxed()
        });
        RunStep {
            reg: self.register(id, StepKind::SendEvent).map_err(Some),
            f: Some(send),
            fut: None,
            _t: PhantomData,
        }
    }

    fn async_step<T>(
        &self,
        id: &str,
        kind: StepKind,
        decode: fn(Value) -> Result<T, Error>,
    ) -> AsyncStep<T> {
        AsyncStep {
            reg: self.register(id, kind).map_err(Some),
            decode,
        }
    }
}

fn decode<T: DeserializeOwned>(v: Value) -> Result<T, Error> {
    // A memo that no longer fits the type means the code changed under a running run;
    // retrying cannot fix that.
    serde_json::from_value(v).map_err(|e| {
        Error::non_retriable(format!("memoised step output does not match its type: {e}"))
    })
}

type SendFn = Box<dyn FnOnce() -> BoxFuture<'static, Result<SendEventResult, Error>> + Send>;

/// The future of [`Step::send_event`].
pub type SendEventStep =
    RunStep<SendEventResult, SendFn, BoxFuture<'static, Result<SendEventResult, Error>>>;

pin_project! {
    /// The future of [`Step::run`]: resolves to the step's (possibly memoised) output.
    #[must_use = "steps do nothing unless awaited"]
    pub struct RunStep<T, F, Fut> {
        reg: Result<Registration, Option<Error>>,
        f: Option<F>,
        #[pin]
        fut: Option<Fut>,
        _t: PhantomData<fn() -> T>,
    }
}

impl<T, F, Fut> Future for RunStep<T, F, Fut>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
    T: Serialize + DeserializeOwned,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let reg = match this.reg {
            Ok(reg) => reg,
            Err(e) => return Poll::Ready(Err(e.take().unwrap_or(Error::RunFinished))),
        };
        loop {
            if let Some(fut) = this.fut.as_mut().as_pin_mut() {
                let Poll::Ready(result) = fut.poll(cx) else {
                    return Poll::Pending;
                };
                this.fut.set(None);
                let value = result.and_then(|out| serde_json::to_value(out).map_err(Error::from));
                reg.complete(value);
                // The engine either answers the request with this result (and drops the
                // handler) or checkpoints it and releases it to this slot: wait for that.
                continue;
            }
            match reg.poll_slot(cx) {
                SlotPoll::Ready(result) => return Poll::Ready(result.and_then(decode::<T>)),
                SlotPoll::Execute => match this.f.take() {
                    Some(f) => this.fut.set(Some(f())),
                    None => {
                        reg.complete(Err(Error::msg("step closure already consumed")));
                        return Poll::Pending;
                    }
                },
                SlotPoll::Pending => return Poll::Pending,
                SlotPoll::Finished => return Poll::Ready(Err(Error::RunFinished)),
            }
        }
    }
}

/// The future of a step the server carries out (sleep, wait, invoke).
#[must_use = "steps do nothing unless awaited"]
pub struct AsyncStep<T> {
    reg: Result<Registration, Option<Error>>,
    decode: fn(Value) -> Result<T, Error>,
}

impl<T> Future for AsyncStep<T> {
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let reg = match &mut this.reg {
            Ok(reg) => reg,
            Err(e) => return Poll::Ready(Err(e.take().unwrap_or(Error::RunFinished))),
        };
        match reg.poll_slot(cx) {
            SlotPoll::Ready(result) => Poll::Ready(result.and_then(this.decode)),
            // The engine never asks the SDK to execute these.
            SlotPoll::Execute | SlotPoll::Pending => Poll::Pending,
            SlotPoll::Finished => Poll::Ready(Err(Error::RunFinished)),
        }
    }
}

/// What [`Step::wait_for_event`] waits for.
#[derive(Debug, Clone)]
pub struct Wait {
    event: String,
    timeout: String,
    condition: Option<String>,
}

impl Wait {
    /// Wait for an event with this name. The timeout defaults to 365 days (the longest a
    /// server keeps a wait); set a real one with [`Wait::timeout`].
    pub fn event(name: impl Into<String>) -> Self {
        Wait {
            event: name.into(),
            timeout: "365d".to_string(),
            condition: None,
        }
    }
    /// Give up after this long.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = cairn_protocol::duration::format(timeout);
        self
    }
    /// Give up at this instant.
    pub fn timeout_at(mut self, at: DateTime<Utc>) -> Self {
        self.timeout = at.to_rfc3339_opts(SecondsFormat::Secs, true);
        self
    }
    /// Only an event whose `field` equals the trigger's (`"data.order_id"`).
    pub fn matching(mut self, field: &str) -> Self {
        self.condition = Some(format!("event.{field} == async.{field}"));
        self
    }
    /// Only an event for which this CEL expression holds (`event` is the run's trigger,
    /// `async` the candidate).
    pub fn when(mut self, expr: impl Into<String>) -> Self {
        self.condition = Some(expr.into());
        self
    }
}

/// What [`Step::invoke_with`] invokes.
#[derive(Debug, Clone)]
pub struct Invoke {
    target: FunctionRef,
    data: Value,
    user: Option<Value>,
    timeout: Option<String>,
}

impl Invoke {
    pub fn new(target: impl Into<FunctionRef>) -> Self {
        Invoke {
            target: target.into(),
            data: Value::Object(Default::default()),
            user: None,
            timeout: None,
        }
    }
    /// The invoked run's `event.data`. Unserialisable data becomes `null`.
    pub fn data(mut self, data: impl Serialize) -> Self {
        self.data = serde_json::to_value(data).unwrap_or(Value::Null);
        self
    }
    pub fn user(mut self, user: impl Serialize) -> Self {
        self.user = serde_json::to_value(user).ok();
        self
    }
    /// Fail the step if the invoked function has not finished within this long.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(cairn_protocol::duration::format(timeout));
        self
    }
}
