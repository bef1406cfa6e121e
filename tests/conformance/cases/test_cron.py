"""Cron triggers. The fixture apps add a `cron-tick` function only when CONF_CRON is set,
so a schedule the server rejects cannot break the other cases' syncs."""

from __future__ import annotations

import pytest

from harness.procs import wait_until

pytestmark = pytest.mark.server


def _check_ticks(st, schedule, n, timeout):
    wait_until(lambda: st.app.count("cron-tick") >= n, timeout, interval=0.5,
               what=f"{n} cron ticks of {schedule!r}")
    recs = st.app.records()["cron-tick"]
    for rec in recs:
        assert rec["name"] == "inngest/scheduled.timer", rec
        assert rec["cron"] == schedule, rec


def test_cron_seconds_field(sdk, make_stack):
    """A 6-field (seconds) schedule: ticks every 2 s (cairn's extension; upstream is 5-field)."""
    schedule = "*/2 * * * * *"
    st = make_stack(sdk, app_env={"CONF_CRON": schedule})
    _check_ticks(st, schedule, 2, 15)


@pytest.mark.slow
def test_cron_every_minute(sdk, make_stack):
    """The standard 5-field schedule: the first tick comes within a minute (C-CRON-01)."""
    schedule = "* * * * *"
    st = make_stack(sdk, app_env={"CONF_CRON": schedule})
    _check_ticks(st, schedule, 1, 75)
