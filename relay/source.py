"""Interfaces between the relay and the SFU engine (implemented by ``peer/``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

__all__ = [
    "CODEC_PARAM_KEYS",
    "PacketListener",
    "PendingSource",
    "ProducerLookup",
    "RelayRtcpSource",
    "RelaySource",
]

#: A callback receiving one plain (SRTP-decrypted) RTP packet.
PacketListener = Callable[[bytes], None]

#: Keys expected in :meth:`RelaySource.codec_params` (all optional except ``mime_type``
#: and ``clock_rate``).  Values must be msgpack-serialisable (str, int, float, bool,
#: None, bytes, lists and str-keyed dicts of those).
CODEC_PARAM_KEYS = (
    "mime_type",  # str, e.g. "video/VP8", "audio/opus"
    "clock_rate",  # int, e.g. 90000
    "channels",  # int | None (audio)
    "payload_type",  # int, the origin payload type of the packets
    "rtx_payload_type",  # int | None
    "sdp_fmtp",  # dict[str, str | int] | str
    "rtcp_feedback",  # list[[type, parameter | None]], e.g. [["nack", None], ["nack", "pli"]]
    "ssrc",  # int, origin SSRC of the packets
)


class RelaySource(Protocol):
    """What the origin side of the relay needs from a local producer.

    The lead implements it on ``peer.Producer``; :class:`relay.RemoteProducer` implements
    it too, so a remote producer can be relayed again (chained hops).

    Packets are delivered **as received by the producer**: plain RTP after SRTP
    decryption, with the origin SSRC, payload type and sequence numbers, before any
    per-consumer rewriting.  The relay forwards them byte-for-byte; the remote node's
    consumers rewrite them exactly as they would a local producer's packets.
    """

    @property
    def kind(self) -> str:
        """``"audio"`` or ``"video"``."""
        ...

    def codec_params(self) -> Mapping[str, object]:
        """Codec parameters of the packets (see :data:`CODEC_PARAM_KEYS`)."""
        ...

    def add_packet_listener(self, cb: PacketListener) -> None:
        """Call ``cb(rtp_bytes)`` for every packet from now on (on the event loop thread)."""
        ...

    def remove_packet_listener(self, cb: PacketListener) -> None:
        """Stop calling ``cb``; unknown callbacks are ignored."""
        ...

    def request_keyframe(self) -> None:
        """Ask the publisher for a keyframe (PLI/FIR); the relay rate-limits calls."""
        ...

    def get_cached_packet(self, seq: int) -> bytes | None:
        """The packet with RTP sequence number ``seq`` if still cached, else ``None``."""
        ...

    def on_close(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` once when the producer closes."""
        ...


class RelayRtcpSource(Protocol):
    """Optional extension of :class:`RelaySource`: the producer's own RTCP.

    If the object returned by the lookup also has these methods, the relay forwards
    what they deliver (typically the publisher's sender reports, plain RTCP after
    SRTCP decryption, so remote consumers can keep audio/video in sync) to the
    remote producer's RTCP listeners.  Receiver feedback is *not* relayed this way: it
    travels as KEYFRAME_REQUEST / NACK.
    """

    def add_rtcp_listener(self, cb: PacketListener) -> None:
        """Call ``cb(rtcp_bytes)`` for every RTCP packet of the producer."""
        ...

    def remove_rtcp_listener(self, cb: PacketListener) -> None:
        """Stop calling ``cb``."""
        ...


class PendingSource:
    """A lookup's answer that comes later: the producer is being fetched (from a worker
    process, or from another node). The origin answers the SUBSCRIBE once
    :meth:`resolve` is called, with the source or ``None`` (not found)."""

    def __init__(self) -> None:
        self.resolved = False
        self.source: RelaySource | None = None
        self._waiters: list[Callable[[RelaySource | None], None]] = []

    def when_resolved(self, cb: Callable[[RelaySource | None], None]) -> None:
        """Call ``cb(source)`` once resolved (at once if it already is)."""
        if self.resolved:
            cb(self.source)
        else:
            self._waiters.append(cb)

    def resolve(self, source: RelaySource | None) -> None:
        """The answer; later calls are ignored."""
        if self.resolved:
            return
        self.resolved = True
        self.source = source
        waiters, self._waiters = self._waiters, []
        for cb in waiters:
            cb(source)


#: Resolves a producer id to a local source (``None`` if unknown), or to a
#: :class:`PendingSource` that resolves later.
ProducerLookup = Callable[[str], "RelaySource | PendingSource | None"]
