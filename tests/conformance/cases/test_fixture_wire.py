"""The fixture apps, driven directly by the harness acting as a fake Inngest server.

No `cairn` here: these prove each fixture app is good on its own, and pin the exact wire
each official SDK produces (protocol §4–§9), so that a failing end-to-end case can be
blamed on the server with confidence. The apps run in cloud mode with a signing key.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from harness import wire
from harness.fake import FakeInngest, json_route
from harness.procs import SDK_VERSIONS, App, cloud_env, only_sdks
from harness.wire import call_body, event, step_hash

H = step_hash


class CloudApp:
    def __init__(self, sdk, log_dir):
        self.fake = FakeInngest({("POST", "/fn/register"): json_route(200, {"ok": True, "modified": True})})
        self.app = App(sdk, log_dir, cloud_env(self.fake.url), name=f"wire-app-{sdk}")

    def stop(self):
        self.app.stop()
        self.fake.stop()


@pytest.fixture(scope="session")
def _cloud_apps(tmp_path_factory):
    apps = {}
    yield apps, tmp_path_factory
    for a in apps.values():
        a.stop()


@pytest.fixture
def capp(sdk, _cloud_apps) -> CloudApp:
    apps, factory = _cloud_apps
    if sdk not in apps:
        apps[sdk] = CloudApp(sdk, factory.mktemp(f"wire-{sdk}"))
    return apps[sdk]


def ops(resp):
    assert resp.status_code == 206, f"expected 206, got {resp.status_code}: {resp.text[:400]}"
    body = resp.json()
    assert isinstance(body, list), body
    return body


def sdk_headers_ok(sdk, resp):
    assert resp.headers.get("x-inngest-sdk", "").startswith(SDK_VERSIONS[sdk]), dict(resp.headers)


# ---- introspection and sync --------------------------------------------------------------

def test_introspection_unsigned(sdk, capp):
    import httpx

    resp = httpx.get(capp.app.url, timeout=10)
    if sdk == "js3":
        # 3.52 answers unsigned introspection in cloud mode with the unauthenticated body.
        sdk_headers_ok(sdk, resp)
        assert resp.status_code == 200
        body = resp.json()
        assert body["mode"] == "cloud" and body["has_signing_key"] is True
        assert body["function_count"] == 64  # 62 functions + 2 onFailure handlers
    else:
        # 4.x and py 0.5.19 refuse unsigned introspection in cloud mode with 401
        # {"message":"Unauthorized"}, and strip x-inngest-sdk (only x-inngest-sdk-handled stays).
        assert resp.status_code == 401
        assert resp.json() == {"message": "Unauthorized"}
        assert resp.headers.get("x-inngest-sdk-handled") == "true"
        assert "x-inngest-sdk" not in resp.headers


def test_introspection_signed(sdk, capp):
    import httpx

    resp = httpx.get(capp.app.url, headers={"x-inngest-signature": wire.sign(b"")}, timeout=10)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["authentication_succeeded"] is True
    assert body["app_id"] == "conformance"
    assert body["event_key_hash"]


def test_out_of_band_sync_body(sdk, capp):
    before = len(capp.fake.find("POST", "/fn/register"))
    resp = capp.app.put_sync()
    assert resp.status_code == 200, resp.text
    regs = capp.fake.find("POST", "/fn/register")
    assert len(regs) == before + 1
    reg = regs[-1]
    body = reg.json()
    # JS: appName/deployType; Python: appname/deploy_type (protocol §4.2).
    if sdk == "py":
        assert body["appname"] == "conformance" and body["deploy_type"] == "ping"
        assert reg.headers["authorization"] == f"Bearer {wire.hashed_signing_key()}"
    else:
        assert body["appName"] == "conformance" and body["deployType"] == "ping"
        assert reg.headers["authorization"] == f"Bearer signkey-test-{wire.hashed_signing_key()}"
    assert body["url"] == capp.app.url
    slugs = {f["id"]: f for f in body["functions"]}
    for fid in ("serial", "parallel", "founding", "cancel-on", "batch", "fail-handled"):
        assert wire.fn_slug(fid) in slugs, sorted(slugs)
    assert "conformance-fail-handled-failure" in slugs
    serial = slugs["conformance-serial"]
    assert serial["triggers"] == [{"event": "conf/serial"}]
    assert serial["steps"]["step"]["runtime"]["url"] == f"{capp.app.url}?fnId=conformance-serial&stepId=step"
    assert slugs["conformance-retry"]["steps"]["step"]["retries"] == {"attempts": 2}
    failure = slugs["conformance-fail-handled-failure"]
    assert failure["triggers"][0]["event"] == "inngest/function.failed"
    assert "conformance-fail-handled" in failure["triggers"][0]["expression"]
    cancel = slugs["conformance-cancel-on"]["cancel"][0]
    assert cancel["event"] == "conf/cancel-on.cancel"
    assert cancel["if"] == "event.data.id == async.data.id"
    assert slugs["conformance-expr-trigger"]["triggers"] == [
        {"event": "conf/expr", "expression": "event.data.type == 'premium'"}]
    batch = slugs["conformance-batch"]["batchEvents"]
    assert batch["maxSize"] == 3 and batch["timeout"] == "5s"


# ---- calls ---------------------------------------------------------------------------------

def test_call_unsigned_rejected(sdk, capp):
    body = call_body(event("conf/serial"))
    resp = capp.app.post_call("serial", body, key=None)
    assert resp.status_code == 401, resp.text


def test_call_wrong_key_rejected(sdk, capp):
    body = call_body(event("conf/serial"))
    resp = capp.app.post_call("serial", body, key=wire.WRONG_SIGNING_KEY)
    assert resp.status_code == 401, resp.text


def test_serial_steps_wire(sdk, capp):
    ev = event("conf/serial")
    rid = wire.new_run_id()
    r1 = capp.app.post_call("serial", call_body(ev, run_id=rid))
    sdk_headers_ok(sdk, r1)
    [op] = ops(r1)
    assert op["op"] == "StepRun" and op["id"] == H("first step") and op["data"] == "first step"
    assert op["displayName"] == "first step"
    memo = {H("first step"): {"data": "first step"}}
    [op2] = ops(capp.app.post_call("serial", call_body(ev, memo, run_id=rid)))
    assert op2["op"] == "StepRun" and op2["id"] == H("second step")
    assert op2["data"] == {"first": "first step", "second": True}
    memo[H("second step")] = {"data": op2["data"]}
    r3 = capp.app.post_call("serial", call_body(ev, memo, run_id=rid))
    assert r3.status_code == 200, r3.text
    assert r3.json() == {"name": "conf/serial", "body": "ok", "first": "first step",
                         "second": {"first": "first step", "second": True}}
    assert capp.app.count("first step", rid) == 1 and capp.app.count("second step", rid) == 1


def test_parallel_plans_wire(sdk, capp):
    ev = event("conf/parallel")
    rid = wire.new_run_id()
    planned = ops(capp.app.post_call("parallel", call_body(ev, run_id=rid)))
    assert [o["op"] for o in planned] == ["StepPlanned"] * 3
    assert [o["id"] for o in planned] == [H("a"), H("b"), H("c")]
    # Targeted call for b: only b runs.
    [run_b] = ops(capp.app.post_call("parallel", call_body(ev, run_id=rid, disable_immediate_execution=True),
                                     step_id=H("b")))
    assert run_b["op"] == "StepRun" and run_b["id"] == H("b") and run_b["data"] == "b"
    assert capp.app.count("a", rid) == 0 and capp.app.count("b", rid) == 1
    memo = {H(x): {"data": x} for x in "abc"}
    # After the group, with disable_immediate_execution set, d is planned, not run inline.
    [d] = ops(capp.app.post_call("parallel", call_body(ev, memo, run_id=rid, disable_immediate_execution=True)))
    assert d["id"] == H("d") and d["op"] == "StepPlanned"
    memo[H("d")] = {"data": "d"}
    r = capp.app.post_call("parallel", call_body(ev, memo, run_id=rid))
    assert r.status_code == 200 and r.json() == {"a": "a", "b": "b", "c": "c", "d": "d"}


def test_race_plans_wire(sdk, capp):
    planned = ops(capp.app.post_call("race", call_body(event("conf/race"))))
    assert [o["id"] for o in planned] == [H("fast"), H("slow")]
    assert all(o["op"] == "StepPlanned" for o in planned)
    if sdk != "js3":
        # group.parallel race mode travels as opts.parallelMode (protocol §6, C-PAR-03).
        assert all((o.get("opts") or {}).get("parallelMode") == "race" for o in planned), planned


def test_sleep_wire(sdk, capp):
    ev = event("conf/sleep")
    memo = {H("before"): {"data": int(time.time() * 1000)}}
    [op] = ops(capp.app.post_call("sleep", call_body(ev, memo)))
    assert op["op"] == "Sleep" and op["id"] == H("nap") and op["displayName"] == "nap"
    if sdk == "py":
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", op["name"]), op["name"]
    else:
        assert op["name"] == "2s"


def test_sleep_until_wire(sdk, capp):
    before = int(time.time() * 1000)
    [op] = ops(capp.app.post_call("sleep-until", call_body(event("conf/sleep-until"),
                                                            {H("before"): {"data": before}})))
    assert op["op"] == "Sleep" and op["id"] == H("until")
    assert op["name"].startswith(time.strftime("%Y-%m-%dT", time.gmtime((before + 2000) / 1000))), op["name"]


def test_wait_for_event_wire(sdk, capp):
    [op] = ops(capp.app.post_call("wait-match", call_body(event("conf/wait-match", {"id": "x"}))))
    assert op["op"] == "WaitForEvent" and op["id"] == H("wait")
    assert op["name"] == "conf/wait-match.resume"
    assert op["opts"]["if"] == "event.data.id == async.data.id"
    assert op["opts"]["timeout"] == "20s"
    # Resumed with an event: the memo is the whole event, unwrapped.
    resume = event("conf/wait-match.resume", {"id": "x", "v": 1})
    r = capp.app.post_call("wait-match", call_body(event("conf/wait-match", {"id": "x"}), {H("wait"): resume}))
    assert r.status_code == 200 and r.json() == {"matched": True, "data": {"id": "x", "v": 1}}
    # Timed out: memo null.
    r = capp.app.post_call("wait-match", call_body(event("conf/wait-match", {"id": "x"}), {H("wait"): None}))
    assert r.status_code == 200 and r.json() == {"matched": False, "data": None}


def test_invoke_wire(sdk, capp):
    [op] = ops(capp.app.post_call("invoke", call_body(event("conf/invoke"))))
    assert op["op"] == "InvokeFunction" and op["id"] == H("call-child")
    assert op["opts"]["function_id"] == "conformance-invoke-child"
    assert op["opts"]["payload"]["data"] == {"n": 21}
    r = capp.app.post_call("invoke", call_body(event("conf/invoke"), {H("call-child"): {"data": {"doubled": 42}}}))
    assert r.status_code == 200 and r.json() == {"child": {"doubled": 42}}


def test_invoke_timeout_memo_wire(sdk, capp):
    [op] = ops(capp.app.post_call("invoke-timeout", call_body(event("conf/invoke-timeout"))))
    assert op["opts"]["timeout"] == "1s"
    memo = {H("call-child"): {"error": {
        "error": "InngestInvokeTimeoutError: Timed out waiting for invoked function to complete",
        "name": "InngestInvokeTimeoutError",
        "message": "Timed out waiting for invoked function to complete"}}}
    r = capp.app.post_call("invoke-timeout", call_body(event("conf/invoke-timeout"), memo))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["caught"] is True and "Timed out waiting for invoked function" in out["message"]


def test_send_event_wire(sdk, capp):
    ev = event("conf/send-event", {"tag": "t1"})
    if sdk == "py":
        # Python's send_event is a step.run that calls the event API inline (protocol §7.2),
        # so it reaches the fake server's /e/{key}.
        capp.fake.routes[("POST", "/e/")] = json_route(200, {"ids": ["01FAKEEVENT"], "status": 200})
        [op] = ops(capp.app.post_call("send-event", call_body(ev)))
        assert op["op"] == "StepRun" and op["data"] == ["01FAKEEVENT"]
        sent = capp.fake.find("POST", "/e/")[-1]
        assert sent.path == f"/e/{wire.EVENT_KEY}"
        assert sent.json()[0]["name"] == "conf/sent-by-step"
    else:
        capp.fake.routes[("POST", "/e/")] = json_route(200, {"ids": ["01FAKEEVENT"], "status": 200})
        [op] = ops(capp.app.post_call("send-event", call_body(ev)))
        assert op["op"] == "StepRun" and op["id"] == H("send")
        assert op["opts"]["type"] == "step.sendEvent"
        assert op["data"] == {"ids": ["01FAKEEVENT"]}


def test_step_error_retriable_wire(sdk, capp):
    [op] = ops(r := capp.app.post_call("retry", call_body(event("conf/retry"), max_attempts=3)))
    assert op["op"] == "StepError" and op["id"] == H("flaky")
    assert op["error"]["message"] == "flaky failure"
    assert r.headers.get("x-inngest-no-retry", "false") == "false"


def test_step_error_last_attempt_wire(sdk, capp):
    # First attempt of the step in this run, but the server says it is the last one.
    [op] = ops(capp.app.post_call("retry", call_body(event("conf/retry"), attempt=2, max_attempts=3)))
    assert op["op"] == "StepFailed" and op["error"]["message"] == "flaky failure"


def test_non_retriable_wire(sdk, capp):
    r = capp.app.post_call("non-retriable", call_body(event("conf/non-retriable"), max_attempts=4))
    assert r.headers["x-inngest-no-retry"] == "true"
    if sdk == "py":
        # Python lets a NonRetriableError raised inside a step fail the whole call:
        # 500 + no-retry, never a StepFailed op.
        assert r.status_code == 500, r.text
        assert r.json()["code"] == "non_retriable_error" and r.json()["message"] == "no retry plz"
        return
    [op] = ops(r)
    assert op["op"] == "StepFailed", op
    assert op["error"]["message"] == "no retry plz"
    # 3.52.4 serialises the error's name as "Error"; 4.x keeps "NonRetriableError".
    assert op["error"]["name"] == ("Error" if sdk == "js3" else "NonRetriableError")
    # Replay with the memoised error: the handler rethrows; the answer is final (no retry).
    memo = {H("fatal"): {"error": {"name": "NonRetriableError", "message": "no retry plz"}}}
    r2 = capp.app.post_call("non-retriable", call_body(event("conf/non-retriable"), memo))
    assert r2.status_code == 400, r2.text
    assert r2.headers["x-inngest-no-retry"] == "true"


def test_retry_after_wire(sdk, capp):
    r = capp.app.post_call("retry-after", call_body(event("conf/retry-after"), max_attempts=3))
    ra = r.headers.get("retry-after")
    assert ra, dict(r.headers)
    if sdk == "py":
        # Python: the error escapes the step: a function-level 500 with an ISO date.
        assert r.status_code == 500 and r.json()["code"] == "retry_after_error"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", ra), ra
        assert "x-inngest-no-retry" not in r.headers
    else:
        [op] = ops(r)
        assert op["op"] == "StepError" and op["error"]["message"] == "slow down"
        assert ra == "1"  # whole seconds
        assert r.headers["x-inngest-no-retry"] == "false"


def test_function_error_wire(sdk, capp):
    r = capp.app.post_call("retry-fn", call_body(event("conf/retry-fn"), max_attempts=3))
    assert r.status_code == 500, r.text
    assert r.json()["message"] == "handler failure"
    assert r.headers.get("x-inngest-no-retry", "false") == "false"
    r2 = capp.app.post_call("retry-fn", call_body(event("conf/retry-fn"), attempt=1, max_attempts=3))
    assert r2.status_code == 200 and r2.json() == {"attempt": 1}


def test_loop_ids_wire(sdk, capp):
    ev = event("conf/loop")
    memo = {H("item"): {"data": 0}, H("item:1"): {"data": 1}}
    [op] = ops(capp.app.post_call("loop", call_body(ev, memo)))
    assert op["id"] == H("item:2") and op["data"] == 2
    assert (op.get("userland") or {}).get("index") == 2
    memo[H("item:2")] = {"data": 2}
    r = capp.app.post_call("loop", call_body(ev, memo))
    assert r.status_code == 200 and r.json() == [0, 1, 2]


def test_founding_wire(sdk, capp):
    ev = event("conf/founding")
    [op] = ops(capp.app.post_call("founding", call_body(ev)))
    assert op["id"] == H("collect-data") and op["data"] == "x" * 1_000_000
    memo = {H("collect-data"): {"data": op["data"]}}
    [op] = ops(capp.app.post_call("founding", call_body(ev, memo)))
    assert op["id"] == H("digest") and op["data"] == "x" * 100
    memo[H("digest")] = {"data": op["data"]}
    [op] = ops(capp.app.post_call("founding", call_body(ev, memo)))
    assert op["id"] == H("finalize") and op["data"] == {"done": True}
    memo[H("finalize")] = {"data": op["data"]}
    r = capp.app.post_call("founding", call_body(ev, memo))
    assert r.status_code == 200 and r.json() == {"len": 100, "done": True}


def test_use_api_fetches_state(sdk, capp):
    """With use_api the SDK fetches events and memos from /v0/runs/{id}/batch|actions."""
    rid = wire.new_run_id()
    ev = event("conf/big-batch", {"blob": "b" * 10})
    capp.fake.routes[("GET", f"/v0/runs/{rid}/batch")] = json_route(200, [ev, ev])
    capp.fake.routes[("GET", f"/v0/runs/{rid}/actions")] = json_route(200, {})
    body = call_body(ev, run_id=rid, use_api=True, events=[])
    body["ctx"]["use_api"] = True
    r = capp.app.post_call("big-batch", body)
    assert r.status_code == 200, r.text
    assert r.json() == {"count": 2, "total": 20}
    got = capp.fake.find("GET", f"/v0/runs/{rid}/")
    assert {e.path for e in got} == {f"/v0/runs/{rid}/batch", f"/v0/runs/{rid}/actions"}
    auth = got[0].headers.get("authorization", "")
    assert auth.endswith(wire.hashed_signing_key()), auth


@only_sdks("js4")
def test_js4_checkpointing_wire(sdk, capp):
    """v4 checkpoints steps to /v1/checkpoint/{runId}/async when ctx.fn_id/qi_id are sent (§13)."""
    rid = wire.new_run_id()
    capp.fake.routes[("POST", f"/v1/checkpoint/{rid}/async")] = lambda ex: (200, {}, b"")
    body = call_body(event("conf/serial"), run_id=rid, fn_id="00000000-0000-4000-a000-000000000001",
                     qi_id="cWk=")
    r = capp.app.post_call("serial", body)
    got = ops(r)
    assert got[-1]["op"] == "RunComplete", got
    assert got[-1]["data"]["body"] == "ok"
    cps = capp.fake.find("POST", f"/v1/checkpoint/{rid}/async")
    assert cps, "no checkpoint request"
    steps = [s for c in cps for s in c.json()["steps"]]
    assert [s["id"] for s in steps] == [H("first step"), H("second step")]
    assert cps[0].json()["fn_id"] == "00000000-0000-4000-a000-000000000001"
    assert cps[0].json()["qi_id"] == "cWk="
    assert cps[0].headers["authorization"] == f"Bearer signkey-test-{wire.hashed_signing_key()}"


def test_cron_trigger_passthrough(sdk, procs, tmp_path):
    """The SDKs pass a 6-field (seconds) cron schedule through to the register body as is."""
    fake = FakeInngest({("POST", "/fn/register"): json_route(200, {"ok": True, "modified": True})})
    try:
        app = App(sdk, tmp_path, {**cloud_env(fake.url), "CONF_CRON": "*/2 * * * * *"})
        procs.append(app)
        assert app.put_sync().status_code == 200
        body = fake.find("POST", "/fn/register")[-1].json()
        [tick] = [f for f in body["functions"] if f["id"] == "conformance-cron-tick"]
        assert tick["triggers"] == [{"cron": "*/2 * * * * *"}]
    finally:
        fake.stop()


# ---- flow control in the sync body (protocol §4.4) ----------------------------------------

FLOW_KEYS = ("concurrency", "throttle", "rateLimit", "debounce", "batchEvents", "priority",
             "idempotency", "singleton")


def expected_flow(sdk: str) -> dict[str, dict]:
    """The flow-control fields each flow fixture function must carry in the register body.

    Same values in every SDK except where the SDK cannot say it the same way: Python's
    `concurrency` is always a list (JS also has the bare number and the single object), and
    Python writes durations in the largest whole unit (24 h -> "1d")."""
    js = sdk != "py"
    day = "24h" if js else "1d"
    rl_day = {"limit": 1, "period": day, "key": "event.data.number"}
    acct = {"concurrency": [{"limit": 1, "scope": "account", "key": "'global'"}]}
    return {
        "flow-conc-fn": {"concurrency": 1 if js else [{"limit": 1}]},
        "flow-conc-key": {"concurrency": {"limit": 1, "key": "event.data.num"} if js
                          else [{"limit": 1, "key": "event.data.num"}]},
        "flow-conc-key-fn": {"concurrency": [{"limit": 2}, {"limit": 1, "key": "event.data.num"}]},
        "flow-conc-acct-a": acct,
        "flow-conc-acct-b": acct,
        "flow-throttle-b0": {"throttle": {"limit": 1, "period": "2s", "burst": 0}},
        "flow-throttle-b1": {"throttle": {"limit": 1, "period": "4s", "burst": 1}},
        "flow-throttle-key": {"throttle": {"key": "event.data.id", "limit": 1, "period": "6s", "burst": 0}},
        "flow-rate-limit": {"rateLimit": rl_day},
        "flow-rl-failed": {"rateLimit": rl_day},
        "flow-rl-failed-handler": {"rateLimit": rl_day},
        "flow-rl-invokee": {"rateLimit": {"limit": 1, "period": "1m"}},
        "flow-idempotency": {"idempotency": "event.data.order"},
        "flow-debounce": {"debounce": {"key": "event.data.name", "period": "2s"}},
        "flow-debounce-ts": {"debounce": {"period": "2s"}},
        "flow-debounce-timeout": {"debounce": {"period": "2s", "timeout": "4s"}},
        "flow-priority": {"concurrency": [{"limit": 1}],
                          "priority": {"run": "event.data.priority == 'high' ? 5 : 0"}},
        "flow-singleton-skip": {"singleton": {"key": "event.data.user.id", "mode": "skip"}},
        "flow-singleton-cancel": {"singleton": {"key": "event.data.user.id", "mode": "cancel"}},
        "flow-singleton-skip-nokey": {"singleton": {"mode": "skip"}},
        "flow-singleton-cancel-nokey": {"singleton": {"mode": "cancel"}},
        "flow-batch": {"batchEvents": {"maxSize": 5, "timeout": "5s"}},
        "flow-batch-if": {"batchEvents": {"maxSize": 5, "timeout": "5s", "if": "int(event.data.num) % 2 == 0"}},
        "flow-batch-key": {"batchEvents": {"maxSize": 3, "timeout": "5s", "key": "event.data.userId"}},
        # No flow control: the lifecycle handlers and the invoker.
        "flow-singleton-cancelled": {},
        "flow-singleton-finished": {},
        "flow-rl-invoker": {},
    }


def test_flow_config_sync_body(sdk, capp):
    """Each SDK's register body carries the flow-control config exactly (no extra fields)."""
    assert capp.app.put_sync().status_code == 200
    body = capp.fake.find("POST", "/fn/register")[-1].json()
    got = {f["id"]: f for f in body["functions"]}
    want = expected_flow(sdk)
    flow_ids = {i for i in got if i.startswith(wire.fn_slug("flow-"))}
    assert flow_ids == {wire.fn_slug(i) for i in want}, sorted(flow_ids ^ {wire.fn_slug(i) for i in want})
    for fid, flow in want.items():
        f = got[wire.fn_slug(fid)]
        have = {k: f[k] for k in FLOW_KEYS if f.get(k) not in (None, [], {})}
        assert have == flow, f"{fid}: {have} != {flow}"
    # Triggers of the functions on lifecycle events (the expressions the server evaluates).
    assert got[wire.fn_slug("flow-rl-failed-handler")]["triggers"] == [{
        "event": "inngest/function.failed",
        "expression": "event.data.function_id == 'conformance-flow-rl-failed'"}]
    assert got[wire.fn_slug("flow-singleton-finished")]["triggers"] == [{
        "event": "inngest/function.finished",
        "expression": "event.data.function_id == 'conformance-flow-singleton-cancel' && event.data.result == true"}]
    [cancelled] = got[wire.fn_slug("flow-singleton-cancelled")]["triggers"]
    assert cancelled["event"] == "inngest/function.cancelled"
    assert "'conformance-flow-singleton-cancel-nokey'" in cancelled["expression"]
    # Both account-scoped functions listen to the same event.
    assert got[wire.fn_slug("flow-conc-acct-a")]["triggers"] == [{"event": "conf/flow-conc-acct"}]
    assert got[wire.fn_slug("flow-conc-acct-b")]["triggers"] == [{"event": "conf/flow-conc-acct"}]
    if sdk != "py":
        assert got[wire.fn_slug("flow-rl-failed")]["steps"]["step"]["retries"] == {"attempts": 0}


def test_flow_fixture_bodies_wire(sdk, capp):
    """The flow functions' own calls behave (no server): a batch handler sees all `events`,
    a singleton-cancel run sleeps after its first step, the throttled step runs inline."""
    evs = [event("conf/flow-batch", {"num": i}) for i in range(3)]
    r = capp.app.post_call("flow-batch", call_body(evs[0], events=evs))
    assert r.status_code == 200 and r.json() == {"count": 3, "nums": [0, 1, 2], "users": [None] * 3}, r.text
    ev = event("conf/flow-singleton-cancel", {"user": {"id": 42}})
    [op] = ops(capp.app.post_call("flow-singleton-cancel", call_body(ev)))
    assert op["op"] == "StepRun" and op["id"] == H("counter1")
    [op] = ops(capp.app.post_call("flow-singleton-cancel", call_body(ev, {H("counter1"): {"data": "counted"}})))
    assert op["op"] == "Sleep" and op["id"] == H("sleep")
    [op] = ops(capp.app.post_call("flow-throttle-key", call_body(event("conf/flow-throttle-key", {"id": 0}))))
    assert op["op"] == "StepRun" and op["id"] == H("b")
    [op] = ops(capp.app.post_call("flow-throttle-key", call_body(event("conf/flow-throttle-key", {"id": 0}),
                                                                 {H("b"): {"data": 0}})))
    assert op["id"] == H("b:1") and op["data"] == 1
