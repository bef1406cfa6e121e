"""Child processes of a case: the fixture app of one SDK, and a fresh `cairn` server."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from . import wire

ROOT = Path(__file__).resolve().parent.parent  # tests/conformance
REPO = ROOT.parent.parent
SDKS = ("js3", "js4", "py")
SDK_VERSIONS = {"js3": "inngest-js:v3.52.4", "js4": "inngest-js:v4.", "py": "inngest-py:v0.5."}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `pred` until it returns a truthy value; raise AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except (httpx.HTTPError, OSError, ValueError) as e:  # not up yet, bad JSON, …
            last_exc = e
        if time.monotonic() > deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def owns_listener(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on `port` (Linux /proc).

    free_port() can hand two parallel cases the same port: the loser's bind fails, but until
    it exits, the winner's answers on that port look like its own. So a child is up only once
    the listening socket is one of its file descriptors."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return False
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) in inodes:
                return True
        except OSError:
            continue
    return False


class PortClash(Exception):
    """A child could not bind its port (taken between free_port() and its bind)."""


def port_clash(log: str) -> bool:
    return any(w in log for w in ("EADDRINUSE", "Address already in use", "AddrInUse"))


class Proc:
    """A child process whose output goes to a log file that failing tests print."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict, log_dir: Path):
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.p = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.p.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._log.close()


class App:
    """One SDK's fixture app (js3/, js4/ or py/), listening on PORT, serving /api/inngest."""

    def __init__(self, sdk: str, log_dir: Path, env: dict, name: str | None = None, port: int | None = None):
        self.sdk = sdk
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("INNGEST_")}
        full_env.update(env)
        if sdk == "py":
            argv = [sys.executable, str(ROOT / "py" / "app.py")]
            cwd = ROOT / "py"
        else:
            argv = ["node", str(ROOT / sdk / "app.mjs")]
            cwd = ROOT / sdk
        # free_port() can race with other parallel cases: on a port clash, take another one
        # (unless the caller fixed the port).
        for attempt in range(4):
            self.port = port or free_port()
            self.url = f"http://127.0.0.1:{self.port}/api/inngest"
            self.origin = f"http://127.0.0.1:{self.port}"
            full_env["PORT"] = str(self.port)
            self.proc = Proc((name or f"app-{sdk}") + (f"-{attempt}" if attempt else ""), argv, cwd,
                             full_env, log_dir)
            try:
                self._wait_ready()
                return
            except PortClash:
                if port:
                    raise
        raise AssertionError(f"{sdk} app: no free port after 4 tries")

    def _wait_ready(self):
        def up():
            if not self.proc.alive():
                tail = self.proc.log_tail()
                if port_clash(tail):
                    raise PortClash(tail)
                raise AssertionError(f"{self.sdk} app exited early:\n{tail}")
            if not owns_listener(self.proc.p.pid, self.port):
                return False
            return httpx.get(self.origin + "/counters", timeout=2).status_code == 200

        wait_until(up, 30, what=f"{self.sdk} fixture app to listen")

    def counters(self) -> dict:
        return httpx.get(self.origin + "/counters", timeout=5).json()["counters"]

    def records(self) -> dict:
        return httpx.get(self.origin + "/counters", timeout=5).json()["records"]

    def gauges(self) -> dict:
        """{name: {"now": n, "max": m}}: step bodies in progress in a section, now and at most."""
        return httpx.get(self.origin + "/counters", timeout=5).json().get("gauges") or {}

    def gauge_max(self, name: str) -> int:
        return (self.gauges().get(name) or {}).get("max", 0)

    def recs(self, name: str) -> list:
        return self.records().get(name) or []

    def count(self, name: str, run_id: str | None = None) -> int:
        key = f"{name}@{run_id}" if run_id else name
        return self.counters().get(key, 0)

    def put_sync(self, headers: dict | None = None, timeout: float = 30) -> httpx.Response:
        """Out-of-band sync: PUT the app, which then POSTs its config to /fn/register."""
        return httpx.put(self.url, headers=headers or {}, timeout=timeout)

    def post_call(self, fn_id: str, body: dict, step_id: str = "step", key: str | None = wire.SIGNING_KEY,
                  headers: dict | None = None, timeout: float = 30) -> httpx.Response:
        """A call request as a server would send it (§6): JCS body, signed with `key`."""
        raw = wire.canonical(body)
        h = {"content-type": "application/json", "x-inngest-req-version": str(body.get("version", -1)),
             "x-run-id": body["ctx"]["run_id"], "x-inngest-step-id": step_id}
        if key:
            h["x-inngest-signature"] = wire.sign(raw, key)
        h.update(headers or {})
        return httpx.post(self.url, params={"fnId": wire.fn_slug(fn_id), "stepId": step_id},
                          content=raw, headers=h, timeout=timeout)

    def stop(self):
        self.proc.stop()


def dev_env(base_url: str) -> dict:
    return {"INNGEST_DEV": "1", "INNGEST_BASE_URL": base_url}


def cloud_env(base_url: str, signing_key: str = wire.SIGNING_KEY, event_key: str = wire.EVENT_KEY) -> dict:
    return {
        "INNGEST_DEV": "0",
        "INNGEST_BASE_URL": base_url,
        "INNGEST_SIGNING_KEY": signing_key,
        "INNGEST_EVENT_KEY": event_key,
    }


def cairn_bin() -> Path:
    env = os.environ.get("CAIRN_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "release" / "cairn"


TERMINAL = ("Completed", "Failed", "Cancelled")
RETRY_INTERVAL = 5


class Cairn:
    """A fresh `cairn dev` (or `cairn start`) on a random port with its own database dir."""

    def __init__(self, log_dir: Path, mode: str = "dev", sync_urls: list[str] | None = None,
                 signing_key: str | None = None, event_key: str | None = None,
                 extra_args: list[str] | None = None, name: str = "cairn", port: int | None = None,
                 retry_interval: int | None = None):
        binary = cairn_bin()
        if not binary.exists():
            raise AssertionError(
                f"cairn binary not found at {binary}; build it with `cargo build --release -p cairn` "
                "or set CAIRN_BIN (tests/conformance/run does this)"
            )
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = mode
        self.event_key = event_key or (wire.EVENT_KEY if mode == "start" else "test")
        self.signing_key = signing_key
        self.data_dir = log_dir / f"{name}-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(binary), mode, "--port", str(self.port)]
        if mode == "start":
            argv += ["--signing-key", signing_key or wire.SIGNING_KEY, "--event-key", self.event_key]
        for u in sync_urls or []:
            argv += ["-u", u]
        # A fixed 5 s retry delay instead of the 15 s+ backoff table (like `inngest dev
        # --retry-interval`); still far from the 1 s a RetryAfterError asks for.
        argv += ["--retry-interval", str(retry_interval or RETRY_INTERVAL)]
        argv += shlex.split(os.environ.get("CAIRN_ARGS", ""))
        argv += extra_args or []
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        self.http = httpx.Client(timeout=30, headers=self._auth())
        for attempt in range(4):
            self.proc = Proc(name + (f"-{attempt}" if attempt else ""), argv, self.data_dir, env, log_dir)

            def up():
                if not self.proc.alive():
                    tail = self.proc.log_tail()
                    if port_clash(tail):
                        raise PortClash(tail)
                    raise AssertionError(f"cairn exited early ({argv}):\n{tail}")
                if not owns_listener(self.proc.p.pid, self.port):
                    return False
                httpx.get(self.url + "/", timeout=2)
                return True

            try:
                wait_until(up, 30, what="cairn to listen")
                break
            except PortClash:
                if port:  # the caller chose the port: a clash is its problem to report
                    raise
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                argv[argv.index("--port") + 1] = str(self.port)
        else:
            raise AssertionError("cairn: no free port after 4 tries")
        self.http.base_url = self.url

    def _auth(self) -> dict:
        if self.mode == "start":
            return {"authorization": f"Bearer {wire.hashed_signing_key(self.signing_key or wire.SIGNING_KEY)}"}
        return {}

    # -- events ---------------------------------------------------------------------------
    def send(self, *events: dict) -> list[str]:
        r = self.http.post(f"/e/{self.event_key}", json=list(events))
        assert r.status_code == 200, f"POST /e/{{key}} -> {r.status_code} {r.text[:500]}"
        ids = r.json().get("ids")
        assert isinstance(ids, list) and len(ids) == len(events), f"bad event ids: {r.text[:500]}"
        return ids

    def send_one(self, name: str, data: dict | None = None, **extra) -> str:
        return self.send({"name": name, "data": data or {}, **extra})[0]

    def synced_functions(self, app: str = wire.APP_ID) -> list:
        """The functions Cairn knows for `app` (empty until its sync has been stored)."""
        r = self.http.get(f"/v1/apps/{app}/functions", headers=self._auth())
        if r.status_code != 200:
            return []
        data = r.json().get("data")
        return data if isinstance(data, list) else []

    # -- runs -----------------------------------------------------------------------------
    def runs_for_event(self, event_id: str) -> list[dict]:
        r = self.http.get(f"/v1/events/{event_id}/runs")
        if r.status_code == 404:
            return []
        r.raise_for_status()
        data = r.json().get("data")
        return data if isinstance(data, list) else []

    def run(self, run_id: str) -> dict:
        r = self.http.get(f"/v1/runs/{run_id}")
        r.raise_for_status()
        return r.json()["data"]

    def skipped(self, event_id: str) -> list[dict]:
        """Functions that skipped this event (rate limit, idempotency, singleton), with why."""
        r = self.http.get(f"/v1/events/{event_id}/skipped")
        if r.status_code == 404:
            return []
        r.raise_for_status()
        data = r.json().get("data")
        return data if isinstance(data, list) else []

    def queue(self, run_id: str) -> dict:
        """GET /v1/runs/{id}/queue: the run's queue items and what each is waiting on."""
        r = self.http.get(f"/v1/runs/{run_id}/queue")
        r.raise_for_status()
        return r.json()["data"]

    def wait_run_id(self, event_id: str, timeout: float = 20) -> str:
        runs = wait_until(lambda: self.runs_for_event(event_id), timeout,
                          what=f"a run for event {event_id}")
        return run_id_of(runs[0])

    def wait_status(self, run_id: str, statuses=TERMINAL, timeout: float = 30) -> dict:
        if isinstance(statuses, str):
            statuses = (statuses,)
        seen = {}

        def done():
            seen["run"] = self.run(run_id)
            return seen["run"] if seen["run"].get("status") in statuses else None

        try:
            return wait_until(done, timeout, interval=0.2, what=f"run {run_id} to reach {statuses}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last seen: {str(seen.get('run'))[:800]}") from None

    def finish(self, event_id: str, timeout: float = 30) -> dict:
        """Wait for the event's (single) run to reach a terminal status; return the run."""
        rid = self.wait_run_id(event_id, timeout=min(timeout, 20))
        return self.wait_status(rid, TERMINAL, timeout)

    def cancel(self, run_id: str) -> httpx.Response:
        return self.http.delete(f"/v1/runs/{run_id}")

    def stop(self):
        self.http.close()
        self.proc.stop()


def run_id_of(run: dict) -> str:
    return run.get("run_id") or run.get("id")


def output_of(run: dict):
    """A run's output as JSON; tolerate a server that stores it as a JSON string."""
    import json

    out = run.get("output")
    if isinstance(out, str):
        try:
            return json.loads(out)
        except ValueError:
            return out
    return out


def only_sdks(*sdks: str):
    """Run a case only for these SDKs (the feature does not exist in the others)."""

    def deco(fn):
        fn.sdks = sdks
        return fn

    return deco


def selected_sdks() -> list[str]:
    """SDKs chosen by the SDK env var (js3|js4|py, comma-separated; empty or "all" = every one)."""
    raw = os.environ.get("SDK", "").strip()
    if not raw or raw == "all":
        return list(SDKS)
    chosen = [s.strip() for s in raw.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SDKS]
    if bad:
        raise ValueError(f"SDK must be one of {SDKS} (got {bad})")
    return chosen


def selected_first_sdk() -> str:
    """The good app of SDK-independent cases: the founding report's js3 unless SDK says otherwise."""
    return selected_sdks()[0]
