"""Wire helpers: JCS signing (protocol §3), step-id hashing (§9), call bodies (§6.2)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid

import jcs

# A well-formed test key (protocol §3.4 vector): signkey-test-0123…cdef (x4).
SIGNING_KEY = "signkey-test-" + "0123456789abcdef" * 4
WRONG_SIGNING_KEY = "signkey-test-" + "fedcba9876543210" * 4
EVENT_KEY = "conformance-event-key"
APP_ID = "conformance"

_PREFIX = re.compile(r"^signkey-\w+-")


def step_hash(step_id: str) -> str:
    return hashlib.sha1(step_id.encode()).hexdigest()


def canonical(body: object) -> bytes:
    return jcs.canonicalize(body)


def sign(body: bytes, key: str = SIGNING_KEY, ts: int | None = None) -> str:
    """X-Inngest-Signature for a request body that is already JCS-canonical."""
    t = int(time.time()) if ts is None else ts
    mac = hmac.new(_PREFIX.sub("", key).encode(), body + str(t).encode(), hashlib.sha256)
    return f"t={t}&s={mac.hexdigest()}"


def hashed_signing_key(key: str = SIGNING_KEY) -> str:
    """sha256(hexdecode(key without prefix)), lowercase hex (no prefix)."""
    return hashlib.sha256(bytes.fromhex(_PREFIX.sub("", key))).hexdigest()


def fn_slug(fn_id: str) -> str:
    return f"{APP_ID}-{fn_id}"


def new_run_id() -> str:
    # Any ULID-looking string will do for a fake server.
    return "01" + uuid.uuid4().hex[:24].upper()


def event(name: str, data: dict | None = None, **extra) -> dict:
    ev = {
        "name": name,
        "data": data or {},
        "id": extra.pop("id", new_run_id()),
        "ts": extra.pop("ts", int(time.time() * 1000)),
        "user": {},
    }
    ev.update(extra)
    return ev


def call_body(
    ev: dict,
    steps: dict | None = None,
    *,
    run_id: str | None = None,
    attempt: int = 0,
    max_attempts: int = 5,
    disable_immediate_execution: bool = False,
    use_api: bool = False,
    events: list | None = None,
    version: int = -1,
    fn_id: str | None = None,
    qi_id: str | None = None,
) -> dict:
    """A call request body exactly as §6.2 describes (every key present)."""
    steps = steps or {}
    ctx = {
        "attempt": attempt,
        "disable_immediate_execution": disable_immediate_execution,
        "env": "",
        "max_attempts": max_attempts,
        "run_id": run_id or new_run_id(),
        "stack": {"current": len(steps), "stack": list(steps.keys())},
        "step_id": "step",
        "use_api": use_api,
    }
    if fn_id is not None:
        ctx["fn_id"] = fn_id
    if qi_id is not None:
        ctx["qi_id"] = qi_id
    return {
        "ctx": ctx,
        "event": ev,
        "events": events if events is not None else [ev],
        "steps": steps,
        "use_api": use_api,
        "version": version,
    }


def loads(data: bytes | str):
    return json.loads(data) if data else None
