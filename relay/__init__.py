"""Cascade relay: QUIC pipes that carry producers between nodes.

Origin side: give :class:`RelayEndpoint` a ``lookup(producer_id) -> RelaySource | None``
and an ``authorize(public_key) -> bool``; peers that pass authentication can subscribe.
Remote side: ``endpoint.link(peer_key, host, port).subscribe(producer_id)`` returns a
shared :class:`RemoteProducer` that local consumers attach to like a local producer.
Between processes of one node, :class:`RelayPipe` carries the same flows over a plain
datagram socket. Layers: sans-I/O state machines (``connection``, ``origin``, ``remote``,
``handshake``, ``flows``, ``protocol``) under two thin transports (``endpoint``: QUIC,
``pipe``: datagrams). See docs/relay-protocol.md and docs/architecture.md.
"""

from .acks import AckSettings
from .auth import make_certificate, public_key_bytes
from .config import RelayConfig, RelayCounters, RelayError, RelayRefused, SubscribeError
from .endpoint import RelayEndpoint, RelayLink
from .flows import (
    KeyframeLimiter,
    NackTracker,
    OriginFlowStats,
    RemoteProducer,
    RemoteProducerStats,
)
from .pipe import RelayPipe, pipe_socketpair
from .protocol import ALPN, PROTOCOL_VERSION, ErrorCode, ProtocolError
from .source import (
    CODEC_PARAM_KEYS,
    PacketListener,
    PendingSource,
    ProducerLookup,
    RelayRtcpSource,
    RelaySource,
)

__all__ = [
    "ALPN",
    "CODEC_PARAM_KEYS",
    "PROTOCOL_VERSION",
    "AckSettings",
    "ErrorCode",
    "KeyframeLimiter",
    "NackTracker",
    "OriginFlowStats",
    "PacketListener",
    "PendingSource",
    "ProducerLookup",
    "ProtocolError",
    "RelayConfig",
    "RelayCounters",
    "RelayEndpoint",
    "RelayError",
    "RelayLink",
    "RelayPipe",
    "RelayRefused",
    "RelayRtcpSource",
    "RelaySource",
    "RemoteProducer",
    "RemoteProducerStats",
    "SubscribeError",
    "make_certificate",
    "pipe_socketpair",
    "public_key_bytes",
]
