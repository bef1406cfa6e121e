"""`cairn start` with a signing key and an event key: signed calls, keyed event API, and a
wrong signing key on the app side failing runs with a clear reason."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid

import httpx
import pytest

from harness import wire
from harness.fake import RecordingProxy
from harness.procs import App, Cairn, cloud_env, output_of, run_id_of
from harness.stack import _Stoppable, assert_sync_ok

pytestmark = pytest.mark.server


def test_start_mode_signed_calls(sdk, make_stack):
    st = make_stack(sdk, mode="start", proxy=True)
    run = st.run_to_end("conf/serial")
    assert run["status"] == "Completed", run
    assert output_of(run)["body"] == "ok"
    for call in st.calls():
        sig = call.headers.get("x-inngest-signature")
        assert sig, "call without X-Inngest-Signature in start mode"
        parts = dict(p.split("=", 1) for p in sig.split("&"))
        # The body on the wire must be JCS, and signed exactly as sent (protocol §3.2).
        assert call.body == wire.canonical(json.loads(call.body)), "call body is not JCS-canonical"
        key = wire.SIGNING_KEY.split("-", 2)[2].encode()
        want = hmac.new(key, call.body + parts["t"].encode(), hashlib.sha256).hexdigest()
        assert parts["s"] == want, "bad call signature"


def test_start_mode_event_key(procs, tmp_path):
    cairn = Cairn(tmp_path, mode="start")
    procs.append(cairn)
    ev = [{"name": "conf/serial", "data": {}}]
    r = httpx.post(f"{cairn.url}/e/not-the-key", json=ev, timeout=10)
    assert r.status_code == 401, r.text
    r = httpx.post(f"{cairn.url}/e/{cairn.event_key}", json=ev, timeout=10)
    assert r.status_code == 200 and len(r.json()["ids"]) == 1, r.text


def test_start_mode_api_requires_auth(procs, tmp_path):
    cairn = Cairn(tmp_path, mode="start")
    procs.append(cairn)
    r = httpx.post(f"{cairn.url}/fn/register", json={"appName": "x", "url": "http://127.0.0.1:1/",
                                                     "functions": []}, timeout=10)
    assert r.status_code in (401, 403), r.text
    eid = cairn.send_one("conf/serial")
    assert httpx.get(f"{cairn.url}/v1/events/{eid}/runs", timeout=10).status_code in (401, 403)
    # Both bearer forms the SDKs send are accepted (JS: prefixed, Python: bare hash).
    for bearer in (wire.hashed_signing_key(), "signkey-test-" + wire.hashed_signing_key()):
        r = httpx.get(f"{cairn.url}/v1/events/{eid}/runs", headers={"authorization": f"Bearer {bearer}"},
                      timeout=10)
        assert r.status_code == 200, (bearer[:20], r.status_code, r.text)


def test_wrong_signing_key_fails_run_clearly(sdk, procs, tmp_path):
    """The app holds a different signing key than cairn: every call is rejected by the SDK
    (401), and the run fails with a reason that says so."""
    cairn = Cairn(tmp_path, mode="start")
    procs.append(cairn)
    # Let the app's own register POST through (rewrite its bearer) so the functions exist.
    api = RecordingProxy(cairn.url, set_headers={
        "authorization": f"Bearer {wire.hashed_signing_key()}"})
    procs.append(_Stoppable(api))
    app = App(sdk, tmp_path, cloud_env(api.url, signing_key=wire.WRONG_SIGNING_KEY,
                                       event_key=cairn.event_key))
    procs.append(app)
    assert_sync_ok(sdk, app.put_sync())
    eid = cairn.send_one("conf/auth-probe")
    run = cairn.finish(eid, timeout=30)
    assert run["status"] == "Failed", run
    text = json.dumps({k: run.get(k) for k in ("output", "error")}).lower()
    assert any(w in text for w in ("401", "unauthorized", "signature")), f"unclear reason: {text[:800]}"
    assert app.count("auth-probe") == 0
    assert run_id_of(run)


def test_start_mode_core_functions(sdk, make_stack):
    """Several step kinds at once under signatures and bearer auth: parallel plans, sleep,
    invoke (function.finished correlation), sendEvent through the keyed event API, a
    waitForEvent timeout, and use_api fetches with the hashed signing key."""
    st = make_stack(sdk, mode="start")
    tag = uuid.uuid4().hex[:8]
    events = {
        "parallel": st.send("conf/parallel"),
        "sleep": st.send("conf/sleep"),
        "invoke": st.send("conf/invoke"),
        "send": st.send("conf/send-event", {"tag": tag}),
        "wait": st.send("conf/wait-timeout"),
        "big": st.send("conf/big-steps"),
    }
    runs = {k: st.cairn.finish(eid, timeout=60) for k, eid in events.items()}
    for k, run in runs.items():
        assert run["status"] == "Completed", (k, run)
    assert output_of(runs["parallel"]) == {"a": "a", "b": "b", "c": "c", "d": "d"}
    assert output_of(runs["sleep"])["slept_ms"] >= 1900
    assert output_of(runs["invoke"]) == {"child": {"doubled": 42}}
    assert output_of(runs["wait"]) == {"matched": False}
    assert output_of(runs["big"]) == {"lens": [1024 * 1024] * 5}
    [sent_id] = output_of(runs["send"])["ids"]
    child = st.cairn.finish(sent_id)
    assert child["status"] == "Completed" and output_of(child) == {"tag": tag}
