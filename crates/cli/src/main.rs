//! `cairn`: run the Cairn server in dev or production mode.

// glibc's malloc and free were a tenth of the server's CPU at C=16 (many small JSON and
// HTTP buffers per step, freed on other threads); mimalloc's per-thread pages cost less.
// Its v2 line, not v3: under v3 the server's RSS wandered by 10 MiB and settled about
// 8 MiB higher somewhere past 50,000 runs while SQLite's own heap stayed flat at 2.7 MiB,
// which fails the soak's growth gate; v2 holds flat at the same throughput.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context};
use cairn_server::store::{PgOptions, PostgresStore, SqliteStore, Store};
use cairn_server::{Config, Server};
use clap::{Args, Parser, Subcommand};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Durable step functions, wire-compatible with Inngest"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Local development server: no keys, state under ./.cairn/.
    Dev(DevArgs),
    /// Production server: signing key and event keys required.
    Start(StartArgs),
}

#[derive(Args)]
struct Common {
    /// Address to listen on.
    #[arg(long, env = "CAIRN_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on.
    #[arg(long, short = 'p', env = "CAIRN_PORT", default_value_t = 8288)]
    port: u16,
    /// Fixed retry delay in seconds, replacing the backoff table.
    #[arg(long, env = "CAIRN_RETRY_INTERVAL")]
    retry_interval: Option<u64>,
    /// Seconds a claimed queue item stays leased before another worker may retry it.
    #[arg(long, env = "CAIRN_LEASE_SECONDS", default_value_t = 30)]
    lease_seconds: u64,
    /// Days to keep finished runs and processed events.
    #[arg(long, env = "CAIRN_RETENTION_DAYS", default_value_t = 7)]
    retention_days: u64,
    /// Seconds to wait for an app to answer one call before counting it as a failed attempt.
    #[arg(long, env = "CAIRN_CALL_TIMEOUT", default_value_t = 300)]
    call_timeout: u64,
    /// PostgreSQL connections this process keeps open for its work (postgres:// databases
    /// only). Lease renewals hold one more, and so does the run-end listener while a request
    /// waits for a run to end.
    #[arg(long, env = "CAIRN_DB_POOL_SIZE", default_value_t = 16)]
    db_pool_size: usize,
    /// Seconds any one PostgreSQL statement may run before the server cancels it.
    #[arg(long, env = "CAIRN_DB_STATEMENT_TIMEOUT", default_value_t = 30)]
    db_statement_timeout: u64,
}

#[derive(Args)]
struct DevArgs {
    #[command(flatten)]
    common: Common,
    /// App URL to sync on start (repeatable).
    #[arg(
        long = "sdk-url",
        short = 'u',
        env = "CAIRN_SDK_URL",
        value_delimiter = ','
    )]
    sdk_url: Vec<String>,
    /// Store: `sqlite://PATH`, or `postgres://USER@HOST:PORT/DB` to share one database
    /// between several `cairn` processes. TLS to PostgreSQL is asked for in the URL:
    /// `?sslmode=require` (encrypted), `verify-ca` or `verify-full` (certificate checked
    /// against `sslrootcert=PATH`, or public roots without it).
    #[arg(
        long,
        env = "CAIRN_DATABASE_URL",
        default_value = "sqlite://.cairn/cairn.db"
    )]
    database_url: String,
}

#[derive(Args)]
struct StartArgs {
    #[command(flatten)]
    common: Common,
    /// Signing key (`signkey-<env>-<hex>` or bare hex).
    #[arg(long, env = "CAIRN_SIGNING_KEY")]
    signing_key: Option<String>,
    /// Accepted event key (repeatable).
    #[arg(long = "event-key", env = "CAIRN_EVENT_KEY", value_delimiter = ',')]
    event_key: Vec<String>,
    /// Store: `sqlite://PATH`, or `postgres://USER@HOST:PORT/DB` to share one database
    /// between several `cairn` processes. TLS to PostgreSQL is asked for in the URL:
    /// `?sslmode=require` (encrypted), `verify-ca` or `verify-full` (certificate checked
    /// against `sslrootcert=PATH`, or public roots without it).
    #[arg(
        long,
        env = "CAIRN_DATABASE_URL",
        default_value = "sqlite://.cairn/cairn.db"
    )]
    database_url: String,
}

async fn open_store(url: &str, c: &Common) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let opts = PgOptions {
            pool_size: c.db_pool_size.max(1),
            statement_timeout: Duration::from_secs(c.db_statement_timeout.max(1)),
            schema: None,
        };
        // The error names host, port and database; never echo the URL (it may hold a password).
        let store = PostgresStore::connect(url, opts)
            .await
            .context("opening the PostgreSQL database")?;
        return Ok(Arc::new(store));
    }
    let Some(path) = url.strip_prefix("sqlite://").map(PathBuf::from) else {
        bail!("unsupported --database-url; expected sqlite://PATH or postgres://USER@HOST:PORT/DB");
    };
    let store =
        SqliteStore::open(&path).with_context(|| format!("opening database {}", path.display()))?;
    Ok(Arc::new(store))
}

fn apply_common(cfg: &mut Config, c: &Common) {
    cfg.retry_interval = c.retry_interval.map(Duration::from_secs);
    cfg.lease = Duration::from_secs(c.lease_seconds.max(1));
    cfg.call_timeout = Duration::from_secs(c.call_timeout.max(1));
    cfg.retention = Duration::from_secs(c.retention_days.max(1) * 24 * 3600);
}

/// Resolves on SIGTERM or SIGINT. Created before the server starts so that a
/// signal arriving during start-up is caught rather than killing the process.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (config, store, sync_urls) = match cli.command {
        Command::Dev(a) => {
            let mut cfg = Config::dev(SocketAddr::new(a.common.host, a.common.port));
            apply_common(&mut cfg, &a.common);
            (
                cfg,
                open_store(&a.database_url, &a.common).await?,
                a.sdk_url,
            )
        }
        Command::Start(a) => {
            let Some(key) = a.signing_key.filter(|k| !k.is_empty()) else {
                bail!("cairn start requires --signing-key (or CAIRN_SIGNING_KEY)");
            };
            let hex_part = cairn_protocol::signature::strip_key_prefix(&key);
            if hex_part.is_empty()
                || !hex_part.len().is_multiple_of(2)
                || !hex_part.chars().all(|c| c.is_ascii_hexdigit())
            {
                bail!("--signing-key must be an even-length hex string, optionally prefixed signkey-<env>-");
            }
            let keys: Vec<String> = a.event_key.into_iter().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                bail!("cairn start requires at least one --event-key (or CAIRN_EVENT_KEY)");
            }
            let mut cfg = Config::start(SocketAddr::new(a.common.host, a.common.port), key, keys);
            apply_common(&mut cfg, &a.common);
            (
                cfg,
                open_store(&a.database_url, &a.common).await?,
                Vec::new(),
            )
        }
    };
    let signal = shutdown_signal()?;
    let server = Server::start(config, store).await?;
    let api = format!("http://{}", server.addr());
    println!("cairn listening on {api}");
    println!("  event API:  {api}/e/{{key}}");
    println!("  sync:       {api}/fn/register");
    for url in sync_urls {
        tokio::spawn(keep_syncing(server.engine().clone(), url));
    }
    signal.await;
    println!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// How often `cairn dev` re-tries the sync of an app that did not answer.
const SYNC_RETRY: Duration = Duration::from_secs(2);

/// Syncs an app given with `-u`, re-trying until it answers: apps are often started after
/// the dev server, and the Inngest dev server keeps pinging apps in an error state too.
async fn keep_syncing(engine: Arc<cairn_server::Engine>, url: String) {
    let mut reported = false;
    loop {
        match cairn_server::api::ping_app(&engine, &url).await {
            Ok(_) => {
                println!("  synced app: {url}");
                return;
            }
            Err(e) if !reported => {
                eprintln!(
                    "  sync failed: {url}: {e:#} (re-trying every {}s)",
                    SYNC_RETRY.as_secs()
                );
                reported = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(SYNC_RETRY).await;
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
