//! Every step tool of the Rust SDK, run by the real `cairn dev`: run, parallel runs with a
//! repeated id, invoke, wait_for_event (matched), sleep and send_event.

use std::time::{Duration, Instant};

use cairn_e2e::{free_port, get_json, App, Cairn};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_workflow_uses_every_step_tool() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut app = App::start("example-step-tools", &base, &[("COOL_OFF_SECS", "1")]).await;
    let cairn = Cairn::dev(port, &[&app.url]).await;
    cairn
        .wait_synced("step-tools", Duration::from_secs(20))
        .await;

    let placed = cairn
        .send(
            "shop/order.placed",
            json!({"order_id": "o-1", "items": ["a", "bb"]}),
        )
        .await;
    // An approval for another order must not resume this run.
    wait_for_waiting_run(&cairn, &placed).await;
    cairn
        .send(
            "shop/order.approved",
            json!({"order_id": "o-2", "approver": "mallory"}),
        )
        .await;
    cairn
        .send(
            "shop/order.approved",
            json!({"order_id": "o-1", "approver": "ann"}),
        )
        .await;

    let runs = cairn
        .wait_runs_ended(&placed, 1, Duration::from_secs(60))
        .await;
    assert_eq!(runs[0]["status"], "Completed", "{:?}", runs[0]);
    let out = &runs[0]["output"];
    assert_eq!(out["order_id"], "o-1");
    assert_eq!(out["labels"], json!(["label:a", "label:bb"]));
    // price-item charges 100 + 25 per character: 125 + 150.
    assert_eq!(out["total_cents"], 275);
    assert_eq!(out["approved_by"], "ann");
    let sent = out["event_ids"][0]
        .as_str()
        .expect("send_event returned an id");

    // The sent event is stored under the id the step returned.
    let ev = get_json(&format!("{}/v1/events/{sent}", cairn.url)).await;
    assert_eq!(ev["data"]["name"], "shop/order.fulfilled", "{ev}");
    assert_eq!(ev["data"]["data"]["total_cents"], 275);
    app.proc.assert_running();
}

/// Waits until the run has reached its approval wait (so the decoy event arrives while it waits).
async fn wait_for_waiting_run(cairn: &Cairn, event_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let body = get_json(&format!("{}/v1/events/{event_id}/runs", cairn.url)).await;
        if let Some(run_id) = body["data"][0]["run_id"].as_str() {
            let actions = get_json(&format!("{}/v0/runs/{run_id}/actions", cairn.url)).await;
            // reserve-stock, two labels and two invokes are memoised before the wait.
            if actions.as_object().is_some_and(|m| m.len() >= 5) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run of {event_id} never reached its approval wait");
}
