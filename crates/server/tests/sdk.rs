//! The real Rust SDK (`cairn-sdk`) driven by the server: the founding function and
//! every step tool, end to end over HTTP.

mod common;

use cairn_sdk::{Client, Ctx, Event, Wait};
use common::TestServer;
use serde_json::{json, Value};
use std::time::Duration;

async fn serve_sdk_app(server_base: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let client = Client::builder("sdkapp")
        .dev(true)
        .base_url(server_base)
        .serve_origin(origin.clone())
        .serve_path("/api/inngest")
        .build()
        .unwrap();
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
    let app = axum::Router::new().nest_service(
        "/api/inngest",
        cairn_sdk::serve(client, [founding, child, tools]),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("{origin}/api/inngest")
}

#[tokio::test]
async fn rust_sdk_founding_function_and_step_tools() {
    let ts = TestServer::start().await;
    let url = serve_sdk_app(&ts.base).await;
    ts.server.sync_url(&url).await.expect("sync the SDK app");
    let fns = ts.get("/v1/apps/sdkapp/functions").await;
    assert_eq!(fns["data"].as_array().unwrap().len(), 3, "{fns}");

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
