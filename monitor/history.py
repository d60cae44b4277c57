"""A fixed-size in-memory ring of node totals, one sample a second (15 minutes by default)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

HISTORY_FIELDS: tuple[str, ...] = (
    "time",
    "cpu",
    "headroom",
    "rss",
    "ingress_pps",
    "egress_pps",
    "ingress_bps",
    "egress_bps",
    "rooms",
    "participants",
    "producers",
    "consumers",
)


class HistoryRing:
    """The last ``capacity`` samples; each sample is a tuple in :data:`HISTORY_FIELDS` order."""

    def __init__(self, capacity: int = 900, fields: Sequence[str] = HISTORY_FIELDS) -> None:
        self.fields = tuple(fields)
        self._samples: deque[tuple[float, ...]] = deque(maxlen=capacity)

    def append(self, sample: Sequence[float]) -> None:
        """Add one sample (oldest dropped when full)."""
        if len(sample) != len(self.fields):
            raise ValueError(f"sample has {len(sample)} values, expected {len(self.fields)}")
        self._samples.append(tuple(sample))

    def since(self, t: float = 0.0) -> list[tuple[float, ...]]:
        """Samples with time > ``t``, oldest first."""
        if t <= 0:
            return list(self._samples)
        return [s for s in self._samples if s[0] > t]

    def latest(self) -> tuple[float, ...] | None:
        """The newest sample, if any."""
        return self._samples[-1] if self._samples else None

    def as_json(self, t: float = 0.0) -> dict[str, object]:
        """``{"fields": [...], "samples": [[...], ...]}``."""
        return {"fields": list(self.fields), "samples": [list(s) for s in self.since(t)]}

    def __len__(self) -> int:
        return len(self._samples)
