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
# cairn's anonymous RSS may rise to a plateau after warm-up (allocator caches of MiB-sized
# buffers), but must not climb: the second 100 runs may not end above the first 100's peak
# by more than SECOND_HALF_SLACK_MIB, and nothing after warm-up may exceed it by more than
# MAX_GROWTH_MIB.
MAX_GROWTH_MIB = 64
SECOND_HALF_SLACK_MIB = 16


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
    first_half_peak = max(a for n, a, _ in samples if n <= RUNS // 2)
    final = samples[-1][1]
    assert final <= first_half_peak + SECOND_HALF_SLACK_MIB, (
        f"cairn RSS still climbing: {final} MiB after {RUNS} runs vs peak {first_half_peak} "
        f"in the first {RUNS // 2}: {samples}")
