//! The real Rust SDK (`cairn-sdk`) driven by the server: the founding function and
//! every step tool, end to end over HTTP.

mod common;
mod rust_app;

use cairn_sdk::{Client, Ctx, Event, Wait};
use common::TestServer;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// SDK calls received, per function slug.
static CALLS: LazyLock<Mutex<HashMap<String, usize>>> = LazyLock::new(Default::default);
/// Step closures of `counted` that ran.
static STEP_RUNS: AtomicUsize = AtomicUsize::new(0);

async fn count_calls(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if req.method() == axum::http::Method::POST {
        let slug = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("fnId=")))
            .unwrap_or("")
            .to_string();
        *CALLS.lock().unwrap().entry(slug).or_default() += 1;
    }
    next.run(req).await
}

fn calls(slug: &str) -> usize {
    CALLS.lock().unwrap().get(slug).copied().unwrap_or(0)
}

async fn serve_sdk_app(server_base: &str) -> String {
    rust_app::serve_rust_app("sdkapp", server_base, app).await
}

fn app(client: Client) -> axum::Router {
    let founding = client
        .function("seed-cron")
        .cron("0 * * * *")
        .event("demo/seed")
        .retries(3)
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let big: String = step
                .run("collect-data", || async { Ok("x".repeat(1_000_000)) })
                .await?;
            let digest: String = step
                .run("digest", || async move { Ok(big[..100].to_string()) })
                .await?;
            step.run("finalize", || async { Ok(json!({ "done": true })) })
                .await?;
            Ok(json!({ "len": digest.len() }))
        });
    let child = client
        .function("child")
        .event("sdk/never")
        .handler(|ctx: Ctx<Value>| async move { Ok(json!({"got": ctx.event.data["x"]})) });
    let tools = client
        .function("tools")
        .event("sdk/tools")
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let a: i64 = step.run("a", || async { Ok(1) }).await?;
            step.sleep("nap", Duration::from_secs(1)).await?;
            let (p, q) = futures::join!(
                step.run("p", || async { Ok(2i64) }),
                step.run("q", || async { Ok(3i64) })
            );
            let child: Value = step.invoke("inv", "sdkapp-child", json!({"x": 5})).await?;
            let w: Option<Event<Value>> = step
                .wait_for_event("w", Wait::event("sdk/go").timeout(Duration::from_secs(1)))
                .await?;
            Ok(json!({"a": a, "p": p?, "q": q?, "child": child, "waited": w.is_some()}))
        });
    // The same function one step per call, to compare with the checkpointing default.
    let classic = client
        .function("seed-classic")
        .event("demo/classic")
        .checkpointing(false)
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let a: u32 = step.run("a", || async { Ok(1) }).await?;
            let b: u32 = step.run("b", || async move { Ok(a + 1) }).await?;
            let c: u32 = step.run("c", || async move { Ok(b + 1) }).await?;
            Ok(json!(c))
        });
    let counted =
        client
            .function("counted")
            .event("demo/counted")
            .handler(|ctx: Ctx<Value>| async move {
                let step = ctx.step();
                let a: u32 = step
                    .run("a", || async {
                        STEP_RUNS.fetch_add(1, Ordering::SeqCst);
                        Ok(1)
                    })
                    .await?;
                let b: u32 = step
                    .run("b", || async move {
                        STEP_RUNS.fetch_add(1, Ordering::SeqCst);
                        Ok(a + 1)
                    })
                    .await?;
                let c: u32 = step
                    .run("c", || async move {
                        STEP_RUNS.fetch_add(1, Ordering::SeqCst);
                        Ok(b + 1)
                    })
                    .await?;
                Ok(json!(c))
            });
    axum::Router::new()
        .nest_service(
            "/api/inngest",
            cairn_sdk::serve(client, [founding, child, tools, classic, counted]),
        )
        .layer(axum::middleware::from_fn(count_calls))
}

#[tokio::test]
async fn rust_sdk_founding_function_and_step_tools() {
    let ts = TestServer::start().await;
    let url = serve_sdk_app(&ts.base).await;
    ts.server.sync_url(&url).await.expect("sync the SDK app");
    let fns = ts.get("/v1/apps/sdkapp/functions").await;
    assert_eq!(fns["data"].as_array().unwrap().len(), 5, "{fns}");

    let run = ts
        .run_to_end(json!({"name": "demo/seed", "data": {}}))
        .await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!({"len": 100}));

    let run = ts
        .run_to_end(json!({"name": "sdk/tools", "data": {}}))
        .await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(
        run["output"],
        json!({"a": 1, "p": 2, "q": 3, "child": {"got": 5}, "waited": false})
    );
}

#[tokio::test]
async fn checkpointing_runs_a_whole_run_in_one_call_and_stores_every_step() {
    let ts = TestServer::start().await;
    let url = serve_sdk_app(&ts.base).await;
    ts.server.sync_url(&url).await.expect("sync the SDK app");

    let run = ts
        .run_to_end(json!({"name": "demo/counted", "data": {}}))
        .await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!(3));
    assert_eq!(
        calls("sdkapp-counted"),
        1,
        "three steps and the return, one call"
    );
    assert_eq!(STEP_RUNS.load(Ordering::SeqCst), 3, "each step ran once");
    // Every step's result was stored as it ran, in order.
    let id = run["run_id"].as_str().unwrap();
    let actions = ts.get(&format!("/v0/runs/{id}/actions")).await;
    let hash = cairn_protocol::step_id::hash;
    assert_eq!(
        actions,
        json!({hash("a"): {"data": 1}, hash("b"): {"data": 2}, hash("c"): {"data": 3}})
    );

    // Turned off, the same shape takes a call per step plus one for the return.
    let run = ts
        .run_to_end(json!({"name": "demo/classic", "data": {}}))
        .await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!(3));
    assert_eq!(calls("sdkapp-seed-classic"), 4);
}
