"""Admission of unauthenticated QUIC connections (sans-I/O, time passed in).

A connection is *pending* from its first Initial packet until AUTH_OK. Pending
connections are limited per source address and in total, new ones are rate limited
per source, and each must finish its TLS handshake and then authenticate within
deadlines. See docs/limits.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from common.limits import ConnectionCounts, TokenBuckets


@dataclass
class AdmissionLimits:
    """Limits on connections that have not authenticated yet."""

    max_pending_total: int = 256
    max_pending_per_source: int = 8
    #: New connections per source address: a token bucket of `new_burst` at `new_rate`/s.
    new_rate: float = 5.0
    new_burst: float = 20.0
    #: From the first packet: TLS handshake done within this, AUTH_OK within `auth_timeout`.
    handshake_timeout: float = 2.0
    auth_timeout: float = 4.0


@dataclass
class AdmissionCounters:
    """What admission refused or timed out (monotonic counters)."""

    refused_pending_total: int = 0
    refused_pending_per_source: int = 0
    refused_rate: int = 0
    refused_unauthorized: int = 0
    handshake_timeouts: int = 0
    auth_timeouts: int = 0
    revoked: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as JSON-ready numbers."""
        return asdict(self)


class PendingAdmission:
    """Decides whether a new connection from ``source`` may start, tracks it until it
    authenticates or dies, and says when a pending one ran out of time."""

    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self.counters = AdmissionCounters()
        self._pending = ConnectionCounts(
            self.limits.max_pending_total, self.limits.max_pending_per_source
        )
        self._buckets = TokenBuckets(self.limits.new_rate, self.limits.new_burst)

    @property
    def pending(self) -> int:
        """Connections admitted and not yet authenticated or closed."""
        return self._pending.total

    def admit(self, source: str, now: float) -> bool:
        """A new connection from ``source`` at ``now``: True if it may start (then call
        :meth:`settle` exactly once when it authenticates or dies)."""
        if self._pending.total >= self._pending.max_total:
            self.counters.refused_pending_total += 1
            return False
        if self._pending.per_source.get(source, 0) >= self._pending.max_per_source:
            self.counters.refused_pending_per_source += 1
            return False
        if not self._buckets.allow(source, now):
            self.counters.refused_rate += 1
            return False
        self._pending.admit(source)
        return True

    def settle(self, source: str) -> None:
        """An admitted connection authenticated or closed."""
        self._pending.release(source)

    def expired(self, started: float, handshake_done: bool, now: float) -> str | None:
        """``"handshake"`` or ``"auth"`` if a pending connection started at ``started`` is
        out of time at ``now`` (counted), else None."""
        if not handshake_done and now - started > self.limits.handshake_timeout:
            self.counters.handshake_timeouts += 1
            return "handshake"
        if now - started > self.limits.auth_timeout:
            self.counters.auth_timeouts += 1
            return "auth"
        return None

    def deadline(self, started: float, handshake_done: bool) -> float:
        """When a pending connection started at ``started`` runs out of time."""
        if not handshake_done:
            return started + self.limits.handshake_timeout
        return started + self.limits.auth_timeout

    def expire_buckets(self, now: float) -> None:
        """Forget rate buckets of sources idle for a while."""
        self._buckets.expire(now)
