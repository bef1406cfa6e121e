"""Fixture app for the official `inngest` PyPI SDK (Flask, synchronous handlers).

Mirrors ../js-common/functions.mjs: same app id, function ids, events, step ids and
outputs. Besides /api/inngest it answers GET /counters with what the step bodies did
(counters, records, and gauges of step bodies in progress).
"""

import datetime
import os
import threading
import time

import flask
import inngest
import inngest.flask

APP_ID = "conformance"

_lock = threading.Lock()
counters: dict[str, int] = {}
records: dict[str, list] = {}


def bump(name: str, run_id: str | None = None) -> int:
    with _lock:
        counters[name] = counters.get(name, 0) + 1
        if run_id:
            key = f"{name}@{run_id}"
            counters[key] = counters.get(key, 0) + 1
            return counters[key]
        return counters[name]


def record(name: str, value: object) -> None:
    with _lock:
        records.setdefault(name, []).append(value)


gauges: dict[str, dict[str, int]] = {}


def enter(name: str) -> None:
    """A step body entered a section that the flow-control cases count (in progress now/max)."""
    with _lock:
        g = gauges.setdefault(name, {"now": 0, "max": 0})
        g["now"] += 1
        g["max"] = max(g["max"], g["now"])


def leave(name: str) -> None:
    with _lock:
        gauges[name]["now"] -= 1


def now_ms() -> int:
    return int(time.time() * 1000)


client = inngest.Inngest(app_id=APP_ID)
functions: list[inngest.Function] = []


def add(**kwargs):
    def deco(handler):
        f = client.create_function(**kwargs)(handler)
        functions.append(f)
        return f

    return deco


def ev(name: str) -> inngest.TriggerEvent:
    return inngest.TriggerEvent(event=name)


@add(fn_id="serial", trigger=ev("conf/serial"))
def serial(ctx: inngest.ContextSync) -> dict:
    def first_step() -> str:
        bump("first step", ctx.run_id)
        return "first step"

    first = ctx.step.run("first step", first_step)

    def second_step() -> dict:
        bump("second step", ctx.run_id)
        return {"first": first, "second": True}

    second = ctx.step.run("second step", second_step)
    return {"name": ctx.event.name, "body": "ok", "first": first, "second": second}


def _counted(step_id: str, run_id: str, value: object = None):
    def body():
        bump(step_id, run_id)
        return step_id if value is None else value

    return body


@add(fn_id="parallel", trigger=ev("conf/parallel"))
def parallel(ctx: inngest.ContextSync) -> dict:
    a, b, c = ctx.group.parallel(
        tuple(
            (lambda i=i: ctx.step.run(i, _counted(i, ctx.run_id)))
            for i in ("a", "b", "c")
        )
    )
    d = ctx.step.run("d", _counted("d", ctx.run_id))
    return {"a": a, "b": b, "c": c, "d": d}


@add(fn_id="race", trigger=ev("conf/race"))
def race(ctx: inngest.ContextSync) -> dict:
    def slow() -> str:
        bump("slow", ctx.run_id)
        time.sleep(1.5)
        return "slow"

    # Python's group returns every result (race only changes when the server discovers);
    # the first one is the fast step, like the JS Promise.race winner.
    results = ctx.group.parallel(
        (
            lambda: ctx.step.run("fast", _counted("fast", ctx.run_id)),
            lambda: ctx.step.run("slow", slow),
        ),
        parallel_mode=inngest.ParallelMode.RACE,
    )
    after = ctx.step.run("after", _counted("after", ctx.run_id))
    return {"winner": results[0], "after": after}


@add(fn_id="retry", retries=2, trigger=ev("conf/retry"))
def retry(ctx: inngest.ContextSync) -> dict:
    def flaky() -> str:
        n = bump("flaky", ctx.run_id)
        record("flaky-at", now_ms())
        if n == 1:
            raise Exception("flaky failure")
        return f"recovered after {n} attempts"

    return {"value": ctx.step.run("flaky", flaky)}


@add(fn_id="retry-fn", retries=2, trigger=ev("conf/retry-fn"))
def retry_fn(ctx: inngest.ContextSync) -> dict:
    bump("handler", ctx.run_id)
    record("attempts", ctx.attempt)
    if ctx.attempt == 0:
        raise Exception("handler failure")
    return {"attempt": ctx.attempt}


@add(fn_id="non-retriable", retries=3, trigger=ev("conf/non-retriable"))
def non_retriable(ctx: inngest.ContextSync) -> str:
    def fatal() -> None:
        bump("fatal", ctx.run_id)
        raise inngest.NonRetriableError("no retry plz")

    ctx.step.run("fatal", fatal)
    bump("reached-after-fatal", ctx.run_id)
    return "unreachable"


@add(fn_id="retry-after", retries=2, trigger=ev("conf/retry-after"))
def retry_after(ctx: inngest.ContextSync) -> dict:
    def throttled() -> str:
        n = bump("throttled", ctx.run_id)
        record("throttled-at", now_ms())
        if n == 1:
            raise inngest.RetryAfterError("slow down", datetime.timedelta(seconds=1))
        return f"ok after {n}"

    return {"value": ctx.step.run("throttled", throttled)}


def _on_failure(ctx: inngest.ContextSync) -> str:
    bump("onFailure")
    data = ctx.event.data or {}
    err = data.get("error") or {}
    original = data.get("event") or {}
    record(
        "onFailure",
        {
            "message": err.get("message"),
            "function_id": data.get("function_id"),
            "run_id": data.get("run_id"),
            "original_event": original.get("name"),
            "failure_run_id": ctx.run_id,
        },
    )
    return "handled"


@add(fn_id="fail-handled", retries=0, on_failure=_on_failure, trigger=ev("conf/fail-handled"))
def fail_handled(ctx: inngest.ContextSync) -> str:
    def doomed() -> None:
        bump("doomed", ctx.run_id)
        raise Exception("final failure")

    ctx.step.run("doomed", doomed)
    return "unreachable"


@add(fn_id="sleep", trigger=ev("conf/sleep"))
def sleep(ctx: inngest.ContextSync) -> dict:
    before = ctx.step.run("before", now_ms)
    ctx.step.sleep("nap", datetime.timedelta(seconds=2))
    after = ctx.step.run("after", now_ms)
    return {"slept_ms": after - before}


@add(fn_id="sleep-until", trigger=ev("conf/sleep-until"))
def sleep_until(ctx: inngest.ContextSync) -> dict:
    before = ctx.step.run("before", now_ms)
    until = datetime.datetime.fromtimestamp((before + 2000) / 1000, tz=datetime.timezone.utc)
    ctx.step.sleep_until("until", until)
    after = ctx.step.run("after", now_ms)
    return {"slept_ms": after - before}


def _wait_result(found: inngest.Event | None) -> dict:
    return {"matched": found is not None, "data": found.data if found else None}


@add(fn_id="wait-match", trigger=ev("conf/wait-match"))
def wait_match(ctx: inngest.ContextSync) -> dict:
    bump("reached-wait", ctx.run_id)
    # JS `match: "data.id"` compiles to exactly this expression.
    found = ctx.step.wait_for_event(
        "wait",
        event="conf/wait-match.resume",
        if_exp="event.data.id == async.data.id",
        timeout=datetime.timedelta(seconds=20),
    )
    return _wait_result(found)


@add(fn_id="wait-if", trigger=ev("conf/wait-if"))
def wait_if(ctx: inngest.ContextSync) -> dict:
    bump("reached-wait", ctx.run_id)
    found = ctx.step.wait_for_event(
        "wait",
        event="conf/wait-if.resume",
        if_exp="async.data.ok == true && async.data.id == event.data.id",
        timeout=datetime.timedelta(seconds=20),
    )
    return _wait_result(found)


@add(fn_id="wait-timeout", trigger=ev("conf/wait-timeout"))
def wait_timeout(ctx: inngest.ContextSync) -> dict:
    found = ctx.step.wait_for_event(
        "wait", event="conf/wait-timeout.never", timeout=datetime.timedelta(seconds=2)
    )
    return {"matched": found is not None}


@add(fn_id="invoke-child", retries=0, trigger=ev("conf/invoke-child.never"))
def invoke_child(ctx: inngest.ContextSync) -> dict:
    bump("invoke-child")
    return {"doubled": ctx.event.data["n"] * 2}


@add(fn_id="invoke-child-fail", retries=0, trigger=ev("conf/invoke-child-fail.never"))
def invoke_child_fail(ctx: inngest.ContextSync) -> None:
    bump("invoke-child-fail")
    raise Exception("child broke")


@add(fn_id="invoke-child-slow", retries=0, trigger=ev("conf/invoke-child-slow.never"))
def invoke_child_slow(ctx: inngest.ContextSync) -> str:
    ctx.step.sleep("long", datetime.timedelta(seconds=30))
    return "too late"


@add(fn_id="invoke", retries=0, trigger=ev("conf/invoke"))
def invoke(ctx: inngest.ContextSync) -> dict:
    res = ctx.step.invoke("call-child", function=invoke_child, data={"n": 21})
    return {"child": res}


def _caught(err: Exception) -> dict:
    return {"caught": True, "name": getattr(err, "name", type(err).__name__), "message": str(getattr(err, "message", err))}


@add(fn_id="invoke-failure", retries=0, trigger=ev("conf/invoke-failure"))
def invoke_failure(ctx: inngest.ContextSync) -> dict:
    try:
        ctx.step.invoke("call-child", function=invoke_child_fail, data={})
    except inngest.StepError as err:
        return _caught(err)
    return {"caught": False}


@add(fn_id="invoke-timeout", retries=0, trigger=ev("conf/invoke-timeout"))
def invoke_timeout(ctx: inngest.ContextSync) -> dict:
    try:
        ctx.step.invoke(
            "call-child",
            function=invoke_child_slow,
            data={},
            timeout=datetime.timedelta(seconds=1),
        )
    except inngest.StepError as err:
        return _caught(err)
    return {"caught": False}


@add(fn_id="invoke-missing", retries=0, trigger=ev("conf/invoke-missing"))
def invoke_missing(ctx: inngest.ContextSync) -> dict:
    try:
        ctx.step.invoke_by_id(
            "call-missing", function_id="does-not-exist", data={}, timeout=datetime.timedelta(seconds=60)
        )
    except inngest.StepError as err:
        return _caught(err)
    return {"caught": False}


@add(fn_id="send-event", trigger=ev("conf/send-event"))
def send_event(ctx: inngest.ContextSync) -> dict:
    ids = ctx.step.send_event(
        "send", inngest.Event(name="conf/sent-by-step", data={"tag": ctx.event.data["tag"]})
    )
    return {"ids": ids}


@add(fn_id="send-receiver", trigger=ev("conf/sent-by-step"))
def send_receiver(ctx: inngest.ContextSync) -> dict:
    bump("send-receiver")
    return {"tag": ctx.event.data["tag"]}


@add(
    fn_id="cancel-on",
    cancel=[inngest.Cancel(event="conf/cancel-on.cancel", if_exp="event.data.id == async.data.id")],
    trigger=ev("conf/cancel-on"),
)
def cancel_on(ctx: inngest.ContextSync) -> str:
    ctx.step.run("start", lambda: (bump("start", ctx.run_id), "started")[1])
    bump("reached-sleep", ctx.run_id)
    ctx.step.sleep("nap", datetime.timedelta(seconds=8))
    ctx.step.run("after-sleep", lambda: (bump("after-sleep", ctx.run_id), "should not happen")[1])
    return "not cancelled"


@add(
    fn_id="batch",
    batch_events=inngest.Batch(max_size=3, timeout=datetime.timedelta(seconds=5)),
    trigger=ev("conf/batch"),
)
def batch(ctx: inngest.ContextSync) -> dict:
    bump("batch-run")
    return {"count": len(ctx.events), "seqs": sorted(e.data["seq"] for e in ctx.events)}


@add(
    fn_id="big-batch",
    batch_events=inngest.Batch(max_size=10, timeout=datetime.timedelta(seconds=5)),
    trigger=ev("conf/big-batch"),
)
def big_batch(ctx: inngest.ContextSync) -> dict:
    bump("big-batch-run")
    return {"count": len(ctx.events), "total": sum(len(e.data["blob"]) for e in ctx.events)}


@add(fn_id="big-steps", trigger=ev("conf/big-steps"))
def big_steps(ctx: inngest.ContextSync) -> dict:
    lens = []
    for i in range(5):
        s = ctx.step.run(f"big-{i}", lambda i=i: (bump(f"big-{i}", ctx.run_id), str(i) * (1024 * 1024))[1])
        lens.append(len(s))
    return {"lens": lens}


@add(fn_id="loop", trigger=ev("conf/loop"))
def loop(ctx: inngest.ContextSync) -> list:
    out = []
    for i in range(3):
        out.append(ctx.step.run("item", lambda i=i: (bump("item", ctx.run_id), i)[1]))
    return out


@add(fn_id="founding", trigger=ev("conf/founding"))
def founding(ctx: inngest.ContextSync) -> dict:
    big = ctx.step.run("collect-data", lambda: (bump("collect-data", ctx.run_id), "x" * 1_000_000)[1])
    digest = ctx.step.run("digest", lambda: (bump("digest", ctx.run_id), big[:100])[1])
    fin = ctx.step.run("finalize", lambda: (bump("finalize", ctx.run_id), {"done": True})[1])
    return {"len": len(digest), "done": fin["done"]}


@add(fn_id="long-steps", trigger=ev("conf/long-steps"))
def long_steps(ctx: inngest.ContextSync) -> list:
    def slow(step_id: str):
        def body() -> str:
            bump(step_id, ctx.run_id)
            time.sleep(4)
            return step_id

        return body

    return [ctx.step.run(i, slow(i)) for i in ("slow-1", "slow-2", "slow-3", "slow-4")]


@add(fn_id="many-steps", trigger=ev("conf/many-steps"))
def many_steps(ctx: inngest.ContextSync) -> list:
    def tick(i: int):
        def body() -> int:
            bump(f"tick-{i}", ctx.run_id)
            time.sleep(1)
            return i

        return body

    return [ctx.step.run(f"tick-{i}", tick(i)) for i in range(1, 7)]


@add(fn_id="no-checkpoint", trigger=ev("conf/no-checkpoint"))
def no_checkpoint(ctx: inngest.ContextSync) -> list:
    # Python has no checkpointing; same function as the JS apps for symmetry.
    a = ctx.step.run("first step", _counted("first step", ctx.run_id))
    b = ctx.step.run("second step", _counted("second step", ctx.run_id))
    return [a, b]


@add(fn_id="always-fails", retries=1, trigger=ev("conf/always-fails"))
def always_fails(ctx: inngest.ContextSync) -> str:
    def boom() -> None:
        bump("boom", ctx.run_id)
        raise Exception("boom")

    try:
        ctx.step.run("boom", boom)
    except inngest.StepError:
        bump("after-boom", ctx.run_id)
        raise
    return "unreachable"


@add(
    fn_id="expr-trigger",
    trigger=inngest.TriggerEvent(event="conf/expr", expression="event.data.type == 'premium'"),
)
def expr_trigger(ctx: inngest.ContextSync) -> dict:
    bump("expr-trigger")
    return {"type": ctx.event.data["type"]}


def _parallel_fail_on_failure(ctx: inngest.ContextSync) -> None:
    bump("parallel-fail-onFailure")
    record("parallel-fail-onFailure", (ctx.event.data or {}).get("run_id"))


@add(fn_id="parallel-fail", retries=0, on_failure=_parallel_fail_on_failure, trigger=ev("conf/parallel-fail"))
def parallel_fail(ctx: inngest.ContextSync) -> str:
    def failing(step_id: str):
        def body() -> None:
            bump(step_id, ctx.run_id)
            raise Exception(f"{step_id} failed")

        return body

    ctx.group.parallel(tuple((lambda i=i: ctx.step.run(i, failing(i))) for i in ("step-a", "step-b")))
    return "unreachable"


@add(fn_id="auth-probe", retries=0, trigger=ev("conf/auth-probe"))
def auth_probe(ctx: inngest.ContextSync) -> str:
    bump("auth-probe")
    return "authorized"


# ---- flow control (conformance-cases.md §14-19, C-INV-07, C-FAIL-03) ------------------------
# Each flow function records what the cases time or count: record(<id>, {t, run, ...}) when
# its step body starts, and gauges of step bodies in progress. Python's `concurrency` is a
# list only (JS also sends the bare-number and single-object shapes).

S = datetime.timedelta(seconds=1)


def busy(names: list[str], ms: int, rec_name: str | None = None, rec: dict | None = None) -> None:
    """Hold the named gauges for `ms` inside a step body, recording the start first."""
    for n in names:
        enter(n)
    try:
        if rec_name:
            record(rec_name, {"t": now_ms(), **(rec or {})})
        time.sleep(ms / 1000)
    finally:
        for n in names:
            leave(n)


def _data(ctx: inngest.ContextSync) -> dict:
    return ctx.event.data or {}


@add(fn_id="flow-conc-fn", concurrency=[inngest.Concurrency(limit=1)], trigger=ev("conf/flow-conc-fn"))
def flow_conc_fn(ctx: inngest.ContextSync) -> str:
    d = _data(ctx)
    ctx.step.run("work", lambda: busy(["flow-conc-fn"], d.get("ms", 1500), "flow-conc-fn",
                                      {"run": ctx.run_id, "i": d.get("i")}))
    return "done"


@add(
    fn_id="flow-conc-key",
    concurrency=[inngest.Concurrency(limit=1, key="event.data.num")],
    trigger=ev("conf/flow-conc-key"),
)
def flow_conc_key(ctx: inngest.ContextSync) -> object:
    d = _data(ctx)
    num = d.get("num")
    ctx.step.run("work", lambda: busy(["flow-conc-key", f"flow-conc-key:{num}"], d.get("ms", 2000),
                                      "flow-conc-key", {"run": ctx.run_id, "num": num}))
    return num


@add(
    fn_id="flow-conc-key-fn",
    retries=0,
    concurrency=[inngest.Concurrency(limit=2), inngest.Concurrency(limit=1, key="event.data.num")],
    trigger=ev("conf/flow-conc-key-fn"),
)
def flow_conc_key_fn(ctx: inngest.ContextSync) -> object:
    d = _data(ctx)
    num = d.get("num")
    ctx.step.run("work", lambda: busy(["flow-conc-key-fn", f"flow-conc-key-fn:{num}"], d.get("ms", 1500),
                                      "flow-conc-key-fn", {"run": ctx.run_id, "num": num}))
    return num


def _conc_acct(fn_id: str):
    @add(
        fn_id=fn_id,
        concurrency=[inngest.Concurrency(limit=1, scope="account", key="'global'")],
        trigger=ev("conf/flow-conc-acct"),
    )
    def handler(ctx: inngest.ContextSync) -> str:
        d = _data(ctx)
        ctx.step.run("work", lambda: busy(["flow-conc-acct", fn_id], d.get("ms", 1000), "flow-conc-acct",
                                          {"run": ctx.run_id, "fn": fn_id}))
        return fn_id

    return handler


for _suffix in ("a", "b"):
    _conc_acct(f"flow-conc-acct-{_suffix}")


def _throttled(fn_id: str, throttle: inngest.Throttle):
    @add(fn_id=fn_id, throttle=throttle, trigger=ev(f"conf/{fn_id}"))
    def handler(ctx: inngest.ContextSync) -> str:
        def mark() -> str:
            record(fn_id, {"t": now_ms(), "run": ctx.run_id, "i": _data(ctx).get("i")})
            return "marked"

        ctx.step.run("mark", mark)
        return "done"

    return handler


_throttled("flow-throttle-b0", inngest.Throttle(limit=1, period=2 * S, burst=0))
_throttled("flow-throttle-b1", inngest.Throttle(limit=1, period=4 * S, burst=1))


@add(
    fn_id="flow-throttle-key",
    throttle=inngest.Throttle(key="event.data.id", limit=1, period=6 * S, burst=0),
    trigger=ev("conf/flow-throttle-key"),
)
def flow_throttle_key(ctx: inngest.ContextSync) -> object:
    d = _data(ctx)
    for n in range(2):
        def b(n=n) -> int:
            record("flow-throttle-key", {"t": now_ms(), "run": ctx.run_id, "id": d.get("id"), "n": n})
            return n

        ctx.step.run("b", b)
    return d.get("id")


@add(
    fn_id="flow-rate-limit",
    rate_limit=inngest.RateLimit(limit=1, period=datetime.timedelta(hours=24), key="event.data.number"),
    trigger=ev("conf/flow-rate-limit"),
)
def flow_rate_limit(ctx: inngest.ContextSync) -> object:
    d = _data(ctx)

    def count() -> str:
        record("flow-rate-limit", {"t": now_ms(), "run": ctx.run_id, "number": d.get("number")})
        return "counted"

    ctx.step.run("count", count)
    return d.get("number")


@add(
    fn_id="flow-rl-failed",
    retries=0,
    rate_limit=inngest.RateLimit(limit=1, period=datetime.timedelta(hours=24), key="event.data.number"),
    trigger=ev("conf/flow-rl-failed"),
)
def flow_rl_failed(ctx: inngest.ContextSync) -> None:
    bump("flow-rl-failed")
    record("flow-rl-failed", {"run": ctx.run_id, "number": _data(ctx).get("number")})
    raise inngest.NonRetriableError("failed")


@add(
    fn_id="flow-rl-failed-handler",
    rate_limit=inngest.RateLimit(limit=1, period=datetime.timedelta(hours=24), key="event.data.number"),
    trigger=inngest.TriggerEvent(
        event="inngest/function.failed", expression="event.data.function_id == 'conformance-flow-rl-failed'"
    ),
)
def flow_rl_failed_handler(ctx: inngest.ContextSync) -> str:
    bump("flow-rl-failed-handler")
    record("flow-rl-failed-handler", {"failed_run": _data(ctx).get("run_id")})
    return "handled"


@add(fn_id="flow-idempotency", idempotency="event.data.order", trigger=ev("conf/flow-idempotency"))
def flow_idempotency(ctx: inngest.ContextSync) -> object:
    d = _data(ctx)

    def count() -> str:
        record("flow-idempotency", {"t": now_ms(), "run": ctx.run_id, "order": d.get("order")})
        return "counted"

    ctx.step.run("count", count)
    return d.get("order")


@add(
    fn_id="flow-debounce",
    debounce=inngest.Debounce(key="event.data.name", period=2 * S),
    trigger=ev("conf/flow-debounce"),
)
def flow_debounce(ctx: inngest.ContextSync) -> dict:
    d = _data(ctx)

    def get_name() -> object:
        record("flow-debounce", {"t": now_ms(), "run": ctx.run_id, "name": d.get("name"), "counter": d.get("counter")})
        return d.get("name")

    name = ctx.step.run("get name", get_name)
    return {"name": name, "counter": d.get("counter")}


@add(fn_id="flow-debounce-ts", debounce=inngest.Debounce(period=2 * S), trigger=ev("conf/flow-debounce-ts"))
def flow_debounce_ts(ctx: inngest.ContextSync) -> object:
    d = _data(ctx)

    def get_name() -> object:
        record("flow-debounce-ts", {"t": now_ms(), "run": ctx.run_id, "name": d.get("name")})
        return d.get("name")

    ctx.step.run("get name", get_name)
    return d.get("name")


@add(
    fn_id="flow-debounce-timeout",
    debounce=inngest.Debounce(period=2 * S, timeout=4 * S),
    trigger=ev("conf/flow-debounce-timeout"),
)
def flow_debounce_timeout(ctx: inngest.ContextSync) -> object:
    d = _data(ctx)

    def mark() -> str:
        record("flow-debounce-timeout", {"t": now_ms(), "run": ctx.run_id, "counter": d.get("counter")})
        return "marked"

    ctx.step.run("mark", mark)
    return d.get("counter")


@add(
    fn_id="flow-priority",
    concurrency=[inngest.Concurrency(limit=1)],
    priority=inngest.Priority(run="event.data.priority == 'high' ? 5 : 0"),
    trigger=ev("conf/flow-priority"),
)
def flow_priority(ctx: inngest.ContextSync) -> object:
    d = _data(ctx)
    ctx.step.run("work", lambda: busy(["flow-priority"], d.get("ms", 2000), "flow-priority",
                                      {"run": ctx.run_id, "priority": d.get("priority")}))
    return d.get("priority")


@add(
    fn_id="flow-singleton-skip",
    singleton=inngest.Singleton(key="event.data.user.id", mode="skip"),
    trigger=ev("conf/flow-singleton-skip"),
)
def flow_singleton_skip(ctx: inngest.ContextSync) -> str:
    d = _data(ctx)
    ctx.step.run("work", lambda: busy(["flow-singleton-skip"], d.get("ms", 2000), "flow-singleton-skip",
                                      {"run": ctx.run_id, "i": d.get("i")}))
    return "done"


@add(
    fn_id="flow-singleton-cancel",
    singleton=inngest.Singleton(key="event.data.user.id", mode="cancel"),
    trigger=ev("conf/flow-singleton-cancel"),
)
def flow_singleton_cancel(ctx: inngest.ContextSync) -> bool:
    d = _data(ctx)

    def counter1() -> str:
        bump("flow-singleton-cancel")
        record("flow-singleton-cancel", {"t": now_ms(), "run": ctx.run_id, "i": d.get("i")})
        return "counted"

    ctx.step.run("counter1", counter1)
    ctx.step.sleep("sleep", 4 * S)
    return True


def _singleton_nokey(mode: str):
    fn_id = f"flow-singleton-{mode}-nokey"

    @add(fn_id=fn_id, singleton=inngest.Singleton(mode=mode), trigger=ev(f"conf/{fn_id}"))
    def handler(ctx: inngest.ContextSync) -> str:
        def start() -> str:
            record(fn_id, {"t": now_ms(), "run": ctx.run_id, "i": _data(ctx).get("i")})
            return "started"

        ctx.step.run("start", start)
        ctx.step.sleep("zzz", 3 * S)
        return "done"

    return handler


_singleton_nokey("skip")
_singleton_nokey("cancel")


@add(
    fn_id="flow-singleton-cancelled",
    trigger=inngest.TriggerEvent(
        event="inngest/function.cancelled",
        expression="event.data.function_id == 'conformance-flow-singleton-cancel' || "
        "event.data.function_id == 'conformance-flow-singleton-cancel-nokey'",
    ),
)
def flow_singleton_cancelled(ctx: inngest.ContextSync) -> str:
    d = _data(ctx)
    bump("flow-singleton-cancelled")
    record("flow-singleton-cancelled", {"fn": d.get("function_id"), "run": d.get("run_id")})
    return "noted"


@add(
    fn_id="flow-singleton-finished",
    trigger=inngest.TriggerEvent(
        event="inngest/function.finished",
        expression="event.data.function_id == 'conformance-flow-singleton-cancel' && event.data.result == true",
    ),
)
def flow_singleton_finished(ctx: inngest.ContextSync) -> str:
    bump("flow-singleton-finished")
    record("flow-singleton-finished", {"run": _data(ctx).get("run_id")})
    return "noted"


def _batched(fn_id: str, batch: inngest.Batch):
    @add(fn_id=fn_id, batch_events=batch, trigger=ev(f"conf/{fn_id}"))
    def handler(ctx: inngest.ContextSync) -> dict:
        nums = [(e.data or {}).get("num") for e in ctx.events]
        users = [(e.data or {}).get("userId") for e in ctx.events]
        record(fn_id, {"t": now_ms(), "run": ctx.run_id, "nums": nums, "users": users})
        return {"count": len(ctx.events), "nums": nums, "users": users}

    return handler


_batched("flow-batch", inngest.Batch(max_size=5, timeout=5 * S))
_batched("flow-batch-if", inngest.Batch(max_size=5, timeout=5 * S, if_exp="int(event.data.num) % 2 == 0"))
_batched("flow-batch-key", inngest.Batch(max_size=3, timeout=5 * S, key="event.data.userId"))


@add(
    fn_id="flow-rl-invokee",
    retries=0,
    rate_limit=inngest.RateLimit(limit=1, period=datetime.timedelta(minutes=1)),
    trigger=ev("conf/flow-rl-invokee.never"),
)
def flow_rl_invokee(ctx: inngest.ContextSync) -> str:
    bump("flow-rl-invokee")
    record("flow-rl-invokee", {"run": ctx.run_id})
    return "invoked"


@add(fn_id="flow-rl-invoker", retries=0, trigger=ev("conf/flow-rl-invoker"))
def flow_rl_invoker(ctx: inngest.ContextSync) -> dict:
    ctx.step.run("send", lambda: "sent")
    res = ctx.step.invoke("call", function=flow_rl_invokee, data={}, timeout=60 * S)
    return {"child": res}


if os.environ.get("CONF_CRON"):

    @add(fn_id="cron-tick", trigger=inngest.TriggerCron(cron=os.environ["CONF_CRON"]))
    def cron_tick(ctx: inngest.ContextSync) -> str:
        bump("cron-tick")
        record("cron-tick", {"name": ctx.event.name, "cron": (ctx.event.data or {}).get("cron")})
        return "tick"


app = flask.Flask(__name__)
inngest.flask.serve(app, client, functions)


@app.get("/counters")
def get_counters():
    with _lock:
        return flask.jsonify({"counters": dict(counters), "records": dict(records),
                              "gauges": {k: dict(v) for k, v in gauges.items()}})


if __name__ == "__main__":
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = int(os.environ.get("PORT", "3000"))
    print(f"py fixture app on http://127.0.0.1:{port}/api/inngest ({len(functions)} functions)", flush=True)
    app.run(host="127.0.0.1", port=port, threaded=True)
