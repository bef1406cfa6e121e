//! Scenario results: JSON records and the markdown tables printed at the end.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use crate::load::Percentiles;

pub const STEPS_PER_RUN: f64 = 3.0;

#[derive(Debug, Clone, Serialize)]
pub struct ProcResult {
    pub role: String,
    pub name: String,
    /// CPU seconds used during the measured phase.
    pub cpu_s: f64,
    pub cpu_s_per_1000_runs: f64,
    /// VmHWM at the end of the scenario (the process was started for this scenario).
    pub peak_rss_mib: f64,
    pub rss_end_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub system: String,
    pub durability: String,
    pub size_bytes: usize,
    pub concurrency: usize,
    pub runs_requested: usize,
    pub runs_ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub stopped_by_time_budget: bool,
    pub wall_s: f64,
    pub runs_per_s: f64,
    pub steps_per_s: f64,
    /// Event accepted → run completed (ms).
    pub latency_ms: Percentiles,
    /// As seen by the load generator, including its polling interval (ms).
    pub observed_latency_ms: Percentiles,
    pub polls_per_run: f64,
    pub processes: Vec<ProcResult>,
    pub loadgen_cpu_s: f64,
    pub data_bytes_end: u64,
    /// Which round of the scenario (throughput with `--rounds`); 0 otherwise.
    pub round: usize,
}

impl ScenarioResult {
    pub fn server(&self) -> Option<&ProcResult> {
        self.processes.iter().find(|p| p.role == "server")
    }
    pub fn app(&self) -> Option<&ProcResult> {
        self.processes.iter().find(|p| p.role == "app")
    }
}

pub fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(value)?)?;
    Ok(path)
}

fn f(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

pub fn table(results: &[ScenarioResult]) -> String {
    let rounds = results.iter().map(|r| r.round + 1).max().unwrap_or(1);
    let mut s = String::new();
    s.push_str("| scenario | system | runs/s | steps/s | p50 ms | p90 ms | p99 ms | server CPU-s /1k runs | app CPU-s /1k runs | server peak RSS MiB | app peak RSS MiB | ok / errors |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in results {
        let (sc, sr) = r
            .server()
            .map(|p| (p.cpu_s_per_1000_runs, p.peak_rss_mib))
            .unwrap_or_default();
        let (ac, ar) = r
            .app()
            .map(|p| (p.cpu_s_per_1000_runs, p.peak_rss_mib))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {}{} |",
            label(r, rounds),
            r.system,
            f(r.runs_per_s),
            f(r.steps_per_s),
            f(r.latency_ms.p50),
            f(r.latency_ms.p90),
            f(r.latency_ms.p99),
            f(sc),
            f(ac),
            f(sr),
            f(ar),
            r.runs_ok,
            r.errors,
            if r.stopped_by_time_budget {
                " (time budget hit)"
            } else {
                ""
            },
        );
    }
    s
}

/// The scenario's name, with its round when there are several.
fn label(r: &ScenarioResult, rounds: usize) -> String {
    if rounds > 1 {
        format!("{} · round {}", r.scenario, r.round)
    } else {
        r.scenario.clone()
    }
}

/// The median (NaN for none): what several rounds on a noisy machine report.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Cairn + Rust SDK against Restate, per scenario and round, with the goals at C=16
/// 1 KiB. With several rounds the goals are judged on the medians of the rounds' ratios,
/// each ratio taken between runs of the same round.
pub fn ratios(results: &[ScenarioResult]) -> (String, Value) {
    let mut s = String::new();
    let mut json = Vec::new();
    let mut goals = String::new();
    let rounds = results.iter().map(|r| r.round + 1).max().unwrap_or(1);
    s.push_str("| scenario | Cairn+Rust / Restate runs/s | Cairn+Rust / Restate p50 | Cairn+Rust / Restate server peak RSS | Cairn+TS / Restate runs/s |\n");
    s.push_str("|---|---:|---:|---:|---:|\n");
    let mut scenarios: Vec<&str> = results.iter().map(|r| r.scenario.as_str()).collect();
    scenarios.dedup();
    let cell = |x: Option<f64>| x.map(|x| format!("{x:.2}×")).unwrap_or_else(|| "–".into());
    for sc in scenarios {
        // (runs/s, p50, server RSS, TS runs/s) ratios of each round that has both systems.
        let mut by_round: Vec<[Option<f64>; 4]> = Vec::new();
        for round in 0..rounds {
            let find = |sys: &str| {
                results
                    .iter()
                    .find(|r| r.scenario == sc && r.round == round && r.system.starts_with(sys))
            };
            let (Some(c), Some(r)) = (find("Cairn + Rust"), find("Restate")) else {
                continue;
            };
            let rss = c.server().map(|p| p.peak_rss_mib).unwrap_or(0.0)
                / r.server().map(|p| p.peak_rss_mib).unwrap_or(f64::NAN);
            let ts = find("Cairn + inngest@4").map(|t| t.runs_per_s / r.runs_per_s);
            let row = [
                Some(c.runs_per_s / r.runs_per_s),
                Some(c.latency_ms.p50 / r.latency_ms.p50),
                Some(rss),
                ts,
            ];
            let name = if rounds > 1 {
                format!("{sc} · round {round}")
            } else {
                sc.to_string()
            };
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} |",
                cell(row[0]),
                cell(row[1]),
                cell(row[2]),
                cell(row[3])
            );
            by_round.push(row);
        }
        if by_round.is_empty() {
            continue;
        }
        let med = |k: usize| -> Option<f64> {
            let v: Vec<f64> = by_round.iter().filter_map(|r| r[k]).collect();
            (!v.is_empty()).then(|| median(&v))
        };
        let [thr, p50, rss, ts_thr] = [med(0), med(1), med(2), med(3)];
        if by_round.len() > 1 {
            let _ = writeln!(
                s,
                "| {sc} · **median of {}** | {} | {} | {} | {} |",
                by_round.len(),
                cell(thr),
                cell(p50),
                cell(rss),
                cell(ts_thr)
            );
        }
        let (thr, p50, rss) = (
            thr.unwrap_or(f64::NAN),
            p50.unwrap_or(f64::NAN),
            rss.unwrap_or(f64::NAN),
        );
        let rounds_json: Vec<Value> = by_round
            .iter()
            .map(|r| serde_json::json!({ "throughput_ratio": r[0], "p50_ratio": r[1], "server_rss_ratio": r[2], "ts_throughput_ratio": r[3] }))
            .collect();
        json.push(serde_json::json!({ "scenario": sc, "throughput_ratio": thr, "p50_ratio": p50, "server_rss_ratio": rss, "ts_throughput_ratio": ts_thr, "rounds": rounds_json }));
        if sc == "C=16 1KiB" {
            let verdict = |x: f64, goal: f64, floor: f64, higher_better: bool| {
                let ok = |lim: f64| if higher_better { x >= lim } else { x <= lim };
                if ok(goal) {
                    "meets goal"
                } else if ok(floor) {
                    "misses goal, above floor"
                } else {
                    "BELOW FLOOR (defect)"
                }
            };
            let _ = writeln!(
                goals,
                "\nGoals at C=16 1 KiB{}: throughput {:.2}× (goal ≥3×, floor 2×: {}); p50 {:.2}× (goal ≤0.25×, floor 0.5×: {}); server RSS {:.2}× (goal ≤0.2×, floor 0.5×: {})\n",
                if by_round.len() > 1 { format!(" (medians of {} rounds)", by_round.len()) } else { String::new() },
                thr,
                verdict(thr, 3.0, 2.0, true),
                p50,
                verdict(p50, 0.25, 0.5, false),
                rss,
                verdict(rss, 0.2, 0.5, false)
            );
        }
    }
    s.push_str(&goals);
    (s, Value::Array(json))
}
