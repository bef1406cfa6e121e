//! The function from the founding report, inngest-js#1440: an hourly cron whose steps return
//! large data. On the TypeScript SDK each run's state stayed reachable after its request and
//! memory climbed 200–300 MB an hour. Here each request's state is gone once it is answered.
//!
//! ```sh
//! INNGEST_DEV=1 cargo run -p example-founding          # serves http://0.0.0.0:3000/api/inngest
//! ```
//!
//! Point a dev server (`cairn dev`, or Inngest's) at it, or let it sync with a `PUT`. Without
//! `INNGEST_DEV` the app runs in cloud mode and needs `INNGEST_SIGNING_KEY`.

use cairn_sdk::{Client, Ctx, Function};
use serde_json::{json, Value};

fn seed_cron(client: &Client) -> Function {
    client
        .function("seed-cron")
        .name("Seed (hourly)")
        .cron("0 * * * *")
        .event("demo/seed")
        .handler(|ctx: Ctx<Value>| async move {
            let step = ctx.step();
            // The big step output the report's memory staircase was made of.
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

#[tokio::main]
async fn main() {
    let client = match Client::from_env("founding") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("founding: {e}");
            std::process::exit(2);
        }
    };
    let functions = [seed_cron(&client)];
    let app = axum::Router::new().nest_service("/api/inngest", cairn_sdk::serve(client, functions));

    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_string());
    let addr = format!("0.0.0.0:{port}");
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("founding: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("founding: serving http://{addr}/api/inngest");
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("founding: server error: {e}");
        std::process::exit(1);
    }
}
