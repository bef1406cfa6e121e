//! Every step tool in one order-fulfilment workflow.
//!
//! ```sh
//! INNGEST_DEV=1 cargo run -p example-step-tools        # serves http://0.0.0.0:3000/api/inngest
//! ```
//!
//! Send `shop/order.placed` with `{"order_id": "o-1", "items": ["a", "b"]}` to start a run,
//! and `shop/order.approved` with the same `order_id` to let it through the approval wait.

use std::time::Duration;

use cairn_sdk::{Client, Ctx, Error, Event, Function, Invoke, Wait};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    order_id: String,
    #[serde(default)]
    items: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Approval {
    order_id: String,
    approver: String,
}

/// Prices one item; invoked by the workflow, also usable on its own.
fn price_item(client: &Client) -> Function {
    client
        .function("price-item")
        .event("shop/price.requested")
        .handler(|ctx: Ctx<Value>| async move {
            let item = ctx.event.data["item"].as_str().unwrap_or("").to_string();
            let step = ctx.step();
            let cents: u64 = step
                .run("look-up", move || async move {
                    Ok(100 + item.len() as u64 * 25)
                })
                .await?;
            Ok(json!(cents))
        })
}

fn fulfil(client: &Client, pricer: &Function) -> Function {
    let pricer = pricer.clone();
    client
        .function("fulfil-order")
        .event("shop/order.placed")
        .retries(5)
        .handler(move |ctx: Ctx<Order>| {
            let pricer = pricer.clone();
            async move {
                let order = ctx.event.data.clone();
                let step = ctx.step();

                // run: a typed, memoised result.
                let reserved: Vec<String> = step
                    .run("reserve-stock", {
                        let items = order.items.clone();
                        || async move { Ok(items) }
                    })
                    .await?;

                // Parallel steps: plain futures combinators; a repeated id gets `:n` suffixes.
                let labels = futures::future::join_all(reserved.iter().map(|item| {
                    let item = item.clone();
                    step.run("label", move || async move { Ok(format!("label:{item}")) })
                }))
                .await
                .into_iter()
                .collect::<Result<Vec<String>, Error>>()?;

                // invoke: call another function and get its output.
                let mut total = 0u64;
                for item in &reserved {
                    total += step
                        .invoke_with::<u64>(
                            "price",
                            Invoke::new(&pricer)
                                .data(json!({ "item": item }))
                                .timeout(Duration::from_secs(600)),
                        )
                        .await?;
                }

                // wait_for_event: None if nobody approves within a day.
                let approval = step
                    .wait_for_event::<Approval>(
                        "await-approval",
                        Wait::event("shop/order.approved")
                            .matching("data.order_id")
                            .timeout(Duration::from_secs(24 * 3600)),
                    )
                    .await?;
                let Some(approval) = approval else {
                    return Err(Error::non_retriable(format!(
                        "order {} was never approved",
                        order.order_id
                    )));
                };

                // sleep and sleep_until: durable pauses.
                // COOL_OFF_SECS shortens it for tests and demos.
                step.sleep("cool-off", cool_off()).await?;
                let tomorrow = chrono::Utc::now() + chrono::Duration::days(1);
                if ctx.event.data.items.len() > 10 {
                    step.sleep_until("wait-for-bulk-window", tomorrow).await?;
                }

                // send_event: durable fan-out.
                let sent = step
                    .send_event(
                        "notify",
                        Event::new(
                            "shop/order.fulfilled",
                            json!({ "order_id": order.order_id, "total_cents": total }),
                        ),
                    )
                    .await?;

                Ok(json!({
                    "order_id": order.order_id,
                    "labels": labels,
                    "total_cents": total,
                    "approved_by": approval.data.approver,
                    "event_ids": sent.ids,
                }))
            }
        })
}

/// The cool-off pause: `COOL_OFF_SECS`, default one minute.
fn cool_off() -> Duration {
    let secs = std::env::var("COOL_OFF_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

#[tokio::main]
async fn main() {
    let client = match Client::from_env("step-tools") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("step-tools: {e}");
            std::process::exit(2);
        }
    };
    let pricer = price_item(&client);
    let functions = [fulfil(&client, &pricer), pricer];
    let app = axum::Router::new().nest_service("/api/inngest", cairn_sdk::serve(client, functions));

    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_string());
    let addr = format!("0.0.0.0:{port}");
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("step-tools: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("step-tools: serving http://{addr}/api/inngest");
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("step-tools: server error: {e}");
        std::process::exit(1);
    }
}
