//! The closed-loop load generator: C workers, each starting a run and waiting for it to
//! complete before starting the next, until N runs are done or the time budget is spent.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::systems::{Driver, EVENT};

/// Longest a single run may take before it counts as an error.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Event accepted → run completed, in ms. Cairn: the server's `ended_at` minus the wall
    /// clock when the event's 200 arrived. Restate: the ingress call's round trip.
    pub latency_ms: f64,
    /// When the load generator saw completion (includes Cairn's polling granularity).
    pub observed_ms: f64,
    pub polls: u32,
    /// The run went to the hot tenant (`Driver::Cairn::hot_every`).
    pub hot: bool,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: *v.last().unwrap(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

pub struct Outcome {
    pub samples: Vec<Sample>,
    pub errors: usize,
    pub first_error: Option<String>,
    pub wall: Duration,
    pub timed_out: bool,
}

/// Shared by the workers: an estimate of the current run latency, to pace Cairn's polling.
struct Pacer {
    ewma_us: AtomicU64,
}

impl Pacer {
    fn estimate(&self) -> Duration {
        Duration::from_micros(self.ewma_us.load(Ordering::Relaxed))
    }
    fn record(&self, d: Duration) {
        let old = self.ewma_us.load(Ordering::Relaxed) as f64;
        let new = old * 0.8 + d.as_micros() as f64 * 0.2;
        self.ewma_us.store(new as u64, Ordering::Relaxed);
    }
}

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Runs `n` founding-function runs at concurrency `c`, stopping early at `budget`.
/// `progress` is bumped after each successful run (the soak samples on it).
pub async fn drive(
    http: &reqwest::Client,
    driver: &Driver,
    size: usize,
    n: usize,
    c: usize,
    budget: Duration,
    progress: Option<Arc<AtomicUsize>>,
) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let pacer = Arc::new(Pacer {
        ewma_us: AtomicU64::new(5_000),
    });
    let start = Instant::now();
    let deadline = start + budget;
    let mut tasks = Vec::new();
    for _ in 0..c.max(1) {
        let (http, driver, next, pacer, progress) = (
            http.clone(),
            driver.clone(),
            next.clone(),
            pacer.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            let mut timed_out = false;
            loop {
                if Instant::now() >= deadline {
                    timed_out = next.load(Ordering::Relaxed) < n;
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                match one_run(&http, &driver, size, i, &pacer, deadline).await {
                    Ok(s) => {
                        samples.push(s);
                        if let Some(p) = &progress {
                            p.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        if first_error.is_none() {
                            first_error = Some(format!("{e:#}"));
                        }
                        // A broken system should not be hammered at full speed.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (samples, errors, first_error, timed_out)
        }));
    }
    let mut out = Outcome {
        samples: Vec::new(),
        errors: 0,
        first_error: None,
        wall: Duration::ZERO,
        timed_out: false,
    };
    for t in tasks {
        if let Ok((s, e, fe, to)) = t.await {
            out.samples.extend(s);
            out.errors += e;
            out.first_error = out.first_error.or(fe);
            out.timed_out |= to;
        }
    }
    out.wall = start.elapsed();
    out
}

async fn one_run(
    http: &reqwest::Client,
    driver: &Driver,
    size: usize,
    index: usize,
    pacer: &Pacer,
    deadline: Instant,
) -> Result<Sample> {
    match driver {
        Driver::Restate { ingress } => {
            let t0 = Instant::now();
            let r = http
                .post(format!("{ingress}/Founding/run"))
                .json(&json!({ "size": size }))
                .send()
                .await?;
            let status = r.status();
            let body = r.bytes().await?;
            if !status.is_success() {
                bail!("Restate call: {status} {}", String::from_utf8_lossy(&body));
            }
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            Ok(Sample {
                latency_ms: ms,
                observed_ms: ms,
                polls: 0,
                hot: false,
            })
        }
        Driver::Cairn {
            bases,
            event,
            tenants,
            hot_every,
            long_poll,
        } => {
            let mut data = json!({ "size": size });
            let hot = *tenants > 0 && *hot_every > 0 && index % hot_every == 0;
            if *tenants > 0 {
                let t = match (*hot_every, *tenants) {
                    (0, n) => index % n,
                    _ if hot => 0,
                    (_, n) => 1 + index % (n - 1).max(1),
                };
                data["tenant"] = json!(tenant_id(t));
            }
            let base = &bases[index % bases.len()];
            let s = cairn_run(http, base, event, data, *long_poll, pacer, deadline).await?;
            Ok(Sample { hot, ..s })
        }
    }
}

/// The tenant id of tenant `i` (`tenant-0042`).
pub fn tenant_id(i: usize) -> String {
    format!("tenant-{i:04}")
}

/// Sends one event and waits for its run. With `long_poll`, at once with
/// `GET /v1/events/{id}/runs?wait_ms=…`, which the server answers when the event's runs have
/// ended; a server that answers with the run still going (one without that wait) is then
/// asked `GET /v1/runs/{id}?wait_ms=…`, and one without that either is polled. Without
/// `long_poll`, polls for the run and then its end, paced by the recent server-measured
/// latency (first after 70 % of it, then every tenth of it, 0.3–20 ms). The reported latency
/// comes from the server's own `ended_at`, so the polling does not blur it.
async fn cairn_run(
    http: &reqwest::Client,
    base: &str,
    event: &str,
    data: Value,
    long_poll: bool,
    pacer: &Pacer,
    deadline: Instant,
) -> Result<Sample> {
    let r = http
        .post(format!("{base}/e/bench"))
        .json(&json!({ "name": event, "data": data }))
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let accepted_wall = wall_ms();
    let accepted = Instant::now();
    if !status.is_success() {
        bail!("POST /e: {status} {v}");
    }
    let event_id = v["ids"][0]
        .as_str()
        .ok_or_else(|| anyhow!("no event id in {v}"))?
        .to_string();
    let est = pacer.estimate();
    let step = (est / 10).clamp(Duration::from_micros(300), Duration::from_millis(20));
    let mut wait = (est * 7 / 10).clamp(Duration::from_micros(300), Duration::from_millis(500));
    let mut run_id: Option<String> = None;
    let mut polls = 0u32;
    let give_up = (accepted + RUN_TIMEOUT).min(deadline + Duration::from_secs(30));
    let query = if long_poll { "?wait_ms=10000" } else { "" };
    let mut pace = !long_poll;
    loop {
        if pace {
            tokio::time::sleep(wait).await;
            wait = step;
        }
        polls += 1;
        let long_polled = long_poll && run_id.is_some();
        let run = match &run_id {
            None => {
                let v: Value = http
                    .get(format!("{base}/v1/events/{event_id}/runs{query}"))
                    .send()
                    .await?
                    .json()
                    .await?;
                match v["data"].as_array().and_then(|a| a.first()) {
                    Some(r) => {
                        run_id = r["run_id"].as_str().map(str::to_string);
                        r.clone()
                    }
                    None => Value::Null,
                }
            }
            Some(id) => {
                let v: Value = http
                    .get(format!("{base}/v1/runs/{id}{query}"))
                    .send()
                    .await?
                    .json()
                    .await?;
                v["data"].clone()
            }
        };
        match run["status"].as_str() {
            Some("Completed") => {
                let observed_ms = accepted.elapsed().as_secs_f64() * 1000.0;
                let latency_ms = run["ended_at"]
                    .as_str()
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| (t.timestamp_micros() as f64 / 1000.0 - accepted_wall).max(0.0))
                    .unwrap_or(observed_ms);
                pacer.record(Duration::from_secs_f64(latency_ms / 1000.0));
                return Ok(Sample {
                    latency_ms,
                    observed_ms,
                    polls,
                    hot: false,
                });
            }
            Some(s @ ("Failed" | "Cancelled")) => bail!("run {s}: {}", run["output"]),
            _ => {}
        }
        // Long polls go out at once; a run's long poll that came back with the run still going
        // (a server without `wait_ms`, or the wait ran out) is followed by paced polls, so an
        // older server is not polled in a tight loop.
        pace = !long_poll || long_polled || run_id.is_none();
        if Instant::now() > give_up {
            bail!(
                "run for event {event_id} not completed after {:?}",
                accepted.elapsed()
            );
        }
    }
}

/// Sends `n` events in batches of `batch` and waits for all their runs: a quicker way to
/// store many completed runs (the growth scenario's pre-fill). Returns runs completed.
pub async fn prefill(
    http: &reqwest::Client,
    base: &str,
    size: usize,
    n: usize,
    batch: usize,
    budget: Duration,
) -> Result<usize> {
    let start = Instant::now();
    let mut done = 0usize;
    let mut last_report = Instant::now();
    while done < n {
        if start.elapsed() > budget {
            bail!(
                "pre-fill stopped by its time budget after {done} of {n} runs ({:?})",
                start.elapsed()
            );
        }
        let k = batch.min(n - done);
        let events: Vec<Value> = (0..k)
            .map(|_| json!({ "name": EVENT, "data": { "size": size } }))
            .collect();
        let v: Value = http
            .post(format!("{base}/e/bench"))
            .json(&events)
            .send()
            .await?
            .json()
            .await?;
        let ids: Vec<String> = v["ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if ids.len() != k {
            bail!("pre-fill: sent {k} events, got {} ids: {v}", ids.len());
        }
        // Wait for the last of the batch first (runs mostly finish in order), then sweep.
        for id in ids.iter().rev() {
            let give_up = Instant::now() + RUN_TIMEOUT;
            loop {
                let v: Value = http
                    .get(format!("{base}/v1/events/{id}/runs"))
                    .send()
                    .await?
                    .json()
                    .await?;
                let st = v["data"]
                    .as_array()
                    .and_then(|a| a.first())
                    .and_then(|r| r["status"].as_str().map(str::to_string));
                match st.as_deref() {
                    Some("Completed") => break,
                    Some(s @ ("Failed" | "Cancelled")) => bail!("pre-fill run {s}"),
                    _ if Instant::now() > give_up => {
                        bail!("pre-fill run for event {id} not completed in {RUN_TIMEOUT:?}")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        done += k;
        if last_report.elapsed() > Duration::from_secs(15) {
            eprintln!(
                "    pre-fill: {done}/{n} runs, {:.0} runs/s",
                done as f64 / start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    Ok(done)
}
