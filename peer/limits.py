"""The node edge's resource limits and the counters of what they refused (sans-I/O).

Every limit is documented in docs/limits.md and has a counter in :class:`EdgeCounters`,
shown under ``"limits"`` in the node's ``GET /stats``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from peer.signaling import MAX_MESSAGE_BYTES


@dataclass
class EdgeLimits:
    """Limits of one node's HTTP/WebSocket edge."""

    max_ws_connections: int = 4000
    max_ws_connections_per_ip: int = 64
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # An HTTP request's headers (and a body, which no route reads) must arrive within this.
    http_header_timeout: float = 10.0
    # A partly received WebSocket message must complete within this.
    ws_message_timeout: float = 10.0
    # Joins per source IP: a token bucket of `join_burst`, refilled at `join_rate` per second.
    join_rate: float = 20.0
    join_burst: float = 200.0
    # Buckets of sources not seen for this long are forgotten (bounded bucket table).
    bucket_idle: float = 60.0
    max_buckets: int = 100_000


@dataclass
class EdgeCounters:
    """How often each limit refused something (monotonic counters)."""

    bad_messages: int = 0
    messages_too_large: int = 0
    unmasked_frames: int = 0
    ws_refused_total_limit: int = 0
    ws_refused_per_ip_limit: int = 0
    http_header_timeouts: int = 0
    ws_message_timeouts: int = 0
    joins_rate_limited: int = 0
    datagrams_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as JSON-ready numbers."""
        return asdict(self)


@dataclass
class TokenBuckets:
    """Per-key token buckets with time passed in; idle keys are forgotten."""

    rate: float
    burst: float
    idle: float = 60.0
    max_keys: int = 100_000
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key`` if it has one."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self.expire(now)
            if len(self._buckets) >= self.max_keys:
                return False
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def expire(self, now: float) -> None:
        """Forget keys whose bucket has been full (idle) for a while."""
        for key, (_, last) in list(self._buckets.items()):
            if now - last > self.idle:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class ConnectionCounts:
    """Open connections per source and in total, against a limit for each."""

    max_total: int
    max_per_source: int
    total: int = 0
    per_source: dict[str, int] = field(default_factory=dict)

    def admit(self, source: str) -> str | None:
        """Count a new connection, or return why it is refused (``total`` / ``per_source``)."""
        if self.total >= self.max_total:
            return "total"
        if self.per_source.get(source, 0) >= self.max_per_source:
            return "per_source"
        self.total += 1
        self.per_source[source] = self.per_source.get(source, 0) + 1
        return None

    def release(self, source: str) -> None:
        """A counted connection closed."""
        self.total -= 1
        left = self.per_source.get(source, 0) - 1
        if left > 0:
            self.per_source[source] = left
        else:
            self.per_source.pop(source, None)
