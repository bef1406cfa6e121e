//! Events to functions, and events to pauses, through CEL.

use crate::registry::{FunctionEntry, Registry};
use crate::store::{Pause, PauseMatcher};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Converts JSON into a CEL value. Written by hand because JSON integers must
/// become CEL `int` (not `uint`) or `event.data.n == 1` would be false.
pub fn json_to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => match n.as_u64() {
                Some(u) => cel::Value::UInt(u),
                None => cel::Value::Float(n.as_f64().unwrap_or(0.0)),
            },
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(a) => cel::Value::List(Arc::new(a.iter().map(json_to_cel).collect())),
        Value::Object(m) => {
            let map: HashMap<String, cel::Value> =
                m.iter().map(|(k, v)| (k.clone(), json_to_cel(v))).collect();
            map.into()
        }
    }
}

/// Compiles `expr` and runs it with the given variables: `Err` if it does not compile,
/// `Ok(Err)` if evaluation fails (e.g. a missing field).
fn execute(expr: &str, vars: &[(&str, &Value)]) -> Result<Result<cel::Value, String>, String> {
    let program =
        cel::Program::compile(expr).map_err(|e| format!("invalid expression {expr:?}: {e}"))?;
    let mut ctx = cel::Context::default();
    for (name, value) in vars {
        ctx.add_variable_from_value(*name, json_to_cel(value));
    }
    Ok(program.execute(&ctx).map_err(|e| e.to_string()))
}

/// Evaluates a boolean CEL expression with the given variables. A parse or
/// evaluation error (e.g. a missing field) counts as "no match", as in Inngest.
pub fn eval_bool(expr: &str, vars: &[(&str, &Value)]) -> Result<bool, String> {
    Ok(matches!(execute(expr, vars)?, Ok(cel::Value::Bool(true))))
}

/// Evaluates a CEL expression to a JSON value (keys, priorities). Scalars convert exactly;
/// anything else becomes its debug text, which is still a stable key.
pub fn eval_value(expr: &str, vars: &[(&str, &Value)]) -> Result<Value, String> {
    Ok(match execute(expr, vars)?? {
        cel::Value::Null => Value::Null,
        cel::Value::Bool(b) => Value::Bool(b),
        cel::Value::Int(i) => Value::from(i),
        cel::Value::UInt(u) => Value::from(u),
        cel::Value::Float(f) => Value::from(f),
        cel::Value::String(s) => Value::String(s.as_ref().clone()),
        other => Value::String(format!("{other:?}")),
    })
}

/// Checks that an expression compiles (used when validating a sync).
pub fn check_expr(expr: &str) -> Result<(), String> {
    cel::Program::compile(expr)
        .map(|_| ())
        .map_err(|e| format!("invalid expression {expr:?}: {e}"))
}

/// Whether an event name matches a trigger name (exact, or `prefix/*` wildcard).
pub fn name_matches(trigger: &str, name: &str) -> bool {
    if trigger == name {
        return true;
    }
    match trigger.strip_suffix('*') {
        Some(prefix) if !prefix.is_empty() => name.starts_with(prefix),
        _ => false,
    }
}

/// Functions whose event triggers match `event`. A function with several
/// matching triggers is returned once.
pub fn matching_functions(registry: &Registry, event: &Value) -> Vec<Arc<FunctionEntry>> {
    let name = event
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut out: Vec<Arc<FunctionEntry>> = Vec::new();
    for f in registry.all() {
        let hit = f.event_triggers.iter().any(|(trigger, expr)| {
            name_matches(trigger, name)
                && match expr {
                    None => true,
                    Some(e) => eval_bool(e, &[("event", event)]).unwrap_or(false),
                }
        });
        if hit {
            out.push(f);
        }
    }
    out
}

/// The engine's [`PauseMatcher`]: correlation ids for invokes, CEL for the rest.
#[derive(Debug, Default)]
pub struct CelPauseMatcher;

impl PauseMatcher for CelPauseMatcher {
    fn matches(&self, pause: &Pause, event: &Value) -> bool {
        if pause.event_name
            != event
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
        {
            return false;
        }
        if let Some(c) = &pause.correlation {
            return event
                .pointer("/data/correlation_id")
                .and_then(Value::as_str)
                == Some(c.as_str());
        }
        match &pause.expr {
            None => true,
            Some(e) if e.trim().is_empty() => true,
            Some(e) => {
                eval_bool(e, &[("event", &pause.trigger), ("async", event)]).unwrap_or(false)
            }
        }
    }
}

/// Turns stored events into runs and resumed pauses, in arrival order.
///
/// Events are committed before they are matched, so a crash between the two
/// is repaired on start: unprocessed events are picked up again, and run
/// creation is idempotent on (function, event id).
pub async fn run_processor(engine: Arc<crate::Engine>) {
    let mut shutdown = engine.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let notified = engine.events_wake.notified();
        let batch = match engine.store.unprocessed_events(256).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reading unprocessed events");
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = notified => {}
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep(engine.config.poll_interval) => {}
            }
            continue;
        }
        // Sent in order; the store's writer commits them together.
        let futs = batch.into_iter().map(|ev| process_event(&engine, ev));
        let mut created = 0;
        for r in futures::future::join_all(futs).await {
            match r {
                Ok(n) => created += n,
                Err(e) => tracing::error!(error = %e, "processing event"),
            }
        }
        if created > 0 {
            metrics::counter!("cairn_runs_started_total").increment(created as u64);
        }
        engine.queue_wake.notify_one();
    }
}

async fn process_event(
    engine: &crate::Engine,
    ev: crate::store::StoredEvent,
) -> Result<usize, crate::store::StoreError> {
    let now = engine.now();
    let (runs, extra) = plan_runs(engine, &ev, now);
    let created = engine
        .store
        .apply_event(ev, runs, extra, engine.pause_matcher(), now)
        .await?;
    Ok(created.len())
}

/// The runs a new event will start when it is stored and applied in one commit (ingest,
/// finalisation): planned before it has a sequence number, which the store fills in.
pub fn plan_new_event(
    engine: &crate::Engine,
    e: &crate::store::NewEvent,
    now: i64,
) -> Vec<crate::store::NewRun> {
    plan_runs(engine, &e.stored(0), now).0
}

/// The runs an event starts (one per matching function, flow control planned), and any
/// events to emit instead (an invoke of a function that does not exist fails its caller).
pub fn plan_runs(
    engine: &crate::Engine,
    ev: &crate::store::StoredEvent,
    now: i64,
) -> (Vec<crate::store::NewRun>, Vec<crate::store::NewEvent>) {
    let mut extra = Vec::new();
    let targets: Vec<Arc<FunctionEntry>> = match &ev.target_fn {
        Some(slug) => match engine.registry.get(slug) {
            Some(f) => vec![f],
            None => {
                // An invoke of a missing function must fail the caller, not hang it.
                let message = format!("function {slug} not found");
                extra.extend(crate::store::failed_invoke_event(
                    slug, &ev.event, &message, "Failed", now,
                ));
                vec![]
            }
        },
        None => matching_functions(&engine.registry, &ev.event),
    };
    let runs = targets
        .iter()
        .map(|f| crate::executor::new_run(engine, f, ev, now))
        .collect();
    (runs, extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cel_compares_json_ints_and_strings() {
        let ev = json!({"name": "a/b", "data": {"n": 1, "s": "x"}});
        assert!(eval_bool(
            "event.data.n == 1 && event.data.s == 'x'",
            &[("event", &ev)]
        )
        .unwrap());
        assert!(!eval_bool("event.data.n == 2", &[("event", &ev)]).unwrap());
        assert!(!eval_bool("event.data.missing == 2", &[("event", &ev)]).unwrap());
        let other = json!({"data": {"id": 1}});
        let trig = json!({"data": {"id": 1}});
        assert!(eval_bool(
            "async.data.id == event.data.id",
            &[("event", &trig), ("async", &other)]
        )
        .unwrap());
    }

    #[test]
    fn wildcard_names() {
        assert!(name_matches("app/*", "app/x"));
        assert!(!name_matches("app/*", "other/x"));
        assert!(name_matches("a", "a"));
    }
}
