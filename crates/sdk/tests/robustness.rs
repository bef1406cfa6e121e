//! Arbitrary bytes and mutated call requests never panic the handler, never hang it, and
//! always get one of the statuses the protocol names, with a JSON body.

use std::time::Duration;

use axum::body::Body;
use cairn_sdk::{Client, Ctx, ServeOptions};
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{json, Value};
use tower::ServiceExt;

fn app() -> axum::Router {
    let client = Client::builder("fz").dev(true).build().unwrap();
    let f = client.function("f").handler(|ctx: Ctx<Value>| async move {
        let step = ctx.step();
        let (a, b) = futures::join!(
            step.run("a", || async { Ok(1) }),
            step.run("b", || async { Ok(2) }),
        );
        let n: u32 = step.run("n", || async { Ok(3) }).await?;
        step.sleep("s", Duration::from_secs(1)).await?;
        Ok(json!(a? + b? + n))
    });
    let opts = ServeOptions {
        step_not_found_timeout: Duration::from_millis(20),
        max_body_bytes: 64 * 1024,
        ..Default::default()
    };
    cairn_sdk::serve_with(client, [f], opts)
}

fn post(app: &axum::Router, query: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let req = http::Request::post(format!("/?{query}"))
            .body(Body::from(body))
            .unwrap();
        let res = tokio::time::timeout(Duration::from_secs(5), app.clone().oneshot(req))
            .await
            .expect("the handler answers promptly")
            .unwrap();
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes().to_vec();
        (status, bytes)
    })
}

fn check(status: u16, body: &[u8]) {
    assert!(
        [200, 206, 400, 404, 413, 500].contains(&status),
        "status {status}"
    );
    serde_json::from_slice::<Value>(body).expect("a JSON body");
}

fn valid_body() -> Value {
    let event = json!({"name": "e", "data": {}, "id": "1", "ts": 1, "user": {}});
    json!({
        "event": event, "events": [event],
        "steps": {},
        "ctx": {"run_id": "r", "attempt": 0, "max_attempts": 2, "disable_immediate_execution": false,
                "use_api": false, "stack": {"stack": [], "current": 0}},
        "version": 2, "use_api": false,
    })
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z0-9:]{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Paths into the call body that a mutation may overwrite.
const PATHS: &[&[&str]] = &[
    &["event"],
    &["event", "data"],
    &["event", "name"],
    &["events"],
    &["steps"],
    &["ctx"],
    &["ctx", "run_id"],
    &["ctx", "attempt"],
    &["ctx", "max_attempts"],
    &["ctx", "stack"],
    &["ctx", "stack", "stack"],
    &["version"],
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_get_a_named_status(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let (status, bytes) = post(&app(), "fnId=fz-f&stepId=step", body);
        check(status, &bytes);
    }

    #[test]
    fn mutated_call_requests_get_a_named_status(
        path in 0..PATHS.len(),
        value in arb_json(),
        memo_a in arb_json(),
        target in prop_oneof![Just("step".to_string()), "[0-9a-f]{40}", Just(cairn_protocol::step_id::hash("b"))],
    ) {
        let mut body = valid_body();
        body["steps"][cairn_protocol::step_id::hash("a")] = memo_a;
        let mut slot = &mut body;
        for key in PATHS[path] {
            slot = &mut slot[*key];
        }
        *slot = value;
        let (status, bytes) = post(&app(), &format!("fnId=fz-f&stepId={target}"), serde_json::to_vec(&body).unwrap());
        check(status, &bytes);
    }
}
