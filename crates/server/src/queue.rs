//! Durable queue workers: claim due items under a lease, run them, and sleep
//! until the next item is due or new work is announced in-process.
//!
//! The database is only asked for work when woken (an enqueue in this process),
//! when the earliest known item falls due, or on a slow safety-net poll that
//! catches work created by other processes sharing the store.

use crate::store::QueueItem;
use crate::Engine;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{fence, AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most items claimed in one round trip.
const CLAIM_BATCH: usize = 64;

/// Marks a queue item as being handled here, so its lease is renewed; the mark goes when the
/// guard drops, also when the handling task panics or is cancelled.
struct InFlight {
    set: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl InFlight {
    fn enter(set: &Arc<Mutex<HashSet<String>>>, id: &str) -> InFlight {
        set.lock().insert(id.to_string());
        InFlight {
            set: set.clone(),
            id: id.to_string(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set.lock().remove(&self.id);
    }
}

/// The worker pool: permits bound the items handled at once, and the in-flight set is what
/// the lease renewer keeps alive.
pub struct Workers {
    sem: Arc<Semaphore>,
    inflight: Arc<Mutex<HashSet<String>>>,
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
            inflight: Arc::default(),
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

/// Handle an item leased to this process on a worker, then go on with its run while its
/// next item comes back leased from the commit of this one's result.
pub fn spawn(engine: Arc<Engine>, permit: OwnedSemaphorePermit, item: QueueItem) {
    tokio::spawn(async move {
        let run_id = item.run_id.clone();
        let mut item = Some(item);
        while let Some(current) = item.take() {
            let _guard = InFlight::enter(&engine.workers.inflight, &current.id);
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
    let inflight = engine.workers.inflight.clone();
    let renewer = tokio::spawn(renew_leases(engine.clone(), inflight.clone()));
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
        let now = engine.now();
        let lease_until = now + engine.config.lease.as_millis() as i64;
        let next_due = match engine
            .store
            .claim_next(&engine.owner, now, lease_until, free)
            .await
        {
            Ok((items, next_due)) => {
                let claimed = items.len();
                for item in items {
                    let Ok(permit) = sem.clone().acquire_owned().await else {
                        break;
                    };
                    spawn(engine.clone(), permit, item);
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

async fn renew_leases(engine: Arc<Engine>, inflight: Arc<Mutex<HashSet<String>>>) {
    let every = (engine.config.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let ids: Vec<String> = inflight.lock().iter().cloned().collect();
        if ids.is_empty() {
            continue;
        }
        let until = engine.now() + engine.config.lease.as_millis() as i64;
        if let Err(e) = engine.store.renew(&engine.owner, ids, until).await {
            tracing::warn!(error = %e, "renewing leases");
        }
    }
}
