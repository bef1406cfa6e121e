//! Database round trips per step on PostgreSQL: runs of sequential `step.run`s, counting
//! every statement the store sends (BEGIN and COMMIT included). A test binary of its own,
//! because the counter is per process.

mod common;
mod pg_support;

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

    let before = statements_sent();
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let ids = ts.send(json!({"name": "test/long"})).await;
        runs.push(ids[0].clone());
    }
    for ev in &runs {
        let run = ts.runs_of(ev, 1).await[0]["run_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(ts.finished(&run).await["status"], "Completed");
    }
    let spent = statements_sent() - before;
    // Each step is one SDK call, and costs two statements: reading the run, its memos and
    // the wait starting point before the call (`call_state`), and applying the answer while
    // leasing the next call (`apply_and_continue`). Counted against the steps as well: each
    // run's event and matching, its end and finalisation, the worker loop's claims when it
    // wakes, and this test's polling. Measured at about 5; the bound catches a step falling
    // off the two-statement path.
    let per_step = spent as f64 / (RUNS * STEPS) as f64;
    eprintln!("{spent} statements for {RUNS} runs of {STEPS} steps: {per_step:.2} per step");
    assert!(per_step <= 7.0, "{per_step:.2} statements per step");
    finish(ts, schema).await;
}
