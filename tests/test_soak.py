"""The 60-second soak (bench/soak.py has the 10-minute one): a node started from the CLI
carries a 1 -> 10 call with join/leave churn and a trickle of hostile input on every port."""

from __future__ import annotations

import pytest

from bench.soak import RSS_BUDGET_MB, soak


@pytest.mark.timeout(420)
async def test_soak_60_seconds() -> None:
    report = await soak(60.0, warmup=15.0)
    print(report)
    assert report.churn_cycles > 10
    assert report.hostile_datagrams > 0 and report.hostile_messages > 0
    assert report.limits["bad_messages"] > 0 and report.limits["http_header_timeouts"] > 0
    assert report.rss_growth_mb <= RSS_BUDGET_MB
    assert report.fds_final <= report.fds_baseline
    assert report.tasks_final <= report.tasks_baseline
    assert report.decode_errors == 0
    assert report.frames_per_subscriber_min > 0
    assert report.ok, report.check()
