//! Function configuration as sent in a sync (§4.4).
//!
//! Field names and shapes are exactly the wire's. Parsing is tolerant (unknown keys ignored,
//! the several accepted shapes of `concurrency` all read); serialising writes the shape the
//! JS SDK writes.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// One function of an app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionConfig {
    /// Composite id `<appId>-<fnId>`: the function's slug.
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub triggers: Vec<Trigger>,
    #[serde(default)]
    pub steps: BTreeMap<String, StepConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<Throttle>,
    #[serde(rename = "rateLimit", default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce: Option<Debounce>,
    #[serde(
        rename = "batchEvents",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub batch_events: Option<BatchEvents>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub cancel: Vec<Cancel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub singleton: Option<Singleton>,
    /// Function-level retries sugar some SDKs send instead of `steps.step.retries`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// Retries when a function says nothing: 4 retries, 5 attempts (§4.4).
pub const DEFAULT_RETRIES: u32 = 4;
/// The most retries a function may ask for.
pub const MAX_RETRIES: u32 = 20;

impl FunctionConfig {
    /// Retries for this function: `steps.*.retries.attempts` (which counts retries, despite
    /// its name), else the function-level sugar, else [`DEFAULT_RETRIES`]; capped at [`MAX_RETRIES`].
    pub fn retries(&self) -> u32 {
        self.steps
            .values()
            .find_map(|s| s.retries.as_ref().map(|r| r.attempts))
            .or(self.retries)
            .unwrap_or(DEFAULT_RETRIES)
            .min(MAX_RETRIES)
    }

    /// The URL the server calls, from the first step's runtime.
    pub fn url(&self) -> Option<&str> {
        self.steps.values().find_map(|s| s.runtime.url.as_deref())
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// What starts a function: an event (with an optional CEL expression) or a cron schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Trigger {
    Event {
        event: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expression: Option<String>,
    },
    Cron {
        cron: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jitter: Option<String>,
    },
}

/// The single `step` entry of a function: where and how to call it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepConfig {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub runtime: Runtime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
}

/// How a step is reached: `{"type":"http","url":…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Runtime {
    #[serde(rename = "type", default = "http_runtime")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

fn http_runtime() -> String {
    "http".to_string()
}

/// `{"attempts": n}`, where n counts retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retries {
    pub attempts: u32,
}

/// One concurrency limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConcurrencyLimit {
    pub limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `fn` (default), `env` or `account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// `concurrency` in any of its accepted shapes: a number, one limit, a list of limits, or
/// the split form `{"fn": [...], "step": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Concurrency {
    Limit(u32),
    One(ConcurrencyLimit),
    Many(Vec<ConcurrencyLimit>),
    Split {
        /// Limits held by a run from its start to its end.
        #[serde(rename = "fn", default, skip_serializing_if = "Vec::is_empty")]
        run: Vec<ConcurrencyLimit>,
        /// Limits on concurrently executing steps (the meaning of every other shape).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        step: Vec<ConcurrencyLimit>,
    },
}

impl Concurrency {
    /// The step limits (bounding concurrently executing calls) as a list.
    pub fn limits(&self) -> Vec<ConcurrencyLimit> {
        match self {
            Concurrency::Limit(n) => vec![ConcurrencyLimit {
                limit: *n,
                key: None,
                scope: None,
            }],
            Concurrency::One(l) => vec![l.clone()],
            Concurrency::Many(v) => v.clone(),
            Concurrency::Split { step, .. } => step.clone(),
        }
    }

    /// The run limits of the split form (held for a whole run); empty for the other shapes.
    pub fn run_limits(&self) -> Vec<ConcurrencyLimit> {
        match self {
            Concurrency::Split { run, .. } => run.clone(),
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throttle {
    pub limit: u32,
    pub period: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    pub limit: u32,
    pub period: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Debounce {
    pub period: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchEvents {
    #[serde(rename = "maxSize")]
    pub max_size: u32,
    pub timeout: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(rename = "if", default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Priority {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

/// Cancel the run when a matching event arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    pub event: String,
    #[serde(rename = "if", default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Singleton {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `skip` or `cancel`.
    pub mode: String,
}

/// Anything not typed above that a caller wants to keep verbatim.
pub type Extra = BTreeMap<String, Value>;
