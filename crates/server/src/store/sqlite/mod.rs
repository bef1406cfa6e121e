//! SQLite implementation of [`Store`].
//!
//! One writer thread owns the only write connection. Concurrent writers send it
//! closures; it drains whatever is waiting, runs them all within one transaction,
//! and commits once (group commit), so many concurrent runs share one fsync. A
//! closure that fails after writing makes the writer run the batch again with a
//! savepoint around each closure (see `writer_loop`). Replies are sent only after
//! the commit, which is what makes "acknowledged means durable" hold. Reads use a
//! small pool of separate connections; WAL mode lets them proceed while the writer
//! works.

use super::*;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::path::{Path, PathBuf};
use tokio::sync::oneshot;

mod flow;

/// Schema version stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 5;

/// Most closures merged into one transaction; bounds commit latency under load.
const MAX_BATCH: usize = 512;

/// A write request: its writes, which the writer may run more than once (see
/// [`writer_loop`]), and the hand-over of its outcome once the commit is decided.
trait Job: Send {
    /// Runs the writes, keeping the outcome for [`Job::finish`]; whether they succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Sends the kept outcome, or the commit's failure, to the caller.
    fn finish(self: Box<Self>, commit: Result<(), String>);
}

/// A [`Job`] made of a closure and the channel its caller waits on.
struct WriteJob<F, R> {
    f: F,
    out: Option<StoreResult<R>>,
    reply: oneshot::Sender<StoreResult<R>>,
}

impl<F, R> Job for WriteJob<F, R>
where
    F: Fn(&Connection) -> StoreResult<R> + Send,
    R: Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let out = (self.f)(conn);
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn finish(self: Box<Self>, commit: Result<(), String>) {
        let out = match (commit, self.out) {
            (Ok(()), Some(out)) => out,
            (Ok(()), None) => Err(StoreError::Backend("write did not run".into())),
            (Err(e), _) => Err(StoreError::Backend(e)),
        };
        let _ = self.reply.send(out);
    }
}

/// SQLite-backed store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    path: PathBuf,
    tx: std::sync::mpsc::Sender<Box<dyn Job>>,
    readers: Mutex<Vec<Connection>>,
    /// Bounds the open reader connections: a reader beyond it waits for one to come back
    /// instead of opening (and later dropping) its own, which re-parsed the schema and
    /// re-prepared statements on every read and left a blocking thread per waiting read.
    reader_slots: tokio::sync::Semaphore,
    stats: Arc<WriterStats>,
    /// When parked queue items were last re-checked, unix ms.
    last_repair: Arc<std::sync::atomic::AtomicI64>,
}

/// Counters from the writer thread, to observe group commit.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: std::sync::atomic::AtomicU64,
    /// Write requests applied.
    pub writes: std::sync::atomic::AtomicU64,
    /// Batches rolled back and run again because a job failed after writing.
    pub replays: std::sync::atomic::AtomicU64,
}

const SCHEMA: &str = r#"
CREATE TABLE apps(
  name TEXT PRIMARY KEY, url TEXT NOT NULL, sdk TEXT NOT NULL,
  checksum TEXT NOT NULL, synced_at INTEGER NOT NULL);
CREATE TABLE functions(
  slug TEXT PRIMARY KEY, app TEXT NOT NULL, config TEXT NOT NULL);
CREATE TABLE events(
  seq INTEGER PRIMARY KEY AUTOINCREMENT, internal_id TEXT NOT NULL UNIQUE,
  user_id TEXT, name TEXT NOT NULL, body TEXT NOT NULL, received_at INTEGER NOT NULL,
  target_fn TEXT, processed INTEGER NOT NULL DEFAULT 0);
CREATE INDEX events_unprocessed ON events(seq) WHERE processed = 0;
CREATE INDEX events_name ON events(name, seq);
CREATE INDEX events_user_id ON events(user_id);
CREATE TABLE runs(
  run_id TEXT PRIMARY KEY, fn_slug TEXT NOT NULL, idem_key TEXT NOT NULL,
  trigger_event TEXT NOT NULL, status TEXT NOT NULL, events TEXT NOT NULL,
  version INTEGER NOT NULL DEFAULT -1, disable_immediate INTEGER NOT NULL DEFAULT 0,
  pending TEXT NOT NULL DEFAULT '[]', output TEXT, created_at INTEGER NOT NULL,
  ended_at INTEGER, UNIQUE(fn_slug, idem_key));
CREATE INDEX runs_trigger ON runs(trigger_event);
CREATE TABLE steps(
  seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, hash TEXT NOT NULL,
  memo TEXT NOT NULL, UNIQUE(run_id, hash));
CREATE TABLE queue(
  id TEXT PRIMARY KEY, run_id TEXT NOT NULL, kind TEXT NOT NULL,
  available_at INTEGER NOT NULL, due_at INTEGER NOT NULL, attempt INTEGER NOT NULL DEFAULT 0,
  lease_owner TEXT);
CREATE INDEX queue_due ON queue(due_at);
CREATE INDEX queue_run ON queue(run_id);
CREATE TABLE pauses(
  id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step TEXT NOT NULL, kind TEXT NOT NULL,
  event_name TEXT NOT NULL, expr TEXT, correlation TEXT, trigger_event TEXT NOT NULL,
  expires_at INTEGER NOT NULL, since_seq INTEGER NOT NULL);
CREATE INDEX pauses_event ON pauses(event_name);
CREATE INDEX pauses_corr ON pauses(correlation) WHERE correlation IS NOT NULL;
CREATE INDEX pauses_run ON pauses(run_id);
CREATE TABLE cron(
  fn_slug TEXT NOT NULL, schedule TEXT NOT NULL, last_tick INTEGER NOT NULL,
  PRIMARY KEY(fn_slug, schedule));
"#;

/// Schema steps: `MIGRATIONS[v]` takes a version-`v` database to version `v + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] =
    [SCHEMA, flow::SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5];

/// Version 5 changes no tables: memos are stored as canonical JSON from now on, and
/// [`canonicalise_live_memos`] rewrites those of runs still going, the only ones that will
/// be sent to an SDK again.
const SCHEMA_V5: &str = "";

/// Rewrites, as canonical JSON, the memos of running runs written before version 5, so that
/// the call requests they are spliced into stay canonical (the bytes that get signed).
fn canonicalise_live_memos(conn: &Connection) -> rusqlite::Result<()> {
    let rows: Vec<(i64, String)> = conn
        .prepare(
            "SELECT s.seq, s.memo FROM steps s JOIN runs r ON r.run_id = s.run_id
             WHERE r.status = 'Running'",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut update = conn.prepare("UPDATE steps SET memo=? WHERE seq=?")?;
    for (seq, memo) in rows {
        if let Some(canonical) = recanonicalised(&memo) {
            update.execute(params![canonical, seq])?;
        }
    }
    Ok(())
}

/// Version 3: unapplied events by name, for the check that an event applied in the commit
/// that stores it does not overtake an older one of its name (`events_name` would walk the
/// name's whole history).
const SCHEMA_V3: &str = "CREATE INDEX events_unprocessed_name ON events(name) WHERE processed = 0;";

/// Version 4: a run's queue items in due order, so that leasing a run's next item (once per
/// step) reads the first entry instead of sorting the run's items in a temporary B-tree.
const SCHEMA_V4: &str =
    "DROP INDEX queue_run; CREATE INDEX queue_run_due ON queue(run_id, due_at);";

/// Reader connections kept open: enough to overlap reads with the writer on a few cores.
const READERS: usize = 4;

/// Prepared statements kept per connection: more than the store has distinct statements.
const STATEMENT_CACHE: usize = 256;

fn be(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Bytes SQLite holds on the heap in this process right now: page caches, prepared
/// statements and schema for every open connection. RSS alone cannot say whether growth is
/// SQLite's caches filling up or something else, so `/metrics` reports this beside it.
pub fn heap_bytes() -> i64 {
    // SAFETY: a read of SQLite's global counter, which it keeps under its own mutex.
    unsafe { rusqlite::ffi::sqlite3_memory_used() }
}

fn open_conn(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Unusable(format!("{}: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(be)?;
    // Every statement the store runs stays prepared: one step's commit alone uses more than
    // the default 16, so an LRU of 16 re-parsed most of them on every commit (10 % of the
    // server's CPU in `sqlite3Prepare` at C=16).
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // temp_store=MEMORY keeps the writer's sub-journal (the undo copy of each page touched
    // under a savepoint or a statement that may have to roll back alone) in memory. By
    // default it spills to a temporary file once it passes 64 KiB, which made most group
    // commits create, write, close and unlink a file on the writer thread when every job ran
    // in a savepoint. An in-memory sub-journal is emptied when its savepoint or statement
    // ends, so it holds one job's pages at most.
    conn.execute_batch("PRAGMA foreign_keys=OFF; PRAGMA temp_store=MEMORY;")
        .map_err(|e| StoreError::Unusable(format!("{}: {e}", path.display())))?;
    Ok(conn)
}

impl SqliteStore {
    /// Open (creating if absent) the database at `path`, migrating the schema.
    ///
    /// Fails with a clear error if the file is not a database, is locked, or
    /// was written by a newer schema; it never resets existing data.
    pub fn open(path: impl AsRef<Path>) -> StoreResult<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Unusable(format!("{}: {e}", dir.display())))?;
            }
        }
        let conn = open_conn(&path)?;
        let unusable =
            |e: rusqlite::Error| StoreError::Unusable(format!("{}: {e}", path.display()));
        // journal_mode touches the file header, so a corrupt file fails here.
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(unusable)?;
        if mode.to_lowercase() != "wal" {
            return Err(StoreError::Unusable(format!(
                "{}: cannot enable WAL (got {mode})",
                path.display()
            )));
        }
        // FULL: a commit is on disk before we acknowledge anything.
        conn.execute_batch("PRAGMA synchronous=FULL;")
            .map_err(unusable)?;
        let check: String = conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(unusable)?;
        if check != "ok" {
            return Err(StoreError::Unusable(format!(
                "{}: integrity check failed: {check}",
                path.display()
            )));
        }
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(unusable)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < SCHEMA_VERSION {
            let tables: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'", [], |r| r.get(0))
                .map_err(unusable)?;
            if version == 0 && tables > 0 {
                return Err(StoreError::Unusable(format!(
                    "{}: not a cairn database (has tables but no schema version)",
                    path.display()
                )));
            }
            // Each step of MIGRATIONS takes the schema one version up; all pending steps
            // commit together or not at all.
            let steps: String = MIGRATIONS[version as usize..].concat();
            let migrate = || -> rusqlite::Result<()> {
                conn.execute_batch(&format!("BEGIN IMMEDIATE; {steps}"))?;
                if version < 5 {
                    canonicalise_live_memos(&conn)?;
                }
                conn.execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"))
            };
            if let Err(e) = migrate() {
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                return Err(unusable(e));
            }
        }
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn Job>>();
        let stats = Arc::new(WriterStats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("cairn-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, &st))
            .map_err(be)?;
        Ok(SqliteStore {
            path,
            tx,
            readers: Mutex::new(Vec::new()),
            reader_slots: tokio::sync::Semaphore::new(READERS),
            stats,
            last_repair: Arc::default(),
        })
    }

    /// Writer counters (commits vs. writes shows how much group commit merges).
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Runs `f` on the writer thread within a group commit; returns its result once the
    /// commit is on disk. `f` may run more than once: when another write in its batch fails
    /// after writing, the batch is rolled back and run again (see [`writer_loop`]).
    async fn write<R: Send + 'static>(
        &self,
        f: impl Fn(&Connection) -> StoreResult<R> + Send + 'static,
    ) -> StoreResult<R> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Box::new(WriteJob {
                f,
                out: None,
                reply,
            }))
            .map_err(|_| StoreError::Backend("writer thread stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Backend("writer thread dropped a request".into()))?
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> StoreResult<R> {
        let _slot = self
            .reader_slots
            .acquire()
            .await
            .map_err(|_| StoreError::Backend("store closed".into()))?;
        // Holding a slot guarantees an idle connection or room to open one.
        let conn = match self.readers.lock().pop() {
            Some(c) => c,
            None => open_conn(&self.path)?,
        };
        // Reads are short indexed lookups that WAL never makes wait for the writer, so they
        // run right here: handing each to a blocking thread cost more in thread wake-ups
        // than the read itself.
        let res = f(&conn);
        self.readers.lock().push(conn);
        res.map_err(be)
    }
}

/// Run a statement through the statement cache: the writer issues the same few
/// transaction-control statements for every job, and parsing them each time showed up in
/// profiles.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute([])
}

/// Applies write requests in batches, one transaction and one fsync per batch.
///
/// A job that fails must leave no trace while the rest of its batch commits. Most failures
/// (a lost lease, a superseded dispatch) are found before the job writes anything, so jobs
/// run without a savepoint of their own, and a failed job whose run changed no rows needs no
/// undo. Only when a job fails after writing is the batch rolled back and run again with a
/// savepoint around each job. A savepoint per job cost about 5 % of the server's runs/s: each
/// copies every page its job first touches into the sub-journal.
fn writer_loop(conn: Connection, rx: std::sync::mpsc::Receiver<Box<dyn Job>>, stats: &WriterStats) {
    use std::sync::atomic::Ordering::Relaxed;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let commit = match run_batch(&conn, &mut batch, false) {
            Ok(true) => commit(&conn),
            Ok(false) => {
                // A job failed after writing: undo the batch and run it again, guarded.
                let _ = exec_cached(&conn, "ROLLBACK");
                stats.replays.fetch_add(1, Relaxed);
                match run_batch(&conn, &mut batch, true) {
                    Ok(_) => commit(&conn),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &commit {
            tracing::error!(error = %e, "sqlite group commit failed");
        }
        metrics::histogram!("cairn_store_commit_batch_size").record(batch.len() as f64);
        stats.commits.fetch_add(1, Relaxed);
        stats.writes.fetch_add(batch.len() as u64, Relaxed);
        for job in batch {
            job.finish(commit.clone());
        }
    }
}

/// Opens a transaction and runs every job of `batch` in it. With `guarded`, each job runs in
/// a savepoint that is rolled back if it fails. Without, returns `Ok(false)` (leaving the
/// transaction open for the caller to roll back) as soon as a job fails after changing rows.
fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>], guarded: bool) -> Result<bool, String> {
    exec_cached(conn, "BEGIN IMMEDIATE").map_err(|e| e.to_string())?;
    for job in batch.iter_mut() {
        if guarded {
            let _ = exec_cached(conn, "SAVEPOINT job");
        }
        let before = conn.total_changes();
        // A panicking job must not take the only writer down with it.
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(conn)))
            .unwrap_or(false);
        // Some errors (a full disk, an I/O error) make SQLite roll the whole transaction
        // back; what ran before is gone, and what runs after would commit on its own.
        if conn.is_autocommit() {
            return Err("the transaction was rolled back by an error".into());
        }
        if guarded {
            if !ok {
                let _ = exec_cached(conn, "ROLLBACK TO job");
            }
            let _ = exec_cached(conn, "RELEASE job");
        } else if !ok && conn.total_changes() != before {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Commits the writer's transaction, rolling it back if the commit fails.
fn commit(conn: &Connection) -> Result<(), String> {
    exec_cached(conn, "COMMIT").map(|_| ()).map_err(|e| {
        let _ = exec_cached(conn, "ROLLBACK");
        e.to_string()
    })
}

fn j(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn pj(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

const EVENT_COLS: &str = "seq, internal_id, name, body, received_at, target_fn";

fn row_event(r: &Row) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        seq: r.get(0)?,
        internal_id: r.get(1)?,
        name: r.get(2)?,
        event: pj(&r.get::<_, String>(3)?),
        received_at: r.get(4)?,
        target_fn: r.get(5)?,
    })
}

const RUN_COLS: &str = "run_id, fn_slug, status, events, version, disable_immediate, pending, output, created_at, ended_at";

fn row_run(r: &Row) -> rusqlite::Result<Run> {
    let status: String = r.get(2)?;
    Ok(Run {
        run_id: r.get(0)?,
        fn_slug: r.get(1)?,
        status: RunStatus::parse(&status).unwrap_or(RunStatus::Running),
        events: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
        version: r.get(4)?,
        disable_immediate: r.get::<_, i64>(5)? != 0,
        pending: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
        output: r.get::<_, Option<String>>(7)?.map(|s| pj(&s)),
        created_at: r.get(8)?,
        ended_at: r.get(9)?,
    })
}

const PAUSE_COLS: &str =
    "id, run_id, step, kind, event_name, expr, correlation, trigger_event, expires_at, since_seq";

fn row_pause(r: &Row) -> rusqlite::Result<Pause> {
    let kind: String = r.get(3)?;
    Ok(Pause {
        id: r.get(0)?,
        run_id: r.get(1)?,
        step: r.get(2)?,
        kind: serde_json::from_value(Value::String(kind)).unwrap_or(PauseKind::Wait),
        event_name: r.get(4)?,
        expr: r.get(5)?,
        correlation: r.get(6)?,
        trigger: pj(&r.get::<_, String>(7)?),
        expires_at: r.get(8)?,
        since_seq: r.get(9)?,
    })
}

fn kind_str(k: PauseKind) -> String {
    match serde_json::to_value(k) {
        Ok(Value::String(s)) => s,
        _ => "wait".into(),
    }
}

fn insert_event(conn: &Connection, e: &NewEvent) -> rusqlite::Result<i64> {
    let name = e
        .event
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let user_id = e.event.get("id").and_then(Value::as_str);
    // A resent event (same seeded id) is stored once; the first copy stands.
    let n = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO events(internal_id, user_id, name, body, received_at, target_fn) VALUES (?,?,?,?,?,?)",
        )?
    .execute(params![e.internal_id, user_id, name, j(&e.event), e.received_at, e.target_fn])?;
    if n == 0 {
        return conn
            .prepare_cached("SELECT seq FROM events WHERE internal_id=?")?
            .query_row([&e.internal_id], |r| r.get(0));
    }
    Ok(conn.last_insert_rowid())
}

fn has_memo(conn: &Connection, run_id: &str, hash: &str) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM steps WHERE run_id=? AND hash=?")?
        .query_row(params![run_id, hash], |_| Ok(()))
        .optional()?
        .is_some())
}

fn insert_item(conn: &Connection, item: &NewItem) -> rusqlite::Result<()> {
    if let Some(h) = &item.unless_memo {
        if has_memo(conn, &item.run_id, h)? {
            return Ok(());
        }
    }
    if matches!(item.kind, ItemKind::Call { .. }) {
        // SDK calls are what step concurrency limits count.
        let ck: Option<Option<String>> = conn
            .prepare_cached("SELECT ck FROM runs WHERE run_id=?")?
            .query_row([&item.run_id], |r| r.get(0))
            .optional()?;
        if let Some(ck) = ck.flatten() {
            let slots: Vec<Slot> = serde_json::from_str(&ck).unwrap_or_default();
            return flow::insert_keyed(conn, item, &slots, None, None);
        }
    }
    conn.prepare_cached(
        "INSERT OR IGNORE INTO queue(id, run_id, kind, available_at, due_at, attempt) VALUES (?,?,?,?,?,0)",
    )?
    .execute(params![item.id, item.run_id, j(&item.kind), item.available_at, item.available_at])?;
    Ok(())
}

fn save_memo(conn: &Connection, run_id: &str, hash: &str, memo: &MemoJson) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO steps(run_id, hash, memo) VALUES (?,?,?)")?
        .execute(params![run_id, hash, memo.as_str()])?;
    Ok(())
}

/// A run's memoised steps, read for every SDK call. Sorted by `load_steps` rather than with
/// ORDER BY: the rows are found through the (run_id, hash) index, so SQLite would build a
/// temporary B-tree to sort a handful of rows.
const LOAD_STEPS: &str = "SELECT seq, hash, memo FROM steps WHERE run_id=?";

fn load_steps(conn: &Connection, run_id: &str) -> rusqlite::Result<Vec<(String, MemoJson)>> {
    let mut rows: Vec<(i64, String, MemoJson)> = conn
        .prepare_cached(LOAD_STEPS)?
        .query_map([run_id], |r| {
            Ok((r.get(0)?, r.get(1)?, MemoJson::stored(r.get(2)?)))
        })?
        .collect::<rusqlite::Result<_>>()?;
    rows.sort_unstable_by_key(|(seq, ..)| *seq);
    Ok(rows
        .into_iter()
        .map(|(_, hash, memo)| (hash, memo))
        .collect())
}

/// What the writer needs of a run to apply a result: not its trigger events or output, which
/// can be large and would be parsed on every step.
struct RunState {
    status: RunStatus,
    pending: Vec<String>,
    version: i64,
}

fn load_run_state(conn: &Connection, run_id: &str) -> rusqlite::Result<Option<RunState>> {
    conn.prepare_cached("SELECT status, pending, version FROM runs WHERE run_id=?")?
        .query_row([run_id], |r| {
            let status: String = r.get(0)?;
            Ok(RunState {
                status: RunStatus::parse(&status).unwrap_or(RunStatus::Running),
                pending: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
                version: r.get(2)?,
            })
        })
        .optional()
}

fn load_run(conn: &Connection, run_id: &str) -> rusqlite::Result<Option<Run>> {
    conn.prepare_cached(&format!("SELECT {RUN_COLS} FROM runs WHERE run_id=?"))?
        .query_row([run_id], row_run)
        .optional()
}

/// Ends a running run, clearing its queue and pauses and, with `finalize`, queueing
/// finalisation (without, the caller applies the run's lifecycle events itself).
fn finish_run(
    conn: &Connection,
    run_id: &str,
    finish: &Finish,
    now: i64,
    finalize: bool,
) -> rusqlite::Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE runs SET status=?, output=?, ended_at=?, pending='[]'
             WHERE run_id=? AND status='Running'",
        )?
        .execute(params![
            finish.status.as_str(),
            j(&finish.output),
            now,
            run_id
        ])?;
    if n == 0 {
        return Ok(false);
    }
    let held = flow::run_keys(conn, run_id, now)?;
    conn.prepare_cached("DELETE FROM queue WHERE run_id=?")?
        .execute([run_id])?;
    for key in &held {
        flow::free(conn, key)?;
    }
    conn.prepare_cached("DELETE FROM debounces WHERE run_id=?")?
        .execute([run_id])?;
    conn.prepare_cached("DELETE FROM batches WHERE run_id=?")?
        .execute([run_id])?;
    conn.prepare_cached("DELETE FROM pauses WHERE run_id=?")?
        .execute([run_id])?;
    if finalize {
        insert_item(conn, &finalize_item(run_id, now))?;
    }
    Ok(true)
}

/// A step of the run finished: coalesce parallel branches, then discover.
fn step_done(
    conn: &Connection,
    run_id: &str,
    steps: &[String],
    discovery: &NewItem,
) -> rusqlite::Result<()> {
    let Some(run) = load_run_state(conn, run_id)? else {
        return Ok(());
    };
    if run.status != RunStatus::Running {
        return Ok(());
    }
    if run.pending.iter().any(|p| steps.contains(p)) {
        let rest: Vec<&String> = run.pending.iter().filter(|p| !steps.contains(p)).collect();
        conn.prepare_cached("UPDATE runs SET pending=? WHERE run_id=?")?
            .execute(params![j(&rest), run_id])?;
        if !rest.is_empty() {
            return Ok(());
        }
        // Parallelism ended; version 2 lets the SDK run single steps inline again.
        if run.version >= 2 {
            conn.prepare_cached("UPDATE runs SET disable_immediate=0 WHERE run_id=?")?
                .execute([run_id])?;
        }
    }
    insert_item(conn, discovery)
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

fn resume_pause(conn: &Connection, pause: &Pause, event: &Value, now: i64) -> rusqlite::Result<()> {
    let n = conn
        .prepare_cached("DELETE FROM pauses WHERE id=?")?
        .execute([&pause.id])?;
    if n == 0 {
        return Ok(());
    }
    match pause.kind {
        PauseKind::Cancel => {
            finish_run(
                conn,
                &pause.run_id,
                &Finish {
                    status: RunStatus::Cancelled,
                    output: serde_json::json!({"error": "cancelled", "name": "Cancelled",
                        "message": format!("run cancelled by event {}", pause.event_name)}),
                },
                now,
                true,
            )?;
        }
        PauseKind::Wait | PauseKind::Invoke => {
            conn.prepare_cached("DELETE FROM queue WHERE id=?")?
                .execute([format!("{}:{}:timeout", pause.run_id, pause.step)])?;
            save_memo(conn, &pause.run_id, &pause.step, &resume_memo(pause, event))?;
            step_done(
                conn,
                &pause.run_id,
                std::slice::from_ref(&pause.step),
                &discovery_after(&pause.run_id, &pause.step, now),
            )?;
        }
    }
    Ok(())
}

fn insert_pause(conn: &Connection, p: &Pause) -> rusqlite::Result<bool> {
    let n = conn
        .prepare_cached(&format!(
            "INSERT OR IGNORE INTO pauses({PAUSE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
        ))?
        .execute(params![
            p.id,
            p.run_id,
            p.step,
            kind_str(p.kind),
            p.event_name,
            p.expr,
            p.correlation,
            j(&p.trigger),
            p.expires_at,
            p.since_seq
        ])?;
    Ok(n == 1)
}

/// Store and apply a run's lifecycle events, noting in `left` what they leave for the queue
/// loop and the matcher.
fn apply_lifecycle(
    conn: &Connection,
    events: &[(NewEvent, Vec<NewRun>)],
    matcher: &dyn PauseMatcher,
    now: i64,
    left: &mut Left,
) -> rusqlite::Result<()> {
    for (e, runs) in events {
        match insert_and_apply_event(conn, e, runs, matcher, now)? {
            Some(applied) => {
                left.queue |= left_for_queue(runs, &applied) || !applied.runs.is_empty()
            }
            None => left.matcher = true,
        }
    }
    Ok(())
}

fn apply_inner(
    conn: &Connection,
    a: &Apply,
    matcher: &dyn PauseMatcher,
    now: i64,
) -> StoreResult<Left> {
    let mut left = Left::default();
    let mut item_keys: Vec<String> = Vec::new();
    if let Some((id, owner)) = &a.item {
        type Held = (Option<String>, Option<String>, Option<String>);
        let held: Option<Held> = conn
            .prepare_cached("SELECT lease_owner, ck1, ck2 FROM queue WHERE id=?")
            .map_err(be)?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .map_err(be)?;
        let Some((lease_owner, ck1, ck2)) = held else {
            return Err(StoreError::LeaseLost(id.clone()));
        };
        if lease_owner.as_deref() != Some(owner.as_str()) {
            return Err(StoreError::LeaseLost(id.clone()));
        }
        item_keys.extend(ck1.into_iter().chain(ck2));
    }
    if let Some((id, at)) = &a.dispatch {
        let current: Option<i64> = conn
            // The item must be this run's: a checkpoint names both.
            .prepare_cached("SELECT available_at FROM queue WHERE id=? AND run_id=?")
            .map_err(be)?
            .query_row([id, &a.run_id], |r| r.get(0))
            .optional()
            .map_err(be)?;
        if current != Some(*at) {
            return Err(StoreError::LeaseLost(id.clone()));
        }
    }
    let run = load_run_state(conn, &a.run_id).map_err(be)?;
    let running = run
        .as_ref()
        .map(|r| r.status == RunStatus::Running)
        .unwrap_or(false);
    let mut sql = || -> rusqlite::Result<()> {
        if running {
            if let Some(v) = a.version {
                conn.prepare_cached("UPDATE runs SET version=? WHERE run_id=? AND version=-1")?
                    .execute(params![v, a.run_id])?;
            }
            if let Some(d) = a.disable_immediate {
                conn.prepare_cached("UPDATE runs SET disable_immediate=? WHERE run_id=?")?
                    .execute(params![d as i64, a.run_id])?;
            }
            for (hash, memo) in &a.memos {
                save_memo(conn, &a.run_id, hash, memo)?;
            }
            if !a.add_pending.is_empty() {
                let mut pending = run.as_ref().map(|r| r.pending.clone()).unwrap_or_default();
                for p in &a.add_pending {
                    if !pending.contains(p) && !has_memo(conn, &a.run_id, p)? {
                        pending.push(p.clone());
                    }
                }
                conn.prepare_cached("UPDATE runs SET pending=? WHERE run_id=?")?
                    .execute(params![j(&pending), a.run_id])?;
            }
            for item in &a.enqueue {
                insert_item(conn, item)?;
            }
            for (pause, timeout) in &a.pauses {
                if !insert_pause(conn, pause)? {
                    continue;
                }
                insert_item(conn, timeout)?;
                // Close the race with events that arrived while the SDK call was in flight:
                // they were matched before this pause existed.
                let candidates: Vec<StoredEvent> = conn
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLS} FROM events WHERE name=? AND seq>? AND processed=1 ORDER BY seq"
                    ))?
                    .query_map(params![pause.event_name, pause.since_seq], row_event)?
                    .collect::<Result<_, _>>()?;
                for ev in candidates {
                    if matcher.matches(pause, &ev.event) {
                        resume_pause(conn, pause, &ev.event, now)?;
                        break;
                    }
                }
            }
            if let Some((step, item)) = &a.complete_pending {
                step_done(conn, &a.run_id, step, item)?;
            }
            if let Some((pause_id, memo, item)) = &a.expire_pause {
                let n = conn
                    .prepare_cached("DELETE FROM pauses WHERE id=?")?
                    .execute([pause_id])?;
                if n == 1 {
                    if let ItemKind::Call {
                        predecessor: Some(step),
                        ..
                    } = &item.kind
                    {
                        save_memo(conn, &a.run_id, step, memo)?;
                        step_done(conn, &a.run_id, std::slice::from_ref(step), item)?;
                    }
                }
            }
        }
        for e in &a.events {
            insert_event(conn, e)?;
        }
        apply_lifecycle(conn, &a.apply_events, matcher, now, &mut left)?;
        if let Some(id) = &a.reset_attempt {
            conn.prepare_cached("UPDATE queue SET attempt=0 WHERE id=?")?
                .execute([id])?;
        }
        if running {
            if let Some(f) = &a.finish {
                let ended = finish_run(conn, &a.run_id, f, now, a.lifecycle.is_none())?;
                if let (true, Some(events)) = (ended, &a.lifecycle) {
                    apply_lifecycle(conn, events, matcher, now, &mut left)?;
                }
            }
        }
        if let Some((id, _)) = &a.item {
            let n = match a.retry {
                Some((attempt, at)) if running && a.finish.is_none() => conn
                    .prepare_cached(
                        "UPDATE queue SET attempt=?, available_at=?, due_at=?, lease_owner=NULL WHERE id=?",
                    )?
                    .execute(params![attempt, at, at, id])?,
                _ => conn
                    .prepare_cached("DELETE FROM queue WHERE id=?")?
                    .execute([id])?,
            };
            // When the run ended above, finish_run already freed this item's slots.
            if n == 1 {
                for key in &item_keys {
                    flow::free(conn, key)?;
                }
            }
        }
        Ok(())
    };
    sql().map_err(be)?;
    Ok(left)
}

/// Stores a new event and applies it with its planned runs in the caller's transaction,
/// unless an older event of its name is still unapplied: then it is only stored, the
/// matcher applies both in order, and `None` is returned.
fn insert_and_apply_event(
    conn: &Connection,
    e: &NewEvent,
    runs: &[NewRun],
    matcher: &dyn PauseMatcher,
    now: i64,
) -> rusqlite::Result<Option<EventApplied>> {
    let name = e.name();
    let backlog = conn
        .prepare_cached(
            "SELECT 1 FROM events INDEXED BY events_unprocessed_name
             WHERE processed=0 AND name=? LIMIT 1",
        )?
        .query_row([name], |_| Ok(()))
        .optional()?
        .is_some();
    let seq = insert_event(conn, e)?;
    if backlog {
        return Ok(None);
    }
    let runs = runs_after(runs, seq);
    apply_event_inner(conn, &e.stored(seq), &runs, &[], matcher, now).map(Some)
}

/// Create an event's runs (through flow control), resume or cancel the pauses it matches,
/// and mark it processed: the whole of applying one event, in the caller's transaction.
fn apply_event_inner(
    conn: &Connection,
    event: &StoredEvent,
    runs: &[NewRun],
    extra_events: &[NewEvent],
    matcher: &dyn PauseMatcher,
    now: i64,
) -> rusqlite::Result<EventApplied> {
    let mut created = Vec::new();
    // An event is applied once: a second delivery must not re-match pauses.
    let processed: Option<i64> = conn
        .prepare_cached("SELECT processed FROM events WHERE seq=?")?
        .query_row([event.seq], |r| r.get(0))
        .optional()?;
    if processed == Some(1) {
        return Ok(EventApplied::default());
    }
    for r in runs {
        // A redelivered event must not use up a rate limit or join a batch twice.
        let seen = conn
            .prepare_cached("SELECT 1 FROM runs WHERE fn_slug=? AND idem_key=?")?
            .query_row(params![r.fn_slug, r.idem_key], |_| Ok(()))
            .optional()?
            .is_some();
        if seen {
            continue;
        }
        let start_id = start_item_id(&r.run_id);
        let mut start = (r.start_at(now), None);
        if let flow::Admit::Absorbed = flow::admit(conn, r, now, &mut start)? {
            continue;
        }
        let fl = &r.flow;
        let ck = (!fl.concurrency.is_empty()).then(|| j(&fl.concurrency));
        let n = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO runs(run_id, fn_slug, idem_key, trigger_event, status, events,
                   created_at, ck, run_slot, started, singleton_key)
                 VALUES (?,?,?,?, 'Running', ?, ?, ?, ?, ?, ?)",
            )?
            .execute(params![
                r.run_id, r.fn_slug, r.idem_key, r.trigger_internal_id, j(&r.events),
                r.created_at, ck, fl.run_slot.as_ref().map(|s| &s.key),
                fl.run_slot.is_none() as i64, fl.singleton.as_ref().map(|s| &s.0)
            ])?;
        if n == 0 {
            continue;
        }
        for item in &r.items {
            if item.id == start_id {
                let item = NewItem {
                    available_at: start.0,
                    ..item.clone()
                };
                flow::insert_keyed(conn, &item, &fl.concurrency, fl.run_slot.as_ref(), start.1)?;
            } else {
                insert_item(conn, item)?;
            }
        }
        for p in &r.pauses {
            insert_pause(conn, p)?;
        }
        flow::after_create(conn, r, now)?;
        created.push(r.run_id.clone());
    }
    for e in extra_events {
        insert_event(conn, e)?;
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
        .flatten()
        .map(str::to_string);
    let mut pauses: Vec<Pause> = conn
        .prepare_cached(&format!(
            "SELECT {PAUSE_COLS} FROM pauses WHERE event_name=? AND since_seq<? AND correlation IS NULL"
        ))?
        .query_map(params![event.name, event.seq], row_pause)?
        .collect::<Result<_, _>>()?;
    if let Some(c) = &correlation {
        let by_corr: Vec<Pause> = conn
            .prepare_cached(&format!(
                "SELECT {PAUSE_COLS} FROM pauses WHERE correlation=?"
            ))?
            .query_map([c], row_pause)?
            .collect::<Result<_, _>>()?;
        pauses.extend(by_corr);
    }
    let mut resumed = false;
    for p in pauses {
        if p.event_name != event.name || p.expires_at < now {
            continue;
        }
        if matcher.matches(&p, &event.event) {
            resume_pause(conn, &p, &event.event, now)?;
            resumed = true;
        }
    }
    conn.prepare_cached("UPDATE events SET processed=1 WHERE seq=?")?
        .execute([event.seq])?;
    Ok(EventApplied {
        runs: created,
        resumed,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_events(&self, events: Vec<NewEvent>) -> StoreResult<Vec<i64>> {
        self.write(move |conn| {
            events
                .iter()
                .map(|e| insert_event(conn, e))
                .collect::<Result<Vec<_>, _>>()
                .map_err(be)
        })
        .await
    }

    async fn unprocessed_events(&self, limit: usize) -> StoreResult<Vec<StoredEvent>> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {EVENT_COLS} FROM events WHERE processed=0 ORDER BY seq LIMIT ?"
            ))?
            .query_map([limit as i64], row_event)?
            .collect()
        })
        .await
    }

    async fn event_high_water(&self) -> StoreResult<i64> {
        self.read(|c| {
            c.prepare_cached("SELECT coalesce(max(seq), 0) FROM events")?
                .query_row([], |r| r.get(0))
        })
        .await
    }

    async fn apply_event(
        &self,
        event: StoredEvent,
        runs: Vec<NewRun>,
        extra_events: Vec<NewEvent>,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
    ) -> StoreResult<Vec<String>> {
        self.write(move |conn| {
            apply_event_inner(conn, &event, &runs, &extra_events, matcher.as_ref(), now)
                .map(|applied| applied.runs)
                .map_err(be)
        })
        .await
    }

    async fn insert_and_apply(
        &self,
        events: Vec<(NewEvent, Vec<NewRun>)>,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
        lease: (String, i64, usize),
    ) -> StoreResult<(Vec<QueueItem>, Left)> {
        self.write(move |conn| {
            let go = || -> rusqlite::Result<(Vec<QueueItem>, Left)> {
                let (owner, lease_until, max) = &lease;
                let mut leased = Vec::new();
                let mut left = Left::default();
                // Events are applied in arrival order: with a backlog (say, after a crash)
                // these wait their turn behind it.
                let backlog = conn
                    .prepare_cached("SELECT 1 FROM events WHERE processed=0 LIMIT 1")?
                    .query_row([], |_| Ok(()))
                    .optional()?
                    .is_some();
                for (e, runs) in &events {
                    let seq = insert_event(conn, e)?;
                    if backlog {
                        left.matcher = true;
                        continue;
                    }
                    let applied = apply_event_inner(
                        conn,
                        &e.stored(seq),
                        &runs_after(runs, seq),
                        &[],
                        matcher.as_ref(),
                        now,
                    )?;
                    left.queue |= left_for_queue(runs, &applied);
                    for run_id in applied.runs {
                        let next = if leased.len() < *max {
                            flow::lease_next(conn, &run_id, owner, now, *lease_until)?
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
            };
            go().map_err(be)
        })
        .await
    }

    async fn get_event(&self, id: &str) -> StoreResult<Option<StoredEvent>> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {EVENT_COLS} FROM events WHERE internal_id=?1 OR user_id=?1 ORDER BY seq DESC LIMIT 1"
            ))?
            .query_row([id], row_event)
            .optional()
        })
        .await
    }

    async fn list_events(
        &self,
        limit: usize,
        name: Option<String>,
    ) -> StoreResult<Vec<StoredEvent>> {
        self.read(move |c| match name {
            Some(n) => c
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLS} FROM events WHERE name=? ORDER BY seq DESC LIMIT ?"
                ))?
                .query_map(params![n, limit as i64], row_event)?
                .collect(),
            None => c
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLS} FROM events ORDER BY seq DESC LIMIT ?"
                ))?
                .query_map([limit as i64], row_event)?
                .collect(),
        })
        .await
    }

    async fn runs_for_event(&self, internal_id: &str) -> StoreResult<Vec<Run>> {
        let id = internal_id.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {RUN_COLS} FROM runs WHERE trigger_event=?1
                 OR run_id IN (SELECT run_id FROM run_triggers WHERE internal_id=?1)"
            ))?
            .query_map([id], row_run)?
            .collect::<rusqlite::Result<Vec<Run>>>()
            // Sorted here: ORDER BY over the two indexes' union needs a temporary B-tree.
            .map(|mut runs| {
                runs.sort_unstable_by(|a, b| a.run_id.cmp(&b.run_id));
                runs
            })
        })
        .await
    }

    async fn skips_for_event(&self, internal_id: &str) -> StoreResult<Vec<Skip>> {
        let id = internal_id.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT fn_slug, reason, at FROM skips WHERE internal_id=? ORDER BY seq",
            )?
            .query_map([id], |r| {
                let reason: String = r.get(1)?;
                Ok(Skip {
                    fn_slug: r.get(0)?,
                    reason: SkipReason::parse(&reason).unwrap_or(SkipReason::RateLimit),
                    at: r.get(2)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn run_queue(&self, run_id: &str, now: i64) -> StoreResult<Vec<QueueInfo>> {
        let id = run_id.to_string();
        self.read(move |c| flow::run_queue(c, &id, now)).await
    }

    async fn sync_app(&self, app: AppRecord, functions: Vec<FunctionRecord>) -> StoreResult<bool> {
        self.write(move |conn| {
            let f = || -> rusqlite::Result<bool> {
                let old: Option<(String, String)> = conn
                    .query_row(
                        "SELECT checksum, url FROM apps WHERE name=?",
                        [&app.name],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let modified = old
                    .map(|(c, u)| c != app.checksum || u != app.url)
                    .unwrap_or(true);
                conn.execute(
                    "INSERT INTO apps(name, url, sdk, checksum, synced_at) VALUES (?,?,?,?,?)
                     ON CONFLICT(name) DO UPDATE SET url=excluded.url, sdk=excluded.sdk,
                     checksum=excluded.checksum, synced_at=excluded.synced_at",
                    params![app.name, app.url, app.sdk, app.checksum, app.synced_at],
                )?;
                conn.execute("DELETE FROM functions WHERE app=?", [&app.name])?;
                for f in &functions {
                    conn.execute(
                        "INSERT INTO functions(slug, app, config) VALUES (?,?,?)
                         ON CONFLICT(slug) DO UPDATE SET app=excluded.app, config=excluded.config",
                        params![f.slug, f.app, j(&f.config)],
                    )?;
                }
                Ok(modified)
            };
            f().map_err(be)
        })
        .await
    }

    async fn apps(&self) -> StoreResult<Vec<AppRecord>> {
        self.read(|c| {
            c.prepare_cached("SELECT name, url, sdk, checksum, synced_at FROM apps ORDER BY name")?
                .query_map([], |r| {
                    Ok(AppRecord {
                        name: r.get(0)?,
                        url: r.get(1)?,
                        sdk: r.get(2)?,
                        checksum: r.get(3)?,
                        synced_at: r.get(4)?,
                    })
                })?
                .collect()
        })
        .await
    }

    async fn functions(&self) -> StoreResult<Vec<FunctionRecord>> {
        self.read(|c| {
            c.prepare_cached("SELECT slug, app, config FROM functions ORDER BY slug")?
                .query_map([], |r| {
                    Ok(FunctionRecord {
                        slug: r.get(0)?,
                        app: r.get(1)?,
                        config: pj(&r.get::<_, String>(2)?),
                    })
                })?
                .collect()
        })
        .await
    }

    async fn get_run(&self, run_id: &str) -> StoreResult<Option<Run>> {
        let id = run_id.to_string();
        self.read(move |c| load_run(c, &id)).await
    }

    async fn steps(&self, run_id: &str) -> StoreResult<Vec<(String, MemoJson)>> {
        let id = run_id.to_string();
        self.read(move |c| load_steps(c, &id)).await
    }

    async fn call_state(&self, run_id: &str) -> StoreResult<Option<CallState>> {
        let id = run_id.to_string();
        self.read(move |c| {
            // One read transaction, so the three agree with each other.
            let tx = c.unchecked_transaction()?;
            let Some(run) = load_run(&tx, &id)? else {
                return Ok(None);
            };
            let steps = load_steps(&tx, &id)?;
            let high_water = tx
                .prepare_cached("SELECT coalesce(max(seq), 0) FROM events")?
                .query_row([], |r| r.get(0))?;
            Ok(Some(CallState {
                run,
                steps,
                high_water,
            }))
        })
        .await
    }

    async fn apply(
        &self,
        apply: Apply,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
    ) -> StoreResult<()> {
        self.write(move |conn| apply_inner(conn, &apply, matcher.as_ref(), now).map(|_| ()))
            .await
    }

    async fn apply_and_continue(
        &self,
        apply: Apply,
        matcher: Arc<dyn PauseMatcher>,
        now: i64,
        owner: &str,
        lease_until: i64,
    ) -> StoreResult<(Option<QueueItem>, Left)> {
        let owner = owner.to_string();
        self.write(move |conn| {
            let left = apply_inner(conn, &apply, matcher.as_ref(), now)?;
            let next = flow::lease_next(conn, &apply.run_id, &owner, now, lease_until);
            Ok((next.map_err(be)?, left))
        })
        .await
    }

    async fn cancel_run(&self, run_id: &str, now: i64) -> StoreResult<bool> {
        let id = run_id.to_string();
        self.write(move |conn| {
            finish_run(
                conn,
                &id,
                &Finish {
                    status: RunStatus::Cancelled,
                    output: serde_json::json!({"error": "cancelled", "name": "Cancelled", "message": "run cancelled via API"}),
                },
                now,
                true,
            )
            .map_err(be)
        })
        .await
    }

    async fn claim(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> StoreResult<Vec<QueueItem>> {
        let owner = owner.to_string();
        let last = self.last_repair.clone();
        self.write(move |conn| {
            use std::sync::atomic::Ordering::Relaxed;
            let repair = now - last.load(Relaxed) >= flow::REPAIR_EVERY_MS;
            if repair {
                last.store(now, Relaxed);
            }
            flow::claim(conn, &owner, now, lease_until, limit, repair).map_err(be)
        })
        .await
    }

    async fn renew(
        &self,
        owner: &str,
        ids: Vec<String>,
        lease_until: i64,
    ) -> StoreResult<Vec<String>> {
        let owner = owner.to_string();
        self.write(move |conn| {
            let mut held = Vec::with_capacity(ids.len());
            for id in &ids {
                let n = conn
                    .prepare_cached("UPDATE queue SET due_at=? WHERE id=? AND lease_owner=?")
                    .and_then(|mut s| s.execute(params![lease_until, id, owner]))
                    .map_err(be)?;
                if n == 1 {
                    held.push(id.clone());
                }
            }
            Ok(held)
        })
        .await
    }

    async fn release(&self, owner: &str, id: &str) -> StoreResult<()> {
        let (owner, id) = (owner.to_string(), id.to_string());
        self.write(move |conn| {
            let go = || -> rusqlite::Result<()> {
                let keys = flow::item_keys(conn, &id)?;
                let n = conn.execute(
                    "UPDATE queue SET lease_owner=NULL, due_at=available_at WHERE id=? AND lease_owner=?",
                    params![id, owner],
                )?;
                if n == 1 {
                    for key in &keys {
                        flow::free(conn, key)?;
                    }
                }
                Ok(())
            };
            go().map_err(be)
        })
        .await
    }

    async fn next_due(&self) -> StoreResult<Option<i64>> {
        self.read(|c| {
            c.query_row(
                "SELECT min(due_at) FROM queue WHERE blocked_on IS NULL",
                [],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn queue_depth(&self) -> StoreResult<i64> {
        self.read(|c| c.query_row("SELECT count(*) FROM queue", [], |r| r.get(0)))
            .await
    }

    async fn prune(&self, before: i64) -> StoreResult<(u64, u64)> {
        self.write(move |conn| {
            let go = || -> rusqlite::Result<(u64, u64)> {
                // Bounded batches keep each group commit short.
                conn.execute(
                    "DELETE FROM steps WHERE run_id IN (SELECT run_id FROM runs
                     WHERE status != 'Running' AND ended_at < ?1 LIMIT 5000)",
                    [before],
                )?;
                let runs = conn.execute(
                    "DELETE FROM runs WHERE run_id IN (SELECT run_id FROM runs
                     WHERE status != 'Running' AND ended_at < ?1 LIMIT 5000)",
                    [before],
                )?;
                let events = conn.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events
                     WHERE processed = 1 AND received_at < ?1 LIMIT 5000)",
                    [before],
                )?;
                // Flow-control leftovers: limits whose window has passed, old skip records,
                // batch links of runs that are gone.
                conn.execute("DELETE FROM gcra WHERE tat < ?1", [before])?;
                conn.execute("DELETE FROM skips WHERE at < ?1", [before])?;
                conn.execute(
                    "DELETE FROM run_triggers WHERE rowid IN (SELECT t.rowid FROM run_triggers t
                     LEFT JOIN runs r ON r.run_id = t.run_id WHERE r.run_id IS NULL LIMIT 5000)",
                    [],
                )?;
                Ok((runs as u64, events as u64))
            };
            go().map_err(be)
        })
        .await
    }

    async fn cron_last(&self, fn_slug: &str, schedule: &str) -> StoreResult<Option<i64>> {
        let (f, s) = (fn_slug.to_string(), schedule.to_string());
        self.read(move |c| {
            c.query_row(
                "SELECT last_tick FROM cron WHERE fn_slug=? AND schedule=?",
                params![f, s],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn fire_cron(
        &self,
        fn_slug: &str,
        schedule: &str,
        tick: i64,
        event: Option<NewEvent>,
    ) -> StoreResult<bool> {
        let (f, s) = (fn_slug.to_string(), schedule.to_string());
        self.write(move |conn| {
            let go = || -> rusqlite::Result<bool> {
                let n = conn.execute(
                    "INSERT INTO cron(fn_slug, schedule, last_tick) VALUES (?1,?2,?3)
                     ON CONFLICT(fn_slug, schedule) DO UPDATE SET last_tick=excluded.last_tick
                     WHERE cron.last_tick < excluded.last_tick",
                    params![f, s, tick],
                )?;
                if n == 0 {
                    return Ok(false);
                }
                if let Some(e) = &event {
                    insert_event(conn, e)?;
                }
                Ok(true)
            };
            go().map_err(be)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    /// A write that inserts cron row `name`, then fails if `fail` (after writing, or before
    /// when `fail_first`).
    fn cron_write(
        store: &Arc<SqliteStore>,
        name: &'static str,
        fail: bool,
        fail_first: bool,
    ) -> tokio::task::JoinHandle<StoreResult<()>> {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(move |conn| {
                    if fail && fail_first {
                        return Err(StoreError::LeaseLost(name.into()));
                    }
                    conn.execute(
                        "INSERT INTO cron(fn_slug, schedule, last_tick) VALUES (?, '* * * * *', 1)",
                        [name],
                    )
                    .map_err(be)?;
                    if fail {
                        return Err(StoreError::LeaseLost(name.into()));
                    }
                    Ok(())
                })
                .await
        })
    }

    /// Holds the writer for a moment, so that the writes sent meanwhile share one batch.
    fn hold_writer(store: &Arc<SqliteStore>) -> tokio::task::JoinHandle<StoreResult<()>> {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    Ok(())
                })
                .await
        })
    }

    async fn cron_rows(store: &SqliteStore) -> Vec<String> {
        store
            .read(|c| {
                c.prepare("SELECT fn_slug FROM cron ORDER BY fn_slug")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .await
            .unwrap()
    }

    /// Runs a write, a failing write and another write in one batch; the store (with its
    /// directory, removed on drop) and which of the three succeeded.
    async fn batch_with_one_failure(
        fail_first: bool,
    ) -> (Arc<SqliteStore>, Vec<bool>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path().join("w.db")).unwrap());
        let hold = hold_writer(&store);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let writes = [
            cron_write(&store, "a", false, false),
            cron_write(&store, "bad", true, fail_first),
            cron_write(&store, "c", false, false),
        ];
        hold.await.unwrap().unwrap();
        let mut ok = Vec::new();
        for w in writes {
            ok.push(w.await.unwrap().is_ok());
        }
        assert_eq!(cron_rows(&store).await, ["a", "c"]);
        assert_eq!(
            store.stats().commits.load(Relaxed),
            2,
            "the three writes shared one commit"
        );
        (store, ok, dir)
    }

    /// A write that fails after writing leaves nothing behind, and the writes batched with it
    /// still commit: the batch is rolled back and run again with a savepoint per write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_failing_after_writing_is_undone_alone() {
        let (store, ok, _dir) = batch_with_one_failure(false).await;
        assert_eq!(ok, [true, false, true]);
        assert_eq!(store.stats().replays.load(Relaxed), 1);
    }

    /// A write that fails before writing anything (a lost lease) needs no undo: its batch
    /// commits without being run again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_failing_before_writing_costs_no_replay() {
        let (store, ok, _dir) = batch_with_one_failure(true).await;
        assert_eq!(ok, [true, false, true]);
        assert_eq!(store.stats().replays.load(Relaxed), 0);
    }
}
