//! How a memoised value in `steps` is read (§8.2, §15.1 item 6).

use serde_json::Value;

use crate::UserError;

/// One entry of a call request's `steps` map, interpreted.
#[derive(Debug, Clone, PartialEq)]
pub enum Memo {
    /// `{"data": X}`: the step returned X.
    Data(Value),
    /// `{"error": {...}}`: the step failed for good.
    Error(UserError),
    /// `{"input": [...]}`: a rerun edited this not-yet-run step's input.
    Input(Vec<Value>),
    /// Anything else: a sleep's `null`, a matched event, a legacy raw value.
    Raw(Value),
}

impl Memo {
    /// Interprets a memo value the way the official SDKs do: an object whose only key is
    /// `data`, `error` or `input` is unwrapped; everything else is taken as it is.
    ///
    /// ```
    /// use cairn_protocol::Memo;
    /// use serde_json::json;
    /// assert_eq!(Memo::from_value(json!({"data": 1})), Memo::Data(json!(1)));
    /// assert_eq!(Memo::from_value(json!(null)), Memo::Raw(json!(null)));
    /// ```
    pub fn from_value(value: Value) -> Memo {
        let mut map = match value {
            Value::Object(map) if map.len() == 1 => map,
            other => return Memo::Raw(other),
        };
        // Take ownership of the single entry: memoised outputs can be megabytes.
        let key = map.keys().next().cloned().unwrap_or_default();
        let inner = map.remove(&key).unwrap_or(Value::Null);
        match (key.as_str(), inner) {
            ("data", inner) => Memo::Data(inner),
            ("input", Value::Array(items)) => Memo::Input(items),
            ("error", inner) => match serde_json::from_value::<UserError>(inner.clone()) {
                Ok(err) => Memo::Error(err),
                Err(_) => Memo::Raw(Value::Object([(key, inner)].into_iter().collect())),
            },
            (_, inner) => Memo::Raw(Value::Object([(key, inner)].into_iter().collect())),
        }
    }
}
