//! The serve handler's edges over real HTTP: signatures, introspection, sync, probes, bad
//! input and large-state fetching.

mod common;

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use cairn_protocol::signature::{hash_signing_key, sign};
use cairn_sdk::{Client, Ctx, Function};
use common::*;
use serde_json::{json, Value};

fn echo(client: &Client) -> Function {
    client
        .function("echo")
        .event("demo/echo")
        .on_failure(|ctx: Ctx<cairn_sdk::FunctionFailed>| async move {
            Ok(json!({"failed": ctx.event.data.function_id, "error": ctx.event.data.error.message}))
        })
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let n: u64 = step.run("one", || async { Ok(1) }).await?;
            Ok(json!({"n": n, "data": ctx.event.data}))
        })
}

fn cloud(base: Option<&str>) -> Client {
    let mut b = Client::builder("app")
        .dev(false)
        .signing_key(KEY)
        .signing_key_fallback(FALLBACK_KEY)
        .event_key("evkey");
    if let Some(base) = base {
        b = b.base_url(base);
    }
    b.build().unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// What `key` would sign over these exact bytes at the header's timestamp (responses are
/// signed raw, as the official SDKs do, not canonicalised).
fn raw_signature(key: &str, raw: &[u8], header: &str) -> String {
    let t: i64 = header
        .split('&')
        .find_map(|p| p.strip_prefix("t="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((now() - t).abs() <= 5, "timestamp in seconds");
    cairn_protocol::signature::sign_raw(key, raw, t)
}

#[test]
fn signature_test_vectors_from_the_reference() {
    // §3.2: both vectors, through the same functions the handler uses.
    assert_eq!(
        sign(KEY, br#"{"a":1}"#, 1_700_000_000),
        "t=1700000000&s=6f935f4999a22697d3186d2f528b9ba93bd1bce44e799b690985927c66c072d2"
    );
    assert_eq!(
        sign(KEY, b"", 1_700_000_000),
        "t=1700000000&s=a5b3848cf54a129e782a682980081eaa0fea9734d52e1e52f1eca244b671e009"
    );
    // §3.4: the bearer hash.
    assert_eq!(
        hash_signing_key("signkey-prod-12345678").unwrap(),
        "signkey-prod-b2ed992186a5cb19f6668aade821f502c1d00970dfd0e35128d51bac4649916c"
    );
}

#[tokio::test]
async fn cloud_mode_accepts_only_valid_fresh_signatures_and_signs_its_answers() {
    let c = cloud(None);
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [echo(&c)])).await;
    let body = CallBuilder::new(json!({"k": "v"})).build();

    let unsigned = call(&url, "app-echo", "step", &body, None).await;
    assert_eq!(unsigned.status, 401);
    assert_eq!(unsigned.body["message"], "Unauthorized");

    let wrong = call(
        &url,
        "app-echo",
        "step",
        &body,
        Some("signkey-test-00112233"),
    )
    .await;
    assert_eq!(wrong.status, 401);

    // Expired: signed ten minutes ago.
    let canonical = cairn_protocol::signature::canonical_json(&body);
    let old = sign(KEY, &canonical, now() - 600);
    let res = reqwest::Client::new()
        .post(format!("{url}?fnId=app-echo&stepId=step"))
        .header("x-inngest-signature", old)
        .json(&body)
        .send()
        .await
        .unwrap();
    let expired = answer(res).await;
    assert_eq!(expired.status, 401);
    assert!(expired.body["error"].as_str().unwrap().contains("expired"));

    let ok = call(&url, "app-echo", "step", &body, Some(KEY)).await;
    assert_eq!(ok.status, 206);
    // The answer is signed over its exact bytes with the key that verified the request.
    let sig = ok.header("x-inngest-signature").expect("signed answer");
    assert_eq!(sig, raw_signature(KEY, &ok.raw, sig));

    // The fallback key is accepted, and then used to sign.
    let fb = call(&url, "app-echo", "step", &body, Some(FALLBACK_KEY)).await;
    assert_eq!(fb.status, 206);
    let sig = fb.header("x-inngest-signature").unwrap();
    assert_eq!(sig, raw_signature(FALLBACK_KEY, &fb.raw, sig));
    assert_ne!(sig, raw_signature(KEY, &fb.raw, sig));
}

#[tokio::test]
async fn dev_mode_skips_signatures() {
    let c = Client::builder("app").dev(true).build().unwrap();
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [echo(&c)])).await;
    let ans = call(
        &url,
        "app-echo",
        "step",
        &CallBuilder::new(json!({})).build(),
        None,
    )
    .await;
    assert_eq!(ans.status, 206);
    assert!(ans.header("x-inngest-signature").is_none());
}

#[tokio::test]
async fn trust_probe_and_unknown_probes() {
    let c = cloud(None);
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [echo(&c)])).await;
    let http = reqwest::Client::new();
    let sig = sign(KEY, b"", now());
    let res = http
        .post(format!("{url}?probe=trust"))
        .header("x-inngest-signature", &sig)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-inngest-signature"));
    let res = http
        .post(format!("{url}?probe=trust"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "probes are signed like calls");
    let res = http
        .post(format!("{url}?probe=nope"))
        .header("x-inngest-signature", &sig)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

#[tokio::test]
async fn bad_input_gets_json_errors_not_panics() {
    let c = Client::builder("app").dev(true).build().unwrap();
    let opts = cairn_sdk::ServeOptions {
        max_body_bytes: 64 * 1024,
        ..Default::default()
    };
    let url = serve_sdk(cairn_sdk::serve_with(c.clone(), [echo(&c)], opts)).await;
    let http = reqwest::Client::new();
    let post_raw = |q: &str, body: Vec<u8>| {
        let req = http
            .post(format!("{url}?{q}"))
            .header("content-type", "application/json")
            .body(body);
        async move { answer(req.send().await.unwrap()).await }
    };

    let a = post_raw("fnId=app-echo&stepId=step", b"{not json".to_vec()).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["code"], "invalid_request");

    let a = post_raw(
        "fnId=app-echo&stepId=step",
        br#"{"event": {"name": "x"}}"#.to_vec(),
    )
    .await;
    assert_eq!(a.status, 400, "ctx.run_id is required");
    assert!(a.body["message"].as_str().unwrap().contains("ctx"));

    let a = post_raw(
        "fnId=app-nope&stepId=step",
        serde_json::to_vec(&CallBuilder::new(json!({})).build()).unwrap(),
    )
    .await;
    assert_eq!(a.status, 404);
    assert_eq!(a.body["code"], "function_not_found");

    let a = post_raw("stepId=step", b"{}".to_vec()).await;
    assert_eq!(a.status, 400);

    let a = post_raw("fnId=app-echo&stepId=step", vec![b' '; 100 * 1024]).await;
    assert_eq!(a.status, 413);
    assert_eq!(a.body["code"], "request_too_large");

    let res = http.delete(&url).send().await.unwrap();
    assert_eq!(res.status(), 405);
    // Every answer, errors included, says it came from an SDK.
    assert_eq!(res.headers()["x-inngest-sdk"], cairn_sdk::SDK_HEADER);
}

#[tokio::test]
async fn failure_handler_is_served_under_its_own_slug() {
    let c = Client::builder("app").dev(true).build().unwrap();
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [echo(&c)])).await;
    let mut b = CallBuilder::new(
        json!({"function_id": "app-echo", "run_id": "01R", "error": {"name": "Error", "message": "boom"}}),
    );
    b.event["name"] = json!("inngest/function.failed");
    let ans = call(&url, "app-echo-failure", "step", &b.build(), None).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body, json!({"failed": "app-echo", "error": "boom"}));
}

#[tokio::test]
async fn introspection_is_public_and_richer_when_signed() {
    let c = cloud(None);
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [echo(&c)])).await;
    let http = reqwest::Client::new();
    let plain = answer(http.get(&url).send().await.unwrap()).await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.body["mode"], "cloud");
    assert_eq!(
        plain.body["function_count"], 2,
        "the function and its failure handler"
    );
    assert_eq!(plain.body["schema_version"], "2024-05-24");
    assert_eq!(plain.body["has_signing_key"], true);
    assert!(plain.body.get("app_id").is_none());

    let signed = http
        .get(&url)
        .header("x-inngest-signature", sign(KEY, b"", now()))
        .send()
        .await
        .unwrap();
    let signed = answer(signed).await;
    assert_eq!(signed.body["authentication_succeeded"], true);
    assert_eq!(signed.body["app_id"], "app");
    assert_eq!(signed.body["sdk_language"], "rs");
    assert_eq!(signed.body["framework"], "axum");
    assert_eq!(
        signed.body["signing_key_hash"],
        "4884fdaafea47c29fea7159d0daddd9c085d6200e1359e85bb81736af6b7c837"
    );
    assert_eq!(
        signed.body["event_key_hash"],
        cairn_protocol::signature::hash_event_key("evkey")
    );

    let bad = http
        .get(&url)
        .header("x-inngest-signature", sign("signkey-x-00", b"", now()))
        .send()
        .await
        .unwrap();
    let bad = answer(bad).await;
    assert_eq!(bad.body["authentication_succeeded"], false);
    assert!(bad.body.get("app_id").is_none());
}

type Seen = Arc<Mutex<Vec<(HeaderMap, String, Value)>>>;

/// A fake server API recording `/fn/register` calls and answering with `reply`.
async fn fake_register(reply: (StatusCode, Value)) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    let app = axum::Router::new().route(
        "/fn/register",
        post(
            move |headers: HeaderMap, uri: axum::http::Uri, body: axum::Json<Value>| {
                let seen = seen2.clone();
                let reply = reply.clone();
                async move {
                    seen.lock().unwrap().push((
                        headers,
                        uri.query().unwrap_or("").to_string(),
                        body.0,
                    ));
                    (reply.0, axum::Json(reply.1))
                }
            },
        ),
    );
    (listen(app).await, seen)
}

#[tokio::test]
async fn out_of_band_sync_registers_every_function_with_the_server() {
    let (server, seen) =
        fake_register((StatusCode::OK, json!({"ok": true, "modified": true}))).await;
    let c = cloud(Some(&server));
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [echo(&c)])).await;
    let res = reqwest::Client::new()
        .put(format!("{url}?deployId=d-1"))
        .header("x-inngest-server-kind", "cloud")
        .send()
        .await
        .unwrap();
    let ans = answer(res).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body["modified"], true);
    assert_eq!(ans.header("x-inngest-sync-kind"), Some("out_of_band"));

    let seen = seen.lock().unwrap();
    let (headers, query, body) = &seen[0];
    assert_eq!(query, "deployId=d-1");
    assert_eq!(
        headers["authorization"].to_str().unwrap(),
        format!("Bearer {}", hash_signing_key(KEY).unwrap())
    );
    assert_eq!(headers["x-inngest-sync-kind"], "out_of_band");
    assert_eq!(headers["x-inngest-expected-server-kind"], "cloud");
    assert_eq!(body["appName"], "app");
    assert_eq!(body["deployType"], "ping");
    assert_eq!(body["framework"], "axum");
    assert_eq!(body["sdk"], format!("rs:v{}", cairn_sdk::SDK_VERSION));
    assert_eq!(body["url"], url);
    let fns = body["functions"].as_array().unwrap();
    assert_eq!(fns.len(), 2);
    assert_eq!(fns[0]["id"], "app-echo");
    assert_eq!(fns[0]["triggers"], json!([{"event": "demo/echo"}]));
    assert_eq!(
        fns[0]["steps"]["step"]["runtime"]["url"],
        format!("{url}?fnId=app-echo&stepId=step")
    );
    assert_eq!(fns[1]["id"], "app-echo-failure");
    assert_eq!(fns[1]["name"], "echo (failure)");
    assert_eq!(
        fns[1]["triggers"],
        json!([{"event": "inngest/function.failed", "expression": "event.data.function_id == 'app-echo'"}])
    );
}

#[tokio::test]
async fn out_of_band_sync_relays_the_servers_error_status_from_the_body() {
    let (server, _seen) = fake_register((
        StatusCode::OK,
        json!({"status": 400, "error": "At least one function is invalid"}),
    ))
    .await;
    let c = cloud(Some(&server));
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [echo(&c)])).await;
    let ans = answer(reqwest::Client::new().put(&url).send().await.unwrap()).await;
    assert_eq!(ans.status, 400);
    assert_eq!(ans.body["message"], "At least one function is invalid");
}

#[tokio::test]
async fn in_band_sync_returns_the_config_only_when_signed() {
    let c = cloud(None);
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [echo(&c)])).await;
    let body = json!({"url": "https://app.example.com/api/inngest"});
    let http = reqwest::Client::new();
    let unsigned = http
        .put(&url)
        .header("x-inngest-sync-kind", "in_band")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);

    let sig = sign(
        KEY,
        &cairn_protocol::signature::canonical_json(&body),
        now(),
    );
    let res = http
        .put(&url)
        .header("x-inngest-sync-kind", "in_band")
        .header("x-inngest-signature", sig)
        .json(&body)
        .send()
        .await
        .unwrap();
    let ans = answer(res).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.header("x-inngest-sync-kind"), Some("in_band"));
    assert_eq!(ans.body["app_id"], "app");
    assert_eq!(ans.body["url"], "https://app.example.com/api/inngest");
    assert_eq!(
        ans.body["functions"][0]["steps"]["step"]["runtime"]["url"],
        "https://app.example.com/api/inngest?fnId=app-echo&stepId=step"
    );
    assert_eq!(ans.body["inspection"]["authentication_succeeded"], true);
    // The parsed form is what a Cairn server turns into a register request.
    let parsed: cairn_protocol::InBandSyncResponse =
        serde_json::from_value(ans.body.clone()).unwrap();
    assert_eq!(parsed.into_register_request().app_name, "app");
}

#[tokio::test]
async fn use_api_fetches_steps_and_events_from_the_server() {
    let big = "y".repeat(10);
    let actions = json!({ hash("one"): {"data": 41} });
    let batch =
        json!([{"name": "demo/echo", "data": {"from": "api"}, "id": "01B", "ts": 5, "user": {}}]);
    let auth_seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (a2, b2, s2, s3) = (
        actions.clone(),
        batch.clone(),
        auth_seen.clone(),
        auth_seen.clone(),
    );
    let app = axum::Router::new()
        .route(
            "/v0/runs/{id}/actions",
            get(move |h: HeaderMap| async move {
                s2.lock()
                    .unwrap()
                    .push(h["authorization"].to_str().unwrap().to_string());
                axum::Json(a2)
            }),
        )
        .route(
            "/v0/runs/{id}/batch",
            get(move |h: HeaderMap| async move {
                s3.lock()
                    .unwrap()
                    .push(h["authorization"].to_str().unwrap().to_string());
                axum::Json(b2)
            }),
        );
    let server = listen(app).await;
    let c = cloud(Some(&server));
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [echo(&c)])).await;
    let mut b = CallBuilder::new(json!({"inline": big}));
    b.use_api = true;
    let ans = call(&url, "app-echo", "step", &b.build(), Some(KEY)).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert_eq!(ans.body["n"], 41, "the memo came from /actions");
    assert_eq!(auth_seen.lock().unwrap().len(), 2);
    assert!(auth_seen.lock().unwrap()[0].starts_with("Bearer signkey-test-"));
}

#[test]
fn client_reads_the_official_environment_variables() {
    // One test touches the environment, so nothing races with it.
    let vars = [
        ("INNGEST_DEV", "http://127.0.0.1:9999"),
        ("INNGEST_EVENT_KEY", "ek"),
        ("INNGEST_SERVE_ORIGIN", "https://app.example.com"),
        ("INNGEST_SERVE_PATH", "/api/inngest"),
    ];
    for (k, v) in vars {
        // SAFETY: this test binary sets these variables in this one test only.
        unsafe { std::env::set_var(k, v) };
    }
    let c = Client::from_env("envapp").unwrap();
    assert_eq!(c.mode(), cairn_sdk::Mode::Dev);
    assert_eq!(c.api_origin(), "http://127.0.0.1:9999");
    assert_eq!(c.event_origin(), "http://127.0.0.1:9999");
    unsafe {
        std::env::set_var("INNGEST_DEV", "0");
        std::env::remove_var("INNGEST_SIGNING_KEY");
    }
    assert_eq!(
        Client::from_env("envapp").unwrap_err(),
        cairn_sdk::ConfigError::MissingSigningKey,
        "cloud mode without a key is refused up front"
    );
    unsafe {
        std::env::set_var("INNGEST_SIGNING_KEY", KEY);
        std::env::set_var("INNGEST_BASE_URL", "http://10.0.0.1:8288/");
    }
    let c = Client::from_env("envapp").unwrap();
    assert_eq!(c.mode(), cairn_sdk::Mode::Cloud);
    assert_eq!(c.api_origin(), "http://10.0.0.1:8288");
    for k in [
        "INNGEST_DEV",
        "INNGEST_EVENT_KEY",
        "INNGEST_SERVE_ORIGIN",
        "INNGEST_SERVE_PATH",
        "INNGEST_SIGNING_KEY",
        "INNGEST_BASE_URL",
    ] {
        unsafe { std::env::remove_var(k) };
    }
}
