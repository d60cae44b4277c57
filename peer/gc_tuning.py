"""Garbage-collector settings for a node process (the CLI's node and each media worker).

Forwarding allocates a few container objects per packet, and every producer keeps its last
1024 packets for NACK answers, so with CPython's default thresholds packets live long
enough to be promoted to the oldest generation, which then fills up and is scanned in full
every ~20 s: in the many-small-rooms benchmark (8 rooms of 5) the collector took ~10 % of the
node's CPU, one quarter-second stall at a time. Packets are freed by reference counting; the
collector is only needed for reference cycles (closed peer connections, tasks), which can
wait a minute. So a node:

- freezes what exists once it is serving (imports, configuration: never garbage);
- collects the young generation 14x less often and the middle one rarely;
- never runs a full collection on allocation counts, but once per :data:`FULL_INTERVAL`
  seconds from a timer (:func:`collect_periodically`).

Tests run nodes inside the pytest process and keep CPython's defaults;
``CASCADE_GC_TUNING=0`` keeps them in a node too (the benchmarks' baseline).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

THRESHOLDS = (10_000, 50, 1_000_000)
FULL_INTERVAL = 60.0


def tune() -> None:
    """Apply the node's collector settings to this process (call once it is serving)."""
    if not enabled():
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def enabled() -> bool:
    """Whether node processes tune the collector (``CASCADE_GC_TUNING``, default on)."""
    return os.environ.get("CASCADE_GC_TUNING", "1") != "0"


async def collect_periodically(interval: float = FULL_INTERVAL) -> None:
    """Run a full collection every ``interval`` seconds, forever (with :func:`enabled`)."""
    while enabled():
        await asyncio.sleep(interval)
        started = time.perf_counter()
        gc.collect()
        stats.full_collections += 1
        stats.full_seconds += time.perf_counter() - started


class GcStats:
    """Full collections run by :func:`collect_periodically` and the time they took."""

    __slots__ = ("full_collections", "full_seconds")

    def __init__(self) -> None:
        self.full_collections = 0
        self.full_seconds = 0.0


stats = GcStats()
