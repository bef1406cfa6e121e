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
# cairn's anonymous RSS may rise to a plateau after warm-up and swings by tens of MiB as the
# allocator keeps and returns MiB-sized buffers, so a leak shows as a rising *floor*: the
# lowest of the last three samples may not exceed the lowest sample between warm-up and
# half-way by more than FLOOR_GROWTH_MIB (a leak of 300 KiB per run would add ~30 MiB over
# the second 100 runs). No sample after warm-up may exceed the warm-up level by more than
# MAX_GROWTH_MIB.
MAX_GROWTH_MIB = 64
FLOOR_GROWTH_MIB = 16


def rss_mib(pid: int, field: str = "RssAnon") -> float:
    """Anonymous resident memory: the heap. File-backed pages (SQLite's mmap of a database
    that grows by ~1 MiB per run) are reclaimable cache, not retention."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


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
        samples.append((done, round(rss_mib(pid), 1), round(rss_mib(pid, "VmRSS"), 1)))
    elapsed = time.monotonic() - t0
    counters = st.app.counters()
    for step in ("collect-data", "digest", "finalize"):
        assert counters.get(step) == RUNS, (step, counters.get(step))
    base = next(a for n, a, _ in samples if n == WARMUP)
    peak_after = max(a for n, a, _ in samples if n >= WARMUP)
    print(f"{RUNS} runs in {elapsed:.1f}s; cairn (runs, RssAnon MiB, VmRSS MiB): {samples}")
    assert peak_after - base <= MAX_GROWTH_MIB, f"cairn RSS grew {peak_after - base:.1f} MiB: {samples}"
    early_floor = min(a for n, a, _ in samples if WARMUP <= n <= RUNS // 2)
    late_floor = min(a for _, a, _ in samples[-3:])
    assert late_floor - early_floor <= FLOOR_GROWTH_MIB, (
        f"cairn RSS floor climbing: {early_floor} -> {late_floor} MiB: {samples}")
