"""The node edge's resource limits and the counters of what they refused (sans-I/O).

Every limit is documented in docs/limits.md and has a counter in :class:`EdgeCounters`,
shown under ``"limits"`` in the node's ``GET /stats``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from common.limits import ConnectionCounts, TokenBuckets
from peer.signaling import MAX_MESSAGE_BYTES

__all__ = ["ConnectionCounts", "EdgeCounters", "EdgeLimits", "TokenBuckets"]


@dataclass
class EdgeLimits:
    """Limits of one node's HTTP/WebSocket edge."""

    max_ws_connections: int = 4000
    # 0: no per-address limit (a node behind a reverse proxy, load generators).
    max_ws_connections_per_ip: int = 64
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # An HTTP request's headers (and a body, which no route reads) must arrive within this.
    http_header_timeout: float = 10.0
    # A partly received WebSocket message must complete within this.
    ws_message_timeout: float = 10.0
    # Joins per source IP: a token bucket of `join_burst`, refilled at `join_rate` per second
    # (0: joins are not rate-limited).
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
