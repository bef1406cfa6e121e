//! Calls the SDK and interprets its answer (§6–§8).
//!
//! One queue item is handled by one task that owns everything it loads; the
//! result becomes a single [`Apply`] committed atomically, so a step result is
//! durable before the item that depends on it exists. Nothing about the run
//! stays in memory after the task returns.

use crate::registry::FunctionEntry;
use crate::store::{
    Apply, CallState, Finish, ItemKind, Left, MemoJson, NewEvent, NewItem, NewRun, Pause,
    PauseKind, QueueItem, Run, RunStatus, StoreError, StoreResult, StoredEvent,
};
use crate::Engine;
use cairn_protocol::{
    call::call_body, headers, parse_ops, signature, CallCtx, CallRequest, Event, Op, Opcode, Stack,
};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const YEAR_MS: i64 = 366 * 24 * 3600 * 1000;

/// Backoff table by attempt index (§11.2).
const BACKOFF_SECS: [u64; 10] = [15, 30, 60, 120, 300, 600, 1200, 2400, 3600, 7200];

/// Build the run a matched event starts.
pub fn new_run(engine: &Engine, f: &FunctionEntry, ev: &StoredEvent, now: i64) -> NewRun {
    let run_id = ulid::Ulid::new().to_string();
    let idem_key = ev
        .event
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(&ev.internal_id)
        .to_string();
    let mut items = vec![NewItem {
        id: crate::store::start_item_id(&run_id),
        run_id: run_id.clone(),
        kind: ItemKind::Call {
            step: None,
            predecessor: None,
        },
        available_at: now,
        unless_memo: None,
    }];
    if let Some(finish) = f.config.timeouts.as_ref().and_then(|t| t.finish.as_deref()) {
        if let Ok(d) = cairn_protocol::duration::parse(finish) {
            items.push(NewItem {
                id: format!("{run_id}:timeout-finish"),
                run_id: run_id.clone(),
                kind: ItemKind::RunTimeout,
                available_at: now + d.as_millis() as i64,
                unless_memo: None,
            });
        }
    }
    let pauses = f
        .config
        .cancel
        .iter()
        .enumerate()
        .map(|(i, c)| Pause {
            id: format!("{run_id}:cancel:{i}"),
            run_id: run_id.clone(),
            step: String::new(),
            kind: PauseKind::Cancel,
            event_name: c.event.clone(),
            expr: c.condition.clone(),
            correlation: None,
            trigger: ev.event.clone(),
            expires_at: c
                .timeout
                .as_deref()
                .map(|t| deadline(t, now))
                .unwrap_or(now + YEAR_MS),
            since_seq: ev.seq,
        })
        .collect();
    let _ = engine;
    NewRun {
        run_id,
        fn_slug: f.slug.clone(),
        idem_key,
        events: vec![ev.event.clone()],
        trigger_internal_id: ev.internal_id.clone(),
        created_at: now,
        items,
        pauses,
        flow: crate::flow::plan(f, &ev.event, now),
    }
}

/// A timeout string: duration, RFC3339 date, or `""` (now).
fn deadline(s: &str, now: i64) -> i64 {
    if s.trim().is_empty() {
        return now;
    }
    if let Ok(d) = cairn_protocol::duration::parse(s) {
        return now + d.as_millis() as i64;
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return t.timestamp_millis();
    }
    now + YEAR_MS
}

fn discovery_after(run_id: &str, step: &str, now: i64) -> NewItem {
    NewItem {
        id: format!("{run_id}:{step}:disc"),
        run_id: run_id.to_string(),
        kind: ItemKind::Call {
            step: None,
            predecessor: Some(step.to_string()),
        },
        available_at: now,
        unless_memo: None,
    }
}

fn user_error(name: &str, message: impl Into<String>) -> Value {
    let message = message.into();
    json!({"name": name, "message": message, "error": format!("{name}: {message}")})
}

/// Handle one claimed item end to end. Never panics the worker: failures are logged.
///
/// With `go_on`, the run's next due item is leased to this process in the same commit as the
/// result and returned with its lease's end, so the caller can handle it at once instead of
/// claiming it.
pub async fn handle(engine: Arc<Engine>, item: QueueItem, go_on: bool) -> Option<(QueueItem, i64)> {
    // Whether handling the item may free concurrency slots, un-parking other runs' items:
    // calls hold their function's limits (looked up by `call`), and a run that times out
    // frees its own; sleeps, wait timeouts and finalisation hold none.
    let mut limited = matches!(item.kind, ItemKind::Call { .. } | ItemKind::RunTimeout);
    let res = match item.kind.clone() {
        ItemKind::Call { step, predecessor } => {
            call(&engine, &item, step, predecessor, &mut limited).await
        }
        ItemKind::Wake { step } => {
            let now = engine.now();
            Ok(Apply {
                item: Some((item.id.clone(), engine.owner.clone())),
                run_id: item.run_id.clone(),
                memos: vec![(step.clone(), MemoJson::new(&Value::Null))],
                complete_pending: Some((
                    vec![step.clone()],
                    discovery_after(&item.run_id, &step, now),
                )),
                ..Default::default()
            })
        }
        ItemKind::PauseTimeout {
            pause_id,
            step,
            invoke,
        } => {
            let now = engine.now();
            let memo = if invoke {
                MemoJson::error(&json!({
                    "error": "InngestInvokeTimeoutError: Timed out waiting for invoked function to complete",
                    "name": "InngestInvokeTimeoutError",
                    "message": "Timed out waiting for invoked function to complete"}))
            } else {
                MemoJson::new(&Value::Null)
            };
            Ok(Apply {
                item: Some((item.id.clone(), engine.owner.clone())),
                run_id: item.run_id.clone(),
                expire_pause: Some((pause_id, memo, discovery_after(&item.run_id, &step, now))),
                ..Default::default()
            })
        }
        ItemKind::RunTimeout => Ok(Apply {
            item: Some((item.id.clone(), engine.owner.clone())),
            run_id: item.run_id.clone(),
            finish: Some(Finish {
                status: RunStatus::Cancelled,
                output: user_error("TimeoutError", "run exceeded timeouts.finish"),
            }),
            ..Default::default()
        }),
        ItemKind::Finalize => finalize(&engine, &item).await,
    };
    let apply = match res {
        Ok(a) => a,
        Err(e) => {
            if let Some(StoreError::LeaseLost(id)) = e.downcast_ref::<StoreError>() {
                lease_lost(id, "call not sent");
            } else {
                tracing::error!(item = %item.id, error = %e, "handling queue item");
            }
            return None;
        }
    };
    // The matcher is woken for events it must apply (and below, for lifecycle events the
    // store left to it behind an older unapplied one).
    let emits_events = !apply.events.is_empty() || !apply.pauses.is_empty();
    let finish = apply.finish.as_ref().map(|f| f.status);
    let run_id = apply.run_id.clone();
    let new_work = NewWork::of(&apply, limited);
    let now = engine.now();
    let lease_until = engine.lease_until(now);
    let applied: StoreResult<(Option<QueueItem>, Left)> = if go_on {
        engine
            .store
            .apply_and_continue(
                apply,
                engine.pause_matcher(),
                now,
                &engine.owner,
                lease_until,
            )
            .await
    } else {
        engine
            .store
            .apply(apply, engine.pause_matcher(), now)
            .await
            .map(|()| (None, Left::ALL))
    };
    match applied {
        Ok((next, left)) => {
            if finish.is_some() {
                engine.run_waiters.ended(&run_id);
            }
            if let Some(s) = finish {
                match s {
                    RunStatus::Completed => {
                        metrics::counter!("cairn_runs_completed_total").increment(1)
                    }
                    RunStatus::Failed => metrics::counter!("cairn_runs_failed_total").increment(1),
                    RunStatus::Cancelled => {
                        metrics::counter!("cairn_runs_cancelled_total").increment(1)
                    }
                    RunStatus::Running => {}
                }
            }
            if emits_events || left.matcher {
                engine.events_wake.notify_one();
            }
            if left.queue || new_work.left_for_loop(next.as_ref()) {
                engine.queue_wake.notify_one();
            }
            next.map(|n| (n, lease_until))
        }
        Err(StoreError::LeaseLost(id)) => {
            lease_lost(&id, "result dropped");
            None
        }
        Err(e) => {
            tracing::error!(item = %item.id, error = %e, "applying result");
            None
        }
    }
}

/// Another process took item `id` over after this one's lease on it lapsed, so whatever
/// this one was doing with it is dropped.
fn lease_lost(id: &str, what: &str) {
    tracing::debug!(item = %id, "lease lost; {what}");
    metrics::counter!("cairn_leases_lost_total").increment(1);
}

async fn finalize(engine: &Engine, item: &QueueItem) -> anyhow::Result<Apply> {
    let mut apply = Apply {
        item: Some((item.id.clone(), engine.owner.clone())),
        run_id: item.run_id.clone(),
        ..Default::default()
    };
    if let Some(run) = engine.store.get_run(&item.run_id).await? {
        let output = run.output.as_ref().unwrap_or(&Value::Null);
        apply.apply_events = lifecycle_events(engine, &run, run.status, output, engine.now());
    }
    Ok(apply)
}

/// The events announcing a run's end (`inngest/function.finished`, and `.failed` or
/// `.cancelled`), each with the runs planned for it. They are applied in the commit that
/// stores them (an invoking run resumes, onFailure handlers start), so no matcher on any node
/// has to pick them up.
fn lifecycle_events(
    engine: &Engine,
    run: &Run,
    status: RunStatus,
    output: &Value,
    now: i64,
) -> Vec<(NewEvent, Vec<NewRun>)> {
    let trigger = run.events.first().cloned().unwrap_or(Value::Null);
    let trigger_name = trigger
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // Runs started by lifecycle events emit none, or onFailure handlers would recurse.
    if trigger_name == "inngest/function.finished" || trigger_name == "inngest/function.failed" {
        return Vec::new();
    }
    let mut data = Map::new();
    data.insert("function_id".into(), json!(run.fn_slug));
    data.insert("run_id".into(), json!(run.run_id));
    data.insert("event".into(), trigger.clone());
    data.insert("events".into(), json!(run.events));
    match status {
        RunStatus::Completed => {
            data.insert("result".into(), output.clone());
        }
        _ => {
            let mut err = output.clone();
            if let Some(o) = err.as_object_mut() {
                if !o.contains_key("error") {
                    let name = o
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("Error")
                        .to_string();
                    let msg = o
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    o.insert("error".into(), json!(format!("{name}: {msg}")));
                }
            }
            data.insert("error".into(), err);
        }
    }
    if let Some(c) = trigger.pointer("/data/_inngest/correlation_id") {
        data.insert("correlation_id".into(), c.clone());
    }
    data.insert("_inngest".into(), json!({"status": status.as_str()}));
    let data = Value::Object(data);
    let mk = |name: &str, id: String| NewEvent {
        internal_id: ulid::Ulid::new().to_string(),
        event: json!({"name": name, "id": id, "data": data, "user": {}, "ts": now}),
        received_at: now,
        target_fn: None,
    };
    let mut events = vec![mk(
        "inngest/function.finished",
        ulid::Ulid::new().to_string(),
    )];
    match status {
        RunStatus::Failed => events.push(mk("inngest/function.failed", run.run_id.clone())),
        RunStatus::Cancelled => events.push(mk("inngest/function.cancelled", run.run_id.clone())),
        _ => {}
    }
    events
        .into_iter()
        .map(|e| {
            let runs = crate::matcher::plan_new_event(engine, &e, now);
            (e, runs)
        })
        .collect()
}

/// What a call came back with, before it is turned into writes.
enum Outcome {
    Complete(Value),
    Ops {
        ops: Vec<Op>,
        version: Option<i64>,
        no_retry: bool,
        retry_after: Option<Duration>,
    },
    Error {
        error: Value,
        retry: bool,
        retry_after: Option<Duration>,
    },
}

fn call_url(base: &str, slug: &str, step: &str) -> anyhow::Result<url::Url> {
    let mut u = url::Url::parse(base)?;
    let keep: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| k != "fnId" && k != "stepId")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    u.query_pairs_mut()
        .clear()
        .extend_pairs(keep)
        .append_pair("fnId", slug)
        .append_pair("stepId", step);
    Ok(u)
}

fn parse_retry_after(v: &str, now: i64) -> Option<Duration> {
    let v = v.trim();
    let ms = if v.len() <= 7 && v.chars().all(|c| c.is_ascii_digit()) {
        v.parse::<i64>().ok()? * 1000
    } else if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        t.timestamp_millis() - now
    } else if let Ok(t) = chrono::DateTime::parse_from_rfc2822(v) {
        t.timestamp_millis() - now
    } else {
        return None;
    };
    Some(Duration::from_millis(
        ms.clamp(1000, 24 * 3600 * 1000) as u64
    ))
}

/// Delay before retry number `attempt + 1`.
pub fn backoff_ms(engine: &Engine, attempt: i64, retry_after: Option<Duration>) -> i64 {
    if let Some(d) = retry_after {
        return d.as_millis() as i64;
    }
    if let Some(d) = engine.config.retry_interval {
        return d.as_millis() as i64;
    }
    let idx = (attempt.max(0) as usize).min(BACKOFF_SECS.len() - 1);
    let jitter = rand::random_range(0..30_000);
    BACKOFF_SECS[idx] as i64 * 1000 + jitter
}

async fn send(
    engine: &Engine,
    url: url::Url,
    body: Vec<u8>,
    run_id: &str,
    step: &str,
    version: i64,
) -> Outcome {
    let mut req = engine
        .http
        .post(url.clone())
        .timeout(engine.config.call_timeout)
        .header("content-type", "application/json")
        .header(headers::RUN_ID, run_id)
        .header(headers::STEP_ID, step)
        .header(headers::REQ_VERSION, version.to_string());
    if let Some(key) = &engine.config.signing_key {
        // The SDK checks the signature against its own wall clock, not the injected one.
        let t = chrono::Utc::now().timestamp();
        req = req.header(headers::SIGNATURE, signature::sign(key, &body, t));
    }
    let started = Instant::now();
    let resp = req.body(body).send().await;
    metrics::histogram!("cairn_sdk_call_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("cairn_sdk_calls_total").increment(1);
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            let cause = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "app unreachable"
            } else {
                "request failed"
            };
            return Outcome::Error {
                error: user_error("CallError", format!("calling {url}: {cause}: {e}")),
                retry: true,
                retry_after: None,
            };
        }
    };
    let status = resp.status().as_u16();
    let hdrs = resp.headers().clone();
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            return Outcome::Error {
                error: user_error("CallError", format!("reading response from {url}: {e}")),
                retry: true,
                retry_after: None,
            }
        }
    };
    let get = |h: &str| {
        hdrs.get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    interpret(
        engine,
        &url,
        status,
        get(headers::SDK),
        get(headers::NO_RETRY),
        get(headers::RETRY_AFTER),
        get(headers::REQ_VERSION),
        &body,
    )
}

#[allow(clippy::too_many_arguments)]
fn interpret(
    engine: &Engine,
    url: &url::Url,
    status: u16,
    sdk: Option<String>,
    no_retry: Option<String>,
    retry_after: Option<String>,
    version: Option<String>,
    body: &[u8],
) -> Outcome {
    let version = version.and_then(|v| v.trim().parse::<i64>().ok());
    let retry_after = retry_after.and_then(|v| parse_retry_after(&v, engine.now()));
    let no_retry_flag = no_retry.as_deref().map(|v| v.eq_ignore_ascii_case("true"));
    if status == 201 && sdk.is_some() {
        // Streaming envelope: keep-alive whitespace, then {status, headers, body}.
        let env: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return Outcome::Error {
                    error: user_error(
                        "CallError",
                        format!("bad streamed response from {url}: {e}"),
                    ),
                    retry: true,
                    retry_after,
                }
            }
        };
        let st = env.get("status").and_then(Value::as_u64).unwrap_or(500) as u16;
        let h = |k: &str| {
            env.get("headers").and_then(Value::as_object).and_then(|m| {
                m.iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(k))
                    .and_then(|(_, v)| v.as_str().map(str::to_string))
            })
        };
        let inner = match env.get("body") {
            Some(Value::String(s)) => s.clone().into_bytes(),
            Some(v) => v.to_string().into_bytes(),
            None => Vec::new(),
        };
        let v = env
            .get("version")
            .map(|v| v.to_string())
            .or(version.map(|v| v.to_string()));
        return interpret(
            engine,
            url,
            st,
            sdk,
            h(headers::NO_RETRY),
            h(headers::RETRY_AFTER),
            v,
            &inner,
        );
    }
    if sdk.is_none() {
        return Outcome::Error {
            error: user_error("CallError", format!("response from {url} (HTTP {status}) is not from an Inngest SDK (no X-Inngest-SDK header)")),
            retry: true,
            retry_after,
        };
    }
    match status {
        200 if body.iter().all(u8::is_ascii_whitespace) => Outcome::Complete(Value::Null),
        200 => match serde_json::from_slice(body) {
            Ok(v) => Outcome::Complete(v),
            Err(e) => Outcome::Error {
                error: user_error(
                    "CallError",
                    format!("invalid JSON in 200 response from {url}: {e}"),
                ),
                retry: true,
                retry_after,
            },
        },
        206 => match parse_ops(body) {
            Ok(ops) => Outcome::Ops {
                ops,
                version,
                no_retry: no_retry_flag.unwrap_or(false),
                retry_after,
            },
            Err(e) => Outcome::Error {
                error: user_error("CallError", format!("unparseable ops from {url}: {e}")),
                retry: true,
                retry_after,
            },
        },
        _ => {
            let mut error = serde_json::from_slice::<Value>(body)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| {
                    user_error(
                        "CallError",
                        format!(
                            "HTTP {status} from {url}: {}",
                            String::from_utf8_lossy(&body[..body.len().min(512)])
                        ),
                    )
                });
            if let Some(o) = error.as_object_mut() {
                o.entry("name").or_insert(json!("Error"));
            }
            Outcome::Error {
                error,
                retry: no_retry_flag.map(|n| !n).unwrap_or(true),
                retry_after,
            }
        }
    }
}

/// What a commit makes claimable, as far as the executor can tell from the writes it asks for
/// (the store tells what applying lifecycle events left: [`Left`]).
enum NewWork {
    /// Nothing: no item, no freed slot, no event.
    Nothing,
    /// One item due now (a step's successor, a run's finalisation) and nothing else.
    One(String),
    /// Anything else: timers, retries, pauses, events, several items, freed slots.
    Unknown,
}

impl NewWork {
    fn of(apply: &Apply, limited: bool) -> NewWork {
        if limited
            || apply.retry.is_some()
            || !apply.pauses.is_empty()
            || apply.expire_pause.is_some()
            || !apply.events.is_empty()
        {
            return NewWork::Unknown;
        }
        let mut items = apply
            .enqueue
            .iter()
            .chain(apply.complete_pending.as_ref().map(|(_, d)| d));
        match (items.next(), items.next(), &apply.finish) {
            (None, _, None) => NewWork::Nothing,
            (Some(item), None, None) => NewWork::One(item.id.clone()),
            (None, _, Some(_)) if apply.lifecycle.is_some() => NewWork::Nothing,
            (None, _, Some(_)) => NewWork::One(crate::store::finalize_item_id(&apply.run_id)),
            _ => NewWork::Unknown,
        }
    }

    /// Whether the queue loop must look for work after the commit, given the item this
    /// worker goes straight on with: only when the commit may have made something claimable
    /// that is not that item. Every wake-up costs the loop a claim round trip, and a step
    /// that continues its own run needs none.
    fn left_for_loop(&self, next: Option<&QueueItem>) -> bool {
        match self {
            NewWork::Nothing => false,
            NewWork::One(id) => next.is_none_or(|n| &n.id != id),
            NewWork::Unknown => true,
        }
    }
}

async fn call(
    engine: &Engine,
    item: &QueueItem,
    step: Option<String>,
    predecessor: Option<String>,
    limited: &mut bool,
) -> anyhow::Result<Apply> {
    let apply = Apply {
        item: Some((item.id.clone(), engine.owner.clone())),
        run_id: item.run_id.clone(),
        ..Default::default()
    };
    let Some(mut state) = engine.store.call_state(&item.run_id).await? else {
        return Ok(apply);
    };
    if state.run.status != RunStatus::Running {
        return Ok(apply);
    }
    let mut apply = call_run(engine, item, step, predecessor, limited, apply, &mut state).await?;
    // A call that ends the run has the run at hand, so its lifecycle events go into the same
    // commit: no finalisation item, no second read of the run, no second commit.
    if let Some(f) = &apply.finish {
        apply.lifecycle = Some(lifecycle_events(
            engine,
            &state.run,
            f.status,
            &f.output,
            engine.now(),
        ));
    }
    Ok(apply)
}

/// Calls the SDK for a running run and turns its answer into writes. The run's memoised
/// steps are moved out of `state` into the request.
async fn call_run(
    engine: &Engine,
    item: &QueueItem,
    step: Option<String>,
    predecessor: Option<String>,
    limited: &mut bool,
    mut apply: Apply,
    state: &mut CallState,
) -> anyhow::Result<Apply> {
    let now = engine.now();
    let run = &state.run;
    let Some(function) = engine.registry.get(&run.fn_slug) else {
        apply.finish = Some(Finish {
            status: RunStatus::Failed,
            output: user_error(
                "Error",
                format!("function {} is not registered", run.fn_slug),
            ),
        });
        return Ok(apply);
    };
    *limited = function.config.concurrency.is_some();
    let Some(base_url) = function.config.url().map(str::to_string) else {
        apply.finish = Some(Finish {
            status: RunStatus::Failed,
            output: user_error("Error", format!("function {} has no URL", run.fn_slug)),
        });
        return Ok(apply);
    };
    if let Some(start) = function
        .config
        .timeouts
        .as_ref()
        .and_then(|t| t.start.as_deref())
    {
        if predecessor.is_none() && step.is_none() {
            if let Ok(d) = cairn_protocol::duration::parse(start) {
                if now - run.created_at > d.as_millis() as i64 {
                    apply.finish = Some(Finish {
                        status: RunStatus::Cancelled,
                        output: user_error("TimeoutError", "run exceeded timeouts.start"),
                    });
                    return Ok(apply);
                }
            }
        }
    }
    let max_attempts = function.max_attempts() as i64;
    let (memos, since_seq) = (std::mem::take(&mut state.steps), state.high_water);
    let step_id = step
        .clone()
        .unwrap_or_else(|| cairn_protocol::STEP_DISCOVERY.to_string());
    let memos_sent = memos.len();
    let body = build_body(
        run,
        memos,
        item.attempt,
        max_attempts,
        predecessor.as_deref(),
        &dispatch_ref(item),
    );
    let url = call_url(&base_url, &run.fn_slug, &step_id)?;
    // Checked as late as possible: the call must reach the app while the lease is ours.
    if !crate::queue::lease_held(engine, &item.id).await {
        return Err(StoreError::LeaseLost(item.id.clone()).into());
    }
    tracing::debug!(run = %run.run_id, qi = %dispatch_ref(item), memos = memos_sent, "calling the app");
    let outcome = send(engine, url, body, &run.run_id, &step_id, run.version).await;
    let now = engine.now();
    let retry_or_fail =
        |apply: &mut Apply, error: Value, retry: bool, retry_after: Option<Duration>| {
            if retry && item.attempt + 1 < max_attempts {
                apply.retry = Some((
                    item.attempt + 1,
                    now + backoff_ms(engine, item.attempt, retry_after),
                ));
            } else {
                apply.finish = Some(Finish {
                    status: RunStatus::Failed,
                    output: error,
                });
            }
        };
    match outcome {
        Outcome::Complete(v) => {
            apply.finish = Some(Finish {
                status: RunStatus::Completed,
                output: v,
            })
        }
        Outcome::Error {
            error,
            retry,
            retry_after,
        } => {
            tracing::debug!(run = %run.run_id, %error, "call failed");
            retry_or_fail(&mut apply, error, retry, retry_after);
        }
        Outcome::Ops {
            ops,
            version,
            no_retry,
            retry_after,
        } => {
            if run.version == -1 {
                apply.version = version;
            }
            let eff_version = if run.version != -1 {
                run.version
            } else {
                version.unwrap_or(1)
            };
            let real: Vec<&Op> = ops
                .iter()
                .filter(|o| !matches!(o.op, Opcode::None | Opcode::DeferAdd | Opcode::DeferAbort))
                .collect();
            if real.len() > 1 {
                apply.disable_immediate = Some(true);
            }
            // Race-mode groups advance as soon as any branch finishes.
            let race = real
                .iter()
                .any(|o| o.opt_str("parallelMode") == Some("race"));
            let coalesce = eff_version >= 2 && real.len() > 1 && !race;
            let mut completed: Vec<String> = Vec::new();
            let mut rediscover = real.is_empty();
            for op in &real {
                let id = op.id.clone();
                match &op.op {
                    Opcode::StepRun => {
                        let data = op.data.as_ref().unwrap_or(&Value::Null);
                        apply.memos.push((id.clone(), MemoJson::data(data)));
                        completed.push(id);
                    }
                    Opcode::Step => {
                        let data = op.data.as_ref().unwrap_or(&Value::Null);
                        apply.memos.push((id.clone(), MemoJson::new(data)));
                        completed.push(id);
                    }
                    Opcode::StepError | Opcode::StepFailed => {
                        let err = op
                            .error
                            .as_ref()
                            .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
                            .unwrap_or_else(|| user_error("Error", "step failed"));
                        let is_final = op.op == Opcode::StepFailed
                            || no_retry
                            || item.attempt + 1 >= max_attempts;
                        if is_final {
                            apply.memos.push((id.clone(), MemoJson::error(&err)));
                            completed.push(id);
                        } else {
                            apply.retry = Some((
                                item.attempt + 1,
                                now + backoff_ms(engine, item.attempt, retry_after),
                            ));
                        }
                    }
                    Opcode::StepPlanned => {
                        apply.enqueue.push(NewItem {
                            id: format!("{}:{id}:plan", run.run_id),
                            run_id: run.run_id.clone(),
                            kind: ItemKind::Call {
                                step: Some(id.clone()),
                                predecessor: predecessor.clone(),
                            },
                            available_at: now,
                            unless_memo: Some(id.clone()),
                        });
                        if coalesce {
                            apply.add_pending.push(id);
                        }
                    }
                    Opcode::Sleep => {
                        let spec = op
                            .opt_str("duration")
                            .map(str::to_string)
                            .or_else(|| op.name.clone())
                            .unwrap_or_default();
                        let at = match sleep_until(&spec, now) {
                            Ok(at) => at,
                            Err(msg) => {
                                apply.finish = Some(Finish {
                                    status: RunStatus::Failed,
                                    output: user_error("Error", msg),
                                });
                                break;
                            }
                        };
                        apply.enqueue.push(NewItem {
                            id: format!("{}:{id}:sleep", run.run_id),
                            run_id: run.run_id.clone(),
                            kind: ItemKind::Wake { step: id.clone() },
                            available_at: at,
                            unless_memo: Some(id.clone()),
                        });
                        if coalesce {
                            apply.add_pending.push(id);
                        }
                    }
                    Opcode::WaitForEvent => {
                        let event_name = op
                            .opt_str("event")
                            .map(str::to_string)
                            .or_else(|| op.name.clone())
                            .unwrap_or_default();
                        let expires = deadline(op.opt_str("timeout").unwrap_or("1y"), now);
                        let pause = Pause {
                            id: format!("{}:{id}:pause", run.run_id),
                            run_id: run.run_id.clone(),
                            step: id.clone(),
                            kind: PauseKind::Wait,
                            event_name,
                            expr: op.opt_str("if").map(str::to_string),
                            correlation: None,
                            trigger: run.events.first().cloned().unwrap_or(Value::Null),
                            expires_at: expires,
                            since_seq,
                        };
                        apply
                            .pauses
                            .push((pause, timeout_item(&run.run_id, &id, expires, false)));
                        if coalesce {
                            apply.add_pending.push(id);
                        }
                    }
                    Opcode::InvokeFunction => {
                        let target = op.opt_str("function_id").unwrap_or_default().to_string();
                        let payload = op
                            .opts
                            .as_ref()
                            .and_then(|o| o.get("payload"))
                            .cloned()
                            .unwrap_or(json!({}));
                        let expires = deadline(op.opt_str("timeout").unwrap_or("1y"), now);
                        let correlation = format!("{}.{id}", run.run_id);
                        let mut data = payload
                            .get("data")
                            .cloned()
                            .filter(Value::is_object)
                            .unwrap_or(json!({}));
                        data["_inngest"] = json!({
                            "fn_id": target, "correlation_id": correlation, "source_fn_id": run.fn_slug,
                            "source_run_id": run.run_id, "expire": expires,
                        });
                        let mut event = json!({
                            "name": "inngest/function.invoked", "id": ulid::Ulid::new().to_string(),
                            "data": data, "user": payload.get("user").cloned().unwrap_or(json!({})), "ts": now,
                        });
                        if let Some(v) = payload.get("v") {
                            event["v"] = v.clone();
                        }
                        apply.events.push(NewEvent {
                            internal_id: ulid::Ulid::new().to_string(),
                            event,
                            received_at: now,
                            target_fn: Some(target),
                        });
                        let pause = Pause {
                            id: format!("{}:{id}:pause", run.run_id),
                            run_id: run.run_id.clone(),
                            step: id.clone(),
                            kind: PauseKind::Invoke,
                            event_name: "inngest/function.finished".into(),
                            expr: None,
                            correlation: Some(correlation),
                            trigger: run.events.first().cloned().unwrap_or(Value::Null),
                            expires_at: expires,
                            since_seq,
                        };
                        apply
                            .pauses
                            .push((pause, timeout_item(&run.run_id, &id, expires, true)));
                        if coalesce {
                            apply.add_pending.push(id);
                        }
                    }
                    Opcode::RunComplete => {
                        apply.finish = Some(Finish {
                            status: RunStatus::Completed,
                            output: op.data.clone().unwrap_or(Value::Null),
                        });
                    }
                    Opcode::SyncRunComplete => {
                        let out = op
                            .data
                            .as_ref()
                            .and_then(|d| d.get("data"))
                            .cloned()
                            .unwrap_or(Value::Null);
                        apply.finish = Some(Finish {
                            status: RunStatus::Completed,
                            output: out,
                        });
                    }
                    Opcode::DiscoveryRequest => rediscover = true,
                    other => {
                        apply.finish = Some(Finish {
                            status: RunStatus::Failed,
                            output: user_error(
                                "Error",
                                format!("opcode {} is not supported by cairn", other.as_str()),
                            ),
                        });
                    }
                }
            }
            if let Some(last) = completed.last().cloned() {
                apply.complete_pending =
                    Some((completed, discovery_after(&run.run_id, &last, now)));
            } else if rediscover && apply.retry.is_none() && apply.finish.is_none() {
                if step.is_none() {
                    // Same discovery again, now; the attempt is not spent.
                    apply.retry = Some((item.attempt, now));
                } else {
                    retry_or_fail(
                        &mut apply,
                        user_error("Error", "SDK returned no ops for a targeted step"),
                        true,
                        None,
                    );
                }
            }
        }
    }
    Ok(apply)
}

fn timeout_item(run_id: &str, step: &str, at: i64, invoke: bool) -> NewItem {
    NewItem {
        id: format!("{run_id}:{step}:timeout"),
        run_id: run_id.to_string(),
        kind: ItemKind::PauseTimeout {
            pause_id: format!("{run_id}:{step}:pause"),
            step: step.to_string(),
            invoke,
        },
        available_at: at,
        unless_memo: None,
    }
}

/// When a sleep op ends: a duration, or an absolute date (§7.2 Sleep).
fn sleep_until(spec: &str, now: i64) -> Result<i64, String> {
    let spec = spec.trim();
    let at = if spec.len() >= 10 && chrono::DateTime::parse_from_rfc3339(spec).is_ok() {
        chrono::DateTime::parse_from_rfc3339(spec)
            .map(|t| t.timestamp_millis())
            .unwrap_or(now)
            .max(now)
    } else {
        match cairn_protocol::duration::parse(spec) {
            Ok(d) => now + d.as_millis() as i64,
            Err(e) => return Err(format!("invalid sleep duration {spec:?}: {}", e.reason)),
        }
    };
    if at - now > YEAR_MS {
        return Err(format!("sleep {spec:?} is longer than 366 days"));
    }
    Ok(at)
}

/// `ctx.qi_id`: the queue item plus the instant it became due, which changes on
/// every retry, so checkpoints from an abandoned dispatch can be told apart.
pub fn dispatch_ref(item: &QueueItem) -> String {
    format!("{}@{}", item.id, item.available_at)
}

/// Inverse of [`dispatch_ref`].
pub fn parse_dispatch_ref(qi_id: &str) -> Option<(String, i64)> {
    let (id, at) = qi_id.rsplit_once('@')?;
    Some((id.to_string(), at.parse().ok()?))
}

/// A stable UUID-shaped id for a function slug (`ctx.fn_id`).
pub fn function_uuid(slug: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = hex::encode(Sha256::digest(slug.as_bytes()));
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Serialise the call request as canonical JSON (the bytes that get signed).
fn build_body(
    run: &Run,
    memos: Vec<(String, MemoJson)>,
    attempt: i64,
    max_attempts: i64,
    predecessor: Option<&str>,
    item_id: &str,
) -> Vec<u8> {
    let stack: Vec<String> = memos.iter().map(|(h, _)| h.clone()).collect();
    let current = predecessor
        .and_then(|p| stack.iter().position(|h| h == p))
        .map(|i| i as u32 + 1)
        .unwrap_or(0);
    let events: Vec<Event> = run
        .events
        .iter()
        .filter_map(|e| serde_json::from_value(e.clone()).ok())
        .collect();
    let event = events
        .first()
        .cloned()
        .unwrap_or_else(|| Event::new("unknown", json!({})));
    let mut req = CallRequest {
        event,
        events,
        steps: Map::new(),
        ctx: CallCtx {
            run_id: run.run_id.clone(),
            attempt: attempt as u32,
            max_attempts: Some(max_attempts as u32),
            disable_immediate_execution: run.disable_immediate,
            use_api: false,
            stack: Stack { stack, current },
            // With both set, JS v4 checkpoints steps to /v1/checkpoint/{run}/async (§13).
            fn_id: Some(function_uuid(&run.fn_slug)),
            qi_id: Some(item_id.to_string()),
            step_id: cairn_protocol::STEP_DISCOVERY.to_string(),
            env: String::new(),
        },
        version: run.version as i32,
        use_api: false,
    };
    // Memos go in as the canonical text they are stored as: megabytes each, at times.
    let steps: Vec<(&str, &str)> = memos
        .iter()
        .map(|(h, m)| (h.as_str(), m.as_str()))
        .collect();
    let mut bytes = call_body(&req, &steps);
    if bytes.len() > cairn_protocol::MAX_INLINE_BODY {
        req.use_api = true;
        req.ctx.use_api = true;
        bytes = signature::canonical_json(&req);
        if bytes.len() > cairn_protocol::MAX_INLINE_BODY {
            req.events = Vec::new();
            bytes = signature::canonical_json(&req);
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_replaces_fn_and_step() {
        let u = call_url(
            "http://a/api/inngest?fnId=old&stepId=step&x=1",
            "app-fn",
            "abc",
        )
        .unwrap();
        assert_eq!(
            u.as_str(),
            "http://a/api/inngest?x=1&fnId=app-fn&stepId=abc"
        );
    }

    #[test]
    fn sleep_specs() {
        assert_eq!(sleep_until("1h", 0).unwrap(), 3_600_000);
        let now = 1_900_000_000_000;
        assert_eq!(sleep_until("2020-01-01T00:00:00Z", now).unwrap(), now);
        assert!(sleep_until("forever", 0).is_err());
        assert!(sleep_until("400d", 0).is_err());
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after("5", 0), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("0", 0), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after("1970-01-01T00:00:10Z", 0),
            Some(Duration::from_secs(10))
        );
    }
}
