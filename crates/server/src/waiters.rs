//! Requests waiting for a run to end (`GET /v1/runs/{id}?wait_ms=…`), woken when the
//! executor commits the run's end instead of polling the store.
//!
//! Only runs somebody waits on have an entry, and the entry goes when its last waiter does,
//! so the table is bounded by the number of open requests.

use crate::store::RunEnd;
use crate::Engine;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Notify;

/// The table of waiters, by run id.
#[derive(Default)]
pub struct RunWaiters {
    inner: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
    /// Every run end is announced here, whoever committed it (a shared store's feed runs).
    fed: std::sync::atomic::AtomicBool,
    /// Someone registered: the feed of other nodes' run ends is wanted.
    wanted: Notify,
}

/// One registered waiter; dropping it unregisters.
pub struct Waiter<'a> {
    table: &'a RunWaiters,
    run_id: String,
    notify: Arc<Notify>,
}

impl RunWaiters {
    /// Register interest in `run_id` before checking its state, so an end committed in
    /// between is not missed.
    pub fn register(&self, run_id: &str) -> Waiter<'_> {
        let mut m = self.inner.lock();
        let e = m
            .entry(run_id.to_string())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        e.1 += 1;
        let notify = e.0.clone();
        drop(m);
        self.wanted.notify_one();
        Waiter {
            table: self,
            run_id: run_id.to_string(),
            notify,
        }
    }

    /// The run ended, or this process's worker let go of it: wake everyone waiting on it
    /// to look again.
    pub fn ended(&self, run_id: &str) {
        if let Some((n, _)) = self.inner.lock().get(run_id) {
            n.notify_waiters();
        }
    }

    /// Wake every waiter to re-read its run (ends may have gone unannounced until now).
    fn wake_all(&self) {
        for (n, _) in self.inner.lock().values() {
            n.notify_waiters();
        }
    }

    /// How often a waiter re-reads its run in case an end went unannounced: often when only
    /// this node's executor announces ends (API and event cancellations do not), seldom when
    /// the store's feed announces all of them and re-reads only cover a feed that fell behind.
    pub fn recheck_every(&self) -> std::time::Duration {
        if self.fed.load(std::sync::atomic::Ordering::Relaxed) {
            std::time::Duration::from_secs(5)
        } else {
            std::time::Duration::from_millis(500)
        }
    }

    /// Runs with waiters (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// True when nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long the feed of other nodes' run ends is kept after the last waiter has gone, so
/// that steady traffic does not start and stop it.
const FEED_LINGER: std::time::Duration = std::time::Duration::from_secs(30);

/// Wake this node's waiters for runs other nodes end (shared stores only), until shutdown.
///
/// The store's feed is taken only while somebody waits here (and a while after): every
/// node listening is told of every run's end, which costs the database and the node CPU
/// per run, and most nodes of a deployment never hold a `wait_ms` request.
pub async fn run_remote_ends(engine: Arc<Engine>) {
    let waiters = &engine.run_waiters;
    let fed = |on: bool| waiters.fed.store(on, std::sync::atomic::Ordering::Relaxed);
    let mut shutdown = engine.shutdown.clone();
    loop {
        // Nobody waits: no feed until somebody does.
        while waiters.is_empty() {
            let wanted = waiters.wanted.notified();
            tokio::pin!(wanted);
            wanted.as_mut().enable();
            if !waiters.is_empty() {
                break;
            }
            tokio::select! {
                _ = wanted => {}
                _ = shutdown.changed() => return,
            }
        }
        let Some(mut ends) = engine.store.run_ends() else {
            return;
        };
        let mut check = tokio::time::interval(FEED_LINGER / 6);
        let mut idle_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                r = ends.recv() => match r {
                    Ok(RunEnd::Ended(run_id)) => waiters.ended(&run_id),
                    // Until the feed announces every end, waiters keep re-reading often; once
                    // it does, each re-reads at once for ends it missed before.
                    Ok(RunEnd::Announcing) => {
                        fed(true);
                        waiters.wake_all();
                    }
                    Ok(RunEnd::Unannounced) => fed(false),
                    // Missed ids: their waiters find the end on their next re-read.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                _ = check.tick() => {
                    let now = tokio::time::Instant::now();
                    if !waiters.is_empty() {
                        idle_since = None;
                    } else if now - *idle_since.get_or_insert(now) >= FEED_LINGER {
                        break;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
        fed(false);
    }
}

impl Waiter<'_> {
    /// A future that resolves at the next [`RunWaiters::ended`] for this run. Create it
    /// (and `enable` it) before re-reading the run.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut m = self.table.inner.lock();
        if let Some(e) = m.get_mut(&self.run_id) {
            e.1 -= 1;
            if e.1 == 0 {
                m.remove(&self.run_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_and_cleans_up() {
        let t = RunWaiters::default();
        let w = t.register("r");
        {
            let fut = w.notified();
            tokio::pin!(fut);
            fut.as_mut().enable();
            t.ended("other");
            t.ended("r");
            tokio::time::timeout(std::time::Duration::from_secs(1), fut)
                .await
                .expect("woken");
        }
        assert_eq!(t.len(), 1);
        drop(w);
        assert!(t.is_empty(), "the entry goes with its last waiter");
    }
}
