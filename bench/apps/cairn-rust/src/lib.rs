//! The founding function for the benchmark, served by the Cairn Rust SDK.
//!
//! Triggered by `bench/founding` with `{"size": N}`:
//! * `collect-data`: N bytes of random text (random, so storage cannot compress it away);
//! * `digest`: its first 100 characters;
//! * `finalize`: `{"done": true}`.
//!
//! The same work as `bench/apps/restate-rust` and `bench/apps/ts4`.

use std::sync::Mutex;

use cairn_sdk::{Client, Ctx, Function, Step};
use serde_json::{json, Value};

pub const EVENT: &str = "bench/founding";

/// What the leak app keeps from every call, in a global list never emptied: the founding
/// report's long-lived holder of the run context (an Effect runtime there), as plain Rust.
pub enum Stashed {
    /// The step handle alone: what the SDK itself hands out.
    Step(#[allow(dead_code)] Step),
    /// The whole `Ctx`: the step handle plus the user's own copies of the event data.
    Ctx(#[allow(dead_code)] Box<Ctx<Value>>),
}

pub static STASH: Mutex<Vec<Stashed>> = Mutex::new(Vec::new());

/// `stash`: `None` (the benchmark), `Some(false)` keep the step handle, `Some(true)` keep
/// the whole `Ctx`.
pub fn founding(client: &Client, stash: Option<bool>) -> Function {
    client
        .function("founding")
        .event(EVENT)
        .retries(0)
        .handler(move |ctx: Ctx<Value>| async move {
            match stash {
                Some(false) => STASH.lock().unwrap().push(Stashed::Step(ctx.step())),
                Some(true) => STASH
                    .lock()
                    .unwrap()
                    .push(Stashed::Ctx(Box::new(ctx.clone()))),
                None => {}
            }
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
        })
}

/// Serves `/api/inngest` (plus `extra`) on 127.0.0.1:$PORT until SIGTERM or Ctrl-C.
pub async fn serve(app_id: &str, stash: Option<bool>, extra: axum::Router) {
    let client = Client::from_env(app_id).expect("INNGEST_* configuration");
    let f = founding(&client, stash);
    let app = axum::Router::new()
        .nest_service("/api/inngest", cairn_sdk::serve(client, [f]))
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
