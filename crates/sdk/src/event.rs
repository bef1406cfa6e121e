//! Events, typed by their `data`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

/// An event: something that happened, with a name and typed `data`.
///
/// The same type is used for events you send, the event that triggered a run
/// ([`crate::Ctx::event`]) and events returned by [`crate::Step::wait_for_event`].
///
/// ```
/// use cairn_sdk::Event;
/// use serde_json::json;
/// let e = Event::new("app/user.signup", json!({"id": 7})).id("signup-7");
/// assert_eq!(e.name, "app/user.signup");
/// assert_eq!(e.id.as_deref(), Some("signup-7"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event<T = Value> {
    pub name: String,
    pub data: T,
    /// Idempotency id when sending; the stored event's id when received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Milliseconds since the Unix epoch. Filled with "now" when sent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<String>,
}

impl<T> Event<T> {
    /// A new event to send.
    pub fn new(name: impl Into<String>, data: T) -> Self {
        Event {
            name: name.into(),
            data,
            id: None,
            ts: None,
            user: None,
            v: None,
        }
    }

    /// Sets an idempotency id: the server starts each function at most once per id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the timestamp (Unix milliseconds).
    pub fn ts(mut self, ts: i64) -> Self {
        self.ts = Some(ts);
        self
    }
}

impl<T: DeserializeOwned> Event<T> {
    /// Reads a wire event, typing its data. A mismatch is not worth retrying.
    pub(crate) fn from_wire(e: cairn_protocol::Event) -> Result<Self, Error> {
        let data = serde_json::from_value(e.data).map_err(|err| {
            Error::non_retriable(format!(
                "event {:?}: data does not match the handler's type: {err}",
                e.name
            ))
        })?;
        Ok(Event {
            name: e.name,
            data,
            id: (!e.id.is_empty()).then_some(e.id),
            ts: Some(e.ts),
            user: Some(e.user),
            v: e.v,
        })
    }
}

/// One event or many, for [`crate::Client::send`] and [`crate::Step::send_event`].
pub trait IntoEvents {
    /// The events as JSON, in order.
    fn into_events(self) -> Result<Vec<Value>, Error>;
}

impl<T: Serialize> IntoEvents for Event<T> {
    fn into_events(self) -> Result<Vec<Value>, Error> {
        Ok(vec![serde_json::to_value(self)?])
    }
}

impl<T: Serialize> IntoEvents for Vec<Event<T>> {
    fn into_events(self) -> Result<Vec<Value>, Error> {
        self.into_iter()
            .map(|e| serde_json::to_value(e).map_err(Error::from))
            .collect()
    }
}

/// What the event API answered: the ids of the stored events, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendEventResult {
    pub ids: Vec<String>,
}

/// The data of `inngest/function.failed`, given to an on-failure handler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionFailed {
    /// Composite id of the function that failed.
    #[serde(default)]
    pub function_id: String,
    #[serde(default)]
    pub run_id: String,
    /// The final error of the failed run.
    #[serde(default = "unknown_error")]
    pub error: crate::UserError,
    /// The event that triggered the failed run.
    #[serde(default)]
    pub event: Option<Event<Value>>,
}

fn unknown_error() -> crate::UserError {
    crate::UserError::new("Error", "unknown error")
}
