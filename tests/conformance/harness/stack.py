"""A case's world: fresh `cairn` + one fixture app (+ optional recording proxy), synced."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from . import wire
from .fake import RecordingProxy
from .procs import App, Cairn, cloud_env, dev_env, wait_until


def assert_sync_ok(sdk: str, resp: httpx.Response):
    """JS relays the register reply's body `status` as its PUT status; Python relays the
    body verbatim with 200 (protocol §4.2), so check both the status and the body."""
    assert resp.status_code == 200, f"{sdk} sync PUT -> {resp.status_code}: {resp.text[:800]}"
    try:
        body = resp.json()
    except ValueError:
        raise AssertionError(f"{sdk} sync PUT returned non-JSON: {resp.text[:300]}") from None
    assert isinstance(body, dict), body
    if sdk == "py":
        assert not body.get("error") and body.get("ok", True) is not False, f"py sync reply: {body}"


class _Stoppable:
    def __init__(self, obj):
        self.obj = obj

    def stop(self):
        self.obj.stop()


class Stack:
    def __init__(self, sdk, cairn: Cairn, app: App | None, proxy: RecordingProxy | None):
        self.sdk = sdk
        self.cairn = cairn
        self.app = app
        self.proxy = proxy

    @classmethod
    def start(cls, sdk: str, log_dir: Path, procs: list, *, mode: str = "dev", proxy: bool = False,
              sync: bool = True, app_env: dict | None = None, app_signing_key: str | None = None,
              cairn_args: list[str] | None = None, retry_interval: int | None = None) -> "Stack":
        cairn = Cairn(log_dir, mode=mode, extra_args=cairn_args, retry_interval=retry_interval)
        procs.append(cairn)
        if sdk is None:
            return cls(sdk, cairn, None, None)
        if mode == "dev":
            env = dev_env(cairn.url)
        else:
            env = cloud_env(cairn.url, signing_key=app_signing_key or wire.SIGNING_KEY,
                            event_key=cairn.event_key)
        env.update(app_env or {})
        app = App(sdk, log_dir, env)
        procs.append(app)
        prox = None
        if proxy:
            prox = RecordingProxy(app.origin)
            procs.append(_Stoppable(prox))
        st = cls(sdk, cairn, app, prox)
        if sync:
            st.sync()
        return st

    @property
    def app_url(self) -> str:
        """The URL the app registers: the proxy's when there is one."""
        return f"{self.proxy.url}/api/inngest" if self.proxy else self.app.url

    def sync(self) -> httpx.Response:
        r = httpx.put(self.app_url, timeout=30)
        assert_sync_ok(self.sdk, r)
        return r

    # shorthands
    def send(self, name: str, data: dict | None = None, **extra) -> str:
        return self.cairn.send_one(name, data, **extra)

    def run_to_end(self, name: str, data: dict | None = None, timeout: float = 30) -> dict:
        return self.cairn.finish(self.send(name, data), timeout=timeout)

    def wait_count(self, counter: str, n: int = 1, run_id: str | None = None, timeout: float = 20):
        return wait_until(lambda: self.app.count(counter, run_id) >= n, timeout,
                          what=f"counter {counter!r} >= {n}")

    def calls(self):
        assert self.proxy is not None
        return self.proxy.calls()


def sleep_s(seconds: float):
    time.sleep(seconds)
