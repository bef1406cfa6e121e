//! Flow control on SQLite: admitting new runs (rate limits, singletons, debounce, batches,
//! throttle, priority) and claiming queue items under concurrency limits.
//!
//! Concurrency: every SDK call of a run carries the run's step-limit keys (`ck1`, `ck2`)
//! and a run's first call carries its run-limit key (`rk`). An item whose key is full when
//! it comes up is parked (`blocked_on`) and leaves the claim scan, so a hot key's backlog
//! never sits in front of other keys' work; each slot that frees un-parks the oldest item
//! parked on that key. A periodic repair un-parks anything a lost wake-up left behind.

use super::{insert_event, j};
use crate::store::{
    skipped_invoke_event, start_item_id, Finish, Hold, NewItem, NewRun, QueueInfo, QueueItem,
    RunStatus, SkipReason, Slot,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

/// Version 1 → 2: flow-control state.
pub(super) const SCHEMA_V2: &str = r#"
ALTER TABLE runs ADD COLUMN ck TEXT;
ALTER TABLE runs ADD COLUMN run_slot TEXT;
ALTER TABLE runs ADD COLUMN started INTEGER NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN singleton_key TEXT;
CREATE INDEX runs_singleton ON runs(fn_slug, singleton_key)
  WHERE singleton_key IS NOT NULL AND status = 'Running';
CREATE INDEX runs_slot ON runs(run_slot)
  WHERE run_slot IS NOT NULL AND status = 'Running' AND started = 1;
ALTER TABLE queue ADD COLUMN ck1 TEXT;
ALTER TABLE queue ADD COLUMN cl1 INTEGER;
ALTER TABLE queue ADD COLUMN ck2 TEXT;
ALTER TABLE queue ADD COLUMN cl2 INTEGER;
ALTER TABLE queue ADD COLUMN rk TEXT;
ALTER TABLE queue ADD COLUMN rl INTEGER;
ALTER TABLE queue ADD COLUMN blocked_on TEXT;
ALTER TABLE queue ADD COLUMN hold TEXT;
DROP INDEX queue_due;
CREATE INDEX queue_due ON queue(due_at) WHERE blocked_on IS NULL;
CREATE INDEX queue_ck1 ON queue(ck1, due_at) WHERE ck1 IS NOT NULL AND lease_owner IS NOT NULL;
CREATE INDEX queue_ck2 ON queue(ck2, due_at) WHERE ck2 IS NOT NULL AND lease_owner IS NOT NULL;
CREATE INDEX queue_blocked ON queue(blocked_on, due_at) WHERE blocked_on IS NOT NULL;
CREATE TABLE gcra(key TEXT PRIMARY KEY, tat INTEGER NOT NULL);
CREATE TABLE debounces(
  fn_slug TEXT NOT NULL, key TEXT NOT NULL, run_id TEXT NOT NULL,
  first_at INTEGER NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY(fn_slug, key));
CREATE INDEX debounces_run ON debounces(run_id);
CREATE TABLE batches(
  fn_slug TEXT NOT NULL, key TEXT NOT NULL, run_id TEXT NOT NULL,
  size INTEGER NOT NULL, PRIMARY KEY(fn_slug, key));
CREATE INDEX batches_run ON batches(run_id);
CREATE TABLE run_triggers(internal_id TEXT NOT NULL, run_id TEXT NOT NULL,
  PRIMARY KEY(internal_id, run_id));
CREATE TABLE skips(
  seq INTEGER PRIMARY KEY AUTOINCREMENT, internal_id TEXT NOT NULL, fn_slug TEXT NOT NULL,
  reason TEXT NOT NULL, at INTEGER NOT NULL);
CREATE INDEX skips_event ON skips(internal_id);
"#;

/// How often the claim path re-checks parked items (lost wake-ups, raised limits).
pub(super) const REPAIR_EVERY_MS: i64 = 5_000;

/// What admitting a would-be run decided.
pub(super) enum Admit {
    /// Create the run (the start item may have been moved or held).
    Create,
    /// The event joined an existing run (debounce, batch) or was dropped.
    Absorbed,
}

fn gcra_tat(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT tat FROM gcra WHERE key=?")?
        .query_row([key], |r| r.get(0))
        .optional()
}

fn set_gcra_tat(conn: &Connection, key: &str, tat: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO gcra(key, tat) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET tat=?2",
    )?
    .execute(params![key, tat])?;
    Ok(())
}

fn record_skip(
    conn: &Connection,
    run: &NewRun,
    reason: SkipReason,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO skips(internal_id, fn_slug, reason, at) VALUES (?,?,?,?)")?
        .execute(params![
            run.trigger_internal_id,
            run.fn_slug,
            reason.as_str(),
            now
        ])?;
    if let Some(ev) = run
        .events
        .first()
        .and_then(|e| skipped_invoke_event(&run.fn_slug, e, reason, now))
    {
        insert_event(conn, &ev)?;
    }
    metrics::counter!("cairn_runs_skipped_total", "reason" => reason.as_str()).increment(1);
    Ok(())
}

/// Apply a new run's flow control. On `Create`, `start` holds the start item's time and
/// hold reason; the caller inserts the run and then calls [`after_create`].
pub(super) fn admit(
    conn: &Connection,
    run: &NewRun,
    now: i64,
    start: &mut (i64, Option<&'static str>),
) -> rusqlite::Result<Admit> {
    let fl = &run.flow;
    if let Some((g, why)) = &fl.rate_limit {
        match g.admit(gcra_tat(conn, &g.key)?, now) {
            Some(tat) => set_gcra_tat(conn, &g.key, tat)?,
            None => {
                record_skip(conn, run, *why, now)?;
                return Ok(Admit::Absorbed);
            }
        }
    }
    if let Some((key, cancel)) = &fl.singleton {
        let running: Vec<String> = conn
            .prepare_cached(
                "SELECT run_id FROM runs WHERE fn_slug=? AND singleton_key=? AND status='Running'",
            )?
            .query_map(params![run.fn_slug, key], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if !running.is_empty() {
            if !cancel {
                record_skip(conn, run, SkipReason::Singleton, now)?;
                return Ok(Admit::Absorbed);
            }
            for id in running {
                super::finish_run(
                    conn,
                    &id,
                    &Finish {
                        status: RunStatus::Cancelled,
                        output: serde_json::json!({"error": "cancelled", "name": "Cancelled",
                            "message": format!("run cancelled by a newer singleton run {}", run.run_id)}),
                    },
                    now,
                    true,
                )?;
            }
        }
    }
    let event = run.events.first().cloned().unwrap_or(Value::Null);
    if let Some(d) = &fl.debounce {
        let open: Option<(String, i64, i64)> = conn
            .prepare_cached("SELECT run_id, first_at, ts FROM debounces WHERE fn_slug=? AND key=?")?
            .query_row(params![run.fn_slug, d.key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let fire = |first_at: i64| {
            let at = now + d.period_ms;
            d.timeout_ms.map_or(at, |t| at.min(first_at + t))
        };
        if let Some((run_id, first_at, ts)) = open {
            if d.ts >= ts {
                // The event with the latest `ts` becomes the run's trigger.
                conn.prepare_cached("UPDATE runs SET events=?, trigger_event=? WHERE run_id=?")?
                    .execute(params![j(&vec![&event]), run.trigger_internal_id, run_id])?;
                conn.prepare_cached(
                    "UPDATE pauses SET trigger_event=? WHERE run_id=? AND kind='cancel'",
                )?
                .execute(params![j(&event), run_id])?;
                conn.prepare_cached("UPDATE debounces SET ts=? WHERE run_id=?")?
                    .execute(params![d.ts, run_id])?;
            }
            let at = fire(first_at);
            conn.prepare_cached(
                "UPDATE queue SET available_at=?1, due_at=?1 WHERE id=?2 AND lease_owner IS NULL",
            )?
            .execute(params![at, start_item_id(&run_id)])?;
            return Ok(Admit::Absorbed);
        }
        *start = (fire(now), Some("debounce"));
    }
    if let Some(b) = &fl.batch {
        let open: Option<(String, i64)> = conn
            .prepare_cached("SELECT run_id, size FROM batches WHERE fn_slug=? AND key=?")?
            .query_row(params![run.fn_slug, b.key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((run_id, size)) = open {
            // SQLite appends to the stored array itself: re-parsing and re-writing a batch
            // of large events in Rust for every member made filling it quadratic.
            let n = conn
                .prepare_cached(
                    "UPDATE runs SET events=json_insert(events, '$[#]', json(?)) WHERE run_id=?",
                )?
                .execute(params![j(&event), run_id])?;
            if n == 1 {
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO run_triggers(internal_id, run_id) VALUES (?,?)",
                )?
                .execute(params![run.trigger_internal_id, run_id])?;
                if size + 1 >= i64::from(b.max_size) {
                    close_batch(conn, &run_id, now)?;
                } else {
                    conn.prepare_cached("UPDATE batches SET size=size+1 WHERE run_id=?")?
                        .execute([&run_id])?;
                }
                return Ok(Admit::Absorbed);
            }
        }
        if b.max_size > 1 {
            *start = (now + b.timeout_ms, Some("batch"));
        }
    }
    if let Some(g) = &fl.throttle {
        let (at, tat) = g.delay(gcra_tat(conn, &g.key)?, start.0);
        set_gcra_tat(conn, &g.key, tat)?;
        if at > start.0 {
            *start = (at, Some("throttle"));
        }
    }
    start.0 -= fl.priority_ms;
    Ok(Admit::Create)
}

/// A full batch starts now.
fn close_batch(conn: &Connection, run_id: &str, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM batches WHERE run_id=?")?
        .execute([run_id])?;
    conn.prepare_cached(
        "UPDATE queue SET available_at=?1, due_at=?1, hold=NULL WHERE id=?2 AND lease_owner IS NULL",
    )?
    .execute(params![now, start_item_id(run_id)])?;
    Ok(())
}

/// Record the open debounce or batch a created run starts.
pub(super) fn after_create(conn: &Connection, run: &NewRun, now: i64) -> rusqlite::Result<()> {
    let fl = &run.flow;
    if let Some(d) = &fl.debounce {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO debounces(fn_slug, key, run_id, first_at, ts) VALUES (?,?,?,?,?)",
        )?
        .execute(params![run.fn_slug, d.key, run.run_id, now, d.ts])?;
    }
    if let Some(b) = fl.batch.as_ref().filter(|b| b.max_size > 1) {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO batches(fn_slug, key, run_id, size) VALUES (?,?,?,1)",
        )?
        .execute(params![run.fn_slug, b.key, run.run_id])?;
    }
    Ok(())
}

/// Insert a queue item carrying concurrency keys (and, for a run's first call, a hold reason).
pub(super) fn insert_keyed(
    conn: &Connection,
    item: &NewItem,
    slots: &[Slot],
    run_slot: Option<&Slot>,
    hold: Option<&str>,
) -> rusqlite::Result<()> {
    let (k1, l1) = slots.first().map(|s| (&s.key, s.limit)).unzip();
    let (k2, l2) = slots.get(1).map(|s| (&s.key, s.limit)).unzip();
    let (rk, rl) = run_slot.map(|s| (&s.key, s.limit)).unzip();
    conn.prepare_cached(
        "INSERT OR IGNORE INTO queue(id, run_id, kind, available_at, due_at, attempt,
           ck1, cl1, ck2, cl2, rk, rl, hold) VALUES (?1,?2,?3,?4,?4,0,?5,?6,?7,?8,?9,?10,?11)",
    )?
    .execute(params![
        item.id,
        item.run_id,
        j(&item.kind),
        item.available_at,
        k1,
        l1,
        k2,
        l2,
        rk,
        rl,
        hold
    ])?;
    Ok(())
}

/// Holders of `key` now: leased calls for step keys, started running runs for run keys.
fn in_progress(conn: &Connection, key: &str, now: i64) -> rusqlite::Result<i64> {
    if key.starts_with("run:") {
        return conn
            .prepare_cached(
                "SELECT count(*) FROM runs WHERE run_slot=? AND status='Running' AND started=1",
            )?
            .query_row([key], |r| r.get(0));
    }
    conn.prepare_cached(
        "SELECT (SELECT count(*) FROM queue WHERE ck1=?1 AND lease_owner IS NOT NULL AND due_at>?2)
              + (SELECT count(*) FROM queue WHERE ck2=?1 AND lease_owner IS NOT NULL AND due_at>?2)",
    )?
    .query_row(params![key, now], |r| r.get(0))
}

/// A slot of `key` freed: un-park the item that has waited longest for it.
pub(super) fn free(conn: &Connection, key: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE queue SET blocked_on=NULL WHERE id =
           (SELECT id FROM queue WHERE blocked_on=? ORDER BY due_at LIMIT 1)",
    )?
    .execute([key])?;
    Ok(())
}

/// The step keys of a leased item, so the caller can free them once it stops running.
pub(super) fn item_keys(conn: &Connection, id: &str) -> rusqlite::Result<Vec<String>> {
    let row: Option<(Option<String>, Option<String>)> = conn
        .prepare_cached("SELECT ck1, ck2 FROM queue WHERE id=? AND lease_owner IS NOT NULL")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row
        .map(|(a, b)| a.into_iter().chain(b).collect())
        .unwrap_or_default())
}

/// Keys a run holds right now (its leased calls' step keys and its run key), before the
/// run ends and its items go.
pub(super) fn run_keys(conn: &Connection, run_id: &str, now: i64) -> rusqlite::Result<Vec<String>> {
    let mut keys: Vec<String> = Vec::new();
    let mut st = conn.prepare_cached(
        "SELECT ck1, ck2 FROM queue WHERE run_id=? AND lease_owner IS NOT NULL AND due_at>?
           AND (ck1 IS NOT NULL OR ck2 IS NOT NULL)",
    )?;
    let rows = st.query_map(params![run_id, now], |r| {
        Ok((
            r.get::<_, Option<String>>(0)?,
            r.get::<_, Option<String>>(1)?,
        ))
    })?;
    for row in rows {
        let (a, b) = row?;
        keys.extend(a.into_iter().chain(b));
    }
    let slot: Option<Option<String>> = conn
        .prepare_cached("SELECT run_slot FROM runs WHERE run_id=? AND started=1")?
        .query_row([run_id], |r| r.get(0))
        .optional()?;
    keys.extend(slot.flatten());
    Ok(keys)
}

/// The (key, limit) pairs a queue row carries in the given (key column, limit column) pairs.
fn row_keys(r: &rusqlite::Row, cols: &[(usize, usize)]) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut keys = Vec::new();
    for &(k, l) in cols {
        if let Some(key) = r.get::<_, Option<String>>(k)? {
            keys.push((key, r.get::<_, Option<i64>>(l)?.unwrap_or(i64::MAX)));
        }
    }
    Ok(keys)
}

type Candidate = (QueueItem, Vec<(String, i64)>, Option<String>);

/// Lease up to `limit` due items, parking those whose concurrency keys are full.
pub(super) fn claim(
    conn: &Connection,
    owner: &str,
    now: i64,
    lease_until: i64,
    limit: usize,
    repair: bool,
) -> rusqlite::Result<Vec<QueueItem>> {
    if repair {
        repair_parked(conn, now)?;
    }
    // Look a little past `limit` so a few parked items do not cost a round trip.
    let scan = (limit * 4).max(16) as i64;
    let candidates: Vec<Candidate> = conn
        .prepare_cached(
            "SELECT id, run_id, kind, attempt, available_at, ck1, cl1, ck2, cl2, rk, rl, hold
             FROM queue WHERE blocked_on IS NULL AND due_at<=? ORDER BY due_at LIMIT ?",
        )?
        .query_map(params![now, scan], |r| {
            let kind: String = r.get(2)?;
            let keys = row_keys(r, &[(5, 6), (9, 10), (7, 8)])?;
            Ok((
                QueueItem {
                    id: r.get(0)?,
                    run_id: r.get(1)?,
                    kind: serde_json::from_str(&kind).unwrap_or(crate::store::ItemKind::Finalize),
                    attempt: r.get(3)?,
                    available_at: r.get(4)?,
                },
                keys,
                r.get(11)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut held: std::collections::HashMap<String, i64> = Default::default();
    let mut out = Vec::new();
    for (item, keys, hold) in candidates {
        if out.len() >= limit {
            break;
        }
        let mut full = None;
        for (key, lim) in &keys {
            let n = match held.get(key) {
                Some(n) => *n,
                None => {
                    let n = in_progress(conn, key, now)?;
                    held.insert(key.clone(), n);
                    n
                }
            };
            if n >= *lim {
                full = Some(key.clone());
                break;
            }
        }
        if let Some(key) = full {
            conn.prepare_cached("UPDATE queue SET blocked_on=? WHERE id=?")?
                .execute(params![key, item.id])?;
            continue;
        }
        for (key, _) in &keys {
            *held.entry(key.clone()).or_default() += 1;
        }
        conn.prepare_cached("UPDATE queue SET lease_owner=?, due_at=? WHERE id=?")?
            .execute(params![owner, lease_until, item.id])?;
        if keys.iter().any(|(k, _)| k.starts_with("run:")) {
            conn.prepare_cached("UPDATE runs SET started=1 WHERE run_id=?")?
                .execute([&item.run_id])?;
        }
        match hold.as_deref() {
            Some("debounce") => {
                conn.prepare_cached("DELETE FROM debounces WHERE run_id=?")?
                    .execute([&item.run_id])?;
            }
            Some("batch") => {
                conn.prepare_cached("DELETE FROM batches WHERE run_id=?")?
                    .execute([&item.run_id])?;
            }
            _ => {}
        }
        if hold.is_some() {
            conn.prepare_cached("UPDATE queue SET hold=NULL WHERE id=?")?
                .execute([&item.id])?;
        }
        out.push(item);
    }
    Ok(out)
}

/// Lease the run's next due item to `owner` if its concurrency keys have room, unless it is
/// a first call (run keys, an open debounce or batch), which only the claim path handles.
/// A run's next due item, read in the commit of each step; `queue_run_due` serves it in order.
const LEASE_NEXT: &str = "SELECT id, kind, attempt, available_at, ck1, cl1, ck2, cl2 FROM queue
    WHERE run_id=? AND lease_owner IS NULL AND due_at<=? AND blocked_on IS NULL
      AND rk IS NULL AND hold IS NULL
    ORDER BY due_at LIMIT 1";

pub(super) fn lease_next(
    conn: &Connection,
    run_id: &str,
    owner: &str,
    now: i64,
    lease_until: i64,
) -> rusqlite::Result<Option<QueueItem>> {
    type Next = (String, String, i64, i64, Vec<(String, i64)>);
    let next: Option<Next> = conn
        .prepare_cached(LEASE_NEXT)?
        .query_row(params![run_id, now], |r| {
            let keys = row_keys(r, &[(4, 5), (6, 7)])?;
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, keys))
        })
        .optional()?;
    let Some((id, kind, attempt, available_at, keys)) = next else {
        return Ok(None);
    };
    let Ok(kind) = serde_json::from_str(&kind) else {
        return Ok(None);
    };
    // The call that just finished no longer counts, so a run under its limit goes on.
    for (key, limit) in &keys {
        if in_progress(conn, key, now)? >= *limit {
            return Ok(None);
        }
    }
    conn.prepare_cached("UPDATE queue SET lease_owner=?, due_at=? WHERE id=?")?
        .execute(params![owner, lease_until, id])?;
    Ok(Some(QueueItem {
        id,
        run_id: run_id.to_string(),
        kind,
        attempt,
        available_at,
    }))
}

/// Un-park as many items per key as the key has free slots.
fn repair_parked(conn: &Connection, now: i64) -> rusqlite::Result<()> {
    let parked: Vec<(String, i64)> = conn
        .prepare_cached(
            "SELECT blocked_on, count(*) FROM queue WHERE blocked_on IS NOT NULL GROUP BY blocked_on",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (key, waiting) in parked {
        let limit: i64 = conn
            .prepare_cached(
                "SELECT CASE WHEN ck1=?1 THEN cl1 WHEN ck2=?1 THEN cl2 ELSE rl END
                 FROM queue WHERE blocked_on=?1 ORDER BY due_at LIMIT 1",
            )?
            .query_row([&key], |r| r.get::<_, Option<i64>>(0))?
            .unwrap_or(i64::MAX);
        let free_slots = (limit - in_progress(conn, &key, now)?).clamp(0, waiting);
        conn.prepare_cached(
            "UPDATE queue SET blocked_on=NULL WHERE id IN
               (SELECT id FROM queue WHERE blocked_on=? ORDER BY due_at LIMIT ?)",
        )?
        .execute(params![key, free_slots])?;
    }
    Ok(())
}

/// The queue items of a run and what holds each.
pub(super) fn run_queue(
    conn: &Connection,
    run_id: &str,
    now: i64,
) -> rusqlite::Result<Vec<QueueInfo>> {
    /// An item, the key it is parked on, its hold reason and the parked key's limit.
    type Row = (QueueInfo, Option<String>, Option<String>, Option<i64>);
    let rows: Vec<Row> = conn
        .prepare_cached(
            "SELECT id, kind, available_at, attempt, lease_owner IS NOT NULL AND due_at>?2,
                    blocked_on, hold,
                    CASE WHEN ck1=blocked_on THEN cl1 WHEN ck2=blocked_on THEN cl2 ELSE rl END
             FROM queue WHERE run_id=?1 ORDER BY available_at",
        )?
        .query_map(params![run_id, now], |r| {
            let kind: String = r.get(1)?;
            Ok((
                QueueInfo {
                    id: r.get(0)?,
                    kind: serde_json::from_str(&kind).unwrap_or(crate::store::ItemKind::Finalize),
                    available_at: r.get(2)?,
                    attempt: r.get(3)?,
                    leased: r.get(4)?,
                    waiting_on: None,
                },
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (mut info, blocked, hold, limit) in rows {
        info.waiting_on = if info.leased {
            None
        } else if let Some(key) = blocked {
            Some(Hold::Concurrency {
                in_progress: in_progress(conn, &key, now)?,
                limit: limit.unwrap_or(0) as u32,
                key,
            })
        } else {
            match hold.as_deref() {
                Some("debounce") => Some(Hold::Debounce),
                Some("batch") => Some(Hold::Batch),
                Some("throttle") if info.available_at > now => Some(Hold::Throttle),
                _ if info.available_at > now => Some(Hold::Scheduled),
                _ => None,
            }
        };
        out.push(info);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{SqliteStore, LOAD_STEPS, MIGRATIONS, SCHEMA_VERSION};
    use super::LEASE_NEXT;
    use crate::store::Store;

    /// The statements run for every step read their rows in index order: a temporary B-tree
    /// (SQLite's sort) costs an allocation of a page cache on each call, which showed up in
    /// profiles of the single writer thread.
    #[test]
    fn per_step_reads_do_not_sort() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.db");
        drop(SqliteStore::open(&path).unwrap());
        let c = rusqlite::Connection::open(&path).unwrap();
        for sql in [LEASE_NEXT, LOAD_STEPS] {
            let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(nulls), |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().all(|step| !step.contains("TEMP B-TREE")),
                "{sql}: {plan:?}"
            );
            assert!(
                plan.iter().any(|step| step.contains("USING INDEX")),
                "{sql}: {plan:?}"
            );
        }
    }

    /// A database written by the previous schema opens, migrates and keeps its data.
    #[tokio::test]
    async fn version_1_database_migrates_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(&format!("{} PRAGMA user_version=1;", MIGRATIONS[0]))
                .unwrap();
            c.execute(
                "INSERT INTO runs(run_id, fn_slug, idem_key, trigger_event, status, events, created_at)
                 VALUES ('r1', 'app-f', 'e1', 'ev1', 'Running', '[]', 1)",
                [],
            )
            .unwrap();
            c.execute(
                "INSERT INTO queue(id, run_id, kind, available_at, due_at) VALUES ('r1:start', 'r1', '{\"kind\":\"finalize\"}', 0, 0)",
                [],
            )
            .unwrap();
            // Memos as versions before 5 wrote them (serde_json, not canonical): one of a
            // running run, one of an ended run, which is never sent again.
            c.execute(
                "INSERT INTO runs(run_id, fn_slug, idem_key, trigger_event, status, events, created_at)
                 VALUES ('r2', 'app-f', 'e2', 'ev2', 'Completed', '[]', 1)",
                [],
            )
            .unwrap();
            c.execute(
                r#"INSERT INTO steps(run_id, hash, memo) VALUES
                   ('r1', 'h', '{"data":{"n":2.0,"big":1e21}}'), ('r2', 'h', '{"data":2.0}')"#,
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.get_run("r1").await.unwrap().is_some());
        let live = store.steps("r1").await.unwrap();
        assert_eq!(live[0].1.as_str(), r#"{"data":{"big":1e+21,"n":2}}"#);
        let ended = store.steps("r2").await.unwrap();
        assert_eq!(ended[0].1.as_str(), r#"{"data":2.0}"#);
        let claimed = store.claim("me", 10, 100, 8).await.unwrap();
        assert_eq!(
            claimed.len(),
            1,
            "old queue items are claimable after the migration"
        );
        drop(store);
        let c = rusqlite::Connection::open(&path).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }
}
