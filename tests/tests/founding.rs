//! The founding report's function, run by the real `cairn dev` against the Rust SDK example.

use std::time::Duration;

use cairn_e2e::{free_port, App, Cairn};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn founding_function_completes_through_cairn_dev() {
    let port = free_port();
    let mut app = App::start("example-founding", &format!("http://127.0.0.1:{port}"), &[]).await;
    let cairn = Cairn::dev(port, &[&app.url]).await;
    cairn.wait_synced("founding", Duration::from_secs(20)).await;

    let ids: Vec<String> = send_many(&cairn, 5).await;
    for id in &ids {
        let runs = cairn.wait_runs_ended(id, 1, Duration::from_secs(60)).await;
        assert_eq!(runs.len(), 1, "one event, one run: {runs:?}");
        assert_eq!(runs[0]["status"], "Completed", "{:?}", runs[0]);
        assert_eq!(runs[0]["output"], json!({"len": 100}));
    }
    app.proc.assert_running();
}

async fn send_many(cairn: &Cairn, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(cairn.send("demo/seed", json!({"i": i})).await);
    }
    ids
}
