"""End-to-end cases: each SDK's fixture app driven by a fresh `cairn dev`.

Every case starts its own cairn (random port, temporary database) and app, syncs it with
an out-of-band PUT, sends events to /e/{key}, and checks outcomes through the REST API
(/v1/events/{id}/runs, /v1/runs/{id}) and through the app's own step-body counters.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from harness.procs import App, Cairn, dev_env, free_port, only_sdks, output_of, run_id_of, wait_until
from harness.wire import step_hash

pytestmark = pytest.mark.server

H = step_hash


def completed(run, expected_output=None):
    assert run["status"] == "Completed", f"run not Completed: {str(run)[:1500]}"
    if expected_output is not None:
        assert output_of(run) == expected_output, f"output: {str(output_of(run))[:1500]}"
    return output_of(run)


def uid() -> str:
    return uuid.uuid4().hex[:12]


# ---- sync ------------------------------------------------------------------------------------

def test_sync_out_of_band(sdk, make_stack):
    """The app's PUT → POST /fn/register round trip succeeds and registers runnable functions."""
    st = make_stack(sdk, sync=False)
    r = st.sync()
    if sdk != "py":
        assert "modified" in r.json(), r.text
    # Re-sync of an identical config is accepted too.
    st.sync()
    completed(st.run_to_end("conf/serial"))


def test_sync_by_server_url_flag(sdk, procs, tmp_path):
    """`cairn dev -u <app url>`: the server syncs the app itself (a PUT from the server)."""
    port = free_port()
    app = App(sdk, tmp_path, dev_env(f"http://127.0.0.1:{port}"))
    procs.append(app)
    cairn = Cairn(tmp_path, sync_urls=[app.url], port=port)
    procs.append(cairn)
    # No PUT from the harness: a run can only appear once cairn synced the app itself.
    eid = None

    def synced():
        nonlocal eid
        eid = cairn.send_one("conf/serial")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if cairn.runs_for_event(eid):
                return True
            time.sleep(0.2)
        return False

    wait_until(synced, 30, interval=0.5, what="cairn dev -u to sync the app")
    completed(cairn.finish(eid))


# ---- steps -----------------------------------------------------------------------------------

def test_serial_steps(sdk, make_stack):
    st = make_stack(sdk)
    run = st.run_to_end("conf/serial")
    completed(run, {"name": "conf/serial", "body": "ok", "first": "first step",
                    "second": {"first": "first step", "second": True}})
    rid = run_id_of(run)
    assert st.app.count("first step", rid) == 1
    assert st.app.count("second step", rid) == 1


def test_serial_steps_wire_through_proxy(sdk, make_stack):
    """The exact calls: stepId, ctx.stack, memo shapes, event shape in the body."""
    st = make_stack(sdk, proxy=True)
    run = st.run_to_end("conf/serial")
    completed(run)
    calls = st.calls()
    bodies = [c.json() for c in calls]
    assert all("stepId=step" in c.query for c in calls), [c.query for c in calls]
    assert all(b["ctx"]["run_id"] == run_id_of(run) for b in bodies)
    first = bodies[0]
    assert first["steps"] == {} and first["ctx"]["stack"] == {"stack": [], "current": 0}
    assert first["ctx"]["attempt"] == 0 and first["event"]["name"] == "conf/serial"
    assert first["events"] == [first["event"]] and first["event"]["user"] == {}
    assert isinstance(first["event"]["ts"], int) and isinstance(first["event"]["id"], str)
    assert first["use_api"] is False and first["ctx"]["use_api"] is False
    if sdk == "js4":
        # Checkpointed (see test_js4_checkpointing): both steps ran in this one request.
        assert len(calls) == 1, f"{len(calls)} calls"
        assert calls[0].status == 206 and calls[0].resp_json()[-1]["op"] == "RunComplete"
        return
    assert len(calls) == 3, f"{len(calls)} calls"
    assert [c.status for c in calls] == [206, 206, 200]
    last = bodies[-1]
    assert last["steps"][H("first step")] == {"data": "first step"}
    assert last["steps"][H("second step")] == {"data": {"first": "first step", "second": True}}
    assert last["ctx"]["stack"]["stack"] == [H("first step"), H("second step")]
    assert last["ctx"]["stack"]["current"] == 2


def test_parallel_steps(sdk, make_stack):
    st = make_stack(sdk)
    run = st.run_to_end("conf/parallel")
    completed(run, {"a": "a", "b": "b", "c": "c", "d": "d"})
    rid = run_id_of(run)
    for s in "abcd":
        assert st.app.count(s, rid) == 1, f"step {s} ran {st.app.count(s, rid)} times"


def test_parallel_targeted_calls(sdk, make_stack):
    """Planned steps are each called once with stepId=<hash> and disable_immediate_execution."""
    st = make_stack(sdk, proxy=True)
    completed(st.run_to_end("conf/parallel"))
    targeted = [c for c in st.calls() if "stepId=step" not in c.query]
    ids = sorted(c.query.split("stepId=")[1].split("&")[0] for c in targeted)
    assert set(ids) >= {H("a"), H("b"), H("c")}, ids
    assert len([i for i in ids if i in (H("a"), H("b"), H("c"))]) == 3, ids
    assert all(c.json()["ctx"]["disable_immediate_execution"] is True for c in targeted)


def test_race_mode(sdk, make_stack):
    st = make_stack(sdk)
    run = st.run_to_end("conf/race", timeout=40)
    completed(run, {"winner": "fast", "after": "after"})
    rid = run_id_of(run)
    assert st.app.count("fast", rid) == 1
    assert st.app.count("after", rid) == 1
    time.sleep(2)  # a late "slow" must still run at most once
    assert st.app.count("slow", rid) <= 1


def test_loop_repeated_step_ids(sdk, make_stack):
    st = make_stack(sdk)
    run = st.run_to_end("conf/loop")
    completed(run, [0, 1, 2])
    assert st.app.count("item", run_id_of(run)) == 3


def test_founding_function(sdk, make_stack):
    st = make_stack(sdk)
    run = st.run_to_end("conf/founding", timeout=40)
    completed(run, {"len": 100, "done": True})
    rid = run_id_of(run)
    for s in ("collect-data", "digest", "finalize"):
        assert st.app.count(s, rid) == 1, s


# ---- errors and retries ------------------------------------------------------------------------

RETRY_TIMEOUT = 90  # the first default backoff upstream is 15 s + up to 30 s jitter


@pytest.mark.slow
def test_step_retry_then_success(sdk, make_stack):
    st = make_stack(sdk)
    run = st.run_to_end("conf/retry", timeout=RETRY_TIMEOUT)
    completed(run, {"value": "recovered after 2 attempts"})
    assert st.app.count("flaky", run_id_of(run)) == 2


@pytest.mark.slow
def test_function_retry_then_success(sdk, make_stack):
    st = make_stack(sdk)
    run = st.run_to_end("conf/retry-fn", timeout=RETRY_TIMEOUT)
    completed(run, {"attempt": 1})
    assert st.app.records()["attempts"] == [0, 1]


def test_non_retriable_error(sdk, make_stack):
    st = make_stack(sdk)
    run = st.run_to_end("conf/non-retriable")
    assert run["status"] == "Failed", run
    assert "no retry plz" in str(run.get("output")) + str(run.get("error", "")), run
    time.sleep(2)
    rid = run_id_of(run)
    assert st.app.count("fatal", rid) == 1
    assert st.app.count("reached-after-fatal", rid) == 0


def test_retry_after_honoured(sdk, make_stack):
    # A 20 s fixed retry interval here, so only an honoured Retry-After can be quick.
    st = make_stack(sdk, retry_interval=20)
    run = st.run_to_end("conf/retry-after", timeout=40)
    completed(run, {"value": "ok after 2"})
    at = st.app.records()["throttled-at"]
    assert len(at) == 2
    gap = (at[1] - at[0]) / 1000
    # Asked for 1 s (JS `Retry-After: 1`; Python an ISO date ~1 s ahead).
    assert 0.9 <= gap < 5, f"retry came {gap:.2f}s after the RetryAfterError"


def test_final_failure_runs_on_failure(sdk, make_stack):
    st = make_stack(sdk)
    eid = st.send("conf/fail-handled")
    run = st.cairn.finish(eid)
    assert run["status"] == "Failed", run
    rid = run_id_of(run)
    assert st.app.count("doomed", rid) == 1
    st.wait_count("onFailure", 1, timeout=20)
    [rec] = st.app.records()["onFailure"]
    assert rec["message"] == "final failure", rec
    assert rec["function_id"] == "conformance-fail-handled", rec
    assert rec["run_id"] == rid, rec
    assert rec["original_event"] == "conf/fail-handled", rec
    assert rec["failure_run_id"] != rid


# ---- sleep -----------------------------------------------------------------------------------

def test_sleep(sdk, make_stack):
    st = make_stack(sdk)
    out = completed(st.run_to_end("conf/sleep"))
    assert 1900 <= out["slept_ms"] < 15000, out


def test_sleep_until(sdk, make_stack):
    st = make_stack(sdk)
    out = completed(st.run_to_end("conf/sleep-until"))
    assert 1900 <= out["slept_ms"] < 15000, out


# ---- waitForEvent ----------------------------------------------------------------------------

def _start_waiting(st, fn_event, data):
    eid = st.send(fn_event, data)
    rid = st.cairn.wait_run_id(eid)
    st.wait_count("reached-wait", 1, run_id=rid)
    time.sleep(1.0)  # let the server persist the pause after the WaitForEvent op
    return rid


def test_wait_for_event_match(sdk, make_stack):
    st = make_stack(sdk)
    key = uid()
    rid = _start_waiting(st, "conf/wait-match", {"id": key})
    st.send("conf/wait-match.resume", {"id": "someone-else"})
    time.sleep(1.5)
    assert st.cairn.run(rid)["status"] == "Running", "a non-matching event resumed the wait"
    st.send("conf/wait-match.resume", {"id": key, "extra": 7})
    run = st.cairn.wait_status(rid, timeout=15)
    completed(run, {"matched": True, "data": {"id": key, "extra": 7}})


def test_wait_for_event_if(sdk, make_stack):
    st = make_stack(sdk)
    key = uid()
    rid = _start_waiting(st, "conf/wait-if", {"id": key})
    st.send("conf/wait-if.resume", {"id": key, "ok": False})
    time.sleep(1.5)
    assert st.cairn.run(rid)["status"] == "Running", "an event failing the `if` resumed the wait"
    st.send("conf/wait-if.resume", {"id": key, "ok": True})
    run = st.cairn.wait_status(rid, timeout=15)
    completed(run, {"matched": True, "data": {"id": key, "ok": True}})


def test_wait_for_event_timeout(sdk, make_stack):
    st = make_stack(sdk)
    t0 = time.monotonic()
    run = st.run_to_end("conf/wait-timeout", timeout=30)
    completed(run, {"matched": False})
    assert time.monotonic() - t0 >= 1.9


# ---- invoke ----------------------------------------------------------------------------------

def test_invoke_success(sdk, make_stack):
    st = make_stack(sdk)
    completed(st.run_to_end("conf/invoke"), {"child": {"doubled": 42}})
    assert st.app.count("invoke-child") == 1


def test_invoke_failure(sdk, make_stack):
    st = make_stack(sdk)
    out = completed(st.run_to_end("conf/invoke-failure"))
    assert out["caught"] is True and "child broke" in out["message"], out
    assert st.app.count("invoke-child-fail") == 1


def test_invoke_timeout(sdk, make_stack):
    st = make_stack(sdk)
    t0 = time.monotonic()
    out = completed(st.run_to_end("conf/invoke-timeout", timeout=25))
    assert out["caught"] is True, out
    assert "Timed out waiting for invoked function to complete" in out["message"], out
    assert time.monotonic() - t0 < 25


# ---- events ----------------------------------------------------------------------------------

def test_send_event_from_step(sdk, make_stack):
    st = make_stack(sdk)
    tag = uid()
    out = completed(st.run_to_end("conf/send-event", {"tag": tag}))
    ids = out["ids"]
    assert isinstance(ids, list) and len(ids) == 1, out
    child = st.cairn.finish(ids[0])
    completed(child, {"tag": tag})
    assert st.app.count("send-receiver") == 1


def test_batch_events(sdk, make_stack):
    st = make_stack(sdk)
    ids = st.cairn.send(*({"name": "conf/batch", "data": {"seq": i}} for i in (1, 2, 3)))
    run = st.cairn.finish(ids[0], timeout=20)
    completed(run, {"count": 3, "seqs": [1, 2, 3]})
    for eid in ids[1:]:
        assert [run_id_of(r) for r in st.cairn.runs_for_event(eid)] == [run_id_of(run)]
    assert st.app.count("batch-run") == 1


@pytest.mark.slow
def test_big_batch_uses_api(sdk, make_stack):
    """10 events x 450 KiB (each under the 512 KiB event limit): the call body would exceed
    4 MiB, so the server sends use_api and the SDK fetches the batch from /v0/runs/{id}/batch."""
    st = make_stack(sdk, proxy=True)
    blob = "e" * (450 * 1024)
    # One request, so the batch fills before its 5 s timeout however slow the machine is.
    ids = st.cairn.send(*[{"name": "conf/big-batch", "data": {"blob": blob, "i": i}} for i in range(10)])
    run = st.cairn.finish(ids[0], timeout=30)
    completed(run, {"count": 10, "total": 10 * len(blob)})
    first = st.calls()[0]
    assert len(first.body) < 4 * 1024 * 1024, f"call body {len(first.body)} bytes"
    body = first.json()
    assert body["use_api"] is True and body["ctx"]["use_api"] is True


@pytest.mark.slow
def test_big_step_state_uses_api(sdk, make_stack):
    """Five 1 MiB step outputs: later calls exceed 4 MiB of memos, so use_api + /actions."""
    st = make_stack(sdk, proxy=True)
    run = st.run_to_end("conf/big-steps", timeout=60)
    completed(run, {"lens": [1024 * 1024] * 5})
    rid = run_id_of(run)
    for i in range(5):
        assert st.app.count(f"big-{i}", rid) == 1, i
    assert any(c.json()["use_api"] for c in st.calls()), "no call used use_api"
    assert all(len(c.body) <= 4 * 1024 * 1024 for c in st.calls())


# ---- cancellation ----------------------------------------------------------------------------

def _start_sleeping(st, key):
    eid = st.send("conf/cancel-on", {"id": key})
    rid = st.cairn.wait_run_id(eid)
    st.wait_count("reached-sleep", 1, run_id=rid)
    time.sleep(1.0)
    return rid


def test_cancel_on_event(sdk, make_stack):
    st = make_stack(sdk)
    key = uid()
    rid = _start_sleeping(st, key)
    st.send("conf/cancel-on.cancel", {"id": "not-" + key})
    time.sleep(1.0)
    assert st.cairn.run(rid)["status"] == "Running", "a non-matching cancel event cancelled the run"
    st.send("conf/cancel-on.cancel", {"id": key})
    st.cairn.wait_status(rid, "Cancelled", timeout=10)
    time.sleep(7)  # past the end of the 8 s sleep: nothing may run any more
    assert st.app.count("after-sleep", rid) == 0
    assert st.cairn.run(rid)["status"] == "Cancelled"


def test_cancel_by_api(sdk, make_stack):
    st = make_stack(sdk)
    rid = _start_sleeping(st, uid())
    r = st.cairn.cancel(rid)
    assert 200 <= r.status_code < 300, f"DELETE /v1/runs/{rid} -> {r.status_code} {r.text}"
    st.cairn.wait_status(rid, "Cancelled", timeout=10)
    time.sleep(7)  # past the end of the 8 s sleep
    assert st.app.count("after-sleep", rid) == 0
    assert st.cairn.run(rid)["status"] == "Cancelled"


# ---- JS v4 checkpointing ---------------------------------------------------------------------

@only_sdks("js4")
def test_js4_checkpointing(sdk, make_stack):
    """With ctx.fn_id/qi_id the v4 SDK runs both steps in one request, checkpointing them to
    /v1/checkpoint/{runId}/async, and finishes with RunComplete (protocol §13)."""
    st = make_stack(sdk, proxy=True)
    run = st.run_to_end("conf/serial")
    completed(run, {"name": "conf/serial", "body": "ok", "first": "first step",
                    "second": {"first": "first step", "second": True}})
    calls = st.calls()
    first = calls[0].json()
    assert first["ctx"].get("fn_id"), "server did not send ctx.fn_id (checkpointing off)"
    assert first["ctx"].get("qi_id"), "server did not send ctx.qi_id"
    assert len(calls) == 1, f"{len(calls)} calls; checkpointing should need one"
    [op] = calls[0].resp_json()
    assert op["op"] == "RunComplete"


@pytest.mark.slow
def test_long_steps(sdk, make_stack):
    """Four 4 s step bodies. inngest@4 exceeds its 10 s checkpointing maxRuntime mid-run and
    hands control back. Observed on 4.24.0 (serve, async checkpointing): it flushes the
    checkpoint and answers 206 [StepPlanned <next step>] — not the [DiscoveryRequest] the
    protocol notes describe (that op comes from its sync/durable-endpoint mode only). The
    server must carry on from there and finish the run with every step run once."""
    st = make_stack(sdk, proxy=True)
    run = st.run_to_end("conf/long-steps", timeout=60)
    completed(run, ["slow-1", "slow-2", "slow-3", "slow-4"])
    rid = run_id_of(run)
    for s in ("slow-1", "slow-2", "slow-3", "slow-4"):
        assert st.app.count(s, rid) == 1, s
    if sdk == "js4":
        calls = st.calls()
        ops = [op for c in calls if c.status == 206 for op in (c.resp_json() or [])]
        assert len(calls) > 1, "all four steps in one request: maxRuntime did not hand back"
        assert any(op.get("op") in ("StepPlanned", "DiscoveryRequest") for op in ops), \
            f"no hand-back op; ops: {[o.get('op') for o in ops]}"


@only_sdks("js4")
def test_js4_checkpointing_off_fallback(sdk, make_stack):
    """A v4 function with `checkpointing: false` uses the classic protocol even though the
    server offers checkpointing: one step per request, final 200."""
    st = make_stack(sdk, proxy=True)
    run = st.run_to_end("conf/no-checkpoint")
    completed(run, ["first step", "second step"])
    calls = st.calls()
    assert [c.status for c in calls] == [206, 206, 200], [c.status for c in calls]
    assert [op["op"] for c in calls[:2] for op in c.resp_json()] == ["StepRun", "StepRun"]


def test_sync_in_band(sdk, procs, tmp_path):
    """`cairn dev -u <url>` asks for an in-band sync (PUT with X-Inngest-Sync-Kind: in_band),
    and takes the config from the PUT's reply. Python refuses in-band sync unsigned (dev
    mode), so the server must fall back to out-of-band and still end up synced."""
    from harness.fake import RecordingProxy
    from harness.stack import _Stoppable

    port = free_port()
    app = App(sdk, tmp_path, dev_env(f"http://127.0.0.1:{port}"))
    procs.append(app)
    proxy = RecordingProxy(app.origin)
    procs.append(_Stoppable(proxy))
    cairn = Cairn(tmp_path, sync_urls=[f"{proxy.url}/api/inngest"], port=port)
    procs.append(cairn)
    wait_until(lambda: [e for e in proxy.exchanges if e.method == "PUT"], 20, what="the sync PUT")
    puts = [e for e in proxy.exchanges if e.method == "PUT"]
    assert puts[0].headers.get("x-inngest-sync-kind") == "in_band", \
        f"server's sync PUT did not ask for in-band: {puts[0].headers}"
    if sdk != "py":
        assert puts[0].status == 200 and puts[0].resp_headers.get("x-inngest-sync-kind") == "in_band"
    # The proxy records the PUT's answer before Cairn has stored the config it carries; an
    # event sent in between rightly matches nothing, so wait for the functions to be known.
    wait_until(cairn.synced_functions, 20, what="the synced functions")
    completed(cairn.finish(cairn.send_one("conf/serial")))


@pytest.mark.slow
def test_call_timeout_mid_request(sdk, make_stack, procs):
    """Six 1 s steps under a 3 s call timeout. Classic SDKs (one step per request) never hit
    it. inngest@4 runs all steps in one checkpointing request, which the server abandons at
    3 s and retries; the abandoned request keeps running and checkpointing, and those late
    checkpoints are stale dispatches the server must answer with 409 (protocol §13.2), so
    that the SDK stops. Either way the run completes with every result once."""
    from harness.fake import RecordingProxy
    from harness.stack import _Stoppable

    st = make_stack(sdk, sync=False, cairn_args=["--call-timeout", "3"], retry_interval=1)
    # Watch the SDK -> server API traffic (checkpoints) through a proxy in front of cairn.
    api = RecordingProxy(st.cairn.url)
    procs.append(_Stoppable(api))
    st.app.stop()
    st.app = App(sdk, st.app.proc.log_path.parent, dev_env(api.url), name=f"app-{sdk}-api-proxy")
    procs.append(st.app)
    st.sync()
    run = st.run_to_end("conf/many-steps", timeout=90)
    completed(run, [1, 2, 3, 4, 5, 6])
    rid = run_id_of(run)
    for i in range(1, 7):
        assert 1 <= st.app.count(f"tick-{i}", rid) <= 2, (i, st.app.counters())
    if sdk == "js4":
        cps = [e for e in api.exchanges if e.path == f"/v1/checkpoint/{rid}/async"]
        assert cps, "no checkpoints"
        statuses = [e.status for e in cps]
        assert 409 in statuses, f"no stale-dispatch 409 among checkpoint replies: {statuses}"


def test_step_error_exhausted_fails_without_function_retry(sdk, make_stack):
    """C-ERR-04: a step failing on every attempt (retries 1) is memoised as an error after
    its last attempt; the handler rethrows it and the SDK answers no-retry, so the run
    fails without further calls."""
    st = make_stack(sdk, retry_interval=1)
    run = st.run_to_end("conf/always-fails", timeout=30)
    assert run["status"] == "Failed", run
    assert "boom" in json.dumps(run.get("output")) + json.dumps(run.get("error")), run
    rid = run_id_of(run)
    time.sleep(3)  # a wrong function-level retry would call again within the 1 s interval
    assert st.app.count("boom", rid) == 2
    assert st.app.count("after-boom", rid) == 1


def test_trigger_expression(sdk, make_stack):
    st = make_stack(sdk)
    standard = st.send("conf/expr", {"type": "standard"})
    premium = st.send("conf/expr", {"type": "premium"})
    completed(st.cairn.finish(premium), {"type": "premium"})
    time.sleep(1.5)
    assert st.cairn.runs_for_event(standard) == [], "an event failing the trigger expression ran"
    assert st.app.count("expr-trigger") == 1


def test_event_id_idempotency(sdk, make_stack):
    """C-EVT-01: events carrying the same user `id` start the function once."""
    st = make_stack(sdk)
    key = "idem-" + uid()
    ids = [st.send("conf/serial", {"n": i}, id=key) for i in range(3)]
    run = st.cairn.finish(ids[0])
    completed(run)
    time.sleep(2)
    assert st.app.count("first step") == 1, st.app.counters()
    other = st.send("conf/serial", {}, id="idem-" + uid())
    completed(st.cairn.finish(other))
    assert st.app.count("first step") == 2


def test_cancel_while_call_in_flight(sdk, make_stack):
    """C-CANCEL-03: cancelled while a step body runs in the SDK; the late answer must not
    revive the run, and nothing after it runs."""
    st = make_stack(sdk)
    eid = st.send("conf/long-steps")
    rid = st.cairn.wait_run_id(eid)
    st.wait_count("slow-1", 1, run_id=rid)
    r = st.cairn.cancel(rid)
    assert 200 <= r.status_code < 300, r.text
    st.cairn.wait_status(rid, "Cancelled", timeout=10)
    time.sleep(8)  # slow-1 ends at ~4 s; slow-2 would start right after
    assert st.cairn.run(rid)["status"] == "Cancelled"
    assert st.app.count("slow-2", rid) == 0


def test_invoke_missing_function(sdk, make_stack):
    """C-INV-07 / C-PAR-11: invoking a function that does not exist fails the invoke step
    promptly (not after its 60 s timeout)."""
    st = make_stack(sdk)
    t0 = time.monotonic()
    out = completed(st.run_to_end("conf/invoke-missing", timeout=30))
    assert out["caught"] is True, out
    assert time.monotonic() - t0 < 30


def test_parallel_failures_one_on_failure(sdk, make_stack):
    """C-PAR-13: two parallel steps fail for good; the run fails once, and its onFailure
    handler runs exactly once."""
    st = make_stack(sdk)
    run = st.run_to_end("conf/parallel-fail", timeout=30)
    assert run["status"] == "Failed", run
    rid = run_id_of(run)
    st.wait_count("parallel-fail-onFailure", 1, timeout=20)
    time.sleep(3)
    assert st.app.count("parallel-fail-onFailure") == 1
    assert st.app.records()["parallel-fail-onFailure"] == [rid]
    assert st.app.count("step-a", rid) == 1 and st.app.count("step-b", rid) == 1


def test_retry_wire_attempts(sdk, make_stack):
    """Through the proxy: the retried call carries attempt 1 and max_attempts = retries + 1,
    for the same step; the failed attempt's error is not memoised."""
    st = make_stack(sdk, proxy=True, retry_interval=1)
    run = st.run_to_end("conf/retry", timeout=30)
    completed(run, {"value": "recovered after 2 attempts"})
    bodies = [c.json() for c in st.calls()]
    assert all(b["ctx"]["max_attempts"] == 3 for b in bodies), [b["ctx"]["max_attempts"] for b in bodies]
    attempts = [b["ctx"]["attempt"] for b in bodies]
    assert attempts[:2] == [0, 1], attempts
    assert bodies[1]["steps"] == {}, "the failed attempt's error was memoised"
    if sdk == "py":
        assert st.calls()[0].status == 206 and st.calls()[0].resp_json()[0]["op"] == "StepError"
    assert all(a == 0 for a in attempts[2:]), attempts  # a new step or discovery restarts at 0


def test_invoked_run_event(sdk, make_stack):
    """The child of an invoke runs on `inngest/function.invoked` with the payload's data and
    the `_inngest` correlation metadata (protocol §10.4)."""
    st = make_stack(sdk, proxy=True)
    completed(st.run_to_end("conf/invoke"), {"child": {"doubled": 42}})
    child_calls = [c for c in st.calls() if "fnId=conformance-invoke-child" in c.query]
    assert child_calls, "no call to the invoked function"
    ev = child_calls[0].json()["event"]
    assert ev["name"] == "inngest/function.invoked", ev
    assert ev["data"]["n"] == 21
    meta = ev["data"].get("_inngest") or {}
    assert meta.get("correlation_id", "").endswith("." + H("call-child")), meta


def test_sync_url_flag_app_started_later(sdk, procs, tmp_path):
    """`cairn dev -u <url>` before the app is up (the usual order when both start together):
    like `inngest dev`, which re-pings a listed app while it is in an error state
    (protocol §4.1), cairn must keep trying and sync the app once it listens."""
    app_port = free_port()
    cairn = Cairn(tmp_path, sync_urls=[f"http://127.0.0.1:{app_port}/api/inngest"])
    procs.append(cairn)
    time.sleep(2)  # cairn's first attempt fails: nothing listens yet
    app = App(sdk, tmp_path, dev_env(cairn.url), port=app_port)
    procs.append(app)
    eid = None

    def synced():
        nonlocal eid
        eid = cairn.send_one("conf/serial")
        time.sleep(1)
        return bool(cairn.runs_for_event(eid))

    wait_until(synced, 20, interval=0.5, what="cairn to sync an app that came up after it")
    completed(cairn.finish(eid))
