//! The Inngest wire protocol: the types, hashes and signatures that both halves of Cairn
//! (the server and the Rust SDK) and the official SDKs agree on.
//!
//! Pure data and pure functions, no I/O. Section numbers in the docs refer to the project's
//! protocol reference. Parsing is tolerant in the way the official SDKs are (unknown fields
//! ignored); serialising writes the shapes the SDKs are known to accept.
//!
//! ```
//! use cairn_protocol::{step_id, Memo};
//! use serde_json::json;
//!
//! let id = step_id::hash("collect-data");
//! assert_eq!(id.len(), 40);
//! assert_eq!(Memo::from_value(json!({"data": "x"})), Memo::Data(json!("x")));
//! ```

pub mod call;
pub mod duration;
pub mod event;
pub mod function;
pub mod headers;
pub mod memo;
pub mod op;
pub mod signature;
pub mod step_id;
pub mod sync;

pub use call::{CallCtx, CallRequest, Stack, STEP_DISCOVERY};
pub use event::{Event, EventBatch, SendEventsReply};
pub use function::{FunctionConfig, Trigger};
pub use memo::Memo;
pub use op::{parse_ops, Op, Opcode, UserError, Userland};
pub use sync::{ErrorBody, InBandSyncResponse, Introspection, RegisterReply, RegisterRequest};

/// The sha1 id of the `RunComplete` op (`sha1("complete")`).
pub const RUN_COMPLETE_ID: &str = "0737c22d3bfae812339732d14d8c7dbd6dc4e09c";

/// Largest request body the server inlines; larger run state goes through `use_api` (§6.2).
pub const MAX_INLINE_BODY: usize = 4 * 1024 * 1024 - 1024;
