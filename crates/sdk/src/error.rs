//! The one error type of the SDK.
//!
//! Like `anyhow::Error`, [`Error`] deliberately does not implement `std::error::Error`: that
//! lets it convert from *every* standard error, so `?` works on I/O, serde, HTTP and user errors
//! inside handlers and step closures alike.

use std::fmt;
use std::time::Duration;

pub use cairn_protocol::UserError;

/// What went wrong in a function, a step, or the SDK itself.
///
/// The variant decides how the server is told about it:
///
/// | variant | in a step closure | returned by the function |
/// |---|---|---|
/// | [`Error::Failed`] | `StepError` (retried), `StepFailed` on the last attempt | 500, retried |
/// | [`Error::NonRetriable`] | `StepFailed` at once | 400, `X-Inngest-No-Retry: true` |
/// | [`Error::RetryAfter`] | `StepError` with `Retry-After` | 500 with `Retry-After` |
/// | [`Error::Step`] | — (it comes *out* of a step) | 400, not retried (the step already used its attempts) |
///
/// ```
/// use cairn_sdk::Error;
/// fn parse(n: &str) -> Result<u32, Error> {
///     Ok(n.parse::<u32>()?) // any std error converts
/// }
/// assert!(matches!(parse("x"), Err(Error::Failed(_))));
/// assert!(matches!(Error::non_retriable("bad input"), Error::NonRetriable(_)));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// An ordinary failure: retried while attempts remain.
    Failed(UserError),
    /// A failure that retrying cannot fix.
    NonRetriable(UserError),
    /// Retry, but not before this long.
    RetryAfter(Duration, UserError),
    /// A step failed for good (its memoised result is an error). User code can match on it,
    /// handle it and carry on, as with `StepError` in the TypeScript SDK.
    Step(StepError),
    /// A step or context handle was used after the request that owned its run was answered.
    /// The run is not lost: the server calls the app again and the function replays.
    RunFinished,
}

/// A step that failed on its last attempt (or with a non-retriable error).
#[derive(Debug, Clone, PartialEq)]
pub struct StepError {
    /// The step's id as the user wrote it (`"collect-data"`).
    pub step: String,
    /// The error the step reported, as memoised by the server.
    pub error: UserError,
}

impl Error {
    /// A retriable error with a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Error::Failed(UserError::new("Error", message.to_string()))
    }

    /// An error that stops the step or function without further retries.
    pub fn non_retriable(message: impl fmt::Display) -> Self {
        Error::NonRetriable(UserError::new("NonRetriableError", message.to_string()))
    }

    /// A retriable error that asks the server to wait `after` before the next attempt.
    pub fn retry_after(after: Duration, message: impl fmt::Display) -> Self {
        Error::RetryAfter(
            after,
            UserError::new("RetryAfterError", message.to_string()),
        )
    }

    /// Whether retrying could help.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            Error::Failed(_) | Error::RetryAfter(..) | Error::RunFinished
        )
    }

    /// The serialised form sent to the server (`{"name","message","stack"?,...}`).
    pub fn to_user_error(&self) -> UserError {
        let mut e = match self {
            Error::Failed(e) | Error::NonRetriable(e) | Error::RetryAfter(_, e) => e.clone(),
            Error::Step(s) => s.error.clone(),
            Error::RunFinished => UserError::new("RunFinished", RUN_FINISHED),
        };
        // The JS SDK marks errors it serialised; servers and UIs use it to pretty-print.
        e.extra
            .insert("__serialized".to_string(), serde_json::Value::Bool(true));
        e
    }

    /// The requested retry delay, if any.
    pub fn retry_delay(&self) -> Option<Duration> {
        match self {
            Error::RetryAfter(d, _) => Some(*d),
            _ => None,
        }
    }
}

const RUN_FINISHED: &str =
    "run finished: this step or context handle outlived the request that owned its run";

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Failed(e) | Error::NonRetriable(e) => write!(f, "{}: {}", e.name, e.message),
            Error::RetryAfter(d, e) => {
                write!(f, "{}: {} (retry after {:?})", e.name, e.message, d)
            }
            Error::Step(s) => write!(f, "step {:?} failed: {}", s.step, s.error.message),
            Error::RunFinished => f.write_str(RUN_FINISHED),
        }
    }
}

impl<E> From<E> for Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(err: E) -> Self {
        // Keep the source chain in `stack`: Rust has no stack traces worth sending, but the
        // chain is what a person reading the run in a UI needs.
        let mut chain = Vec::new();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push(format!("caused by: {s}"));
            source = s.source();
        }
        let mut e = UserError::new("Error", err.to_string());
        if !chain.is_empty() {
            e.stack = Some(chain.join("\n"));
        }
        Error::Failed(e)
    }
}
