//! The Cairn engine: a durable step-function server wire-compatible with Inngest.
//!
//! Data flows `api` → store (events committed) → `matcher` (runs created,
//! pauses resumed) → `queue` (leased items) → `executor` (SDK calls, opcodes)
//! → store, with `timers` firing cron ticks. Every durable change goes through
//! [`store::Store`]; time goes through [`clock::Clock`].
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use cairn_server::{Config, Server, store::SqliteStore};
//! let store = std::sync::Arc::new(SqliteStore::open(".cairn/cairn.db")?);
//! let server = Server::start(Config::dev("127.0.0.1:8288".parse()?), store).await?;
//! println!("listening on {}", server.addr());
//! server.shutdown().await;
//! # Ok(()) }
//! ```

pub mod api;
pub mod clock;
pub mod executor;
pub mod flow;
pub mod matcher;
pub mod metrics_export;
pub mod queue;
pub mod registry;
pub mod store;
pub mod timers;
pub mod waiters;

use clock::{SharedClock, SystemClock};
use registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::sync::{watch, Notify};

/// Which face the server shows: the key-less dev server or production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No keys, `GET /dev` answers, server kind `dev`.
    Dev,
    /// Signing key and event keys required, server kind `cloud`.
    Start,
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Dev or start mode.
    pub mode: Mode,
    /// Address to listen on (port 0 picks one).
    pub bind: SocketAddr,
    /// Signing key (`signkey-…` or bare hex): signs calls, checks bearer tokens.
    pub signing_key: Option<String>,
    /// Accepted event keys (start mode).
    pub event_keys: Vec<String>,
    /// Fixed retry delay replacing the backoff table (dev `--retry-interval`).
    pub retry_interval: Option<Duration>,
    /// Lease length for claimed queue items; a crashed worker's items are
    /// retried after this long.
    pub lease: Duration,
    /// How long one SDK call may take.
    pub call_timeout: Duration,
    /// Most SDK calls in flight at once.
    pub max_concurrency: usize,
    /// Safety-net poll for work created by other processes sharing the store.
    pub poll_interval: Duration,
    /// Finished runs and processed events older than this are deleted.
    pub retention: Duration,
}

impl Config {
    /// Dev-server defaults.
    pub fn dev(bind: SocketAddr) -> Self {
        Config {
            mode: Mode::Dev,
            bind,
            signing_key: None,
            event_keys: Vec::new(),
            retry_interval: None,
            lease: Duration::from_secs(30),
            call_timeout: Duration::from_secs(300),
            max_concurrency: 64,
            poll_interval: Duration::from_secs(2),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// Production defaults with keys.
    pub fn start(bind: SocketAddr, signing_key: String, event_keys: Vec<String>) -> Self {
        Config {
            mode: Mode::Start,
            signing_key: Some(signing_key),
            event_keys,
            ..Config::dev(bind)
        }
    }
}

/// Shared state of one running engine.
pub struct Engine {
    /// Configuration.
    pub config: Config,
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Time source.
    pub clock: SharedClock,
    /// Functions from sync.
    pub registry: Registry,
    /// Pooled keep-alive client for SDK calls and sync pings.
    pub http: reqwest::Client,
    /// Woken when queue items are created.
    pub queue_wake: Notify,
    /// Woken when events are stored.
    pub events_wake: Notify,
    /// Woken when the function table changes.
    pub cron_wake: Notify,
    /// Lease owner id of this process.
    pub owner: String,
    /// Resolves to true on shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Pause matcher.
    pub matcher: Arc<matcher::CelPauseMatcher>,
    /// Requests waiting for runs to end.
    pub run_waiters: waiters::RunWaiters,
    /// The pool that handles queue items.
    pub workers: queue::Workers,
}

impl Engine {
    /// Current time, unix ms.
    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The end of a lease taken at `now` (unix ms).
    pub fn lease_until(&self, now: i64) -> i64 {
        now + self.config.lease.as_millis() as i64
    }

    /// The matcher as the store wants it.
    pub fn pause_matcher(&self) -> Arc<dyn store::PauseMatcher> {
        self.matcher.clone()
    }
}

/// A running server: HTTP API plus background engine tasks.
pub struct Server {
    engine: Arc<Engine>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Start with the system clock.
    pub async fn start(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Server> {
        Self::start_with_clock(config, store, Arc::new(SystemClock)).await
    }

    /// Start with an injected clock (tests move time with [`clock::ManualClock`]).
    pub async fn start_with_clock(
        config: Config,
        store: Arc<dyn Store>,
        clock: SharedClock,
    ) -> anyhow::Result<Server> {
        let listener = tokio::net::TcpListener::bind(config.bind).await?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = watch::channel(false);
        let max_concurrency = config.max_concurrency;
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        let engine = Arc::new(Engine {
            config,
            store,
            clock,
            registry: Registry::default(),
            http,
            queue_wake: Notify::new(),
            events_wake: Notify::new(),
            cron_wake: Notify::new(),
            owner: ulid::Ulid::new().to_string(),
            shutdown,
            matcher: Arc::new(matcher::CelPauseMatcher),
            run_waiters: waiters::RunWaiters::default(),
            workers: queue::Workers::new(max_concurrency),
        });
        engine.registry.reload(engine.store.as_ref()).await?;
        metrics_export::install();

        let mut tasks = vec![
            tokio::spawn(matcher::run_processor(engine.clone())),
            tokio::spawn(queue::run_workers(engine.clone())),
            tokio::spawn(timers::run_cron(engine.clone())),
            tokio::spawn(timers::run_retention(engine.clone())),
            tokio::spawn(registry::run_refresh(engine.clone())),
            tokio::spawn(metrics_export::run_upkeep(engine.shutdown.clone())),
            tokio::spawn(waiters::run_remote_ends(engine.clone())),
        ];
        let app = api::router(engine.clone());
        let mut sd = engine.shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = sd.wait_for(|s| *s).await;
                })
                .await;
        }));
        Ok(Server {
            engine,
            addr,
            stop,
            tasks,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The engine, for embedding and tests.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Send the sync `PUT` to an app URL so it registers itself (§4.1).
    pub async fn sync_url(&self, url: &str) -> anyhow::Result<String> {
        api::ping_app(&self.engine, url).await
    }

    /// Stop accepting work, let in-flight calls finish (or hand their leases
    /// back), then return.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}
