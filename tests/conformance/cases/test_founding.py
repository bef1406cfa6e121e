"""The founding scenario (inngest-js#1440) as a test: the report's function on
inngest@3.52.4, 400 runs (25 in flight at a time), every one completing with the right
output, and cairn's own memory not growing across them.

Measured on the first builds: cairn's anonymous RSS rises for the first ~175 runs (to
~115-135 MiB) and then plateaus; the allocator keeps freed MiB-sized buffers, so single
samples swing by 10-20 MiB. Hence the warm-up of 200 runs and a check on the *floor* of
the last samples, which a real leak lifts steadily (300 KiB per run = +60 MiB over the
measured 200 runs) while the plateau does not. Since cairn allocates with mimalloc, which
hands freed MiB-sized buffers back to the system now and then, single samples also dip
well below the plateau (75 MiB between samples of 115-120), so the late floor is compared
with the plateau's level, the median of the samples at runs 100-300, not with their lowest.
A leak of 300 KiB per run still puts the late floor ~45 MiB above that median."""

from __future__ import annotations

import statistics
import time

import pytest

from harness.procs import only_sdks, output_of

pytestmark = [pytest.mark.server, pytest.mark.slow]

RUNS = 400
WARMUP = 200
CHUNK = 25
# Lowest sample of the last three vs the median sample of runs 100-300.
FLOOR_GROWTH_MIB = 32
# No sample after warm-up above the warm-up level by more than this.
MAX_GROWTH_MIB = 96


def rss_mib(pid: int, field: str = "RssAnon") -> float:
    """Anonymous resident memory: the heap. File-backed pages (SQLite's mmap of a database
    that grows by ~1 MiB per run) are reclaimable cache, not retention."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


@only_sdks("js3")
def test_founding_400_runs_flat_memory(sdk, make_stack):
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
    early_level = statistics.median(a for n, a, _ in samples if WARMUP - 100 <= n <= WARMUP + 100)
    late_floor = min(a for _, a, _ in samples[-3:])
    assert late_floor - early_level <= FLOOR_GROWTH_MIB, (
        f"cairn RSS floor climbing: {early_level} -> {late_floor} MiB: {samples}")
