//! End-to-end: a real server on SQLite, driven over HTTP, calling a scripted app.

mod common;

use common::{FakeApp, FakeFn, Step, TestServer};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn steps_sleep_and_complete_once_each() {
    let ts = TestServer::start().await;
    let app = FakeApp::start(
        "app",
        vec![FakeFn::new(
            "steps",
            "test/steps",
            vec![
                Step::Run("a", json!("A")),
                Step::Sleep("zzz", "1s"),
                Step::Run("b", json!({"n": 2})),
            ],
        )],
    )
    .await;
    ts.register(&app).await;
    let run = ts
        .run_to_end(json!({"name": "test/steps", "data": {"x": 1}}))
        .await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["steps"]["a"], json!({"data": "A"}));
    assert_eq!(run["output"]["steps"]["zzz"], Value::Null);
    assert_eq!(run["output"]["steps"]["b"], json!({"data": {"n": 2}}));
    assert_eq!(run["output"]["event"], json!({"x": 1}));
    assert_eq!(app.executed("a"), 1);
    assert_eq!(app.executed("b"), 1);

    // The lifecycle event is stored in the commit that ends the run, so it is there as soon
    // as the run reads as ended.
    let evs = ts.get("/v1/events?name=inngest/function.finished").await;
    let finished = evs["data"][0].clone();
    assert_eq!(finished["data"]["function_id"], "app-steps");
    assert_eq!(finished["data"]["_inngest"]["status"], "Completed");
    assert_eq!(
        finished["data"]["result"]["steps"]["a"],
        json!({"data": "A"})
    );

    // Memoised steps are readable through the use_api endpoint.
    let actions = ts
        .get(&format!(
            "/v0/runs/{}/actions",
            run["run_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        actions[cairn_protocol::step_id::hash("a")],
        json!({"data": "A"})
    );
}

#[tokio::test]
async fn parallel_steps_version_2_coalesce() {
    let ts = TestServer::start().await;
    let mut f = FakeFn::new(
        "par",
        "test/par",
        vec![
            Step::Parallel(vec![("p", json!(1)), ("p:1", json!(2)), ("p:2", json!(3))]),
            Step::Run("after", json!("z")),
        ],
    );
    f.version = 2;
    let app = FakeApp::start("app", vec![f]).await;
    ts.register(&app).await;
    let run = ts.run_to_end(json!({"name": "test/par"})).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["steps"]["p:2"], json!({"data": 3}));
    assert_eq!(run["output"]["steps"]["after"], json!({"data": "z"}));
    for id in ["p", "p:1", "p:2", "after"] {
        assert_eq!(app.executed(id), 1, "step {id}");
    }
    // 1 discovery + 3 targeted + 1 discovery after coalescing (planned "after"
    // because disable_immediate stays set until that discovery) + targeted + final.
    let calls = app.counters.lock().calls["app-par"];
    assert!(calls <= 7, "too many calls: {calls}");
}

#[tokio::test]
async fn retries_then_success() {
    let ts = TestServer::start().await;
    let app = FakeApp::start(
        "app",
        vec![FakeFn::new(
            "flaky",
            "test/flaky",
            vec![Step::Flaky("f", 2, json!("ok"))],
        )],
    )
    .await;
    ts.register(&app).await;
    let run = ts.run_to_end(json!({"name": "test/flaky"})).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["steps"]["f"], json!({"data": "ok"}));
    assert_eq!(app.executed("f"), 3);
}

#[tokio::test]
async fn permanent_failure_runs_on_failure_handler() {
    let ts = TestServer::start().await;
    let mut handler = FakeFn::new(
        "boom-failure",
        "inngest/function.failed",
        vec![Step::Run("cleanup", json!("done"))],
    );
    handler.triggers = json!([{"event": "inngest/function.failed", "expression": "event.data.function_id == 'app-boom'"}]);
    let mut boom = FakeFn::new(
        "boom",
        "test/boom",
        vec![Step::Run("a", json!(1)), Step::Throw(true)],
    );
    boom.extra = json!({"retries": 0});
    let app = FakeApp::start("app", vec![boom, handler]).await;
    ts.register(&app).await;
    let run = ts.run_to_end(json!({"name": "test/boom"})).await;
    assert_eq!(run["status"], "Failed", "{run}");
    assert_eq!(run["output"]["message"], "function blew up");

    // The failure event starts the handler exactly once.
    let mut handler_runs = 0;
    for _ in 0..200 {
        let evs = ts.get("/v1/events?name=inngest/function.failed").await;
        if let Some(e) = evs["data"].as_array().and_then(|a| a.first()) {
            assert_eq!(e["data"]["function_id"], "app-boom");
            assert_eq!(e["data"]["error"]["message"], "function blew up");
            let runs = ts.runs_of(e["internal_id"].as_str().unwrap(), 1).await;
            let r = ts.finished(runs[0]["run_id"].as_str().unwrap()).await;
            assert_eq!(r["status"], "Completed");
            assert_eq!(r["function_id"], "app-boom-failure");
            handler_runs = runs.len();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(handler_runs, 1);
    assert_eq!(app.executed("cleanup"), 1);
}

#[tokio::test]
async fn function_error_retried_then_fails_with_cause() {
    let ts = TestServer::start().await;
    let mut f = FakeFn::new("err", "test/err", vec![Step::Throw(false)]);
    f.extra = json!({"steps": {"step": {"id": "step", "name": "step",
        "runtime": {"type": "http", "url": "PLACEHOLDER"}, "retries": {"attempts": 2}}}});
    let app = FakeApp::start("app", vec![f]).await;
    let mut body = app.register_body();
    body["functions"][0]["steps"]["step"]["runtime"]["url"] =
        json!(format!("{}?fnId=app-err&stepId=step", app.url));
    let r = ts
        .http
        .post(format!("{}/fn/register", ts.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let run = ts.run_to_end(json!({"name": "test/err"})).await;
    assert_eq!(run["status"], "Failed");
    // retries.attempts = 2 retries → 3 calls.
    assert_eq!(app.counters.lock().calls["app-err"], 3);
}

#[tokio::test]
async fn unreachable_app_fails_run_naming_the_cause() {
    let ts = TestServer::start().await;
    let app = FakeApp::start("app", vec![FakeFn::new("gone", "test/gone", vec![])]).await;
    let mut body = app.register_body();
    body["functions"][0]["retries"] = json!(1);
    // Port 9 on loopback (discard) is closed on test machines.
    body["functions"][0]["steps"]["step"]["runtime"]["url"] =
        json!("http://127.0.0.1:9/api/inngest");
    ts.http
        .post(format!("{}/fn/register", ts.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let run = ts.run_to_end(json!({"name": "test/gone"})).await;
    assert_eq!(run["status"], "Failed");
    let msg = run["output"]["message"].as_str().unwrap();
    assert!(msg.contains("127.0.0.1:9"), "{msg}");
}

#[tokio::test]
async fn wait_for_event_matched_and_timed_out() {
    let ts = TestServer::start().await;
    let app = FakeApp::start(
        "app",
        vec![
            FakeFn::new(
                "waiter",
                "test/start",
                vec![
                    Step::Wait(
                        "w",
                        "test/resume",
                        Some("async.data.id == event.data.id"),
                        "5s",
                    ),
                    Step::Run("after", json!(1)),
                ],
            ),
            FakeFn::new(
                "timeout",
                "test/start-t",
                vec![Step::Wait("w", "test/never", None, "300ms")],
            ),
        ],
    )
    .await;
    ts.register(&app).await;
    let ids = ts
        .send(json!({"name": "test/start", "data": {"id": 7}}))
        .await;
    let runs = ts.runs_of(&ids[0], 1).await;
    let run_id = runs[0]["run_id"].as_str().unwrap().to_string();
    // Non-matching, then matching event (possibly racing the pause creation).
    ts.send(json!({"name": "test/resume", "data": {"id": 8}}))
        .await;
    ts.send(json!({"name": "test/resume", "data": {"id": 7, "ok": true, "correlation_id": "user-field"}}))
        .await;
    let run = ts.finished(&run_id).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(
        run["output"]["steps"]["w"]["data"],
        json!({"id": 7, "ok": true, "correlation_id": "user-field"})
    );
    assert_eq!(run["output"]["steps"]["w"]["name"], "test/resume");

    let run = ts.run_to_end(json!({"name": "test/start-t"})).await;
    assert_eq!(run["status"], "Completed");
    assert_eq!(run["output"]["steps"]["w"], Value::Null);
}

#[tokio::test]
async fn invoke_success_failure_and_timeout() {
    let ts = TestServer::start().await;
    let mut failing = FakeFn::new("child-fail", "test/never-sent", vec![Step::Throw(true)]);
    failing.extra = json!({"retries": 0});
    let app = FakeApp::start(
        "app",
        vec![
            FakeFn::new(
                "child",
                "test/child",
                vec![Step::Run("c", json!("child-out"))],
            ),
            failing,
            FakeFn::new("slow", "test/never-sent-2", vec![Step::Sleep("s", "10s")]),
            FakeFn::new(
                "parent",
                "test/parent",
                vec![
                    Step::Invoke("ok", "app-child", json!({"k": 1}), "2s"),
                    Step::Invoke("bad", "app-child-fail", json!({}), "2s"),
                    Step::Invoke("late", "app-slow", json!({}), "2s"),
                    Step::Invoke("missing", "app-nope", json!({}), "2s"),
                ],
            ),
        ],
    )
    .await;
    ts.register(&app).await;
    let run = ts.run_to_end(json!({"name": "test/parent"})).await;
    assert_eq!(run["status"], "Completed", "{run}");
    let steps = &run["output"]["steps"];
    assert_eq!(
        steps["ok"]["data"]["steps"]["c"],
        json!({"data": "child-out"})
    );
    assert_eq!(steps["ok"]["data"]["event"]["k"], 1);
    assert_eq!(steps["bad"]["error"]["message"], "function blew up");
    assert_eq!(steps["late"]["error"]["name"], "InngestInvokeTimeoutError");
    assert!(steps["missing"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not found"));
}

#[tokio::test]
async fn cancel_by_event_and_by_api() {
    let ts = TestServer::start().await;
    let mut f = FakeFn::new(
        "cancellable",
        "test/c",
        vec![Step::Sleep("s", "30s"), Step::Run("never", json!(0))],
    );
    f.extra = json!({"cancel": [{"event": "test/cancel", "if": "async.data.id == event.data.id"}]});
    let app = FakeApp::start("app", vec![f]).await;
    ts.register(&app).await;

    let ids = ts.send(json!({"name": "test/c", "data": {"id": 1}})).await;
    let run1 = ts.runs_of(&ids[0], 1).await[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let ids = ts.send(json!({"name": "test/c", "data": {"id": 2}})).await;
    let run2 = ts.runs_of(&ids[0], 1).await[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    ts.send(json!({"name": "test/cancel", "data": {"id": 1}}))
        .await;
    let r1 = ts.finished(&run1).await;
    assert_eq!(r1["status"], "Cancelled");
    let still = ts.get(&format!("/v1/runs/{run2}")).await;
    assert_eq!(still["data"]["status"], "Running");

    let resp = ts
        .http
        .delete(format!("{}/v1/runs/{run2}", ts.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r2 = ts.finished(&run2).await;
    assert_eq!(r2["status"], "Cancelled");
    assert_eq!(app.executed("never"), 0);
    // A cancelled event is emitted for each.
    for _ in 0..100 {
        let evs = ts.get("/v1/events?name=inngest/function.cancelled").await;
        if evs["data"].as_array().map(|a| a.len()) == Some(2) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("expected two function.cancelled events");
}

#[tokio::test]
async fn same_event_id_starts_one_run_and_expressions_filter() {
    let ts = TestServer::start().await;
    let mut f = FakeFn::new("once", "test/once", vec![Step::Run("a", json!(1))]);
    f.triggers = json!([{"event": "test/once", "expression": "event.data.go == true"}]);
    let app = FakeApp::start("app", vec![f]).await;
    ts.register(&app).await;
    let a = ts
        .send(json!({"name": "test/once", "id": "dup-1", "data": {"go": true}}))
        .await;
    let b = ts
        .send(json!({"name": "test/once", "id": "dup-1", "data": {"go": true}}))
        .await;
    let c = ts
        .send(json!({"name": "test/once", "data": {"go": false}}))
        .await;
    let runs = ts.runs_of(&a[0], 1).await;
    ts.finished(runs[0]["run_id"].as_str().unwrap()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b_runs = ts.get(&format!("/v1/events/{}/runs", b[0])).await;
    assert_eq!(
        b_runs["data"].as_array().unwrap().len(),
        0,
        "duplicate id started a run"
    );
    let c_runs = ts.get(&format!("/v1/events/{}/runs", c[0])).await;
    assert_eq!(
        c_runs["data"].as_array().unwrap().len(),
        0,
        "expression did not filter"
    );
    assert_eq!(app.executed("a"), 1);
}

#[tokio::test]
async fn bad_events_are_rejected_and_not_stored() {
    let ts = TestServer::start().await;
    let post = |body: Vec<u8>| {
        let http = ts.http.clone();
        let url = format!("{}/e/key", ts.base);
        async move { http.post(url).body(body).send().await.unwrap() }
    };
    for (body, what) in [
        (br#"{"data":{}}"#.to_vec(), "name"),
        (
            br#"{"name":"inngest/function.failed"}"#.to_vec(),
            "reserved",
        ),
        (b"{not json".to_vec(), "JSON"),
        (br#"[{"name":"ok/1"},{"data":{}}]"#.to_vec(), "name"),
    ] {
        let r = post(body).await;
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], 400);
        assert!(v["error"].as_str().unwrap().contains(what), "{v}");
    }
    let big = json!({"name": "big/one", "data": {"s": "x".repeat(600 * 1024)}});
    let r = post(serde_json::to_vec(&big).unwrap()).await;
    assert_eq!(r.status(), 400);
    let evs = ts.get("/v1/events").await;
    assert_eq!(
        evs["data"].as_array().unwrap().len(),
        0,
        "a rejected batch stored something"
    );

    let r = ts
        .http
        .post(format!("{}/fn/register", ts.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], 400);
}

#[tokio::test]
async fn cron_fires_on_a_seconds_schedule() {
    let ts = TestServer::start().await;
    let mut f = FakeFn::new("tick", "unused", vec![Step::Run("t", json!(1))]);
    f.triggers = json!([{"cron": "* * * * * *"}]);
    let app = FakeApp::start("app", vec![f]).await;
    ts.register(&app).await;
    let mut seen = Vec::new();
    for _ in 0..200 {
        let evs = ts.get("/v1/events?name=inngest/scheduled.timer").await;
        seen = evs["data"].as_array().unwrap().clone();
        if seen.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.len() >= 2, "cron fired {} times", seen.len());
    let ids: std::collections::HashSet<&str> =
        seen.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), seen.len(), "a tick fired twice");
    assert_eq!(seen[0]["data"]["cron"], "* * * * * *");
    let runs = ts
        .runs_of(seen[0]["internal_id"].as_str().unwrap(), 1)
        .await;
    assert_eq!(
        ts.finished(runs[0]["run_id"].as_str().unwrap()).await["status"],
        "Completed"
    );
}

#[tokio::test]
async fn finish_timeout_cancels_a_long_run() {
    let ts = TestServer::start().await;
    let mut f = FakeFn::new(
        "slowpoke",
        "test/slow",
        vec![Step::Sleep("s", "30s"), Step::Run("never", json!(0))],
    );
    f.extra = json!({"timeouts": {"finish": "300ms"}});
    let app = FakeApp::start("app", vec![f]).await;
    ts.register(&app).await;
    let run = ts.run_to_end(json!({"name": "test/slow"})).await;
    assert_eq!(run["status"], "Cancelled", "{run}");
    assert!(run["output"]["message"]
        .as_str()
        .unwrap()
        .contains("timeouts.finish"));
    assert_eq!(app.executed("never"), 0);
}

#[tokio::test]
async fn resent_batch_with_the_same_id_seed_is_stored_once() {
    let ts = TestServer::start().await;
    let app = FakeApp::start("app", vec![FakeFn::new("seeded", "test/seed", vec![])]).await;
    ts.register(&app).await;
    let send = || async {
        let r = ts
            .http
            .post(format!("{}/e/k", ts.base))
            .header("x-inngest-event-id-seed", "1700000000000,AAECAwQFBgcICQ==")
            .json(&json!([{"name": "test/seed"}, {"name": "test/seed"}]))
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()["ids"].clone()
    };
    let first = send().await;
    let second = send().await;
    assert_eq!(first, second);
    assert_ne!(first[0], first[1]);
    for id in first.as_array().unwrap() {
        let runs = ts.runs_of(id.as_str().unwrap(), 1).await;
        ts.finished(runs[0]["run_id"].as_str().unwrap()).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let evs = ts.get("/v1/events?name=test/seed").await;
    assert_eq!(evs["data"].as_array().unwrap().len(), 2);
    assert_eq!(app.counters.lock().calls["app-seeded"], 2);
}

#[tokio::test]
async fn discovery_request_and_run_complete_ops() {
    let ts = TestServer::start().await;
    let f = FakeFn::new(
        "v4ish",
        "test/v4",
        vec![
            Step::Run("a", json!(1)),
            Step::Discovery("handoff"),
            Step::Run("b", json!(2)),
            Step::RunComplete(json!({"via": "206"})),
        ],
    );
    let app = FakeApp::start("app", vec![f]).await;
    ts.register(&app).await;
    let run = ts.run_to_end(json!({"name": "test/v4"})).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!({"via": "206"}));
    // Passed on three calls: the hand-off, the discovery it asked for (runs b), the last.
    assert_eq!(
        app.executed("handoff"),
        3,
        "no discovery call after DiscoveryRequest"
    );
    assert_eq!(app.executed("b"), 1);
}

#[tokio::test]
async fn get_run_with_wait_ms_answers_when_the_run_ends() {
    let ts = TestServer::start().await;
    let f = FakeFn::new(
        "napper",
        "test/nap",
        vec![Step::Sleep("nap", "1s"), Step::Run("after", json!(1))],
    );
    let app = FakeApp::start("waitapp", vec![f]).await;
    ts.register(&app).await;
    let ids = ts.send(json!({"name": "test/nap", "data": {}})).await;
    let run_id = ts.runs_of(&ids[0], 1).await[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    // A short wait times out on the sleeping run and says it is still running.
    let t = std::time::Instant::now();
    let r = ts.get(&format!("/v1/runs/{run_id}?wait_ms=200")).await;
    assert_eq!(r["data"]["status"], "Running");
    assert!(t.elapsed() >= std::time::Duration::from_millis(190));
    // A long wait answers as soon as the run ends, well before the wait is up.
    let r = ts.get(&format!("/v1/runs/{run_id}?wait_ms=20000")).await;
    assert_eq!(r["data"]["status"], "Completed", "{r}");
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert!(
        ts.server.engine().run_waiters.is_empty(),
        "no waiter left behind"
    );
}

#[tokio::test]
async fn event_runs_with_wait_ms_answer_when_every_run_of_the_event_has_ended() {
    let ts = TestServer::start().await;
    // Two functions on one event: the answer waits for the slower.
    let slow = FakeFn::new(
        "slow",
        "test/both",
        vec![Step::Sleep("nap", "1s"), Step::Run("after", json!(1))],
    );
    let quick = FakeFn::new("quick", "test/both", vec![Step::Run("only", json!(2))]);
    let app = FakeApp::start("evwait", vec![slow, quick]).await;
    ts.register(&app).await;
    let ids = ts.send(json!({"name": "test/both", "data": {}})).await;
    let t = std::time::Instant::now();
    // A short wait times out and shows the sleeping run still running.
    let r = ts
        .get(&format!("/v1/events/{}/runs?wait_ms=200", ids[0]))
        .await;
    let statuses = |r: &Value| -> Vec<String> {
        let mut s: Vec<String> = r["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|run| run["status"].as_str().unwrap().to_string())
            .collect();
        s.sort();
        s
    };
    assert!(statuses(&r).contains(&"Running".to_string()), "{r}");
    assert!(t.elapsed() >= std::time::Duration::from_millis(190));
    // A long wait answers once both have ended, well before the wait is up.
    let r = ts
        .get(&format!("/v1/events/{}/runs?wait_ms=20000", ids[0]))
        .await;
    assert_eq!(statuses(&r), ["Completed", "Completed"], "{r}");
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert!(
        ts.server.engine().run_waiters.is_empty(),
        "no waiter left behind"
    );

    // An event no function takes has no runs to wait for: answered at once.
    let ids = ts.send(json!({"name": "test/nobody", "data": {}})).await;
    let t = std::time::Instant::now();
    let r = ts
        .get(&format!("/v1/events/{}/runs?wait_ms=20000", ids[0]))
        .await;
    assert_eq!(r["data"], json!([]));
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    // An unknown event is a 404, waiting or not.
    let r = ts
        .http
        .get(format!("{}/v1/events/01NOSUCH/runs?wait_ms=1000", ts.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// The checkpoint endpoint's wrong inputs: each gets the status the JS SDK acts on (§13.2).
/// (That a refused checkpoint stores nothing is the store's `superseded dispatch` test.)
#[tokio::test]
async fn checkpoints_that_cannot_be_taken_are_refused_with_the_reason() {
    let ts = TestServer::start().await;
    let post = |body: Vec<u8>| {
        let http = ts.http.clone();
        let url = format!("{}/v1/checkpoint/01NORUN/async", ts.base);
        async move {
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let step = json!({"id": "h", "op": "StepRun", "data": 1});

    let (status, body) = post(b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("invalid checkpoint body"));

    // No queue item named: the run itself must be running.
    let (status, body) = post(serde_json::to_vec(&json!({"steps": [step]})).unwrap()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["data"]["run_id"], "01NORUN");

    // A call the server no longer waits for (the run ended, or the call was retried).
    let (status, body) =
        post(serde_json::to_vec(&json!({"qi_id": "01NORUN:start@5", "steps": [step]})).unwrap())
            .await;
    assert_eq!(status, 409, "{body}");

    // Only steps that ran in the SDK can be checkpointed.
    let sleep = json!({"id": "z", "op": "Sleep", "name": "1s"});
    let (status, body) =
        post(serde_json::to_vec(&json!({"qi_id": "01NORUN:start@5", "steps": [sleep]})).unwrap())
            .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("cannot checkpoint async steps"));
}
