//! The call request a server sends to an app (§6.2).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Event;

/// The body of `POST <app url>?fnId=…&stepId=…`.
///
/// Every key is always serialised because Python's SDK validates strictly; the server
/// serialises it with [`crate::signature::canonical_json`] and signs exactly those bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRequest {
    pub event: Event,
    #[serde(default)]
    pub events: Vec<Event>,
    /// Memoised results keyed by hashed step id; shapes in [`crate::Memo`].
    #[serde(default)]
    pub steps: Map<String, Value>,
    pub ctx: CallCtx,
    /// The run's execution version; `-1` lets the SDK decide.
    #[serde(default = "undecided_version")]
    pub version: i32,
    /// Python reads this one, JS reads `ctx.use_api`; servers send both.
    #[serde(default)]
    pub use_api: bool,
}

fn undecided_version() -> i32 {
    -1
}

/// `ctx` of a call request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallCtx {
    pub run_id: String,
    /// 0-based attempt of this queue item.
    #[serde(default)]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub disable_immediate_execution: bool,
    #[serde(default)]
    pub use_api: bool,
    #[serde(default)]
    pub stack: Stack,
    /// Stable function id; its presence turns JS v4 async checkpointing on (§13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fn_id: Option<String>,
    /// Opaque reference to the queue item, used by checkpointing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qi_id: Option<String>,
    #[serde(default = "discovery_step")]
    pub step_id: String,
    #[serde(default)]
    pub env: String,
}

fn discovery_step() -> String {
    STEP_DISCOVERY.to_string()
}

/// The `stepId` that asks the SDK to run the function and find the next step.
pub const STEP_DISCOVERY: &str = "step";

/// The run's step stack: hashed ids in persistence order, and the 1-based predecessor position.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    #[serde(default)]
    pub stack: Vec<String>,
    #[serde(default)]
    pub current: u32,
}
