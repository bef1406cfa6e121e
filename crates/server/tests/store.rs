//! One behaviour suite, two backends: every test here runs against the SQLite store on real
//! files in temp dirs and against the PostgreSQL store in a fresh schema of its own.
//!
//! PostgreSQL comes from `CAIRN_TEST_PG_URL` (default: the local server's `test` database).
//! When it cannot be reached the PostgreSQL variants fail: CI starts the server, and a
//! silently skipped backend would be a backend nobody tests.

use cairn_server::store::*;
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

struct AlwaysMatch;
impl PauseMatcher for AlwaysMatch {
    fn matches(&self, p: &Pause, e: &Value) -> bool {
        e["name"] == json!(p.event_name)
    }
}

fn matcher() -> Arc<dyn PauseMatcher> {
    Arc::new(AlwaysMatch)
}

fn ev(name: &str) -> NewEvent {
    let id = ulid::Ulid::new().to_string();
    NewEvent {
        internal_id: id.clone(),
        event: json!({"name": name, "id": id, "data": {}, "ts": 1}),
        received_at: 1,
        target_fn: None,
    }
}

/// The PostgreSQL server the tests use.
fn pg_url() -> String {
    std::env::var("CAIRN_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Where one test keeps its data; opening it again sees what an earlier store wrote.
enum Db {
    Sqlite(tempfile::TempDir),
    Pg(String),
}

impl Db {
    fn sqlite() -> Db {
        Db::Sqlite(tempfile::tempdir().unwrap())
    }

    /// A fresh schema; the store creates it on first open.
    fn pg() -> Db {
        Db::Pg(format!(
            "cairn_test_{}",
            ulid::Ulid::new().to_string().to_lowercase()
        ))
    }

    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Db::Sqlite(dir) => Arc::new(SqliteStore::open(dir.path().join("db.sqlite")).unwrap()),
            Db::Pg(schema) => Arc::new(pg_open(schema).await),
        }
    }

    /// Drop a PostgreSQL test's schema (a failed test leaves it behind for inspection).
    async fn cleanup(self) {
        if let Db::Pg(schema) = self {
            let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await
                .unwrap();
        }
    }
}

async fn pg_open(schema: &str) -> PostgresStore {
    let opts = PgOptions {
        pool_size: 4,
        schema: Some(schema.to_string()),
        ..Default::default()
    };
    match PostgresStore::connect(&pg_url(), opts).await {
        Ok(s) => s,
        Err(e) => panic!(
            "PostgreSQL store tests need a server ({}; set CAIRN_TEST_PG_URL or start it): {e}",
            pg_url()
        ),
    }
}

/// Runs `async fn $name(db: &Db)` once per backend, as `$name::sqlite` and `$name::postgres`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let db = super::Db::sqlite();
                super::$name(&db).await;
                db.cleanup().await;
            }

            #[tokio::test]
            async fn postgres() {
                let db = super::Db::pg();
                super::$name(&db).await;
                db.cleanup().await;
            }
        }
    )*};
}

both_backends!(
    events_survive_reopen_and_stay_unprocessed_until_applied,
    memo_first_write_wins_and_lease_guards_results,
    a_lease_is_renewed_only_while_its_holder_still_has_it,
    pause_created_after_event_is_still_resumed,
    finishing_a_run_clears_work_and_queues_finalisation,
    a_result_that_ends_the_run_applies_its_lifecycle_events_in_the_same_commit,
    cron_ticks_fire_once,
    prune_deletes_only_old_finished_history,
    writes_from_a_superseded_dispatch_are_refused,
    cancel_rules_see_only_events_after_the_trigger,
    flow_control_admission,
    events_applied_with_a_result_skip_the_matcher_unless_one_of_their_name_waits,
    watching_a_run_tells_whether_it_still_runs,
    a_run_that_ends_frees_its_run_slot_at_once,
    a_run_is_created_once_per_idempotency_key,
);

/// A second run of a function with an idempotency key it already has a run for (a resent
/// event, the same key from another event) is not created and queues nothing, with flow
/// control or without.
async fn a_run_is_created_once_per_idempotency_key(db: &Db) {
    let store = db.open().await;
    for (n, flow) in [
        RunFlow::default(),
        RunFlow {
            priority_ms: 5,
            ..Default::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let (first, second) = (format!("K{n}a"), format!("K{n}b"));
        let mut created = Vec::new();
        for run_id in [&first, &second] {
            store.insert_events(vec![ev("t/idem")]).await.unwrap();
            let stored = store.unprocessed_events(1).await.unwrap().remove(0);
            let mut run = new_run(&stored, run_id, flow.clone());
            run.idem_key = format!("key-{n}");
            created.extend(
                store
                    .apply_event(stored, vec![run], vec![], matcher(), 1)
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(created, std::slice::from_ref(&first), "flow {n}");
        assert!(store.get_run(&second).await.unwrap().is_none());
        assert!(store.run_queue(&second, 1).await.unwrap().is_empty());
        assert_eq!(store.run_queue(&first, 1).await.unwrap().len(), 1);
    }
}

/// Lifecycle events applied in the commit of a result (finalisation's): stored processed with
/// their runs created, so the matcher has nothing to do; behind an older unapplied event of
/// the same name they are only stored, and the matcher takes both in order.
async fn events_applied_with_a_result_skip_the_matcher_unless_one_of_their_name_waits(db: &Db) {
    let store = db.open().await;
    let run_id = make_run(&*store, "R1").await;
    // A run for the applied event, planned as the executor would (sequence number unknown).
    let planned =
        |e: &NewEvent, run_id: &str| vec![new_run(&e.stored(0), run_id, RunFlow::default())];
    let apply_with = |e: NewEvent, child: &str| Apply {
        run_id: run_id.clone(),
        apply_events: vec![(e.clone(), planned(&e, child))],
        ..Default::default()
    };
    let done = ev("t/done");
    store
        .apply(apply_with(done.clone(), "C1"), matcher(), 5)
        .await
        .unwrap();
    assert!(store.unprocessed_events(10).await.unwrap().is_empty());
    let runs = store.runs_for_event(&done.internal_id).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].run_id, "C1");

    // An older event of the name still waits: the new one queues up behind it.
    let older = ev("t/done");
    store.insert_events(vec![older.clone()]).await.unwrap();
    let later = ev("t/done");
    store
        .apply(apply_with(later.clone(), "C2"), matcher(), 6)
        .await
        .unwrap();
    let waiting: Vec<String> = store
        .unprocessed_events(10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.internal_id)
        .collect();
    assert_eq!(waiting, [older.internal_id, later.internal_id.clone()]);
    assert!(store
        .runs_for_event(&later.internal_id)
        .await
        .unwrap()
        .is_empty());
}

/// Insert one event and create a run from it; returns the run id.
async fn make_run(store: &dyn Store, run_id: &str) -> String {
    store.insert_events(vec![ev("t/start")]).await.unwrap();
    let stored = store.unprocessed_events(1).await.unwrap().remove(0);
    let run = NewRun {
        run_id: run_id.to_string(),
        fn_slug: "app-fn".into(),
        idem_key: stored.internal_id.clone(),
        events: vec![stored.event.clone()],
        trigger_internal_id: stored.internal_id.clone(),
        created_at: 1,
        items: vec![NewItem {
            id: format!("{run_id}:start"),
            run_id: run_id.to_string(),
            kind: ItemKind::Call {
                step: None,
                predecessor: None,
            },
            available_at: 0,
            unless_memo: None,
        }],
        pauses: vec![],
        flow: Default::default(),
    };
    let created = store
        .apply_event(stored, vec![run], vec![], matcher(), 1)
        .await
        .unwrap();
    assert_eq!(created, vec![run_id.to_string()]);
    run_id.to_string()
}

/// SQLite only: group commit is how its single writer keeps up.
#[tokio::test]
async fn concurrent_writes_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("db.sqlite")).unwrap());
    let before = store.stats().commits.load(Relaxed);
    let futs = (0..400).map(|_| {
        let s = store.clone();
        tokio::spawn(async move { s.insert_events(vec![ev("t/x")]).await.unwrap() })
    });
    for f in futures::future::join_all(futs).await {
        f.unwrap();
    }
    let commits = store.stats().commits.load(Relaxed) - before;
    assert!(
        commits < 400,
        "no group commit: {commits} commits for 400 writes"
    );
    assert_eq!(store.list_events(1000, None).await.unwrap().len(), 400);
}

async fn events_survive_reopen_and_stay_unprocessed_until_applied(db: &Db) {
    {
        let store = db.open().await;
        store
            .insert_events(vec![ev("a/1"), ev("a/2")])
            .await
            .unwrap();
    }
    let store = db.open().await;
    let un = store.unprocessed_events(10).await.unwrap();
    assert_eq!(
        un.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["a/1", "a/2"]
    );
    store
        .apply_event(un[0].clone(), vec![], vec![], matcher(), 1)
        .await
        .unwrap();
    assert_eq!(store.unprocessed_events(10).await.unwrap().len(), 1);
}

async fn memo_first_write_wins_and_lease_guards_results(db: &Db) {
    let store = db.open().await;
    let run = make_run(&*store, "RUN1").await;
    let items = store.claim("A", 10, 1000, 10).await.unwrap();
    assert_eq!(items.len(), 1);
    // Leased: nobody else gets it before expiry.
    assert!(store.claim("B", 500, 2000, 10).await.unwrap().is_empty());
    assert_eq!(store.next_due().await.unwrap(), Some(1000));
    // After expiry B takes it, and A's late result is refused.
    let stolen = store.claim("B", 1001, 3000, 10).await.unwrap();
    assert_eq!(stolen.len(), 1);
    let late = Apply {
        item: Some((items[0].id.clone(), "A".into())),
        run_id: run.clone(),
        memos: vec![("h1".into(), MemoJson::new(&json!({"data": "late"})))],
        ..Default::default()
    };
    assert!(matches!(
        store.apply(late, matcher(), 5).await,
        Err(StoreError::LeaseLost(_))
    ));
    assert!(store.steps(&run).await.unwrap().is_empty());

    let ok = Apply {
        item: Some((items[0].id.clone(), "B".into())),
        run_id: run.clone(),
        memos: vec![("h1".into(), MemoJson::new(&json!({"data": "first"})))],
        ..Default::default()
    };
    store.apply(ok, matcher(), 5).await.unwrap();
    let again = Apply {
        run_id: run.clone(),
        memos: vec![("h1".into(), MemoJson::new(&json!({"data": "second"})))],
        ..Default::default()
    };
    store.apply(again, matcher(), 6).await.unwrap();
    assert_eq!(
        store.steps(&run).await.unwrap(),
        vec![("h1".to_string(), MemoJson::new(&json!({"data": "first"})))]
    );
    assert_eq!(store.queue_depth().await.unwrap(), 0);
}

/// Renewing tells the holder which of its items are still its own: one whose lease lapsed
/// and was taken over, or that has gone, is not renewed and not returned. A lapsed lease
/// nobody has taken yet is still its holder's.
async fn a_lease_is_renewed_only_while_its_holder_still_has_it(db: &Db) {
    let store = db.open().await;
    let run = make_run(&*store, "RUNL").await;
    let items = store.claim("A", 10, 1000, 10).await.unwrap();
    let id = items[0].id.clone();
    let renewed = store
        .renew("A", vec![id.clone(), "no-such-item".into()], 1500)
        .await
        .unwrap();
    assert_eq!(renewed, vec![id.clone()]);
    assert!(store.claim("B", 1200, 2200, 10).await.unwrap().is_empty());
    // Lapsed at 1500 but not taken: renewing keeps it A's.
    assert_eq!(
        store.renew("A", vec![id.clone()], 2500).await.unwrap(),
        vec![id.clone()]
    );
    assert!(store.claim("B", 2000, 3000, 10).await.unwrap().is_empty());
    // Taken over after it lapsed again: A's renewal neither succeeds nor moves B's lease.
    assert_eq!(store.claim("B", 2600, 4000, 10).await.unwrap().len(), 1);
    assert!(store
        .renew("A", vec![id.clone()], 9000)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.next_due().await.unwrap(), Some(4000));
    assert_eq!(
        store.renew("B", vec![id.clone()], 5000).await.unwrap(),
        vec![id.clone()]
    );
    // Gone once its result is applied.
    let done = Apply {
        item: Some((id.clone(), "B".into())),
        run_id: run,
        ..Default::default()
    };
    store.apply(done, matcher(), 2700).await.unwrap();
    assert!(store.renew("B", vec![id], 6000).await.unwrap().is_empty());
}

async fn pause_created_after_event_is_still_resumed(db: &Db) {
    let store = db.open().await;
    let run = make_run(&*store, "RUN2").await;
    let since = store.event_high_water().await.unwrap();
    // The event arrives and is matched before the pause exists.
    store.insert_events(vec![ev("t/resume")]).await.unwrap();
    let e = store.unprocessed_events(1).await.unwrap().remove(0);
    store
        .apply_event(e, vec![], vec![], matcher(), 2)
        .await
        .unwrap();
    let pause = Pause {
        id: format!("{run}:w:pause"),
        run_id: run.clone(),
        step: "w".into(),
        kind: PauseKind::Wait,
        event_name: "t/resume".into(),
        expr: None,
        correlation: None,
        trigger: json!({}),
        expires_at: 10_000,
        since_seq: since,
    };
    let timeout = NewItem {
        id: format!("{run}:w:timeout"),
        run_id: run.clone(),
        kind: ItemKind::PauseTimeout {
            pause_id: pause.id.clone(),
            step: "w".into(),
            invoke: false,
        },
        available_at: 10_000,
        unless_memo: None,
    };
    store
        .apply(
            Apply {
                run_id: run.clone(),
                pauses: vec![(pause, timeout)],
                ..Default::default()
            },
            matcher(),
            3,
        )
        .await
        .unwrap();
    let steps = store.steps(&run).await.unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].1.to_value()["name"], "t/resume");
    // The timeout is gone and a discovery call is queued instead.
    let items = store.claim("A", 5, 100, 10).await.unwrap();
    let kinds: Vec<_> = items.iter().map(|i| i.kind.clone()).collect();
    assert!(
        kinds.contains(&ItemKind::Call {
            step: None,
            predecessor: Some("w".into())
        }),
        "{kinds:?}"
    );
    assert!(!kinds
        .iter()
        .any(|k| matches!(k, ItemKind::PauseTimeout { .. })));
}

async fn finishing_a_run_clears_work_and_queues_finalisation(db: &Db) {
    let store = db.open().await;
    let run = make_run(&*store, "RUN3").await;
    assert!(store.cancel_run(&run, 9).await.unwrap());
    assert!(!store.cancel_run(&run, 9).await.unwrap(), "cancelled twice");
    assert_eq!(
        store.get_run(&run).await.unwrap().unwrap().status,
        RunStatus::Cancelled
    );
    let items = store.claim("A", 100, 200, 10).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].kind, ItemKind::Finalize);
}

/// A result that ends its run and brings the run's lifecycle events stores them with the end
/// and queues no finalisation; a result for a run that has already ended stores none.
async fn a_result_that_ends_the_run_applies_its_lifecycle_events_in_the_same_commit(db: &Db) {
    let store = db.open().await;
    let finish = |run: &str, owner: Option<(String, String)>| Apply {
        item: owner,
        run_id: run.to_string(),
        finish: Some(Finish {
            status: RunStatus::Completed,
            output: json!({"ok": true}),
        }),
        lifecycle: Some(vec![(ev("inngest/function.finished"), vec![])]),
        ..Default::default()
    };
    let run = make_run(&*store, "RUN4").await;
    let items = store.claim("A", 10, 1000, 10).await.unwrap();
    assert_eq!(items.len(), 1);
    store
        .apply(
            finish(&run, Some((items[0].id.clone(), "A".into()))),
            matcher(),
            11,
        )
        .await
        .unwrap();
    assert_eq!(
        store.get_run(&run).await.unwrap().unwrap().status,
        RunStatus::Completed
    );
    assert_eq!(
        store.queue_depth().await.unwrap(),
        0,
        "no finalisation item"
    );
    let finished = store
        .list_events(10, Some("inngest/function.finished".into()))
        .await
        .unwrap();
    assert_eq!(finished.len(), 1);
    assert!(
        store.unprocessed_events(10).await.unwrap().is_empty(),
        "applied in the same commit"
    );
    // The run has ended: a second end (another worker's stale result) emits nothing.
    store
        .apply(finish(&run, None), matcher(), 12)
        .await
        .unwrap();
    assert_eq!(
        store
            .list_events(10, Some("inngest/function.finished".into()))
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn cron_ticks_fire_once(db: &Db) {
    let store = db.open().await;
    assert!(store
        .fire_cron(
            "f",
            "* * * * *",
            60_000,
            Some(ev("inngest/scheduled.timer"))
        )
        .await
        .unwrap());
    assert!(!store
        .fire_cron(
            "f",
            "* * * * *",
            60_000,
            Some(ev("inngest/scheduled.timer"))
        )
        .await
        .unwrap());
    assert!(!store
        .fire_cron("f", "* * * * *", 0, Some(ev("inngest/scheduled.timer")))
        .await
        .unwrap());
    assert_eq!(
        store.cron_last("f", "* * * * *").await.unwrap(),
        Some(60_000)
    );
    assert_eq!(store.list_events(10, None).await.unwrap().len(), 1);
}

#[test]
fn refuses_newer_schema_and_garbage_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    drop(SqliteStore::open(&path).unwrap());
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA user_version=99").unwrap();
    }
    assert!(matches!(
        SqliteStore::open(&path),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));

    let junk = dir.path().join("junk.sqlite");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let err = SqliteStore::open(&junk).err().expect("garbage accepted");
    assert!(matches!(err, StoreError::Unusable(_)), "{err}");
    // Never reset: the bytes are untouched.
    assert_eq!(std::fs::read(&junk).unwrap(), vec![0x42u8; 8192]);
}

async fn prune_deletes_only_old_finished_history(db: &Db) {
    let store = db.open().await;
    let done = make_run(&*store, "OLD").await;
    let live = make_run(&*store, "LIVE").await;
    store
        .apply(
            Apply {
                run_id: done.clone(),
                memos: vec![("h".into(), MemoJson::new(&json!(1)))],
                ..Default::default()
            },
            matcher(),
            2,
        )
        .await
        .unwrap();
    assert!(store.cancel_run(&done, 10).await.unwrap());
    store
        .insert_events(vec![ev("t/unprocessed")])
        .await
        .unwrap();
    let (runs, events) = store.prune(100).await.unwrap();
    assert_eq!(
        (runs, events),
        (1, 2),
        "one ended run, two processed trigger events"
    );
    assert!(store.get_run(&done).await.unwrap().is_none());
    assert!(store.steps(&done).await.unwrap().is_empty());
    assert_eq!(
        store.get_run(&live).await.unwrap().unwrap().status,
        RunStatus::Running
    );
    assert_eq!(
        store.unprocessed_events(10).await.unwrap().len(),
        1,
        "unprocessed events are kept"
    );
}

async fn writes_from_a_superseded_dispatch_are_refused(db: &Db) {
    let store = db.open().await;
    let run = make_run(&*store, "RUN9").await;
    let item = format!("{run}:start");
    // Shaped as checkpoints are (PostgreSQL has a one-statement path for them).
    let stale = Apply {
        run_id: run.clone(),
        reset_attempt: Some(item.clone()),
        dispatch: Some((item.clone(), 12345)),
        memos: vec![("x".into(), MemoJson::new(&json!({"data": 1})))],
        ..Default::default()
    };
    assert!(matches!(
        store.apply(stale, matcher(), 5).await,
        Err(StoreError::LeaseLost(_))
    ));
    // The right item and due time, but named by a checkpoint for another run.
    let other = make_run(&*store, "RUN10").await;
    let elsewhere = Apply {
        run_id: other.clone(),
        reset_attempt: Some(item.clone()),
        dispatch: Some((item.clone(), 0)),
        memos: vec![("x".into(), MemoJson::new(&json!({"data": 3})))],
        ..Default::default()
    };
    assert!(matches!(
        store.apply(elsewhere, matcher(), 5).await,
        Err(StoreError::LeaseLost(_))
    ));
    assert!(store.steps(&other).await.unwrap().is_empty());
    let current = Apply {
        run_id: run.clone(),
        reset_attempt: Some(item.clone()),
        dispatch: Some((item, 0)),
        memos: vec![("x".into(), MemoJson::new(&json!({"data": 2})))],
        ..Default::default()
    };
    store.apply(current, matcher(), 5).await.unwrap();
    assert_eq!(
        store.steps(&run).await.unwrap(),
        vec![("x".to_string(), MemoJson::new(&json!({"data": 2})))]
    );
}

/// Each way flow control admits, holds, merges or drops a would-be run.
async fn flow_control_admission(db: &Db) {
    let store = db.open().await;
    let now = 1_000;
    // One event per call; returns (event internal id, created run ids).
    let admit = |run_id: &'static str, flow: RunFlow| {
        let store = store.clone();
        async move {
            store.insert_events(vec![ev("t/flow")]).await.unwrap();
            let stored = store.unprocessed_events(1).await.unwrap().remove(0);
            let id = stored.internal_id.clone();
            let mut run = new_run(&stored, run_id, flow);
            run.items[0].available_at = now;
            let created = store
                .apply_event(stored, vec![run], vec![], matcher(), now)
                .await
                .unwrap();
            (id, created)
        }
    };
    let gcra = |key: &str, period_ms: i64| Gcra {
        key: key.into(),
        limit: 1,
        period_ms,
        burst: 0,
    };

    let rate = || RunFlow {
        rate_limit: Some((gcra("rl", 60_000), SkipReason::RateLimit)),
        ..Default::default()
    };
    assert_eq!(admit("RL1", rate()).await.1, ["RL1"]);
    let (dropped, created) = admit("RL2", rate()).await;
    assert!(created.is_empty(), "rate limit exceeded yet created");
    let skips = store.skips_for_event(&dropped).await.unwrap();
    assert_eq!(skips.len(), 1);
    assert_eq!(skips[0].reason, SkipReason::RateLimit);

    let single = || RunFlow {
        singleton: Some(("one".into(), false)),
        ..Default::default()
    };
    assert_eq!(admit("S1", single()).await.1, ["S1"]);
    let (dropped, created) = admit("S2", single()).await;
    assert!(created.is_empty());
    assert_eq!(
        store.skips_for_event(&dropped).await.unwrap()[0].reason,
        SkipReason::Singleton
    );

    let debounce = |ts| RunFlow {
        debounce: Some(Debounce {
            key: "d".into(),
            period_ms: 1_000,
            timeout_ms: None,
            ts,
        }),
        ..Default::default()
    };
    assert_eq!(admit("D1", debounce(1)).await.1, ["D1"]);
    let (latest, created) = admit("D2", debounce(2)).await;
    assert!(
        created.is_empty(),
        "a debounced event started a run of its own"
    );
    let q = store.run_queue("D1", now).await.unwrap();
    assert_eq!(q[0].waiting_on, Some(Hold::Debounce), "{q:?}");
    let runs = store.runs_for_event(&latest).await.unwrap();
    assert_eq!(runs.len(), 1, "the latest event becomes the trigger");
    assert_eq!(runs[0].run_id, "D1");

    let batch = || RunFlow {
        batch: Some(Batch {
            key: "b".into(),
            max_size: 2,
            timeout_ms: 60_000,
        }),
        ..Default::default()
    };
    assert_eq!(admit("B1", batch()).await.1, ["B1"]);
    assert_eq!(
        store.run_queue("B1", now).await.unwrap()[0].waiting_on,
        Some(Hold::Batch)
    );
    let (joined, created) = admit("B2", batch()).await;
    assert!(created.is_empty());
    assert_eq!(store.runs_for_event(&joined).await.unwrap()[0].run_id, "B1");
    assert_eq!(store.get_run("B1").await.unwrap().unwrap().events.len(), 2);
    assert_eq!(
        store.run_queue("B1", now).await.unwrap()[0].waiting_on,
        None,
        "a full batch starts at once"
    );

    let throttle = || RunFlow {
        throttle: Some(gcra("th", 10_000)),
        ..Default::default()
    };
    assert_eq!(admit("T1", throttle()).await.1, ["T1"]);
    assert_eq!(admit("T2", throttle()).await.1, ["T2"]);
    let q = store.run_queue("T2", now).await.unwrap();
    assert_eq!(q[0].waiting_on, Some(Hold::Throttle), "{q:?}");
    assert!(q[0].available_at >= now + 10_000);

    // Due now: RL1, S1 and the full batch B1 and T1; D1 and T2 wait.
    let mut claimed: Vec<String> = store
        .claim("A", now, now + 30_000, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.run_id)
        .collect();
    claimed.sort();
    assert_eq!(claimed, ["B1", "RL1", "S1", "T1"]);
}

// PostgreSQL only: what several processes sharing one database rely on. Each "node" is a
// store of its own with its own pool, as a separate `cairn` process would have.

/// A run whose start item carries `flow` (e.g. a concurrency key).
fn new_run(stored: &StoredEvent, run_id: &str, flow: RunFlow) -> NewRun {
    NewRun {
        run_id: run_id.to_string(),
        fn_slug: "app-fn".into(),
        idem_key: format!("{}:{run_id}", stored.internal_id),
        events: vec![stored.event.clone()],
        trigger_internal_id: stored.internal_id.clone(),
        created_at: 1,
        items: vec![NewItem {
            id: format!("{run_id}:start"),
            run_id: run_id.to_string(),
            kind: ItemKind::Call {
                step: None,
                predecessor: None,
            },
            available_at: 0,
            unless_memo: None,
        }],
        pauses: vec![],
        flow,
    }
}

/// One event creating `n` runs with the given flow control.
async fn make_runs(store: &dyn Store, n: usize, flow: RunFlow) -> Vec<String> {
    store.insert_events(vec![ev("t/many")]).await.unwrap();
    let stored = store.unprocessed_events(1).await.unwrap().remove(0);
    let runs: Vec<NewRun> = (0..n)
        .map(|i| new_run(&stored, &format!("R{i:04}"), flow.clone()))
        .collect();
    store
        .apply_event(stored, runs, vec![], matcher(), 1)
        .await
        .unwrap()
}

/// A fresh, migrated PostgreSQL schema and a plain client, for tests that change the
/// database behind the store's back.
async fn pg_schema_and_client() -> (Db, String, tokio_postgres::Client) {
    let db = Db::pg();
    let Db::Pg(schema) = &db else { unreachable!() };
    let schema = schema.clone();
    drop(pg_open(&schema).await);
    let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    (db, schema, client)
}

/// Memos written before schema 3 (serde_json text, not canonical) are rewritten canonical
/// for running runs, the only ones sent to an SDK again; ended runs are left as they are.
#[tokio::test]
async fn pg_migration_canonicalises_the_memos_of_running_runs() {
    let (db, schema, client) = pg_schema_and_client().await;
    client
        .batch_execute(&format!(
            r#"SET search_path TO {schema};
            INSERT INTO runs(run_id, fn_slug, idem_key, trigger_event, status, events, created_at)
              VALUES ('r1', 'app-f', 'e1', 'ev1', 'Running', '[]', 1),
                     ('r2', 'app-f', 'e2', 'ev2', 'Completed', '[]', 1);
            INSERT INTO steps(run_id, hash, memo) VALUES
              ('r1', 'h', '{{"data":{{"n":2.0,"big":1e21}}}}'), ('r2', 'h', '{{"data":2.0}}');
            UPDATE schema_version SET version = 2;"#
        ))
        .await
        .unwrap();
    let store = pg_open(&schema).await;
    let live = store.steps("r1").await.unwrap();
    assert_eq!(live[0].1.as_str(), r#"{"data":{"big":1e+21,"n":2}}"#);
    let ended = store.steps("r2").await.unwrap();
    assert_eq!(ended[0].1.as_str(), r#"{"data":2.0}"#);
    drop(store);
    db.cleanup().await;
}

/// A renewal does not wait for a queue row another transaction has locked: it renews the
/// others at once and leaves that one to the next renewal. Waiting let one busy row hold back
/// every lease of a node.
#[tokio::test]
async fn pg_a_renewal_skips_a_lease_another_transaction_is_changing() {
    let (db, schema, mut client) = pg_schema_and_client().await;
    let store = pg_open(&schema).await;
    make_run(&store, "RUNA").await;
    make_run(&store, "RUNB").await;
    let ids: Vec<String> = store
        .claim("A", 10, 1000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids.len(), 2);
    let tx = client.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT 1 FROM {schema}.queue WHERE id = $1 FOR UPDATE"),
        &[&ids[0]],
    )
    .await
    .unwrap();
    let renewed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        store.renew("A", ids.clone(), 2000),
    )
    .await
    .expect("the renewal waited for a locked row")
    .unwrap();
    assert_eq!(renewed, vec![ids[1].clone()]);
    tx.rollback().await.unwrap();
    let mut renewed = store.renew("A", ids.clone(), 3000).await.unwrap();
    renewed.sort();
    let mut all = ids;
    all.sort();
    assert_eq!(renewed, all);
    drop(store);
    db.cleanup().await;
}

#[tokio::test]
async fn pg_refuses_a_newer_schema_and_names_an_unreachable_server() {
    let (db, schema, client) = pg_schema_and_client().await;
    client
        .batch_execute(&format!("UPDATE {schema}.schema_version SET version = 99"))
        .await
        .unwrap();
    let opts = PgOptions {
        schema: Some(schema.clone()),
        ..Default::default()
    };
    assert!(matches!(
        PostgresStore::connect(&pg_url(), opts).await,
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = PostgresStore::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/test"),
        PgOptions::default(),
    )
    .await
    .err()
    .expect("connected to nothing");
    assert!(
        matches!(&err, StoreError::Unusable(m) if m.contains(&format!("127.0.0.1:{port}"))),
        "{err}"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_nodes_never_claim_the_same_item() {
    let db = Db::pg();
    let a = db.open().await;
    let b = db.open().await;
    let runs = make_runs(&*a, 200, RunFlow::default()).await;
    let claimer = |store: Arc<dyn Store>, owner: &'static str| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let items = store.claim(owner, 10, 100_000, 7).await.unwrap();
                if items.is_empty() {
                    break got;
                }
                got.extend(items.into_iter().map(|i| i.id));
            }
        })
    };
    let (x, y) = (claimer(a.clone(), "A"), claimer(b.clone(), "B"));
    let (x, y) = (x.await.unwrap(), y.await.unwrap());
    let mut all: Vec<String> = x.iter().chain(&y).cloned().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), x.len() + y.len(), "an item was claimed twice");
    assert_eq!(all.len(), runs.len());
    db.cleanup().await;
}

/// Two nodes' matchers picking up the same events at once: each event is applied by one of
/// them, once (events of a name apply side by side under a shared lock, so the event's row
/// decides), and neither sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_an_event_two_nodes_apply_at_once_takes_effect_once() {
    let db = Db::pg();
    let a = db.open().await;
    let b = db.open().await;
    a.insert_events((0..40).map(|_| ev("t/both")).collect())
        .await
        .unwrap();
    let events = a.unprocessed_events(100).await.unwrap();
    assert_eq!(events.len(), 40);
    let mut created = 0;
    for e in &events {
        // Each node plans its own run (its own id) with the idempotency key of the event.
        // A rate limit of one run per event: applied twice, the event would use it up and
        // record a dropped run besides the one it started.
        let plan = |run_id: String| {
            let flow = RunFlow {
                rate_limit: Some((
                    Gcra {
                        key: format!("rl:{}", e.internal_id),
                        limit: 1,
                        period_ms: 60_000,
                        burst: 0,
                    },
                    SkipReason::RateLimit,
                )),
                ..Default::default()
            };
            let mut run = new_run(e, &run_id, flow);
            run.idem_key = e.internal_id.clone();
            vec![run]
        };
        let (x, y) = tokio::join!(
            a.apply_event(
                e.clone(),
                plan(format!("A-{}", e.seq)),
                vec![],
                matcher(),
                1
            ),
            b.apply_event(
                e.clone(),
                plan(format!("B-{}", e.seq)),
                vec![],
                matcher(),
                1
            )
        );
        created += x.expect("node A").len() + y.expect("node B").len();
        assert_eq!(a.runs_for_event(&e.internal_id).await.unwrap().len(), 1);
        let skips = a.skips_for_event(&e.internal_id).await.unwrap();
        assert!(skips.is_empty(), "event {} applied twice: {skips:?}", e.seq);
    }
    assert_eq!(created, 40, "runs created over both nodes");
    assert!(a.unprocessed_events(100).await.unwrap().is_empty());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_concurrency_limit_holds_across_nodes() {
    let db = Db::pg();
    let a = db.open().await;
    let b = db.open().await;
    let flow = RunFlow {
        concurrency: vec![Slot {
            key: "f:app-fn:tenant".into(),
            limit: 2,
        }],
        ..Default::default()
    };
    make_runs(&*a, 40, flow).await;
    // Both nodes race for the key's two slots many times over.
    let mut leased = 0;
    for round in 0..10 {
        let (x, y) = tokio::join!(
            a.claim("A", 10 + round, 100_000, 5),
            b.claim("B", 10 + round, 100_000, 5)
        );
        leased += x.unwrap().len() + y.unwrap().len();
    }
    assert_eq!(leased, 2, "the limit of 2 was exceeded across nodes");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_event_racing_a_new_pause_on_another_node_still_resumes_it() {
    let db = Db::pg();
    let a = db.open().await;
    let b = db.open().await;
    let runs = make_runs(&*a, 30, RunFlow::default()).await;
    for run in &runs {
        let name = format!("t/resume/{run}");
        let since = a.event_high_water().await.unwrap();
        // Node B accepts and matches the event while node A stores the pause.
        let matcher_b = {
            let b = b.clone();
            let name = name.clone();
            tokio::spawn(async move {
                b.insert_events(vec![ev(&name)]).await.unwrap();
                for e in b.unprocessed_events(10).await.unwrap() {
                    b.apply_event(e, vec![], vec![], matcher(), 2)
                        .await
                        .unwrap();
                }
            })
        };
        let pause = Pause {
            id: format!("{run}:w:pause"),
            run_id: run.clone(),
            step: "w".into(),
            kind: PauseKind::Wait,
            event_name: name.clone(),
            expr: None,
            correlation: None,
            trigger: json!({}),
            expires_at: 10_000,
            since_seq: since,
        };
        let timeout = NewItem {
            id: format!("{run}:w:timeout"),
            run_id: run.clone(),
            kind: ItemKind::PauseTimeout {
                pause_id: pause.id.clone(),
                step: "w".into(),
                invoke: false,
            },
            available_at: 10_000,
            unless_memo: None,
        };
        a.apply(
            Apply {
                run_id: run.clone(),
                pauses: vec![(pause, timeout)],
                ..Default::default()
            },
            matcher(),
            3,
        )
        .await
        .unwrap();
        matcher_b.await.unwrap();
        let steps = a.steps(run).await.unwrap();
        assert_eq!(steps.len(), 1, "run {run}: the wait was not resumed");
        assert_eq!(steps[0].1.to_value()["name"], json!(name));
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_cron_tick_fires_once_across_nodes() {
    let db = Db::pg();
    let nodes = [db.open().await, db.open().await, db.open().await];
    for tick in 1..=20i64 {
        let fired = futures::future::join_all(nodes.iter().map(|n| {
            n.fire_cron(
                "f",
                "* * * * *",
                tick * 60_000,
                Some(ev("inngest/scheduled.timer")),
            )
        }))
        .await;
        let fired = fired.into_iter().filter(|r| *r.as_ref().unwrap()).count();
        assert_eq!(fired, 1, "tick {tick} fired {fired} times");
    }
    assert_eq!(nodes[0].list_events(100, None).await.unwrap().len(), 20);
    db.cleanup().await;
}

/// A run whose `cancelOn` names its own trigger's event: the trigger does not cancel it, the
/// next such event does (and starts a run of its own, which it does not cancel either).
async fn cancel_rules_see_only_events_after_the_trigger(db: &Db) {
    let store = db.open().await;
    let mut created = Vec::new();
    for run_id in ["C1", "C2"] {
        store.insert_events(vec![ev("t/start")]).await.unwrap();
        let stored = store.unprocessed_events(1).await.unwrap().remove(0);
        let mut run = new_run(&stored, run_id, RunFlow::default());
        run.pauses = vec![Pause {
            id: format!("{run_id}:cancel:0"),
            run_id: run_id.into(),
            step: String::new(),
            kind: PauseKind::Cancel,
            event_name: "t/start".into(),
            expr: None,
            correlation: None,
            trigger: stored.event.clone(),
            expires_at: 1_000_000,
            since_seq: stored.seq,
        }];
        created.extend(
            store
                .apply_event(stored, vec![run], vec![], matcher(), 2)
                .await
                .unwrap(),
        );
    }
    assert_eq!(created, ["C1", "C2"]);
    let status = |r: Option<Run>| r.unwrap().status;
    assert_eq!(
        status(store.get_run("C1").await.unwrap()),
        RunStatus::Cancelled
    );
    assert_eq!(
        status(store.get_run("C2").await.unwrap()),
        RunStatus::Running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_cancel_event_matched_elsewhere_before_its_run_existed_still_cancels() {
    let db = Db::pg();
    let a = db.open().await;
    let b = db.open().await;
    // An earlier cancel event, the trigger, and a later cancel event, in that order.
    a.insert_events(vec![ev("t/stop"), ev("t/start"), ev("t/stop")])
        .await
        .unwrap();
    let evs = a.unprocessed_events(10).await.unwrap();
    let (early, trigger, late) = (evs[0].clone(), evs[1].clone(), evs[2].clone());
    // Node B matches both cancel events before node A has created the run.
    for e in [early, late] {
        b.apply_event(e, vec![], vec![], matcher(), 2)
            .await
            .unwrap();
    }
    let mut run = new_run(&trigger, "X1", RunFlow::default());
    run.pauses = vec![Pause {
        id: "X1:cancel:0".into(),
        run_id: "X1".into(),
        step: String::new(),
        kind: PauseKind::Cancel,
        event_name: "t/stop".into(),
        expr: None,
        correlation: None,
        trigger: trigger.event.clone(),
        expires_at: 1_000_000,
        since_seq: trigger.seq,
    }];
    let created = a
        .apply_event(trigger, vec![run], vec![], matcher(), 3)
        .await
        .unwrap();
    assert_eq!(created, ["X1"]);
    assert_eq!(
        a.get_run("X1").await.unwrap().unwrap().status,
        RunStatus::Cancelled,
        "the later cancel event was lost"
    );

    // Only an earlier cancel event: the run stays.
    a.insert_events(vec![ev("t/halt"), ev("t/start")])
        .await
        .unwrap();
    let evs = a.unprocessed_events(10).await.unwrap();
    let (early, trigger) = (evs[0].clone(), evs[1].clone());
    b.apply_event(early, vec![], vec![], matcher(), 4)
        .await
        .unwrap();
    let mut run = new_run(&trigger, "X2", RunFlow::default());
    run.pauses = vec![Pause {
        id: "X2:cancel:0".into(),
        run_id: "X2".into(),
        step: String::new(),
        kind: PauseKind::Cancel,
        event_name: "t/halt".into(),
        expr: None,
        correlation: None,
        trigger: trigger.event.clone(),
        expires_at: 1_000_000,
        since_seq: trigger.seq,
    }];
    a.apply_event(trigger, vec![run], vec![], matcher(), 5)
        .await
        .unwrap();
    assert_eq!(
        a.get_run("X2").await.unwrap().unwrap().status,
        RunStatus::Running,
        "cancelled by an event from before its trigger"
    );
    db.cleanup().await;
}

/// `watch_run` answers true only for a run still running; an ended or unknown run gets false
/// (the waiter then reads the run instead of waiting).
async fn watching_a_run_tells_whether_it_still_runs(db: &Db) {
    let store = db.open().await;
    let run = make_run(&*store, "RUNW").await;
    assert_eq!(store.watch_run(&run, "B").await.unwrap(), Watch::Watched);
    assert_eq!(
        store.watch_run(&run, "B").await.unwrap(),
        Watch::Watched,
        "watched twice"
    );
    assert!(store.cancel_run(&run, 9).await.unwrap());
    assert_eq!(store.watch_run(&run, "B").await.unwrap(), Watch::Ended);
    assert_eq!(
        store.watch_run("no-such-run", "B").await.unwrap(),
        Watch::Ended
    );
}

/// Unique run ids: the notification channel is shared by every schema of the database.
async fn make_unique_runs(store: &dyn Store, n: usize) -> Vec<String> {
    store.insert_events(vec![ev("t/watched")]).await.unwrap();
    let stored = store.unprocessed_events(1).await.unwrap().remove(0);
    let runs: Vec<NewRun> = (0..n)
        .map(|_| new_run(&stored, &ulid::Ulid::new().to_string(), RunFlow::default()))
        .collect();
    let ids = runs.iter().map(|r| r.run_id.clone()).collect();
    store
        .apply_event(stored, runs, vec![], matcher(), 1)
        .await
        .unwrap();
    ids
}

/// `store`'s feed of run ends, once its `LISTEN` is in effect.
async fn listening(store: &PostgresStore) -> tokio::sync::broadcast::Receiver<RunEnd> {
    let mut feed = store.run_ends().expect("a shared store has a feed");
    assert_eq!(next_end(&mut feed).await, RunEnd::Announcing);
    feed
}

async fn next_end(feed: &mut tokio::sync::broadcast::Receiver<RunEnd>) -> RunEnd {
    tokio::time::timeout(std::time::Duration::from_secs(10), feed.recv())
        .await
        .expect("nothing on the feed within 10 s")
        .unwrap()
}

/// The ends of `runs` announced on `feed`, in order, up to `last`'s. Notifications arrive in
/// commit order, so once the last commit's is here every earlier one is too.
async fn heard_until(
    feed: &mut tokio::sync::broadcast::Receiver<RunEnd>,
    runs: &[String],
    last: &str,
) -> Vec<String> {
    let mut heard: Vec<String> = Vec::new();
    while heard.last().map(String::as_str) != Some(last) {
        if let RunEnd::Ended(id) = next_end(feed).await {
            if runs.contains(&id) {
                heard.push(id);
            }
        }
    }
    heard
}

/// A run's end reaches another node's feed only when some node other than the one whose
/// executor ended it watches the run (that executor tells its own waiters), or when it was
/// cancelled, which no executor announces. Every other end would wake every listening
/// node for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_only_ends_watched_elsewhere_are_announced() {
    let db = Db::pg();
    let Db::Pg(schema) = &db else { unreachable!() };
    let (a, b) = (pg_open(schema).await, pg_open(schema).await);
    let mut feed = listening(&b).await;
    let runs = make_unique_runs(&a, 6).await;
    let ended_by_a = |run: &str| Apply {
        run_id: run.to_string(),
        finish: Some(Finish {
            status: RunStatus::Completed,
            output: json!(null),
        }),
        ..Default::default()
    };
    // 0: watched by B; 1: by A only; 2: by nobody; 3: by both; all ended by A's executor.
    assert!(b.watch_run(&runs[0], "B").await.unwrap() == Watch::Watched);
    assert!(a.watch_run(&runs[1], "A").await.unwrap() == Watch::Watched);
    assert!(a.watch_run(&runs[3], "X").await.unwrap() == Watch::Watched);
    assert!(b.watch_run(&runs[3], "X").await.unwrap() == Watch::Watched);
    for run in &runs[..4] {
        a.apply(ended_by_a(run), matcher(), 5).await.unwrap();
    }
    // 4: watched by A, cancelled on A (the API does not announce it to A's own waiters).
    assert!(a.watch_run(&runs[4], "A").await.unwrap() == Watch::Watched);
    assert!(a.cancel_run(&runs[4], 6).await.unwrap());
    // 5: the last, watched by B: notifications arrive in commit order, so once it is here
    // every earlier one is too.
    assert!(b.watch_run(&runs[5], "B").await.unwrap() == Watch::Watched);
    a.apply(ended_by_a(&runs[5]), matcher(), 7).await.unwrap();
    let heard = heard_until(&mut feed, &runs, &runs[5]).await;
    let expected: Vec<String> = [0, 3, 4, 5].iter().map(|&i| runs[i].clone()).collect();
    assert_eq!(heard, expected);
    drop((a, b, feed));
    db.cleanup().await;
}

/// A run holding the only slot of its function's run concurrency hands it to the waiting
/// run in the commit that ends it: the next claim starts that run, with no repair pass.
async fn a_run_that_ends_frees_its_run_slot_at_once(db: &Db) {
    let store = db.open().await;
    let flow = RunFlow {
        run_slot: Some(Slot {
            key: "run:f:one".into(),
            limit: 1,
        }),
        ..Default::default()
    };
    let runs = make_runs(&*store, 2, flow).await;
    let first = store.claim("A", 10, 100_000, 10).await.unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(store.claim("A", 11, 100_000, 10).await.unwrap().is_empty());
    let end = Apply {
        run_id: first[0].run_id.clone(),
        item: Some((first[0].id.clone(), "A".into())),
        finish: Some(Finish {
            status: RunStatus::Completed,
            output: json!(null),
        }),
        lifecycle: Some(vec![]),
        ..Default::default()
    };
    store.apply(end, matcher(), 12).await.unwrap();
    let next = store.claim("A", 13, 100_000, 10).await.unwrap();
    let other = runs.iter().find(|r| **r != first[0].run_id).unwrap();
    assert_eq!(
        next.iter().map(|i| &i.run_id).collect::<Vec<_>>(),
        [other],
        "the freed slot did not start the waiting run"
    );
}

/// A run whose call this process holds is not marked by its waiters (`Watch::Here`): its
/// end by that call is told by the executor, not announced; its end by anyone else while
/// the call is held (a cancel, a run timeout) is announced all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_a_run_held_here_is_not_marked_and_its_end_elsewhere_is_announced() {
    let db = Db::pg();
    let Db::Pg(schema) = &db else { unreachable!() };
    let (a, b) = (pg_open(schema).await, pg_open(schema).await);
    let mut feed = listening(&a).await;
    let runs = make_unique_runs(&a, 4).await;
    let items = a.claim("A", 10, 100_000, 10).await.unwrap();
    assert_eq!(items.len(), 4);
    let item_of = |run: &str| items.iter().find(|i| i.run_id == run).unwrap().id.clone();
    for run in &runs[..3] {
        assert_eq!(a.watch_run(run, "A").await.unwrap(), Watch::Here);
    }
    assert_eq!(
        b.watch_run(&runs[3], "B").await.unwrap(),
        Watch::Watched,
        "a call held by another process is no reason not to mark"
    );
    // 0: cancelled on B while A holds its call.
    assert!(b.cancel_run(&runs[0], 11).await.unwrap());
    // 1: ended by A's own call.
    let end = |run: &str, owner: &str| Apply {
        run_id: run.to_string(),
        item: Some((item_of(run), owner.to_string())),
        finish: Some(Finish {
            status: RunStatus::Completed,
            output: json!(null),
        }),
        lifecycle: Some(vec![]),
        ..Default::default()
    };
    a.apply(end(&runs[1], "A"), matcher(), 12).await.unwrap();
    // 2: ended by B (as a run timeout would be) while A holds its call.
    let timeout = Apply {
        run_id: runs[2].clone(),
        finish: Some(Finish {
            status: RunStatus::Cancelled,
            output: json!(null),
        }),
        ..Default::default()
    };
    b.apply(timeout, matcher(), 13).await.unwrap();
    // 3: watched by B, ended by A's call: announced, and the last in commit order.
    a.apply(end(&runs[3], "A"), matcher(), 14).await.unwrap();
    let heard = heard_until(&mut feed, &runs, &runs[3]).await;
    let expected: Vec<String> = [0, 2, 3].iter().map(|&i| runs[i].clone()).collect();
    assert_eq!(heard, expected);
    drop((a, b, feed));
    db.cleanup().await;
}

/// `sslmode` as libpq names it: plain unless asked; `require` encrypts without checking the
/// certificate; `verify-ca` checks it against `sslrootcert`; `verify-full` also checks the
/// host name. Needs the machine's PostgreSQL with `ssl=on` and its own certificate (Debian's
/// default, a self-signed certificate for `localhost`).
#[tokio::test]
async fn pg_connects_over_tls_only_when_asked_and_checks_the_certificate_as_asked() {
    let (db, schema, client) = pg_schema_and_client().await;
    let show = |name: &'static str| {
        let client = &client;
        async move {
            let row = client.query_one(&format!("SHOW {name}"), &[]).await;
            row.unwrap().get::<_, String>(0)
        }
    };
    assert_eq!(
        show("ssl").await,
        "on",
        "this test needs PostgreSQL with ssl=on (Debian's default)"
    );
    let cert = show("ssl_cert_file").await;
    let root = url::form_urlencoded::byte_serialize(cert.as_bytes()).collect::<String>();
    let base = pg_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    // Each store names its connections, so the server can say whether they are encrypted.
    let open = |url: String, name: &'static str| {
        let schema = schema.clone();
        async move {
            let sep = if url.contains('?') { '&' } else { '?' };
            let url = format!("{url}{sep}application_name={name}");
            let opts = PgOptions {
                schema: Some(schema),
                ..Default::default()
            };
            PostgresStore::connect(&url, opts).await
        }
    };
    let encrypted = |name: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT count(*), coalesce(bool_and(s.ssl), false) FROM pg_stat_activity a \
                     JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = $1",
                    &[&name],
                )
                .await
                .unwrap();
            let (n, ssl): (i64, bool) = (row.get(0), row.get(1));
            assert!(n > 0, "no connection named {name}");
            ssl
        }
    };

    let plain = open(base.clone(), "cairn_tls_plain").await.unwrap();
    assert!(!encrypted("cairn_tls_plain").await);
    let require = open(format!("{base}{sep}sslmode=require"), "cairn_tls_require")
        .await
        .unwrap();
    assert!(encrypted("cairn_tls_require").await);
    // The certificate names `localhost`, not 127.0.0.1: verify-ca does not look at the name.
    let ip = base.replace("localhost", "127.0.0.1");
    let ca = open(
        format!("{ip}{sep}sslmode=verify-ca&sslrootcert={root}"),
        "cairn_tls_verify_ca",
    )
    .await
    .unwrap();
    assert!(encrypted("cairn_tls_verify_ca").await);
    let by_name = ip.replace("127.0.0.1", "localhost");
    let full = open(
        format!("{by_name}{sep}sslmode=verify-full&sslrootcert={root}"),
        "cairn_tls_verify_full",
    )
    .await
    .unwrap();
    assert!(encrypted("cairn_tls_verify_full").await);

    // As libpq: over a Unix socket sslmode is ignored (the server offers no TLS there).
    let dirs = show("unix_socket_directories").await;
    let dir = dirs.split(',').next().unwrap().trim();
    let dir = url::form_urlencoded::byte_serialize(dir.as_bytes()).collect::<String>();
    let socket = open(
        format!(
            "{}{sep}sslmode=verify-full",
            ip.replacen("127.0.0.1", &dir, 1)
        ),
        "cairn_tls_socket",
    )
    .await
    .unwrap();
    assert!(!encrypted("cairn_tls_socket").await);

    let refused = |r: Result<PostgresStore, StoreError>| match r {
        Err(StoreError::Unusable(m)) => m,
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected"),
    };
    let wrong_name = refused(
        open(
            format!("{ip}{sep}sslmode=verify-full&sslrootcert={root}"),
            "cairn_tls_wrong_name",
        )
        .await,
    );
    assert!(wrong_name.contains("not valid for name"), "{wrong_name}");
    // Without sslrootcert the bundled public roots are used; a self-signed one is not among them.
    for mode in ["verify-ca", "verify-full"] {
        let untrusted = refused(
            open(
                format!("{by_name}{sep}sslmode={mode}"),
                "cairn_tls_untrusted",
            )
            .await,
        );
        assert!(untrusted.contains("UnknownIssuer"), "{mode}: {untrusted}");
    }
    println!("{wrong_name}");
    drop((plain, require, ca, full, socket));
    db.cleanup().await;
}
