"""Relay tunables, counters and the errors raised to callers (shared by every layer)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .acks import AckSettings
from .admission import AdmissionLimits

__all__ = ["RelayConfig", "RelayCounters", "RelayError", "RelayRefused", "SubscribeError"]


@dataclass
class RelayConfig:
    """Tunables of an endpoint (times in seconds)."""

    #: Local address; the server binds it and diallers bind an ephemeral port on it.
    host: str = "127.0.0.1"
    #: UDP port of the QUIC server (0 = ephemeral).
    port: int = 0
    heartbeat_interval: float = 0.5
    #: No control traffic for this long = dead link (connection closed, listeners told).
    dead_after: float = 2.5
    #: Unauthenticated connections: limits, rates and the handshake/auth deadlines.
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    connect_timeout: float = 5.0
    #: Flow kept open this long after the last local listener left.
    linger: float = 2.0
    #: Minimum spacing of keyframe requests per flow (both ends).
    keyframe_interval: float = 0.5
    nack_reorder_wait: float = 0.015
    #: Minimum NACK retry spacing (raised to 1.5 x RTT + 10 ms when the RTT is larger).
    nack_retry_interval: float = 0.05
    nack_max_retries: int = 5
    nack_max_gap: int = 512
    #: Remote-side packet cache per flow (answers local NACKs); power of two.
    remote_cache_size: int = 1024
    reconnect_min: float = 0.2
    reconnect_max: float = 5.0
    #: UDP payload size used by QUIC (loopback/LAN: 1452 fits an Ethernet MTU).
    max_datagram_size: int = 1452
    #: Cap of DATAGRAM frames queued in QUIC (congestion-limited); extra packets dropped.
    max_pending_datagrams: int = 2048
    #: Flush queued DATAGRAM frames to the socket once this many are waiting (long
    #: bursts); otherwise everything queued in one event-loop iteration goes out in one
    #: transmit at its end (each transmit has a fixed cost in aioquic).
    datagram_flush_batch: int = 16
    #: Build and parse DATAGRAM-only 1-RTT packets in :mod:`relay.quic_adapter` instead of
    #: aioquic's general path (same wire format; ``CASCADE_RELAY_FAST_PATH=0`` also turns
    #: it off). For same-run baselines.
    quic_fast_path: bool = True
    #: Linux UDP segmentation offload on the relay's sockets: a burst of equal-sized QUIC
    #: packets leaves in one system call, coalesced ones are read in one (see
    #: :mod:`relay.udp`). Ordinary datagrams on the wire.
    udp_offload: bool = True
    #: When a receiving end ACKs (fast path): prompt at the start and after a loss, then
    #: one ACK per 16 packets or 10 ms (see :mod:`relay.acks`); ``AckSettings(every=0)``
    #: ACKs every read of 2+ packets, else after 1 ms.
    quic_acks: AckSettings = field(default_factory=AckSettings)
    #: QUIC congestion control: ``cascade-media`` (:mod:`relay.congestion`, reacts to the
    #: loss fraction, not to each loss) or aioquic's ``reno`` / ``cubic``.
    congestion_control: str = "cascade-media"
    stats_interval: float = 2.0
    max_flows_per_connection: int = 4096
    #: QUIC idle timeout (backstop; the heartbeat detects death much earlier).
    idle_timeout: float = 10.0


@dataclass
class RelayCounters:
    """Things counted and dropped by an endpoint (all connections, both roles)."""

    datagrams_malformed: int = 0
    datagrams_unknown_flow: int = 0
    datagrams_unexpected: int = 0
    datagrams_too_large: int = 0
    datagrams_queue_full: int = 0
    orphans_replayed: int = 0
    control_malformed: int = 0
    control_unexpected: int = 0
    control_fatal: int = 0
    streams_unexpected: int = 0
    auth_refused: int = 0
    connections_accepted: int = 0
    connections_closed: int = 0
    heartbeat_timeouts: int = 0
    unknown_flow_requests: int = 0
    room_states_received: int = 0


class RelayError(Exception):
    """Base class of relay errors raised to callers."""


class RelayRefused(RelayError):
    """The peer (or this node) refused the connection; ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"relay connection refused ({code}): {reason}")
        self.code = code
        self.reason = reason


class SubscribeError(RelayError):
    """The origin answered SUBSCRIBE with an error."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"subscribe failed ({code}): {reason}")
        self.code = code
        self.reason = reason
