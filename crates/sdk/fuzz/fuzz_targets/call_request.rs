//! Feeds arbitrary bytes as a call request body to the serve handler. Any panic, hang or
//! status outside the protocol's set is a finding.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use cairn_sdk::{Client, Ctx, ServeOptions};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use tower::ServiceExt;

fn app() -> &'static axum::Router {
    static APP: OnceLock<axum::Router> = OnceLock::new();
    APP.get_or_init(|| {
        let client = Client::builder("fz").dev(true).build().unwrap();
        let f = client.function("f").handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let (a, b) = two_steps(&step).await;
            step.sleep("s", Duration::from_secs(1)).await?;
            Ok(json!(a? + b?))
        });
        let opts = ServeOptions {
            step_not_found_timeout: Duration::from_millis(5),
            max_body_bytes: 64 * 1024,
            ..Default::default()
        };
        cairn_sdk::serve_with(client, [f], opts)
    })
}

async fn two_steps(step: &cairn_sdk::Step) -> (Result<u32, cairn_sdk::Error>, Result<u32, cairn_sdk::Error>) {
    let a = step.run("a", || async { Ok(1) });
    let b = step.run("b", || async { Ok(2) });
    (a.await, b.await)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the step id, so targeted calls are fuzzed too.
    let (step_id, body) = match data.split_first() {
        Some((b, rest)) if b % 2 == 0 => ("step", rest),
        Some((_, rest)) => ("86f7e437faa5a7fce15d1ddcb9eaeaea377667b8", rest),
        None => ("step", data),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        let req = http::Request::post(format!("/?fnId=fz-f&stepId={step_id}"))
            .body(Body::from(body.to_vec()))
            .unwrap();
        let res = tokio::time::timeout(Duration::from_secs(2), app().clone().oneshot(req))
            .await
            .expect("handler hung")
            .unwrap();
        let status = res.status().as_u16();
        assert!([200, 206, 400, 404, 413, 500].contains(&status), "status {status}");
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice::<Value>(&bytes).expect("JSON body");
    });
});
