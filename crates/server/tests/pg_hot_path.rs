//! Database round trips per step on PostgreSQL: runs of sequential `step.run`s, counting
//! every statement the store sends (BEGIN and COMMIT included). A test binary of its own,
//! because the counter is per process.

mod common;
mod pg_support;
mod rust_app;

use cairn_server::store::postgres::statements_sent;
use common::{FakeApp, FakeFn, Step};
use pg_support::{finish, pg_server};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_per_step_on_the_hot_path() {
    const STEPS: usize = 20;
    const RUNS: usize = 10;
    let (ts, schema) = pg_server().await;
    let ids: Vec<&'static str> = (0..STEPS)
        .map(|i| &*Box::leak(format!("s{i}").into_boxed_str()))
        .collect();
    let f = FakeFn::new(
        "long",
        "test/long",
        ids.iter().map(|id| Step::Run(id, json!(1))).collect(),
    );
    let app = FakeApp::start("app", vec![f]).await;
    ts.register(&app).await;
    // Warm up: prepared statements and pooled connections.
    ts.run_to_end(json!({"name": "test/long"})).await;

    let spent = statements_for_runs(&ts, "test/long", RUNS).await;
    // Each step is one SDK call, and costs two statements: reading the run, its memos and
    // the wait starting point before the call (`call_state`), and applying the answer while
    // leasing the next call (`apply_and_continue`). Counted against the steps as well: each
    // run's event and matching, its end and finalisation, the worker loop's claims when it
    // wakes, and this test's polling. Measured at about 5; the bound catches a step falling
    // off the two-statement path.
    let per_step = spent as f64 / (RUNS * STEPS) as f64;
    eprintln!("{spent} statements for {RUNS} runs of {STEPS} steps: {per_step:.2} per step");
    assert!(per_step <= 7.0, "{per_step:.2} statements per step");

    // The Rust SDK checkpoints: one call per run, and each step saved by a checkpoint,
    // which is one statement when it is the current call of a running run.
    let url = checkpointing_app(&ts.base, &ids).await;
    ts.server.sync_url(&url).await.expect("sync the SDK app");
    ts.run_to_end(json!({"name": "test/ck"})).await;
    let spent = statements_for_runs(&ts, "test/ck", RUNS).await;
    let per_step = spent as f64 / (RUNS * STEPS) as f64;
    eprintln!("checkpointing: {spent} statements for {RUNS} runs of {STEPS} steps: {per_step:.2} per step");
    // Measured at 2.4: one per checkpoint, plus the run's own statements and this test's
    // polling spread over its steps. Checkpoints on the general path (a transaction of
    // BEGIN, the call's check, the run's lock, the memo, the attempt reset and COMMIT)
    // measured 7.4.
    assert!(
        per_step <= 4.0,
        "{per_step:.2} statements per checkpointed step"
    );
    finish(ts, schema).await;
}

/// Statements sent while `runs` runs of `event` are started at once and all complete.
async fn statements_for_runs(ts: &common::TestServer, event: &str, runs: usize) -> u64 {
    let before = statements_sent();
    let mut events = Vec::new();
    for _ in 0..runs {
        events.push(ts.send(json!({ "name": event })).await[0].clone());
    }
    for ev in &events {
        let run = ts.runs_of(ev, 1).await[0]["run_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(ts.finished(&run).await["status"], "Completed");
    }
    statements_sent() - before
}

/// A Rust SDK app whose `ck` function runs one `step.run` per id in `ids`.
async fn checkpointing_app(server_base: &str, ids: &[&'static str]) -> String {
    let ids = ids.to_vec();
    rust_app::serve_rust_app("ckapp", server_base, move |client| {
        let f = client.function("ck").event("test/ck").handler(
            move |ctx: cairn_sdk::Ctx<serde_json::Value>| {
                let ids = ids.clone();
                async move {
                    for id in ids {
                        let _: u32 = ctx.step().run(id, || async { Ok(1) }).await?;
                    }
                    Ok(json!(true))
                }
            },
        );
        axum::Router::new().nest_service("/api/inngest", cairn_sdk::serve(client, [f]))
    })
    .await
}
