"""Monotonic counters over streams that come and go.

The engine keeps counters per producer and consumer; they vanish when the stream closes.
Prometheus counters must never go down, so the ledger adds the last values seen of every
stream that has gone to a ``retired`` total per group.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Generic, TypeVar

Group = TypeVar("Group", bound=Hashable)


class CounterLedger(Generic[Group]):
    """Totals per group = retired streams' last values + live streams' current values."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._last: dict[Hashable, tuple[Group, Sequence[int]]] = {}
        self._retired: dict[Group, list[int]] = {}

    def update(
        self, live: Iterable[tuple[Hashable, Group, Sequence[int]]]
    ) -> dict[Group, list[int]]:
        """Feed every live stream as ``(key, group, values)``; returns the totals per group."""
        current: dict[Hashable, tuple[Group, Sequence[int]]] = {}
        totals: dict[Group, list[int]] = {g: list(v) for g, v in self._retired.items()}
        for key, group, values in live:
            current[key] = (group, values)
            acc = totals.get(group)
            if acc is None:
                totals[group] = list(values)
            else:
                for i, v in enumerate(values):
                    acc[i] += v
        for key, (group, values) in self._last.items():
            if key not in current:
                retired = self._retired.setdefault(group, [0] * self.width)
                acc = totals.setdefault(group, [0] * self.width)
                for i, v in enumerate(values):
                    retired[i] += v
                    acc[i] += v
        self._last = current
        return totals
