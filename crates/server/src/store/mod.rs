//! The one owner of durable state.
//!
//! Everything the engine must not lose goes through [`Store`]. The trait speaks
//! in engine terms (events, runs, memoised steps, queue items, pauses) so that a
//! PostgreSQL implementation shared by several processes can sit behind it; no
//! SQL or SQLite type crosses it. Each mutating call is one atomic unit: when it
//! returns `Ok`, the change is durable.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

pub use postgres::{PgOptions, PostgresStore};
pub use sqlite::SqliteStore;

/// Errors surfaced by a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file is from a newer Cairn and must not be touched.
    #[error("database schema version {found} is newer than this build supports ({supported}); upgrade cairn")]
    SchemaTooNew {
        /// Version found in the file.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
    /// The database is unreadable, corrupt or locked.
    #[error("database unusable: {0}")]
    Unusable(String),
    /// A queue item's lease was lost (expired and taken, or the run ended);
    /// the caller's result must be dropped.
    #[error("lease lost on queue item {0}")]
    LeaseLost(String),
    /// Anything else from the backend.
    #[error("store backend error: {0}")]
    Backend(String),
}

/// Result alias for store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// Lifecycle state of a run, spelled like Inngest's v1 API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    /// Still executing (including sleeping or waiting).
    Running,
    /// Function returned.
    Completed,
    /// Function failed permanently.
    Failed,
    /// Cancelled by event, API or timeout.
    Cancelled,
}

impl RunStatus {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "Running",
            RunStatus::Completed => "Completed",
            RunStatus::Failed => "Failed",
            RunStatus::Cancelled => "Cancelled",
        }
    }

    /// Parse the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Running" => RunStatus::Running,
            "Completed" => RunStatus::Completed,
            "Failed" => RunStatus::Failed,
            "Cancelled" => RunStatus::Cancelled,
            _ => return None,
        })
    }
}

/// An event about to be stored.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Internal ULID; unique per accepted event.
    pub internal_id: String,
    /// The normalised event object (`name`, `data`, `user`, `id`, `ts`, `v?`).
    pub event: Value,
    /// Receipt time, unix ms.
    pub received_at: i64,
    /// For cron ticks and invocations: the one function this event starts.
    pub target_fn: Option<String>,
}

impl NewEvent {
    /// Its `name` field ("" if absent).
    pub fn name(&self) -> &str {
        self.event
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// This event as stored under sequence number `seq`.
    pub fn stored(&self, seq: i64) -> StoredEvent {
        StoredEvent {
            seq,
            internal_id: self.internal_id.clone(),
            name: self.name().to_string(),
            event: self.event.clone(),
            received_at: self.received_at,
            target_fn: self.target_fn.clone(),
        }
    }
}

/// Id of a run's start item, the first call (which flow control may delay or hold).
pub fn start_item_id(run_id: &str) -> String {
    format!("{run_id}:start")
}

/// What a commit that applied events left for the engine's loops to pick up, beyond the
/// items it leased to its caller. Each loop looks for work only when told to: a needless
/// look costs it a round trip to the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Left {
    /// Items the queue loop must claim: first calls of new runs not leased to the caller,
    /// steps of waits the events resumed.
    pub queue: bool,
    /// Events stored but not applied, waiting behind older ones of their name: the
    /// matcher's.
    pub matcher: bool,
}

impl Left {
    /// Everything may be left (what a caller assumes when it cannot tell).
    pub const ALL: Left = Left {
        queue: true,
        matcher: true,
    };
}

/// What applying one event did inside a backend's transaction.
#[derive(Debug, Default)]
pub(crate) struct EventApplied {
    /// Runs created.
    pub runs: Vec<String>,
    /// Pauses the event matched (waits resumed, runs cancelled): their items are new work.
    pub resumed: bool,
}

/// Whether the run `run_id` of `runs` starts with more items than its first call.
pub(crate) fn more_items(runs: &[NewRun], run_id: &str) -> bool {
    runs.iter()
        .find(|r| r.run_id == run_id)
        .is_none_or(|r| r.items.len() > 1)
}

/// What applying an event with these planned runs left for the queue loop, whether or not
/// the runs were created: work of other runs when any is under flow control, and the
/// pauses the event resumed.
pub(crate) fn left_for_queue(runs: &[NewRun], applied: &EventApplied) -> bool {
    applied.resumed || runs.iter().any(|r| !r.flow.is_none())
}

/// Id of the item that finalises an ended run (emits its lifecycle events).
pub fn finalize_item_id(run_id: &str) -> String {
    format!("{run_id}:finalize")
}

/// The item that finalises a run that ended at `now`.
pub(crate) fn finalize_item(run_id: &str, now: i64) -> NewItem {
    NewItem {
        id: finalize_item_id(run_id),
        run_id: run_id.to_string(),
        kind: ItemKind::Finalize,
        available_at: now,
        unless_memo: None,
    }
}

impl NewRun {
    /// When its start item is due (`now` if it has none).
    pub fn start_at(&self, now: i64) -> i64 {
        let id = start_item_id(&self.run_id);
        self.items
            .iter()
            .find(|i| i.id == id)
            .map_or(now, |i| i.available_at)
    }
}

/// Runs planned for an event before it had a sequence number, given the one it got: their
/// cancel rules start after it.
pub(crate) fn runs_after(runs: &[NewRun], seq: i64) -> Vec<NewRun> {
    let mut runs = runs.to_vec();
    for r in &mut runs {
        for p in &mut r.pauses {
            p.since_seq = seq;
        }
    }
    runs
}

/// An event as stored.
#[derive(Debug, Clone, Serialize)]
pub struct StoredEvent {
    /// Monotonic sequence number (arrival order).
    pub seq: i64,
    /// Internal ULID.
    pub internal_id: String,
    /// Event name.
    pub name: String,
    /// Full event object.
    pub event: Value,
    /// Receipt time, unix ms.
    pub received_at: i64,
    /// Function this event targets directly, if any.
    pub target_fn: Option<String>,
}

/// An app known from a sync.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppRecord {
    /// App id (`appName`).
    pub name: String,
    /// URL the app is served at.
    pub url: String,
    /// `sdk` field of the last sync.
    pub sdk: String,
    /// Checksum of the last sync body, to answer `modified`.
    pub checksum: String,
    /// Last sync time, unix ms.
    pub synced_at: i64,
}

/// A function as registered by an app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// Composite id / slug (`<app>-<fn>`).
    pub slug: String,
    /// Owning app.
    pub app: String,
    /// The FunctionConfig JSON exactly as synced.
    pub config: Value,
}

/// A run as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Run ULID.
    pub run_id: String,
    /// Function slug.
    pub fn_slug: String,
    /// Status.
    pub status: RunStatus,
    /// Triggering events (first is `event`).
    pub events: Vec<Value>,
    /// Execution version (`-1` undecided).
    pub version: i64,
    /// Whether the SDK must plan rather than run steps inline.
    pub disable_immediate: bool,
    /// Planned parallel steps not yet finished (version 2 coalescing).
    pub pending: Vec<String>,
    /// Output (Completed) or error (Failed/Cancelled).
    pub output: Option<Value>,
    /// Creation time, unix ms.
    pub created_at: i64,
    /// End time, unix ms.
    pub ended_at: Option<i64>,
}

/// A memoised step's value as RFC 8785 canonical JSON text.
///
/// This is how memos are stored and the exact bytes spliced into every later call request
/// ([`cairn_protocol::call::call_body`]): a step's output is canonicalised once, when it is
/// memoised, instead of being parsed, escaped and copied again on each call that carries
/// it, which for a megabyte output was most of the server's work per run.
///
/// ```
/// use cairn_server::store::MemoJson;
/// let memo = MemoJson::data(&serde_json::json!({"b": 2.0, "a": "x"}));
/// assert_eq!(memo.as_str(), r#"{"data":{"a":"x","b":2}}"#);
/// assert_eq!(memo.to_value()["data"]["b"], 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoJson(String);

impl MemoJson {
    /// The canonical text of `value`.
    pub fn new(value: &Value) -> Self {
        Self::from_canonical(cairn_protocol::signature::canonical_json(value))
    }

    /// `{"data": value}`, the memo of a step that returned `value`, without copying `value`
    /// into a wrapper first.
    pub fn data(value: &Value) -> Self {
        Self::wrapped("data", value)
    }

    /// `{"error": error}`, the memo of a step that failed for good.
    pub fn error(error: &Value) -> Self {
        Self::wrapped("error", error)
    }

    fn wrapped(key: &str, value: &Value) -> Self {
        // A one-key object of canonical text is canonical.
        let inner = cairn_protocol::signature::canonical_json(value);
        let mut out = Vec::with_capacity(inner.len() + key.len() + 5);
        out.extend_from_slice(b"{\"");
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(&inner);
        out.push(b'}');
        Self::from_canonical(out)
    }

    fn from_canonical(bytes: Vec<u8>) -> Self {
        // serde_jcs writes UTF-8 only; the fallback cannot be reached.
        Self(String::from_utf8(bytes).unwrap_or_else(|_| "null".into()))
    }

    /// Text a store reads back. Stores only ever write [`MemoJson`] text, and their schema
    /// migrations canonicalise the memos of runs written before memos were canonical.
    pub(crate) fn stored(text: String) -> Self {
        Self(text)
    }

    /// The canonical JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The memo parsed, for the places that look inside it (not the call path).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }
}

/// The canonical form of stored memo text, when it differs from the text: what the schema
/// migrations apply to memos written before they were stored canonical. `None` for text that
/// is canonical already or is not JSON (left alone).
pub(crate) fn recanonicalised(text: &str) -> Option<String> {
    let value: Value = serde_json::from_str(text).ok()?;
    let canonical = MemoJson::new(&value).0;
    (canonical != text).then_some(canonical)
}

/// What an SDK call reads before it is made.
#[derive(Debug, Clone)]
pub struct CallState {
    /// The run.
    pub run: Run,
    /// Its memoised steps in persistence order.
    pub steps: Vec<(String, MemoJson)>,
    /// Highest event sequence number committed when this was read: waits created by the
    /// call are matched against events after it.
    pub high_water: i64,
}

/// What a queue item asks the engine to do. Serialised into the item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ItemKind {
    /// Call the SDK. `step` None means discovery (`stepId=step`).
    Call {
        /// Targeted hashed step id.
        step: Option<String>,
        /// Hashed id of the step recorded as this call's predecessor.
        predecessor: Option<String>,
    },
    /// A sleep ended: memoise `null` under `step`, then discover.
    Wake {
        /// Hashed sleep step id.
        step: String,
    },
    /// A wait or invoke timed out.
    PauseTimeout {
        /// The pause to expire.
        pause_id: String,
        /// Hashed step id of the wait or invoke.
        step: String,
        /// True for invokes (memoise a timeout error instead of `null`).
        invoke: bool,
    },
    /// `timeouts.finish` elapsed.
    RunTimeout,
    /// The run ended without a call that carried its lifecycle events (a cancel, a timeout, a
    /// singleton replacing it): emit them.
    Finalize,
}

/// A queue item to create. Ids are deterministic so re-creating is a no-op.
#[derive(Debug, Clone)]
pub struct NewItem {
    /// Deterministic id: run + step hash + purpose.
    pub id: String,
    /// Owning run.
    pub run_id: String,
    /// What to do.
    pub kind: ItemKind,
    /// Earliest time to run, unix ms.
    pub available_at: i64,
    /// Skip creating if this step already has a memo (a planned step that
    /// finished through another path must not run twice).
    pub unless_memo: Option<String>,
}

/// A claimed queue item.
#[derive(Debug, Clone)]
pub struct QueueItem {
    /// Item id.
    pub id: String,
    /// Owning run.
    pub run_id: String,
    /// What to do.
    pub kind: ItemKind,
    /// 0-based attempt.
    pub attempt: i64,
    /// When it became available, unix ms.
    pub available_at: i64,
}

/// Why a pause exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseKind {
    /// `step.waitForEvent`.
    Wait,
    /// `step.invoke`, resumed by `inngest/function.finished`.
    Invoke,
    /// A `cancelOn` rule.
    Cancel,
}

/// A durable wait for an event.
#[derive(Debug, Clone, Serialize)]
pub struct Pause {
    /// Pause id.
    pub id: String,
    /// Owning run.
    pub run_id: String,
    /// Hashed step id being waited on (empty for cancel rules).
    pub step: String,
    /// Kind.
    pub kind: PauseKind,
    /// Event name that can resume it.
    pub event_name: String,
    /// CEL condition over `event` (run trigger) and `async` (candidate).
    pub expr: Option<String>,
    /// Invoke correlation id (`<runId>.<stepHash>`).
    pub correlation: Option<String>,
    /// The run's triggering event, for `event` in the condition.
    pub trigger: Value,
    /// Expiry, unix ms.
    pub expires_at: i64,
    /// Only events after this sequence number may resume it.
    pub since_seq: i64,
}

/// Decides whether an event resumes a pause. Implemented by the engine with CEL.
pub trait PauseMatcher: Send + Sync {
    /// True if `event` satisfies `pause`.
    fn matches(&self, pause: &Pause, event: &Value) -> bool;
}

/// What [`Store::watch_run`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// The run has ended, or does not exist: read it.
    Ended,
    /// The run is running and its end will be announced.
    Watched,
    /// The run is running a call leased to this process, and was not marked: this
    /// process's executor wakes the run's waiters when the run ends or leaves it (then they
    /// watch again), and an end committed elsewhere meanwhile is announced.
    Here,
}

/// What the [`Store::run_ends`] feed carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// This run ended.
    Ended(String),
    /// Every end is announced from now on.
    Announcing,
    /// Ends go unannounced (a lost connection) until the next [`RunEnd::Announcing`].
    Unannounced,
}

/// A run to create from an event (idempotent on `fn_slug` + `idem_key`).
#[derive(Debug, Clone)]
pub struct NewRun {
    /// Run ULID.
    pub run_id: String,
    /// Function slug.
    pub fn_slug: String,
    /// Idempotency key (event id, cron time).
    pub idem_key: String,
    /// Triggering events.
    pub events: Vec<Value>,
    /// Internal id of the first triggering event, for event→runs lookups.
    pub trigger_internal_id: String,
    /// Creation time.
    pub created_at: i64,
    /// First items (discovery call, finish timeout).
    pub items: Vec<NewItem>,
    /// Cancellation pauses.
    pub pauses: Vec<Pause>,
    /// Flow control the store enforces atomically with creating the run.
    pub flow: RunFlow,
}

/// A concurrency limit resolved for one run: at most `limit` holders of `key` at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Scope-qualified key (`f:<slug>:<value>`, `e:<value>`, `a:<value>`).
    pub key: String,
    /// Most holders at once.
    pub limit: u32,
}

/// A generic cell rate (GCRA) limit resolved for one run: `limit` per `period_ms`, with
/// `burst` extra allowed at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gcra {
    /// Function- and kind-qualified key.
    pub key: String,
    /// Admissions per period.
    pub limit: u32,
    /// Period, ms.
    pub period_ms: i64,
    /// Extra admissions allowed at once.
    pub burst: u32,
}

impl Gcra {
    /// Emission interval: the spacing between admissions at the steady rate.
    pub fn interval(&self) -> i64 {
        (self.period_ms / i64::from(self.limit.max(1))).max(1)
    }

    /// Throttle: given the stored theoretical arrival time (`None` = never used), when may a
    /// run arriving `now` start, and what is the new theoretical arrival time.
    pub fn delay(&self, tat: Option<i64>, now: i64) -> (i64, i64) {
        let t = self.interval();
        let tat = tat.unwrap_or(now).max(now);
        let start = now.max(tat - i64::from(self.burst) * t);
        (start, tat.max(start) + t)
    }

    /// Rate limit: whether a run arriving `now` may start (`Some(new tat)`) or is dropped.
    /// Up to `limit` runs fit in any window of `period_ms`.
    pub fn admit(&self, tat: Option<i64>, now: i64) -> Option<i64> {
        let t = self.interval();
        let tolerance = self.period_ms - t;
        let tat = tat.unwrap_or(now).max(now);
        (now >= tat - tolerance).then_some(tat + t)
    }
}

/// Why a would-be run was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// `rateLimit` exceeded.
    RateLimit,
    /// `idempotency` key already used within 24 h.
    Idempotency,
    /// `singleton` in skip mode with a run already going.
    Singleton,
}

impl SkipReason {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::RateLimit => "rate_limit",
            SkipReason::Idempotency => "idempotency",
            SkipReason::Singleton => "singleton",
        }
    }

    /// Parse the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "rate_limit" => SkipReason::RateLimit,
            "idempotency" => SkipReason::Idempotency,
            "singleton" => SkipReason::Singleton,
            _ => return None,
        })
    }
}

/// Flow control for one would-be run, with every key expression already evaluated against
/// its event (see `flow::plan`). The default is "no flow control".
#[derive(Debug, Clone, Default)]
pub struct RunFlow {
    /// Step concurrency limits (at most two); carried by every SDK call of the run.
    pub concurrency: Vec<Slot>,
    /// Run concurrency limit (`concurrency.fn`): held from the run's first call to its end.
    pub run_slot: Option<Slot>,
    /// Delay the start to respect a throttle.
    pub throttle: Option<Gcra>,
    /// Drop the run if the limit is used up.
    pub rate_limit: Option<(Gcra, SkipReason)>,
    /// At most one running run per key: `(key, cancel_running)`.
    pub singleton: Option<(String, bool)>,
    /// Start `period_ms` after the last event for `key`.
    pub debounce: Option<Debounce>,
    /// Collect events for `key` into one run.
    pub batch: Option<Batch>,
    /// Milliseconds to move the start ahead (positive) or behind in the queue.
    pub priority_ms: i64,
}

impl RunFlow {
    /// No flow control at all. Admitting a run under flow control may change other runs'
    /// items (a full batch starts, a singleton cancels the running one), which only the
    /// queue loop then finds.
    pub fn is_none(&self) -> bool {
        self.concurrency.is_empty()
            && self.run_slot.is_none()
            && self.throttle.is_none()
            && self.rate_limit.is_none()
            && self.singleton.is_none()
            && self.debounce.is_none()
            && self.batch.is_none()
            && self.priority_ms == 0
    }
}

/// A debounce resolved for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debounce {
    /// Evaluated key.
    pub key: String,
    /// Quiet period, ms.
    pub period_ms: i64,
    /// Longest delay after the first event, ms.
    pub timeout_ms: Option<i64>,
    /// The event's `ts`: the latest one wins.
    pub ts: i64,
}

/// A batch resolved for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Evaluated key.
    pub key: String,
    /// Events that close the batch at once.
    pub max_size: u32,
    /// Longest wait after the first event, ms.
    pub timeout_ms: i64,
}

/// A dropped run, as recorded for operators.
#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    /// Function slug.
    pub fn_slug: String,
    /// Why.
    pub reason: SkipReason,
    /// When, unix ms.
    pub at: i64,
}

/// Why a queue item is not running yet (introspection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Hold {
    /// A concurrency limit is full.
    Concurrency {
        /// The full key.
        key: String,
        /// Its limit.
        limit: u32,
        /// Holders now.
        in_progress: i64,
    },
    /// Delayed by a throttle.
    Throttle,
    /// Waiting for the debounce period to pass.
    Debounce,
    /// Waiting for the batch to fill or time out.
    Batch,
    /// Due later (sleep, retry backoff).
    Scheduled,
}

/// One queue item of a run, for introspection.
#[derive(Debug, Clone, Serialize)]
pub struct QueueInfo {
    /// Item id.
    pub id: String,
    /// What it does.
    pub kind: ItemKind,
    /// Earliest start, unix ms.
    pub available_at: i64,
    /// 0-based attempt.
    pub attempt: i64,
    /// Being handled by a worker now.
    pub leased: bool,
    /// What holds it, if anything.
    pub waiting_on: Option<Hold>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Finish {
    /// Final status (not Running).
    pub status: RunStatus,
    /// Output for Completed, error object otherwise.
    pub output: Value,
}

/// All writes that result from handling one queue item, applied atomically.
///
/// Applying it is conditional on `item` still being leased by `owner`, so a
/// worker whose lease expired (or whose run was cancelled) cannot apply stale
/// results.
#[derive(Debug, Default, Clone)]
pub struct Apply {
    /// The item that was handled and the lease owner; deleted on success.
    pub item: Option<(String, String)>,
    /// Run to touch.
    pub run_id: String,
    /// Memos to save (first write wins), in persistence order.
    pub memos: Vec<(String, MemoJson)>,
    /// New queue items.
    pub enqueue: Vec<NewItem>,
    /// Instead of deleting `item`, re-arm it with a new attempt at a time.
    pub retry: Option<(i64, i64)>,
    /// New pauses (waits, invokes); matched immediately against events that
    /// arrived since `since_seq` so no event slips between call and pause.
    pub pauses: Vec<(Pause, NewItem)>,
    /// Events to emit (invocations), applied later by the matcher.
    pub events: Vec<NewEvent>,
    /// Events to store and apply in this commit, each with the runs planned for it (as
    /// [`Store::insert_and_apply`] does for ingested events), so no matcher has to pick them
    /// up: finalisation's lifecycle events. One behind an older unapplied event of its name
    /// is only stored, and the matcher applies both in order.
    pub apply_events: Vec<(NewEvent, Vec<NewRun>)>,
    /// Record the SDK's execution version if still undecided.
    pub version: Option<i64>,
    /// Set `disable_immediate_execution`.
    pub disable_immediate: Option<bool>,
    /// Steps planned in parallel (version 2 coalescing).
    pub add_pending: Vec<String>,
    /// Steps finished: drop them from pending; when none are left (or they
    /// were not pending), create this discovery item.
    pub complete_pending: Option<(Vec<String>, NewItem)>,
    /// Expire a pause: if it still exists, memoise the value and enqueue the item.
    pub expire_pause: Option<(String, MemoJson, NewItem)>,
    /// End the run (only if still running).
    pub finish: Option<Finish>,
    /// The run's lifecycle events, built along with `finish` by a caller that has the run
    /// at hand: when `finish` ends the run, they are stored and applied in this commit (as
    /// `apply_events` are) and no finalisation item is queued. `None` queues finalisation,
    /// which builds them from the stored run.
    pub lifecycle: Option<Vec<(NewEvent, Vec<NewRun>)>>,
    /// Reset this queue item's attempt counter (a checkpoint proved progress).
    pub reset_attempt: Option<String>,
    /// Apply only if this queue item still exists with this `available_at`,
    /// i.e. the dispatch that sent the data is still the current one.
    pub dispatch: Option<(String, i64)>,
}

/// Durable state behind Cairn. See the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Store accepted events; returns their sequence numbers. Durable on return.
    async fn insert_events(&self, events: Vec<NewEvent>) -> StoreResult<Vec<i64>>;
    /// Events not yet matched, oldest first.
    async fn unprocessed_events(&self, limit: usize) -> StoreResult<Vec<StoredEvent>>;
    /// Highest event sequence number committed so far.
    async fn event_high_water(&self) -> StoreResult<i64>;
    /// Atomically: create runs (idempotently), resume/cancel matching pauses,
    /// and mark the event processed. Returns ids of runs actually created.
    async fn apply_event(
        &self,
        event: StoredEvent,
        runs: Vec<NewRun>,
        extra_events: Vec<NewEvent>,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
    ) -> StoreResult<Vec<String>>;
    /// Store accepted events and, in the same commit, apply each with the runs planned for
    /// it (as [`Store::apply_event`] would), saving the matcher a round trip; then lease up
    /// to `lease.2` of the new runs' first calls to `lease.0` until `lease.1`, as
    /// [`Store::apply_and_continue`] does. Returns the leased items and what the commit
    /// [`Left`] to others: events left unapplied (a backlog of older events goes first, or
    /// the backend does not do this) are the matcher's.
    async fn insert_and_apply(
        &self,
        events: Vec<(NewEvent, Vec<NewRun>)>,
        _matcher: Arc<dyn PauseMatcher>,
        _now: i64,
        _lease: (String, i64, usize),
    ) -> StoreResult<(Vec<QueueItem>, Left)> {
        self.insert_events(events.into_iter().map(|(e, _)| e).collect())
            .await?;
        Ok((
            Vec::new(),
            Left {
                queue: false,
                matcher: true,
            },
        ))
    }
    /// Look up an event by internal id or user id.
    async fn get_event(&self, id: &str) -> StoreResult<Option<StoredEvent>>;
    /// Most recent events, newest first.
    async fn list_events(
        &self,
        limit: usize,
        name: Option<String>,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// Runs started by an event (internal id), including batches it joined.
    async fn runs_for_event(&self, internal_id: &str) -> StoreResult<Vec<Run>>;
    /// Runs flow control dropped for an event (internal id).
    async fn skips_for_event(&self, internal_id: &str) -> StoreResult<Vec<Skip>>;
    /// The queue items of a run and what holds each (introspection).
    async fn run_queue(&self, run_id: &str, now: i64) -> StoreResult<Vec<QueueInfo>>;

    /// Upsert an app and its functions; functions of the app not listed are
    /// removed. Returns whether anything changed.
    async fn sync_app(&self, app: AppRecord, functions: Vec<FunctionRecord>) -> StoreResult<bool>;
    /// All apps.
    async fn apps(&self) -> StoreResult<Vec<AppRecord>>;
    /// All live functions.
    async fn functions(&self) -> StoreResult<Vec<FunctionRecord>>;

    /// A run.
    async fn get_run(&self, run_id: &str) -> StoreResult<Option<Run>>;
    /// Memoised steps of a run in persistence order.
    async fn steps(&self, run_id: &str) -> StoreResult<Vec<(String, MemoJson)>>;
    /// Everything an SDK call needs, read together: the run, its memos and the event high
    /// water mark. Backends override this to answer in one round trip.
    async fn call_state(&self, run_id: &str) -> StoreResult<Option<CallState>> {
        let Some(run) = self.get_run(run_id).await? else {
            return Ok(None);
        };
        let steps = self.steps(run_id).await?;
        let high_water = self.event_high_water().await?;
        Ok(Some(CallState {
            run,
            steps,
            high_water,
        }))
    }
    /// Apply the results of handling a queue item. See [`Apply`]. When it ends the run, the
    /// caller tells this process's waiters itself: the [`Store::run_ends`] feed of a shared
    /// store carries that end only to the other processes that [watch](Store::watch_run) it.
    async fn apply(
        &self,
        apply: Apply,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
    ) -> StoreResult<()>;
    /// [`Store::apply`], then, in the same transaction, lease the run's next due item to
    /// `owner` so the caller can go straight on with the run: one commit per step instead of
    /// an apply and a claim. Items under concurrency limits are left to the claim path. A
    /// backend without this answers `None` and the item is claimed as usual. Also returns
    /// what applying [`Apply::apply_events`] [`Left`] to others (the rest of the apply the
    /// caller can tell from what it asked for).
    async fn apply_and_continue(
        &self,
        apply: Apply,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
        _owner: &str,
        _lease_until: i64,
    ) -> StoreResult<(Option<QueueItem>, Left)> {
        self.apply(apply, matcher, now).await?;
        Ok((None, Left::ALL))
    }
    /// Cancel a running run (API). Returns false if it was not running. Its end is announced
    /// on the [`Store::run_ends`] feed to every process watching the run, this one included.
    async fn cancel_run(&self, run_id: &str, now: i64) -> StoreResult<bool>;
    /// Runs as they end ([`RunEnd`]), whichever process sharing the store ended them, so that a
    /// `wait_ms` request held by this node hears of an end committed by another. Only ends of
    /// runs this process [watches](Store::watch_run) are announced, and of those not the ones
    /// this process's executor committed (it tells its waiters itself). `None` for a backend
    /// one process owns (its executor reports every end itself). The channel is bounded: a
    /// receiver that falls behind loses ids, and waiters fall back to re-reading.
    fn run_ends(&self) -> Option<tokio::sync::broadcast::Receiver<RunEnd>> {
        None
    }
    /// Ask for the run's end to be announced on this process's [`Store::run_ends`] feed,
    /// whichever process ends it; `owner` is this process's lease owner. A `wait_ms` request
    /// calls this after registering its waiter, in place of re-reading the run: an end
    /// committed before the watch is seen by it, one committed after is announced (see
    /// [`Watch`] for the one exception).
    ///
    /// Announcing only watched ends keeps a shared store from waking every node for every
    /// run that ends. The default, for a backend one process owns, only reads the run.
    async fn watch_run(&self, run_id: &str, _owner: &str) -> StoreResult<Watch> {
        Ok(match self.get_run(run_id).await? {
            Some(r) if r.status == RunStatus::Running => Watch::Watched,
            _ => Watch::Ended,
        })
    }

    /// Lease up to `limit` due items to `owner` until `lease_until`.
    async fn claim(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> StoreResult<Vec<QueueItem>>;
    /// [`claim`](Store::claim), and when fewer than `limit` items came back,
    /// [`next_due`](Store::next_due): what the queue loop asks each time it wakes. A backend
    /// that answers both in one round trip may leave out of the second items due now that
    /// another process is claiming.
    async fn claim_next(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> StoreResult<(Vec<QueueItem>, Option<i64>)> {
        let items = self.claim(owner, now, lease_until, limit).await?;
        let next = if items.len() < limit {
            self.next_due().await?
        } else {
            None
        };
        Ok((items, next))
    }
    /// Extend the leases of `ids` that `owner` still holds, and return those ids: an id left
    /// out was taken over by another process (its lease had lapsed), has gone, or (on
    /// PostgreSQL) was being changed by another transaction at that moment and is left to the
    /// next renewal.
    async fn renew(
        &self,
        owner: &str,
        ids: Vec<String>,
        lease_until: i64,
    ) -> StoreResult<Vec<String>>;
    /// Give an item back without changing its attempt (shutdown).
    async fn release(&self, owner: &str, id: &str) -> StoreResult<()>;
    /// Earliest time any item becomes claimable (due or lease expiry).
    async fn next_due(&self) -> StoreResult<Option<i64>>;
    /// Number of items in the queue.
    async fn queue_depth(&self) -> StoreResult<i64>;

    /// Retention: delete runs that ended before `before` (with their steps) and
    /// processed events received before it. Returns (runs, events) deleted.
    async fn prune(&self, before: i64) -> StoreResult<(u64, u64)>;

    /// Last fired cron tick per (function, schedule), unix ms.
    async fn cron_last(&self, fn_slug: &str, schedule: &str) -> StoreResult<Option<i64>>;
    /// Atomically record a cron tick and store its event (`None` only records
    /// the starting point). Returns false if this or a later tick was already
    /// recorded (another process or an earlier life fired it).
    async fn fire_cron(
        &self,
        fn_slug: &str,
        schedule: &str,
        tick: i64,
        event: Option<NewEvent>,
    ) -> StoreResult<bool>;
}

/// The `inngest/function.finished` event that fails the invoke which sent `trigger`, so the
/// caller's `step.invoke` fails at once instead of waiting for its timeout. `None` when
/// `trigger` is not an invocation.
pub fn failed_invoke_event(
    fn_slug: &str,
    trigger: &Value,
    message: &str,
    status: &str,
    now: i64,
) -> Option<NewEvent> {
    let corr = trigger
        .pointer("/data/_inngest/correlation_id")
        .and_then(Value::as_str)?;
    Some(NewEvent {
        internal_id: ulid::Ulid::new().to_string(),
        event: serde_json::json!({
            "name": "inngest/function.finished",
            "id": ulid::Ulid::new().to_string(),
            "ts": now,
            "user": {},
            "data": {
                "function_id": fn_slug,
                "correlation_id": corr,
                "error": {"name": "Error", "message": message, "error": format!("Error: {message}")},
                "_inngest": {"status": status},
            }
        }),
        received_at: now,
        target_fn: None,
    })
}

/// [`failed_invoke_event`] for an invocation flow control dropped.
pub fn skipped_invoke_event(
    fn_slug: &str,
    trigger: &Value,
    reason: SkipReason,
    now: i64,
) -> Option<NewEvent> {
    let message = format!("function {fn_slug} was not started: {}", reason.as_str());
    failed_invoke_event(fn_slug, trigger, &message, "Skipped", now)
}

/// The memo a resumed pause stores, shared by all store implementations.
pub fn resume_memo(pause: &Pause, event: &Value) -> MemoJson {
    match pause.kind {
        PauseKind::Invoke => {
            let data = event.get("data").unwrap_or(&Value::Null);
            match data.get("error") {
                Some(err) if !err.is_null() => MemoJson::error(err),
                _ => MemoJson::data(data.get("result").unwrap_or(&Value::Null)),
            }
        }
        _ => MemoJson::new(event),
    }
}
