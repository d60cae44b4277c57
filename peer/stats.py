"""Sans-I/O stream statistics: counters, bitrate windows and admission math."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StreamStats:
    """Counters for one producer or consumer. Bitrate is derived on read."""

    packets: int = 0
    bytes: int = 0
    packets_lost: int = 0
    fraction_lost: float = 0.0
    jitter: float = 0.0  # seconds
    nacks: int = 0
    retransmits: int = 0
    plis: int = 0
    keyframes: int = 0
    # Consumers: starts on a cached recent keyframe instead of a new one.
    keyframes_replayed: int = 0
    _rate_t: float = 0.0
    _rate_bytes: int = 0
    _rate_packets: int = 0
    bitrate: float = 0.0
    packet_rate: float = 0.0

    def sample(self, now: float) -> None:
        """Update bitrate and packet rate from the counters since the last sample."""
        dt = now - self._rate_t
        if self._rate_t and dt < 1.0:
            return
        if self._rate_t and dt > 0:
            self.bitrate = (self.bytes - self._rate_bytes) * 8 / dt
            self.packet_rate = (self.packets - self._rate_packets) / dt
        self._rate_t = now
        self._rate_bytes = self.bytes
        self._rate_packets = self.packets

    def as_dict(self) -> dict[str, float | int]:
        """Public view used by the signaling `stats` reply and the metrics endpoint."""
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "bitrate": round(self.bitrate),
            "packet_rate": round(self.packet_rate, 1),
            "packets_lost": self.packets_lost,
            "fraction_lost": round(self.fraction_lost, 4),
            "jitter": round(self.jitter, 5),
            "nacks": self.nacks,
            "retransmits": self.retransmits,
            "plis": self.plis,
            "keyframes": self.keyframes,
            "keyframes_replayed": self.keyframes_replayed,
        }


@dataclass(slots=True)
class AdmissionPolicy:
    """Decides whether a node may take one more consumer.

    A Python SFU that saturates its core drops incoming packets, which turns
    into NACK storms for every call on the node; refusing new consumers before
    that point keeps existing calls intact.
    """

    max_consumers: int = 2000
    max_cpu: float = 0.85  # fraction of one core used by the forwarding process
    max_egress_pps: float = 60_000.0
    cpu: float = 0.0
    egress_pps: float = 0.0
    consumers: int = 0
    reasons: list[str] = field(default_factory=list)

    def update(self, cpu: float, egress_pps: float, consumers: int) -> None:
        """Feed the latest measurements (cpu as a fraction of one core)."""
        self.cpu = cpu
        self.egress_pps = egress_pps
        self.consumers = consumers

    def refusal(self, extra_pps: float = 0.0) -> str | None:
        """Why one more consumer (adding ``extra_pps``) is refused, or None to admit."""
        if self.consumers >= self.max_consumers:
            return f"consumer limit reached ({self.max_consumers})"
        if self.cpu >= self.max_cpu:
            return f"cpu at {self.cpu:.0%} of a core (limit {self.max_cpu:.0%})"
        if self.egress_pps + extra_pps > self.max_egress_pps:
            return f"egress would reach {self.egress_pps + extra_pps:.0f} packets/s"
        return None

    def admit(self, extra_pps: float = 0.0) -> str | None:
        """Like :meth:`refusal`, but an admitted consumer is counted at once (its capacity
        is reserved), so concurrent joins between two measurements cannot overshoot the
        limits. Call :meth:`release` when it closes; :meth:`update` resets to measurements."""
        refusal = self.refusal(extra_pps)
        if refusal is None:
            self.consumers += 1
            self.egress_pps += extra_pps
        return refusal

    def release(self, pps: float = 0.0) -> None:
        """A consumer admitted with :meth:`admit` closed."""
        self.consumers = max(0, self.consumers - 1)
        self.egress_pps = max(0.0, self.egress_pps - pps)

    def headroom(self) -> float:
        """Fraction of capacity left, 0..1, the smallest over all limits."""
        return max(
            0.0,
            min(
                1 - self.consumers / self.max_consumers,
                1 - self.cpu / self.max_cpu,
                1 - self.egress_pps / self.max_egress_pps,
            ),
        )
