"""Glue between the SFU engine and relay/: a local Producer served to other nodes
(:class:`ProducerRelaySource`), and a relayed producer that the local Router treats
exactly like a local one (:func:`bridge_remote_producer`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from peer.engine import CodecInfo, Producer, Router
from peer.rtp import CachedPacket, parse_plain_rtp, plain_rtp
from relay import PacketListener, RemoteProducer

# Relayed packets carry a fixed payload type and SSRC: consumers rewrite both anyway.
RELAY_VIDEO_PT = 96
RELAY_AUDIO_PT = 111
RELAY_SSRC = 0x43534344  # "CSCD"


class ProducerRelaySource:
    """Serves a local :class:`Producer` to remote nodes (implements ``relay.RelaySource``)."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self._pt = RELAY_VIDEO_PT if producer.is_video else RELAY_AUDIO_PT
        self._wrapped: dict[PacketListener, Callable[[CachedPacket], None]] = {}

    @property
    def kind(self) -> str:
        """``audio`` or ``video``."""
        return self.producer.kind

    def codec_params(self) -> Mapping[str, object]:
        """Codec and origin identity of the relayed packets."""
        codec = self.producer.codec
        return {
            "mime_type": codec.mime_type,
            "clock_rate": codec.clock_rate,
            "channels": codec.channels,
            "payload_type": self._pt,
            "ssrc": RELAY_SSRC,
            "sdp_fmtp": {k: v for k, v in codec.parameters.items() if v is not None},
            "participant_id": self.producer.participant_id,
            "source": self.producer.source,
            "created_at": self.producer.created_at,
        }

    def _encode(self, packet: CachedPacket) -> bytes:
        return plain_rtp(packet, self._pt, RELAY_SSRC)

    def add_packet_listener(self, cb: PacketListener) -> None:
        """Call ``cb(rtp)`` for every packet the producer receives from now on."""
        if cb in self._wrapped:
            return
        encode = self._encode

        def on_packet(packet: CachedPacket) -> None:
            cb(encode(packet))

        self._wrapped[cb] = on_packet
        self.producer.packet_listeners.append(on_packet)

    def remove_packet_listener(self, cb: PacketListener) -> None:
        """Stop calling ``cb``."""
        wrapped = self._wrapped.pop(cb, None)
        if wrapped is not None and wrapped in self.producer.packet_listeners:
            self.producer.packet_listeners.remove(wrapped)

    def request_keyframe(self) -> None:
        """Ask the publisher for a keyframe (rate-limited by the producer)."""
        self.producer.request_keyframe()

    def get_cached_packet(self, seq: int) -> bytes | None:
        """A packet from the producer's NACK cache, as plain RTP."""
        packet = self.producer.cache.get(seq)
        return self._encode(packet) if packet is not None else None

    def on_close(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` when the producer closes."""
        self.producer.on_close(lambda _p: cb())


def bridge_remote_producer(
    router: Router, remote: RemoteProducer, *, cache_size: int = 1024
) -> Producer:
    """A local :class:`Producer` fed by a relayed one; its keyframe requests and the NACKs
    its cache cannot answer go upstream, and it closes when the remote one closes."""
    params = remote.codec_params()
    mime = str(params.get("mime_type", f"{remote.kind}/unknown"))
    channels = params.get("channels")
    fmtp = params.get("sdp_fmtp")
    codec = CodecInfo(
        mime_type=mime,
        clock_rate=int(str(params.get("clock_rate", 90000))),
        channels=int(str(channels)) if channels is not None else None,
        parameters=dict(fmtp) if isinstance(fmtp, dict) else {},
    )
    participant = str(params.get("participant_id", f"remote-{remote.producer_id}"))
    producer = Producer(
        router,
        participant,
        remote.kind,
        codec,
        producer_id=remote.producer_id,
        source=str(params.get("source") or remote.producer_id),
        created_at=_number(params.get("created_at")),
        cache_size=cache_size,
    )
    producer.origin = "relay"

    def on_rtp(data: bytes) -> None:
        try:
            seq, ts, marker, payload = parse_plain_rtp(data)
        except ValueError:
            return
        producer.receive(seq, ts, marker, payload)

    remote.add_packet_listener(on_rtp)
    producer.send_keyframe_request = remote.request_keyframe
    producer.fetch_missing = remote.nack

    def remote_closed() -> None:
        # Lost (its worker or node went away) rather than ended: subscribers keep its
        # tracks for a republished one.
        producer.close("origin_lost" if remote.lost else None)

    remote.on_close(remote_closed)
    producer.on_close(lambda _p: remote.remove_packet_listener(on_rtp))
    router.add_producer(producer)
    return producer


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
