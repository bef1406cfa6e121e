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

/// The top-level keys of a serialised [`CallRequest`], in RFC 8785 order.
const REQUEST_KEYS: [&str; 6] = ["ctx", "event", "events", "steps", "use_api", "version"];

/// RFC 8785 canonical JSON of `req` with `steps` (hashed step id, memo) in place of
/// `req.steps`, where each memo is already canonical JSON text.
///
/// The bytes are those of [`crate::signature::canonical_json`] of the whole request, but
/// the memos are copied in as they are instead of being parsed and escaped again: a
/// megabyte step output is then one copy per call rather than a parse, an escape and
/// several copies. Canonical pieces joined under keys in canonical order make a canonical
/// whole, so the canonicalisation itself stays with `serde_jcs`.
///
/// ```
/// use cairn_protocol::{call::call_body, signature::canonical_json, CallRequest};
/// let mut req: CallRequest = serde_json::from_value(serde_json::json!({
///     "event": {"name": "a", "data": {}}, "ctx": {"run_id": "r"}
/// })).unwrap();
/// let body = call_body(&req, &[("h1", r#"{"data":1}"#)]);
/// req.steps.insert("h1".into(), serde_json::json!({"data": 1}));
/// assert_eq!(body, canonical_json(&req));
/// ```
pub fn call_body(req: &CallRequest, steps: &[(&str, &str)]) -> Vec<u8> {
    use crate::signature::canonical_json;
    let mut out = Vec::with_capacity(steps_len(steps) + 1024);
    for key in REQUEST_KEYS {
        out.push(if key == "ctx" { b'{' } else { b',' });
        out.extend_from_slice(&canonical_json(key));
        out.push(b':');
        match key {
            "ctx" => out.extend_from_slice(&canonical_json(&req.ctx)),
            "event" => out.extend_from_slice(&canonical_json(&req.event)),
            "events" => out.extend_from_slice(&canonical_json(&req.events)),
            "steps" => write_steps(&mut out, steps),
            "use_api" => out.extend_from_slice(&canonical_json(&req.use_api)),
            _ => out.extend_from_slice(&canonical_json(&req.version)),
        }
    }
    out.push(b'}');
    out
}

/// The canonical JSON object of `steps` (hashed step id, canonical memo text): what the
/// server answers when an SDK fetches a run's steps itself because they were too large to
/// send inline.
///
/// ```
/// use cairn_protocol::call::steps_body;
/// assert_eq!(steps_body(&[("b", "2"), ("a", "1")]), br#"{"a":1,"b":2}"#);
/// ```
pub fn steps_body(steps: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(steps_len(steps) + 2);
    write_steps(&mut out, steps);
    out
}

fn steps_len(steps: &[(&str, &str)]) -> usize {
    steps.iter().map(|(k, m)| k.len() + m.len() + 4).sum()
}

fn write_steps(out: &mut Vec<u8>, steps: &[(&str, &str)]) {
    let mut sorted: Vec<&(&str, &str)> = steps.iter().collect();
    // RFC 8785 orders keys by UTF-16 code units, which differs from byte order for
    // characters above U+FFFF.
    sorted.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
    out.push(b'{');
    for (i, (id, memo)) in sorted.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&crate::signature::canonical_json(id));
        out.push(b':');
        out.extend_from_slice(memo.as_bytes());
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::canonical_json;
    use serde_json::json;

    fn request() -> CallRequest {
        serde_json::from_value(json!({
            "event": {"name": "shop/order", "data": {"z": 1, "a": [2.0, 1e21, "\u{1F600}\u{7f}"]}},
            "events": [{"name": "shop/order", "data": {"é": 0.5, "e": null}}],
            "ctx": {"run_id": "r1", "attempt": 2, "max_attempts": 4,
                    "stack": {"stack": ["b", "a"], "current": 1}, "fn_id": "f", "qi_id": "q"},
            "version": 2,
            "use_api": false
        }))
        .unwrap()
    }

    #[test]
    fn spliced_memos_give_the_canonical_bytes_of_the_whole_request() {
        // Keys chosen so byte order and UTF-16 order disagree (U+FF61 sorts after U+1F600
        // in UTF-8 but before it in UTF-16), with memos whose canonical forms differ from
        // serde_json's (2.0 → 2, 1e21 → 1e+21, unsorted keys).
        let memos: Vec<(String, Value)> = vec![
            (
                "b".into(),
                json!({"data": {"y": 2.0, "x": "line\nbreak \u{2028}"}}),
            ),
            (
                "\u{FF61}".into(),
                json!({"error": {"name": "E", "message": "m"}}),
            ),
            ("\u{1F600}".into(), json!({"data": 1e21})),
            ("a".into(), json!(null)),
        ];
        let texts: Vec<(String, String)> = memos
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8(canonical_json(v)).unwrap()))
            .collect();
        let refs: Vec<(&str, &str)> = texts
            .iter()
            .map(|(k, m)| (k.as_str(), m.as_str()))
            .collect();
        let mut whole = request();
        whole.steps = memos.into_iter().collect();
        assert_eq!(
            String::from_utf8(call_body(&request(), &refs)).unwrap(),
            String::from_utf8(canonical_json(&whole)).unwrap()
        );
        let mut none = request();
        none.use_api = true;
        assert_eq!(call_body(&none, &[]), canonical_json(&none));
    }

    #[test]
    fn the_body_writer_knows_every_request_key() {
        // A field added to CallRequest must be added to call_body too.
        let v = serde_json::to_value(request()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, REQUEST_KEYS);
    }
}
