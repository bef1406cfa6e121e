//! Injected time. The engine never reads the system clock directly, so tests
//! can move time forward and run days of sleeps and cron ticks in milliseconds.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A source of "now" and a way to wait for a future instant.
pub trait Clock: Send + Sync + 'static {
    /// Current time, unix milliseconds.
    fn now_ms(&self) -> i64;
    /// Resolve once `now_ms() >= at_ms` (or soon after). Must be cancel-safe.
    fn sleep_until(&self, at_ms: i64) -> futures::future::BoxFuture<'static, ()>;
}

/// Shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }

    fn sleep_until(&self, at_ms: i64) -> futures::future::BoxFuture<'static, ()> {
        let wait = (at_ms - self.now_ms()).max(0) as u64;
        Box::pin(tokio::time::sleep(Duration::from_millis(wait)))
    }
}

/// A clock that only moves when told to. Sleepers wake when it passes their instant.
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<Mutex<i64>>,
    tick: watch::Sender<i64>,
}

impl ManualClock {
    /// Start at `start_ms`.
    pub fn new(start_ms: i64) -> Self {
        let (tick, _) = watch::channel(start_ms);
        ManualClock {
            now: Arc::new(Mutex::new(start_ms)),
            tick,
        }
    }

    /// Move forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock();
        *now += d.as_millis() as i64;
        self.tick.send_replace(*now);
    }

    /// Jump to `at_ms` (never backwards).
    pub fn set(&self, at_ms: i64) {
        let mut now = self.now.lock();
        *now = (*now).max(at_ms);
        self.tick.send_replace(*now);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        *self.now.lock()
    }

    fn sleep_until(&self, at_ms: i64) -> futures::future::BoxFuture<'static, ()> {
        let mut rx = self.tick.subscribe();
        Box::pin(async move {
            loop {
                if *rx.borrow_and_update() >= at_ms {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}
