//! Sync-time checks of flow-control config: a config the server cannot enforce is refused
//! with the field that is wrong, instead of being accepted and silently ignored.

use crate::matcher::check_expr;
use cairn_protocol::function::ConcurrencyLimit;
use cairn_protocol::FunctionConfig;
use std::time::Duration;

/// Most step concurrency limits per function (upstream's `MaxConcurrencyLimits`).
pub const MAX_CONCURRENCY_LIMITS: usize = 2;

/// A refused field: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field in the function config, e.g. `concurrency[1].scope`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn expr(field: &str, e: Option<&str>) -> Result<(), FieldError> {
    match e {
        Some(e) if e.trim().is_empty() => Err(bad(field, "empty expression")),
        Some(e) => check_expr(e).map_err(|m| bad(field, m)),
        None => Ok(()),
    }
}

fn period(field: &str, s: &str, min: Duration, max: Duration) -> Result<Duration, FieldError> {
    let d = cairn_protocol::duration::parse(s).map_err(|e| bad(field, e.to_string()))?;
    if d < min || d > max {
        return Err(bad(
            field,
            format!(
                "{s:?} is out of range ({} to {})",
                cairn_protocol::duration::format(min),
                cairn_protocol::duration::format(max)
            ),
        ));
    }
    Ok(d)
}

const SECOND: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(86_400);

fn limits(field: &str, list: &[ConcurrencyLimit], max: usize) -> Result<(), FieldError> {
    if list.len() > max {
        return Err(bad(
            field,
            format!("{} limits given, at most {max} allowed", list.len()),
        ));
    }
    for (i, l) in list.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let scope = l.scope.as_deref().unwrap_or("fn");
        if !matches!(scope, "fn" | "env" | "account") {
            return Err(bad(
                format!("{at}.scope"),
                format!("unknown scope {scope:?} (expected fn, env or account)"),
            ));
        }
        if scope != "fn" && l.key.is_none() {
            return Err(bad(
                format!("{at}.key"),
                format!("scope {scope:?} needs a key"),
            ));
        }
        expr(&format!("{at}.key"), l.key.as_deref())?;
    }
    Ok(())
}

/// Check every flow-control option of `f`.
///
/// ```
/// use cairn_server::flow::validate::check;
/// let f: cairn_protocol::FunctionConfig = serde_json::from_value(serde_json::json!({
///     "id": "app-f", "triggers": [{"event": "e"}],
///     "throttle": {"limit": 1, "period": "0s"}})).unwrap();
/// assert_eq!(check(&f).unwrap_err().field, "throttle.period");
/// ```
pub fn check(f: &FunctionConfig) -> Result<(), FieldError> {
    use cairn_protocol::function::Concurrency;
    match &f.concurrency {
        Some(Concurrency::Split { run, step }) => {
            if run.is_empty() && step.is_empty() {
                return Err(bad("concurrency", "no limits given"));
            }
            limits("concurrency.fn", run, 1)?;
            limits("concurrency.step", step, MAX_CONCURRENCY_LIMITS)?;
        }
        Some(c) => limits("concurrency", &c.limits(), MAX_CONCURRENCY_LIMITS)?,
        None => {}
    }
    if let Some(t) = &f.throttle {
        if t.limit == 0 {
            return Err(bad("throttle.limit", "must be at least 1"));
        }
        period("throttle.period", &t.period, SECOND, 7 * DAY)?;
        expr("throttle.key", t.key.as_deref())?;
    }
    if let Some(r) = &f.rate_limit {
        if r.limit == 0 {
            return Err(bad("rateLimit.limit", "must be at least 1"));
        }
        period("rateLimit.period", &r.period, SECOND, DAY)?;
        expr("rateLimit.key", r.key.as_deref())?;
    }
    if f.idempotency.is_some() {
        expr("idempotency", f.idempotency.as_deref())?;
    }
    if let Some(d) = &f.debounce {
        let p = period("debounce.period", &d.period, SECOND, 7 * DAY)?;
        if let Some(t) = &d.timeout {
            let t = period("debounce.timeout", t, SECOND, 7 * DAY)?;
            if t < p {
                return Err(bad("debounce.timeout", "shorter than the period"));
            }
        }
        expr("debounce.key", d.key.as_deref())?;
    }
    if let Some(b) = &f.batch_events {
        if b.max_size == 0 {
            return Err(bad("batchEvents.maxSize", "must be at least 1"));
        }
        period(
            "batchEvents.timeout",
            &b.timeout,
            SECOND,
            Duration::from_secs(3600),
        )?;
        expr("batchEvents.key", b.key.as_deref())?;
        expr("batchEvents.if", b.condition.as_deref())?;
    }
    if let Some(p) = &f.priority {
        expr("priority.run", p.run.as_deref())?;
    }
    if let Some(s) = &f.singleton {
        if !matches!(s.mode.as_str(), "skip" | "cancel") {
            return Err(bad(
                "singleton.mode",
                format!("unknown mode {:?} (expected skip or cancel)", s.mode),
            ));
        }
        expr("singleton.key", s.key.as_deref())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn cfg(extra: Value) -> FunctionConfig {
        let mut v = json!({"id": "app-f", "triggers": [{"event": "e"}]});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn field(extra: Value) -> String {
        check(&cfg(extra)).unwrap_err().field
    }

    #[test]
    fn good_configs_pass() {
        check(&cfg(json!({
            "concurrency": [{"limit": 2}, {"limit": 1, "key": "event.data.k", "scope": "account"}],
            "throttle": {"limit": 1, "period": "5s", "burst": 2, "key": "event.data.k"},
            "rateLimit": {"limit": 10, "period": "24h"},
            "debounce": {"period": "5s", "timeout": "1m"},
            "batchEvents": {"maxSize": 100, "timeout": "5s", "if": "event.data.n > 1"},
            "priority": {"run": "event.data.p"},
            "idempotency": "event.data.id",
            "singleton": {"mode": "cancel", "key": "event.data.u"},
        })))
        .unwrap();
        check(&cfg(
            json!({"concurrency": {"fn": [{"limit": 1}], "step": [{"limit": 3}]}}),
        ))
        .unwrap();
        check(&cfg(json!({"concurrency": 5}))).unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let three = json!([{"limit": 1}, {"limit": 2}, {"limit": 3}]);
        assert_eq!(field(json!({ "concurrency": three })), "concurrency");
        assert_eq!(
            field(json!({"concurrency": [{"limit": 1, "scope": "galaxy"}]})),
            "concurrency[0].scope"
        );
        assert_eq!(
            field(json!({"concurrency": [{"limit": 1}, {"limit": 1, "scope": "env"}]})),
            "concurrency[1].key"
        );
        assert_eq!(
            field(json!({"concurrency": [{"limit": 1, "key": "event.data.("}]})),
            "concurrency[0].key"
        );
        assert_eq!(
            field(json!({"concurrency": {"fn": [{"limit": 1}, {"limit": 2}]}})),
            "concurrency.fn"
        );
        assert_eq!(
            field(json!({"throttle": {"limit": 1, "period": "30d"}})),
            "throttle.period"
        );
        assert_eq!(
            field(json!({"throttle": {"limit": 0, "period": "1s"}})),
            "throttle.limit"
        );
        assert_eq!(
            field(json!({"rateLimit": {"limit": 1, "period": "soon"}})),
            "rateLimit.period"
        );
        assert_eq!(
            field(json!({"debounce": {"period": "500ms"}})),
            "debounce.period"
        );
        assert_eq!(
            field(json!({"debounce": {"period": "10s", "timeout": "5s"}})),
            "debounce.timeout"
        );
        assert_eq!(
            field(json!({"batchEvents": {"maxSize": 0, "timeout": "5s"}})),
            "batchEvents.maxSize"
        );
        assert_eq!(
            field(json!({"batchEvents": {"maxSize": 5, "timeout": "5s", "if": "&&"}})),
            "batchEvents.if"
        );
        assert_eq!(field(json!({"priority": {"run": ")("}})), "priority.run");
        assert_eq!(field(json!({"idempotency": "a b c"})), "idempotency");
        assert_eq!(
            field(json!({"singleton": {"mode": "queue"}})),
            "singleton.mode"
        );
    }
}
