//! Flow control on PostgreSQL: admitting new runs (rate limits, singletons, debounce,
//! batches, throttle, priority) and claiming queue items under concurrency limits.
//!
//! The rules are the SQLite store's (see `store::sqlite::flow`): step-limit keys ride on
//! every SDK call (`ck1`, `ck2`), a run's first call carries its run-limit key (`rk`), a
//! call whose key is full is parked (`blocked_on`) and un-parked when a slot frees, and a
//! periodic repair catches lost wake-ups. What changes is that several nodes do this at
//! once: each key's check-and-lease, and each flow-control row's read-modify-write, runs
//! under a transaction-scoped advisory lock on that key.

use super::{
    event_lock, exec, finish_run, insert_event, insert_item, insert_pause, item_kind, j, lock,
    lock_all, lock_run, query, query_opt, resume_pause, row_event, Announce, EVENT_COLS, R,
};
use crate::store::{
    skipped_invoke_event, start_item_id, Finish, Hold, NewItem, NewRun, Pause, PauseMatcher,
    QueueInfo, QueueItem, RunStatus, SkipReason, Slot,
};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use std::collections::HashMap;

/// How often a node's claim path re-checks parked items (lost wake-ups, raised limits).
pub(super) const REPAIR_EVERY_MS: i64 = 5_000;

/// The advisory-lock name of a concurrency key.
fn key_lock(key: &str) -> String {
    format!("cairn:ck:{key}")
}

/// Read a GCRA key's theoretical arrival time; the caller holds the key's lock.
async fn gcra_tat<C: GenericClient>(c: &C, key: &str) -> R<Option<i64>> {
    lock(c, &format!("cairn:gcra:{key}")).await?;
    Ok(query_opt(c, "SELECT tat FROM gcra WHERE key=$1", &[&key])
        .await?
        .map(|r| r.get(0)))
}

async fn set_gcra_tat<C: GenericClient>(c: &C, key: &str, tat: i64) -> R<()> {
    exec(
        c,
        "INSERT INTO gcra(key, tat) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET tat=$2",
        &[&key, &tat],
    )
    .await?;
    Ok(())
}

async fn record_skip<C: GenericClient>(c: &C, run: &NewRun, reason: SkipReason, now: i64) -> R<()> {
    exec(
        c,
        "INSERT INTO skips(internal_id, fn_slug, reason, at) VALUES ($1,$2,$3,$4)",
        &[
            &run.trigger_internal_id,
            &run.fn_slug,
            &reason.as_str(),
            &now,
        ],
    )
    .await?;
    if let Some(ev) = run
        .events
        .first()
        .and_then(|e| skipped_invoke_event(&run.fn_slug, e, reason, now))
    {
        insert_event(c, &ev).await?;
    }
    metrics::counter!("cairn_runs_skipped_total", "reason" => reason.as_str()).increment(1);
    Ok(())
}

/// Create one run of an event under its flow control. Returns whether a run was created
/// (false: a redelivery, or the event joined another run or was dropped).
pub(super) async fn create_run<C: GenericClient>(
    c: &C,
    r: &NewRun,
    now: i64,
    matcher: &dyn PauseMatcher,
) -> R<bool> {
    // A redelivered event must not use up a rate limit or join a batch twice. Without flow
    // control nothing is admitted before the insert, which is conditional on the same
    // uniqueness: no look is needed then.
    if !r.flow.is_none() {
        let seen = query_opt(
            c,
            "SELECT 1 FROM runs WHERE fn_slug=$1 AND idem_key=$2",
            &[&r.fn_slug, &r.idem_key],
        )
        .await?
        .is_some();
        if seen {
            return Ok(false);
        }
    }
    let start_id = start_item_id(&r.run_id);
    let mut start = (r.start_at(now), None);
    if !admit(c, r, now, &mut start).await? {
        return Ok(false);
    }
    let fl = &r.flow;
    let (ck1, cl1) = fl
        .concurrency
        .first()
        .map(|s| (&s.key, i64::from(s.limit)))
        .unzip();
    let (ck2, cl2) = fl
        .concurrency
        .get(1)
        .map(|s| (&s.key, i64::from(s.limit)))
        .unzip();
    let n = exec(
        c,
        "INSERT INTO runs(run_id, fn_slug, idem_key, trigger_event, status, events, created_at,
           ck1, cl1, ck2, cl2, run_slot, started, singleton_key)
         VALUES ($1,$2,$3,$4,'Running',$5,$6,$7,$8,$9,$10,$11,$12,$13)
         ON CONFLICT DO NOTHING",
        &[
            &r.run_id,
            &r.fn_slug,
            &r.idem_key,
            &r.trigger_internal_id,
            &j(&r.events),
            &r.created_at,
            &ck1,
            &cl1,
            &ck2,
            &cl2,
            &fl.run_slot.as_ref().map(|s| &s.key),
            &fl.run_slot.is_none(),
            &fl.singleton.as_ref().map(|s| &s.0),
        ],
    )
    .await?;
    if n == 0 {
        return Ok(false);
    }
    for item in &r.items {
        if item.id == start_id {
            let item = NewItem {
                available_at: start.0,
                ..item.clone()
            };
            insert_keyed(c, &item, &fl.concurrency, fl.run_slot.as_ref(), start.1).await?;
        } else {
            insert_item(c, item).await?;
        }
    }
    for p in &r.pauses {
        insert_pause(c, p).await?;
    }
    for p in &r.pauses {
        if cancelled_by_earlier_match(c, p, matcher, now).await? {
            break;
        }
    }
    after_create(c, r, now).await?;
    Ok(true)
}

/// A cancel rule is created with its run, starting after the trigger's sequence number. On
/// one node events are matched in sequence order, so no later event has been matched yet;
/// with several nodes one may have been, by another node, before this run existed. Under the
/// rule's event-name lock, look for such an event and cancel the run if one matches.
async fn cancelled_by_earlier_match<C: GenericClient>(
    c: &C,
    p: &Pause,
    matcher: &dyn PauseMatcher,
    now: i64,
) -> R<bool> {
    // Exclusive, like every pause insert, even when the trigger's shared lock on the same
    // name is held (an upgrade; two such upgrades deadlock, and the retry resolves it).
    lock(c, &event_lock(&p.event_name)).await?;
    let later = query(
        c,
        &format!(
            "SELECT {EVENT_COLS} FROM events WHERE name=$1 AND seq>$2 AND processed ORDER BY seq"
        ),
        &[&p.event_name, &p.since_seq],
    )
    .await?;
    for ev in later.iter().map(row_event) {
        if matcher.matches(p, &ev.event) {
            resume_pause(c, p, &ev.event, now).await?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// Apply a new run's flow control; false means the event was absorbed (joined a debounce
/// or batch) or dropped. On true, `start` holds the start item's time and hold reason.
async fn admit<C: GenericClient>(
    c: &C,
    run: &NewRun,
    now: i64,
    start: &mut (i64, Option<&'static str>),
) -> R<bool> {
    let fl = &run.flow;
    if let Some((g, why)) = &fl.rate_limit {
        match g.admit(gcra_tat(c, &g.key).await?, now) {
            Some(tat) => set_gcra_tat(c, &g.key, tat).await?,
            None => {
                record_skip(c, run, *why, now).await?;
                return Ok(false);
            }
        }
    }
    if let Some((key, cancel)) = &fl.singleton {
        lock(c, &format!("cairn:single:{}:{key}", run.fn_slug)).await?;
        let running: Vec<String> = query(
            c,
            "SELECT run_id FROM runs WHERE fn_slug=$1 AND singleton_key=$2 AND status='Running'",
            &[&run.fn_slug, key],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        if !running.is_empty() {
            if !cancel {
                record_skip(c, run, SkipReason::Singleton, now).await?;
                return Ok(false);
            }
            for id in running {
                lock_run(c, &id).await?;
                finish_run(
                    c,
                    &id,
                    &Finish {
                        status: RunStatus::Cancelled,
                        output: serde_json::json!({"error": "cancelled", "name": "Cancelled",
                            "message": format!("run cancelled by a newer singleton run {}", run.run_id)}),
                    },
                    now,
                    true,
                    Announce::Everywhere,
                )
                .await?;
            }
        }
    }
    let event = run.events.first().cloned().unwrap_or(Value::Null);
    if let Some(d) = &fl.debounce {
        lock(c, &format!("cairn:debounce:{}:{}", run.fn_slug, d.key)).await?;
        let open = query_opt(
            c,
            "SELECT run_id, first_at, ts FROM debounces WHERE fn_slug=$1 AND key=$2",
            &[&run.fn_slug, &d.key],
        )
        .await?
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
            )
        });
        let fire = |first_at: i64| {
            let at = now + d.period_ms;
            d.timeout_ms.map_or(at, |t| at.min(first_at + t))
        };
        if let Some((run_id, first_at, ts)) = open {
            if d.ts >= ts {
                // The event with the latest `ts` becomes the run's trigger.
                exec(
                    c,
                    "UPDATE runs SET events=$1, trigger_event=$2 WHERE run_id=$3",
                    &[&j(&vec![&event]), &run.trigger_internal_id, &run_id],
                )
                .await?;
                exec(
                    c,
                    "UPDATE pauses SET trigger_event=$1 WHERE run_id=$2 AND kind='cancel'",
                    &[&j(&event), &run_id],
                )
                .await?;
                exec(
                    c,
                    "UPDATE debounces SET ts=$1 WHERE run_id=$2",
                    &[&d.ts, &run_id],
                )
                .await?;
            }
            let at = fire(first_at);
            exec(
                c,
                "UPDATE queue SET available_at=$1, due_at=$1 WHERE id=$2 AND lease_owner IS NULL",
                &[&at, &start_item_id(&run_id)],
            )
            .await?;
            return Ok(false);
        }
        *start = (fire(now), Some("debounce"));
    }
    if let Some(b) = &fl.batch {
        lock(c, &format!("cairn:batch:{}:{}", run.fn_slug, b.key)).await?;
        let open = query_opt(
            c,
            "SELECT run_id, size FROM batches WHERE fn_slug=$1 AND key=$2",
            &[&run.fn_slug, &b.key],
        )
        .await?
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)));
        if let Some((run_id, size)) = open {
            if let Some(existing) = lock_run(c, &run_id).await? {
                let mut events = existing.events;
                events.push(event);
                exec(
                    c,
                    "UPDATE runs SET events=$1 WHERE run_id=$2",
                    &[&j(&events), &run_id],
                )
                .await?;
                exec(
                    c,
                    "INSERT INTO run_triggers(internal_id, run_id) VALUES ($1,$2) ON CONFLICT DO NOTHING",
                    &[&run.trigger_internal_id, &run_id],
                )
                .await?;
                if size + 1 >= i64::from(b.max_size) {
                    close_batch(c, &run_id, now).await?;
                } else {
                    exec(
                        c,
                        "UPDATE batches SET size=size+1 WHERE run_id=$1",
                        &[&run_id],
                    )
                    .await?;
                }
                return Ok(false);
            }
        }
        if b.max_size > 1 {
            *start = (now + b.timeout_ms, Some("batch"));
        }
    }
    if let Some(g) = &fl.throttle {
        let (at, tat) = g.delay(gcra_tat(c, &g.key).await?, start.0);
        set_gcra_tat(c, &g.key, tat).await?;
        if at > start.0 {
            *start = (at, Some("throttle"));
        }
    }
    start.0 -= fl.priority_ms;
    Ok(true)
}

/// A full batch starts now.
async fn close_batch<C: GenericClient>(c: &C, run_id: &str, now: i64) -> R<()> {
    exec(c, "DELETE FROM batches WHERE run_id=$1", &[&run_id]).await?;
    exec(
        c,
        "UPDATE queue SET available_at=$1, due_at=$1, hold=NULL WHERE id=$2 AND lease_owner IS NULL",
        &[&now, &start_item_id(run_id)],
    )
    .await?;
    Ok(())
}

/// Record the open debounce or batch a created run starts.
async fn after_create<C: GenericClient>(c: &C, run: &NewRun, now: i64) -> R<()> {
    let fl = &run.flow;
    if let Some(d) = &fl.debounce {
        exec(
            c,
            "INSERT INTO debounces(fn_slug, key, run_id, first_at, ts) VALUES ($1,$2,$3,$4,$5)
             ON CONFLICT (fn_slug, key) DO UPDATE SET run_id=excluded.run_id,
               first_at=excluded.first_at, ts=excluded.ts",
            &[&run.fn_slug, &d.key, &run.run_id, &now, &d.ts],
        )
        .await?;
    }
    if let Some(b) = fl.batch.as_ref().filter(|b| b.max_size > 1) {
        exec(
            c,
            "INSERT INTO batches(fn_slug, key, run_id, size) VALUES ($1,$2,$3,1)
             ON CONFLICT (fn_slug, key) DO UPDATE SET run_id=excluded.run_id, size=1",
            &[&run.fn_slug, &b.key, &run.run_id],
        )
        .await?;
    }
    Ok(())
}

/// Insert a queue item carrying concurrency keys (and, for a run's first call, a hold reason).
async fn insert_keyed<C: GenericClient>(
    c: &C,
    item: &NewItem,
    slots: &[Slot],
    run_slot: Option<&Slot>,
    hold: Option<&str>,
) -> R<()> {
    let (k1, l1) = slots.first().map(|s| (&s.key, i64::from(s.limit))).unzip();
    let (k2, l2) = slots.get(1).map(|s| (&s.key, i64::from(s.limit))).unzip();
    let (rk, rl) = run_slot.map(|s| (&s.key, i64::from(s.limit))).unzip();
    exec(
        c,
        "INSERT INTO queue(id, run_id, kind, available_at, due_at, attempt,
           ck1, cl1, ck2, cl2, rk, rl, hold) VALUES ($1,$2,$3,$4,$4,0,$5,$6,$7,$8,$9,$10,$11)
         ON CONFLICT (id) DO NOTHING",
        &[
            &item.id,
            &item.run_id,
            &j(&item.kind),
            &item.available_at,
            &k1,
            &l1,
            &k2,
            &l2,
            &rk,
            &rl,
            &hold,
        ],
    )
    .await?;
    Ok(())
}

/// Holders of `key` now: leased calls for step keys, started running runs for run keys.
async fn in_progress<C: GenericClient>(c: &C, key: &str, now: i64) -> R<i64> {
    let rows = if key.starts_with("run:") {
        query(
            c,
            "SELECT count(*) FROM runs WHERE run_slot=$1 AND status='Running' AND started",
            &[&key],
        )
        .await?
    } else {
        query(
            c,
            "SELECT (SELECT count(*) FROM queue WHERE ck1=$1 AND lease_owner IS NOT NULL AND due_at>$2)
                  + (SELECT count(*) FROM queue WHERE ck2=$1 AND lease_owner IS NOT NULL AND due_at>$2)",
            &[&key, &now],
        )
        .await?
    };
    Ok(rows.first().map(|r| r.get(0)).unwrap_or(0))
}

/// Free one slot of each of `keys`: un-park the oldest item waiting on each. The keys'
/// locks are taken first, as the claim takes them before counting holders and parking, so
/// a claim parking an item concurrently is either seen here (and the item un-parked) or
/// counts this slot as free; without them a park committing just after this looked was a
/// lost wake-up, left to the periodic repair.
pub(super) async fn free_all<C: GenericClient>(c: &C, keys: &[String]) -> R<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut locks: Vec<String> = keys.iter().map(|k| key_lock(k)).collect();
    lock_all(c, &mut locks).await?;
    for key in keys {
        free(c, key).await?;
    }
    Ok(())
}

/// A slot of `key` freed: un-park the item that has waited longest for it. An item another
/// transaction holds is skipped rather than waited for; the periodic repair catches it.
async fn free<C: GenericClient>(c: &C, key: &str) -> R<()> {
    exec(
        c,
        "UPDATE queue SET blocked_on=NULL WHERE id =
           (SELECT id FROM queue WHERE blocked_on=$1 ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED)",
        &[&key],
    )
    .await?;
    Ok(())
}

/// The step keys of a leased item, so the caller can free them once it stops running.
pub(super) async fn item_keys<C: GenericClient>(c: &C, id: &str) -> R<Vec<String>> {
    let row = query_opt(
        c,
        "SELECT ck1, ck2 FROM queue WHERE id=$1 AND lease_owner IS NOT NULL FOR UPDATE",
        &[&id],
    )
    .await?;
    Ok(row
        .map(|r| {
            r.get::<_, Option<String>>(0)
                .into_iter()
                .chain(r.get::<_, Option<String>>(1))
                .collect()
        })
        .unwrap_or_default())
}

/// A due item, its concurrency keys with limits, and its hold reason.
type Candidate = (QueueItem, Vec<(String, i64)>, Option<String>);

/// Lease up to `limit` due items, parking those whose concurrency keys are full.
///
/// Due rows are locked with `SKIP LOCKED`, so nodes claiming at once split the work instead
/// of queueing behind each other. On the common path (no keys, no holds) this is two
/// statements: the locking select and one update leasing every item.
pub(super) async fn claim<C: GenericClient>(
    c: &C,
    owner: &str,
    now: i64,
    lease_until: i64,
    limit: usize,
    repair: bool,
) -> R<Vec<QueueItem>> {
    if repair {
        repair_parked(c, now).await?;
    }
    // Look a little past `limit` so a few parked items do not cost a round trip.
    let scan = (limit * 4).max(16) as i64;
    let rows = query(
        c,
        "SELECT id, run_id, kind, attempt, available_at, ck1, cl1, ck2, cl2, rk, rl, hold
         FROM queue WHERE blocked_on IS NULL AND due_at<=$1 ORDER BY due_at LIMIT $2
         FOR UPDATE SKIP LOCKED",
        &[&now, &scan],
    )
    .await?;
    let candidates: Vec<Candidate> = rows
        .iter()
        .map(|r| {
            let mut keys = Vec::new();
            for (k, l) in [(5, 6), (9, 10), (7, 8)] {
                if let Some(key) = r.get::<_, Option<String>>(k) {
                    keys.push((key, r.get::<_, Option<i64>>(l).unwrap_or(i64::MAX)));
                }
            }
            (
                QueueItem {
                    id: r.get(0),
                    run_id: r.get(1),
                    kind: item_kind(r.get(2)),
                    attempt: r.get(3),
                    available_at: r.get(4),
                },
                keys,
                r.get(11),
            )
        })
        .collect();
    // Every key any candidate carries, locked up front in one sorted batch: counting a
    // key's holders and leasing its slot is then atomic across nodes.
    let mut locks: Vec<String> = candidates
        .iter()
        .flat_map(|(_, keys, _)| keys.iter().map(|(k, _)| key_lock(k)))
        .collect();
    lock_all(c, &mut locks).await?;
    let mut held: HashMap<String, i64> = HashMap::new();
    let mut out = Vec::new();
    let mut started: Vec<String> = Vec::new();
    for (item, keys, hold) in candidates {
        if out.len() >= limit {
            break;
        }
        let mut full = None;
        for (key, lim) in &keys {
            let n = match held.get(key) {
                Some(n) => *n,
                None => {
                    let n = in_progress(c, key, now).await?;
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
            exec(
                c,
                "UPDATE queue SET blocked_on=$1 WHERE id=$2",
                &[&key, &item.id],
            )
            .await?;
            continue;
        }
        for (key, _) in &keys {
            *held.entry(key.clone()).or_default() += 1;
        }
        if keys.iter().any(|(k, _)| k.starts_with("run:")) {
            started.push(item.run_id.clone());
        }
        match hold.as_deref() {
            Some("debounce") => {
                exec(c, "DELETE FROM debounces WHERE run_id=$1", &[&item.run_id]).await?;
            }
            Some("batch") => {
                exec(c, "DELETE FROM batches WHERE run_id=$1", &[&item.run_id]).await?;
            }
            _ => {}
        }
        out.push(item);
    }
    if !out.is_empty() {
        let ids: Vec<&str> = out.iter().map(|i| i.id.as_str()).collect();
        exec(
            c,
            "UPDATE queue SET lease_owner=$1, due_at=$2, hold=NULL WHERE id = ANY($3)",
            &[&owner, &lease_until, &ids],
        )
        .await?;
    }
    if !started.is_empty() {
        exec(
            c,
            "UPDATE runs SET started=true WHERE run_id = ANY($1)",
            &[&started],
        )
        .await?;
    }
    Ok(out)
}

/// What one plain claim saw besides the items it leased.
pub(super) struct PlainClaim {
    /// Leased to the caller, oldest first.
    pub items: Vec<QueueItem>,
    /// Items under flow control are due: the locked path must look at them.
    pub flow_due: bool,
    /// The earliest due time after `now` of an item flow control does not park.
    pub next_due: Option<i64>,
}

/// Lease due items that carry no concurrency keys and no hold, in one statement outside any
/// transaction block; also reports whether due items that do carry them are waiting for
/// [`claim`], and when the next item falls due (so the queue loop needs no second read to
/// know how long to sleep). Most work has no flow control, and an idle worker's claim finds
/// nothing: both cost one round trip this way instead of a transaction of three or more.
pub(super) async fn claim_plain<C: GenericClient>(
    c: &C,
    owner: &str,
    now: i64,
    lease_until: i64,
    limit: usize,
) -> R<PlainClaim> {
    // Row tags: 0 a leased item, 1 flow-controlled items are due, 2 the next due time (in
    // the available_at column; the CTE's leases are not visible to it, hence `> now`).
    let rows = query(
        c,
        "WITH c AS (
           UPDATE queue SET lease_owner=$1, due_at=$2 WHERE id IN (
             SELECT id FROM queue WHERE blocked_on IS NULL AND due_at<=$3
               AND ck1 IS NULL AND ck2 IS NULL AND rk IS NULL AND hold IS NULL
             ORDER BY due_at LIMIT $4 FOR UPDATE SKIP LOCKED)
           RETURNING id, run_id, kind, attempt, available_at)
         SELECT id, run_id, kind, attempt, available_at, 0 FROM c
         UNION ALL
         SELECT NULL, NULL, NULL, NULL, NULL, 1 WHERE EXISTS (
           SELECT 1 FROM queue WHERE blocked_on IS NULL AND due_at<=$3
             AND (ck1 IS NOT NULL OR ck2 IS NOT NULL OR rk IS NOT NULL OR hold IS NOT NULL))
         UNION ALL
         SELECT NULL, NULL, NULL, NULL, min(due_at), 2 FROM queue
           WHERE blocked_on IS NULL AND due_at>$3",
        &[&owner, &lease_until, &now, &(limit as i64)],
    )
    .await?;
    let mut claim = PlainClaim {
        items: Vec::with_capacity(rows.len()),
        flow_due: false,
        next_due: None,
    };
    for r in &rows {
        match r.get::<_, i32>(5) {
            1 => claim.flow_due = true,
            2 => claim.next_due = r.get(4),
            _ => claim.items.push(QueueItem {
                id: r.get(0),
                run_id: r.get(1),
                kind: item_kind(r.get(2)),
                attempt: r.get(3),
                available_at: r.get(4),
            }),
        }
    }
    claim.items.sort_by_key(|i| i.available_at);
    Ok(claim)
}

/// Un-park as many items per key as the key has free slots.
async fn repair_parked<C: GenericClient>(c: &C, now: i64) -> R<()> {
    let parked: Vec<(String, i64)> = query(
        c,
        "SELECT blocked_on, count(*) FROM queue WHERE blocked_on IS NOT NULL GROUP BY blocked_on",
        &[],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    for (key, waiting) in parked {
        let limit: i64 = query_opt(
            c,
            "SELECT CASE WHEN ck1=$1 THEN cl1 WHEN ck2=$1 THEN cl2 ELSE rl END
             FROM queue WHERE blocked_on=$1 ORDER BY due_at LIMIT 1",
            &[&key],
        )
        .await?
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .unwrap_or(i64::MAX);
        let free_slots = (limit - in_progress(c, &key, now).await?).clamp(0, waiting);
        exec(
            c,
            "UPDATE queue SET blocked_on=NULL WHERE id IN
               (SELECT id FROM queue WHERE blocked_on=$1 ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&key, &free_slots],
        )
        .await?;
    }
    Ok(())
}

/// The queue items of a run and what holds each.
pub(super) async fn run_queue<C: GenericClient>(
    c: &C,
    run_id: &str,
    now: i64,
) -> R<Vec<QueueInfo>> {
    let rows = query(
        c,
        "SELECT id, kind, available_at, attempt, lease_owner IS NOT NULL AND due_at>$2,
                blocked_on, hold,
                CASE WHEN ck1=blocked_on THEN cl1 WHEN ck2=blocked_on THEN cl2 ELSE rl END
         FROM queue WHERE run_id=$1 ORDER BY available_at",
        &[&run_id, &now],
    )
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut info = QueueInfo {
            id: r.get(0),
            kind: item_kind(r.get(1)),
            available_at: r.get(2),
            attempt: r.get(3),
            leased: r.get(4),
            waiting_on: None,
        };
        let blocked: Option<String> = r.get(5);
        let hold: Option<&str> = r.get(6);
        let limit: Option<i64> = r.get(7);
        info.waiting_on = if info.leased {
            None
        } else if let Some(key) = blocked {
            Some(Hold::Concurrency {
                in_progress: in_progress(c, &key, now).await?,
                limit: limit.unwrap_or(0) as u32,
                key,
            })
        } else {
            match hold {
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
