//! Step semantics over real HTTP: the SDK on loopback, reqwest playing the server.

mod common;

use std::time::Duration;

use cairn_sdk::{Client, Ctx, Error, Event, Function, Invoke, Wait};
use common::*;
use serde_json::{json, Value};

fn client() -> Client {
    Client::builder("app").dev(true).build().unwrap()
}

fn founding(client: &Client) -> Function {
    client
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
        })
}

#[tokio::test]
async fn founding_function_runs_to_completion_one_step_per_call() {
    let c = client();
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [founding(&c)])).await;

    let a = call(
        &url,
        "app-seed-cron",
        "step",
        &CallBuilder::new(json!({})).build(),
        None,
    )
    .await;
    let op = &a.ops()[0];
    assert_eq!(op["op"], "StepRun");
    assert_eq!(op["id"], hash("collect-data"));
    assert_eq!(op["displayName"], "collect-data");
    assert_eq!(op["userland"]["id"], "collect-data");
    assert_eq!(op["data"].as_str().unwrap().len(), 1_000_000);
    assert_eq!(a.header("x-inngest-sdk"), Some(cairn_sdk::SDK_HEADER));
    assert_eq!(a.header("x-inngest-req-version"), Some("2"));
    assert_eq!(a.header("x-inngest-framework"), Some("axum"));
    assert!(
        a.header("x-inngest-no-retry").is_none(),
        "no error, no header"
    );

    let big = op["data"].clone();
    let b = CallBuilder::new(json!({})).data("collect-data", big);
    let ans = call(&url, "app-seed-cron", "step", &b.build(), None).await;
    let op = &ans.ops()[0];
    assert_eq!(op["op"], "StepRun");
    assert_eq!(op["id"], hash("digest"));
    assert_eq!(op["data"], "x".repeat(100));

    let b = b.data("digest", json!("x".repeat(100)));
    let ans = call(&url, "app-seed-cron", "step", &b.build(), None).await;
    assert_eq!(ans.ops()[0]["id"], hash("finalize"));
    assert_eq!(ans.ops()[0]["data"], json!({"done": true}));

    let b = b.data("finalize", json!({"done": true}));
    let ans = call(&url, "app-seed-cron", "step", &b.build(), None).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body, json!({"len": 100}));
}

fn parallel(client: &Client) -> Function {
    client
        .function("parallel")
        .event("demo/p")
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let (a, b) = futures::join!(
                step.run("a", || async { Ok(1) }),
                step.run("b", || async { Ok(2) }),
            );
            Ok(json!({"sum": a? + b?}))
        })
}

#[tokio::test]
async fn parallel_steps_are_planned_together_then_run_when_targeted() {
    let c = client();
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [parallel(&c)])).await;
    let ans = call(
        &url,
        "app-parallel",
        "step",
        &CallBuilder::new(json!({})).build(),
        None,
    )
    .await;
    let ops = ans.ops();
    assert_eq!(ops.len(), 2);
    assert!(ops.iter().all(|o| o["op"] == "StepPlanned"));
    assert_eq!(ops[0]["id"], hash("a"));
    assert_eq!(ops[1]["id"], hash("b"));

    let mut b = CallBuilder::new(json!({}));
    b.disable_immediate_execution = true;
    let ans = call(&url, "app-parallel", &hash("b"), &b.build(), None).await;
    let ops = ans.ops();
    assert_eq!(ops.len(), 1, "a targeted call reports only its step");
    assert_eq!(ops[0]["op"], "StepRun");
    assert_eq!(ops[0]["id"], hash("b"));
    assert_eq!(ops[0]["data"], 2);

    let b = b.data("b", json!(2)).data("a", json!(1));
    let ans = call(&url, "app-parallel", "step", &b.build(), None).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body, json!({"sum": 3}));
}

#[tokio::test]
async fn memoised_races_replay_in_the_servers_completion_order() {
    let c = client();
    let race =
        c.function("race")
            .event("demo/r")
            .handler(|ctx: Ctx<Value>| async move {
                let step = ctx.step();
                let a = std::pin::pin!(step.run("a", || async { Ok("a".to_string()) }));
                let b = std::pin::pin!(step.run("b", || async { Ok("b".to_string()) }));
                let winner = match futures::future::select(a, b).await {
                    futures::future::Either::Left((w, _))
                    | futures::future::Either::Right((w, _)) => w?,
                };
                Ok(json!({ "winner": winner }))
            });
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [race])).await;
    let b_first = CallBuilder::new(json!({}))
        .data("b", json!("b"))
        .data("a", json!("a"));
    let ans = call(&url, "app-race", "step", &b_first.build(), None).await;
    assert_eq!(ans.body, json!({"winner": "b"}));
    let a_first = CallBuilder::new(json!({}))
        .data("a", json!("a"))
        .data("b", json!("b"));
    let ans = call(&url, "app-race", "step", &a_first.build(), None).await;
    assert_eq!(ans.body, json!({"winner": "a"}));
}

#[tokio::test]
async fn repeated_ids_in_a_loop_get_indexed_ids() {
    let c = client();
    let looped = c
        .function("loop")
        .event("demo/l")
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let mut total = 0;
            for i in 0..3 {
                total += step.run("item", move || async move { Ok(i * 10) }).await?;
            }
            Ok(json!(total))
        });
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [looped])).await;
    let b = CallBuilder::new(json!({}))
        .data("item", json!(0))
        .data("item:1", json!(10));
    let ans = call(&url, "app-loop", "step", &b.build(), None).await;
    let op = &ans.ops()[0];
    assert_eq!(op["id"], hash("item:2"));
    assert_eq!(op["userland"], json!({"id": "item", "index": 2}));
    assert_eq!(op["data"], 20);
    let ans = call(
        &url,
        "app-loop",
        "step",
        &b.data("item:2", json!(20)).build(),
        None,
    )
    .await;
    assert_eq!(ans.body, json!(30));
}

fn flaky(client: &Client) -> Function {
    client
        .function("flaky")
        .event("demo/f")
        .handler(|ctx: Ctx<Value>| async move {
            let kind = ctx.event.data["kind"]
                .as_str()
                .unwrap_or("plain")
                .to_string();
            let step = ctx.step();
            let out: Result<u32, Error> = step
                .run("boom", move || async move {
                    match kind.as_str() {
                        "fatal" => Err(Error::non_retriable("no way")),
                        "later" => Err(Error::retry_after(Duration::from_secs(90), "busy")),
                        _ => Err(Error::msg("step broke")),
                    }
                })
                .await;
            match out {
                Err(Error::Step(e)) if ctx.event.data["catch"] == true => {
                    Ok(json!({"caught": e.step, "message": e.error.message}))
                }
                other => Ok(json!(other?)),
            }
        })
}

#[tokio::test]
async fn step_errors_retry_until_the_last_attempt_then_fail() {
    let c = client();
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [flaky(&c)])).await;

    let ans = call(
        &url,
        "app-flaky",
        "step",
        &CallBuilder::new(json!({})).attempt(0, 3).build(),
        None,
    )
    .await;
    let op = &ans.ops()[0];
    assert_eq!(op["op"], "StepError");
    assert_eq!(op["error"]["message"], "step broke");
    assert_eq!(ans.header("x-inngest-no-retry"), Some("false"));

    let ans = call(
        &url,
        "app-flaky",
        "step",
        &CallBuilder::new(json!({})).attempt(2, 3).build(),
        None,
    )
    .await;
    assert_eq!(ans.ops()[0]["op"], "StepFailed");
    assert_eq!(ans.header("x-inngest-no-retry"), Some("true"));

    let b = CallBuilder::new(json!({"kind": "fatal"})).attempt(0, 3);
    let ans = call(&url, "app-flaky", "step", &b.build(), None).await;
    assert_eq!(
        ans.ops()[0]["op"],
        "StepFailed",
        "non-retriable fails at once"
    );

    let b = CallBuilder::new(json!({"kind": "later"})).attempt(0, 3);
    let ans = call(&url, "app-flaky", "step", &b.build(), None).await;
    assert_eq!(ans.ops()[0]["op"], "StepError");
    assert_eq!(ans.header("retry-after"), Some("90"));
}

#[tokio::test]
async fn a_memoised_step_failure_is_a_typed_error_user_code_can_catch() {
    let c = client();
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [flaky(&c)])).await;
    let failed = json!({"error": {"name": "Error", "message": "step broke", "stack": ""}});

    let b = CallBuilder::new(json!({"catch": true})).memo("boom", failed.clone());
    let ans = call(&url, "app-flaky", "step", &b.build(), None).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body, json!({"caught": "boom", "message": "step broke"}));

    // Uncaught, it fails the function without retries (the step already used them).
    let b = CallBuilder::new(json!({})).memo("boom", failed);
    let ans = call(&url, "app-flaky", "step", &b.build(), None).await;
    assert_eq!(ans.status, 400);
    assert_eq!(ans.header("x-inngest-no-retry"), Some("true"));
    assert_eq!(ans.body["message"], "step broke");
}

#[tokio::test]
async fn function_errors_map_to_status_and_retry_headers() {
    let c = client();
    let f = c
        .function("err")
        .event("demo/e")
        .handler(|ctx: Ctx<Value>| async move {
            match ctx.event.data["kind"].as_str() {
                Some("fatal") => Err::<Value, _>(Error::non_retriable("bad input")),
                Some("later") => Err(Error::retry_after(Duration::from_millis(1500), "busy")),
                // Any std error converts with `?`.
                _ => Ok(json!("nan".parse::<u32>()?)),
            }
        });
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [f])).await;
    let ans = call(
        &url,
        "app-err",
        "step",
        &CallBuilder::new(json!({})).build(),
        None,
    )
    .await;
    assert_eq!(ans.status, 500);
    assert_eq!(ans.header("x-inngest-no-retry"), Some("false"));
    assert_eq!(ans.body["message"], "invalid digit found in string");
    assert_eq!(ans.body["__serialized"], true);

    let ans = call(
        &url,
        "app-err",
        "step",
        &CallBuilder::new(json!({"kind": "fatal"})).build(),
        None,
    )
    .await;
    assert_eq!(ans.status, 400);
    assert_eq!(ans.header("x-inngest-no-retry"), Some("true"));
    assert_eq!(ans.body["name"], "NonRetriableError");

    let ans = call(
        &url,
        "app-err",
        "step",
        &CallBuilder::new(json!({"kind": "later"})).build(),
        None,
    )
    .await;
    assert_eq!(ans.status, 500);
    assert_eq!(
        ans.header("retry-after"),
        Some("2"),
        "rounded up to whole seconds"
    );
}

#[derive(serde::Deserialize, serde::Serialize, Debug)]
struct Approval {
    id: u32,
    ok: bool,
}

fn tools(client: &Client) -> Function {
    client
        .function("tools")
        .event("demo/t")
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            step.sleep("nap", Duration::from_secs(3600)).await?;
            let approval = step
                .wait_for_event::<Approval>(
                    "approve",
                    Wait::event("app/approved")
                        .matching("data.id")
                        .timeout(Duration::from_secs(60)),
                )
                .await?;
            let child: String = step
                .invoke_with(
                    "child",
                    Invoke::new("app-child")
                        .data(json!({"n": 1}))
                        .timeout(Duration::from_secs(600)),
                )
                .await?;
            Ok(json!({"approved": approval.map(|e| e.data.ok), "child": child}))
        })
}

#[tokio::test]
async fn sleep_wait_and_invoke_report_their_ops_and_read_their_memos() {
    let c = client();
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [tools(&c)])).await;
    let b = CallBuilder::new(json!({}));
    let ans = call(&url, "app-tools", "step", &b.build(), None).await;
    let op = &ans.ops()[0];
    assert_eq!(op["op"], "Sleep");
    assert_eq!(op["name"], "1h");
    assert_eq!(op["opts"]["duration"], "1h");

    let b = b.memo("nap", Value::Null);
    let ans = call(&url, "app-tools", "step", &b.build(), None).await;
    let op = &ans.ops()[0];
    assert_eq!(op["op"], "WaitForEvent");
    assert_eq!(op["id"], hash("approve"));
    assert_eq!(op["name"], "app/approved");
    assert_eq!(
        op["opts"],
        json!({"event": "app/approved", "timeout": "1m", "if": "event.data.id == async.data.id"})
    );

    let event = json!({"name": "app/approved", "data": {"id": 1, "ok": true}, "id": "01E", "ts": 1, "user": {}});
    let b = b.memo("approve", event);
    let ans = call(&url, "app-tools", "step", &b.build(), None).await;
    let op = &ans.ops()[0];
    assert_eq!(op["op"], "InvokeFunction");
    assert_eq!(
        op["opts"],
        json!({"function_id": "app-child", "payload": {"data": {"n": 1}}, "timeout": "10m"})
    );

    let ans = call(
        &url,
        "app-tools",
        "step",
        &b.data("child", json!("done")).build(),
        None,
    )
    .await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body, json!({"approved": true, "child": "done"}));

    // A timed-out wait memoises null: the step returns None.
    let b = CallBuilder::new(json!({}))
        .memo("nap", Value::Null)
        .memo("approve", Value::Null)
        .data("child", json!("done"));
    let ans = call(&url, "app-tools", "step", &b.build(), None).await;
    assert_eq!(ans.body, json!({"approved": null, "child": "done"}));
}

#[tokio::test]
async fn send_event_step_runs_inline_and_posts_to_the_event_api() {
    use axum::routing::post;
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<(String, String, Value)>>> = Arc::default();
    let seen2 = seen.clone();
    let fake = axum::Router::new().route(
        "/e/{key}",
        post(
            move |axum::extract::Path(key): axum::extract::Path<String>,
                  headers: axum::http::HeaderMap,
                  body: axum::Json<Value>| {
                let seen = seen2.clone();
                async move {
                    let seed = headers
                        .get("x-inngest-event-id-seed")
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_string();
                    seen.lock().unwrap().push((key, seed, body.0));
                    axum::Json(json!({"ids": ["01A", "01B"], "status": 200}))
                }
            },
        ),
    );
    let server = listen(fake).await;
    let c = Client::builder("app")
        .dev(true)
        .base_url(&server)
        .event_key("k1")
        .build()
        .unwrap();
    let f = c
        .function("sender")
        .event("demo/s")
        .handler(|ctx: Ctx<Value>| async move {
            let sent = ctx
                .step()
                .send_event(
                    "send",
                    vec![
                        Event::new("app/a", json!({"x": 1})),
                        Event::new("app/b", json!({})),
                    ],
                )
                .await?;
            Ok(json!(sent.ids))
        });
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [f])).await;
    let ans = call(
        &url,
        "app-sender",
        "step",
        &CallBuilder::new(json!({})).build(),
        None,
    )
    .await;
    let op = &ans.ops()[0];
    assert_eq!(op["op"], "StepRun");
    assert_eq!(op["name"], "sendEvent");
    assert_eq!(op["opts"], json!({"type": "step.sendEvent"}));
    assert_eq!(op["data"], json!({"ids": ["01A", "01B"]}));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let (key, seed, body) = &seen[0];
    assert_eq!(key, "k1");
    assert!(seed.contains(','), "seed is `<ms>,<base64>`: {seed}");
    assert_eq!(body[0]["name"], "app/a");
    assert!(body[0]["ts"].as_i64().unwrap() > 0, "ts is filled in");
}

#[tokio::test]
async fn client_send_retries_with_the_same_id_seed() {
    use axum::routing::post;
    use std::sync::{Arc, Mutex};
    let seeds: Arc<Mutex<Vec<String>>> = Arc::default();
    let seeds2 = seeds.clone();
    let fake = axum::Router::new().route(
        "/e/{key}",
        post(move |headers: axum::http::HeaderMap| {
            let seeds = seeds2.clone();
            async move {
                let mut s = seeds.lock().unwrap();
                s.push(
                    headers["x-inngest-event-id-seed"]
                        .to_str()
                        .unwrap()
                        .to_string(),
                );
                if s.len() == 1 {
                    (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        axum::Json(json!({"status": 500, "error": "oops"})),
                    )
                } else {
                    (
                        axum::http::StatusCode::OK,
                        axum::Json(json!({"status": 200, "ids": ["01X"]})),
                    )
                }
            }
        }),
    );
    let server = listen(fake).await;
    let c = Client::builder("app")
        .dev(true)
        .base_url(&server)
        .build()
        .unwrap();
    let res = c.send(Event::new("app/x", json!({"a": 1}))).await.unwrap();
    assert_eq!(res.ids, vec!["01X".to_string()]);
    let seeds = seeds.lock().unwrap();
    assert_eq!(seeds.len(), 2);
    assert_eq!(seeds[0], seeds[1]);
}

static STASH: std::sync::Mutex<Vec<cairn_sdk::Step>> = std::sync::Mutex::new(Vec::new());

#[tokio::test]
async fn a_step_handle_kept_after_the_request_reports_run_finished() {
    let c = client();
    let f = c
        .function("stash")
        .event("demo/s")
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            assert!(step.is_live());
            STASH.lock().unwrap().push(step.clone());
            let v: u32 = step.run("one", || async { Ok(1) }).await?;
            Ok(json!(v))
        });
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [f])).await;
    let ans = call(
        &url,
        "app-stash",
        "step",
        &CallBuilder::new(json!({})).build(),
        None,
    )
    .await;
    assert_eq!(ans.ops()[0]["op"], "StepRun");
    let step = STASH.lock().unwrap().pop().unwrap();
    assert!(!step.is_live());
    let res = step.run("late", || async { Ok(2u32) }).await;
    assert!(matches!(res, Err(Error::RunFinished)), "{res:?}");
    let res = step.sleep("late-nap", Duration::from_secs(1)).await;
    assert!(matches!(res, Err(Error::RunFinished)));
}

#[tokio::test]
async fn targeted_call_for_a_step_that_never_appears_answers_step_not_found() {
    let c = client();
    let opts = cairn_sdk::ServeOptions {
        step_not_found_timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let url = serve_sdk(cairn_sdk::serve_with(c.clone(), [founding(&c)], opts)).await;
    let ans = call(
        &url,
        "app-seed-cron",
        &hash("nope"),
        &CallBuilder::new(json!({})).build(),
        None,
    )
    .await;
    assert_eq!(ans.status, 500);
    assert_eq!(ans.body["requestedStep"], hash("nope"));
    assert_eq!(ans.body["foundSteps"][0]["name"], "collect-data");
    assert_eq!(ans.header("x-inngest-no-retry"), Some("false"));
}

#[tokio::test]
async fn a_targeted_step_the_handler_never_awaits_fails_instead_of_hanging() {
    let c = client();
    let f = c
        .function("unawaited")
        .event("demo/u")
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let a = step.run("a", || async { Ok(1u32) });
            // Awaits a server-side step first; `a` is created but not polled yet.
            step.sleep("s", Duration::from_secs(5)).await?;
            Ok(json!(a.await?))
        });
    let opts = cairn_sdk::ServeOptions {
        step_not_found_timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let url = serve_sdk(cairn_sdk::serve_with(c.clone(), [f], opts)).await;
    // Discovery reports both: the unpolled run step is planned, not executed blindly.
    let ans = call(
        &url,
        "app-unawaited",
        "step",
        &CallBuilder::new(json!({})).build(),
        None,
    )
    .await;
    let ops: Vec<&str> = ans
        .ops()
        .iter()
        .map(|o| o["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["StepPlanned", "Sleep"]);
    let started = std::time::Instant::now();
    let ans = call(
        &url,
        "app-unawaited",
        &hash("a"),
        &CallBuilder::new(json!({})).build(),
        None,
    )
    .await;
    assert_eq!(ans.status, 500);
    assert!(ans.body["message"]
        .as_str()
        .unwrap()
        .contains("never awaited"));
    assert!(started.elapsed() < Duration::from_secs(5));
    // Once the sleep is memoised the handler reaches `a` and it runs.
    let b = CallBuilder::new(json!({})).memo("s", Value::Null);
    let ans = call(&url, "app-unawaited", &hash("a"), &b.build(), None).await;
    assert_eq!(ans.ops()[0]["op"], "StepRun");
}

#[tokio::test]
async fn batched_events_are_all_visible_and_the_batch_config_is_synced() {
    let c = client();
    let f = c
        .function("batch")
        .event("demo/b")
        .batch_events(cairn_sdk::Batch::new(10, Duration::from_secs(5)).key("event.data.user"))
        .handler(|ctx: Ctx<Value>| async move {
            let ns: Vec<Value> = ctx.events().map(|e| e.data["n"].clone()).collect();
            Ok(json!(ns))
        });
    let cfg = &f.configs("http://x/api")[0];
    assert_eq!(
        serde_json::to_value(&cfg.batch_events).unwrap(),
        json!({"maxSize": 10, "timeout": "5s", "key": "event.data.user"})
    );
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [f])).await;
    let mut body = CallBuilder::new(json!({"n": 1})).build();
    body["events"] = json!([
        {"name": "demo/b", "data": {"n": 1}, "id": "1", "ts": 1, "user": {}},
        {"name": "demo/b", "data": {"n": 2}, "id": "2", "ts": 2, "user": {}},
        {"name": "demo/b", "data": {"n": 3}, "id": "3", "ts": 3, "user": {}},
    ]);
    let ans = call(&url, "app-batch", "step", &body, None).await;
    assert_eq!(ans.body, json!([1, 2, 3]));
}

#[test]
fn flow_control_config_serialises_as_the_wire_expects() {
    use cairn_sdk::{CancelOn, Concurrency, Debounce, RateLimit, Scope, SingletonMode, Throttle};
    let c = client();
    let f = c
        .function("flow")
        .name("Flow")
        .event_if("shop/paid", "event.data.total > 10")
        .cron("TZ=Europe/Paris 0 9 * * *")
        .retries(7)
        .concurrency(Concurrency::new(5))
        .concurrency(
            Concurrency::new(50)
                .key("event.data.account")
                .scope(Scope::Env),
        )
        .throttle(
            Throttle::new(3, Duration::from_secs(60))
                .burst(2)
                .key("event.data.k"),
        )
        .rate_limit(RateLimit::new(10, Duration::from_secs(3600)))
        .debounce(Debounce::new(Duration::from_secs(5)).timeout(Duration::from_secs(60)))
        .priority("event.data.vip ? 60 : 0")
        .idempotency("event.data.order_id")
        .cancel_on(
            CancelOn::event("shop/cancelled")
                .matching("data.order_id")
                .timeout(Duration::from_secs(86400)),
        )
        .timeouts(
            Some(Duration::from_secs(10)),
            Some(Duration::from_secs(7200)),
        )
        .singleton(Some("event.data.user"), SingletonMode::Cancel)
        .handler(|_ctx: Ctx<Value>| async move { Ok(()) });
    let cfg = serde_json::to_value(&f.configs("http://app/api/inngest")[0]).unwrap();
    assert_eq!(
        cfg,
        json!({
            "id": "app-flow",
            "name": "Flow",
            "triggers": [
                {"event": "shop/paid", "expression": "event.data.total > 10"},
                {"cron": "TZ=Europe/Paris 0 9 * * *"}
            ],
            "steps": {"step": {
                "id": "step", "name": "step",
                "runtime": {"type": "http", "url": "http://app/api/inngest?fnId=app-flow&stepId=step"},
                "retries": {"attempts": 7}
            }},
            "concurrency": [{"limit": 5}, {"limit": 50, "key": "event.data.account", "scope": "env"}],
            "throttle": {"limit": 3, "period": "1m", "burst": 2, "key": "event.data.k"},
            "rateLimit": {"limit": 10, "period": "1h"},
            "debounce": {"period": "5s", "timeout": "1m"},
            "priority": {"run": "event.data.vip ? 60 : 0"},
            "idempotency": "event.data.order_id",
            "cancel": [{"event": "shop/cancelled", "if": "event.data.order_id == async.data.order_id", "timeout": "1d"}],
            "timeouts": {"start": "10s", "finish": "2h"},
            "singleton": {"key": "event.data.user", "mode": "cancel"}
        })
    );
}

type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;
type Saves = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// A fake server whose checkpoint endpoint records each save (in `log` as `saved <step>`,
/// and each body in `saves`) and answers 200, or 409 to the first `refuse_first` saves;
/// returns them with a dev client pointed at it.
async fn checkpoint_server(refuse_first: usize) -> (Log, Saves, Client) {
    use axum::extract::Path;
    let (log, saves): (Log, Saves) = Default::default();
    let (l, b) = (log.clone(), saves.clone());
    let app = axum::Router::new().route(
        "/v1/checkpoint/{run}/async",
        axum::routing::post(move |Path(run): Path<String>, body: axum::Json<Value>| {
            let (log, saves) = (l.clone(), b.clone());
            async move {
                let mut saves = saves.lock().unwrap();
                let refused = saves.len() < refuse_first;
                let name = body["steps"][0]["displayName"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                saves.push((run, body.0));
                if refused {
                    return axum::http::StatusCode::CONFLICT;
                }
                log.lock().unwrap().push(format!("saved {name}"));
                axum::http::StatusCode::OK
            }
        }),
    );
    let server = listen(app).await;
    let client = Client::builder("app")
        .dev(true)
        .base_url(&server)
        .build()
        .unwrap();
    (log, saves, client)
}

/// The founding function's shape, logging each step as it runs.
fn logged(client: &Client, log: Log) -> Function {
    client
        .function("logged")
        .event("demo/seed")
        .handler(move |ctx: Ctx<Value>| {
            let log = log.clone();
            async move {
                let step = ctx.step();
                let (l1, l2, l3) = (log.clone(), log.clone(), log.clone());
                let data: String = step
                    .run("collect-data", || async move {
                        l1.lock().unwrap().push("ran collect-data".into());
                        Ok("x".repeat(1024))
                    })
                    .await?;
                let digest: String = step
                    .run("digest", || async move {
                        l2.lock().unwrap().push("ran digest".into());
                        Ok(data[..100].to_string())
                    })
                    .await?;
                step.run("finalize", || async move {
                    l3.lock().unwrap().push("ran finalize".into());
                    Ok(json!({ "done": true }))
                })
                .await?;
                Ok(json!({ "len": digest.len() }))
            }
        })
}

fn checkpointing_call() -> Value {
    let mut b = CallBuilder::new(json!({}));
    b.checkpoint = Some(("fn-uuid".into(), "item-1@1700".into()));
    b.build()
}

#[tokio::test]
async fn a_checkpointing_call_saves_each_step_before_the_next_runs_and_completes() {
    let (log, bodies, c) = checkpoint_server(0).await;
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [logged(&c, log.clone())])).await;

    let ans = call(&url, "app-logged", "step", &checkpointing_call(), None).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert_eq!(ans.body, json!({"len": 100}));
    assert_eq!(
        *log.lock().unwrap(),
        [
            "ran collect-data",
            "saved collect-data",
            "ran digest",
            "saved digest",
            "ran finalize",
            "saved finalize"
        ]
    );
    let bodies = bodies.lock().unwrap();
    let (run, first) = &bodies[0];
    assert_eq!(run, "01RUN");
    assert_eq!(first["run_id"], "01RUN");
    assert_eq!(first["fn_id"], "fn-uuid");
    assert_eq!(first["qi_id"], "item-1@1700");
    assert!(first["ts"].as_i64().unwrap() > 1_700_000_000_000);
    let op = &first["steps"][0];
    assert_eq!(op["op"], "StepRun");
    assert_eq!(op["id"], hash("collect-data"));
    assert_eq!(op["data"].as_str().unwrap().len(), 1024);
    assert_eq!(bodies[2].1["steps"][0]["data"], json!({"done": true}));
}

#[tokio::test]
async fn a_refused_checkpoint_falls_back_to_a_206_and_runs_nothing_more() {
    let (log, bodies, c) = checkpoint_server(1).await;
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [logged(&c, log.clone())])).await;

    let ans = call(&url, "app-logged", "step", &checkpointing_call(), None).await;
    let op = &ans.ops()[0];
    assert_eq!(op["op"], "StepRun");
    assert_eq!(op["id"], hash("collect-data"));
    assert_eq!(op["data"].as_str().unwrap().len(), 1024);
    assert_eq!(ans.ops().len(), 1);
    assert_eq!(*log.lock().unwrap(), ["ran collect-data"]);
    assert_eq!(bodies.lock().unwrap().len(), 1);

    // No server listening at all: the same classic answer.
    let log = Log::default();
    let c = Client::builder("app")
        .dev(true)
        .base_url("http://127.0.0.1:9")
        .build()
        .unwrap();
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [logged(&c, log.clone())])).await;
    let ans = call(&url, "app-logged", "step", &checkpointing_call(), None).await;
    assert_eq!(ans.ops()[0]["id"], hash("collect-data"));
    assert_eq!(*log.lock().unwrap(), ["ran collect-data"]);
}

#[tokio::test]
async fn calls_that_must_not_checkpoint_answer_one_step_per_call() {
    let (log, bodies, c) = checkpoint_server(0).await;
    let off = c
        .function("off")
        .event("demo/off")
        .checkpointing(false)
        .handler(|ctx: Ctx<Value>| async move {
            let a: u32 = ctx.step().run("a", || async { Ok(1) }).await?;
            let b: u32 = ctx.step().run("b", || async { Ok(2) }).await?;
            Ok(json!(a + b))
        });
    let url = serve_sdk(cairn_sdk::serve(c.clone(), [off, logged(&c, log.clone())])).await;

    // Turned off for the function.
    let ans = call(&url, "app-off", "step", &checkpointing_call(), None).await;
    assert_eq!(ans.ops()[0]["id"], hash("a"));
    // A targeted call runs its one step and answers with it.
    let ans = call(
        &url,
        "app-logged",
        &hash("collect-data"),
        &checkpointing_call(),
        None,
    )
    .await;
    assert_eq!(ans.ops()[0]["id"], hash("collect-data"));
    // The server asked for every step to be scheduled: nothing runs inline.
    let mut b = CallBuilder::new(json!({}));
    b.checkpoint = Some(("fn-uuid".into(), "item-1@1700".into()));
    b.disable_immediate_execution = true;
    let ans = call(&url, "app-logged", "step", &b.build(), None).await;
    assert_eq!(ans.ops()[0]["op"], "StepPlanned");
    // No fn_id: the server does not take checkpoints.
    let ans = call(
        &url,
        "app-logged",
        "step",
        &CallBuilder::new(json!({})).build(),
        None,
    )
    .await;
    assert_eq!(ans.ops()[0]["op"], "StepRun");
    assert!(bodies.lock().unwrap().is_empty(), "no call checkpointed");
}

#[tokio::test]
async fn a_call_past_its_checkpoint_runtime_answers_its_next_step_with_a_206() {
    let (log, bodies, c) = checkpoint_server(0).await;
    let slow = c
        .function("slow")
        .event("demo/slow")
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            let a: u32 = step.run("a", || async { Ok(1) }).await?;
            let b: u32 = step
                .run("b", || async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(a + 1)
                })
                .await?;
            let c: u32 = step.run("c", || async move { Ok(b + 1) }).await?;
            Ok(json!(c))
        });
    let opts = cairn_sdk::ServeOptions {
        checkpoint_max_runtime: Duration::from_millis(150),
        ..Default::default()
    };
    let url = serve_sdk(cairn_sdk::serve_with(c.clone(), [slow], opts)).await;
    let ans = call(&url, "app-slow", "step", &checkpointing_call(), None).await;
    let ops = ans.ops();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0]["op"], "StepRun");
    assert_eq!(ops[0]["id"], hash("b"));
    assert_eq!(ops[0]["data"], 2);
    assert_eq!(
        *log.lock().unwrap(),
        ["saved a"],
        "only `a` was checkpointed"
    );
    assert_eq!(bodies.lock().unwrap().len(), 1, "`b` was not even tried");
}
