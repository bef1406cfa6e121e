//! Durable queue workers: claim due items under a lease, run them, and sleep
//! until the next item is due or new work is announced in-process.
//!
//! The database is only asked for work when woken (an enqueue in this process),
//! when the earliest known item falls due, or on a slow safety-net poll that
//! catches work created by other processes sharing the store.

use crate::store::QueueItem;
use crate::Engine;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most items claimed in one round trip.
const CLAIM_BATCH: usize = 64;

/// Items handled here, each with the time until which this process holds its lease as last
/// confirmed by the store (unix ms).
type Leases = Arc<Mutex<HashMap<String, i64>>>;

/// Marks a queue item as being handled here, so its lease is renewed; the mark goes when the
/// guard drops, also when the handling task panics or is cancelled.
struct InFlight {
    leases: Leases,
    id: String,
}

impl InFlight {
    /// `None` when the item is already being handled here. Two workers of this process can
    /// be given the same item: a commit slow enough to return the run's next item leased
    /// past its end lets the claim loop lease it again. Both would pass the lease check
    /// (the owner is the same) and call the app twice; the first one keeps it.
    fn enter(leases: &Leases, id: &str, until: i64) -> Option<InFlight> {
        let mut held = leases.lock();
        if held.contains_key(id) {
            return None;
        }
        held.insert(id.to_string(), until);
        Some(InFlight {
            leases: leases.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.leases.lock().remove(&self.id);
    }
}

/// The worker pool: permits bound the items handled at once, and the in-flight leases are
/// what the lease renewer keeps alive.
pub struct Workers {
    sem: Arc<Semaphore>,
    leases: Leases,
    /// The loop is waiting for a free worker. Only then does a worker that ends wake it: an
    /// unsaturated loop has already claimed all it found, and a wake-up per ending worker
    /// cost a claim round trip each (several per run on a node that is not busy).
    saturated: AtomicBool,
}

impl Workers {
    /// A pool of `size` workers.
    pub fn new(size: usize) -> Self {
        Workers {
            sem: Arc::new(Semaphore::new(size)),
            leases: Arc::default(),
            saturated: AtomicBool::new(false),
        }
    }

    /// Workers were given back: wake the loop if it waits for one.
    pub fn freed(&self, wake: &tokio::sync::Notify) {
        // Pairs with the loop's fence: either it sees the free worker or this sees its flag.
        fence(SeqCst);
        if self.saturated.swap(false, SeqCst) {
            wake.notify_one();
        }
    }

    /// Up to `n` free workers, taken now (never waits).
    pub fn try_take(&self, n: usize) -> Vec<OwnedSemaphorePermit> {
        (0..n)
            .map_while(|_| self.sem.clone().try_acquire_owned().ok())
            .collect()
    }
}

/// Handle an item leased to this process until `lease_until` on a worker, then go on with
/// its run while its next item comes back leased from the commit of this one's result.
pub fn spawn(engine: Arc<Engine>, permit: OwnedSemaphorePermit, item: QueueItem, lease_until: i64) {
    tokio::spawn(async move {
        let run_id = item.run_id.clone();
        let mut item = Some((item, lease_until));
        while let Some((current, until)) = item.take() {
            let Some(_guard) = InFlight::enter(&engine.workers.leases, &current.id, until) else {
                tracing::debug!(item = %current.id, "already handled by another worker here");
                break;
            };
            let go_on = !*engine.shutdown.borrow();
            item = crate::executor::handle(engine.clone(), current, go_on).await;
        }
        // The run ended here or left this process (a sleep, a wait, a retry, a lost
        // lease): waiters that counted on this worker (`Watch::Here`) look again.
        engine.run_waiters.ended(&run_id);
        drop(permit);
        engine.workers.freed(&engine.queue_wake);
    });
}

/// Run the worker loop until shutdown, then wait for in-flight items.
pub async fn run_workers(engine: Arc<Engine>) {
    let sem = engine.workers.sem.clone();
    let renewer = tokio::spawn(renew_leases(engine.clone()));
    let mut shutdown = engine.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let notified = engine.queue_wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let free = sem.available_permits().min(CLAIM_BATCH);
        if free == 0 {
            // Saturated: nothing can run until a worker ends, and one that ends while the
            // flag is up wakes the loop (the poll is a safety net only).
            engine.workers.saturated.store(true, SeqCst);
            fence(SeqCst);
            if sem.available_permits() == 0 {
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(engine.config.poll_interval) => {}
                    _ = shutdown.changed() => {}
                }
            }
            engine.workers.saturated.store(false, SeqCst);
            continue;
        }
        // The workers are taken before the claim: an item claimed while none is free would sit
        // unrenewed, its lease running out, until one is (ingest can take them meanwhile).
        let permits = engine.workers.try_take(free);
        let free = permits.len();
        if free == 0 {
            continue;
        }
        let now = engine.now();
        let lease_until = engine.lease_until(now);
        let next_due = match engine
            .store
            .claim_next(&engine.owner, now, lease_until, free)
            .await
        {
            Ok((items, next_due)) => {
                let claimed = items.len();
                // Workers left over go back to the pool as the permits drop.
                for (item, permit) in items.into_iter().zip(permits) {
                    spawn(engine.clone(), permit, item, lease_until);
                }
                if claimed == free {
                    continue;
                }
                next_due
            }
            Err(e) => {
                tracing::error!(error = %e, "claiming queue items");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let now = engine.now();
        let poll_at = now + engine.config.poll_interval.as_millis() as i64;
        let wake_at = next_due.map_or(poll_at, |t| t.min(poll_at));
        tokio::select! {
            _ = notified => {}
            _ = engine.clock.sleep_until(wake_at.max(now)) => {}
            // The injected clock may stand still; real time still bounds the wait.
            _ = tokio::time::sleep(engine.config.poll_interval) => {}
            _ = shutdown.changed() => {}
        }
    }
    // Graceful shutdown: let in-flight calls finish; anything left keeps its
    // lease and is retried by the next process after expiry.
    let _ = tokio::time::timeout(
        Duration::from_secs(25),
        sem.acquire_many(engine.config.max_concurrency as u32),
    )
    .await;
    renewer.abort();
}

async fn renew_leases(engine: Arc<Engine>) {
    let every = (engine.config.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let ids: Vec<String> = engine.workers.leases.lock().keys().cloned().collect();
        if ids.is_empty() {
            continue;
        }
        let until = engine.lease_until(engine.now());
        let (asked, began) = (ids.len(), std::time::Instant::now());
        match engine.store.renew(&engine.owner, ids, until).await {
            Ok(held) => {
                tracing::debug!(asked, held = held.len(), took = ?began.elapsed(), "leases renewed");
                confirm(&engine.workers.leases, held, until)
            }
            Err(e) => tracing::warn!(error = %e, "renewing leases"),
        }
    }
}

/// Record that the store holds `ids` for this process until `until`.
fn confirm(leases: &Leases, ids: Vec<String>, until: i64) {
    let mut leases = leases.lock();
    for id in ids {
        if let Some(u) = leases.get_mut(&id) {
            *u = (*u).max(until);
        }
    }
}

/// Whether this process may still hand item `id` to the app: its lease must outlast the
/// call's way there by a margin of half a lease. A call sent on a lapsed lease could reach
/// the app after another node has taken the item over and committed the step it runs, and
/// so run a memoised step again. A lease nearer its end than the margin is renewed first;
/// `false` means it is no longer this process's (or the store could not say).
pub async fn lease_held(engine: &Engine, id: &str) -> bool {
    let lease = engine.config.lease.as_millis() as i64;
    let now = engine.now();
    let until = engine.workers.leases.lock().get(id).copied();
    if until.is_some_and(|u| u - now >= lease / 2) {
        return true;
    }
    let until = engine.lease_until(now);
    match engine
        .store
        .renew(&engine.owner, vec![id.to_string()], until)
        .await
    {
        Ok(held) => {
            let ok = !held.is_empty();
            confirm(&engine.workers.leases, held, until);
            ok
        }
        Err(e) => {
            tracing::warn!(item = %id, error = %e, "renewing a lease before a call");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::{sqlite::SqliteStore, ItemKind, NewEvent, NewItem, NewRun};
    use crate::{Config, Server};
    use serde_json::json;

    /// The first item of a new run, leased to `owner` until `until` by the commit that
    /// stores its event, as ingest leases it (one commit: the engine's own matcher never
    /// sees the event).
    async fn leased_item(engine: &Engine, owner: &str, now: i64, until: i64) -> String {
        let id = ulid::Ulid::new().to_string();
        let event = json!({"name": "t/start", "id": id, "data": {}, "ts": 1});
        let run = NewRun {
            run_id: "RUN".into(),
            fn_slug: "app-fn".into(),
            idem_key: id.clone(),
            events: vec![event.clone()],
            trigger_internal_id: id.clone(),
            created_at: now,
            items: vec![NewItem {
                id: "RUN:start".into(),
                run_id: "RUN".into(),
                kind: ItemKind::Call {
                    step: None,
                    predecessor: None,
                },
                available_at: now,
                unless_memo: None,
            }],
            pauses: vec![],
            flow: Default::default(),
        };
        let stored = NewEvent {
            internal_id: id,
            event,
            received_at: now,
            target_fn: None,
        };
        let (leased, _) = engine
            .store
            .insert_and_apply(
                vec![(stored, vec![run])],
                engine.pause_matcher(),
                now,
                (owner.to_string(), until, 1),
            )
            .await
            .unwrap();
        assert_eq!(leased.len(), 1, "the run's first item comes back leased");
        leased[0].id.clone()
    }

    /// A call goes out on a lease with at least half its length left; a shorter one is
    /// renewed first, and one another process has taken over stops the call.
    #[tokio::test]
    async fn a_call_goes_out_only_on_a_lease_this_process_still_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path().join("s.db")).unwrap());
        let clock = Arc::new(ManualClock::new(1_000_000));
        let mut config = Config::dev("127.0.0.1:0".parse().unwrap());
        config.lease = Duration::from_secs(60);
        // No workers: the engine's own loop must not claim the item the test plays with.
        config.max_concurrency = 0;
        let server = Server::start_with_clock(config, store, clock.clone())
            .await
            .unwrap();
        let engine = server.engine().clone();
        let now = 1_000_000;
        let id = leased_item(&engine, &engine.owner, now, now + 60_000).await;
        let leases = &engine.workers.leases;

        // Plenty left: no renewal needed.
        let _in_flight = InFlight::enter(leases, &id, now + 60_000).unwrap();
        // A second worker of this process given the same item does not handle it.
        assert!(InFlight::enter(leases, &id, now + 62_000).is_none());
        assert_eq!(leases.lock()[&id], now + 60_000);
        assert!(lease_held(&engine, &id).await);
        assert_eq!(leases.lock()[&id], now + 60_000);

        // Less than half left: renewed in the store, then the call may go.
        clock.set(now + 36_000);
        assert!(lease_held(&engine, &id).await);
        assert_eq!(leases.lock()[&id], now + 96_000);
        assert!(engine
            .store
            .claim("B", now + 95_000, now + 120_000, 1)
            .await
            .unwrap()
            .is_empty());

        // Lapsed and taken over by another process: no call.
        clock.set(now + 96_000);
        let taken = engine
            .store
            .claim("B", now + 96_001, now + 150_000, 1)
            .await
            .unwrap();
        assert_eq!(taken.len(), 1);
        clock.set(now + 96_002);
        assert!(!lease_held(&engine, &id).await);
        assert_eq!(leases.lock()[&id], now + 96_000);
        server.shutdown().await;
    }
}
