//! Flow control end to end with the real Rust SDK: each option of §4.4 enforced by the
//! server, observed from inside the handlers (who ran, when, how many at once).

mod common;

use cairn_sdk::{
    Batch, Client, Concurrency, Ctx, Debounce, Function, RateLimit, Scope, SingletonMode, Throttle,
};
use common::{FakeApp, FakeFn, Step, TestServer};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the handlers saw.
#[derive(Default)]
struct Probe {
    /// Calls in progress now, by group label.
    now: HashMap<String, i64>,
    /// Most calls in progress at once, by group label.
    max: HashMap<String, i64>,
    /// (function, event data, time) of every step-body start.
    starts: Vec<(String, Value, Instant)>,
}

type Shared = Arc<Mutex<Probe>>;

fn enter(p: &Shared, groups: &[String]) {
    let mut p = p.lock();
    for g in groups {
        let n = {
            let n = p.now.entry(g.clone()).or_default();
            *n += 1;
            *n
        };
        let m = p.max.entry(g.clone()).or_default();
        *m = (*m).max(n);
    }
}

fn leave(p: &Shared, groups: &[String]) {
    let mut p = p.lock();
    for g in groups {
        *p.now.entry(g.clone()).or_default() -= 1;
    }
}

/// A function whose one step records its start and holds for `hold`; `groups` names the
/// in-progress counters it counts towards (from the event).
fn worker(
    client: &Client,
    id: &'static str,
    event: &str,
    hold: Duration,
    probe: &Shared,
    groups: fn(&Value) -> Vec<String>,
    configure: impl FnOnce(cairn_sdk::FunctionBuilder) -> cairn_sdk::FunctionBuilder,
) -> Function {
    let probe = probe.clone();
    configure(client.function(id).event(event)).handler(move |ctx: Ctx<Value>| {
        let probe = probe.clone();
        async move {
            let data = ctx.event.data.clone();
            let events = ctx.events().count();
            let p2 = probe.clone();
            let d2 = data.clone();
            ctx.step()
                .run("work", move || async move {
                    let g = groups(&d2);
                    p2.lock()
                        .starts
                        .push((id.to_string(), d2.clone(), Instant::now()));
                    enter(&p2, &g);
                    tokio::time::sleep(hold).await;
                    leave(&p2, &g);
                    Ok(())
                })
                .await?;
            Ok(json!({"data": data, "events": events}))
        }
    })
}

fn client_for(ts: &TestServer, listener: &tokio::net::TcpListener) -> Client {
    Client::builder("flow")
        .dev(true)
        .base_url(&ts.base)
        .serve_origin(format!("http://{}", listener.local_addr().unwrap()))
        .serve_path("/api/inngest")
        .build()
        .unwrap()
}

/// Start a server and an SDK app with the functions `build` makes.
async fn setup(build: impl FnOnce(&Client, &Shared) -> Vec<Function>) -> (TestServer, Shared) {
    let ts = TestServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = client_for(&ts, &listener);
    let probe: Shared = Arc::default();
    let fns = build(&client, &probe);
    let app = axum::Router::new().nest_service("/api/inngest", cairn_sdk::serve(client, fns));
    let url = format!("http://{}/api/inngest", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    ts.server.sync_url(&url).await.expect("sync the SDK app");
    (ts, probe)
}

fn all(_: &Value) -> Vec<String> {
    vec!["all".into()]
}

fn by_n(d: &Value) -> Vec<String> {
    vec!["all".into(), format!("n{}", d["n"])]
}

/// Wait for every run of these events to end; returns them.
async fn ended(ts: &TestServer, ids: &[String]) -> Vec<Value> {
    let mut out = Vec::new();
    for id in ids {
        for r in ts.runs_of(id, 1).await {
            out.push(ts.finished(r["run_id"].as_str().unwrap()).await);
        }
    }
    out
}

async fn send_each(ts: &TestServer, name: &str, datas: &[Value]) -> Vec<String> {
    let batch: Vec<Value> = datas
        .iter()
        .map(|d| json!({"name": name, "data": d}))
        .collect();
    ts.send(Value::Array(batch)).await
}

#[tokio::test]
async fn keyed_step_concurrency_runs_distinct_keys_together() {
    let (ts, probe) = setup(|c, p| {
        vec![worker(
            c,
            "keyed",
            "flow/keyed",
            Duration::from_millis(600),
            p,
            by_n,
            |f| f.concurrency(Concurrency::new(1).key("event.data.n")),
        )]
    })
    .await;
    let ids = send_each(
        &ts,
        "flow/keyed",
        &[
            json!({"n": 0}),
            json!({"n": 1}),
            json!({"n": 2}),
            json!({"n": 0}),
        ],
    )
    .await;
    let runs = ended(&ts, &ids).await;
    assert!(runs.iter().all(|r| r["status"] == "Completed"), "{runs:?}");
    let p = probe.lock();
    assert_eq!(p.max["n0"], 1, "key 0 must never run twice at once");
    assert!(p.max["all"] >= 2, "distinct keys must overlap: {:?}", p.max);
    assert_eq!(p.starts.len(), 4);
}

#[tokio::test]
async fn account_scope_is_shared_across_functions() {
    let (ts, probe) = setup(|c, p| {
        let lim = || Concurrency::new(1).key("'global'").scope(Scope::Account);
        vec![
            worker(
                c,
                "acct-a",
                "flow/acct",
                Duration::from_millis(300),
                p,
                all,
                |f| f.concurrency(lim()),
            ),
            worker(
                c,
                "acct-b",
                "flow/acct",
                Duration::from_millis(300),
                p,
                all,
                |f| f.concurrency(lim()),
            ),
        ]
    })
    .await;
    let ids = send_each(&ts, "flow/acct", &[json!({}), json!({}), json!({})]).await;
    let mut n = 0;
    for id in &ids {
        for r in ts.runs_of(id, 2).await {
            let r = ts.finished(r["run_id"].as_str().unwrap()).await;
            assert_eq!(r["status"], "Completed");
            n += 1;
        }
    }
    assert_eq!(n, 6);
    assert_eq!(
        probe.lock().max["all"],
        1,
        "one call at a time across both functions"
    );
}

#[tokio::test]
async fn throttle_spaces_starts_and_never_drops() {
    let (ts, probe) = setup(|c, p| {
        vec![worker(c, "thr", "flow/thr", Duration::ZERO, p, all, |f| {
            f.throttle(Throttle::new(1, Duration::from_secs(1)))
        })]
    })
    .await;
    let ids = send_each(
        &ts,
        "flow/thr",
        &[json!({"i": 0}), json!({"i": 1}), json!({"i": 2})],
    )
    .await;
    let runs = ended(&ts, &ids).await;
    assert_eq!(runs.len(), 3);
    let p = probe.lock();
    let mut t: Vec<Instant> = p.starts.iter().map(|s| s.2).collect();
    t.sort();
    for w in t.windows(2) {
        let gap = w[1] - w[0];
        assert!(gap >= Duration::from_millis(850), "starts {gap:?} apart");
    }
}

#[tokio::test]
async fn rate_limit_drops_excess_per_key_and_says_why() {
    let (ts, _probe) = setup(|c, p| {
        vec![worker(c, "rl", "flow/rl", Duration::ZERO, p, all, |f| {
            f.rate_limit(RateLimit::new(1, Duration::from_secs(86_400)).key("event.data.number"))
        })]
    })
    .await;
    let a = ts
        .send(json!({"name": "flow/rl", "data": {"number": 10}}))
        .await;
    ended(&ts, &a).await;
    let b = ts
        .send(json!({"name": "flow/rl", "data": {"number": 10}}))
        .await;
    let c = ts
        .send(json!({"name": "flow/rl", "data": {"number": 1}}))
        .await;
    ended(&ts, &c).await;
    // Events are matched in order, so once c has a run, b has been decided.
    let b_runs = ts.get(&format!("/v1/events/{}/runs", b[0])).await;
    assert_eq!(
        b_runs["data"],
        json!([]),
        "second event with the same key is dropped"
    );
    let skipped = ts.get(&format!("/v1/events/{}/skipped", b[0])).await;
    assert_eq!(skipped["data"][0]["reason"], "rate_limit", "{skipped}");
    assert_eq!(skipped["data"][0]["function_id"], "flow-rl");
}

#[tokio::test]
async fn idempotency_key_allows_one_run_per_day() {
    let (ts, _p) = setup(|c, p| {
        vec![worker(
            c,
            "idem",
            "flow/idem",
            Duration::ZERO,
            p,
            all,
            |f| f.idempotency("event.data.order"),
        )]
    })
    .await;
    let a = send_each(
        &ts,
        "flow/idem",
        &[
            json!({"order": "A"}),
            json!({"order": "A"}),
            json!({"order": "B"}),
        ],
    )
    .await;
    ended(&ts, &[a[2].clone()]).await;
    assert_eq!(ts.runs_of(&a[0], 1).await.len(), 1);
    let dup = ts.get(&format!("/v1/events/{}/runs", a[1])).await;
    assert_eq!(dup["data"], json!([]));
    let skipped = ts.get(&format!("/v1/events/{}/skipped", a[1])).await;
    assert_eq!(skipped["data"][0]["reason"], "idempotency");
}

#[tokio::test]
async fn debounce_runs_once_with_the_last_event() {
    let (ts, probe) = setup(|c, p| {
        vec![worker(c, "deb", "flow/deb", Duration::ZERO, p, all, |f| {
            f.debounce(Debounce::new(Duration::from_secs(1)).key("event.data.name"))
        })]
    })
    .await;
    let mut last = Vec::new();
    for i in 0..5 {
        last = ts
            .send(json!({"name": "flow/deb", "data": {"name": "x", "counter": i}}))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let other = ts
        .send(json!({"name": "flow/deb", "data": {"name": "y", "counter": 9}}))
        .await;
    let sent_last = Instant::now();
    let runs = ended(&ts, &last).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0]["output"]["data"],
        json!({"name": "x", "counter": 4})
    );
    ended(&ts, &other).await;
    let p = probe.lock();
    assert_eq!(p.starts.len(), 2, "one run per key");
    let x_start = p.starts.iter().find(|s| s.1["name"] == "x").unwrap().2;
    assert!(
        x_start + Duration::from_millis(200)
            >= sent_last + Duration::from_millis(900) - Duration::from_millis(200),
        "the run starts a period after the last event"
    );
}

#[tokio::test]
async fn debounce_latest_ts_wins() {
    let (ts, _p) = setup(|c, p| {
        vec![worker(
            c,
            "debts",
            "flow/debts",
            Duration::ZERO,
            p,
            all,
            |f| f.debounce(Debounce::new(Duration::from_secs(1))),
        )]
    })
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let future = ts
        .send(json!({"name": "flow/debts", "ts": now + 2000, "data": {"name": "future"}}))
        .await;
    let present = ts
        .send(json!({"name": "flow/debts", "ts": now, "data": {"name": "now"}}))
        .await;
    let runs = ended(&ts, &future).await;
    assert_eq!(runs[0]["output"]["data"]["name"], "future");
    let absorbed = ts.get(&format!("/v1/events/{}/runs", present[0])).await;
    assert_eq!(absorbed["data"], json!([]), "one run for both events");
}

#[tokio::test]
async fn batch_fills_then_times_out() {
    let (ts, _p) = setup(|c, p| {
        vec![worker(
            c,
            "batch",
            "flow/batch",
            Duration::ZERO,
            p,
            all,
            |f| f.batch_events(Batch::new(3, Duration::from_secs(1))),
        )]
    })
    .await;
    let ids = send_each(
        &ts,
        "flow/batch",
        &[
            json!({"i": 0}),
            json!({"i": 1}),
            json!({"i": 2}),
            json!({"i": 3}),
        ],
    )
    .await;
    let first = ended(&ts, &ids[..1]).await;
    assert_eq!(first[0]["output"]["events"], 3);
    assert_eq!(first[0]["event_ids"].as_array().unwrap().len(), 3);
    // Every event of the batch lists the batch run.
    let via_third = ts.runs_of(&ids[2], 1).await;
    assert_eq!(via_third[0]["run_id"], first[0]["run_id"]);
    let t = Instant::now();
    let second = ended(&ts, &ids[3..]).await;
    assert_eq!(second[0]["output"]["events"], 1);
    assert!(t.elapsed() <= Duration::from_secs(5));
}

/// The event that fills a batch starts its run at once, not at the batch's timeout nor at the
/// queue's next safety-net poll: the commit that closes the batch wakes the queue.
#[tokio::test]
async fn a_full_batch_starts_at_once() {
    let (ts, _p) = setup(|c, p| {
        vec![worker(
            c,
            "full",
            "flow/full",
            Duration::ZERO,
            p,
            all,
            |f| f.batch_events(Batch::new(2, Duration::from_secs(60))),
        )]
    })
    .await;
    let first = ts
        .send(json!({"name": "flow/full", "data": {"i": 0}}))
        .await;
    // Let the queue loop settle into its wait (until the batch's timeout, or its poll).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let second = ts
        .send(json!({"name": "flow/full", "data": {"i": 1}}))
        .await;
    let run = ended(&ts, &second).await;
    assert_eq!(run[0]["output"]["events"], 2);
    assert_eq!(
        ts.runs_of(&first[0], 1).await[0]["run_id"],
        run[0]["run_id"]
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "the full batch ran {:?} after its last event",
        t.elapsed()
    );
}

#[tokio::test]
async fn batch_if_false_runs_alone_at_once() {
    let (ts, _p) = setup(|c, p| {
        vec![worker(c, "bif", "flow/bif", Duration::ZERO, p, all, |f| {
            f.batch_events(Batch::new(5, Duration::from_secs(2)).when("event.data.n % 2 == 0"))
        })]
    })
    .await;
    let t = Instant::now();
    let ids = send_each(&ts, "flow/bif", &[json!({"n": 1}), json!({"n": 2})]).await;
    let odd = ended(&ts, &ids[..1]).await;
    assert_eq!(odd[0]["output"]["events"], 1);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "an odd event must not wait for the batch"
    );
    let even = ended(&ts, &ids[1..]).await;
    assert_eq!(even[0]["output"]["events"], 1);
    assert!(
        t.elapsed() >= Duration::from_millis(1800),
        "an even event waits for its batch timeout"
    );
}

#[tokio::test]
async fn singleton_skip_and_cancel() {
    let (ts, probe) = setup(|c, p| {
        vec![
            worker(
                c,
                "one",
                "flow/one",
                Duration::from_millis(800),
                p,
                all,
                |f| f.singleton(Some("event.data.user"), SingletonMode::Skip),
            ),
            worker(
                c,
                "newest",
                "flow/newest",
                Duration::from_millis(300),
                p,
                |_| vec!["newest".into()],
                |f| f.singleton(Some("event.data.user"), SingletonMode::Cancel),
            ),
        ]
    })
    .await;
    let ids = send_each(
        &ts,
        "flow/one",
        &[json!({"user": 1}), json!({"user": 1}), json!({"user": 2})],
    )
    .await;
    let runs = ended(&ts, &[ids[0].clone(), ids[2].clone()]).await;
    assert!(runs.iter().all(|r| r["status"] == "Completed"));
    let skipped = ts.get(&format!("/v1/events/{}/skipped", ids[1])).await;
    assert_eq!(skipped["data"][0]["reason"], "singleton", "{skipped}");

    let first = ts
        .send(json!({"name": "flow/newest", "data": {"user": 7}}))
        .await;
    let r1 = ts.runs_of(&first[0], 1).await;
    // Wait until the first run is inside its step, then start a newer one.
    for _ in 0..200 {
        if probe.lock().now.get("newest").copied().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = ts
        .send(json!({"name": "flow/newest", "data": {"user": 7}}))
        .await;
    let r2 = ended(&ts, &second).await;
    assert_eq!(r2[0]["status"], "Completed");
    let r1 = ts.finished(r1[0]["run_id"].as_str().unwrap()).await;
    assert_eq!(r1["status"], "Cancelled", "{r1}");
}

#[tokio::test]
async fn priority_reorders_a_backlog_and_queue_says_why() {
    let (ts, probe) = setup(|c, p| {
        vec![worker(
            c,
            "prio",
            "flow/prio",
            Duration::from_millis(700),
            p,
            all,
            |f| {
                f.concurrency(Concurrency::new(1))
                    .priority("event.data.p == 'high' ? 60 : 0")
            },
        )]
    })
    .await;
    let none = ts
        .send(json!({"name": "flow/prio", "data": {"p": "none"}}))
        .await;
    for _ in 0..200 {
        if !probe.lock().starts.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let low = ts
        .send(json!({"name": "flow/prio", "data": {"p": "low"}}))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let high = ts
        .send(json!({"name": "flow/prio", "data": {"p": "high"}}))
        .await;
    // While `none` runs, `low` is held by the concurrency limit.
    let low_run = ts.runs_of(&low[0], 1).await[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut held = Value::Null;
    for _ in 0..100 {
        let q = ts.get(&format!("/v1/runs/{low_run}/queue")).await;
        let w = &q["data"]["items"][0]["waiting_on"];
        if w["reason"] == "concurrency" {
            held = w.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        held["limit"], 1,
        "queue introspection names the limit: {held}"
    );
    assert_eq!(held["in_progress"], 1);
    ended(&ts, &[none[0].clone(), low[0].clone(), high[0].clone()]).await;
    let order: Vec<String> = probe
        .lock()
        .starts
        .iter()
        .map(|s| s.1["p"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, ["none", "high", "low"]);
}

#[tokio::test]
async fn run_concurrency_holds_across_sleeps() {
    // The split `{"fn": [...]}` shape (no official SDK emits it): a run holds its slot from
    // its first call to its end, sleeps included.
    let ts = TestServer::start().await;
    let mut f = FakeFn::new(
        "held",
        "flow/held",
        vec![
            Step::Run("a", json!(1)),
            Step::Sleep("nap", "1s"),
            Step::Run("b", json!(2)),
        ],
    );
    f.extra = json!({"concurrency": {"fn": [{"limit": 1}]}});
    let app = FakeApp::start("fake", vec![f]).await;
    ts.register(&app).await;
    let ids = ts
        .send(json!([{"name": "flow/held", "data": {}}, {"name": "flow/held", "data": {}}]))
        .await;
    let r1 = ts.runs_of(&ids[0], 1).await[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r2 = ts.runs_of(&ids[1], 1).await[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = ts.finished(&r1).await;
    let b = ts.finished(&r2).await;
    assert_eq!(
        (a["status"].as_str(), b["status"].as_str()),
        (Some("Completed"), Some("Completed"))
    );
    let (end1, end2) = (
        a["ended_at"].as_str().unwrap(),
        b["ended_at"].as_str().unwrap(),
    );
    let (first_end, second_end) = if end1 < end2 {
        (end1, end2)
    } else {
        (end2, end1)
    };
    let gap = chrono::DateTime::parse_from_rfc3339(second_end).unwrap()
        - chrono::DateTime::parse_from_rfc3339(first_end).unwrap();
    assert!(
        gap.num_milliseconds() >= 900,
        "the second run waited for the first: {gap}"
    );
}

#[tokio::test]
async fn invalid_flow_config_is_refused_naming_function_and_field() {
    let ts = TestServer::start().await;
    let mut f = FakeFn::new("bad", "flow/bad", vec![Step::Run("a", json!(1))]);
    f.extra = json!({"concurrency": [{"limit": 1}, {"limit": 2}, {"limit": 3}]});
    let app = FakeApp::start("fake", vec![f]).await;
    let r = ts
        .http
        .post(format!("{}/fn/register", ts.base))
        .json(&app.register_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["function"], "fake-bad", "{body}");
    assert_eq!(body["field"], "concurrency", "{body}");
    for (extra, field) in [
        (
            json!({"throttle": {"limit": 1, "period": "30d"}}),
            "throttle.period",
        ),
        (
            json!({"concurrency": [{"limit": 1, "scope": "galaxy"}]}),
            "concurrency[0].scope",
        ),
        (
            json!({"debounce": {"period": "5s", "key": "event.("}}),
            "debounce.key",
        ),
    ] {
        let mut f = FakeFn::new("bad", "flow/bad", vec![Step::Run("a", json!(1))]);
        f.extra = extra;
        let app = FakeApp::start("fake", vec![f]).await;
        let r = ts
            .http
            .post(format!("{}/fn/register", ts.base))
            .json(&app.register_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["field"], field, "{body}");
    }
    // Nothing of the refused app was stored.
    let fns = ts.get("/v1/apps/fake/functions").await;
    assert_eq!(fns["data"], json!([]), "{fns}");
}
