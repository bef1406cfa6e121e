//! Events as they travel to `POST /e/{key}` and inside call requests (§10.1, §6.2).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One event.
///
/// Incoming events may omit everything but `name`; the server fills `id`, `ts` and
/// `user` before storing, so stored and forwarded events always carry them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub name: String,
    #[serde(default = "empty_object")]
    pub data: Value,
    #[serde(default = "empty_object")]
    pub user: Value,
    /// User-given idempotency id, or the server-assigned ULID.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Milliseconds since the Unix epoch. Python's SDK rejects floats, so this stays an integer.
    #[serde(default)]
    pub ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Value>,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

impl Event {
    /// A new event with the given name and data; `id`, `ts` and `user` are left for the sender to fill.
    ///
    /// ```
    /// let e = cairn_protocol::Event::new("demo/seed", serde_json::json!({"n": 1}));
    /// assert_eq!(e.name, "demo/seed");
    /// ```
    pub fn new(name: impl Into<String>, data: Value) -> Self {
        Event {
            name: name.into(),
            data,
            user: empty_object(),
            id: String::new(),
            ts: 0,
            v: None,
            meta: None,
        }
    }
}

/// Reserved names start with this prefix; the event API refuses them from users (§10.2).
pub const RESERVED_PREFIX: &str = "inngest/";

/// Names of the server's own events (§10.2).
pub mod names {
    pub const FUNCTION_FAILED: &str = "inngest/function.failed";
    pub const FUNCTION_FINISHED: &str = "inngest/function.finished";
    pub const FUNCTION_CANCELLED: &str = "inngest/function.cancelled";
    pub const FUNCTION_INVOKED: &str = "inngest/function.invoked";
    pub const SCHEDULED_TIMER: &str = "inngest/scheduled.timer";
}

/// The body of `POST /e/{key}`: one event or an array of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EventBatch {
    Many(Vec<Value>),
    One(Value),
}

impl EventBatch {
    /// The events as raw JSON values, in order; validation is the receiver's job.
    pub fn into_values(self) -> Vec<Value> {
        match self {
            EventBatch::Many(v) => v,
            EventBatch::One(v) => vec![v],
        }
    }
}

/// The reply of `POST /e/{key}` (§10.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendEventsReply {
    #[serde(default)]
    pub ids: Vec<String>,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
