//! Calls from the SDK to the server's API.

use cairn_protocol::Event;
use serde_json::{Map, Value};

use crate::client::Client;

/// Fetches a run's memoised steps and events when they were too large to inline (`use_api`).
pub(crate) async fn fetch_run_data(
    client: &Client,
    run_id: &str,
) -> Result<(Map<String, Value>, Vec<Event>), String> {
    let base = format!("{}/v0/runs/{run_id}", client.api_origin());
    let actions_url = format!("{base}/actions");
    let batch_url = format!("{base}/batch");
    let (actions, batch) = futures::join!(
        client.api_request(|http| http.get(&actions_url)),
        client.api_request(|http| http.get(&batch_url)),
    );
    let actions = read_json::<Map<String, Value>>(actions, &actions_url).await?;
    let batch = read_json::<Vec<Event>>(batch, &batch_url).await?;
    Ok((actions, batch))
}

async fn read_json<T: serde::de::DeserializeOwned>(
    res: Result<reqwest::Response, reqwest::Error>,
    url: &str,
) -> Result<T, String> {
    let res = res.map_err(|e| format!("GET {url}: {e}"))?;
    let status = res.status();
    if !status.is_success() {
        return Err(format!("GET {url}: {status}"));
    }
    res.json::<T>().await.map_err(|e| format!("GET {url}: {e}"))
}

/// Saves steps that a discovery call ran in-process (async checkpointing, protocol §13.2).
///
/// `true` once the server has stored them. Anything else (a refused or stale call, a server
/// that does not checkpoint, a network error) is `false`, and the caller answers the classic
/// way instead, with the step in its 206 response; nothing is lost either way.
pub(crate) async fn checkpoint(client: &Client, run_id: &str, body: bytes::Bytes) -> bool {
    let url = format!("{}/v1/checkpoint/{run_id}/async", client.api_origin());
    let res = client
        .api_request(|http| {
            http.post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
        })
        .await;
    matches!(res, Ok(r) if r.status().is_success())
}
