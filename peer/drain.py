"""Draining a node, as plain policy: who is told to move when, and when the node may exit.

No I/O and no clock: the node's drain task passes the participants still connected and
``now`` to :meth:`DrainPlan.poll`, applies the returned :class:`DrainStep` (send ``migrate``,
close stragglers) and sleeps until :meth:`DrainPlan.deadline`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DrainPolicy:
    """How fast a draining node moves its participants out."""

    batch: int = 4
    """Participants told to migrate at once."""
    interval: float = 0.25
    """Seconds between batches (so ``batch / interval`` participants per second)."""
    timeout: float = 30.0
    """The node exits after this long even if participants remain."""
    grace: float = 10.0
    """A participant still connected this long after its ``migrate`` is disconnected."""

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError("drain batch must be at least 1")
        if self.interval <= 0 or self.timeout <= 0 or self.grace <= 0:
            raise ValueError("drain interval, timeout and grace must be positive")

    @classmethod
    def from_rate(cls, rate: float, timeout: float, grace: float = 10.0) -> DrainPolicy:
        """A policy moving about ``rate`` participants per second (batches of at most 4,
        at most 10 batches a second)."""
        if rate <= 0:
            raise ValueError("drain rate must be positive")
        batch = max(1, min(4, round(rate / 10) or 1))
        return cls(batch=batch, interval=batch / rate, timeout=timeout, grace=grace)


@dataclass(frozen=True)
class DrainStep:
    """What the node does now."""

    migrate: tuple[str, ...] = ()
    """Participants to send ``migrate`` to."""
    disconnect: tuple[str, ...] = ()
    """Participants that ignored their ``migrate`` past the grace: close them."""
    finished: bool = False
    """Nobody is left, or the drain timed out: the node may exit."""
    timed_out: bool = False


@dataclass
class DrainPlan:
    """One drain, from its start to the node's exit."""

    policy: DrainPolicy
    started_at: float
    _told: dict[str, float] = field(default_factory=dict)
    _next_batch: float = 0.0
    _finished: bool = False

    def __post_init__(self) -> None:
        self._next_batch = self.started_at

    @property
    def finished(self) -> bool:
        """Whether the drain is over."""
        return self._finished

    def poll(self, now: float, present: Iterable[str]) -> DrainStep:
        """The step due at ``now``, given the participants still on the node (in the order
        they should leave: the caller lists them oldest first)."""
        if self._finished:
            return DrainStep(finished=True)
        here = list(dict.fromkeys(present))
        if not here:
            self._finished = True
            return DrainStep(finished=True)
        if now >= self.started_at + self.policy.timeout:
            self._finished = True
            return DrainStep(disconnect=tuple(here), finished=True, timed_out=True)
        for gone in set(self._told) - set(here):
            del self._told[gone]
        migrate: tuple[str, ...] = ()
        if now >= self._next_batch:
            waiting = [p for p in here if p not in self._told]
            migrate = tuple(waiting[: self.policy.batch])
            for participant in migrate:
                self._told[participant] = now
            if migrate:
                self._next_batch = now + self.policy.interval
        disconnect = tuple(p for p, t in self._told.items() if now >= t + self.policy.grace)
        for participant in disconnect:
            del self._told[participant]
        return DrainStep(migrate=migrate, disconnect=disconnect)

    def deadline(self, present: Iterable[str]) -> float:
        """When :meth:`poll` has something to do next."""
        here = set(present)
        times = [self.started_at + self.policy.timeout]
        if here - set(self._told):
            times.append(self._next_batch)
        times.extend(t + self.policy.grace for p, t in self._told.items() if p in here)
        return min(times)
