//! # cairn-sdk
//!
//! Durable step functions in Rust, served from axum and driven by Cairn or any Inngest
//! server. A function is ordinary async Rust; its *steps* are memoised by the server, so a
//! function survives crashes, retries failed steps on their own, sleeps for days and waits
//! for events.
//!
//! ```
//! use cairn_sdk::{Client, Ctx};
//! use serde_json::{json, Value};
//!
//! let client = Client::builder("my-app").dev(true).build().unwrap();
//!
//! let seed = client
//!     .function("seed-cron")
//!     .cron("0 * * * *")
//!     .event("demo/seed")
//!     .retries(3)
//!     .handler(|ctx: Ctx<Value>| async move {
//!         let step = ctx.step();
//!         let big: String = step.run("collect-data", || async { Ok("x".repeat(1_000_000)) }).await?;
//!         let digest: String = step.run("digest", || async move { Ok(big[..100].to_string()) }).await?;
//!         step.run("finalize", || async { Ok(json!({ "done": true })) }).await?;
//!         Ok(json!({ "len": digest.len() }))
//!     });
//!
//! let app: axum::Router = axum::Router::new()
//!     .nest_service("/api/inngest", cairn_sdk::serve(client, [seed]));
//! ```
//!
//! ## How a run executes
//!
//! The server calls the app, which replays the function from the top: steps that already
//! ran return their memoised output at once, and the first new step is either run on the
//! spot or, with parallel steps, reported for the server to schedule. Step ids must
//! therefore be deterministic; loops may reuse an id.
//!
//! A step run on the spot is saved to the server before the function goes on. When the
//! server offers checkpointing (Cairn and Inngest do), the SDK saves it with a checkpoint
//! request and carries on to the next step in the same call, so a run of sequential steps
//! takes one call; otherwise (or with [`FunctionBuilder::checkpointing`]`(false)`) the call
//! answers with the step's output and the server calls again for the next one. A call hands
//! the run back to the server after [`ServeOptions::checkpoint_max_runtime`] (10 s, as in
//! the JS SDK).
//!
//! ## Memory
//!
//! Everything a run needs during a request is owned by that request. The handler's future is
//! dropped the moment the answer is decided (Rust cancellation, not a parked promise), and the
//! [`Step`] handles given to user code are weak: one kept after the request pins a few dozen
//! bytes and answers [`Error::RunFinished`]. The crate's leak tests drive the founding
//! function a thousand times under a counting allocator to hold it to that.

mod api;
mod client;
mod ctx;
mod engine;
mod error;
mod event;
mod function;
mod serve;
mod step;

pub use client::{Client, ClientBuilder, ConfigError, Mode, SDK_HEADER, SDK_LANGUAGE, SDK_VERSION};
pub use ctx::Ctx;
pub use error::{Error, StepError, UserError};
pub use event::{Event, FunctionFailed, IntoEvents, SendEventResult};
pub use function::{
    Batch, CancelOn, Concurrency, Debounce, Function, FunctionBuilder, FunctionRef, RateLimit,
    Scope, SingletonMode, Throttle,
};
pub use serve::{serve, serve_with, ServeOptions};
pub use step::{AsyncStep, Invoke, RunStep, SendEventStep, Step, Wait};

/// The wire protocol crate, for callers who need raw types (ops, call requests).
pub use cairn_protocol as protocol;
