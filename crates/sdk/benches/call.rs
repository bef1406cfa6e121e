//! What one call costs the app: the whole HTTP handler (routing, body parse, replay,
//! execution, response), driven as a tower service without sockets.
//!
//! * `founding_last_step`: the founding function called at its last step, with the two
//!   earlier steps memoised at 1 KiB each (target ≤ 20 µs).
//! * `replay_100_steps`: a 100-step sequential function called with 99 memoised steps, so
//!   it replays 99 and runs the 100th (target ≤ 1 ms).

use axum::body::Body;
use bytes::Bytes;
use cairn_sdk::{Client, Ctx, Function};
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

fn founding(client: &Client) -> Function {
    client
        .function("founding")
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let big: String = step
                .run("collect-data", || async { Ok("x".repeat(1024)) })
                .await?;
            let digest: String = step
                .run("digest", || async move { Ok(big.clone()) })
                .await?;
            step.run("finalize", || async { Ok(json!({ "done": true })) })
                .await?;
            Ok(json!({ "len": digest.len() }))
        })
}

fn hundred(client: &Client) -> Function {
    client
        .function("hundred")
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let mut sum = 0u64;
            for i in 0..100u64 {
                sum += step.run("step", move || async move { Ok(i) }).await?;
            }
            Ok(json!(sum))
        })
}

fn body(memos: &[(String, Value)]) -> Bytes {
    let event = json!({"name": "demo/seed", "data": {}, "id": "01EVT", "ts": 1_700_000_000_000i64, "user": {}});
    let steps: Map<String, Value> = memos
        .iter()
        .map(|(id, v)| (id.clone(), json!({ "data": v })))
        .collect();
    let stack: Vec<&String> = memos.iter().map(|(id, _)| id).collect();
    let body = json!({
        "event": event, "events": [event], "steps": steps,
        "ctx": {"run_id": "01RUN", "attempt": 0, "max_attempts": 4, "disable_immediate_execution": false,
                "use_api": false, "stack": {"stack": stack, "current": stack.len()}},
        "version": 2, "use_api": false,
    });
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

async fn call(app: &axum::Router, uri: &str, body: &Bytes) -> u16 {
    let req = http::Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.clone()))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await.unwrap();
    status
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = Client::builder("bench").dev(true).build().unwrap();
    let app = cairn_sdk::serve(client.clone(), [founding(&client), hundred(&client)]);
    let hash = cairn_protocol::step_id::hash;

    let kib = "x".repeat(1024);
    let last = body(&[
        (hash("collect-data"), json!(kib)),
        (hash("digest"), json!(kib)),
    ]);
    assert_eq!(
        rt.block_on(call(&app, "/?fnId=bench-founding&stepId=step", &last)),
        206
    );
    c.bench_function("founding_last_step", |b| {
        b.iter(|| rt.block_on(call(&app, "/?fnId=bench-founding&stepId=step", &last)))
    });

    let memos: Vec<(String, Value)> = (0..99u64)
        .map(|i| {
            let id = if i == 0 {
                "step".to_string()
            } else {
                format!("step:{i}")
            };
            (hash(&id), json!(i))
        })
        .collect();
    let replay = body(&memos);
    assert_eq!(
        rt.block_on(call(&app, "/?fnId=bench-hundred&stepId=step", &replay)),
        206
    );
    c.bench_function("replay_100_steps", |b| {
        b.iter(|| rt.block_on(call(&app, "/?fnId=bench-hundred&stepId=step", &replay)))
    });
}

criterion_group!(call_benches, benches);
criterion_main!(call_benches);
