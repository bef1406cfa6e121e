"""Bad input (issue 4): apps that are not SDKs, or misbehave, must fail their runs with a
clear error after their retries, while cairn keeps serving a well-behaved app and loses
nothing.

The bad app (badapps/badapp.py) is registered by a raw POST /fn/register, like the
scripted-SDK cases upstream (C-ERR-11/12/13), one function per misbehaviour.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from harness.procs import ROOT, RETRY_INTERVAL, Cairn, Proc, free_port, output_of, run_id_of, selected_first_sdk, wait_until
from harness.stack import Stack

pytestmark = pytest.mark.server

BEHAVIOURS = ("nosdk", "notfound", "badjson", "badjson200", "hang")
RETRIES = 1  # so "after its retries" means exactly 2 calls

# What a clear error mentions, per behaviour (any of the words, case-insensitive).
CLEAR = {
    "nosdk": ("sdk", "<html>hi</html>"),
    "notfound": ("404",),
    "badjson": ("json", "opcode", "parse", "decode"),
    "badjson200": ("json", "parse", "decode"),
    "hang": ("timeout", "timed out", "time out"),
}


def cairn_supports(flag: str) -> bool:
    from harness.procs import cairn_bin

    try:
        out = subprocess.run([str(cairn_bin()), "dev", "--help"], capture_output=True, text=True, timeout=20)
    except OSError:
        return False
    return flag in out.stdout


class BadApp:
    def __init__(self, log_dir):
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        env = {"PORT": str(self.port), "PATH": "/usr/bin:/bin", "HANG_SECONDS": "600"}
        self.proc = Proc("badapp", [sys.executable, str(ROOT / "badapps" / "badapp.py")], ROOT, env, log_dir)
        wait_until(lambda: httpx.get(self.origin + "/calls", timeout=2).status_code == 200, 15,
                   what="bad app to listen")

    def calls(self) -> dict:
        return httpx.get(self.origin + "/calls", timeout=5).json()

    def stop(self):
        self.proc.stop()


def register_bad_app(cairn: Cairn, origin: str, behaviours) -> httpx.Response:
    functions = []
    for b in behaviours:
        slug = f"bad-apps-{b}"
        functions.append({
            "id": slug,
            "name": b,
            "triggers": [{"event": f"bad/{b}"}],
            "steps": {"step": {
                "id": "step", "name": "step",
                "runtime": {"type": "http", "url": f"{origin}/{b}/api/inngest?fnId={slug}&stepId=step"},
                "retries": {"attempts": RETRIES},
            }},
        })
    body = {"url": f"{origin}/api/inngest", "deployType": "ping", "framework": "badapp",
            "appName": "bad-apps", "sdk": "js:v3.52.4", "v": "0.1", "functions": functions}
    return cairn.http.post("/fn/register", content=json.dumps(body),
                           headers={"content-type": "application/json"})


def error_text(run: dict) -> str:
    return json.dumps({k: run.get(k) for k in ("output", "error") if k in run}).lower()


@pytest.fixture
def world(procs, tmp_path):
    args = []
    hang = cairn_supports("--call-timeout")
    if hang:
        args = ["--call-timeout", "3"]
    st = Stack.start(selected_first_sdk(), tmp_path, procs, cairn_args=args)
    bad = BadApp(tmp_path)
    procs.append(bad)
    behaviours = BEHAVIOURS if hang else tuple(b for b in BEHAVIOURS if b != "hang")
    r = register_bad_app(st.cairn, bad.origin, behaviours)
    assert r.status_code == 200, f"/fn/register -> {r.status_code} {r.text}"
    return st, bad, behaviours, hang


@pytest.mark.parametrize("behaviour", [b for b in BEHAVIOURS if b != "hang"])
def test_bad_app_run_fails_clearly(world, behaviour):
    st, bad, _, _ = world
    eid = st.cairn.send_one(f"bad/{behaviour}")
    run = st.cairn.finish(eid, timeout=RETRY_INTERVAL * (RETRIES + 1) + 20)
    assert run["status"] == "Failed", run
    text = error_text(run)
    assert any(w in text for w in CLEAR[behaviour]), f"unclear error for {behaviour}: {text[:800]}"
    time.sleep(1)
    assert bad.calls().get(behaviour) == RETRIES + 1, f"calls: {bad.calls()} (retries {RETRIES})"


def test_bad_app_hang_times_out(world):
    st, bad, behaviours, hang = world
    if not hang:
        pytest.fail("cairn has no --call-timeout flag: a hanging app holds a call for the "
                    "default 300 s call timeout; cannot check in a bounded test")
    eid = st.cairn.send_one("bad/hang")
    run = st.cairn.finish(eid, timeout=(3 + RETRY_INTERVAL) * (RETRIES + 1) + 20)
    assert run["status"] == "Failed", run
    text = error_text(run)
    assert any(w in text for w in CLEAR["hang"]), text[:800]
    assert bad.calls().get("hang") == RETRIES + 1


def test_bad_apps_do_not_disturb_good_app(world):
    """All misbehaving runs in flight at once; the good app's runs still complete, and every
    accepted event has exactly one run."""
    st, bad, behaviours, _ = world
    bad_ids = [st.cairn.send_one(f"bad/{b}") for b in behaviours]
    good_ids = [st.send("conf/serial") for _ in range(5)]
    for eid in good_ids:
        run = st.cairn.finish(eid, timeout=30)
        assert run["status"] == "Completed", run
    for eid in bad_ids:
        runs = wait_until(lambda: st.cairn.runs_for_event(eid), 20, what=f"run for {eid}")
        assert len(runs) == 1, runs
    # The hanging call (if any) is still in flight; everything else has ended (how each
    # one must end is test_bad_app_run_fails_clearly's business).
    for eid, b in zip(bad_ids, behaviours):
        if b != "hang":
            st.cairn.wait_status(run_id_of(st.cairn.runs_for_event(eid)[0]),
                                 timeout=RETRY_INTERVAL * (RETRIES + 1) + 20)
    # The server is still healthy.
    assert httpx.get(st.cairn.url + "/health", timeout=5).status_code == 200
    assert output_of(st.cairn.finish(st.send("conf/serial")))["body"] == "ok"
