//! Opcodes an SDK reports in a 206 response (§7.2).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// What a reported op asks the server to do.
///
/// Parsing is case-insensitive, as the Go server's is; unknown names are kept so a newer SDK's
/// op can be reported as an error instead of failing the whole response.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Opcode {
    None,
    Step,
    StepRun,
    StepError,
    StepPlanned,
    Sleep,
    WaitForEvent,
    InvokeFunction,
    AiGateway,
    Gateway,
    WaitForSignal,
    RunComplete,
    StepFailed,
    SyncRunComplete,
    DiscoveryRequest,
    DeferAdd,
    DeferAbort,
    Unknown(String),
}

impl Opcode {
    /// The exact wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Opcode::None => "None",
            Opcode::Step => "Step",
            Opcode::StepRun => "StepRun",
            Opcode::StepError => "StepError",
            Opcode::StepPlanned => "StepPlanned",
            Opcode::Sleep => "Sleep",
            Opcode::WaitForEvent => "WaitForEvent",
            Opcode::InvokeFunction => "InvokeFunction",
            Opcode::AiGateway => "AIGateway",
            Opcode::Gateway => "Gateway",
            Opcode::WaitForSignal => "WaitForSignal",
            Opcode::RunComplete => "RunComplete",
            Opcode::StepFailed => "StepFailed",
            Opcode::SyncRunComplete => "SyncRunComplete",
            Opcode::DiscoveryRequest => "DiscoveryRequest",
            Opcode::DeferAdd => "DeferAdd",
            Opcode::DeferAbort => "DeferAbort",
            Opcode::Unknown(s) => s,
        }
    }

    /// Parses a wire name, ignoring case.
    ///
    /// ```
    /// use cairn_protocol::Opcode;
    /// assert_eq!(Opcode::parse("steprun"), Opcode::StepRun);
    /// assert_eq!(Opcode::parse("AIGateway"), Opcode::AiGateway);
    /// ```
    pub fn parse(s: &str) -> Opcode {
        const ALL: [Opcode; 17] = [
            Opcode::None,
            Opcode::Step,
            Opcode::StepRun,
            Opcode::StepError,
            Opcode::StepPlanned,
            Opcode::Sleep,
            Opcode::WaitForEvent,
            Opcode::InvokeFunction,
            Opcode::AiGateway,
            Opcode::Gateway,
            Opcode::WaitForSignal,
            Opcode::RunComplete,
            Opcode::StepFailed,
            Opcode::SyncRunComplete,
            Opcode::DiscoveryRequest,
            Opcode::DeferAdd,
            Opcode::DeferAbort,
        ];
        ALL.into_iter()
            .find(|op| op.as_str().eq_ignore_ascii_case(s))
            .unwrap_or_else(|| Opcode::Unknown(s.to_string()))
    }
}

impl Serialize for Opcode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Opcode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Opcode::parse(&s))
    }
}

/// The user's own id of a step and, for repeats, its index (§9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Userland {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
}

/// One reported op (the Go server's `GeneratorOpcode`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// Hashed step id (40 hex chars).
    pub id: String,
    pub op: Opcode,
    /// Legacy field that carries the sleep duration or waited event name for some ops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(
        rename = "displayName",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opts: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<UserError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userland: Option<Userland>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<Value>,
}

impl Op {
    /// A bare op with just an id and a code; fill the rest with struct update syntax.
    pub fn new(id: impl Into<String>, op: Opcode) -> Self {
        Op {
            id: id.into(),
            op,
            name: None,
            display_name: None,
            opts: None,
            data: None,
            error: None,
            userland: None,
            timing: None,
        }
    }

    /// The label a person gave the step: `displayName`, else `name`, else the hashed id.
    pub fn label(&self) -> &str {
        self.display_name
            .as_deref()
            .or(self.name.as_deref())
            .unwrap_or(&self.id)
    }

    /// A string option from `opts`, e.g. `opts.timeout` or `opts.function_id`.
    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.opts.as_ref()?.get(key)?.as_str()
    }
}

/// Parses a 206 body: an array of ops or a single op object (§8.1).
///
/// ```
/// let ops = cairn_protocol::parse_ops(br#"{"id":"a","op":"Sleep","name":"1h"}"#).unwrap();
/// assert_eq!(ops.len(), 1);
/// ```
pub fn parse_ops(body: &[u8]) -> Result<Vec<Op>, serde_json::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<Op>),
        One(Box<Op>),
    }
    Ok(match serde_json::from_slice::<OneOrMany>(body)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(op) => vec![*op],
    })
}

/// An error as SDKs serialise it (JS `{name, message, stack, __serialized}`, Python adds `code`).
///
/// Unknown keys are kept in `extra` so a memoised error goes back to the SDK unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserError {
    #[serde(default = "default_error_name")]
    pub name: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_error_name() -> String {
    "Error".to_string()
}

impl UserError {
    /// An error with a name and a message.
    pub fn new(name: impl Into<String>, message: impl Into<String>) -> Self {
        UserError {
            name: name.into(),
            message: message.into(),
            stack: None,
            extra: Map::new(),
        }
    }
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}
