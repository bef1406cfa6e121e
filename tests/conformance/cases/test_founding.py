"""The founding scenario (inngest-js#1440) as a test: the report's function on
inngest@3.52.4, 200 runs, every one completing with the right output, and cairn's own
memory not growing across them."""

from __future__ import annotations

import time

import pytest

from harness.procs import only_sdks, output_of

pytestmark = [pytest.mark.server, pytest.mark.slow]

RUNS = 200
WARMUP = 50
CHUNK = 25
# Allowed RSS growth of cairn between the end of the warm-up and the end of all runs.
MAX_GROWTH_MIB = 48


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@only_sdks("js3")
def test_founding_200_runs_flat_memory(sdk, make_stack):
    st = make_stack(sdk)
    pid = st.cairn.proc.p.pid
    samples = []
    done = 0
    t0 = time.monotonic()
    while done < RUNS:
        ids = st.cairn.send(*({"name": "conf/founding", "data": {"n": done + i}} for i in range(CHUNK)))
        for eid in ids:
            run = st.cairn.finish(eid, timeout=120)
            assert run["status"] == "Completed", run
            assert output_of(run) == {"len": 100, "done": True}, output_of(run)
        done += CHUNK
        samples.append((done, round(rss_mib(pid), 1)))
    elapsed = time.monotonic() - t0
    counters = st.app.counters()
    for step in ("collect-data", "digest", "finalize"):
        assert counters.get(step) == RUNS, (step, counters.get(step))
    base = dict(samples)[WARMUP]
    peak_after = max(m for n, m in samples if n >= WARMUP)
    print(f"{RUNS} runs in {elapsed:.1f}s; cairn RSS MiB by runs: {samples}")
    assert peak_after - base <= MAX_GROWTH_MIB, f"cairn RSS grew {peak_after - base:.1f} MiB: {samples}"
