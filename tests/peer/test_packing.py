"""Worker packing, table-driven: per-worker CPU, consumers and rooms in, a worker out."""

from __future__ import annotations

import pytest

from peer.packing import (
    DEFAULT_WATERMARK,
    Packing,
    PackReason,
    WorkerLoad,
    choose_worker,
    smoothed_cpu,
)


def w(worker_id: int, cpu: float, consumers: int = 0, rooms: str = "", up: bool = True):
    return WorkerLoad(worker_id, cpu, consumers, frozenset(filter(None, rooms.split(","))), up)


ROOM = PackReason.ROOM_UNDER_WATERMARK
UNDER = PackReason.UNDER_WATERMARK
LEAST = PackReason.LEAST_LOADED


@pytest.mark.parametrize(
    ("name", "workers", "room", "chosen", "reason"),
    [
        ("idle node: the first worker", [w(0, 0.0), w(1, 0.0)], "a", 0, UNDER),
        ("one worker", [w(0, 0.95, 500, "b")], "a", 0, LEAST),
        (
            "room's worker under the watermark",
            [w(0, 0.10, 4, "b"), w(1, 0.30, 10, "a")],
            "a",
            1,
            ROOM,
        ),
        (
            "busiest of the room's workers under the watermark",
            [w(0, 0.20, 5, "a"), w(1, 0.50, 30, "a"), w(2, 0.55, 40, "b")],
            "a",
            1,
            ROOM,
        ),
        (
            "room's busiest worker is over: the next of the room's workers",
            [w(0, 0.70, 80, "a"), w(1, 0.20, 8, "a"), w(2, 0.40, 20, "b")],
            "a",
            1,
            ROOM,
        ),
        (
            "room's only worker is over: busiest other worker under the watermark",
            [w(0, 0.65, 80, "a"), w(1, 0.30, 8, "b"), w(2, 0.0)],
            "a",
            1,
            UNDER,
        ),
        (
            "new room packs onto the busiest worker under the watermark",
            [w(0, 0.10, 2, "b"), w(1, 0.45, 30, "c"), w(2, 0.0)],
            "a",
            1,
            UNDER,
        ),
        (
            "exactly at the watermark counts as over",
            [w(0, DEFAULT_WATERMARK, 60, "a"), w(1, 0.0)],
            "a",
            1,
            UNDER,
        ),
        (
            "all over the watermark: least CPU",
            [w(0, 0.90, 90, "a"), w(1, 0.70, 120, "b"), w(2, 0.80, 10, "a")],
            "a",
            1,
            LEAST,
        ),
        (
            "all over, same CPU: fewer consumers",
            [w(0, 0.80, 90, "a"), w(1, 0.80, 40, "b")],
            "a",
            1,
            LEAST,
        ),
        (
            "equal CPU under the watermark: more consumers is busier",
            [w(0, 0.30, 5), w(1, 0.30, 9)],
            "a",
            1,
            UNDER,
        ),
        ("full tie: lowest id", [w(3, 0.2, 5), w(1, 0.2, 5), w(2, 0.2, 5)], "a", 1, UNDER),
        (
            "worker being restarted is never chosen",
            [w(0, 0.30, 20, "a", up=False), w(1, 0.10, 2, "b")],
            "a",
            1,
            UNDER,
        ),
    ],
)
def test_choose_worker(name, workers, room, chosen, reason) -> None:
    packing = choose_worker(workers, room)
    assert packing is not None, name
    assert (packing.worker_id, packing.reason) == (chosen, reason), name


def test_no_worker_up() -> None:
    assert choose_worker([], "a") is None
    assert choose_worker([w(0, 0.0, up=False)], "a") is None


@pytest.mark.parametrize(
    ("watermark", "chosen", "reason"),
    [(0.60, 1, UNDER), (0.80, 0, ROOM), (0.20, 1, LEAST)],
)
def test_watermark_is_configurable(watermark, chosen, reason) -> None:
    workers = [w(0, 0.70, 80, "a"), w(1, 0.25, 10, "b")]
    packing = choose_worker(workers, "a", watermark)
    assert packing is not None
    assert (packing.worker_id, packing.reason) == (chosen, reason)


def test_consumers_concentrate_then_overflow() -> None:
    """Fill workers as CPU grows with consumers: the first takes all until the watermark,
    then the second takes the overflow."""
    cpu_per_consumer = 0.01
    consumers = [0, 0]
    rooms: list[set[str]] = [set(), set()]
    placed = []
    for i in range(100):
        room = f"r{i % 4}"
        loads = [
            w(k, consumers[k] * cpu_per_consumer, consumers[k], ",".join(rooms[k]))
            for k in range(2)
        ]
        packing = choose_worker(loads, room)
        assert packing is not None
        consumers[packing.worker_id] += 1
        rooms[packing.worker_id].add(room)
        placed.append(packing.worker_id)
    assert placed[:60] == [0] * 60
    assert placed[60:] == [1] * 40


def test_a_burst_of_cpu_counts_for_a_fifth_and_a_lasting_load_shows_in_seconds() -> None:
    # a room's participants connecting: one second at 5 % of a core on an idle worker
    cpu = smoothed_cpu(0.0, 0.05, 1.0)
    assert 0.008 < cpu < 0.01
    for _ in range(3):
        cpu = smoothed_cpu(cpu, 0.0, 1.0)
    assert cpu < 0.005
    # a load that stays: most of it within 10 s
    for _ in range(10):
        cpu = smoothed_cpu(cpu, 0.5, 1.0)
    assert 0.42 < cpu < 0.5
    assert smoothed_cpu(0.3, 0.9, 0.0) == 0.3  # no time passed
    assert smoothed_cpu(0.3, 0.9, 1.0, time_constant=0) == 0.9


def test_the_burst_no_longer_sends_the_rest_of_a_room_elsewhere() -> None:
    # worker 0 took a room's first participants: 5 % of a core for a second, over a 3 %
    # watermark measured raw; smoothed, the room's next participants still go there
    raw = [w(0, 0.05, rooms="a"), w(1, 0.0)]
    assert choose_worker(raw, "a", watermark=0.03) == Packing(1, PackReason.UNDER_WATERMARK)
    smoothed = [w(0, smoothed_cpu(0.0, 0.05, 1.0), rooms="a"), w(1, 0.0)]
    assert choose_worker(smoothed, "a", watermark=0.03) == Packing(
        0, PackReason.ROOM_UNDER_WATERMARK
    )
