//! Header names used on the wire (§2 of the protocol reference). Lower-case, as `http` wants them.

pub const SIGNATURE: &str = "x-inngest-signature";
pub const SDK: &str = "x-inngest-sdk";
pub const REQ_VERSION: &str = "x-inngest-req-version";
pub const NO_RETRY: &str = "x-inngest-no-retry";
pub const RETRY_AFTER: &str = "retry-after";
pub const FRAMEWORK: &str = "x-inngest-framework";
pub const ENV: &str = "x-inngest-env";
pub const SERVER_KIND: &str = "x-inngest-server-kind";
pub const EXPECTED_SERVER_KIND: &str = "x-inngest-expected-server-kind";
pub const SYNC_KIND: &str = "x-inngest-sync-kind";
pub const RUN_ID: &str = "x-run-id";
pub const STEP_ID: &str = "x-inngest-step-id";
pub const REQUEST_ID: &str = "x-request-id";
pub const EVENT_ID_SEED: &str = "x-inngest-event-id-seed";
pub const SDK_HANDLED: &str = "x-inngest-sdk-handled";

/// Values of [`SYNC_KIND`]. Underscored, whatever the upstream spec says.
pub const SYNC_KIND_IN_BAND: &str = "in_band";
pub const SYNC_KIND_OUT_OF_BAND: &str = "out_of_band";
