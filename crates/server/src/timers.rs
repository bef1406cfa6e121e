//! Cron schedules. Sleeps and wait timeouts are queue items with a future
//! `available_at`, so they live in the queue; this module fires cron ticks.
//!
//! Exactly-once: a tick is recorded together with its event in one store
//! transaction, and a tick at or before the recorded one is never fired again.
//! Missed ticks: if the server was down across several ticks, only the most
//! recent missed tick fires on start; older ones are skipped.

use crate::store::NewEvent;
use crate::Engine;
use chrono::{DateTime, TimeZone, Utc};
use croner::parser::CronParser;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Parse a schedule (5 fields, or 6 with seconds; `TZ=`/`CRON_TZ=` prefixes are dropped: UTC).
pub fn parse_cron(schedule: &str) -> Result<croner::Cron, String> {
    let s = schedule.trim();
    let s = match s.split_once(' ') {
        Some((tz, rest)) if tz.starts_with("TZ=") || tz.starts_with("CRON_TZ=") => rest,
        _ => s,
    };
    CronParser::new()
        .parse(s)
        .map_err(|e| format!("invalid cron {schedule:?}: {e}"))
}

fn to_dt(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
}

/// Fire cron ticks until shutdown.
pub async fn run_cron(engine: Arc<Engine>) {
    let mut shutdown = engine.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let changed = engine.cron_wake.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let now = engine.now();
        let mut next_wake = now + 60_000;
        for f in engine.registry.all() {
            for sched in &f.crons {
                let Ok(cron) = parse_cron(sched) else {
                    continue;
                };
                let last = match engine.store.cron_last(&f.slug, sched).await {
                    Ok(Some(t)) => t,
                    Ok(None) => {
                        // First sight of this schedule: start counting from now.
                        let _ = engine.store.fire_cron(&f.slug, sched, now, None).await;
                        now
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading cron state");
                        continue;
                    }
                };
                let Ok(next) = cron.find_next_occurrence(&to_dt(last), false) else {
                    continue;
                };
                let mut next_ms = next.timestamp_millis();
                if next_ms <= now {
                    let tick = cron
                        .find_previous_occurrence(&to_dt(now), true)
                        .map(|t| t.timestamp_millis())
                        .unwrap_or(next_ms)
                        .max(next_ms);
                    let at = to_dt(tick).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                    let event = NewEvent {
                        internal_id: ulid::Ulid::new().to_string(),
                        event: json!({
                            "name": "inngest/scheduled.timer",
                            "id": at,
                            "data": {"cron": sched, "scheduledAt": at,
                                     "fireAt": to_dt(now).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)},
                            "user": {},
                            "ts": now,
                        }),
                        received_at: now,
                        target_fn: Some(f.slug.clone()),
                    };
                    match engine
                        .store
                        .fire_cron(&f.slug, sched, tick, Some(event))
                        .await
                    {
                        Ok(true) => {
                            metrics::counter!("cairn_cron_ticks_total").increment(1);
                            engine.events_wake.notify_one();
                        }
                        Ok(false) => {}
                        Err(e) => tracing::error!(error = %e, "firing cron"),
                    }
                    next_ms = cron
                        .find_next_occurrence(&to_dt(tick), false)
                        .map(|t| t.timestamp_millis())
                        .unwrap_or(now + 60_000);
                }
                next_wake = next_wake.min(next_ms);
            }
        }
        tokio::select! {
            _ = changed => {}
            _ = engine.clock.sleep_until(next_wake) => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Delete history older than the retention window, so storage stays bounded.
/// Runs every few minutes, in bounded batches, until nothing old is left.
pub async fn run_retention(engine: Arc<Engine>) {
    let mut shutdown = engine.shutdown.clone();
    loop {
        let before = engine.now() - engine.config.retention.as_millis() as i64;
        loop {
            match engine.store.prune(before).await {
                Ok((0, 0)) => break,
                Ok((runs, events)) => tracing::debug!(runs, events, "pruned history"),
                Err(e) => {
                    tracing::warn!(error = %e, "pruning history");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(300)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
