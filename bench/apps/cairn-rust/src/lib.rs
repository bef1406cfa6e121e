//! The founding function for the benchmark, served by the Cairn Rust SDK.
//!
//! Triggered by `bench/founding` with `{"size": N}`:
//! * `collect-data`: N bytes of random text (random, so storage cannot compress it away);
//! * `digest`: its first 100 characters;
//! * `finalize`: `{"done": true}`.
//!
//! The same work as `bench/apps/restate-rust` and `bench/apps/ts4`.
//!
//! The benchmark app also serves `founding-keyed` (the flow scenario): the same function,
//! triggered by `bench/founding-keyed` and limited to 10 concurrent runs per
//! `event.data.tenant`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};

use cairn_sdk::{Client, Concurrency, Ctx, Error, Function, Step};
use serde_json::{json, Value};

pub const EVENT: &str = "bench/founding";
/// The event of the keyed variant (`bench/run flow`).
pub const KEYED_EVENT: &str = "bench/founding-keyed";
/// Concurrent runs allowed per tenant in the keyed variant.
pub const KEYED_LIMIT: u32 = 10;
/// The concurrency key of the keyed variant.
pub const KEYED_KEY: &str = "event.data.tenant";

/// What the leak app keeps from every call, in a global list never emptied: the founding
/// report's long-lived holder of the run context (an Effect runtime there), as plain Rust.
pub enum Stashed {
    /// The step handle alone: what the SDK itself hands out.
    Step(#[allow(dead_code)] Step),
    /// The whole `Ctx`: the step handle plus the user's own copies of the event data.
    Ctx(#[allow(dead_code)] Box<Ctx<Value>>),
}

pub static STASH: Mutex<Vec<Stashed>> = Mutex::new(Vec::new());

/// `BENCH_CHECKPOINTING=0` runs one step per call (the classic protocol) instead of the
/// SDK's default, checkpointing each step and going on in the same call: for comparing the two.
fn checkpointing() -> bool {
    std::env::var("BENCH_CHECKPOINTING").map_or(true, |v| v != "0")
}

/// `stash`: `None` (the benchmark), `Some(false)` keep the step handle, `Some(true)` keep
/// the whole `Ctx`.
pub fn founding(client: &Client, stash: Option<bool>) -> Function {
    client
        .function("founding")
        .event(EVENT)
        .retries(0)
        .checkpointing(checkpointing())
        .handler(move |ctx: Ctx<Value>| async move {
            match stash {
                Some(false) => STASH.lock().unwrap().push(Stashed::Step(ctx.step())),
                Some(true) => STASH
                    .lock()
                    .unwrap()
                    .push(Stashed::Ctx(Box::new(ctx.clone()))),
                None => {}
            }
            three_steps(ctx).await
        })
}

/// `founding` under flow control: at most [`KEYED_LIMIT`] runs at once per tenant
/// (`concurrency: [{"limit": 10, "key": "event.data.tenant"}]` on the wire).
pub fn founding_keyed(client: &Client) -> Function {
    client
        .function("founding-keyed")
        .event(KEYED_EVENT)
        .retries(0)
        .checkpointing(checkpointing())
        .concurrency(Concurrency::new(KEYED_LIMIT).key(KEYED_KEY))
        .handler(|ctx: Ctx<Value>| async move {
            let tenant = ctx.event.data.get("tenant").and_then(Value::as_str);
            let _call = InFlight::enter(tenant.unwrap_or("").to_string());
            three_steps(ctx).await
        })
}

/// Calls of `founding-keyed` in progress, per tenant, and the highest counts seen: the flow
/// scenario reads them (`GET /flow-stats`) to check the limit from the app's side. A call
/// is counted from the handler's start to its end, a window inside the server's dispatch,
/// so the counts can only be lower than what the server holds.
static IN_FLIGHT: LazyLock<Mutex<HashMap<String, usize>>> = LazyLock::new(Default::default);
static MAX_PER_TENANT: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);
static MAX_TOTAL: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

struct InFlight(String);

impl InFlight {
    fn enter(tenant: String) -> InFlight {
        let n = {
            let mut m = IN_FLIGHT.lock().unwrap();
            let n = m.entry(tenant.clone()).or_insert(0);
            *n += 1;
            *n
        };
        MAX_PER_TENANT.fetch_max(n, Ordering::Relaxed);
        let t = TOTAL.fetch_add(1, Ordering::Relaxed) + 1;
        MAX_TOTAL.fetch_max(t, Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
        InFlight(tenant)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        TOTAL.fetch_sub(1, Ordering::Relaxed);
        let mut m = IN_FLIGHT.lock().unwrap();
        if let Some(n) = m.get_mut(&self.0) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.0);
            }
        }
    }
}

/// `GET /flow-stats`: calls of `founding-keyed` so far and the most in progress at once,
/// per tenant and in all.
pub fn flow_stats() -> axum::Router {
    axum::Router::new().route(
        "/flow-stats",
        axum::routing::get(|| async {
            axum::Json(json!({
                "limit_per_tenant": KEYED_LIMIT,
                "calls": CALLS.load(Ordering::Relaxed),
                "max_in_flight_per_tenant": MAX_PER_TENANT.load(Ordering::Relaxed),
                "max_in_flight_total": MAX_TOTAL.load(Ordering::Relaxed),
            }))
        }),
    )
}

/// The founding function's body: three durable steps.
async fn three_steps(ctx: Ctx<Value>) -> Result<Value, Error> {
    let size = ctx
        .event
        .data
        .get("size")
        .and_then(Value::as_u64)
        .unwrap_or(1024) as usize;
    let step = ctx.step();
    let big: String = step
        .run("collect-data", || async move { Ok(random_text(size)) })
        .await?;
    let digest: String = step
        .run("digest", || async move {
            Ok(big.chars().take(100).collect::<String>())
        })
        .await?;
    step.run("finalize", || async { Ok(json!({ "done": true })) })
        .await?;
    Ok(json!({ "len": digest.len() }))
}

/// Serves `/api/inngest` (plus `extra`) on 127.0.0.1:$PORT until SIGTERM or Ctrl-C; with
/// `keyed`, `founding-keyed` alongside `founding`, and `GET /flow-stats`.
pub async fn serve(app_id: &str, stash: Option<bool>, keyed: bool, mut extra: axum::Router) {
    let client = Client::from_env(app_id).expect("INNGEST_* configuration");
    let mut fns = vec![founding(&client, stash)];
    if keyed {
        fns.push(founding_keyed(&client));
        extra = extra.merge(flow_stats());
    }
    let app = axum::Router::new()
        .nest_service("/api/inngest", cairn_sdk::serve(client, fns))
        .merge(extra);
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    eprintln!("{app_id}: founding function on http://127.0.0.1:{port}/api/inngest");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        })
        .await
        .expect("serve");
}

/// Printable random text from a clock-seeded xorshift: cheap, ~6 bits of entropy a byte.
pub fn random_text(n: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut w = x;
        for _ in 0..10 {
            if out.len() == n {
                break;
            }
            out.push(ALPHABET[(w & 63) as usize]);
            w >>= 6;
        }
    }
    String::from_utf8(out).expect("ascii")
}
