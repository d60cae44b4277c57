"""Per-region capacity and the scale-out / scale-in signal, from the directory alone.

Pure and clock-free: :func:`region_capacity` summarises live node views;
:class:`ScaleSignal` turns successive summaries into signal changes with hysteresis, and
:func:`is_region_leader` says which single node of a region reports them. The overlay
feeds it every sync and delivers the changes (log line, ``GET /overlay``, webhook).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from peer.placement import NodeView

WEBHOOK_DOMAIN = b"cascade/scale-webhook/v1\x00"


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

    def as_dict(self) -> dict[str, object]:
        """JSON-ready figures (``GET /overlay``, notifications)."""
        return {
            "nodes": self.nodes,
            "capacity": round(self.capacity, 3),
            "used": round(self.used, 3),
            "free_fraction": round(self.free_fraction, 4),
            "spilled": self.spilled,
            "removable": self.removable,
        }


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
    spill_window: float = 60.0
    """Seconds a placement that left its region counts towards the region's scale-out."""


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


# -- notifications --------------------------------------------------------------

SIGNATURE_HEADER = "X-Cascade-Signature"
NODE_KEY_HEADER = "X-Cascade-Node-Key"


def notification(change: SignalChange, node_id: str) -> dict[str, object]:
    """The JSON body of a signal notification (log line, webhook, ``GET /overlay``)."""
    cap = change.capacity
    return {
        "type": "scale_signal",
        "region": change.region,
        "signal": change.signal.value,
        "previous": change.previous.value,
        "at": change.at,
        "reported_by": node_id,
        **cap.as_dict(),
    }


def sign_notification(body: bytes, key: Ed25519PrivateKey) -> dict[str, str]:
    """Headers that let a receiver check ``body`` came from the node holding ``key``."""
    return {
        SIGNATURE_HEADER: key.sign(WEBHOOK_DOMAIN + body).hex(),
        NODE_KEY_HEADER: key.public_key().public_bytes_raw().hex(),
    }


def verify_notification(body: bytes, headers: Mapping[str, str], public_key: bytes) -> bool:
    """True if ``headers`` carry a valid signature of ``body`` by ``public_key`` (a node key
    the receiver knows, e.g. from the directory)."""
    try:
        if bytes.fromhex(headers.get(NODE_KEY_HEADER, "")) != public_key:
            return False
        signature = bytes.fromhex(headers.get(SIGNATURE_HEADER, ""))
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, WEBHOOK_DOMAIN + body)
    except (ValueError, InvalidSignature):
        return False
    return True


@dataclass
class _Delivery:
    body: bytes
    attempts: int = 0
    next_at: float = 0.0


@dataclass
class WebhookOutbox:
    """Notifications waiting for delivery, retried with exponential backoff.

    Sans-I/O: :meth:`due` hands out what to POST now, :meth:`done` reports the outcome,
    :meth:`deadline` says when to look again.
    """

    first_retry: float = 1.0
    max_retry: float = 60.0
    max_attempts: int = 8
    max_queued: int = 100
    dropped: int = 0
    _queue: list[_Delivery] = field(default_factory=list)

    def add(self, body: bytes, now: float) -> None:
        """Queue one notification (the oldest is dropped past ``max_queued``)."""
        if len(self._queue) >= self.max_queued:
            self._queue.pop(0)
            self.dropped += 1
        self._queue.append(_Delivery(body, 0, now))

    def due(self, now: float) -> list[bytes]:
        """Bodies to send now, oldest first (each stays queued until :meth:`done`)."""
        return [d.body for d in self._queue if d.next_at <= now]

    def done(self, body: bytes, ok: bool, now: float) -> None:
        """Record the outcome of one attempt."""
        for i, d in enumerate(self._queue):
            if d.body is body or d.body == body:
                if ok:
                    del self._queue[i]
                    return
                d.attempts += 1
                if d.attempts >= self.max_attempts:
                    del self._queue[i]
                    self.dropped += 1
                    return
                d.next_at = now + min(self.max_retry, self.first_retry * 2 ** (d.attempts - 1))
                return

    def deadline(self) -> float | None:
        """When the next delivery is due, or None if nothing is queued."""
        return min((d.next_at for d in self._queue), default=None)

    def __len__(self) -> int:
        return len(self._queue)
