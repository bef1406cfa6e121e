//! Flow control (concurrency, throttle, rate limit, debounce, batching,
//! priority, idempotency, singleton). Not implemented yet: this is the hook
//! point where run creation asks whether and when a run may start.

use crate::registry::FunctionEntry;
use serde_json::Value;

/// What flow control decides for a would-be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Start now.
    Start,
    /// Drop the run (rate limit, singleton skip, idempotency).
    Skip(String),
}

/// Decide whether `event` may start a run of `function`. Everything is admitted
/// until flow control lands.
pub fn admit(_function: &FunctionEntry, _event: &Value) -> Admission {
    Admission::Start
}
