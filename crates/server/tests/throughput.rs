//! Manual throughput probe (ignored by default; speed is judged by the benchmarks):
//! `cargo test -p cairn-server --release --test throughput -- --ignored --nocapture`.

mod common;

use common::{FakeApp, FakeFn, Step, TestServer};
use serde_json::json;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn runs_per_second() {
    let ts = TestServer::start().await;
    let steps = vec![
        Step::Run("a", json!(1)),
        Step::Run("b", json!(2)),
        Step::Run("c", json!(3)),
    ];
    let app = FakeApp::start("tp", vec![FakeFn::new("f", "tp/go", steps)]).await;
    ts.register(&app).await;
    let n = 1000;
    let t0 = Instant::now();
    let events: Vec<_> = (0..n)
        .map(|i| json!({"name": "tp/go", "data": {"i": i}}))
        .collect();
    let mut ids = Vec::new();
    for chunk in events.chunks(100) {
        ids.extend(ts.send(json!(chunk)).await);
    }
    for id in &ids {
        let runs = ts.runs_of(id, 1).await;
        let run = ts.finished(runs[0]["run_id"].as_str().unwrap()).await;
        assert_eq!(run["status"], "Completed");
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{n} runs x 4 calls in {secs:.2}s = {:.0} runs/s",
        n as f64 / secs
    );
    assert_eq!(app.executed("c"), n);
}
