"""Per-region capacity and the scale-out / scale-in signal, from the directory alone.

Pure and clock-free: :func:`region_capacity` summarises live node views;
:class:`ScaleSignal` turns successive summaries into signal changes with hysteresis, and
:func:`is_region_leader` says which single node of a region reports them. The overlay
feeds it every sync and delivers the changes (log line, ``GET /overlay``, webhook).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from peer.placement import NodeView


class Signal(enum.Enum):
    """What a region needs."""

    STEADY = "steady"
    SCALE_OUT = "scale_out"
    """Free capacity is short, or placements had to leave the region: add a node."""
    SCALE_IN = "scale_in"
    """One node could be drained without pushing the others above the watermark."""


@dataclass(frozen=True, slots=True)
class RegionCapacity:
    """A region's capacity in consumers (nodes that do not say count as 1 unit each)."""

    region: str
    nodes: int
    capacity: float
    used: float
    spilled: int
    """Recent placements of this region's clients that had to leave the region."""
    removable: str | None
    """A node that could be drained without pushing the others above the watermark."""

    @property
    def free(self) -> float:
        """Spare capacity."""
        return max(0.0, self.capacity - self.used)

    @property
    def free_fraction(self) -> float:
        """Spare capacity as a fraction of the region's capacity (0 with no node)."""
        return self.free / self.capacity if self.capacity > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    """Thresholds of the signal."""

    scale_out_below: float = 0.20
    """Raise scale-out when the free fraction falls below this..."""
    scale_out_clear_above: float = 0.35
    """...and clear it only once it is above this and nothing spilled for ``hold``."""
    watermark: float = 0.30
    """Placement's watermark: after a drain, every node must keep this much headroom."""
    hold: float = 30.0
    """Seconds a condition must last before the signal changes (no flapping)."""


def _units(node: NodeView) -> float:
    return float(node.capacity) if node.capacity > 0 else 1.0


def region_capacity(
    nodes: Iterable[NodeView],
    spilled: dict[str, int] | None = None,
    *,
    watermark: float = 0.30,
) -> dict[str, RegionCapacity]:
    """Capacity, use and drain candidate of each region of the live, non-draining nodes."""
    spilled = spilled or {}
    by_region: dict[str, list[NodeView]] = {}
    for node in nodes:
        if not node.draining:
            by_region.setdefault(node.region, []).append(node)
    for region in spilled:
        by_region.setdefault(region, [])
    out: dict[str, RegionCapacity] = {}
    for region, members in sorted(by_region.items()):
        capacity = sum(_units(n) for n in members)
        used = sum(_units(n) * (1.0 - min(1.0, max(0.0, n.headroom))) for n in members)
        removable = None
        if len(members) >= 2:
            # Drain the least used node if the rest can absorb its load under the watermark.
            candidate = min(members, key=lambda n: (_units(n) * (1 - n.headroom), n.node_id))
            rest = capacity - _units(candidate)
            if used <= rest * (1.0 - watermark):
                removable = candidate.node_id
        out[region] = RegionCapacity(
            region=region,
            nodes=len(members),
            capacity=capacity,
            used=used,
            spilled=spilled.get(region, 0),
            removable=removable,
        )
    return out


def is_region_leader(node_id: str, region: str, nodes: Iterable[NodeView]) -> bool:
    """True for exactly one live node per region (the lowest node id, draining or not), so
    a fleet sends one notification per region, not one per node."""
    ids = [n.node_id for n in nodes if n.region == region]
    return bool(ids) and min(ids) == node_id


@dataclass(frozen=True, slots=True)
class SignalChange:
    """A region's signal changed."""

    region: str
    signal: Signal
    previous: Signal
    capacity: RegionCapacity
    at: float


@dataclass
class ScaleSignal:
    """Per-region signal state with hysteresis; feed it with :meth:`update`."""

    policy: ScalePolicy = field(default_factory=ScalePolicy)
    signals: dict[str, Signal] = field(default_factory=dict)
    _since: dict[tuple[str, Signal], float] = field(default_factory=dict)

    def _wanted(self, cap: RegionCapacity, current: Signal) -> Signal:
        p = self.policy
        short = cap.free_fraction < p.scale_out_below or cap.spilled > 0 or cap.nodes == 0
        if short:
            return Signal.SCALE_OUT
        if current is Signal.SCALE_OUT and cap.free_fraction <= p.scale_out_clear_above:
            return Signal.SCALE_OUT  # hysteresis band: stay until clearly above
        if cap.removable is not None:
            return Signal.SCALE_IN
        return Signal.STEADY

    def update(self, regions: dict[str, RegionCapacity], now: float) -> list[SignalChange]:
        """Changes to report. Scale-out is raised at once; every other change (clearing it,
        scale-in) only after the condition has held for ``policy.hold`` seconds."""
        changes: list[SignalChange] = []
        for region, cap in regions.items():
            current = self.signals.get(region, Signal.STEADY)
            wanted = self._wanted(cap, current)
            if wanted is current:
                self._since = {k: v for k, v in self._since.items() if k[0] != region}
                continue
            since = self._since.setdefault((region, wanted), now)
            for key in [k for k in self._since if k[0] == region and k[1] is not wanted]:
                del self._since[key]
            if wanted is Signal.SCALE_OUT or now - since >= self.policy.hold:
                self.signals[region] = wanted
                del self._since[(region, wanted)]
                changes.append(SignalChange(region, wanted, current, cap, now))
        return changes
