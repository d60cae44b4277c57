"""Drain plan, origin watch and backoff: plain policy, explicit time, no event loop."""

from __future__ import annotations

import pytest

from peer.drain import DrainPlan, DrainPolicy
from peer.failover import Backoff, OriginWatch


def test_batches_leave_at_the_configured_rate() -> None:
    plan = DrainPlan(DrainPolicy(batch=2, interval=1.0, timeout=60, grace=10), started_at=100)
    here = ["a", "b", "c", "d", "e"]
    assert plan.poll(100, here).migrate == ("a", "b")
    assert plan.poll(100.5, here).migrate == ()
    assert plan.deadline(here) == 101
    assert plan.poll(101, here).migrate == ("c", "d")
    # a and b moved away; e is next
    here = ["c", "d", "e"]
    assert plan.poll(102, here).migrate == ("e",)
    assert plan.poll(103, here).migrate == ()


def test_finishes_when_everyone_has_gone() -> None:
    plan = DrainPlan(DrainPolicy(batch=4, interval=1.0), started_at=0)
    assert plan.poll(0, ["a"]).migrate == ("a",)
    step = plan.poll(0.4, [])
    assert step.finished and not step.timed_out
    assert plan.finished
    assert plan.poll(1, ["late"]).finished  # a finished drain stays finished


def test_an_empty_node_finishes_at_once() -> None:
    assert DrainPlan(DrainPolicy(), started_at=5).poll(5, []).finished


def test_participants_ignoring_migrate_are_disconnected_after_the_grace() -> None:
    plan = DrainPlan(DrainPolicy(batch=1, interval=0.5, timeout=60, grace=3), started_at=0)
    assert plan.poll(0, ["old-client"]).migrate == ("old-client",)
    assert plan.deadline(["old-client"]) == 3
    assert plan.poll(2.9, ["old-client"]).disconnect == ()
    step = plan.poll(3, ["old-client"])
    assert step.disconnect == ("old-client",) and not step.finished


def test_timeout_disconnects_whoever_is_left() -> None:
    plan = DrainPlan(DrainPolicy(batch=1, interval=1, timeout=5, grace=100), started_at=0)
    plan.poll(0, ["a", "b"])
    assert plan.deadline(["a", "b"]) == 1
    step = plan.poll(5, ["a", "b"])
    assert step == step.__class__(disconnect=("a", "b"), finished=True, timed_out=True)


@pytest.mark.parametrize(
    ("rate", "batch", "interval"),
    [(1, 1, 1.0), (4, 1, 0.25), (10, 1, 0.1), (20, 2, 0.1), (100, 4, 0.04)],
)
def test_rate_maps_to_batches(rate: float, batch: int, interval: float) -> None:
    policy = DrainPolicy.from_rate(rate, timeout=30)
    assert (policy.batch, policy.interval) == (batch, pytest.approx(interval))


@pytest.mark.parametrize("bad", [{"batch": 0}, {"interval": 0}, {"timeout": -1}, {"grace": 0}])
def test_bad_policies_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DrainPolicy(**bad)  # type: ignore[arg-type]


A, B = b"a" * 20, b"b" * 20


def test_a_link_down_past_the_deadline_marks_the_node_dead_once() -> None:
    watch = OriginWatch(link_deadline=3)
    watch.record_seen(A, expires_at=130)
    watch.link_down(A, now=100)
    watch.link_down(A, now=101)  # the first loss counts
    assert watch.deadline() == 103
    assert watch.poll(102.9) == [] and not watch.is_dead(A)
    assert watch.poll(103) == [A] and watch.is_dead(A)
    assert watch.poll(104) == [] and watch.deadline() is None


def test_a_link_that_comes_back_in_time_keeps_the_node() -> None:
    watch = OriginWatch(link_deadline=3)
    watch.link_down(A, now=0)
    watch.link_up(A)
    assert watch.poll(10) == [] and not watch.is_dead(A)


def test_a_stale_record_does_not_revive_a_dead_node_but_a_fresh_one_does() -> None:
    watch = OriginWatch(link_deadline=1)
    watch.record_seen(A, expires_at=50)
    watch.link_down(A, now=10)
    watch.poll(11)
    watch.record_seen(A, expires_at=50)  # the DHT still holds the dead node's record
    assert watch.is_dead(A)
    watch.record_seen(A, expires_at=70)  # it restarted (or refreshed): alive again
    assert not watch.is_dead(A)


def test_a_withdrawn_record_marks_the_node_dead_at_once() -> None:
    watch = OriginWatch()
    watch.record_seen(B, expires_at=20)
    watch.record_gone(B)
    assert watch.dead == frozenset({B})
    watch.link_down(B, now=0)  # already dead: nothing more to report
    assert watch.poll(100) == []


@pytest.mark.parametrize(
    ("attempt", "draw", "delay"),
    [(0, 0.0, 0.0), (0, 0.5, 0.125), (1, 1.0, 0.5), (3, 0.5, 1.0), (10, 0.5, 2.5)],
)
def test_backoff_is_exponential_capped_and_jittered(
    attempt: int, draw: float, delay: float
) -> None:
    assert Backoff(first=0.25, factor=2, cap=5).delay(attempt, draw) == pytest.approx(delay)
