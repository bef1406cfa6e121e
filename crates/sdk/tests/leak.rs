//! The leak guarantee, measured: live heap bytes under a counting global allocator.
//!
//! Each scenario plays the server's part for complete runs of the founding report's function
//! (inngest-js#1440): every call a server would make, with the memo growing by one step per
//! call and a 1 MB step output riding along from the second call on. After a thousand runs
//! the live heap must be where it started.
//!
//! This binary has its own global allocator, so it lives apart from the other tests; the
//! scenarios take a lock because the byte count is process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Mutex;

use axum::body::Body;
use cairn_sdk::{Client, Ctx, Function, Step};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

fn live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

const RUNS: usize = 1_000;
const WARMUP: usize = 20;

static STASHED_STEPS: Mutex<Vec<Step>> = Mutex::new(Vec::new());
static STASHED_CTX: Mutex<Vec<Ctx<Value>>> = Mutex::new(Vec::new());

#[derive(Clone, Copy)]
enum Stash {
    Nothing,
    StepHandle,
    WholeCtx,
}

fn founding(client: &Client, stash: Stash) -> Function {
    client
        .function("seed-cron")
        .cron("0 * * * *")
        .event("demo/seed")
        .handler(move |ctx: Ctx<Value>| async move {
            let step = ctx.step();
            match stash {
                Stash::Nothing => {}
                // What the Effect runtime did in the report: something long-lived keeps a handle.
                Stash::StepHandle => STASHED_STEPS.lock().unwrap().push(step.clone()),
                Stash::WholeCtx => STASHED_CTX.lock().unwrap().push(ctx.clone()),
            }
            let big: String = step
                .run("collect-data", || async { Ok("x".repeat(1_000_000)) })
                .await?;
            let digest: String = step
                .run("digest", || async move { Ok(big[..100].to_string()) })
                .await?;
            step.run("finalize", || async { Ok(json!({ "done": true })) })
                .await?;
            Ok(json!({ "len": digest.len() }))
        })
}

/// The bodies of one complete run's calls, recorded from the SDK's own answers the first
/// time (exactly what a server would send), then replayed byte for byte so the harness
/// does not spend its time re-serialising megabytes.
#[derive(Default)]
struct Script {
    bodies: Vec<bytes::Bytes>,
}

fn call_body(event: &Value, steps: &Map<String, Value>, stack: &[String]) -> bytes::Bytes {
    let body = json!({
        "event": event,
        "events": [event],
        "steps": steps,
        "ctx": {"run_id": "01RUN", "attempt": 0, "max_attempts": 4, "disable_immediate_execution": false,
                "use_api": false, "stack": {"stack": stack, "current": stack.len()}},
        "version": 2,
        "use_api": false,
    });
    bytes::Bytes::from(serde_json::to_vec(&body).unwrap())
}

async fn post(app: &axum::Router, body: bytes::Bytes) -> (u16, bytes::Bytes) {
    let req = http::Request::post("/?fnId=leak-seed-cron&stepId=step")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    (status, res.into_body().collect().await.unwrap().to_bytes())
}

impl Script {
    /// Plays the server for one run, growing the memo from each answer, and records it.
    async fn record(app: &axum::Router) -> Script {
        let event = json!({"name": "inngest/scheduled.timer", "data": {"cron": "0 * * * *"}, "id": "01EVT", "ts": 1_700_000_000_000i64, "user": {}});
        let mut steps = Map::new();
        let mut stack: Vec<String> = Vec::new();
        let mut script = Script::default();
        loop {
            let body = call_body(&event, &steps, &stack);
            script.bodies.push(body.clone());
            let (status, bytes) = post(app, body).await;
            match status {
                200 => {
                    assert_eq!(
                        serde_json::from_slice::<Value>(&bytes).unwrap(),
                        json!({"len": 100})
                    );
                    return script;
                }
                206 => {
                    let mut ops: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
                    let op = ops.pop().unwrap();
                    assert_eq!(op["op"], "StepRun");
                    let id = op["id"].as_str().unwrap().to_string();
                    steps.insert(id.clone(), json!({"data": op["data"]}));
                    stack.push(id);
                }
                other => panic!(
                    "unexpected status {other}: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            }
        }
    }

    /// Replays the recorded run; checks each answer's status and size.
    async fn replay(&self, app: &axum::Router) {
        let last = self.bodies.len() - 1;
        for (i, body) in self.bodies.iter().enumerate() {
            let (status, bytes) = post(app, body.clone()).await;
            if i == last {
                assert_eq!((status, &bytes[..]), (200, &br#"{"len":100}"#[..]));
            } else {
                assert_eq!(status, 206);
                // The first answer carries the 1 MB output; the others are small.
                assert_eq!(bytes.len() > 1_000_000, i == 0);
            }
        }
    }
}

/// Warms up, then returns live-byte growth over `RUNS` complete runs.
fn measure(stash: Stash) -> isize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = Client::builder("leak").dev(true).build().unwrap();
    let app = cairn_sdk::serve(client.clone(), [founding(&client, stash)]);
    rt.block_on(async {
        let script = Script::record(&app).await;
        assert_eq!(script.bodies.len(), 4, "three steps, then the result");
        for _ in 0..WARMUP {
            script.replay(&app).await;
        }
        let before = live();
        for _ in 0..RUNS {
            script.replay(&app).await;
        }
        let after = live();
        after - before
    })
}

#[test]
fn complete_runs_of_the_founding_function_leave_the_heap_where_it_was() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let growth = measure(Stash::Nothing);
    eprintln!("live-byte growth over {RUNS} runs (nothing stashed): {growth} bytes");
    assert!(growth.abs() <= 64 * 1024, "grew by {growth} bytes");
}

#[test]
fn a_stashed_step_handle_pins_a_few_bytes_not_the_run() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let growth = measure(Stash::StepHandle);
    let per_run = growth / RUNS as isize;
    eprintln!("live-byte growth over {RUNS} runs (step handle stashed on every call): {growth} bytes, {per_run} per run");
    assert!(
        per_run <= 1024,
        "each run's stashed handles pinned {per_run} bytes"
    );
    // The handles are dead, not just small: one per call, four calls per run.
    let stashed = std::mem::take(&mut *STASHED_STEPS.lock().unwrap());
    assert_eq!(stashed.len(), 4 * (1 + WARMUP + RUNS));
    assert!(stashed.iter().all(|s| !s.is_live()));
    // A handle is a `Weak` to a 32-byte cell plus its slot in the Vec: nowhere near the run.
    assert!(per_run / 4 <= 64, "{} bytes per handle", per_run / 4);
}

#[test]
fn a_stashed_ctx_pins_its_event_copy_not_the_run() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let growth = measure(Stash::WholeCtx);
    let per_ctx = growth / (4 * RUNS as isize);
    eprintln!("live-byte growth over {RUNS} runs (whole ctx stashed on every call): {growth} bytes, {per_ctx} per ctx");
    // A Ctx owns one plain copy of the triggering event; that copy (here a cron event whose
    // `data` map alone is a ~600-byte B-tree node) is all it keeps. The run's 1 MB memo and
    // the request body are gone.
    assert!(per_ctx <= 1024, "each stashed ctx pinned {per_ctx} bytes");
    let stashed = std::mem::take(&mut *STASHED_CTX.lock().unwrap());
    assert!(stashed.iter().all(|c| !c.step().is_live()));
}
