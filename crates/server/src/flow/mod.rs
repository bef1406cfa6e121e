//! Flow control (concurrency, throttle, rate limit, idempotency, debounce, batching,
//! priority, singleton): what a function's config means for one event.
//!
//! [`plan`] evaluates every key expression of a function against the event that would start
//! a run and returns a [`RunFlow`]; the store enforces it atomically with creating the run
//! (so limits hold across crashes and, later, across processes sharing a database), and the
//! queue enforces concurrency when it claims work. [`validate`] refuses configs that cannot
//! be enforced, at sync time.
//!
//! A key expression that fails to evaluate, or evaluates to `false` or `null`, switches its
//! limit off for that event, as upstream does for singleton and rate-limit keys.

pub mod validate;

use crate::matcher;
use crate::registry::FunctionEntry;
use crate::store::{Batch, Debounce, Gcra, RunFlow, SkipReason, Slot};
use serde_json::Value;

/// How far `priority.run` may move a run, in seconds (upstream's clamp).
pub const PRIORITY_MAX_SECS: i64 = 43_200;

/// The idempotency window: one run per key per 24 h.
const IDEMPOTENCY_PERIOD_MS: i64 = 24 * 3600 * 1000;

fn period_ms(s: &str) -> Option<i64> {
    cairn_protocol::duration::parse(s)
        .ok()
        .map(|d| d.as_millis() as i64)
}

/// The value a key expression gives for `event`, as a string; `None` switches the limit off.
/// No expression means one shared key (`""`).
fn key_value(expr: Option<&str>, event: &Value) -> Option<String> {
    let Some(expr) = expr.filter(|e| !e.trim().is_empty()) else {
        return Some(String::new());
    };
    match matcher::eval_value(expr, &[("event", event)]).ok()? {
        Value::Null | Value::Bool(false) => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

/// The flow control `event` gets as the trigger of a run of `f`.
///
/// ```
/// # use cairn_server::{flow, registry::FunctionEntry, store::FunctionRecord};
/// let rec = FunctionRecord {
///     slug: "app-f".into(), app: "app".into(),
///     config: serde_json::json!({"id": "app-f", "triggers": [{"event": "e"}],
///         "steps": {"step": {"id": "step", "runtime": {"url": "http://x"}}},
///         "concurrency": [{"limit": 2, "key": "event.data.tenant"}]}),
/// };
/// let f = FunctionEntry::from_record(&rec).unwrap();
/// let plan = flow::plan(&f, &serde_json::json!({"data": {"tenant": "t1"}}), 0);
/// assert_eq!(plan.concurrency[0].key, "f:app-f:t1");
/// assert_eq!(plan.concurrency[0].limit, 2);
/// ```
pub fn plan(f: &FunctionEntry, event: &Value, now: i64) -> RunFlow {
    let c = &f.config;
    let mut flow = RunFlow::default();
    let slot = |l: &cairn_protocol::function::ConcurrencyLimit| -> Option<Slot> {
        let value = key_value(l.key.as_deref(), event)?;
        let key = match l.scope.as_deref().unwrap_or("fn") {
            "env" => format!("e:{value}"),
            "account" => format!("a:{value}"),
            _ if l.key.is_none() => format!("f:{}", f.slug),
            _ => format!("f:{}:{value}", f.slug),
        };
        // A limit of 0 means "no limit", as upstream reads it.
        (l.limit > 0).then_some(Slot {
            key,
            limit: l.limit,
        })
    };
    if let Some(conc) = &c.concurrency {
        flow.concurrency = conc.limits().iter().filter_map(slot).collect();
        flow.run_slot = conc.run_limits().first().and_then(slot).map(|s| Slot {
            key: format!("run:{}", s.key),
            ..s
        });
    }
    if let Some(t) = &c.throttle {
        if let (Some(value), Some(period)) =
            (key_value(t.key.as_deref(), event), period_ms(&t.period))
        {
            flow.throttle = Some(Gcra {
                key: format!("throttle:{}:{value}", f.slug),
                limit: t.limit.max(1),
                period_ms: period,
                burst: t.burst.unwrap_or(0),
            });
        }
    }
    if let Some(expr) = c.idempotency.as_deref().filter(|e| !e.trim().is_empty()) {
        if let Some(value) = key_value(Some(expr), event) {
            flow.rate_limit = Some((
                Gcra {
                    key: format!("idem:{}:{value}", f.slug),
                    limit: 1,
                    period_ms: IDEMPOTENCY_PERIOD_MS,
                    burst: 0,
                },
                SkipReason::Idempotency,
            ));
        }
    } else if let Some(r) = &c.rate_limit {
        if let (Some(value), Some(period)) =
            (key_value(r.key.as_deref(), event), period_ms(&r.period))
        {
            flow.rate_limit = Some((
                Gcra {
                    key: format!("rate:{}:{value}", f.slug),
                    limit: r.limit.max(1),
                    period_ms: period,
                    burst: 0,
                },
                SkipReason::RateLimit,
            ));
        }
    }
    if let Some(s) = &c.singleton {
        if let Some(value) = key_value(s.key.as_deref(), event) {
            flow.singleton = Some((value, s.mode == "cancel"));
        }
    }
    if let Some(d) = &c.debounce {
        if let (Some(key), Some(period)) =
            (key_value(d.key.as_deref(), event), period_ms(&d.period))
        {
            flow.debounce = Some(Debounce {
                key,
                period_ms: period,
                timeout_ms: d.timeout.as_deref().and_then(period_ms),
                ts: event.get("ts").and_then(Value::as_i64).unwrap_or(now),
            });
        }
    }
    if let Some(b) = &c.batch_events {
        let wanted = match b.condition.as_deref().filter(|e| !e.trim().is_empty()) {
            None => true,
            Some(cond) => matcher::eval_bool(cond, &[("event", event)]).unwrap_or(false),
        };
        if wanted {
            if let (Some(key), Some(timeout)) =
                (key_value(b.key.as_deref(), event), period_ms(&b.timeout))
            {
                flow.batch = Some(Batch {
                    key,
                    max_size: b.max_size.max(1),
                    timeout_ms: timeout,
                });
            }
        }
    }
    if let Some(expr) = c.priority.as_ref().and_then(|p| p.run.as_deref()) {
        if let Ok(v) = matcher::eval_value(expr, &[("event", event)]) {
            let secs = v
                .as_i64()
                .or_else(|| v.as_f64().map(|f| f as i64))
                .unwrap_or(0);
            flow.priority_ms = secs.clamp(-PRIORITY_MAX_SECS, PRIORITY_MAX_SECS) * 1000;
        }
    }
    flow
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FunctionRecord;
    use serde_json::json;

    fn entry(extra: Value) -> FunctionEntry {
        let mut config = json!({"id": "app-f", "triggers": [{"event": "e"}],
            "steps": {"step": {"id": "step", "runtime": {"url": "http://x"}}}});
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        FunctionEntry::from_record(&FunctionRecord {
            slug: "app-f".into(),
            app: "app".into(),
            config,
        })
        .unwrap()
    }

    #[test]
    fn concurrency_keys_are_scoped() {
        let f = entry(json!({"concurrency": [
            {"limit": 2},
            {"limit": 1, "key": "event.data.n", "scope": "account"}]}));
        let p = plan(&f, &json!({"data": {"n": 7}}), 0);
        assert_eq!(
            p.concurrency,
            vec![
                Slot {
                    key: "f:app-f".into(),
                    limit: 2
                },
                Slot {
                    key: "a:7".into(),
                    limit: 1
                }
            ]
        );
        // A missing field switches that limit off, not the other one.
        let p = plan(&f, &json!({"data": {}}), 0);
        assert_eq!(p.concurrency.len(), 1);
    }

    #[test]
    fn split_shape_gives_a_run_slot() {
        let f = entry(json!({"concurrency": {"fn": [{"limit": 1, "key": "event.data.c"}]}}));
        let p = plan(&f, &json!({"data": {"c": "A"}}), 0);
        assert!(p.concurrency.is_empty());
        assert_eq!(p.run_slot.unwrap().key, "run:f:app-f:A");
    }

    #[test]
    fn false_keys_switch_limits_off() {
        let f = entry(json!({"singleton": {"key": "event.data.d", "mode": "skip"},
                             "rateLimit": {"limit": 1, "period": "1h", "key": "event.data.d"}}));
        let p = plan(&f, &json!({"data": {"d": false}}), 0);
        assert!(p.singleton.is_none() && p.rate_limit.is_none());
        let p = plan(&f, &json!({"data": {"d": "x"}}), 0);
        assert_eq!(p.singleton, Some(("x".into(), false)));
        assert_eq!(p.rate_limit.unwrap().0.key, "rate:app-f:x");
    }

    #[test]
    fn idempotency_overrides_rate_limit() {
        let f = entry(json!({"idempotency": "event.data.id",
                             "rateLimit": {"limit": 5, "period": "1m"}}));
        let (g, why) = plan(&f, &json!({"data": {"id": 3}}), 0).rate_limit.unwrap();
        assert_eq!(why, SkipReason::Idempotency);
        assert_eq!((g.limit, g.period_ms), (1, IDEMPOTENCY_PERIOD_MS));
    }

    #[test]
    fn priority_is_clamped() {
        let f = entry(json!({"priority": {"run": "event.data.p"}}));
        assert_eq!(plan(&f, &json!({"data": {"p": 5}}), 0).priority_ms, 5000);
        assert_eq!(
            plan(&f, &json!({"data": {"p": 999999}}), 0).priority_ms,
            PRIORITY_MAX_SECS * 1000
        );
        assert_eq!(plan(&f, &json!({"data": {}}), 0).priority_ms, 0);
    }

    #[test]
    fn batch_if_false_runs_alone() {
        let f = entry(json!({"batchEvents": {"maxSize": 5, "timeout": "5s",
                             "if": "event.data.n % 2 == 0"}}));
        assert!(plan(&f, &json!({"data": {"n": 2}}), 0).batch.is_some());
        assert!(plan(&f, &json!({"data": {"n": 3}}), 0).batch.is_none());
    }

    #[test]
    fn debounce_uses_event_ts() {
        let f = entry(json!({"debounce": {"period": "5s", "timeout": "1m"}}));
        let d = plan(&f, &json!({"ts": 1234, "data": {}}), 99)
            .debounce
            .unwrap();
        assert_eq!(
            (d.ts, d.period_ms, d.timeout_ms),
            (1234, 5000, Some(60_000))
        );
    }

    #[test]
    fn gcra_throttle_spaces_starts() {
        let g = Gcra {
            key: "k".into(),
            limit: 1,
            period_ms: 5000,
            burst: 1,
        };
        let mut tat = None;
        let mut starts = Vec::new();
        for _ in 0..4 {
            let (s, t) = g.delay(tat, 0);
            starts.push(s);
            tat = Some(t);
        }
        assert_eq!(starts, vec![0, 0, 5000, 10000]);
    }

    #[test]
    fn gcra_rate_limit_drops_excess() {
        let g = Gcra {
            key: "k".into(),
            limit: 2,
            period_ms: 1000,
            burst: 0,
        };
        let t1 = g.admit(None, 0).unwrap();
        let t2 = g.admit(Some(t1), 10).unwrap();
        assert!(g.admit(Some(t2), 20).is_none());
        assert!(g.admit(Some(t2), 600).is_some());
    }
}
