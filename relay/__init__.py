"""Cascade relay: QUIC pipes that carry producers between nodes.

Origin side: give :class:`RelayEndpoint` a ``lookup(producer_id) -> RelaySource | None``
and an ``authorize(public_key) -> bool``; peers that pass authentication can subscribe.
Remote side: ``endpoint.link(peer_key, host, port).subscribe(producer_id)`` returns a
shared :class:`RemoteProducer` that local consumers attach to like a local producer.
See docs/relay-protocol.md.
"""

from .auth import make_certificate, public_key_bytes
from .config import RelayConfig, RelayCounters, RelayError, RelayRefused, SubscribeError
from .endpoint import (
    RelayConfig,
    RelayCounters,
    RelayEndpoint,
    RelayError,
    RelayLink,
    RelayRefused,
    SubscribeError,
)
from .flows import (
    KeyframeLimiter,
    NackTracker,
    OriginFlowStats,
    RemoteProducer,
    RemoteProducerStats,
)
from .protocol import ALPN, PROTOCOL_VERSION, ErrorCode, ProtocolError
from .source import (
    CODEC_PARAM_KEYS,
    PacketListener,
    ProducerLookup,
    RelayRtcpSource,
    RelaySource,
)

__all__ = [
    "ALPN",
    "CODEC_PARAM_KEYS",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "KeyframeLimiter",
    "NackTracker",
    "OriginFlowStats",
    "PacketListener",
    "ProducerLookup",
    "ProtocolError",
    "RelayConfig",
    "RelayCounters",
    "RelayEndpoint",
    "RelayError",
    "RelayLink",
    "RelayRefused",
    "RelayRtcpSource",
    "RelaySource",
    "RemoteProducer",
    "RemoteProducerStats",
    "SubscribeError",
    "make_certificate",
    "public_key_bytes",
]
