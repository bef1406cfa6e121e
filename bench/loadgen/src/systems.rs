//! Bringing up each system under test: a server plus an app serving the founding function,
//! registered and ready, on loopback ports only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::procs::{self, Proc};

pub const CAIRN_PORT: u16 = 8288;
pub const APP_PORT: u16 = 3000;
pub const RESTATE_INGRESS: u16 = 8080;
pub const RESTATE_ADMIN: u16 = 9070;
pub const RESTATE_APP_PORT: u16 = 9080;
pub const EVENT: &str = "bench/founding";
/// The keyed variant's event (`founding-keyed` in `bench/apps/cairn-rust`: at most 10
/// concurrent runs per `event.data.tenant`).
pub const KEYED_EVENT: &str = "bench/founding-keyed";
/// Its limit (kept in step with `KEYED_LIMIT` in `bench/apps/cairn-rust`).
pub const KEYED_LIMIT: u32 = 10;

/// What Cairn's store promises, from `crates/server/src/store/sqlite.rs`.
pub const CAIRN_DURABILITY: &str =
    "SQLite WAL, synchronous=FULL: every commit is fsynced before the event or step is acknowledged";

/// What Cairn on PostgreSQL promises with the server's defaults (checked by the nodes
/// scenario, which reads `fsync` and `synchronous_commit` back).
pub const PG_DURABILITY: &str =
    "PostgreSQL fsync=on, synchronous_commit=on: every commit is flushed to the WAL on disk before the event or step is acknowledged";

/// Where the binaries and apps are; filled from flags or the environment `bench/run` sets.
#[derive(Debug, Clone, clap::Args)]
pub struct Paths {
    #[arg(long, env = "BENCH_CAIRN_BIN")]
    pub cairn_bin: PathBuf,
    #[arg(long, env = "BENCH_APP_BIN")]
    pub app_bin: PathBuf,
    #[arg(long, env = "BENCH_LEAK_APP_BIN")]
    pub leak_app_bin: PathBuf,
    #[arg(long, env = "BENCH_RESTATE_SERVER_BIN")]
    pub restate_server_bin: PathBuf,
    #[arg(long, env = "BENCH_RESTATE_APP_BIN")]
    pub restate_app_bin: PathBuf,
    #[arg(long, env = "BENCH_NODE", default_value = "node")]
    pub node: PathBuf,
    /// inngest@4 app (`bench/apps/ts4/app.mjs`).
    #[arg(long, env = "BENCH_TS4_APP")]
    pub ts4_app: PathBuf,
    /// inngest@3.52.4 leak app (`bench/apps/js3-leak/app.mjs`).
    #[arg(long, env = "BENCH_JS3_LEAK_APP")]
    pub js3_leak_app: PathBuf,
    /// Scratch space for databases and logs (wiped per stack).
    #[arg(long, env = "BENCH_WORK_DIR")]
    pub work_dir: PathBuf,
    #[arg(long, env = "BENCH_RESULTS_DIR")]
    pub results_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    /// Cairn's Rust SDK app.
    Rust,
    /// The official `inngest@4` TypeScript SDK.
    Ts4,
    /// Rust SDK app that stashes every step handle (or whole `Ctx`) in a global list.
    LeakRust { whole_ctx: bool },
    /// `inngest@3.52.4` app that stashes every `ctx` in a global list.
    LeakJs3,
}

impl AppKind {
    pub fn label(self) -> &'static str {
        match self {
            AppKind::Rust => "Cairn + Rust SDK",
            AppKind::Ts4 => "Cairn + inngest@4 (TS)",
            AppKind::LeakRust { whole_ctx: false } => "Cairn + Rust SDK, stashed step handle",
            AppKind::LeakRust { whole_ctx: true } => "Cairn + Rust SDK, stashed Ctx",
            AppKind::LeakJs3 => "Cairn + inngest@3.52.4, stashed ctx",
        }
    }
    pub fn app_id(self) -> &'static str {
        match self {
            AppKind::Rust => "bench-rust",
            AppKind::Ts4 => "bench-ts4",
            AppKind::LeakRust { .. } => "bench-leak-rust",
            AppKind::LeakJs3 => "bench-leak-js3",
        }
    }
}

/// How runs are started and awaited.
#[derive(Clone)]
pub enum Driver {
    /// `POST /e` with `{"name": event, "data": {"size": …}}`; with `tenants > 0`, the data
    /// also carries `"tenant": "tenant-NNNN"`, run i going to tenant i mod `tenants` — or,
    /// with `hot_every = K > 0`, every K-th run to tenant-0000 (the hot tenant) and the
    /// others round-robin over the rest. With `long_poll`, the run's end is awaited with
    /// `GET /v1/events/{id}/runs?wait_ms=…`; without it, by paced polls (what a server from
    /// before `wait_ms` needs; see `load::cairn_run`).
    Cairn {
        /// Nodes to send to: run i goes to `bases[i % len]` and is awaited there.
        bases: Vec<String>,
        event: String,
        tenants: usize,
        hot_every: usize,
        long_poll: bool,
    },
    Restate {
        ingress: String,
    },
}

pub struct Stack {
    pub system: String,
    pub durability: String,
    pub server: Proc,
    /// Further `cairn` nodes sharing the first one's database (the nodes scenario).
    pub more_servers: Vec<Proc>,
    pub app: Proc,
    pub driver: Driver,
    pub http: reqwest::Client,
    /// Cairn's SQLite file, or Restate's data directory.
    pub data: PathBuf,
    pub app_port: u16,
}

impl Stack {
    pub fn procs(&self) -> Vec<&Proc> {
        let mut all = vec![&self.server];
        all.extend(&self.more_servers);
        all.push(&self.app);
        all
    }
    pub fn check_alive(&mut self) -> Result<()> {
        self.server.check_alive()?;
        for s in &mut self.more_servers {
            s.check_alive()?;
        }
        self.app.check_alive()
    }
    pub fn data_bytes(&self) -> u64 {
        match self.driver {
            Driver::Cairn { .. } => procs::sqlite_size(&self.data),
            Driver::Restate { .. } => procs::dir_size(&self.data),
        }
    }
    /// Points a Cairn stack's runs at `event`, spread over `tenants` tenant ids (0: no
    /// tenant field), every `hot_every`-th to the hot tenant (0: none); see [`Driver`].
    pub fn target(&mut self, to_event: &str, to_tenants: usize, to_hot_every: usize) {
        if let Driver::Cairn {
            event,
            tenants,
            hot_every,
            ..
        } = &mut self.driver
        {
            *event = to_event.to_string();
            *tenants = to_tenants;
            *hot_every = to_hot_every;
        }
    }
    /// Whether a Cairn stack's runs are awaited with `wait_ms` long polls or paced polls.
    pub fn long_poll(&mut self, on: bool) {
        if let Driver::Cairn { long_poll, .. } = &mut self.driver {
            *long_poll = on;
        }
    }
    pub fn stop(mut self) {
        // The app first, so the server sees no half-finished calls on its way down.
        self.app.stop();
        self.server.stop();
        for mut s in self.more_servers {
            s.stop();
        }
    }
}

pub fn http_client(pool: usize) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(pool.max(4))
        .timeout(Duration::from_secs(120))
        .no_proxy()
        .build()?)
}

fn fresh_dir(paths: &Paths, tag: &str) -> Result<PathBuf> {
    let dir = paths.work_dir.join(tag);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `cairn dev` on a fresh SQLite file, plus the app, synced.
pub async fn start_cairn(paths: &Paths, kind: AppKind, tag: &str, pool: usize) -> Result<Stack> {
    let dir = fresh_dir(paths, tag)?;
    let db = dir.join("cairn.db");
    let http = http_client(pool)?;
    let (server, base) = spawn_cairn(
        paths,
        &http,
        CAIRN_PORT,
        &format!("sqlite://{}", db.display()),
        "cairn",
        &dir,
    )
    .await?;

    let mut app = start_app(paths, kind, &dir, &base)?;
    procs::wait_port(APP_PORT, Duration::from_secs(60), &mut app).await?;
    sync_app(&http, &base, kind, &mut app).await?;
    Ok(Stack {
        system: kind.label().to_string(),
        durability: CAIRN_DURABILITY.to_string(),
        server,
        more_servers: Vec::new(),
        app,
        driver: Driver::Cairn {
            bases: vec![base],
            event: EVENT.to_string(),
            tenants: 0,
            hot_every: 0,
            long_poll: true,
        },
        http,
        data: db,
        app_port: APP_PORT,
    })
}

/// `nodes` × `cairn dev` sharing one PostgreSQL database (ports 8288, 8289, …) plus the
/// Rust app, synced through the first node; returns once every node lists the function.
pub async fn start_cairn_nodes(
    paths: &Paths,
    tag: &str,
    pool: usize,
    db_url: &str,
    nodes: usize,
) -> Result<Stack> {
    let dir = fresh_dir(paths, tag)?;
    let http = http_client(pool)?;
    let mut servers = Vec::new();
    let mut bases = Vec::new();
    for i in 0..nodes.max(1) {
        let (server, base) = spawn_cairn(
            paths,
            &http,
            CAIRN_PORT + i as u16,
            db_url,
            &format!("cairn-{i}"),
            &dir,
        )
        .await?;
        servers.push(server);
        bases.push(base);
    }
    let mut app = start_app(paths, AppKind::Rust, &dir, &bases[0])?;
    procs::wait_port(APP_PORT, Duration::from_secs(60), &mut app).await?;
    sync_app(&http, &bases[0], AppKind::Rust, &mut app).await?;
    // The other nodes load the synced app from the database on their next refresh.
    let deadline = Instant::now() + Duration::from_secs(30);
    for base in &bases[1..] {
        while !lists_functions(&http, base, AppKind::Rust).await {
            if Instant::now() > deadline {
                bail!("{base} did not load the synced app within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let server = servers.remove(0);
    Ok(Stack {
        system: format!(
            "Cairn × {} node{} (PostgreSQL) + Rust SDK",
            bases.len(),
            if bases.len() == 1 { "" } else { "s" }
        ),
        durability: PG_DURABILITY.to_string(),
        server,
        more_servers: servers,
        app,
        driver: Driver::Cairn {
            bases,
            event: EVENT.to_string(),
            tenants: 0,
            hot_every: 0,
            long_poll: true,
        },
        http,
        data: dir.join("no-sqlite-file"),
        app_port: APP_PORT,
    })
}

fn start_app(paths: &Paths, kind: AppKind, dir: &Path, base: &str) -> Result<Proc> {
    let mut cmd = match kind {
        AppKind::Rust => Command::new(&paths.app_bin),
        AppKind::LeakRust { whole_ctx } => {
            let mut c = Command::new(&paths.leak_app_bin);
            c.env("LEAK_STASH", if whole_ctx { "ctx" } else { "step" });
            c
        }
        AppKind::Ts4 => {
            let mut c = Command::new(&paths.node);
            c.arg(&paths.ts4_app);
            c
        }
        AppKind::LeakJs3 => {
            let mut c = Command::new(&paths.node);
            // Room for the leak to show instead of an out-of-memory crash.
            c.args(["--expose-gc", "--max-old-space-size=12288"])
                .arg(&paths.js3_leak_app);
            c
        }
    };
    cmd.env("PORT", APP_PORT.to_string())
        .env("INNGEST_DEV", "1")
        .env("INNGEST_BASE_URL", base)
        .env(
            "INNGEST_SERVE_ORIGIN",
            format!("http://127.0.0.1:{APP_PORT}"),
        )
        .env("DO_NOT_TRACK", "1")
        .env("RUST_LOG", "warn");
    let name = kind.app_id();
    Proc::spawn("app", name, cmd, dir)
}

/// `cairn dev` on `port` with `database_url`, answering `/health`; returns it and its base URL.
async fn spawn_cairn(
    paths: &Paths,
    http: &reqwest::Client,
    port: u16,
    database_url: &str,
    name: &str,
    dir: &Path,
) -> Result<(Proc, String)> {
    let mut cmd = Command::new(&paths.cairn_bin);
    cmd.args(["dev", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--database-url", database_url])
        .env("RUST_LOG", "warn")
        .env("DO_NOT_TRACK", "1");
    let mut server = Proc::spawn("server", name, cmd, dir)?;
    procs::wait_port(port, Duration::from_secs(30), &mut server).await?;
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(
        http,
        &format!("{base}/health"),
        Duration::from_secs(20),
        &mut server,
    )
    .await?;
    Ok((server, base))
}

/// Whether the Cairn at `base` lists a function of `kind`'s app.
async fn lists_functions(http: &reqwest::Client, base: &str, kind: AppKind) -> bool {
    let fns = format!("{base}/v1/apps/{}/functions", kind.app_id());
    match http.get(&fns).send().await {
        Ok(r) => r
            .json::<Value>()
            .await
            .is_ok_and(|v| v["data"].as_array().is_some_and(|a| !a.is_empty())),
        Err(_) => false,
    }
}

/// Asks the app to register itself (`PUT /api/inngest`), as the dev server's sync does, and
/// waits until Cairn lists its function.
async fn sync_app(http: &reqwest::Client, base: &str, kind: AppKind, app: &mut Proc) -> Result<()> {
    let url = format!("http://127.0.0.1:{APP_PORT}/api/inngest");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        app.check_alive()?;
        match http.put(&url).send().await {
            Ok(r) => {
                last = format!(
                    "PUT {url}: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )
            }
            Err(e) => last = format!("PUT {url}: {e}"),
        }
        if lists_functions(http, base, kind).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!(
        "app {} did not sync with Cairn within 30 s (last: {last}); app log:\n{}",
        kind.app_id(),
        procs::tail(&app.log, 30)
    )
}

async fn wait_http_ok(
    http: &reqwest::Client,
    url: &str,
    within: Duration,
    p: &mut Proc,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        p.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "{url} not ready within {within:?}; log tail:\n{}",
                procs::tail(&p.log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Restate's config for the bench: defaults (which fsync the log) plus a fresh base dir,
/// loopback addresses and no telemetry. The durability keys are spelled out so that the
/// setting is visible here rather than implied.
fn restate_config(dir: &Path) -> String {
    format!(
        r#"# Written by cairn-bench. Everything not set here is Restate's default; ports are the
# defaults (ingress {ingress}, admin {admin}, node 5122), bound to 127.0.0.1 by --bind-ip.
node-name = "bench"
base-dir = "{base}"
disable-telemetry = true
log-filter = "warn"

[admin]
disable-web-ui = true

[log-server]
# The default, spelled out: the log (Restate's durable record) is fsynced before an append
# is acknowledged.
rocksdb-disable-wal-fsync = false

[bifrost.local]
rocksdb-disable-wal = false
rocksdb-disable-wal-fsync = false
"#,
        base = dir.join("restate-data").display(),
        admin = RESTATE_ADMIN,
        ingress = RESTATE_INGRESS,
    )
}

/// `restate-server` on a fresh base dir plus the Rust service, registered.
pub async fn start_restate(paths: &Paths, tag: &str, pool: usize) -> Result<Stack> {
    if !procs::loopback_only() {
        bail!(
            "refusing to start restate-server outside a private network namespace (it contacts the \
             internet at start-up); run the bench through bench/run, which uses `unshare --net`"
        );
    }
    let dir = fresh_dir(paths, tag)?;
    let cfg = dir.join("restate.toml");
    std::fs::write(&cfg, restate_config(&dir))?;
    let durability = restate_durability(paths, &cfg)?;
    let mut cmd = Command::new(&paths.restate_server_bin);
    cmd.arg("--config-file")
        .arg(&cfg)
        .arg("--no-logo")
        .args(["--bind-ip", "127.0.0.1", "--listen-mode", "tcp"])
        .env("DO_NOT_TRACK", "1")
        .env("RESTATE_LOG_DISABLE_ANSI_CODES", "true");
    let mut server = Proc::spawn("server", "restate-server", cmd, &dir)?;
    let http = http_client(pool)?;
    procs::wait_port(RESTATE_ADMIN, Duration::from_secs(60), &mut server).await?;
    let admin = format!("http://127.0.0.1:{RESTATE_ADMIN}");
    wait_http_ok(
        &http,
        &format!("{admin}/health"),
        Duration::from_secs(60),
        &mut server,
    )
    .await?;

    let mut cmd = Command::new(&paths.restate_app_bin);
    cmd.env("PORT", RESTATE_APP_PORT.to_string())
        .env("RUST_LOG", "warn");
    let mut app = Proc::spawn("app", "restate-founding", cmd, &dir)?;
    procs::wait_port(RESTATE_APP_PORT, Duration::from_secs(30), &mut app).await?;

    // Register the deployment; retry while the cluster finishes provisioning.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http
            .post(format!("{admin}/deployments"))
            .json(&json!({ "uri": format!("http://127.0.0.1:{RESTATE_APP_PORT}"), "force": true }))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => break,
            Ok(r) if Instant::now() > deadline => {
                bail!(
                    "registering with Restate failed: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )
            }
            Err(e) if Instant::now() > deadline => bail!("registering with Restate failed: {e}"),
            _ => {}
        }
        server.check_alive()?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ingress = format!("http://127.0.0.1:{RESTATE_INGRESS}");
    // The ingress learns of the service shortly after registration: wait for a real call.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http
            .post(format!("{ingress}/Founding/run"))
            .json(&json!({ "size": 16 }))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => break,
            Ok(r) if Instant::now() > deadline => {
                bail!(
                    "first Restate call failed: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )
            }
            Err(e) if Instant::now() > deadline => bail!("first Restate call failed: {e}"),
            _ => {}
        }
        server.check_alive()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Stack {
        system: "Restate + Rust SDK".to_string(),
        durability,
        server,
        more_servers: Vec::new(),
        app,
        driver: Driver::Restate { ingress },
        http,
        data: dir.join("restate-data"),
        app_port: RESTATE_APP_PORT,
    })
}

/// Reads the effective fsync settings back from `restate-server --dump-config`.
fn restate_durability(paths: &Paths, cfg: &Path) -> Result<String> {
    let out = Command::new(&paths.restate_server_bin)
        .arg("--config-file")
        .arg(cfg)
        .arg("--dump-config")
        .env("DO_NOT_TRACK", "1")
        .output()
        .context("restate-server --dump-config")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut section = String::new();
    let mut found = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            section = l.trim_matches(['[', ']']).to_string();
        } else if l.starts_with("rocksdb-disable-wal-fsync")
            || l.starts_with("rocksdb-disable-wal ")
        {
            found.push(format!("{section}.{l}"));
        } else if section.is_empty()
            && (l.starts_with("default-provider") || l.starts_with("roles"))
        {
            // not needed
        }
    }
    let provider = text
        .lines()
        .skip_while(|l| l.trim() != "[bifrost]")
        .find(|l| l.trim_start().starts_with("default-provider"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    if found.is_empty() {
        return Err(anyhow!(
            "could not read fsync settings from restate-server --dump-config"
        ));
    }
    Ok(format!(
        "Restate defaults: log ({provider}) fsynced before an append is acknowledged, appends group-committed ({})",
        found.join(", ")
    ))
}
