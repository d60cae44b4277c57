"""Which media worker of a node takes a new participant: a pure policy (no I/O, no clock).

The supervisor gathers each worker's CPU (psutil, per process, once a second, averaged over
:data:`CPU_TIME_CONSTANT` by :func:`smoothed_cpu`), consumers and the rooms it hosts, and
asks :func:`choose_worker`. The policy, after Mafalda's vertical scaler, concentrates
consumers on the fewest workers and reuses a worker while its CPU still has cycles:

1. the busiest worker under the CPU watermark (default 60 % of a core) that already hosts the
   room (the issue's second rule, "any worker under the watermark that hosts the room", draws
   from the same set, so it never picks a different worker and has no step of its own);
2. else the busiest worker under the watermark (the room opens there, or spans a second worker);
3. else the least-loaded worker (admission decides whether it still takes consumers).

"Busiest" is the highest CPU, ties broken by more consumers, more participants, then the lowest
worker id; "least loaded" the lowest CPU, then fewer consumers, fewer participants, lowest id.
Workers that are not up (being restarted) are never chosen. See docs/architecture.md,
"Worker processes".
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_WATERMARK = 0.60

#: Time constant of the CPU packing compares with the watermark, seconds. A worker's
#: participants connecting (ICE, DTLS handshakes) are a burst of CPU that lasts a second or
#: two; measured raw, it puts a worker with a small CPU share over the watermark and sends
#: the rest of its room to another worker, which then pipes it. Smoothed, the burst counts
#: for a fifth of its height and a load that stays shows in a few seconds.
CPU_TIME_CONSTANT = 5.0


def smoothed_cpu(
    previous: float, sample: float, elapsed: float, time_constant: float = CPU_TIME_CONSTANT
) -> float:
    """The CPU packing uses: ``previous`` moved towards ``sample`` (measured over the last
    ``elapsed`` seconds) by an exponential average of ``time_constant`` seconds."""
    if elapsed <= 0:
        return previous
    if time_constant <= 0:
        return sample
    return previous + (sample - previous) * (1.0 - math.exp(-elapsed / time_constant))


class PackReason(enum.Enum):
    """Why a worker was chosen (in order of preference)."""

    ROOM_UNDER_WATERMARK = "room_under_watermark"
    """Hosts the room and its CPU is under the watermark: the busiest such worker."""
    UNDER_WATERMARK = "under_watermark"
    """Does not host the room; the busiest worker whose CPU is under the watermark."""
    LEAST_LOADED = "least_loaded"
    """Every worker is at or over the watermark: the least-loaded one."""


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What packing knows of one worker."""

    worker_id: int
    cpu: float
    """CPU of the worker process as a fraction of one core (0.6 = 60 %), smoothed
    (:func:`smoothed_cpu`)."""
    consumers: int = 0
    rooms: frozenset[str] = frozenset()
    up: bool = True
    """False while the worker is starting or being restarted."""
    participants: int = 0


@dataclass(frozen=True, slots=True)
class Packing:
    """The chosen worker and why."""

    worker_id: int
    reason: PackReason


def _busiest(worker: WorkerLoad) -> tuple[float, int, int, int]:
    return (-worker.cpu, -worker.consumers, -worker.participants, worker.worker_id)


def _least_loaded(worker: WorkerLoad) -> tuple[float, int, int, int]:
    return (worker.cpu, worker.consumers, worker.participants, worker.worker_id)


def choose_worker(
    workers: Sequence[WorkerLoad], room: str, watermark: float = DEFAULT_WATERMARK
) -> Packing | None:
    """The worker for a new participant of ``room``, or None when no worker is up."""
    up = [w for w in workers if w.up]
    if not up:
        return None
    under = [w for w in up if w.cpu < watermark]
    hosting = [w for w in under if room in w.rooms]
    if hosting:
        return Packing(min(hosting, key=_busiest).worker_id, PackReason.ROOM_UNDER_WATERMARK)
    if under:
        return Packing(min(under, key=_busiest).worker_id, PackReason.UNDER_WATERMARK)
    return Packing(min(up, key=_least_loaded).worker_id, PackReason.LEAST_LOADED)


__all__ = [
    "CPU_TIME_CONSTANT",
    "DEFAULT_WATERMARK",
    "PackReason",
    "Packing",
    "WorkerLoad",
    "choose_worker",
    "smoothed_cpu",
]
