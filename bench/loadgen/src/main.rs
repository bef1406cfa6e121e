//! `cairn-bench`: Cairn side by side with Restate, the soak, the founding leak, and cost
//! growth with history. `bench/run` builds everything and calls this inside a private
//! network namespace; see bench/README.md.

mod load;
mod plot;
mod procs;
mod report;
mod systems;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::{json, Value};

use load::{drive, Percentiles};
use procs::Snap;
use report::{ProcResult, ScenarioResult, STEPS_PER_RUN};
use systems::{AppKind, Paths, Stack, KEYED_LIMIT};

#[derive(Parser)]
#[command(
    name = "cairn-bench",
    about = "Cairn vs Restate: throughput, latency, memory, soak, leak"
)]
struct Cli {
    #[command(flatten)]
    paths: Paths,
    /// Seconds-long versions of every scenario (CI).
    #[arg(long, global = true)]
    smoke: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start-up; the size of the `All` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Throughput and latency: every scenario, each system back to back.
    Throughput(ThroughputArgs),
    /// Many runs through Cairn + Rust SDK, RSS sampled; fails on a rising slope.
    Soak(SoakArgs),
    /// Retained heap per run with a stashed context: inngest@3.52.4 vs the Rust SDK.
    Leak(LeakArgs),
    /// Throughput with 10 K vs 1 M stored completed runs.
    Growth(GrowthArgs),
    /// Flow control's cost: the founding function unconstrained vs with a per-tenant
    /// concurrency limit (optionally also against a baseline server binary).
    Flow(FlowArgs),
    /// Several `cairn` nodes sharing one PostgreSQL database: 1 vs 3 nodes, CPU per run and
    /// statements per SDK call.
    Nodes(NodesArgs),
    /// Everything above, in that order.
    All {
        #[command(flatten)]
        throughput: ThroughputArgs,
        #[command(flatten)]
        soak: SoakArgs,
        #[command(flatten)]
        leak: LeakArgs,
        #[command(flatten)]
        growth: GrowthArgs,
        #[command(flatten)]
        flow: FlowArgs,
        #[command(flatten)]
        nodes: NodesArgs,
    },
}

#[derive(clap::Args, Clone)]
struct ThroughputArgs {
    /// Only scenarios whose name contains this (e.g. "C=16").
    #[arg(long)]
    only: Option<String>,
    /// Systems to run: cairn-rust, cairn-ts, restate.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cairn-rust,cairn-ts,restate"
    )]
    systems: Vec<String>,
    /// Override N for every scenario.
    #[arg(long)]
    runs: Option<usize>,
    /// Time budget per scenario and system, seconds (measured phase).
    #[arg(long)]
    budget_s: Option<u64>,
    /// Rounds per scenario: each system once per round, in reverse order every other round,
    /// each on fresh processes. The ratios are taken within a round and their median is
    /// judged against the goals: on a machine shared with others, one pair is noise.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

#[derive(clap::Args, Clone)]
struct SoakArgs {
    #[arg(long = "soak-runs")]
    soak_runs: Option<usize>,
    #[arg(long = "soak-concurrency", default_value_t = 16)]
    soak_concurrency: usize,
    /// Sample RSS every this many runs.
    #[arg(long = "soak-sample-every")]
    soak_sample_every: Option<usize>,
    /// Runs excluded from the slope (allocator and cache warm-up); default a tenth.
    #[arg(long = "soak-warmup")]
    soak_warmup: Option<usize>,
    /// Fail when the post-warm-up RSS slope of the server or the app is above this.
    #[arg(long = "soak-max-slope", default_value_t = 64.0)]
    soak_max_slope_bytes_per_run: f64,
    #[arg(long = "soak-budget-s")]
    soak_budget_s: Option<u64>,
}

#[derive(clap::Args, Clone)]
struct LeakArgs {
    #[arg(long = "leak-runs")]
    leak_runs: Option<usize>,
    /// Size of `collect-data`'s output (the founding report's steps returned large data).
    #[arg(long = "leak-size", default_value_t = 1 << 20)]
    leak_size: usize,
}

#[derive(clap::Args, Clone)]
struct GrowthArgs {
    #[arg(long = "growth-small")]
    growth_small: Option<usize>,
    #[arg(long = "growth-large")]
    growth_large: Option<usize>,
    /// Runs in each measured phase.
    #[arg(long = "growth-measure")]
    growth_measure: Option<usize>,
    #[arg(long = "growth-prefill-budget-s", default_value_t = 4 * 3600)]
    growth_prefill_budget_s: u64,
}

#[derive(clap::Args, Clone)]
struct FlowArgs {
    /// Measured runs per phase (default 5,000; smoke 100).
    #[arg(long = "flow-runs")]
    flow_runs: Option<usize>,
    #[arg(long = "flow-concurrency", default_value_t = 16)]
    flow_concurrency: usize,
    /// `collect-data`'s output size in bytes.
    #[arg(long = "flow-size", default_value_t = 1024)]
    flow_size: usize,
    /// Event of the keyed function (the app's `founding-keyed`: concurrency 10 per
    /// `event.data.tenant`).
    #[arg(long = "flow-event", default_value = systems::KEYED_EVENT)]
    flow_event: String,
    /// Tenants the keyed runs are spread over, round-robin (`data.tenant` = tenant-0000 …).
    #[arg(long = "tenants", default_value_t = 1000)]
    tenants: usize,
    /// Send every K-th keyed run to one hot tenant (tenant-0000) and the rest round-robin
    /// over the others; the hot and the other runs' latencies are reported apart (a
    /// head-of-line check: with C well above 10·K the hot tenant's limit binds).
    #[arg(long = "hot-every", default_value_t = 0)]
    hot_every: usize,
    /// Rounds of (baseline,) unconstrained, keyed, back to back (default 2; smoke 1).
    #[arg(long = "flow-rounds")]
    flow_rounds: Option<usize>,
    /// A second `cairn` binary (e.g. a build from before flow control) whose unconstrained
    /// throughput is measured in every round, just before this build's.
    #[arg(long = "baseline-cairn-bin")]
    baseline_cairn_bin: Option<std::path::PathBuf>,
    /// How the baseline is named in the report (e.g. its revision).
    #[arg(long = "baseline-label", default_value = "baseline")]
    baseline_label: String,
    /// Time budget per phase, seconds (measured part).
    #[arg(long = "flow-budget-s")]
    flow_budget_s: Option<u64>,
}

#[derive(clap::Args, Clone)]
struct NodesArgs {
    /// Measured runs per phase (default 3,000; smoke 60).
    #[arg(long = "nodes-runs")]
    nodes_runs: Option<usize>,
    #[arg(long = "nodes-concurrency", default_value_t = 16)]
    nodes_concurrency: usize,
    /// Node counts to compare, each on a fresh database, back to back.
    #[arg(long = "node-counts", value_delimiter = ',', default_value = "1,3")]
    node_counts: Vec<usize>,
    /// Rounds of every node count (default 2, the second in reverse order; smoke 1).
    #[arg(long = "nodes-rounds")]
    nodes_rounds: Option<usize>,
    /// PostgreSQL server on which each phase creates (and afterwards drops) a database of its
    /// own. The default reaches the machine's server through its Unix socket, which the
    /// bench's private network namespace does not cut off.
    #[arg(
        long = "pg-url",
        env = "BENCH_PG_URL",
        default_value = "postgres://postgres@%2Fvar%2Frun%2Fpostgresql/postgres"
    )]
    pg_url: String,
    /// Time budget per phase, seconds (measured part).
    #[arg(long = "nodes-budget-s")]
    nodes_budget_s: Option<u64>,
    /// Send every run to the first node, leaving the others idle beside it: what nodes
    /// that take no traffic cost the one that does.
    #[arg(long = "nodes-send-to-first")]
    nodes_send_to_first: bool,
    /// Query parameters added to the nodes' database URL, not to the bench's own connection:
    /// `sslmode=require` measures TLS (with a `--pg-url` over TCP, which `bench/run`'s
    /// loopback-only namespace cannot reach; run `cairn-bench` directly for that).
    #[arg(long = "nodes-db-params")]
    nodes_db_params: Option<String>,
}

struct Scenario {
    name: &'static str,
    size: usize,
    c: usize,
    n_full: usize,
    n_smoke: usize,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "C=1 1KiB",
        size: 1024,
        c: 1,
        n_full: 1000,
        n_smoke: 20,
    },
    Scenario {
        name: "C=16 1KiB",
        size: 1024,
        c: 16,
        n_full: 5000,
        n_smoke: 100,
    },
    Scenario {
        name: "C=64 1KiB",
        size: 1024,
        c: 64,
        n_full: 5000,
        n_smoke: 150,
    },
    Scenario {
        name: "C=16 1MiB",
        size: 1 << 20,
        c: 16,
        n_full: 400,
        n_smoke: 16,
    },
];

fn stamp() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cli = Cli::parse();
    let res = match &cli.cmd {
        Cmd::Throughput(a) => throughput(&cli.paths, cli.smoke, a).await.map(|_| ()),
        Cmd::Soak(a) => soak(&cli.paths, cli.smoke, a).await.map(|_| ()),
        Cmd::Leak(a) => leak(&cli.paths, cli.smoke, a).await.map(|_| ()),
        Cmd::Growth(a) => growth(&cli.paths, cli.smoke, a).await.map(|_| ()),
        Cmd::Flow(a) => flow(&cli.paths, cli.smoke, a).await.map(|_| ()),
        Cmd::Nodes(a) => nodes(&cli.paths, cli.smoke, a).await.map(|_| ()),
        Cmd::All {
            throughput: t,
            soak: s,
            leak: l,
            growth: g,
            flow: f,
            nodes: nd,
        } => all(&cli.paths, cli.smoke, t, s, l, g, f, nd).await,
    };
    if let Err(e) = res {
        eprintln!("cairn-bench: {e:#}");
        std::process::exit(1);
    }
}

#[allow(clippy::too_many_arguments)]
async fn all(
    paths: &Paths,
    smoke: bool,
    t: &ThroughputArgs,
    s: &SoakArgs,
    l: &LeakArgs,
    g: &GrowthArgs,
    f: &FlowArgs,
    nd: &NodesArgs,
) -> Result<()> {
    // Every part runs even if an earlier one failed; the exit status reports all of them.
    let mut failed = Vec::new();
    let mut summary = String::new();
    match throughput(paths, smoke, t).await {
        Ok(md) => summary.push_str(&md),
        Err(e) => failed.push(format!("throughput: {e:#}")),
    }
    match leak(paths, smoke, l).await {
        Ok(md) => summary.push_str(&md),
        Err(e) => failed.push(format!("leak: {e:#}")),
    }
    match soak(paths, smoke, s).await {
        Ok(md) => summary.push_str(&md),
        Err(e) => failed.push(format!("soak: {e:#}")),
    }
    match growth(paths, smoke, g).await {
        Ok(md) => summary.push_str(&md),
        Err(e) => failed.push(format!("growth: {e:#}")),
    }
    match flow(paths, smoke, f).await {
        Ok(md) => summary.push_str(&md),
        Err(e) => failed.push(format!("flow: {e:#}")),
    }
    match nodes(paths, smoke, nd).await {
        Ok(md) => summary.push_str(&md),
        Err(e) => failed.push(format!("nodes: {e:#}")),
    }
    let path = paths.results_dir.join(format!(
        "{}summary-{}.md",
        if smoke { "smoke-" } else { "" },
        stamp()
    ));
    std::fs::create_dir_all(&paths.results_dir)?;
    std::fs::write(&path, format!("{}\n{summary}", machine_description()))?;
    println!("\nsummary written to {}", path.display());
    if !failed.is_empty() {
        bail!("{} part(s) failed:\n{}", failed.len(), failed.join("\n"));
    }
    Ok(())
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib as f64 / 1048576.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let rev = std::env::var("BENCH_CAIRN_REV").unwrap_or_else(|_| "unknown".into());
    format!(
        "Machine: {cpu}, {cores} cores, {mem:.1} GiB RAM, Linux {}; load average at start {}; Cairn at {rev}\n",
        kernel.trim(),
        load.join(" ")
    )
}

// ---------------------------------------------------------------------------------------
// Throughput and latency

async fn start(paths: &Paths, system: &str, tag: &str, pool: usize) -> Result<Stack> {
    match system {
        "cairn-rust" => systems::start_cairn(paths, AppKind::Rust, tag, pool).await,
        "cairn-ts" => systems::start_cairn(paths, AppKind::Ts4, tag, pool).await,
        "restate" => systems::start_restate(paths, tag, pool).await,
        other => bail!("unknown system {other:?} (cairn-rust, cairn-ts, restate)"),
    }
}

async fn throughput(paths: &Paths, smoke: bool, a: &ThroughputArgs) -> Result<String> {
    println!(
        "\n## Throughput and latency{}\n",
        if smoke { " (smoke)" } else { "" }
    );
    let budget = Duration::from_secs(a.budget_s.unwrap_or(if smoke { 30 } else { 240 }));
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for sc in SCENARIOS {
        if a.only.as_deref().is_some_and(|o| !sc.name.contains(o)) {
            continue;
        }
        let n = a.runs.unwrap_or(if smoke { sc.n_smoke } else { sc.n_full });
        let rounds = a.rounds.max(1);
        for round in 0..rounds {
            let mut systems: Vec<&String> = a.systems.iter().collect();
            if round % 2 == 1 {
                systems.reverse();
            }
            for system in systems {
                eprintln!(
                    "- {} / {system}: {n} runs at C={} (round {round})",
                    sc.name, sc.c
                );
                match one_scenario(paths, system, sc, n, budget).await {
                    Ok(mut r) => {
                        r.round = round;
                        eprintln!(
                        "    {:.1} runs/s, p50 {:.1} ms, p99 {:.1} ms, server peak {:.0} MiB, errors {}",
                        r.runs_per_s,
                        r.latency_ms.p50,
                        r.latency_ms.p99,
                        r.server().map(|p| p.peak_rss_mib).unwrap_or(0.0),
                        r.errors
                    );
                        if r.errors > 0 || r.runs_ok == 0 {
                            failures.push(format!(
                                "{} / {system}: {} errors, first: {:?}",
                                sc.name, r.errors, r.first_error
                            ));
                        }
                        results.push(r);
                    }
                    Err(e) => {
                        eprintln!("    FAILED: {e:#}");
                        failures.push(format!("{} / {system}: {e:#}", sc.name));
                    }
                }
            }
        }
    }
    let table = report::table(&results);
    let (ratios, ratio_json) = report::ratios(&results);
    let durability: Vec<Value> = {
        let mut seen = std::collections::BTreeMap::new();
        for r in &results {
            seen.entry(r.system.clone())
                .or_insert_with(|| r.durability.clone());
        }
        seen.into_iter()
            .map(|(k, v)| json!({ "system": k, "durability": v }))
            .collect()
    };
    let mut md = String::from("## Throughput and latency\n\n");
    md.push_str(&table);
    md.push_str("\nLatency: event accepted → run completed. Each system and scenario on freshly started processes; peak RSS is VmHWM.\n\n");
    md.push_str(&ratios);
    md.push_str("\nDurability:\n");
    for d in &durability {
        md.push_str(&format!(
            "- {}: {}\n",
            d["system"].as_str().unwrap_or(""),
            d["durability"].as_str().unwrap_or("")
        ));
    }
    println!("{md}");
    let path = report::write_json(
        &paths.results_dir,
        &format!(
            "{}throughput-{}.json",
            if smoke { "smoke-" } else { "" },
            stamp()
        ),
        &json!({ "machine": machine_description().trim(), "smoke": smoke, "results": results, "ratios": ratio_json, "durability": durability }),
    )?;
    println!("results: {}", path.display());
    if !failures.is_empty() {
        bail!(
            "{} scenario(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(md)
}

fn proc_results(
    stack: &Stack,
    before: &[Option<Snap>],
    after: &[Option<Snap>],
    runs: usize,
) -> Vec<ProcResult> {
    stack
        .procs()
        .iter()
        .zip(before.iter().zip(after))
        .map(|(p, (b, a))| {
            let cpu = match (b, a) {
                (Some(b), Some(a)) => a.cpu_s - b.cpu_s,
                _ => f64::NAN,
            };
            ProcResult {
                role: p.role.to_string(),
                name: p.name.clone(),
                cpu_s: cpu,
                cpu_s_per_1000_runs: if runs > 0 {
                    cpu / runs as f64 * 1000.0
                } else {
                    f64::NAN
                },
                peak_rss_mib: a.map(|a| mib(a.hwm_kib)).unwrap_or(f64::NAN),
                rss_end_mib: a.map(|a| mib(a.rss_kib)).unwrap_or(f64::NAN),
            }
        })
        .collect()
}

async fn one_scenario(
    paths: &Paths,
    system: &str,
    sc: &Scenario,
    n: usize,
    budget: Duration,
) -> Result<ScenarioResult> {
    let tag = format!("{}-{}", system, sc.name.replace([' ', '='], "_"));
    let mut stack = start(paths, system, &tag, sc.c).await?;
    let res = measure(&mut stack, sc.name, sc.size, sc.c, n, budget).await;
    stack.stop();
    res
}

/// Warm-up, then the measured phase, with CPU and memory read around it.
async fn measure(
    stack: &mut Stack,
    name: &str,
    size: usize,
    c: usize,
    n: usize,
    budget: Duration,
) -> Result<ScenarioResult> {
    measure_samples(stack, name, size, c, n, budget)
        .await
        .map(|(r, _)| r)
}

/// Runs [`measure`] drives before the measured phase.
fn warmup_runs(n: usize, c: usize) -> usize {
    (n / 10).clamp(c.min(n), 200)
}

/// [`measure`], also returning every measured run's sample.
async fn measure_samples(
    stack: &mut Stack,
    name: &str,
    size: usize,
    c: usize,
    n: usize,
    budget: Duration,
) -> Result<(ScenarioResult, Vec<load::Sample>)> {
    let warm_n = warmup_runs(n, c);
    let warm = drive(
        &stack.http,
        &stack.driver,
        size,
        warm_n,
        c,
        budget / 2,
        None,
    )
    .await;
    stack.check_alive()?;
    if warm.samples.is_empty() {
        bail!(
            "no warm-up run completed ({} errors; first: {:?})",
            warm.errors,
            warm.first_error
        );
    }
    let before: Vec<Option<Snap>> = stack.procs().iter().map(|p| p.snap()).collect();
    let self_before = Snap::of_self();
    let out = drive(&stack.http, &stack.driver, size, n, c, budget, None).await;
    let after: Vec<Option<Snap>> = stack.procs().iter().map(|p| p.snap()).collect();
    let self_after = Snap::of_self();
    stack.check_alive()?;
    let ok = out.samples.len();
    let wall = out.wall.as_secs_f64();
    let result = ScenarioResult {
        scenario: name.to_string(),
        system: stack.system.clone(),
        durability: stack.durability.clone(),
        size_bytes: size,
        concurrency: c,
        runs_requested: n,
        runs_ok: ok,
        errors: out.errors,
        first_error: out.first_error.clone(),
        stopped_by_time_budget: out.timed_out,
        wall_s: wall,
        runs_per_s: ok as f64 / wall,
        steps_per_s: ok as f64 * STEPS_PER_RUN / wall,
        latency_ms: Percentiles::of(out.samples.iter().map(|s| s.latency_ms).collect()),
        observed_latency_ms: Percentiles::of(out.samples.iter().map(|s| s.observed_ms).collect()),
        polls_per_run: out.samples.iter().map(|s| s.polls as f64).sum::<f64>() / ok.max(1) as f64,
        processes: proc_results(stack, &before, &after, ok),
        loadgen_cpu_s: match (self_before, self_after) {
            (Some(b), Some(a)) => a.cpu_s - b.cpu_s,
            _ => f64::NAN,
        },
        data_bytes_end: stack.data_bytes(),
        round: 0,
    };
    Ok((result, out.samples))
}

// ---------------------------------------------------------------------------------------
// Soak

#[derive(Serialize, Clone, Copy)]
struct SoakPoint {
    runs: usize,
    elapsed_s: f64,
    server_rss_mib: f64,
    app_rss_mib: f64,
    db_mib: f64,
}

/// Least-squares slope of y (MiB) over x (runs), in bytes per run.
fn slope_bytes_per_run(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx * 1048576.0
    }
}

async fn soak(paths: &Paths, smoke: bool, a: &SoakArgs) -> Result<String> {
    let runs = a.soak_runs.unwrap_or(if smoke { 2_000 } else { 100_000 });
    let every = a
        .soak_sample_every
        .unwrap_or(if smoke { 200 } else { 1_000 })
        .max(1);
    let warmup = a.soak_warmup.unwrap_or(runs / 10);
    let budget = Duration::from_secs(a.soak_budget_s.unwrap_or(if smoke { 60 } else { 3 * 3600 }));
    let c = a.soak_concurrency;
    println!(
        "\n## Soak: {runs} runs at C={c}, RSS every {every} runs{}\n",
        if smoke { " (smoke)" } else { "" }
    );
    let mut stack = systems::start_cairn(paths, AppKind::Rust, "soak", c).await?;
    let progress = Arc::new(AtomicUsize::new(0));
    let (http, driver) = (stack.http.clone(), stack.driver.clone());
    let p2 = progress.clone();
    let run =
        tokio::spawn(async move { drive(&http, &driver, 1024, runs, c, budget, Some(p2)).await });
    let start = Instant::now();
    let mut points = Vec::new();
    let sample = |done: usize, stack: &Stack| -> SoakPoint {
        SoakPoint {
            runs: done,
            elapsed_s: start.elapsed().as_secs_f64(),
            server_rss_mib: stack
                .server
                .snap()
                .map(|s| mib(s.rss_kib))
                .unwrap_or(f64::NAN),
            app_rss_mib: stack.app.snap().map(|s| mib(s.rss_kib)).unwrap_or(f64::NAN),
            db_mib: stack.data_bytes() as f64 / 1048576.0,
        }
    };
    points.push(sample(0, &stack));
    let mut next_mark = every;
    let mut last_print = Instant::now();
    while !run.is_finished() {
        let done = progress.load(Ordering::Relaxed);
        if done >= next_mark {
            points.push(sample(done, &stack));
            next_mark = (done / every + 1) * every;
            if last_print.elapsed() > Duration::from_secs(20) {
                let p = points.last().unwrap();
                eprintln!(
                    "    {} runs, server {:.1} MiB, app {:.1} MiB, db {:.1} MiB",
                    p.runs, p.server_rss_mib, p.app_rss_mib, p.db_mib
                );
                last_print = Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = run.await.context("soak driver")?;
    let done = progress.load(Ordering::Relaxed);
    if points.last().map(|p| p.runs) != Some(done) {
        points.push(sample(done, &stack));
    }
    stack.check_alive()?;
    let server_hwm = stack
        .server
        .snap()
        .map(|s| mib(s.hwm_kib))
        .unwrap_or(f64::NAN);
    let app_hwm = stack.app.snap().map(|s| mib(s.hwm_kib)).unwrap_or(f64::NAN);
    let db_bytes = stack.data_bytes();
    stack.stop();

    let after: Vec<&SoakPoint> = points.iter().filter(|p| p.runs >= warmup).collect();
    let server_slope = slope_bytes_per_run(
        &after
            .iter()
            .map(|p| (p.runs as f64, p.server_rss_mib))
            .collect::<Vec<_>>(),
    );
    let app_slope = slope_bytes_per_run(
        &after
            .iter()
            .map(|p| (p.runs as f64, p.app_rss_mib))
            .collect::<Vec<_>>(),
    );
    let db_per_run = db_bytes as f64 / done.max(1) as f64;
    let lat = Percentiles::of(out.samples.iter().map(|s| s.latency_ms).collect());
    let rate = out.samples.len() as f64 / out.wall.as_secs_f64();
    let limit = a.soak_max_slope_bytes_per_run;
    // The slope is only meaningful over enough samples; the smoke run reports it but does
    // not gate on it.
    let gated = !smoke && after.len() >= 10;
    let pass_server = server_slope <= limit;
    let pass_app = app_slope <= limit;

    let stem = format!("{}soak-{}", if smoke { "smoke-" } else { "" }, stamp());
    let png = paths.results_dir.join(format!("{stem}.png"));
    std::fs::create_dir_all(&paths.results_dir)?;
    let series: Vec<(f64, f64, f64)> = points
        .iter()
        .map(|p| (p.runs as f64, p.server_rss_mib, p.app_rss_mib))
        .collect();
    let plot_note = match plot::soak_png(
        &png,
        &series,
        warmup as f64,
        &format!("Cairn soak: {done} runs at C={c}, 1 KiB"),
    ) {
        Ok(()) => png.display().to_string(),
        Err(e) => format!("plot failed: {e:#}"),
    };
    let verdict = if !gated {
        "not gated (smoke or too few samples)".to_string()
    } else if pass_server && pass_app {
        format!("PASS (both ≤ {limit} B/run)")
    } else {
        format!("FAIL (limit {limit} B/run)")
    };
    let md = format!(
        "## Soak\n\n{done} runs of the founding function (1 KiB) through Cairn + Rust SDK at C={c} in {:.0} s ({rate:.0} runs/s, p50 {:.1} ms, p99 {:.1} ms, {} errors).\n\n\
         | process | RSS after warm-up ({warmup} runs) MiB | RSS at end MiB | peak RSS MiB | slope after warm-up B/run |\n|---|---:|---:|---:|---:|\n\
         | cairn server | {:.1} | {:.1} | {:.1} | {:.1} |\n| Rust SDK app | {:.1} | {:.1} | {:.1} | {:.1} |\n\n\
         Slope verdict: {verdict}. Database at the end: {:.1} MiB ({:.0} bytes per run); Cairn deletes runs and events older than `--retention-days` (default 7), so within a soak it grows linearly with history and is bounded by the retention window over days.\n\nPlot: {plot_note}\n",
        out.wall.as_secs_f64(),
        lat.p50,
        lat.p99,
        out.errors,
        after.first().map(|p| p.server_rss_mib).unwrap_or(f64::NAN),
        points.last().map(|p| p.server_rss_mib).unwrap_or(f64::NAN),
        server_hwm,
        server_slope,
        after.first().map(|p| p.app_rss_mib).unwrap_or(f64::NAN),
        points.last().map(|p| p.app_rss_mib).unwrap_or(f64::NAN),
        app_hwm,
        app_slope,
        db_bytes as f64 / 1048576.0,
        db_per_run,
    );
    println!("{md}");
    report::write_json(
        &paths.results_dir,
        &format!("{stem}.json"),
        &json!({
            "machine": machine_description().trim(), "smoke": smoke, "runs": done, "concurrency": c,
            "sample_every": every, "warmup_runs": warmup, "max_slope_bytes_per_run": limit,
            "server_slope_bytes_per_run": server_slope, "app_slope_bytes_per_run": app_slope,
            "server_peak_rss_mib": server_hwm, "app_peak_rss_mib": app_hwm,
            "db_bytes_end": db_bytes, "db_bytes_per_run": db_per_run, "errors": out.errors,
            "first_error": out.first_error, "runs_per_s": rate, "latency_ms": lat, "verdict": verdict,
            "points": points,
        }),
    )?;
    if out.errors > 0 || done == 0 {
        bail!(
            "soak: {} errors, {done} runs done; first: {:?}",
            out.errors,
            out.first_error
        );
    }
    if gated && !(pass_server && pass_app) {
        bail!("soak: RSS slope after warm-up above {limit} B/run (server {server_slope:.1}, app {app_slope:.1})");
    }
    Ok(md)
}

// ---------------------------------------------------------------------------------------
// The founding leak

#[derive(Serialize)]
struct LeakResult {
    system: String,
    runs: usize,
    size_bytes: usize,
    baseline_bytes: f64,
    end_bytes: f64,
    /// Least-squares slope of the heap over runs (robust to one-off steps such as a pool
    /// growing its buffers).
    retained_bytes_per_run: f64,
    /// (heap at end − heap at start) / runs, as in the reference measurement.
    end_minus_start_per_run: f64,
    app_rss_start_mib: f64,
    app_rss_end_mib: f64,
    series: Vec<(usize, f64)>,
    measure: &'static str,
}

async fn heap(http: &reqwest::Client, port: u16) -> Result<f64> {
    let v: Value = http
        .get(format!("http://127.0.0.1:{port}/heap"))
        .send()
        .await?
        .json()
        .await?;
    v["live_bytes"]
        .as_f64()
        .context("no live_bytes in /heap answer")
}

async fn leak(paths: &Paths, smoke: bool, a: &LeakArgs) -> Result<String> {
    let runs = a.leak_runs.unwrap_or(if smoke { 50 } else { 1_000 });
    let size = a.leak_size;
    let every = (runs / 10).max(1);
    println!(
        "\n## The founding leak: {runs} runs, collect-data {size} bytes{}\n",
        if smoke { " (smoke)" } else { "" }
    );
    let mut results = Vec::new();
    let kinds = [
        AppKind::LeakJs3,
        AppKind::LeakRust { whole_ctx: false },
        AppKind::LeakRust { whole_ctx: true },
    ];
    for kind in kinds {
        eprintln!("- {}", kind.label());
        let mut stack =
            systems::start_cairn(paths, kind, &format!("leak-{}", kind.app_id()), 4).await?;
        let budget = Duration::from_secs(if smoke { 60 } else { 1800 });
        // Warm-up at the measured concurrency: lazily loaded code, JIT, connection pools and
        // their buffers (which otherwise show up as one-off steps in the first samples).
        let w = drive(&stack.http, &stack.driver, size, 20, 4, budget, None).await;
        if w.samples.is_empty() {
            bail!("{}: warm-up failed: {:?}", kind.label(), w.first_error);
        }
        let base = heap(&stack.http, stack.app_port).await?;
        let rss0 = stack.app.snap().map(|s| mib(s.rss_kib)).unwrap_or(f64::NAN);
        let mut series = vec![(0usize, base)];
        let mut done = 0;
        while done < runs {
            let k = every.min(runs - done);
            let o = drive(&stack.http, &stack.driver, size, k, 4, budget, None).await;
            if o.errors > 0 {
                bail!("{}: {} errors: {:?}", kind.label(), o.errors, o.first_error);
            }
            done += o.samples.len();
            series.push((done, heap(&stack.http, stack.app_port).await?));
            stack.check_alive()?;
        }
        let end = series.last().unwrap().1;
        let rss1 = stack.app.snap().map(|s| mib(s.rss_kib)).unwrap_or(f64::NAN);
        stack.stop();
        let r = LeakResult {
            system: kind.label().to_string(),
            runs: done,
            size_bytes: size,
            baseline_bytes: base,
            end_bytes: end,
            retained_bytes_per_run: slope_bytes_per_run(
                &series
                    .iter()
                    .map(|&(x, y)| (x as f64, y / 1048576.0))
                    .collect::<Vec<_>>(),
            ),
            end_minus_start_per_run: (end - base) / done.max(1) as f64,
            app_rss_start_mib: rss0,
            app_rss_end_mib: rss1,
            series,
            measure: if kind == AppKind::LeakJs3 {
                "V8 heapUsed after two forced GCs (node --expose-gc)"
            } else {
                "live bytes under a counting global allocator"
            },
        };
        eprintln!("    retained {:.0} bytes/run", r.retained_bytes_per_run);
        results.push(r);
    }
    let mut md = format!(
        "## The founding leak, compared\n\nEach app keeps every `ctx` it is handed in a global list (the inngest-js#1440 pattern); 20 warm-up runs, then {runs} runs of the founding function driven by Cairn at C=4, `collect-data` = {} KiB. Retained per run: least-squares slope of the heap over runs (and (end − start) / runs).\n\n| app | measure | heap before MiB | heap after MiB | retained per run | (end − start) / runs | app RSS before → after MiB |\n|---|---|---:|---:|---:|---:|---:|\n",
        size / 1024
    );
    for r in &results {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {} | {} | {:.0} → {:.0} |\n",
            r.system,
            r.measure,
            r.baseline_bytes / 1048576.0,
            r.end_bytes / 1048576.0,
            human_bytes(r.retained_bytes_per_run),
            human_bytes(r.end_minus_start_per_run),
            r.app_rss_start_mib,
            r.app_rss_end_mib
        ));
    }
    let rust_step = results
        .iter()
        .find(|r| r.system.contains("step handle"))
        .map(|r| r.retained_bytes_per_run)
        .unwrap_or(f64::NAN);
    md.push_str(&format!(
        "\nGoal: Rust SDK retained heap per run with the leaked-handle pattern ≤ 1 KiB: {:.0} B → {}.\n",
        rust_step,
        if rust_step <= 1024.0 { "meets goal" } else { "MISSES goal" }
    ));
    println!("{md}");
    report::write_json(
        &paths.results_dir,
        &format!("{}leak-{}.json", if smoke { "smoke-" } else { "" }, stamp()),
        &json!({ "machine": machine_description().trim(), "smoke": smoke, "results": results }),
    )?;
    Ok(md)
}

fn human_bytes(b: f64) -> String {
    if b.abs() >= 1048576.0 {
        format!("{:.2} MiB", b / 1048576.0)
    } else if b.abs() >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

// ---------------------------------------------------------------------------------------
// Server cost growth

async fn growth(paths: &Paths, smoke: bool, a: &GrowthArgs) -> Result<String> {
    let small = a.growth_small.unwrap_or(if smoke { 500 } else { 10_000 });
    let large = a
        .growth_large
        .unwrap_or(if smoke { 3_000 } else { 1_000_000 });
    let measure_n = a.growth_measure.unwrap_or(if smoke { 100 } else { 3_000 });
    let c = 16;
    println!(
        "\n## Server cost growth: C={c} 1 KiB at {small} vs {large} stored runs{}\n",
        if smoke { " (smoke)" } else { "" }
    );
    let mut stack = systems::start_cairn(paths, AppKind::Rust, "growth", 64).await?;
    let base = match &stack.driver {
        systems::Driver::Cairn { bases, .. } => bases[0].clone(),
        _ => unreachable!(),
    };
    let budget = Duration::from_secs(a.growth_prefill_budget_s);
    let prefill_to = |target: usize, have: usize| target.saturating_sub(have);
    let t0 = Instant::now();
    let mut stored = prefill_lanes(&stack.http, &base, prefill_to(small, 0), budget).await?;
    let fill_rate_small = stored as f64 / t0.elapsed().as_secs_f64();
    let m1 = measure(
        &mut stack,
        &format!("{small} stored"),
        1024,
        c,
        measure_n,
        Duration::from_secs(600),
    )
    .await?;
    stored += m1.runs_ok + measure_n / 10;
    let t1 = Instant::now();
    let added = prefill_lanes(&stack.http, &base, prefill_to(large, stored), budget).await?;
    let fill_rate_large = added as f64 / t1.elapsed().as_secs_f64().max(1e-9);
    stored += added;
    let m2 = measure(
        &mut stack,
        &format!("{large} stored"),
        1024,
        c,
        measure_n,
        Duration::from_secs(600),
    )
    .await?;
    let db_bytes = stack.data_bytes();
    stack.stop();
    let ratio = m2.runs_per_s / m1.runs_per_s;
    let md = format!(
        "## Server cost growth\n\nCairn + Rust SDK, C={c}, 1 KiB, {measure_n} measured runs at each point. Pre-fill through the normal event path (batches of 100 events, 4 lanes): {fill_rate_small:.0} runs/s to {small}, {fill_rate_large:.0} runs/s onward.\n\n{}\nThroughput at {large} vs {small} stored runs: {ratio:.2}×; p50 {:.1} → {:.1} ms. Database at the end: {:.0} MiB for ~{stored} runs.\n",
        report::table(&[m1.clone(), m2.clone()]),
        m1.latency_ms.p50,
        m2.latency_ms.p50,
        db_bytes as f64 / 1048576.0
    );
    println!("{md}");
    report::write_json(
        &paths.results_dir,
        &format!(
            "{}growth-{}.json",
            if smoke { "smoke-" } else { "" },
            stamp()
        ),
        &json!({ "machine": machine_description().trim(), "smoke": smoke, "small": small, "large": large,
                 "at_small": m1, "at_large": m2, "throughput_ratio": ratio, "db_bytes_end": db_bytes,
                 "prefill_runs_per_s": [fill_rate_small, fill_rate_large] }),
    )?;
    Ok(md)
}

async fn prefill_lanes(
    http: &reqwest::Client,
    base: &str,
    n: usize,
    budget: Duration,
) -> Result<usize> {
    const LANES: usize = 4;
    let mut tasks = Vec::new();
    for i in 0..LANES {
        let k = n / LANES + usize::from(i < n % LANES);
        let (http, base) = (http.clone(), base.to_string());
        tasks.push(tokio::spawn(async move {
            load::prefill(&http, &base, 1024, k, 100, budget).await
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------
// Flow control's cost

/// The 1-, 5- and 15-minute load averages.
fn load_avg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = s.split_whitespace().map(|x| x.parse().unwrap_or(f64::NAN));
    [(); 3].map(|_| v.next().unwrap_or(f64::NAN))
}

#[derive(Serialize)]
struct FlowPhase {
    round: usize,
    /// `baseline` (the baseline binary, unconstrained), `unconstrained` or `keyed`.
    variant: &'static str,
    server: String,
    load_avg_start: [f64; 3],
    load_avg_end: [f64; 3],
    /// The app's `/flow-stats` after the phase (calls of the keyed function in progress at
    /// once, per tenant and in all).
    app_flow_stats: Value,
    /// With `--hot-every`: latency of the hot tenant's runs and of the others'.
    hot_split: Option<Value>,
    result: ScenarioResult,
}

#[derive(Serialize, Clone)]
struct FlowAggregate {
    variant: &'static str,
    server: String,
    phases: usize,
    runs_ok: usize,
    errors: usize,
    /// All measured runs of the variant over all its measured wall time.
    runs_per_s: f64,
    /// Each phase's runs/s.
    runs_per_s_by_round: Vec<f64>,
    /// Over the runs of all the variant's phases.
    latency_ms: Percentiles,
    /// Server CPU seconds per 1,000 runs over all its phases: less sensitive than runs/s to
    /// what else the machine is doing.
    server_cpu_s_per_1000_runs: f64,
    /// Mean of the 1-minute load average at the start and end of its phases.
    load_avg_1m: f64,
}

async fn app_flow_stats(stack: &Stack) -> Value {
    let url = format!("http://127.0.0.1:{}/flow-stats", stack.app_port);
    match stack.http.get(url).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

async fn flow(paths: &Paths, smoke: bool, a: &FlowArgs) -> Result<String> {
    let n = a.flow_runs.unwrap_or(if smoke { 100 } else { 5_000 });
    let rounds = a.flow_rounds.unwrap_or(if smoke { 1 } else { 2 }).max(1);
    let (c, size, tenants) = (a.flow_concurrency, a.flow_size, a.tenants);
    let budget = Duration::from_secs(a.flow_budget_s.unwrap_or(if smoke { 30 } else { 240 }));
    let this_label = format!(
        "this build ({})",
        std::env::var("BENCH_CAIRN_REV").unwrap_or_else(|_| "unknown".into())
    );
    let baseline = a.baseline_cairn_bin.as_ref().map(|bin| Paths {
        cairn_bin: bin.clone(),
        ..paths.clone()
    });
    println!(
        "\n## Flow control: unconstrained vs concurrency {} per tenant ({tenants} tenants), C={c}, {size} B, {n} runs, {rounds} round(s){}{}\n",
        KEYED_LIMIT,
        if baseline.is_some() { format!(", with baseline {}", a.baseline_label) } else { String::new() },
        if smoke { " (smoke)" } else { "" }
    );
    // Against a baseline every phase awaits its runs the same way, by paced polls: a server
    // from before `GET /v1/runs/{id}?wait_ms=…` cannot long-poll, and a client that polled
    // one server and long-polled the other would load them differently.
    let long_poll = baseline.is_none();
    let mut phases: Vec<FlowPhase> = Vec::new();
    let mut samples: std::collections::BTreeMap<&'static str, Vec<load::Sample>> =
        Default::default();
    let mut failures = Vec::new();
    for round in 1..=rounds {
        let mut plan: Vec<(&'static str, &Paths, String)> = Vec::new();
        if let Some(b) = &baseline {
            plan.push(("baseline", b, a.baseline_label.clone()));
        }
        plan.push(("unconstrained", paths, this_label.clone()));
        plan.push(("keyed", paths, this_label.clone()));
        // Even rounds run in the reverse order (A B C, C B A, …), so that a drift in the
        // machine's load over the run does not favour whichever phase comes first.
        if round % 2 == 0 {
            plan.reverse();
        }
        for (variant, p, server) in plan {
            let keyed = variant == "keyed";
            let name = if keyed {
                format!("keyed: concurrency {KEYED_LIMIT} per tenant, {tenants} tenants")
            } else {
                "unconstrained".to_string()
            };
            eprintln!("- round {round}, {variant} ({server}): {n} runs at C={c}");
            let load0 = load_avg();
            let res = async {
                let mut stack =
                    systems::start_cairn(p, AppKind::Rust, &format!("flow-{variant}"), c).await?;
                if keyed {
                    stack.target(&a.flow_event, tenants, a.hot_every);
                }
                stack.long_poll(long_poll);
                let r = measure_samples(&mut stack, &name, size, c, n, budget).await;
                let stats = app_flow_stats(&stack).await;
                stack.stop();
                r.map(|(r, l)| (r, l, stats))
            }
            .await;
            let load1 = load_avg();
            match res {
                Ok((mut r, lat, stats)) => {
                    r.system = format!("Cairn + Rust SDK, {server}");
                    eprintln!(
                        "    {:.1} runs/s, p50 {:.1} ms, p99 {:.1} ms, errors {}, load {:.2} → {:.2}, app flow stats {stats}",
                        r.runs_per_s, r.latency_ms.p50, r.latency_ms.p99, r.errors, load0[0], load1[0]
                    );
                    if r.errors > 0 || r.runs_ok == 0 {
                        failures.push(format!(
                            "round {round} {variant}: {} errors, first: {:?}",
                            r.errors, r.first_error
                        ));
                    }
                    if keyed {
                        let max = stats["max_in_flight_per_tenant"].as_u64().unwrap_or(0);
                        if max > u64::from(KEYED_LIMIT) {
                            failures.push(format!(
                                "round {round} keyed: {max} calls of one tenant in progress at once (limit {KEYED_LIMIT})"
                            ));
                        }
                    }
                    let hot_split = (keyed && a.hot_every > 0).then(|| {
                        let pick = |hot: bool| {
                            Percentiles::of(
                                lat.iter()
                                    .filter(|s| s.hot == hot)
                                    .map(|s| s.latency_ms)
                                    .collect(),
                            )
                        };
                        let (h, o) = (pick(true), pick(false));
                        eprintln!(
                            "    hot tenant: p50 {:.1} ms, p99 {:.1} ms; other tenants: p50 {:.1} ms, p99 {:.1} ms",
                            h.p50, h.p99, o.p50, o.p99
                        );
                        json!({ "hot_tenant": h, "other_tenants": o })
                    });
                    samples.entry(variant).or_default().extend(lat);
                    phases.push(FlowPhase {
                        round,
                        variant,
                        server,
                        load_avg_start: load0,
                        load_avg_end: load1,
                        app_flow_stats: stats,
                        hot_split,
                        result: r,
                    });
                }
                Err(e) => {
                    eprintln!("    FAILED: {e:#}");
                    failures.push(format!("round {round} {variant}: {e:#}"));
                }
            }
        }
    }

    let aggregate = |variant: &'static str| -> Option<FlowAggregate> {
        let ps: Vec<&FlowPhase> = phases.iter().filter(|p| p.variant == variant).collect();
        let first = ps.first()?;
        let ok: usize = ps.iter().map(|p| p.result.runs_ok).sum();
        let wall: f64 = ps.iter().map(|p| p.result.wall_s).sum();
        Some(FlowAggregate {
            variant,
            server: first.server.clone(),
            phases: ps.len(),
            runs_ok: ok,
            errors: ps.iter().map(|p| p.result.errors).sum(),
            runs_per_s: ok as f64 / wall.max(1e-9),
            runs_per_s_by_round: ps.iter().map(|p| p.result.runs_per_s).collect(),
            latency_ms: Percentiles::of(
                samples
                    .get(variant)
                    .map(|v| v.iter().map(|s| s.latency_ms).collect())
                    .unwrap_or_default(),
            ),
            server_cpu_s_per_1000_runs: ps
                .iter()
                .map(|p| p.result.server().map(|s| s.cpu_s).unwrap_or(f64::NAN))
                .sum::<f64>()
                / ok.max(1) as f64
                * 1000.0,
            load_avg_1m: ps
                .iter()
                .map(|p| (p.load_avg_start[0] + p.load_avg_end[0]) / 2.0)
                .sum::<f64>()
                / ps.len() as f64,
        })
    };
    let aggs: Vec<FlowAggregate> = ["baseline", "unconstrained", "keyed"]
        .into_iter()
        .filter_map(aggregate)
        .collect();
    let find = |v: &str| aggs.iter().find(|g| g.variant == v);
    // Ratios of the pooled rates, and per round (each round's phases ran back to back).
    let ratio_of = |num: &str, den: &str| -> Option<(f64, Vec<f64>)> {
        let (x, y) = (find(num)?, find(den)?);
        let by_round = phases
            .iter()
            .filter(|p| p.variant == num)
            .filter_map(|p| {
                phases
                    .iter()
                    .find(|q| q.variant == den && q.round == p.round)
                    .map(|q| p.result.runs_per_s / q.result.runs_per_s)
            })
            .collect();
        Some((x.runs_per_s / y.runs_per_s, by_round))
    };
    let median = report::median;
    let keyed_ratio = ratio_of("keyed", "unconstrained");
    let before_ratio = ratio_of("unconstrained", "baseline");

    let mut md = String::from("## Flow control's cost\n\n");
    md.push_str(&format!(
        "The founding function (C={c}, {size} B, {n} measured runs per phase after a warm-up), unconstrained (`founding`, event `{}`) and keyed (`founding-keyed`, event `{}`, `concurrency: [{{\"limit\": {KEYED_LIMIT}, \"key\": \"event.data.tenant\"}}]`, {}){}; {rounds} round(s), each phase on freshly started processes, back to back, even rounds in reverse order; runs awaited by {}.\n\n",
        systems::EVENT,
        a.flow_event,
        if a.hot_every > 0 {
            format!("one run in {} to one hot tenant, the others round-robin over {} tenants", a.hot_every, tenants.saturating_sub(1))
        } else {
            format!("runs spread round-robin over {tenants} tenants")
        },
        if baseline.is_some() {
            format!(", plus the unconstrained function on the baseline server ({})", a.baseline_label)
        } else {
            String::new()
        },
        if long_poll {
            "`GET /v1/events/{id}/runs?wait_ms=10000`"
        } else {
            "paced polls of `GET /v1/runs/{id}` (as the baseline needs)"
        }
    ));
    let rows: Vec<ScenarioResult> = phases
        .iter()
        .map(|p| {
            let mut r = p.result.clone();
            r.scenario = format!("round {}: {}", p.round, r.scenario);
            r
        })
        .collect();
    md.push_str(&report::table(&rows));
    md.push_str("\n| variant | server | runs/s (all rounds) | runs/s by round | p50 ms | p90 ms | p99 ms | server CPU-s /1k runs | ok / errors | load avg (1 min) |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|\n");
    for g in &aggs {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {} / {} | {:.2} |\n",
            g.variant,
            g.server,
            g.runs_per_s,
            g.runs_per_s_by_round
                .iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            g.latency_ms.p50,
            g.latency_ms.p90,
            g.latency_ms.p99,
            g.server_cpu_s_per_1000_runs,
            g.runs_ok,
            g.errors,
            g.load_avg_1m
        ));
    }
    let by_round = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cpu_ratio = |num: &str, den: &str| {
        find(num)
            .zip(find(den))
            .map(|(x, y)| x.server_cpu_s_per_1000_runs / y.server_cpu_s_per_1000_runs)
            .unwrap_or(f64::NAN)
    };
    if let Some((r, rs)) = &keyed_ratio {
        md.push_str(&format!(
            "\nKeyed / unconstrained throughput: **{r:.3}×** (by round: {}; median {:.3}×); goal ≥ 0.80×: {}. Server CPU per run, keyed / unconstrained: {:.3}×.\n",
            by_round(rs),
            median(rs),
            if *r >= 0.8 { "met" } else { "NOT MET" },
            cpu_ratio("keyed", "unconstrained")
        ));
    }
    if let Some((r, rs)) = &before_ratio {
        md.push_str(&format!(
            "\nUnconstrained, this build / {}: **{r:.3}×** (by round: {}; median {:.3}×); goal within 5% (≥ 0.95×): {}. Server CPU per run, this build / {}: {:.3}×.\n",
            a.baseline_label,
            by_round(rs),
            median(rs),
            if *r >= 0.95 { "met" } else { "NOT MET" },
            a.baseline_label,
            cpu_ratio("unconstrained", "baseline")
        ));
    }
    let splits: Vec<(usize, &Value)> = phases
        .iter()
        .filter_map(|p| p.hot_split.as_ref().map(|h| (p.round, h)))
        .collect();
    if !splits.is_empty() {
        md.push_str("\n| round | runs | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---:|---:|---:|---:|\n");
        for (round, h) in splits {
            for (who, k) in [
                ("hot tenant", "hot_tenant"),
                ("other tenants", "other_tenants"),
            ] {
                let p = &h[k];
                let f = |x: &str| p[x].as_f64().unwrap_or(f64::NAN);
                md.push_str(&format!(
                    "| {round} | {who} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
                    f("p50"),
                    f("p90"),
                    f("p99"),
                    f("max")
                ));
            }
        }
    }
    let stats: Vec<&Value> = phases
        .iter()
        .filter(|p| p.variant == "keyed")
        .map(|p| &p.app_flow_stats)
        .collect();
    if !stats.is_empty() {
        md.push_str(&format!(
            "\nKeyed function, seen from the app: at most {} calls of one tenant and {} calls in all in progress at once (limit {KEYED_LIMIT} per tenant).\n",
            stats
                .iter()
                .map(|s| s["max_in_flight_per_tenant"].to_string())
                .collect::<Vec<_>>()
                .join(", "),
            stats
                .iter()
                .map(|s| s["max_in_flight_total"].to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    println!("{md}");
    let path = report::write_json(
        &paths.results_dir,
        &format!("{}flow-{}.json", if smoke { "smoke-" } else { "" }, stamp()),
        &json!({
            "machine": machine_description().trim(), "smoke": smoke, "runs": n, "concurrency": c,
            "size_bytes": size, "tenants": tenants, "limit_per_tenant": KEYED_LIMIT,
            "keyed_event": a.flow_event, "hot_every": a.hot_every, "rounds": rounds, "baseline": a.baseline_label.clone(),
            "run_end_awaited_by": if long_poll { "GET /v1/events/{id}/runs?wait_ms=10000" } else { "paced polls of GET /v1/runs/{id}" },
            "phases": phases, "aggregates": aggs,
            "keyed_over_unconstrained": keyed_ratio.as_ref().map(|(r, rs)| json!({ "ratio": r, "by_round": rs, "median_of_rounds": median(rs), "server_cpu_per_run_ratio": cpu_ratio("keyed", "unconstrained") })),
            "this_over_baseline": before_ratio.as_ref().map(|(r, rs)| json!({ "ratio": r, "by_round": rs, "median_of_rounds": median(rs), "server_cpu_per_run_ratio": cpu_ratio("unconstrained", "baseline") })),
        }),
    )?;
    println!("results: {}", path.display());
    if !failures.is_empty() {
        bail!(
            "{} phase(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(md)
}

// ---------------------------------------------------------------------------------------
// Several nodes on PostgreSQL

/// Sum of a counter (all label sets) in a Prometheus text exposition.
fn counter_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// (statements sent to PostgreSQL, SDK calls made, run ends announced to other nodes)
/// summed over the stack's nodes.
async fn db_counters(stack: &Stack) -> Result<(f64, f64, f64)> {
    let systems::Driver::Cairn { bases, .. } = &stack.driver else {
        bail!("not a Cairn stack");
    };
    let (mut statements, mut calls, mut announced) = (0.0, 0.0, 0.0);
    for base in bases {
        let text = stack
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        statements += counter_sum(&text, "cairn_db_statements_total");
        calls += counter_sum(&text, "cairn_sdk_calls_total");
        announced += counter_sum(&text, "cairn_run_end_announcements_total");
    }
    Ok((statements, calls, announced))
}

async fn pg_admin(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| "connecting to PostgreSQL (--pg-url / BENCH_PG_URL)")?;
    tokio::spawn(conn);
    Ok(client)
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> Result<String> {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let cut = url[after_scheme..]
        .find('/')
        .map(|i| i + after_scheme)
        .ok_or_else(|| anyhow::anyhow!("--pg-url has no database path: {url}"))?;
    let query = url[cut..].find('?').map_or("", |q| &url[cut + q..]);
    Ok(format!("{}/{db}{query}", &url[..cut]))
}

#[derive(Serialize)]
struct NodesPhase {
    round: usize,
    nodes: usize,
    result: ScenarioResult,
    server_cpu_s_per_1000_runs: f64,
    /// All PostgreSQL processes on the machine, warm-up included.
    postgres_cpu_s_per_1000_runs: f64,
    statements_per_run: f64,
    statements_per_call: f64,
    calls_per_run: f64,
    /// Run ends announced to the other nodes (`NOTIFY`), per run.
    announcements_per_run: f64,
}

async fn nodes(paths: &Paths, smoke: bool, a: &NodesArgs) -> Result<String> {
    let n = a.nodes_runs.unwrap_or(if smoke { 60 } else { 3_000 });
    let c = a.nodes_concurrency;
    let rounds = a.nodes_rounds.unwrap_or(if smoke { 1 } else { 2 });
    let budget = Duration::from_secs(a.nodes_budget_s.unwrap_or(if smoke { 60 } else { 300 }));
    println!(
        "\n## Several nodes on PostgreSQL{}\n",
        if smoke { " (smoke)" } else { "" }
    );
    let admin = pg_admin(&a.pg_url).await?;
    let setting = |name: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .map(|r| r.get::<_, String>(0))
        }
    };
    let (fsync, sync_commit) = (
        setting("fsync").await?,
        setting("synchronous_commit").await?,
    );
    if fsync != "on" || sync_commit != "on" {
        bail!(
            "PostgreSQL runs with fsync={fsync}, synchronous_commit={sync_commit}: not the \
             durability the other scenarios measure"
        );
    }
    let version = setting("server_version").await?;
    let mut phases = Vec::new();
    for round in 0..rounds {
        let mut counts = a.node_counts.clone();
        if round % 2 == 1 {
            counts.reverse();
        }
        for &k in &counts {
            let db = format!("cairn_bench_{}_{k}", stamp().to_lowercase());
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await?;
            let mut url = with_database(&a.pg_url, &db)?;
            if let Some(params) = &a.nodes_db_params {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str(params);
            }
            eprintln!("- round {round}: {k} node(s), {n} runs at C={c}");
            let res = async {
                let mut stack =
                    systems::start_cairn_nodes(paths, &format!("nodes-{k}"), c, &url, k).await?;
                if let (true, systems::Driver::Cairn { bases, .. }) =
                    (a.nodes_send_to_first, &mut stack.driver)
                {
                    bases.truncate(1);
                }
                let res = async {
                    let (s0, c0, a0) = db_counters(&stack).await?;
                    let pg0 = procs::cpu_of_all("postgres");
                    let r =
                        measure(&mut stack, &format!("{k} node(s)"), 1024, c, n, budget).await?;
                    let pg1 = procs::cpu_of_all("postgres");
                    let (s1, c1, a1) = db_counters(&stack).await?;
                    Ok::<_, anyhow::Error>((r, s1 - s0, c1 - c0, a1 - a0, pg1 - pg0))
                }
                .await;
                stack.stop();
                res
            }
            .await;
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await?;
            let (r, statements, calls, announced, pg_cpu) = res?;
            // The counters bracket `measure`'s warm-up too; count its runs in.
            let counted = (r.runs_ok + warmup_runs(n, c)) as f64;
            let server_cpu: f64 = r
                .processes
                .iter()
                .filter(|p| p.role == "server")
                .map(|p| p.cpu_s)
                .sum();
            let phase = NodesPhase {
                round,
                nodes: k,
                server_cpu_s_per_1000_runs: server_cpu / r.runs_ok.max(1) as f64 * 1000.0,
                postgres_cpu_s_per_1000_runs: pg_cpu / counted * 1000.0,
                statements_per_run: statements / counted,
                statements_per_call: statements / calls.max(1.0),
                calls_per_run: calls / counted,
                announcements_per_run: announced / counted,
                result: r,
            };
            eprintln!(
                "    {:.1} runs/s, p50 {:.1} ms, server CPU {:.2} s/1k runs, PostgreSQL CPU {:.2} s/1k runs, {:.2} statements per call, {:.2} ends announced per run, errors {}",
                phase.result.runs_per_s,
                phase.result.latency_ms.p50,
                phase.server_cpu_s_per_1000_runs,
                phase.postgres_cpu_s_per_1000_runs,
                phase.statements_per_call,
                phase.announcements_per_run,
                phase.result.errors
            );
            phases.push(phase);
        }
    }
    let mut md = String::from("## Several nodes on PostgreSQL\n\n");
    md.push_str(&format!(
        "`cairn dev` nodes sharing one PostgreSQL {version} database (fsync=on, synchronous_commit=on), each phase on a fresh database and fresh processes; one Rust SDK app; the founding function at C={c}, 1 KiB, {n} measured runs after a warm-up, {}. Statements are counted by each node (`cairn_db_statements_total`, BEGIN and COMMIT included) over warm-up and measured runs; an SDK call is one request to the app (1 per run when the Rust SDK checkpoints its steps, as it does by default; 4 with `BENCH_CHECKPOINTING=0`: 3 steps and the final return).\n\n",
        if a.nodes_send_to_first {
            "every run sent to the first node and awaited there, the other nodes idle beside it"
        } else {
            "run i sent to node i mod k and awaited there"
        }
    ));
    if let Some(params) = &a.nodes_db_params {
        md.push_str(&format!("The nodes' database URL adds `{params}`.\n\n"));
    }
    md.push_str("| round | nodes | runs/s | p50 ms | p99 ms | server CPU-s /1k runs (all nodes) | PostgreSQL CPU-s /1k runs | app CPU-s /1k runs | statements / run | statements / SDK call | run ends announced / run | ok / errors |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for p in &phases {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {} / {} |\n",
            p.round,
            p.nodes,
            p.result.runs_per_s,
            p.result.latency_ms.p50,
            p.result.latency_ms.p99,
            p.server_cpu_s_per_1000_runs,
            p.postgres_cpu_s_per_1000_runs,
            p.result.app().map_or(f64::NAN, |x| x.cpu_s_per_1000_runs),
            p.statements_per_run,
            p.statements_per_call,
            p.announcements_per_run,
            p.result.runs_ok,
            p.result.errors
        ));
    }
    let pooled = |k: usize| {
        let ps: Vec<&NodesPhase> = phases.iter().filter(|p| p.nodes == k).collect();
        let ok: usize = ps.iter().map(|p| p.result.runs_ok).sum();
        let wall: f64 = ps.iter().map(|p| p.result.wall_s).sum();
        (ok as f64 / wall.max(1e-9), ps.len())
    };
    if let (Some(&lo), Some(&hi)) = (a.node_counts.first(), a.node_counts.last()) {
        if lo != hi {
            let ((x, _), (y, _)) = (pooled(hi), pooled(lo));
            md.push_str(&format!(
                "\n{hi} nodes vs {lo}: {:.2}× the runs/s (pooled over rounds).\n",
                x / y
            ));
        }
    }
    println!("{md}");
    let errors: usize = phases.iter().map(|p| p.result.errors).sum();
    let path = report::write_json(
        &paths.results_dir,
        &format!(
            "{}nodes-{}.json",
            if smoke { "smoke-" } else { "" },
            stamp()
        ),
        &json!({ "machine": machine_description().trim(), "smoke": smoke, "postgres": version, "send_to_first": a.nodes_send_to_first, "db_params": a.nodes_db_params, "phases": phases }),
    )?;
    println!("results: {}", path.display());
    if errors > 0 {
        bail!("{errors} runs failed in the nodes scenario");
    }
    Ok(md)
}
