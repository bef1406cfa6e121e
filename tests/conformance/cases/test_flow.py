"""Flow control end to end: concurrency, throttle, rate limit, idempotency, debounce,
priority, singleton, batching (conformance-cases.md §14-19, C-INV-07, C-FAIL-03).

Every case drives the `flow-*` fixture functions (js-common/functions.mjs, py/app.py) on a
fresh `cairn dev`. What ran, when, and how many at once is measured inside the app: each
step body records its start time (`records`, ms since the epoch, same clock as this
process) and holds a gauge while it works (`gauges`: now / max in progress).

Timing bounds are loose enough for a loaded 2-core machine but each one still fails when
the feature is missing (e.g. a throttle that lets every run start at once).
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from harness.procs import TERMINAL, output_of, run_id_of, wait_until
from harness.wire import fn_slug

pytestmark = pytest.mark.server


# ---- helpers ------------------------------------------------------------------------------

def now_ms() -> float:
    return time.time() * 1000


def wait_recs(st, name: str, n: int, timeout: float = 20) -> list:
    """Wait until the app recorded at least `n` step starts under `name`; return them."""
    def enough():
        r = st.app.recs(name)
        return r if len(r) >= n else None

    return wait_until(enough, timeout, what=f"{n} record(s) of {name!r} (have {len(st.app.recs(name))})")


def runs_of(cairn, event_ids) -> dict[str, dict]:
    """run id -> run summary, over every run any of the events lists."""
    out = {}
    for eid in event_ids:
        for run in cairn.runs_for_event(eid):
            out[run_id_of(run)] = run
    return out


def wait_runs(cairn, event_ids, n: int, timeout: float = 10) -> dict[str, dict]:
    """Wait until the events list `n` distinct runs between them; return run id -> run."""
    def enough():
        runs = runs_of(cairn, event_ids)
        return runs if len(runs) >= n else None

    return wait_until(enough, timeout, what=f"{n} runs for {len(event_ids)} events")


def wait_terminal(cairn, run_ids, timeout: float = 30) -> dict[str, dict]:
    """Wait for every run to reach a terminal status; return run id -> run."""
    deadline = time.monotonic() + timeout
    out = {}
    for rid in run_ids:
        out[rid] = cairn.wait_status(rid, TERMINAL, timeout=max(1.0, deadline - time.monotonic()))
    return out


def completed_all(cairn, run_ids, timeout: float = 30) -> dict[str, dict]:
    runs = wait_terminal(cairn, run_ids, timeout)
    bad = {rid: r.get("status") for rid, r in runs.items() if r.get("status") != "Completed"}
    assert not bad, f"runs not Completed: {bad}"
    return runs


def starts(recs: list) -> list[float]:
    return sorted(r["t"] for r in recs)


def gaps_s(ts: list[float]) -> list[float]:
    return [round((b - a) / 1000, 2) for a, b in zip(ts, ts[1:])]


def rfc3339(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def assert_skipped(cairn, event_id: str, fn_id: str, reason: str, timeout: float = 10):
    """The event lists `fn_id` as skipped for `reason`, and started no run of it."""
    slug = fn_slug(fn_id)

    def found():
        return [s for s in cairn.skipped(event_id) if s.get("function_id") == slug]

    [entry] = wait_until(found, timeout, what=f"event {event_id} skipped by {slug}")
    assert entry["reason"] == reason, entry
    rfc3339(entry["skipped_at"])
    assert cairn.runs_for_event(event_id) == [], cairn.runs_for_event(event_id)
    return entry


# ---- concurrency (§14) --------------------------------------------------------------------

def test_concurrency_fn_limit(sdk, make_stack):
    """C-CONC-01: `concurrency: 1` (JS bare number, Python [{limit: 1}]); 3 events at once
    with 1.5 s step bodies run one after another, all of them."""
    st = make_stack(sdk)
    ids = st.cairn.send(*({"name": "conf/flow-conc-fn", "data": {"i": i}} for i in range(3)))
    recs = wait_recs(st, "flow-conc-fn", 3, timeout=25)
    rids = [st.cairn.wait_run_id(e) for e in ids]
    completed_all(st.cairn, rids)
    assert st.app.gauge_max("flow-conc-fn") == 1, st.app.gauges()
    g = gaps_s(starts(recs))
    # Each body blocks 1.5 s; the next may only start after it.
    assert min(g) >= 1.2, f"starts {g}s apart: overlapping bodies"


def test_queue_explains_wait(sdk, make_stack):
    """GET /v1/runs/{id}/queue says why a run is not starting: concurrency (limit 1, one in
    progress), then throttle."""
    st = make_stack(sdk)
    c = st.cairn
    ids = c.send(*({"name": "conf/flow-conc-fn", "data": {"i": i, "ms": 4000}} for i in range(2)))
    [first] = wait_recs(st, "flow-conc-fn", 1)

    def waiting(reason: str, event_ids, started: set):
        def probe():
            for rid in runs_of(c, event_ids):
                if rid in started:
                    continue
                q = c.queue(rid)
                for item in q.get("items") or []:
                    w = item.get("waiting_on")
                    if w and w.get("reason") == reason:
                        return rid, q, item
            return None

        return probe

    rid, q, item = wait_until(waiting("concurrency", ids, {first["run"]}), 3.5,
                              what="a queue item waiting on concurrency")
    assert q["run_id"] == rid and isinstance(q["status"], str), q
    for k in ("id", "kind", "available_at", "attempt", "leased"):
        assert k in item, f"queue item lacks {k!r}: {item}"
    assert isinstance(item["leased"], bool), item
    w = item["waiting_on"]
    assert w["limit"] == 1 and w["in_progress"] == 1 and isinstance(w["key"], str), w

    # Throttle: limit 1 per 2 s, three runs at once; the later two wait on the throttle.
    tids = c.send(*({"name": "conf/flow-throttle-b0", "data": {"i": i}} for i in range(3)))
    [t0] = wait_recs(st, "flow-throttle-b0", 1)
    rid, q, item = wait_until(waiting("throttle", tids, {t0["run"]}), 3.5,
                              what="a queue item waiting on the throttle")
    assert set(item["waiting_on"]) >= {"reason"}, item


def test_concurrency_key(sdk, make_stack):
    """C-CONC-03: limit 1 per event.data.num; nums 0, 1, 2, 0 -> distinct keys run together,
    the second 0 waits for the first."""
    st = make_stack(sdk)
    ids = st.cairn.send(*({"name": "conf/flow-conc-key", "data": {"num": n}} for n in (0, 1, 2, 0)))
    recs = wait_recs(st, "flow-conc-key", 4, timeout=25)
    completed_all(st.cairn, [st.cairn.wait_run_id(e) for e in ids])
    g = st.app.gauges()
    for n in (0, 1, 2):
        assert g[f"flow-conc-key:{n}"]["max"] == 1, g
    assert 2 <= g["flow-conc-key"]["max"] <= 3, f"distinct keys did not run together: {g}"
    zeros = starts([r for r in recs if r["num"] == 0])
    assert (zeros[1] - zeros[0]) / 1000 >= 1.6, f"the two num=0 runs overlapped: {gaps_s(zeros)}"


def test_concurrency_key_and_fn(sdk, make_stack):
    """C-CONC-04: [{limit: 2}, {limit: 1, key: num}]: never more than 2 at once, never two of
    one key; all 4 run."""
    st = make_stack(sdk)
    ids = st.cairn.send(*({"name": "conf/flow-conc-key-fn", "data": {"num": n}} for n in (0, 1, 2, 0)))
    wait_recs(st, "flow-conc-key-fn", 4, timeout=25)
    completed_all(st.cairn, [st.cairn.wait_run_id(e) for e in ids])
    g = st.app.gauges()
    assert g["flow-conc-key-fn"]["max"] == 2, g
    for n in (0, 1, 2):
        assert g[f"flow-conc-key-fn:{n}"]["max"] == 1, g


def test_concurrency_account_scope(sdk, make_stack):
    """C-CONC-05: two functions share an account-scoped limit of 1 (key 'global'): 3 events
    -> 6 runs, never two at once across both functions."""
    st = make_stack(sdk)
    ids = st.cairn.send(*({"name": "conf/flow-conc-acct", "data": {"i": i, "ms": 700}} for i in range(3)))
    recs = wait_recs(st, "flow-conc-acct", 6, timeout=30)
    runs = wait_runs(st.cairn, ids, 6)
    completed_all(st.cairn, list(runs))
    assert st.app.gauge_max("flow-conc-acct") == 1, st.app.gauges()
    assert sorted(r["fn"] for r in recs) == ["flow-conc-acct-a"] * 3 + ["flow-conc-acct-b"] * 3


# ---- throttle and rate limit (§15) ------------------------------------------------------

def test_throttle_spacing(sdk, make_stack):
    """C-THR-01, limit 1 per 2 s, burst 0: 3 runs start ~2 s apart, none dropped."""
    st = make_stack(sdk)
    ids = st.cairn.send(*({"name": "conf/flow-throttle-b0", "data": {"i": i}} for i in range(3)))
    recs = wait_recs(st, "flow-throttle-b0", 3, timeout=25)
    completed_all(st.cairn, [st.cairn.wait_run_id(e) for e in ids])
    ts = starts(recs)
    g = gaps_s(ts)
    # Ideal: 2 s apart. One start delayed by load can shorten the next gap, not erase it.
    assert min(g) >= 0.8, f"throttled starts only {g}s apart (period 2 s)"
    assert 2.5 <= (ts[-1] - ts[0]) / 1000 <= 12, f"3 starts spread over {g}"
    assert len({r["run"] for r in recs}) == 3


def test_throttle_burst(sdk, make_stack):
    """C-THR-01, limit 1 per 4 s, burst 1: two runs start at once, the third ~4 s later."""
    st = make_stack(sdk)
    ids = st.cairn.send(*({"name": "conf/flow-throttle-b1", "data": {"i": i}} for i in range(3)))
    recs = wait_recs(st, "flow-throttle-b1", 3, timeout=25)
    completed_all(st.cairn, [st.cairn.wait_run_id(e) for e in ids])
    g = gaps_s(starts(recs))
    assert g[0] < 2.0, f"burst 1 should let two runs start together: gaps {g}"
    assert g[1] >= 2.5, f"the third run was not throttled (period 4 s): gaps {g}"


def test_throttle_key_steps_not_throttled(sdk, make_stack):
    """C-THR-02: throttle per event.data.id (1 per 6 s): ids 0, 1, 2 start together and both
    of their steps (b, b:1) run at once; a second id 0 waits."""
    st = make_stack(sdk)
    t_send = now_ms()
    ids = st.cairn.send(*({"name": "conf/flow-throttle-key", "data": {"id": k}} for k in (0, 1, 2, 0)))
    recs = wait_recs(st, "flow-throttle-key", 8, timeout=25)
    completed_all(st.cairn, [st.cairn.wait_run_id(e) for e in ids])
    by_run: dict[str, list] = {}
    for r in recs:
        by_run.setdefault(r["run"], []).append(r)
    assert len(by_run) == 4 and all(len(v) == 2 for v in by_run.values()), by_run
    for run, rs in by_run.items():
        b0, b1 = sorted(rs, key=lambda r: r["n"])
        assert (b1["t"] - b0["t"]) / 1000 < 3, f"steps of run {run} were throttled: {rs}"
    first = {k: min(r["t"] for r in recs if r["id"] == k and r["n"] == 0) for k in (0, 1, 2)}
    assert max(first.values()) - t_send < 4000, f"distinct keys did not start together: {first}"
    zeros = sorted(r["t"] for r in recs if r["id"] == 0 and r["n"] == 0)
    assert (zeros[1] - zeros[0]) / 1000 >= 4, f"second id=0 run started {gaps_s(zeros)}s after the first"


def test_rate_limit_drops(sdk, make_stack):
    """C-RL-01: 1 per 24 h per event.data.number: 10 runs, 10 again is skipped (never run
    later), 1 runs."""
    st = make_stack(sdk)
    c = st.cairn
    first = c.send_one("conf/flow-rate-limit", {"number": 10})
    completed_all(c, [c.wait_run_id(first)])
    again = c.send_one("conf/flow-rate-limit", {"number": 10})
    assert_skipped(c, again, "flow-rate-limit", "rate_limit")
    other = c.send_one("conf/flow-rate-limit", {"number": 1})
    completed_all(c, [c.wait_run_id(other)])
    time.sleep(1)
    assert [r["number"] for r in st.app.recs("flow-rate-limit")] == [10, 1]
    assert c.runs_for_event(again) == []


def test_rate_limited_failure_handler(sdk, make_stack):
    """C-FAIL-03: a rate-limited failing function and a handler with the same rateLimit: the
    handler's key (event.data.number) is missing on the failure event, so it is not limited."""
    st = make_stack(sdk)
    c = st.cairn

    def counts():
        return st.app.count("flow-rl-failed"), st.app.count("flow-rl-failed-handler")

    e1 = c.send_one("conf/flow-rl-failed", {"number": 10})
    wait_until(lambda: counts() == (1, 1), 20, what="failed 1, handled 1")
    assert c.wait_status(c.wait_run_id(e1))["status"] == "Failed"
    e2 = c.send_one("conf/flow-rl-failed", {"number": 10})
    assert_skipped(c, e2, "flow-rl-failed", "rate_limit")
    c.send_one("conf/flow-rl-failed", {"number": 1})
    wait_until(lambda: counts() == (2, 2), 20, what="failed 2, handled 2")
    time.sleep(1.5)
    assert counts() == (2, 2)


def test_idempotency(sdk, make_stack):
    """`idempotency: event.data.order`: orders A, A, B in one send -> one run per order; the
    duplicate is skipped with reason idempotency."""
    st = make_stack(sdk)
    c = st.cairn
    ids = c.send(*({"name": "conf/flow-idempotency", "data": {"order": o}} for o in ("A", "A", "B")))
    recs = wait_recs(st, "flow-idempotency", 2)
    a_ids = ids[:2]
    ran = wait_until(lambda: [e for e in a_ids if c.runs_for_event(e)], 10, what="a run for order A")
    assert len(ran) == 1, f"both order-A events started runs: {ran}"
    [dup] = [e for e in a_ids if e not in ran]
    assert_skipped(c, dup, "flow-idempotency", "idempotency")
    completed_all(c, [c.wait_run_id(ran[0]), c.wait_run_id(ids[2])])
    time.sleep(1)
    assert sorted(r["order"] for r in st.app.recs("flow-idempotency")) == ["A", "B"], recs


# ---- debounce (§16) -----------------------------------------------------------------------

def test_debounce_burst(sdk, make_stack):
    """C-DEB-01: a burst for one key collapses into one run, ≥ 2 s after the last event, with
    the last event; only that event lists the run; a later event gets its own run."""
    st = make_stack(sdk)
    c = st.cairn
    burst = []
    for i in range(8):
        burst.append(c.send_one("conf/flow-debounce", {"counter": i, "name": "debounce"}))
        time.sleep(0.15)
    time.sleep(0.4)
    last = c.send_one("conf/flow-debounce", {"counter": 999, "name": "debounce"})
    t_last = now_ms()
    [rec] = wait_recs(st, "flow-debounce", 1, timeout=15)
    assert rec["counter"] == 999, rec
    assert (rec["t"] - t_last) / 1000 >= 1.5, f"run started {(rec['t'] - t_last) / 1000:.2f}s after the last event"
    run = c.wait_status(c.wait_run_id(last, timeout=5))
    assert run["status"] == "Completed" and output_of(run) == {"name": "debounce", "counter": 999}, run
    assert all(c.runs_for_event(e) == [] for e in burst), "a replaced event lists a run"
    time.sleep(1.5)
    assert len(st.app.recs("flow-debounce")) == 1, st.app.recs("flow-debounce")
    later = c.send_one("conf/flow-debounce", {"counter": 1000, "name": "debounce"})
    recs = wait_recs(st, "flow-debounce", 2, timeout=12)
    assert recs[1]["counter"] == 1000, recs
    completed_all(c, [c.wait_run_id(later)])


def test_debounce_keys(sdk, make_stack):
    """C-DEB-02: five different keys debounce separately: five runs, each one period later."""
    st = make_stack(sdk)
    t_send = now_ms()
    ids = st.cairn.send(*({"name": "conf/flow-debounce", "data": {"name": f"debounce {i}"}} for i in range(5)))
    recs = wait_recs(st, "flow-debounce", 5, timeout=15)
    completed_all(st.cairn, [st.cairn.wait_run_id(e) for e in ids])
    assert sorted(r["name"] for r in recs) == [f"debounce {i}" for i in range(5)]
    early = [round((r["t"] - t_send) / 1000, 2) for r in recs if r["t"] - t_send < 1500]
    assert not early, f"runs started {early}s after their event (period 2 s)"


def test_debounce_latest_ts_wins(sdk, make_stack):
    """C-DEB-03: the event with the latest `ts` wins, not the last one received."""
    st = make_stack(sdk)
    c = st.cairn
    now = int(now_ms())
    future = c.send_one("conf/flow-debounce-ts", {"name": "future"}, ts=now + 2000)
    present = c.send_one("conf/flow-debounce-ts", {"name": "now"}, ts=now)
    [rec] = wait_recs(st, "flow-debounce-ts", 1, timeout=15)
    assert rec["name"] == "future", rec
    completed_all(c, [c.wait_run_id(future, timeout=5)])
    time.sleep(1.5)
    assert len(st.app.recs("flow-debounce-ts")) == 1, st.app.recs("flow-debounce-ts")
    assert c.runs_for_event(present) == []


def test_debounce_timeout(sdk, make_stack):
    """C-DEB-04: period 2 s, timeout 4 s; an event every 0.5 s for 7 s never leaves a 2 s
    gap, so only the timeout can start a run, while the events are still coming."""
    st = make_stack(sdk)
    c = st.cairn
    t0 = now_ms()
    i = 0
    while True:
        t_last = now_ms()
        c.send_one("conf/flow-debounce-timeout", {"counter": i})
        i += 1
        if now_ms() - t0 >= 7000:
            break
        time.sleep(0.5)
    recs = st.app.recs("flow-debounce-timeout")
    assert recs, "no run started during a 7 s stream (debounce timeout 4 s)"
    first = min(r["t"] for r in recs)
    at = (first - t0) / 1000
    assert at >= 3.0, f"first run {at:.2f}s after the first event (timeout 4 s)"
    assert first < t_last, "the first run did not start until the stream ended"
    # The rest of the stream debounces into one or two more runs (timeout or quiet period);
    # the starts stay a timeout or a period apart, never one run per event.
    recs = wait_recs(st, "flow-debounce-timeout", 2, timeout=12)
    time.sleep(2.5)
    recs = st.app.recs("flow-debounce-timeout")
    g = gaps_s(starts(recs))
    assert len(recs) <= 3 and min(g) >= 2.5, f"{len(recs)} runs, starts {g}s apart"


# ---- priority (§17) -----------------------------------------------------------------------

def test_priority_reorders_backlog(sdk, make_stack):
    """C-PRIO-01: concurrency 1; while "none" runs, "low" then "high" queue up; "high"
    (priority +5 s) runs before "low"."""
    st = make_stack(sdk)
    c = st.cairn
    # "none" holds the only slot for 3 s, long enough for both others to be queued behind it
    # even on a loaded machine; they themselves are short.
    ids = [c.send_one("conf/flow-priority", {"priority": "none", "ms": 3000})]
    wait_recs(st, "flow-priority", 1)
    ids.append(c.send_one("conf/flow-priority", {"priority": "low", "ms": 500}))
    time.sleep(0.3)
    ids.append(c.send_one("conf/flow-priority", {"priority": "high", "ms": 500}))
    assert st.app.gauges()["flow-priority"]["now"] == 1, "'none' ended before the backlog formed"
    recs = wait_recs(st, "flow-priority", 3, timeout=20)
    completed_all(c, [c.wait_run_id(e) for e in ids])
    order = [r["priority"] for r in sorted(recs, key=lambda r: r["t"])]
    assert order == ["none", "high", "low"], order
    assert st.app.gauge_max("flow-priority") == 1


# ---- singleton (§18) ----------------------------------------------------------------------

def test_singleton_skip(sdk, make_stack):
    """C-SING-01: 10 events for user 42 at once: one run, the rest skipped (reason singleton);
    once it has finished, a new event runs again."""
    st = make_stack(sdk)
    c = st.cairn
    ids = c.send(*({"name": "conf/flow-singleton-skip", "data": {"user": {"id": 42}, "i": i}} for i in range(10)))
    [rec] = wait_recs(st, "flow-singleton-skip", 1)
    ran = wait_until(lambda: [e for e in ids if c.runs_for_event(e)], 10, what="the singleton run")
    assert len(ran) == 1, f"{len(ran)} runs for one singleton key"
    completed_all(c, [c.wait_run_id(ran[0])])
    for e in ids:
        if e != ran[0]:
            assert_skipped(c, e, "flow-singleton-skip", "singleton")
    assert len(st.app.recs("flow-singleton-skip")) == 1
    assert st.app.gauge_max("flow-singleton-skip") == 1
    after = c.send_one("conf/flow-singleton-skip", {"user": {"id": 42}, "i": 10, "ms": 100})
    completed_all(c, [c.wait_run_id(after)])


def test_singleton_key_false(sdk, make_stack):
    """C-SING-02: a key evaluating to false switches singleton off: both runs, together."""
    st = make_stack(sdk)
    c = st.cairn
    ids = c.send(*({"name": "conf/flow-singleton-skip", "data": {"user": {"id": False}, "i": i, "ms": 1500}} for i in range(2)))
    wait_recs(st, "flow-singleton-skip", 2, timeout=10)
    completed_all(c, [c.wait_run_id(e) for e in ids])
    assert st.app.gauge_max("flow-singleton-skip") == 2, st.app.gauges()
    assert all(c.skipped(e) == [] for e in ids)


def test_singleton_cancel(sdk, make_stack):
    """C-SING-03: cancel mode per key: 1 event, then 4 more at once while it sleeps: every
    older run is Cancelled (function.cancelled emitted), exactly one finishes with true."""
    st = make_stack(sdk)
    c = st.cairn
    first = c.send_one("conf/flow-singleton-cancel", {"user": {"id": 42}, "i": 0})
    wait_recs(st, "flow-singleton-cancel", 1)
    first_rid = c.wait_run_id(first, timeout=5)
    rest = c.send(*({"name": "conf/flow-singleton-cancel", "data": {"user": {"id": 42}, "i": i}} for i in range(1, 5)))
    assert c.wait_status(first_rid, TERMINAL, timeout=10)["status"] == "Cancelled"
    runs = wait_runs(c, [first, *rest], 5)
    final = wait_terminal(c, list(runs), timeout=25)
    statuses = sorted(r["status"] for r in final.values())
    assert statuses == ["Cancelled"] * 4 + ["Completed"], statuses
    [winner] = [r for r in final.values() if r["status"] == "Completed"]
    assert output_of(winner) is True, winner
    st.wait_count("flow-singleton-finished", 1, timeout=15)
    wait_until(lambda: st.app.count("flow-singleton-cancelled") >= 4, 15,
               what="inngest/function.cancelled for each cancelled run")
    time.sleep(1)
    assert st.app.count("flow-singleton-finished") == 1
    cancelled = {r["run"] for r in st.app.recs("flow-singleton-cancelled")}
    assert first_rid in cancelled and len(cancelled) == 4, cancelled


def test_singleton_skip_nokey(sdk, make_stack):
    """C-SING-05: skip mode without a key: 2 events at once -> 1 run; a 3rd event while that
    run sleeps is skipped too (a sleeping run still holds the singleton)."""
    st = make_stack(sdk)
    c = st.cairn
    ids = c.send(*({"name": "conf/flow-singleton-skip-nokey", "data": {"i": i}} for i in range(2)))
    wait_recs(st, "flow-singleton-skip-nokey", 1)
    ran = wait_until(lambda: [e for e in ids if c.runs_for_event(e)], 10, what="the singleton run")
    assert len(ran) == 1, ran
    [other] = [e for e in ids if e not in ran]
    assert_skipped(c, other, "flow-singleton-skip-nokey", "singleton")
    third = c.send_one("conf/flow-singleton-skip-nokey", {"i": 2})
    assert_skipped(c, third, "flow-singleton-skip-nokey", "singleton")
    completed_all(c, [c.wait_run_id(ran[0])])
    assert len(st.app.recs("flow-singleton-skip-nokey")) == 1


def test_singleton_cancel_nokey(sdk, make_stack):
    """C-SING-06: cancel mode without a key: a 2nd event cancels the sleeping 1st run; the 2nd
    starts promptly and completes."""
    st = make_stack(sdk)
    c = st.cairn
    e1 = c.send_one("conf/flow-singleton-cancel-nokey", {"i": 0})
    wait_recs(st, "flow-singleton-cancel-nokey", 1)
    r1 = c.wait_run_id(e1, timeout=5)
    t_second = now_ms()
    e2 = c.send_one("conf/flow-singleton-cancel-nokey", {"i": 1})
    assert c.wait_status(r1, TERMINAL, timeout=10)["status"] == "Cancelled"
    recs = wait_recs(st, "flow-singleton-cancel-nokey", 2, timeout=10)
    assert (recs[1]["t"] - t_second) / 1000 < 5, recs
    r2 = c.wait_run_id(e2)
    assert r2 != r1
    completed_all(c, [r2])
    wait_until(lambda: any(r["run"] == r1 for r in st.app.recs("flow-singleton-cancelled")), 15,
               what="inngest/function.cancelled for the first run")
    [rec] = [r for r in st.app.recs("flow-singleton-cancelled") if r["run"] == r1]
    assert rec["fn"] == fn_slug("flow-singleton-cancel-nokey"), rec


# ---- batching (§19) -----------------------------------------------------------------------

def test_batch_size_then_timeout(sdk, make_stack):
    """C-BATCH-01: maxSize 5, timeout 5 s, 8 events: a full batch of 5 at once, the other 3
    when the timeout ends; every event lists its batch run, whose event_ids are the batch."""
    st = make_stack(sdk)
    c = st.cairn
    t_send = now_ms()
    ids = c.send(*({"name": "conf/flow-batch", "data": {"num": i}} for i in range(8)))
    recs = wait_recs(st, "flow-batch", 1, timeout=10)
    assert len(recs[0]["nums"]) == 5, recs
    assert (recs[0]["t"] - t_send) / 1000 < 4, "the full batch waited for the timeout"
    recs = wait_recs(st, "flow-batch", 2, timeout=15)
    assert len(recs[1]["nums"]) == 3, recs
    assert (recs[1]["t"] - t_send) / 1000 >= 4, "the partial batch did not wait for the timeout"
    assert sorted(recs[0]["nums"] + recs[1]["nums"]) == list(range(8))
    by_num = dict(zip(range(8), ids))
    for rec in recs:
        batch_ids = sorted(by_num[n] for n in rec["nums"])
        for eid in batch_ids:
            assert [run_id_of(r) for r in c.runs_for_event(eid)] == [rec["run"]], eid
        run = c.wait_status(rec["run"])
        assert run["status"] == "Completed", run
        assert sorted(run.get("event_ids") or []) == batch_ids, run
        assert output_of(run)["count"] == len(batch_ids)
    time.sleep(1)
    assert len(st.app.recs("flow-batch")) == 2


def test_batch_if(sdk, make_stack):
    """C-BATCH-04: `if: int(event.data.num) % 2 == 0`: the 5 even events form one batch, each
    odd one runs alone at once: 6 runs, 10 events."""
    st = make_stack(sdk)
    c = st.cairn
    ids = c.send(*({"name": "conf/flow-batch-if", "data": {"num": i}} for i in range(10)))
    wait_until(lambda: sum(len(r["nums"]) for r in st.app.recs("flow-batch-if")) >= 10, 12,
               what="all 10 events handled")
    time.sleep(1)
    recs = st.app.recs("flow-batch-if")
    groups = sorted(sorted(r["nums"]) for r in recs)
    assert groups == [[0, 2, 4, 6, 8], [1], [3], [5], [7], [9]], groups
    completed_all(c, list(runs_of(c, ids)))


def test_batch_key(sdk, make_stack):
    """C-BATCH-07: maxSize 3 per event.data.userId: users a and b fill a batch each at once;
    c's two events run together when the timeout ends."""
    st = make_stack(sdk)
    c = st.cairn
    t_send = now_ms()
    ids = c.send(*({"name": "conf/flow-batch-key", "data": {"userId": u, "num": i}}
                   for i, u in enumerate("abcabcab")))
    recs = wait_recs(st, "flow-batch-key", 2, timeout=10)
    early = sorted("".join(r["users"]) for r in recs[:2])
    assert early == ["aaa", "bbb"], recs
    assert all((r["t"] - t_send) / 1000 < 4 for r in recs[:2]), "a full batch waited for the timeout"
    recs = wait_recs(st, "flow-batch-key", 3, timeout=15)
    assert recs[2]["users"] == ["c", "c"], recs
    assert (recs[2]["t"] - t_send) / 1000 >= 4, "c's batch did not wait for the timeout"
    completed_all(c, list(runs_of(c, ids)))
    time.sleep(1)
    assert len(st.app.recs("flow-batch-key")) == 3


# ---- invoke (C-INV-07) --------------------------------------------------------------------

def test_invoke_rate_limited(sdk, make_stack):
    """C-INV-07: the invokee allows 1 run per minute: the 1st invoke succeeds, the 2nd fails
    the invoking run at once (not after the 60 s invoke timeout)."""
    st = make_stack(sdk)
    c = st.cairn
    run = c.finish(c.send_one("conf/flow-rl-invoker"))
    assert run["status"] == "Completed" and output_of(run) == {"child": "invoked"}, run
    t0 = time.monotonic()
    run = c.finish(c.send_one("conf/flow-rl-invoker"), timeout=20)
    assert run["status"] == "Failed", run
    assert time.monotonic() - t0 < 20
    assert "timed out" not in (str(output_of(run)) + str(run.get("error", ""))).lower(), run
    assert st.app.count("flow-rl-invokee") == 1
