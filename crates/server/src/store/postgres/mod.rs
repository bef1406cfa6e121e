//! PostgreSQL implementation of [`Store`], for one or several `cairn` processes sharing a
//! database.
//!
//! Every mutating call is one transaction at READ COMMITTED with the server's default
//! `synchronous_commit`, so an `Ok` means the change is on the server's disk. Several
//! processes may call any method at the same time; what the SQLite store gets from its single
//! writer thread is rebuilt here from locks:
//!
//! * **Queue items** are claimed with `FOR UPDATE SKIP LOCKED` and leased (`due_at` holds
//!   the lease expiry), so two nodes never take the same item and an expired lease is
//!   simply due again. A result is applied only while its lease is still held.
//! * **Concurrency limits**: claiming takes a transaction-scoped advisory lock per key
//!   before counting holders, so two nodes cannot both take a key's last slot.
//! * **Waits**: matching an event against pauses takes an advisory lock on the event name in
//!   shared mode and inserting a pause takes it exclusively, so a pause and an event always
//!   see each other while events of one name still apply side by side (see
//!   [`Store::event_high_water`] on this type for how "after the wait started" is decided).
//!   Cancel rules, created with their run, are also checked against later events another
//!   node may already have matched.
//! * **Runs** are unique on `(function, idempotency key)`; an event is matched at most once
//!   (re-checked under its name lock), and each run's row is locked before it is read and
//!   changed.
//! * **Flow-control state** (GCRA, debounce, batch, singleton) is read and written under an
//!   advisory lock on its key.
//! * **Cron**: a conditional upsert fires each tick exactly once.
//!
//! Deadlocks and serialisation failures, which lock ordering makes rare but cannot rule
//! out across tables, roll the transaction back and run it again.

use super::*;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime,
};
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

mod flow;
mod tls;

/// Schema version this build writes, stored in the `schema_version` table.
pub const SCHEMA_VERSION: i64 = 4;

/// Schema steps: `MIGRATIONS[v]` takes a version-`v` database to version `v + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4];

/// Version 2: unapplied events by name, for the check that an event applied in the commit
/// that stores it does not overtake an older one of its name (`events_name` would walk the
/// name's whole history).
const SCHEMA_V2: &str = "CREATE INDEX events_unprocessed_name ON events(name) WHERE NOT processed;";

/// Version 3 changes no tables: memos are stored as canonical JSON from now on, and
/// [`canonicalise_live_memos`] rewrites those of runs still going, the only ones that will
/// be sent to an SDK again.
const SCHEMA_V3: &str = "";

/// Version 4: which node waits for a run's end (see [`Store::watch_run`]), so that only the
/// ends somebody elsewhere waits for are announced to the other nodes.
const SCHEMA_V4: &str = "ALTER TABLE runs ADD COLUMN IF NOT EXISTS watched_by TEXT;";

/// [`SCHEMA_V4`]'s `watched_by` when more than one node watches: never a node's id.
const WATCHED_BY_SEVERAL: &str = "*";

/// Rewrites, as canonical JSON, the memos of running runs written before version 3, so that
/// the call requests they are spliced into stay canonical (the bytes that get signed).
async fn canonicalise_live_memos<C: GenericClient>(c: &C) -> Result<(), tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT s.seq, s.memo FROM steps s JOIN runs r ON r.run_id = s.run_id
             WHERE r.status = 'Running'",
            &[],
        )
        .await?;
    for row in rows {
        let (seq, memo): (i64, &str) = (row.get(0), row.get(1));
        if let Some(canonical) = recanonicalised(memo) {
            c.execute("UPDATE steps SET memo=$1 WHERE seq=$2", &[&canonical, &seq])
                .await?;
        }
    }
    Ok(())
}

const SCHEMA_V1: &str = r#"
CREATE TABLE apps(
  name TEXT PRIMARY KEY, url TEXT NOT NULL, sdk TEXT NOT NULL,
  checksum TEXT NOT NULL, synced_at BIGINT NOT NULL);
CREATE TABLE functions(
  slug TEXT PRIMARY KEY, app TEXT NOT NULL, config TEXT NOT NULL);
CREATE TABLE events(
  seq BIGSERIAL PRIMARY KEY, internal_id TEXT NOT NULL UNIQUE,
  user_id TEXT, name TEXT NOT NULL, body TEXT NOT NULL, received_at BIGINT NOT NULL,
  target_fn TEXT, processed BOOLEAN NOT NULL DEFAULT false,
  xid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint));
CREATE INDEX events_unprocessed ON events(seq) WHERE NOT processed;
CREATE INDEX events_name ON events(name, seq);
CREATE INDEX events_name_xid ON events(name, xid);
CREATE INDEX events_user_id ON events(user_id);
CREATE TABLE runs(
  run_id TEXT PRIMARY KEY, fn_slug TEXT NOT NULL, idem_key TEXT NOT NULL,
  trigger_event TEXT NOT NULL, status TEXT NOT NULL, events TEXT NOT NULL,
  version BIGINT NOT NULL DEFAULT -1, disable_immediate BOOLEAN NOT NULL DEFAULT false,
  pending TEXT NOT NULL DEFAULT '[]', output TEXT, created_at BIGINT NOT NULL,
  ended_at BIGINT,
  ck1 TEXT, cl1 BIGINT, ck2 TEXT, cl2 BIGINT,
  run_slot TEXT, started BOOLEAN NOT NULL DEFAULT true, singleton_key TEXT,
  UNIQUE(fn_slug, idem_key));
CREATE INDEX runs_trigger ON runs(trigger_event);
CREATE INDEX runs_ended ON runs(ended_at) WHERE status <> 'Running';
CREATE INDEX runs_singleton ON runs(fn_slug, singleton_key)
  WHERE singleton_key IS NOT NULL AND status = 'Running';
CREATE INDEX runs_slot ON runs(run_slot)
  WHERE run_slot IS NOT NULL AND status = 'Running' AND started;
CREATE TABLE steps(
  seq BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL, hash TEXT NOT NULL,
  memo TEXT NOT NULL, UNIQUE(run_id, hash));
CREATE TABLE queue(
  id TEXT PRIMARY KEY, run_id TEXT NOT NULL, kind TEXT NOT NULL,
  available_at BIGINT NOT NULL, due_at BIGINT NOT NULL, attempt BIGINT NOT NULL DEFAULT 0,
  lease_owner TEXT,
  ck1 TEXT, cl1 BIGINT, ck2 TEXT, cl2 BIGINT, rk TEXT, rl BIGINT,
  blocked_on TEXT, hold TEXT);
CREATE INDEX queue_due ON queue(due_at) WHERE blocked_on IS NULL;
CREATE INDEX queue_run ON queue(run_id);
CREATE INDEX queue_ck1 ON queue(ck1, due_at) WHERE ck1 IS NOT NULL AND lease_owner IS NOT NULL;
CREATE INDEX queue_ck2 ON queue(ck2, due_at) WHERE ck2 IS NOT NULL AND lease_owner IS NOT NULL;
CREATE INDEX queue_blocked ON queue(blocked_on, due_at) WHERE blocked_on IS NOT NULL;
CREATE TABLE pauses(
  id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step TEXT NOT NULL, kind TEXT NOT NULL,
  event_name TEXT NOT NULL, expr TEXT, correlation TEXT, trigger_event TEXT NOT NULL,
  expires_at BIGINT NOT NULL, since_seq BIGINT NOT NULL);
CREATE INDEX pauses_event ON pauses(event_name);
CREATE INDEX pauses_corr ON pauses(correlation) WHERE correlation IS NOT NULL;
CREATE INDEX pauses_run ON pauses(run_id);
CREATE TABLE cron(
  fn_slug TEXT NOT NULL, schedule TEXT NOT NULL, last_tick BIGINT NOT NULL,
  PRIMARY KEY(fn_slug, schedule));
CREATE TABLE gcra(key TEXT PRIMARY KEY, tat BIGINT NOT NULL);
CREATE TABLE debounces(
  fn_slug TEXT NOT NULL, key TEXT NOT NULL, run_id TEXT NOT NULL,
  first_at BIGINT NOT NULL, ts BIGINT NOT NULL, PRIMARY KEY(fn_slug, key));
CREATE INDEX debounces_run ON debounces(run_id);
CREATE TABLE batches(
  fn_slug TEXT NOT NULL, key TEXT NOT NULL, run_id TEXT NOT NULL,
  size BIGINT NOT NULL, PRIMARY KEY(fn_slug, key));
CREATE INDEX batches_run ON batches(run_id);
CREATE TABLE run_triggers(internal_id TEXT NOT NULL, run_id TEXT NOT NULL,
  PRIMARY KEY(internal_id, run_id));
CREATE TABLE skips(
  seq BIGSERIAL PRIMARY KEY, internal_id TEXT NOT NULL, fn_slug TEXT NOT NULL,
  reason TEXT NOT NULL, at BIGINT NOT NULL);
CREATE INDEX skips_event ON skips(internal_id);
"#;

/// Advisory-lock key that serialises migrations of one database across starting nodes.
const MIGRATION_LOCK: &str = "cairn:migrate";

/// Times a transaction is re-run after a deadlock or serialisation failure.
const MAX_RETRIES: u32 = 8;

/// How to connect to PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections kept in the pool (per process). Lease renewals use one more of their own.
    pub pool_size: usize,
    /// Server-side limit on any one statement, set on every connection.
    pub statement_timeout: Duration,
    /// Schema to keep Cairn's tables in (created if absent); `None` uses the connection's
    /// default `search_path`. Lets several deployments or tests share one database.
    pub schema: Option<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool_size: 16,
            statement_timeout: Duration::from_secs(30),
            schema: None,
        }
    }
}

/// PostgreSQL-backed store. Cheap to share behind an `Arc`; see the module docs.
pub struct PostgresStore {
    pool: Pool,
    /// One connection for lease renewals alone (see [`Store::renew`]).
    lease_pool: Pool,
    /// This process among the nodes sharing the database, for [`Store::watch_run`].
    node: String,
    /// When this process last re-checked parked queue items, unix ms.
    last_repair: std::sync::atomic::AtomicI64,
    /// Where the `LISTEN` connection for [`Store::run_ends`] goes (the pool's settings).
    listen_cfg: tokio_postgres::Config,
    /// Makes TLS connections when `listen_cfg`'s (and the pools') `ssl_mode` asks for it.
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// Fan-out of [`RUN_ENDED`] notifications while anyone holds a receiver: started by
    /// [`Store::run_ends`], stopped (and the `LISTEN` connection closed) by its task when the
    /// last receiver has gone.
    ends: Arc<parking_lot::Mutex<Option<EndsFeed>>>,
}

/// A running relay of [`RUN_ENDED`] notifications.
struct EndsFeed {
    tx: tokio::sync::broadcast::Sender<RunEnd>,
    /// Its `LISTEN` is in effect (a new receiver is told so with [`RunEnd::Announcing`]).
    listening: Arc<std::sync::atomic::AtomicBool>,
}

/// Channel on which every run end is announced (payload: the run id), at commit.
const RUN_ENDED: &str = "cairn_run_ended";

/// Run ends buffered for a slow listener before the oldest are dropped.
const RUN_ENDS_BUFFER: usize = 1024;

/// Relays [`RUN_ENDED`] notifications to `tx` over a connection of its own, reconnecting
/// after errors, until nobody holds a receiver; then clears `feed` (under its lock, so a
/// receiver is never handed out by a relay that is stopping).
async fn listen_for_ends(
    cfg: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    tx: tokio::sync::broadcast::Sender<RunEnd>,
    listening_flag: Arc<std::sync::atomic::AtomicBool>,
    feed: Arc<parking_lot::Mutex<Option<EndsFeed>>>,
) {
    use futures::StreamExt;
    use std::sync::atomic::Ordering::SeqCst;
    let unwanted = || {
        let mut slot = feed.lock();
        let gone = tx.receiver_count() == 0;
        if gone {
            *slot = None;
        }
        gone
    };
    let mut idle_check = tokio::time::interval(Duration::from_secs(5));
    while !unwanted() {
        let (client, mut conn) = match cfg.connect(tls.clone()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %pg_message(&e), "listening for run ends: connecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        let sql = format!("LISTEN {RUN_ENDED}");
        let listen = client.batch_execute(&sql);
        tokio::pin!(listen);
        let mut listening = false;
        loop {
            tokio::select! {
                r = &mut listen, if !listening => match r {
                    Ok(()) => {
                        listening = true;
                        listening_flag.store(true, SeqCst);
                        let _ = tx.send(RunEnd::Announcing);
                    }
                    Err(e) => {
                        tracing::warn!(error = %pg_message(&e), "listening for run ends");
                        break;
                    }
                },
                m = messages.next() => match m {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        let _ = tx.send(RunEnd::Ended(n.payload().to_string()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %pg_message(&e), "listening for run ends: connection lost");
                        break;
                    }
                    None => break,
                },
                _ = idle_check.tick() => if unwanted() {
                    return;
                },
            }
        }
        listening_flag.store(false, SeqCst);
        let _ = tx.send(RunEnd::Unannounced);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Errors inside a transaction: PostgreSQL's own (some retryable) or the engine's.
#[derive(Debug)]
enum E {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for E {
    fn from(e: tokio_postgres::Error) -> Self {
        E::Pg(e)
    }
}

impl From<StoreError> for E {
    fn from(e: StoreError) -> Self {
        E::Store(e)
    }
}

impl From<E> for StoreError {
    fn from(e: E) -> Self {
        match e {
            E::Store(s) => s,
            E::Pg(e) => StoreError::Backend(pg_message(&e)),
        }
    }
}

type R<T> = Result<T, E>;

/// The server's own message when there is one: `Display` of a driver error hides it.
fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    // tokio-postgres names only the kind of failure ("error connecting to server"); what
    // happened (refused, a certificate not valid for the host) is in its sources.
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}

fn retryable(e: &E) -> bool {
    match e {
        E::Pg(e) => matches!(
            e.code(),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
        ),
        E::Store(_) => false,
    }
}

/// Runs `$body` (an expression using `$tx`, a connection inside an open transaction block,
/// evaluating to `R<T>`) in one transaction, committing on `Ok` and re-running it from
/// scratch on a deadlock or serialisation failure. The body may run more than once: it must
/// only borrow its inputs.
macro_rules! in_tx {
    ($self:expr, |$tx:ident| $body:expr) => {{
        let conn = TxConn::new($self.client().await?);
        let mut tries = 0u32;
        loop {
            count(2); // BEGIN and COMMIT (or ROLLBACK)
            let $tx = conn.client();
            match conn.block(async { $body }).await {
                Ok(v) => break Ok(v),
                Err(e) if retryable(&e) && tries < MAX_RETRIES && !conn.in_block() => {
                    tries += 1;
                    // Spread the retries of the transactions that collided.
                    let ms = rand::random::<u64>() % (5 << tries.min(5));
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Err(e) => break Err(StoreError::from(e)),
            }
        }
    }};
}

/// A pooled connection for transaction blocks whose `BEGIN` costs no round trip of its own:
/// it is queued on the connection right before the block's first statement and answered
/// with it. (`Client::transaction` waits for `BEGIN`'s answer first, which on the hot path
/// was one round trip, and one wake-up of this process and of the server, in every ten.)
///
/// Dropped in the middle of a block (its caller's future was cancelled, or the body
/// panicked), the connection is closed instead of going back to the pool: closing it rolls
/// the block back, and a pooled connection must never hand an open block to its next user.
struct TxConn {
    conn: Option<deadpool_postgres::Object>,
    in_block: std::sync::atomic::AtomicBool,
}

impl TxConn {
    fn new(conn: deadpool_postgres::Object) -> Self {
        TxConn {
            conn: Some(conn),
            in_block: false.into(),
        }
    }

    fn client(&self) -> &deadpool_postgres::Object {
        self.conn.as_ref().expect("taken only when dropped")
    }

    /// Whether a block is (or may still be) open: its end was not answered.
    fn in_block(&self) -> bool {
        self.in_block.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `body`, whose statements go to [`Self::client`], as one transaction block:
    /// committed when it returns `Ok`, rolled back when it returns `Err`.
    async fn block<T>(&self, body: impl std::future::Future<Output = R<T>>) -> R<T> {
        let c = self.client();
        self.in_block
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // `join` polls `BEGIN` first, which queues it ahead of anything the body sends. The
        // two are driven together, not one after the other, because the connection stops
        // reading once an answer waits unread.
        let (began, out) = futures::future::join(c.batch_execute("BEGIN"), body).await;
        // A failed BEGIN leaves the block's state unknown: the connection is dropped.
        began?;
        let end = c
            .batch_execute(if out.is_ok() { "COMMIT" } else { "ROLLBACK" })
            .await;
        match end {
            Ok(()) => {
                self.in_block
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                out
            }
            // The server answered, so the block is over (a failed COMMIT rolls it back).
            Err(e) if e.as_db_error().is_some() => {
                self.in_block
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                out.and(Err(e.into()))
            }
            Err(e) => out.and(Err(e.into())),
        }
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        if *self.in_block.get_mut() {
            if let Some(conn) = self.conn.take() {
                drop(deadpool_postgres::Object::take(conn));
            }
        }
    }
}

/// Statements this process has sent (BEGIN and COMMIT included), across all stores.
static STATEMENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Statements sent to PostgreSQL by this process so far, `BEGIN` and `COMMIT` included:
/// what the database round trips of a workload are measured in.
pub fn statements_sent() -> u64 {
    STATEMENTS.load(std::sync::atomic::Ordering::Relaxed)
}

fn count(n: u64) {
    STATEMENTS.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

async fn query<C: GenericClient>(c: &C, sql: &str, p: &[&(dyn ToSql + Sync)]) -> R<Vec<Row>> {
    count(1);
    let st = c.prepare_cached(sql).await?;
    Ok(c.query(&st, p).await?)
}

async fn query_opt<C: GenericClient>(
    c: &C,
    sql: &str,
    p: &[&(dyn ToSql + Sync)],
) -> R<Option<Row>> {
    count(1);
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&st, p).await?)
}

async fn exec<C: GenericClient>(c: &C, sql: &str, p: &[&(dyn ToSql + Sync)]) -> R<u64> {
    count(1);
    let st = c.prepare_cached(sql).await?;
    Ok(c.execute(&st, p).await?)
}

/// Take a transaction-scoped advisory lock on `key`, held until commit or rollback.
async fn lock<C: GenericClient>(c: &C, key: &str) -> R<()> {
    query(
        c,
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&key],
    )
    .await?;
    Ok(())
}

/// Take the transaction-scoped lock on `key` in shared mode. Event names are locked this
/// way by everything that matches an event against pauses, and exclusively by everything
/// that inserts a pause: events of one name apply side by side (two racing for one pause
/// settle it on the pause's row), while a new pause and a new event of its name always see
/// each other, whichever commits first.
async fn lock_shared<C: GenericClient>(c: &C, key: &str) -> R<()> {
    query(
        c,
        "SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0))",
        &[&key],
    )
    .await?;
    Ok(())
}

/// Lock several keys in one round trip, in sorted order so two transactions locking
/// overlapping sets cannot deadlock on each other.
async fn lock_all<C: GenericClient>(c: &C, keys: &mut Vec<String>) -> R<()> {
    keys.sort();
    keys.dedup();
    match keys.len() {
        0 => Ok(()),
        1 => lock(c, &keys[0]).await,
        _ => {
            query(
                c,
                "SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0)))
                 FROM (SELECT k FROM unnest($1::text[]) AS k ORDER BY k) AS s",
                &[&*keys],
            )
            .await?;
            Ok(())
        }
    }
}

/// The lock shared by event matching and pause insertion for one event name.
fn event_lock(name: &str) -> String {
    format!("cairn:ev:{name}")
}

fn j(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn pj(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

const EVENT_COLS: &str = "seq, internal_id, name, body, received_at, target_fn";

fn row_event(r: &Row) -> StoredEvent {
    StoredEvent {
        seq: r.get(0),
        internal_id: r.get(1),
        name: r.get(2),
        event: pj(r.get::<_, &str>(3)),
        received_at: r.get(4),
        target_fn: r.get(5),
    }
}

const RUN_COLS: &str = "run_id, fn_slug, status, events, version, disable_immediate, pending, output, created_at, ended_at";

fn row_run(r: &Row) -> Run {
    let status: &str = r.get(2);
    Run {
        run_id: r.get(0),
        fn_slug: r.get(1),
        status: RunStatus::parse(status).unwrap_or(RunStatus::Running),
        events: serde_json::from_str(r.get::<_, &str>(3)).unwrap_or_default(),
        version: r.get(4),
        disable_immediate: r.get(5),
        pending: serde_json::from_str(r.get::<_, &str>(6)).unwrap_or_default(),
        output: r.get::<_, Option<&str>>(7).map(pj),
        created_at: r.get(8),
        ended_at: r.get(9),
    }
}

const PAUSE_COLS: &str =
    "id, run_id, step, kind, event_name, expr, correlation, trigger_event, expires_at, since_seq";

fn row_pause(r: &Row) -> Pause {
    let kind: String = r.get(3);
    Pause {
        id: r.get(0),
        run_id: r.get(1),
        step: r.get(2),
        kind: serde_json::from_value(Value::String(kind)).unwrap_or(PauseKind::Wait),
        event_name: r.get(4),
        expr: r.get(5),
        correlation: r.get(6),
        trigger: pj(r.get::<_, &str>(7)),
        expires_at: r.get(8),
        since_seq: r.get(9),
    }
}

fn kind_str(k: PauseKind) -> String {
    match serde_json::to_value(k) {
        Ok(Value::String(s)) => s,
        _ => "wait".into(),
    }
}

fn item_kind(s: &str) -> ItemKind {
    serde_json::from_str(s).unwrap_or(ItemKind::Finalize)
}

/// The pauses a stored event of `name` may resume other than by correlation: waits started
/// before the transaction that stored it ended (its `xid`; see [`Store::event_high_water`])
/// and cancel rules created before it. The event is named by its internal id, not by its
/// sequence number, so that this look can be sent together with the statement storing it.
/// Run under the event name's lock: no pause of that name is created meanwhile.
async fn pauses_for_event<C: GenericClient>(c: &C, name: &str, internal_id: &str) -> R<Vec<Pause>> {
    Ok(query(
        c,
        &format!(
            "SELECT {PAUSE_COLS} FROM pauses,
               (SELECT seq, xid FROM events WHERE internal_id=$2) AS e
             WHERE event_name=$1 AND correlation IS NULL
               AND (CASE WHEN kind = 'cancel' THEN since_seq < e.seq ELSE since_seq <= e.xid END)"
        ),
        &[&name, &internal_id],
    )
    .await?
    .iter()
    .map(row_pause)
    .collect())
}

/// Applies a stored event inside the caller's transaction, which holds the event name's
/// lock (shared): creates the planned runs, stores `extra_events` and resumes the pauses the
/// event matches, out of `pauses` (its [`pauses_for_event`]) and those waiting on its
/// correlation id. The caller marks the event processed.
#[allow(clippy::too_many_arguments)]
async fn apply_stored_event<C: GenericClient>(
    tx: &C,
    event: &StoredEvent,
    mut pauses: Vec<Pause>,
    runs: &[NewRun],
    extra_events: &[NewEvent],
    matcher: &dyn PauseMatcher,
    now: i64,
) -> R<EventApplied> {
    let mut created = Vec::new();
    for r in runs {
        if flow::create_run(tx, r, now, matcher).await? {
            created.push(r.run_id.clone());
        }
    }
    for e in extra_events {
        insert_event(tx, e).await?;
    }
    // Only finish events resume invokes; a user event that happens to carry
    // a correlation_id must still reach ordinary waits.
    let correlation = (event.name == "inngest/function.finished")
        .then(|| {
            event
                .event
                .pointer("/data/correlation_id")
                .and_then(Value::as_str)
        })
        .flatten();
    if let Some(corr) = correlation {
        let by_corr = query(
            tx,
            &format!("SELECT {PAUSE_COLS} FROM pauses WHERE correlation=$1"),
            &[&corr],
        )
        .await?;
        pauses.extend(by_corr.iter().map(row_pause));
    }
    let mut resumed = false;
    for p in pauses {
        if p.event_name != event.name || p.expires_at < now {
            continue;
        }
        if matcher.matches(&p, &event.event) {
            resume_pause(tx, &p, &event.event, now).await?;
            resumed = true;
        }
    }
    Ok(EventApplied {
        runs: created,
        resumed,
    })
}

/// Stores a new event and applies it with its planned runs in the caller's transaction.
/// No event overtakes an older one of its name that is still unapplied (say, one a crashed
/// node stored): behind such a backlog it is only stored, for the matcher to apply in
/// order, and `None` is returned. Other names' backlogs do not hold it up: no wait or
/// cancel rule compares events across names.
async fn insert_and_apply_event<C: GenericClient>(
    c: &C,
    e: &NewEvent,
    runs: &[NewRun],
    matcher: &dyn PauseMatcher,
    now: i64,
) -> R<Option<EventApplied>> {
    let name = e.name();
    // The lock, then the look for a backlog, in one round trip: `try_join` polls, and so
    // sends, them in order, and the server runs them in the order they arrive.
    let (_, backlog) = futures::future::try_join(
        lock_shared(c, &event_lock(name)),
        query_opt(
            c,
            "SELECT 1 FROM events WHERE NOT processed AND name=$1 LIMIT 1",
            &[&name],
        ),
    )
    .await?;
    let backlog = backlog.is_some();
    if backlog {
        insert_event(c, e).await?;
        return Ok(None);
    }
    // The event and the look for its pauses in one round trip (`try_join` polls, and so
    // sends, in order): the look reads the row the insert wrote.
    let (stored, pauses) = futures::future::try_join(
        insert_new_event(c, e, true),
        pauses_for_event(c, name, &e.internal_id),
    )
    .await?;
    let Some((seq, _)) = stored else {
        return Ok(Some(EventApplied::default()));
    };
    let runs = runs_after(runs, seq);
    apply_stored_event(c, &e.stored(seq), pauses, &runs, &[], matcher, now)
        .await
        .map(Some)
}

/// Stores a new event (`processed` when the caller applies it in the same transaction); its
/// sequence number and transaction id, or `None` when an event with its internal id is
/// already stored (a resent event: the first copy stands).
async fn insert_new_event<C: GenericClient>(
    c: &C,
    e: &NewEvent,
    processed: bool,
) -> R<Option<(i64, i64)>> {
    let user_id = e.event.get("id").and_then(Value::as_str);
    Ok(query_opt(
        c,
        "INSERT INTO events(internal_id, user_id, name, body, received_at, target_fn, processed)
         VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (internal_id) DO NOTHING RETURNING seq, xid",
        &[
            &e.internal_id,
            &user_id,
            &e.name(),
            &j(&e.event),
            &e.received_at,
            &e.target_fn,
            &processed,
        ],
    )
    .await?
    .map(|r| (r.get(0), r.get(1))))
}

/// Stores an event for the matcher; its sequence number (the stored copy's, if resent).
async fn insert_event<C: GenericClient>(c: &C, e: &NewEvent) -> R<i64> {
    let row = insert_new_event(c, e, false).await?;
    match row {
        Some((seq, _)) => Ok(seq),
        None => Ok(query(
            c,
            "SELECT seq FROM events WHERE internal_id=$1",
            &[&e.internal_id],
        )
        .await?
        .first()
        .map(|r| r.get(0))
        .unwrap_or(0)),
    }
}

async fn has_memo<C: GenericClient>(c: &C, run_id: &str, hash: &str) -> R<bool> {
    Ok(query_opt(
        c,
        "SELECT 1 FROM steps WHERE run_id=$1 AND hash=$2",
        &[&run_id, &hash],
    )
    .await?
    .is_some())
}

/// Queue an item (no-op if it exists, or if `unless_memo` names a memoised step). SDK calls
/// take the run's step concurrency keys, which is what those limits count. One statement.
async fn insert_item<C: GenericClient>(c: &C, item: &NewItem) -> R<()> {
    let call = matches!(item.kind, ItemKind::Call { .. });
    exec(
        c,
        "INSERT INTO queue(id, run_id, kind, available_at, due_at, attempt, ck1, cl1, ck2, cl2)
         SELECT $1, $2, $3, $4, $4, 0, r.ck1, r.cl1, r.ck2, r.cl2
         FROM (SELECT 1) AS one LEFT JOIN runs r ON r.run_id = $2 AND $5
         WHERE $6::text IS NULL OR NOT EXISTS (SELECT 1 FROM steps WHERE run_id=$2 AND hash=$6)
         ON CONFLICT (id) DO NOTHING",
        &[
            &item.id,
            &item.run_id,
            &j(&item.kind),
            &item.available_at,
            &call,
            &item.unless_memo,
        ],
    )
    .await?;
    Ok(())
}

async fn save_memo<C: GenericClient>(c: &C, run_id: &str, hash: &str, memo: &MemoJson) -> R<()> {
    exec(
        c,
        "INSERT INTO steps(run_id, hash, memo) VALUES ($1,$2,$3) ON CONFLICT (run_id, hash) DO NOTHING",
        &[&run_id, &hash, &memo.as_str()],
    )
    .await?;
    Ok(())
}

async fn load_run<C: GenericClient>(c: &C, run_id: &str) -> R<Option<Run>> {
    Ok(query_opt(
        c,
        &format!("SELECT {RUN_COLS} FROM runs WHERE run_id=$1"),
        &[&run_id],
    )
    .await?
    .map(|r| row_run(&r)))
}

/// Load a run and lock its row until the transaction ends: read-modify-write of `pending`
/// and `events` must not interleave with another node's.
async fn lock_run<C: GenericClient>(c: &C, run_id: &str) -> R<Option<Run>> {
    Ok(query_opt(
        c,
        &format!("SELECT {RUN_COLS} FROM runs WHERE run_id=$1 FOR UPDATE"),
        &[&run_id],
    )
    .await?
    .map(|r| row_run(&r)))
}

/// Who tells a node's waiters that a run ended, when [`finish_run`] ends it. Either way
/// the notification also goes out when a call of the run is leased to another process than
/// the one ending it: that process's waiters may rely on its executor (`Watch::Here`).
#[derive(Clone, Copy)]
enum Announce<'a> {
    /// The executor holding the dispatch `owner` does, for its own waiters: the notification
    /// goes out if another node, not this one (`node`), watches the run.
    ElsewhereThan {
        node: &'a str,
        owner: Option<&'a str>,
    },
    /// The notification goes out if anybody watches the run.
    Everywhere,
}

/// Ends a running run, clearing its queue and pauses and, with `finalize`, queueing
/// finalisation (without, the caller applies the run's lifecycle events itself).
async fn finish_run<C: GenericClient>(
    c: &C,
    run_id: &str,
    finish: &Finish,
    now: i64,
    finalize: bool,
    announce: Announce<'_>,
) -> R<bool> {
    // Reads `watched_by` as of the end: a watch committed first is seen here, one that comes
    // later waits for this row's lock and then finds the run ended (`Store::watch_run`).
    // Also reads the run's own concurrency slot, which it holds until now.
    let Some(row) = query_opt(
        c,
        "UPDATE runs SET status=$1, output=$2, ended_at=$3, pending='[]'
         WHERE run_id=$4 AND status='Running'
         RETURNING watched_by, CASE WHEN started THEN run_slot END",
        &[&finish.status.as_str(), &j(&finish.output), &now, &run_id],
    )
    .await?
    else {
        return Ok(false);
    };
    let watched_by: Option<String> = row.get(0);
    let mut held: Vec<String> = row.get::<_, Option<String>>(1).into_iter().collect();
    // A notification wakes every listening node and its database backend, and all
    // notifying commits of the database queue on one lock: only send the ones awaited.
    let (watched, owner) = match (watched_by.as_deref(), announce) {
        (None, Announce::ElsewhereThan { owner, .. }) => (false, owner),
        (Some(w), Announce::ElsewhereThan { node, owner }) => (w != node, owner),
        (None, Announce::Everywhere) => (false, None),
        (Some(_), Announce::Everywhere) => (true, None),
    };
    // Everything the run still owns goes in one round trip (data-modifying CTEs run whether
    // or not the outer query reads them), returning the step keys its running calls hold;
    // and the end is announced if anybody waits for it elsewhere (the notification is
    // delivered at commit; the gated branch yields no key).
    let rows = query(
        c,
        "WITH q AS (DELETE FROM queue WHERE run_id=$1 RETURNING ck1, ck2, lease_owner, due_at),
              d AS (DELETE FROM debounces WHERE run_id=$1),
              b AS (DELETE FROM batches WHERE run_id=$1),
              p AS (DELETE FROM pauses WHERE run_id=$1)
         SELECT ck1, ck2, false FROM q
         WHERE lease_owner IS NOT NULL AND due_at > $4 AND (ck1 IS NOT NULL OR ck2 IS NOT NULL)
         UNION ALL
         SELECT NULL::text, NULL::text, true FROM (SELECT pg_notify($2, $1)) n
         WHERE $3 OR EXISTS (SELECT 1 FROM q WHERE lease_owner IS DISTINCT FROM $5
                                               AND lease_owner IS NOT NULL)",
        &[&run_id, &RUN_ENDED, &watched, &now, &owner],
    )
    .await?;
    for r in &rows {
        if r.get::<_, bool>(2) {
            // Counted when sent: a transaction rolled back after this still counts.
            metrics::counter!("cairn_run_end_announcements_total").increment(1);
        }
        held.extend(r.get::<_, Option<String>>(0));
        held.extend(r.get::<_, Option<String>>(1));
    }
    flow::free_all(c, &held).await?;
    if finalize {
        insert_item(c, &finalize_item(run_id, now)).await?;
    }
    Ok(true)
}

/// A step of the run finished: coalesce parallel branches, then discover.
async fn step_done<C: GenericClient>(
    c: &C,
    run_id: &str,
    steps: &[String],
    discovery: &NewItem,
) -> R<()> {
    let Some(run) = lock_run(c, run_id).await? else {
        return Ok(());
    };
    if run.status != RunStatus::Running {
        return Ok(());
    }
    if run.pending.iter().any(|p| steps.contains(p)) {
        let rest: Vec<&String> = run.pending.iter().filter(|p| !steps.contains(p)).collect();
        // Parallelism ended; version 2 lets the SDK run single steps inline again.
        let reenable = rest.is_empty() && run.version >= 2;
        exec(
            c,
            "UPDATE runs SET pending=$1, disable_immediate = disable_immediate AND NOT $2
             WHERE run_id=$3",
            &[&j(&rest), &reenable, &run_id],
        )
        .await?;
        if !rest.is_empty() {
            return Ok(());
        }
    }
    insert_item(c, discovery).await
}

fn discovery_after(run_id: &str, step: &str, now: i64) -> NewItem {
    NewItem {
        id: format!("{run_id}:{step}:disc"),
        run_id: run_id.to_string(),
        kind: ItemKind::Call {
            step: None,
            predecessor: Some(step.to_string()),
        },
        available_at: now,
        unless_memo: None,
    }
}

async fn resume_pause<C: GenericClient>(c: &C, pause: &Pause, event: &Value, now: i64) -> R<()> {
    let n = exec(c, "DELETE FROM pauses WHERE id=$1", &[&pause.id]).await?;
    if n == 0 {
        return Ok(());
    }
    match pause.kind {
        PauseKind::Cancel => {
            finish_run(
                c,
                &pause.run_id,
                &Finish {
                    status: RunStatus::Cancelled,
                    output: serde_json::json!({"error": "cancelled", "name": "Cancelled",
                        "message": format!("run cancelled by event {}", pause.event_name)}),
                },
                now,
                true,
                Announce::Everywhere,
            )
            .await?;
        }
        PauseKind::Wait | PauseKind::Invoke => {
            exec(
                c,
                "DELETE FROM queue WHERE id=$1",
                &[&format!("{}:{}:timeout", pause.run_id, pause.step)],
            )
            .await?;
            save_memo(c, &pause.run_id, &pause.step, &resume_memo(pause, event)).await?;
            step_done(
                c,
                &pause.run_id,
                std::slice::from_ref(&pause.step),
                &discovery_after(&pause.run_id, &pause.step, now),
            )
            .await?;
        }
    }
    Ok(())
}

async fn insert_pause<C: GenericClient>(c: &C, p: &Pause) -> R<bool> {
    let n = exec(
        c,
        &format!(
            "INSERT INTO pauses({PAUSE_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)
             ON CONFLICT (id) DO NOTHING"
        ),
        &[
            &p.id,
            &p.run_id,
            &p.step,
            &kind_str(p.kind),
            &p.event_name,
            &p.expr,
            &p.correlation,
            &j(&p.trigger),
            &p.expires_at,
            &p.since_seq,
        ],
    )
    .await?;
    Ok(n == 1)
}

/// Store and apply a run's lifecycle events, noting in `left` what they leave for the queue
/// loop and the matcher.
async fn apply_lifecycle<C: GenericClient>(
    c: &C,
    events: &[(NewEvent, Vec<NewRun>)],
    matcher: &dyn PauseMatcher,
    now: i64,
    left: &mut Left,
) -> R<()> {
    for (e, runs) in events {
        match insert_and_apply_event(c, e, runs, matcher, now).await? {
            Some(applied) => {
                left.queue |= left_for_queue(runs, &applied) || !applied.runs.is_empty()
            }
            None => left.matcher = true,
        }
    }
    Ok(())
}

async fn apply_inner<C: GenericClient>(
    c: &C,
    a: &Apply,
    matcher: &dyn PauseMatcher,
    now: i64,
    node: &str,
) -> R<Left> {
    let mut left = Left::default();
    // Event-name locks first (the order apply_event takes them in), then rows.
    if !a.pauses.is_empty() {
        let mut names: Vec<String> = a
            .pauses
            .iter()
            .map(|(p, _)| event_lock(&p.event_name))
            .collect();
        lock_all(c, &mut names).await?;
    }
    // The handled item's row, the dispatched call's and the run's, locked in that order in
    // one round trip: `try_join3` polls, and so sends, them in order, and the server runs
    // them in the order they arrive.
    let held = async {
        match &a.item {
            Some((id, _)) => {
                query_opt(
                    c,
                    "SELECT lease_owner, ck1, ck2 FROM queue WHERE id=$1 FOR UPDATE",
                    &[id],
                )
                .await
            }
            None => Ok(None),
        }
    };
    let dispatched = async {
        match &a.dispatch {
            Some((id, _)) => {
                query_opt(
                    c,
                    // The item must be this run's: a checkpoint names both.
                    "SELECT available_at FROM queue WHERE id=$1 AND run_id=$2 FOR UPDATE",
                    &[id, &a.run_id],
                )
                .await
            }
            None => Ok(None),
        }
    };
    let (held, dispatched, run) =
        futures::future::try_join3(held, dispatched, lock_run(c, &a.run_id)).await?;
    let mut item_keys: Vec<String> = Vec::new();
    if let Some((id, owner)) = &a.item {
        let Some(row) = held.filter(|r| r.get::<_, Option<&str>>(0) == Some(owner.as_str())) else {
            return Err(StoreError::LeaseLost(id.clone()).into());
        };
        item_keys.extend(row.get::<_, Option<String>>(1));
        item_keys.extend(row.get::<_, Option<String>>(2));
    }
    if let Some((id, at)) = &a.dispatch {
        if dispatched.map(|r| r.get::<_, i64>(0)) != Some(*at) {
            return Err(StoreError::LeaseLost(id.clone()).into());
        }
    }
    let running = run
        .as_ref()
        .map(|r| r.status == RunStatus::Running)
        .unwrap_or(false);
    if running {
        if a.version.is_some() || a.disable_immediate.is_some() {
            exec(
                c,
                "UPDATE runs SET version = CASE WHEN version = -1 THEN coalesce($1, version) ELSE version END,
                   disable_immediate = coalesce($2, disable_immediate) WHERE run_id=$3",
                &[&a.version, &a.disable_immediate, &a.run_id],
            )
            .await?;
        }
        for (hash, memo) in &a.memos {
            save_memo(c, &a.run_id, hash, memo).await?;
        }
        if !a.add_pending.is_empty() {
            let mut pending = run.as_ref().map(|r| r.pending.clone()).unwrap_or_default();
            for p in &a.add_pending {
                if !pending.contains(p) && !has_memo(c, &a.run_id, p).await? {
                    pending.push(p.clone());
                }
            }
            exec(
                c,
                "UPDATE runs SET pending=$1 WHERE run_id=$2",
                &[&j(&pending), &a.run_id],
            )
            .await?;
        }
        for item in &a.enqueue {
            insert_item(c, item).await?;
        }
        for (pause, timeout) in &a.pauses {
            if !insert_pause(c, pause).await? {
                continue;
            }
            insert_item(c, timeout).await?;
            // Close the race with events that arrived while the SDK call was in flight:
            // they were matched before this pause existed. The event-name lock taken above
            // means every such event is either already processed (and found here) or will
            // be matched after this commit (and find the pause).
            let candidates = query(
                c,
                &format!(
                    "SELECT {EVENT_COLS} FROM events WHERE name=$1 AND xid>=$2 AND processed ORDER BY seq"
                ),
                &[&pause.event_name, &pause.since_seq],
            )
            .await?;
            for ev in candidates.iter().map(row_event) {
                if matcher.matches(pause, &ev.event) {
                    resume_pause(c, pause, &ev.event, now).await?;
                    break;
                }
            }
        }
        if let Some((step, item)) = &a.complete_pending {
            step_done(c, &a.run_id, step, item).await?;
        }
        if let Some((pause_id, memo, item)) = &a.expire_pause {
            let n = exec(c, "DELETE FROM pauses WHERE id=$1", &[pause_id]).await?;
            if n == 1 {
                if let ItemKind::Call {
                    predecessor: Some(step),
                    ..
                } = &item.kind
                {
                    save_memo(c, &a.run_id, step, memo).await?;
                    step_done(c, &a.run_id, std::slice::from_ref(step), item).await?;
                }
            }
        }
    }
    for e in &a.events {
        insert_event(c, e).await?;
    }
    apply_lifecycle(c, &a.apply_events, matcher, now, &mut left).await?;
    if let Some(id) = &a.reset_attempt {
        exec(c, "UPDATE queue SET attempt=0 WHERE id=$1", &[id]).await?;
    }
    let mut ended = false;
    if running {
        if let Some(f) = &a.finish {
            // The caller announces its own end (`Store::apply`).
            let announce = Announce::ElsewhereThan {
                node,
                owner: a.item.as_ref().map(|(_, owner)| owner.as_str()),
            };
            ended = finish_run(c, &a.run_id, f, now, a.lifecycle.is_none(), announce).await?;
            if let (true, Some(events)) = (ended, &a.lifecycle) {
                apply_lifecycle(c, events, matcher, now, &mut left).await?;
            }
        }
    }
    // An ended run's items went with it, this one among them, and their slots were freed.
    if let Some((id, _)) = a.item.as_ref().filter(|_| !ended) {
        let n = match a.retry {
            Some((attempt, at)) if running && a.finish.is_none() => {
                exec(
                    c,
                    "UPDATE queue SET attempt=$1, available_at=$2, due_at=$2, lease_owner=NULL WHERE id=$3",
                    &[&attempt, &at, id],
                )
                .await?
            }
            _ => exec(c, "DELETE FROM queue WHERE id=$1", &[id]).await?,
        };
        if n == 1 {
            flow::free_all(c, &item_keys).await?;
        }
    }
    Ok(left)
}

/// The common shape of an SDK answer: memoise step results, queue the next call, drop the
/// handled item. Anything else (waits, events, the run's end, retries, parallel bookkeeping,
/// concurrency keys) takes the general path.
fn fast_shape(a: &Apply) -> bool {
    a.item.is_some()
        && a.dispatch.is_none()
        && a.pauses.is_empty()
        && a.events.is_empty()
        && a.apply_events.is_empty()
        && a.retry.is_none()
        && a.finish.is_none()
        && a.add_pending.is_empty()
        && a.expire_pause.is_none()
        && a.reset_attempt.is_none()
}

/// Whether `a` is a checkpoint (§13.2): memos from the call `dispatch` names, whose
/// attempt counter is reset, and nothing else.
fn checkpoint_shape(a: &Apply) -> bool {
    let Apply {
        item,
        run_id: _,
        memos: _,
        enqueue,
        retry,
        pauses,
        events,
        apply_events,
        version,
        disable_immediate,
        add_pending,
        complete_pending,
        expire_pause,
        finish,
        lifecycle,
        reset_attempt,
        dispatch,
    } = a;
    matches!((dispatch, reset_attempt), (Some((d, _)), Some(r)) if d == r)
        && item.is_none()
        && enqueue.is_empty()
        && retry.is_none()
        && pauses.is_empty()
        && events.is_empty()
        && apply_events.is_empty()
        && version.is_none()
        && disable_immediate.is_none()
        && add_pending.is_empty()
        && complete_pending.is_none()
        && expire_pause.is_none()
        && finish.is_none()
        && lifecycle.is_none()
}

/// Apply a [`checkpoint_shape`] in ONE statement: save the memos (first write wins) and reset
/// the call's attempts, if the call is still the current dispatch of a running run. `false`
/// when it is not; nothing is written then. A run ends by deleting its queue items, so the
/// update of the call's item serialises this statement against every way a run ends.
async fn apply_checkpoint<C: GenericClient>(c: &C, a: &Apply) -> R<bool> {
    let Some((item_id, available_at)) = &a.dispatch else {
        return Ok(false);
    };
    let memo_hashes: Vec<&str> = a.memos.iter().map(|(h, _)| h.as_str()).collect();
    let memo_bodies: Vec<&str> = a.memos.iter().map(|(_, m)| m.as_str()).collect();
    let row = query_opt(
        c,
        "WITH q AS (
           UPDATE queue SET attempt = 0
           WHERE id = $1 AND run_id = $2 AND available_at = $3
             AND EXISTS (SELECT 1 FROM runs WHERE run_id = $2 AND status = 'Running')
           RETURNING 1
         ), m AS (
           INSERT INTO steps(run_id, hash, memo)
           SELECT $2, t.h, t.m FROM unnest($4::text[], $5::text[]) WITH ORDINALITY AS t(h, m, o)
           WHERE EXISTS (SELECT 1 FROM q) ORDER BY t.o
           ON CONFLICT (run_id, hash) DO NOTHING
         )
         SELECT EXISTS (SELECT 1 FROM q)",
        &[item_id, &a.run_id, available_at, &memo_hashes, &memo_bodies],
    )
    .await?;
    Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
}

/// Apply a result of [`fast_shape`] in ONE statement (so one round trip and, outside a
/// transaction block, one commit), optionally leasing the run's next call to `lease`.
///
/// Every write is conditional on the handled item still being leased to its owner, having no
/// concurrency keys to free, and its run running with no parallel steps pending. When any of
/// that does not hold, nothing is written and `None` comes back: the caller then takes the
/// general path, which decides between a lost lease and the full bookkeeping. Cancellation
/// and every other way a run ends delete its queue items first, so the conditional delete of
/// the item serialises this statement against them.
async fn apply_fast<C: GenericClient>(
    c: &C,
    a: &Apply,
    now: i64,
    lease: Option<(&str, i64)>,
) -> R<Option<Option<QueueItem>>> {
    let Some((item_id, owner)) = &a.item else {
        return Ok(None);
    };
    let memo_hashes: Vec<&str> = a.memos.iter().map(|(h, _)| h.as_str()).collect();
    let memo_bodies: Vec<&str> = a.memos.iter().map(|(_, m)| m.as_str()).collect();
    // Items the general path would queue, in its order. A condition on a memo written by
    // this same statement is decided here: statements in one WITH do not see each other.
    let mut items: Vec<&NewItem> = a
        .enqueue
        .iter()
        .filter(|i| {
            i.unless_memo
                .as_deref()
                .is_none_or(|h| !memo_hashes.contains(&h))
        })
        .collect();
    if let Some((_, discovery)) = &a.complete_pending {
        items.push(discovery);
    }
    // The earliest due new item goes straight back to the caller, already leased.
    let leased: Option<usize> = lease.and_then(|_| {
        items
            .iter()
            .enumerate()
            .filter(|(_, i)| i.available_at <= now)
            .min_by_key(|(_, i)| i.available_at)
            .map(|(n, _)| n)
    });
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let kinds: Vec<String> = items.iter().map(|i| j(&i.kind)).collect();
    let ats: Vec<i64> = items.iter().map(|i| i.available_at).collect();
    let lease_flags: Vec<bool> = (0..items.len()).map(|n| Some(n) == leased).collect();
    let unless: Vec<Option<&str>> = items.iter().map(|i| i.unless_memo.as_deref()).collect();
    let (lease_owner, lease_until) = match lease {
        Some((o, until)) => (Some(o), until),
        None => (None, 0),
    };
    let row = query_opt(
        c,
        "WITH q AS (
           DELETE FROM queue WHERE id = $1 AND lease_owner = $2 AND ck1 IS NULL AND ck2 IS NULL
             AND EXISTS (SELECT 1 FROM runs WHERE run_id = $3 AND status = 'Running'
                         AND pending = '[]' AND ck1 IS NULL AND ck2 IS NULL)
           RETURNING 1
         ), r AS (
           UPDATE runs SET
             version = CASE WHEN version = -1 THEN coalesce($4, version) ELSE version END,
             disable_immediate = coalesce($5, disable_immediate)
           WHERE run_id = $3 AND EXISTS (SELECT 1 FROM q) RETURNING 1
         ), m AS (
           INSERT INTO steps(run_id, hash, memo)
           SELECT $3, t.h, t.m FROM unnest($6::text[], $7::text[]) WITH ORDINALITY AS t(h, m, o)
           WHERE EXISTS (SELECT 1 FROM r) ORDER BY t.o
           ON CONFLICT (run_id, hash) DO NOTHING
         ), i AS (
           INSERT INTO queue(id, run_id, kind, available_at, due_at, attempt, lease_owner)
           SELECT t.id, $3, t.kind, t.at, CASE WHEN t.l THEN $9 ELSE t.at END, 0,
                  CASE WHEN t.l THEN $8 END
           FROM unnest($10::text[], $11::text[], $12::bigint[], $13::bool[], $14::text[])
                AS t(id, kind, at, l, u)
           WHERE EXISTS (SELECT 1 FROM r)
             AND (t.u IS NULL OR NOT EXISTS
                   (SELECT 1 FROM steps s WHERE s.run_id = $3 AND s.hash = t.u))
           ON CONFLICT (id) DO NOTHING
           RETURNING id, lease_owner IS NOT NULL AS leased
         )
         SELECT EXISTS (SELECT 1 FROM r), (SELECT id FROM i WHERE leased LIMIT 1)",
        &[
            item_id,
            owner,
            &a.run_id,
            &a.version,
            &a.disable_immediate,
            &memo_hashes,
            &memo_bodies,
            &lease_owner,
            &lease_until,
            &ids,
            &kinds,
            &ats,
            &lease_flags,
            &unless,
        ],
    )
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let leased_id: Option<String> = row.get(1);
    let next = leased.filter(|_| leased_id.is_some()).map(|n| QueueItem {
        id: items[n].id.clone(),
        run_id: items[n].run_id.clone(),
        kind: items[n].kind.clone(),
        attempt: 0,
        available_at: items[n].available_at,
    });
    Ok(Some(next))
}

/// Lease the run's next due item to `owner`, unless flow control must look at it first
/// (concurrency keys, an open debounce or batch). One statement.
async fn lease_next<C: GenericClient>(
    c: &C,
    run_id: &str,
    owner: &str,
    now: i64,
    lease_until: i64,
) -> R<Option<QueueItem>> {
    let row = query_opt(
        c,
        "UPDATE queue SET lease_owner=$1, due_at=$2 WHERE id = (
           SELECT id FROM queue
           WHERE run_id=$3 AND lease_owner IS NULL AND due_at<=$4 AND blocked_on IS NULL
             AND ck1 IS NULL AND ck2 IS NULL AND rk IS NULL AND hold IS NULL
           ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING id, kind, attempt, available_at",
        &[&owner, &lease_until, &run_id, &now],
    )
    .await?;
    Ok(row.map(|r| QueueItem {
        id: r.get(0),
        run_id: run_id.to_string(),
        kind: item_kind(r.get(1)),
        attempt: r.get(2),
        available_at: r.get(3),
    }))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl PostgresStore {
    /// Whether this store is relaying other processes' run ends ([`Store::run_ends`]) right
    /// now: only while somebody holds a receiver (and until its relay notices they have gone).
    pub fn relaying_run_ends(&self) -> bool {
        self.ends.lock().is_some()
    }

    /// The claim, and the next due time when the plain claim alone answered it (`None`
    /// when the flow-controlled path ran, which does not read it).
    async fn claim_items(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> StoreResult<(Vec<QueueItem>, Option<Option<i64>>)> {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last_repair.load(Relaxed);
        let repair = now - last >= flow::REPAIR_EVERY_MS
            && self
                .last_repair
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok();
        let mut items = Vec::new();
        if !repair {
            let plain = {
                let c = self.client().await?;
                flow::claim_plain(&c, owner, now, lease_until, limit).await?
            };
            if !plain.flow_due || plain.items.len() >= limit {
                return Ok((plain.items, Some(plain.next_due)));
            }
            items = plain.items;
        }
        // Items under flow control (or a repair is due): the locked path, for what is left.
        // A second transaction; the leases already committed are independent of it and are
        // handed out even if it fails, rather than left to expire unworked.
        let rest = limit - items.len();
        let more: StoreResult<Vec<QueueItem>> = in_tx!(self, |tx| flow::claim(
            tx,
            owner,
            now,
            lease_until,
            rest,
            repair
        )
        .await);
        match more {
            Ok(more) => items.extend(more),
            Err(e) if !items.is_empty() => {
                tracing::warn!(error = %e, "claiming flow-controlled queue items");
            }
            Err(e) => return Err(e),
        }
        Ok((items, None))
    }

    /// Connect to the database at `url` (`postgres://user@host:port/db`), apply pending
    /// migrations and return the store.
    ///
    /// The URL's `sslmode` asks for TLS as libpq's does: `require` encrypts without checking
    /// the server's certificate, `verify-ca` checks it against `sslrootcert` (a PEM file;
    /// the bundled public roots without it), `verify-full` also checks the host name. Absent,
    /// `disable`, `allow` or `prefer`, or to a Unix socket, the connection is plain.
    ///
    /// Fails with [`StoreError::Unusable`] when the server cannot be reached or refuses the
    /// login, and with [`StoreError::SchemaTooNew`] when a newer Cairn has migrated the
    /// database; it never drops or resets data.
    pub async fn connect(url: &str, opts: PgOptions) -> StoreResult<Self> {
        let (mut cfg, tls) = tls::configure(url)?;
        let target = describe(&cfg);
        // Options ride on the startup packet: no extra statement per connection.
        let mut options = cfg.get_options().unwrap_or_default().to_string();
        options.push_str(&format!(
            " -c statement_timeout={}",
            opts.statement_timeout.as_millis().max(1)
        ));
        if let Some(schema) = &opts.schema {
            // The startup packet splits options on spaces; a schema name is an identifier.
            if schema.is_empty()
                || !schema
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(StoreError::Unusable(format!(
                    "schema name {schema:?} must be letters, digits and underscores"
                )));
            }
            options.push_str(&format!(" -c search_path={schema}"));
        }
        cfg.options(options.trim());
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(10));
        }
        let listen_cfg = cfg.clone();
        let manager = |cfg| {
            Manager::from_config(
                cfg,
                tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            )
        };
        // Connected on first use, so a node that never holds a lease never opens it.
        let lease_pool = Pool::builder(manager(cfg.clone()))
            .max_size(1)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(15)))
            .wait_timeout(Some(Duration::from_secs(60)))
            .build()
            .map_err(|e| StoreError::Unusable(format!("PostgreSQL pool: {e}")))?;
        let pool = Pool::builder(manager(cfg))
            .max_size(opts.pool_size.max(1))
            // The most recently used connection first: the same few backends serve the
            // load while the rest of the pool stays idle, so their caches (and the machine's)
            // stay warm. First-in-first-out would cycle every statement through every
            // backend of every node.
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(15)))
            .wait_timeout(Some(Duration::from_secs(60)))
            .build()
            .map_err(|e| StoreError::Unusable(format!("PostgreSQL pool: {e}")))?;
        let mut client = pool.get().await.map_err(|e| {
            StoreError::Unusable(format!(
                "cannot connect to PostgreSQL at {target}: {}",
                pool_message(&e)
            ))
        })?;
        let unusable = |e: tokio_postgres::Error| {
            StoreError::Unusable(format!("PostgreSQL at {target}: {}", pg_message(&e)))
        };
        if let Some(schema) = &opts.schema {
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    quote_ident(schema)
                ))
                .await
                .map_err(unusable)?;
        }
        {
            let tx = client.transaction().await.map_err(unusable)?;
            // Nodes starting together: one migrates, the others wait and then see it done.
            tx.query(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                &[&MIGRATION_LOCK],
            )
            .await
            .map_err(unusable)?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version(version BIGINT NOT NULL)")
                .await
                .map_err(unusable)?;
            let found: i64 = tx
                .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
                .await
                .map_err(unusable)?
                .get(0);
            if found > SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            if found == 0 {
                let foreign: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM information_schema.tables
                         WHERE table_schema = current_schema() AND table_name IN ('runs', 'queue', 'events')",
                        &[],
                    )
                    .await
                    .map_err(unusable)?
                    .get(0);
                if foreign > 0 {
                    return Err(StoreError::Unusable(format!(
                        "PostgreSQL at {target}: not a cairn schema (has tables but no schema version)"
                    )));
                }
            }
            if found < SCHEMA_VERSION {
                let steps: String = MIGRATIONS[found as usize..].concat();
                tx.batch_execute(&steps).await.map_err(unusable)?;
                if found < 3 {
                    canonicalise_live_memos(&tx).await.map_err(unusable)?;
                }
                tx.execute("DELETE FROM schema_version", &[])
                    .await
                    .map_err(unusable)?;
                tx.execute(
                    "INSERT INTO schema_version(version) VALUES ($1)",
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(unusable)?;
            }
            tx.commit().await.map_err(unusable)?;
        }
        drop(client);
        Ok(PostgresStore {
            pool,
            lease_pool,
            node: ulid::Ulid::new().to_string(),
            last_repair: Default::default(),
            listen_cfg,
            tls,
            ends: Default::default(),
        })
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        connection(&self.pool).await
    }
}

/// A connection from `pool`, or an error saying why there is none.
async fn connection(pool: &Pool) -> StoreResult<deadpool_postgres::Object> {
    pool.get()
        .await
        .map_err(|e| StoreError::Backend(format!("PostgreSQL connection: {}", pool_message(&e))))
}

/// `host:port/db` of a config, for messages (never the password).
fn describe(cfg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        cfg.get_dbname().or(cfg.get_user()).unwrap_or_default()
    )
}

fn pool_message(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_message(e),
        other => other.to_string(),
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_events(&self, events: Vec<NewEvent>) -> StoreResult<Vec<i64>> {
        in_tx!(self, |tx| {
            let mut out = Vec::with_capacity(events.len());
            for e in &events {
                out.push(insert_event(tx, e).await?);
            }
            Ok(out)
        })
    }

    async fn unprocessed_events(&self, limit: usize) -> StoreResult<Vec<StoredEvent>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            &format!("SELECT {EVENT_COLS} FROM events WHERE NOT processed ORDER BY seq LIMIT $1"),
            &[&(limit as i64)],
        )
        .await?;
        Ok(rows.iter().map(row_event).collect())
    }

    /// Not the highest sequence number: sequence numbers are handed out before commit, so
    /// a lower one can still commit after a higher one has been read. Instead this is the
    /// oldest transaction id still running anywhere; every event committed after this call
    /// carries a transaction id at least this high (its `xid` column), which is what wait
    /// and invoke matching compares. An event committed shortly before may also qualify: a
    /// wait can be resumed by an event from just before it started, never miss one from
    /// after. (A transaction left open elsewhere on the server holds this value back and
    /// widens that window.) Cancel rules keep comparing sequence numbers, as the engine
    /// gives them the trigger's.
    async fn event_high_water(&self) -> StoreResult<i64> {
        let c = self.client().await?;
        let rows = query(
            &c,
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?;
        Ok(rows.first().map(|r| r.get(0)).unwrap_or(0))
    }

    async fn apply_event(
        &self,
        event: StoredEvent,
        runs: Vec<NewRun>,
        extra_events: Vec<NewEvent>,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
    ) -> StoreResult<Vec<String>> {
        in_tx!(self, |tx| {
            // The name lock is shared, so the event's row decides who applies it: a node
            // finding it taken (or already processed) leaves it to the other. Should the
            // other roll back, the event is still unprocessed and is picked up again. The
            // lock, the claim and the look for its pauses go in one round trip, in order
            // (`try_join3` polls, and so sends, in order).
            let (_, state, pauses) = futures::future::try_join3(
                lock_shared(tx, &event_lock(&event.name)),
                query_opt(
                    tx,
                    "SELECT processed FROM events WHERE seq=$1 FOR UPDATE SKIP LOCKED",
                    &[&event.seq],
                ),
                pauses_for_event(tx, &event.name, &event.internal_id),
            )
            .await?;
            // Taken by another node, or already processed.
            if state.is_none_or(|r| r.get::<_, bool>(0)) {
                return Ok(Vec::new());
            }
            let applied = apply_stored_event(
                tx,
                &event,
                pauses,
                &runs,
                &extra_events,
                matcher.as_ref(),
                now,
            )
            .await?;
            exec(
                tx,
                "UPDATE events SET processed=true WHERE seq=$1",
                &[&event.seq],
            )
            .await?;
            Ok(applied.runs)
        })
    }

    async fn insert_and_apply(
        &self,
        events: Vec<(NewEvent, Vec<NewRun>)>,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
        lease: (String, i64, usize),
    ) -> StoreResult<(Vec<QueueItem>, Left)> {
        in_tx!(self, |tx| {
            let (owner, lease_until, max) = &lease;
            let mut left = Left::default();
            let mut leased = Vec::new();
            for (e, runs) in &events {
                let Some(applied) =
                    insert_and_apply_event(tx, e, runs, matcher.as_ref(), now).await?
                else {
                    left.matcher = true;
                    continue;
                };
                left.queue |= left_for_queue(runs, &applied);
                for run_id in applied.runs {
                    let next = if leased.len() < *max {
                        lease_next(tx, &run_id, owner, now, *lease_until).await?
                    } else {
                        None
                    };
                    // A run whose first call is not leased here (no free worker, or flow
                    // control delays or holds it), or with more items (a timeout), is the
                    // queue loop's too.
                    left.queue |= next.is_none() || more_items(runs, &run_id);
                    leased.extend(next);
                }
            }
            Ok((leased, left))
        })
    }

    async fn get_event(&self, id: &str) -> StoreResult<Option<StoredEvent>> {
        let c = self.client().await?;
        Ok(query_opt(
            &c,
            &format!(
                "SELECT {EVENT_COLS} FROM events WHERE internal_id=$1 OR user_id=$1 ORDER BY seq DESC LIMIT 1"
            ),
            &[&id],
        )
        .await?
        .map(|r| row_event(&r)))
    }

    async fn list_events(
        &self,
        limit: usize,
        name: Option<String>,
    ) -> StoreResult<Vec<StoredEvent>> {
        let c = self.client().await?;
        let limit = limit as i64;
        let rows = match name {
            Some(n) => {
                query(
                    &c,
                    &format!(
                        "SELECT {EVENT_COLS} FROM events WHERE name=$1 ORDER BY seq DESC LIMIT $2"
                    ),
                    &[&n, &limit],
                )
                .await?
            }
            None => {
                query(
                    &c,
                    &format!("SELECT {EVENT_COLS} FROM events ORDER BY seq DESC LIMIT $1"),
                    &[&limit],
                )
                .await?
            }
        };
        Ok(rows.iter().map(row_event).collect())
    }

    async fn runs_for_event(&self, internal_id: &str) -> StoreResult<Vec<Run>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            &format!(
                "SELECT {RUN_COLS} FROM runs WHERE trigger_event=$1
                 OR run_id IN (SELECT run_id FROM run_triggers WHERE internal_id=$1) ORDER BY run_id"
            ),
            &[&internal_id],
        )
        .await?;
        Ok(rows.iter().map(row_run).collect())
    }

    async fn skips_for_event(&self, internal_id: &str) -> StoreResult<Vec<Skip>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            "SELECT fn_slug, reason, at FROM skips WHERE internal_id=$1 ORDER BY seq",
            &[&internal_id],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|r| Skip {
                fn_slug: r.get(0),
                reason: SkipReason::parse(r.get(1)).unwrap_or(SkipReason::RateLimit),
                at: r.get(2),
            })
            .collect())
    }

    async fn run_queue(&self, run_id: &str, now: i64) -> StoreResult<Vec<QueueInfo>> {
        let c = self.client().await?;
        Ok(flow::run_queue(&c, run_id, now).await?)
    }

    async fn sync_app(&self, app: AppRecord, functions: Vec<FunctionRecord>) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            // Two nodes syncing one app at once: one after the other, each sees the other.
            lock(tx, &format!("cairn:app:{}", app.name)).await?;
            let old = query_opt(
                tx,
                "SELECT checksum, url FROM apps WHERE name=$1",
                &[&app.name],
            )
            .await?;
            let modified = old
                .map(|r| r.get::<_, &str>(0) != app.checksum || r.get::<_, &str>(1) != app.url)
                .unwrap_or(true);
            exec(
                tx,
                "INSERT INTO apps(name, url, sdk, checksum, synced_at) VALUES ($1,$2,$3,$4,$5)
                 ON CONFLICT (name) DO UPDATE SET url=excluded.url, sdk=excluded.sdk,
                 checksum=excluded.checksum, synced_at=excluded.synced_at",
                &[&app.name, &app.url, &app.sdk, &app.checksum, &app.synced_at],
            )
            .await?;
            exec(tx, "DELETE FROM functions WHERE app=$1", &[&app.name]).await?;
            for f in &functions {
                exec(
                    tx,
                    "INSERT INTO functions(slug, app, config) VALUES ($1,$2,$3)
                     ON CONFLICT (slug) DO UPDATE SET app=excluded.app, config=excluded.config",
                    &[&f.slug, &f.app, &j(&f.config)],
                )
                .await?;
            }
            Ok(modified)
        })
    }

    async fn apps(&self) -> StoreResult<Vec<AppRecord>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            "SELECT name, url, sdk, checksum, synced_at FROM apps ORDER BY name",
            &[],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|r| AppRecord {
                name: r.get(0),
                url: r.get(1),
                sdk: r.get(2),
                checksum: r.get(3),
                synced_at: r.get(4),
            })
            .collect())
    }

    async fn functions(&self) -> StoreResult<Vec<FunctionRecord>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            "SELECT slug, app, config FROM functions ORDER BY slug",
            &[],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|r| FunctionRecord {
                slug: r.get(0),
                app: r.get(1),
                config: pj(r.get::<_, &str>(2)),
            })
            .collect())
    }

    async fn get_run(&self, run_id: &str) -> StoreResult<Option<Run>> {
        let c = self.client().await?;
        Ok(load_run(&c, run_id).await?)
    }

    /// One statement: the run, its memos and the wait starting point (see
    /// `event_high_water`), read together before an SDK call.
    async fn call_state(&self, run_id: &str) -> StoreResult<Option<CallState>> {
        let c = self.client().await?;
        let row = query_opt(
            &c,
            &format!(
                "SELECT {RUN_COLS},
                   (SELECT array_agg(hash ORDER BY seq) FROM steps WHERE run_id = $1),
                   (SELECT array_agg(memo ORDER BY seq) FROM steps WHERE run_id = $1),
                   pg_snapshot_xmin(pg_current_snapshot())::text::bigint
                 FROM runs WHERE run_id = $1"
            ),
            &[&run_id],
        )
        .await?;
        Ok(row.map(|r| {
            let hashes: Vec<String> = r.get::<_, Option<Vec<String>>>(10).unwrap_or_default();
            let memos: Vec<String> = r.get::<_, Option<Vec<String>>>(11).unwrap_or_default();
            CallState {
                run: row_run(&r),
                steps: hashes
                    .into_iter()
                    .zip(memos.into_iter().map(MemoJson::stored))
                    .collect(),
                high_water: r.get(12),
            }
        }))
    }

    async fn steps(&self, run_id: &str) -> StoreResult<Vec<(String, MemoJson)>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            "SELECT hash, memo FROM steps WHERE run_id=$1 ORDER BY seq",
            &[&run_id],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), MemoJson::stored(r.get(1))))
            .collect())
    }

    async fn apply(
        &self,
        apply: Apply,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
    ) -> StoreResult<()> {
        if checkpoint_shape(&apply) {
            let c = self.client().await?;
            match apply_checkpoint(&c, &apply).await {
                Ok(true) => return Ok(()),
                // A stale call or an ended run: the general path says which.
                Ok(false) => {}
                Err(e) if retryable(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if fast_shape(&apply) {
            // Scoped: the general path below takes a connection of its own.
            let fast = {
                let c = self.client().await?;
                apply_fast(&c, &apply, now, None).await
            };
            match fast {
                Ok(Some(_)) => return Ok(()),
                // Not applicable after all, or a collision: the general path decides.
                Ok(None) => {}
                Err(e) if retryable(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        in_tx!(self, |tx| apply_inner(
            tx,
            &apply,
            matcher.as_ref(),
            now,
            &self.node
        )
        .await
        .map(|_| ()))
    }

    async fn apply_and_continue(
        &self,
        apply: Apply,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
        owner: &str,
        lease_until: i64,
    ) -> StoreResult<(Option<QueueItem>, Left)> {
        if fast_shape(&apply) {
            // Scoped: the general path below takes a connection of its own.
            let fast = {
                let c = self.client().await?;
                apply_fast(&c, &apply, now, Some((owner, lease_until))).await
            };
            match fast {
                Ok(Some(next)) => return Ok((next, Left::default())),
                Ok(None) => {}
                Err(e) if retryable(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        in_tx!(self, |tx| {
            let left = apply_inner(tx, &apply, matcher.as_ref(), now, &self.node).await?;
            // An end that brought its lifecycle events leaves the run no item (not even
            // finalisation's): nothing to look for.
            let ended = apply.finish.is_some() && apply.lifecycle.is_some();
            let next = if ended {
                None
            } else {
                lease_next(tx, &apply.run_id, owner, now, lease_until).await?
            };
            Ok((next, left))
        })
    }

    fn run_ends(&self) -> Option<tokio::sync::broadcast::Receiver<RunEnd>> {
        let mut slot = self.ends.lock();
        if let Some(feed) = slot.as_ref() {
            let rx = feed.tx.subscribe();
            // The new receiver missed the announcement; the others hear it again, harmlessly.
            if feed.listening.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = feed.tx.send(RunEnd::Announcing);
            }
            return Some(rx);
        }
        let (tx, rx) = tokio::sync::broadcast::channel(RUN_ENDS_BUFFER);
        let listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(listen_for_ends(
            self.listen_cfg.clone(),
            self.tls.clone(),
            tx.clone(),
            listening.clone(),
            self.ends.clone(),
        ));
        *slot = Some(EndsFeed { tx, listening });
        Some(rx)
    }

    async fn watch_run(&self, run_id: &str, owner: &str) -> StoreResult<Watch> {
        // One statement. A run whose call `owner` holds is left unmarked: its executor tells
        // the waiters when the run ends or leaves it, and an end committed elsewhere while
        // the call is leased here is announced (`finish_run`). Otherwise the run is marked;
        // the row lock orders the mark against the end, so either the end sees the mark or
        // this finds the run no longer running. A second node watching turns the mark into
        // one no node's own end skips. The mark needs no durability (a crash ends the wait
        // that made it), so its commit does not wait for the disk, and the row's lock is
        // not held through a flush the run's own writes would queue behind.
        let c = self.client().await?;
        let row = query_opt(
            &c,
            "WITH here AS (SELECT 1 FROM queue WHERE run_id=$1 AND lease_owner=$4 LIMIT 1),
                  marked AS (
                    UPDATE runs SET watched_by = CASE WHEN watched_by IS NULL OR watched_by = $2
                                                      THEN $2 ELSE $3 END
                    FROM (SELECT set_config('synchronous_commit', 'off', true)) async_commit
                    WHERE run_id=$1 AND status='Running' AND NOT EXISTS (SELECT 1 FROM here)
                    RETURNING 1)
             SELECT EXISTS (SELECT 1 FROM marked),
                    EXISTS (SELECT 1 FROM here)
                      AND EXISTS (SELECT 1 FROM runs WHERE run_id=$1 AND status='Running')",
            &[&run_id, &self.node, &WATCHED_BY_SEVERAL, &owner],
        )
        .await?;
        // The statement's one row always comes back.
        let Some(row) = row else {
            return Ok(Watch::Ended);
        };
        Ok(match (row.get::<_, bool>(0), row.get::<_, bool>(1)) {
            (true, _) => Watch::Watched,
            (false, true) => Watch::Here,
            (false, false) => Watch::Ended,
        })
    }

    async fn cancel_run(&self, run_id: &str, now: i64) -> StoreResult<bool> {
        let finish = Finish {
            status: RunStatus::Cancelled,
            output: serde_json::json!({"error": "cancelled", "name": "Cancelled", "message": "run cancelled via API"}),
        };
        in_tx!(self, |tx| {
            lock_run(tx, run_id).await?;
            finish_run(tx, run_id, &finish, now, true, Announce::Everywhere).await
        })
    }

    async fn claim(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> StoreResult<Vec<QueueItem>> {
        Ok(self.claim_items(owner, now, lease_until, limit).await?.0)
    }

    async fn claim_next(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> StoreResult<(Vec<QueueItem>, Option<i64>)> {
        let (items, next) = self.claim_items(owner, now, lease_until, limit).await?;
        let next = match next {
            _ if items.len() >= limit => None,
            Some(next) => next,
            None => self.next_due().await?,
        };
        Ok((items, next))
    }

    async fn renew(
        &self,
        owner: &str,
        ids: Vec<String>,
        lease_until: i64,
    ) -> StoreResult<Vec<String>> {
        if ids.is_empty() {
            return Ok(ids);
        }
        // Not from the shared pool: behind a busy pool's queue a renewal can wait longer than
        // the lease, and another node would take over items this one is still working on.
        let c = connection(&self.lease_pool).await?;
        // One statement is one transaction. Rows another transaction has locked (a result
        // being applied, a wait being resumed) are skipped rather than waited for: one such
        // row held the whole renewal back for a second under load, long enough for the other
        // leases in it to lapse. A skipped lease is renewed next time if still held.
        let rows = query(
            &c,
            "UPDATE queue SET due_at=$1 WHERE id IN (
               SELECT id FROM queue WHERE id = ANY($2) AND lease_owner=$3 FOR UPDATE SKIP LOCKED)
             RETURNING id",
            &[&lease_until, &ids, &owner],
        )
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn release(&self, owner: &str, id: &str) -> StoreResult<()> {
        in_tx!(self, |tx| {
            let keys = flow::item_keys(tx, id).await?;
            let n = exec(
                tx,
                "UPDATE queue SET lease_owner=NULL, due_at=available_at WHERE id=$1 AND lease_owner=$2",
                &[&id, &owner],
            )
            .await?;
            if n == 1 {
                flow::free_all(tx, &keys).await?;
            }
            Ok(())
        })
    }

    async fn next_due(&self) -> StoreResult<Option<i64>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            "SELECT min(due_at) FROM queue WHERE blocked_on IS NULL",
            &[],
        )
        .await?;
        Ok(rows.first().and_then(|r| r.get(0)))
    }

    async fn queue_depth(&self) -> StoreResult<i64> {
        let c = self.client().await?;
        let rows = query(&c, "SELECT count(*) FROM queue", &[]).await?;
        Ok(rows.first().map(|r| r.get(0)).unwrap_or(0))
    }

    async fn prune(&self, before: i64) -> StoreResult<(u64, u64)> {
        in_tx!(self, |tx| {
            // Bounded batches keep each transaction short.
            let ended = query(
                tx,
                "SELECT run_id FROM runs WHERE status <> 'Running' AND ended_at < $1 LIMIT 5000",
                &[&before],
            )
            .await?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>();
            exec(tx, "DELETE FROM steps WHERE run_id = ANY($1)", &[&ended]).await?;
            let runs = exec(tx, "DELETE FROM runs WHERE run_id = ANY($1)", &[&ended]).await?;
            let events = exec(
                tx,
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events
                 WHERE processed AND received_at < $1 LIMIT 5000)",
                &[&before],
            )
            .await?;
            // Flow-control leftovers: limits whose window has passed, old skip records,
            // batch links of runs that are gone.
            exec(tx, "DELETE FROM gcra WHERE tat < $1", &[&before]).await?;
            exec(tx, "DELETE FROM skips WHERE at < $1", &[&before]).await?;
            exec(
                tx,
                "DELETE FROM run_triggers WHERE ctid IN (SELECT t.ctid FROM run_triggers t
                 LEFT JOIN runs r ON r.run_id = t.run_id WHERE r.run_id IS NULL LIMIT 5000)",
                &[],
            )
            .await?;
            Ok((runs, events))
        })
    }

    async fn cron_last(&self, fn_slug: &str, schedule: &str) -> StoreResult<Option<i64>> {
        let c = self.client().await?;
        Ok(query_opt(
            &c,
            "SELECT last_tick FROM cron WHERE fn_slug=$1 AND schedule=$2",
            &[&fn_slug, &schedule],
        )
        .await?
        .map(|r| r.get(0)))
    }

    async fn fire_cron(
        &self,
        fn_slug: &str,
        schedule: &str,
        tick: i64,
        event: Option<NewEvent>,
    ) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            // Two nodes firing the same tick: the second waits on the first's row, then
            // finds the tick no longer newer and fires nothing.
            let n = exec(
                tx,
                "INSERT INTO cron(fn_slug, schedule, last_tick) VALUES ($1,$2,$3)
                 ON CONFLICT (fn_slug, schedule) DO UPDATE SET last_tick=excluded.last_tick
                 WHERE cron.last_tick < excluded.last_tick",
                &[&fn_slug, &schedule, &tick],
            )
            .await?;
            if n == 0 {
                return Ok(false);
            }
            if let Some(e) = &event {
                insert_event(tx, e).await?;
            }
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store with a one-connection pool on a fresh schema of the test database (see
    /// `tests/pg_support`), and that schema's name.
    async fn one_connection_store() -> (PostgresStore, String) {
        let url = std::env::var("CAIRN_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!(
            "cairn_unit_{}",
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let opts = PgOptions {
            pool_size: 1,
            schema: Some(schema.clone()),
            ..Default::default()
        };
        let store = PostgresStore::connect(&url, opts)
            .await
            .expect("these tests need the PostgreSQL server of CAIRN_TEST_PG_URL");
        (store, schema)
    }

    /// What is in `probe` and whether the pool's connection is outside any transaction
    /// block (only inside one may a savepoint be set).
    async fn probe(store: &PostgresStore) -> (Vec<i32>, bool) {
        let c = store.client().await.unwrap();
        let xs = c
            .query("SELECT x FROM probe ORDER BY x", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let outside = match c.batch_execute("SAVEPOINT probe").await {
            Ok(()) => false,
            Err(e) if e.code() == Some(&SqlState::NO_ACTIVE_SQL_TRANSACTION) => true,
            Err(e) => panic!("{e}"),
        };
        (xs, outside)
    }

    #[tokio::test]
    async fn a_transaction_block_is_all_or_nothing_even_when_its_caller_goes_away() {
        let (store, schema) = one_connection_store().await;
        let c = store.client().await.unwrap();
        c.batch_execute("CREATE TABLE probe(x int)").await.unwrap();
        drop(c);
        let store = &store;
        let insert = |x: i32| async move {
            let r: StoreResult<()> = in_tx!(store, |tx| {
                exec(tx, "INSERT INTO probe VALUES ($1)", &[&x]).await?;
                match x {
                    1 => Ok(()),
                    2 => Err(E::Store(StoreError::Backend("the body failed".into()))),
                    _ => std::future::pending().await,
                }
            });
            r
        };

        insert(1).await.unwrap();
        assert_eq!(probe(store).await, (vec![1], true));

        // Had BEGIN reached the server after the body's first statement (prepared by now,
        // so sent at once), that statement would have committed on its own.
        let failed = insert(2).await;
        assert!(failed.is_err());
        assert_eq!(probe(store).await, (vec![1], true));

        // Cancelled after its insert: the connection is closed (the pool's only one), not
        // handed on with the block open, and the next user gets a fresh one.
        let cancelled = tokio::time::timeout(Duration::from_millis(300), insert(3)).await;
        assert!(cancelled.is_err(), "the block never ends by itself");
        assert_eq!(probe(store).await, (vec![1], true));

        let c = store.client().await.unwrap();
        c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
}
