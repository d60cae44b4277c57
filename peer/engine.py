"""The SFU object model (after mediasoup): Router per room, Producer per published
track, Consumer per (subscriber, producer).

This module is sans-I/O: packets come in through :meth:`Producer.receive` and
leave through each consumer's ``sink`` callable; keyframe requests leave through
the producer's ``send_keyframe_request`` callable. The asyncio/aiortc glue lives
in :mod:`peer.session` and :mod:`peer.aiortc_adapter`.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from mypy_extensions import mypyc_attr

from common.ratelimit import KeyframeLimiter
from peer.rtp import (
    CachedPacket,
    HeaderWriter,
    OutboundParams,
    PacketCache,
    SequenceRewriter,
    abs_send_time_now,
    is_keyframe_start,
    ntp_time,
    shared_extensions,
    wrap_rtx,
)
from peer.stats import AdmissionPolicy, StreamStats


class SfuError(Exception):
    """An error with a protocol error code, reported to the client that caused it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class CodecInfo:
    """The codec a producer publishes with, as negotiated with its publisher."""

    mime_type: str
    clock_rate: int
    channels: int | None = None
    parameters: dict[str, str | int | None] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Codec name without the kind prefix, e.g. ``VP8``."""
        return self.mime_type.split("/", 1)[1]

    @property
    def kind(self) -> str:
        """``audio`` or ``video``."""
        return self.mime_type.split("/", 1)[0]


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


Sink = Callable[[bytes], None]
# One forwarded packet in this many is timed (arrival to last sendto) for Node.timing.
FORWARD_TIMING_EVERY = 64
# A video consumer that starts within this many seconds of the producer's last keyframe
# is sent the cached packets from that keyframe on, instead of waiting for a new one
# (which the keyframe rate limit may hold back for up to its interval).
KEYFRAME_REPLAY_WINDOW = 0.5
# At most this many cached packets are replayed (else a new keyframe is requested).
KEYFRAME_REPLAY_MAX = 256


class Producer:
    """A published track. Receives source packets once and fans them out."""

    def __init__(
        self,
        router: Router,
        participant_id: str,
        kind: str,
        codec: CodecInfo,
        *,
        producer_id: str | None = None,
        source: str | None = None,
        created_at: float | None = None,
        cache_size: int = 1024,
        keyframe_request_delay: float = 0.5,
    ) -> None:
        self.id = producer_id or _new_id("pr")
        # Stable name of the published track: kept when its publisher moves to another node
        # and republishes (the producer id changes, the source does not).
        self.source = source or self.id
        # Wall-clock creation time at the origin node: of two producers of one source, the
        # newer one is the current incarnation (relayed producers keep the origin's time).
        self.created_at = created_at if created_at is not None else time.time()
        # Why it closed, as told to subscribers: "closed", "migrating" or "origin_lost".
        self.close_reason = "closed"
        self.router = router
        self.participant_id = participant_id
        self.kind = kind
        self.codec = codec
        self.is_video = kind == "video"
        self.consumers: list[Consumer] = []
        self.cache = PacketCache(cache_size)
        self.stats = StreamStats()
        self.closed = False
        self.paused = False
        self.last_keyframe_at = 0.0
        self.last_keyframe_seq: int | None = None
        # The last packet received: whether its frame was complete when forwarding stopped.
        self.last_packet: CachedPacket | None = None
        self.keyframe_limiter = KeyframeLimiter(keyframe_request_delay)
        # Set by the transport adapter: sends PLI upstream to the publisher.
        self.send_keyframe_request: Callable[[], None] = lambda: None
        self._close_listeners: list[Callable[[Producer], None]] = []
        self._closing_listeners: list[Callable[[Producer], None]] = []
        # Called once media can be shown: the first keyframe (video) or packet (audio).
        self._media_waiters: list[Callable[[Producer], None]] = []
        # Raw packet listeners (relay flows): called with each CachedPacket.
        self.packet_listeners: list[Callable[[CachedPacket], None]] = []
        # "local" (a publisher on this node) or "relay" (bridged from another node).
        self.origin = "local"
        # Set for relayed producers: asks upstream for packets this cache does not hold.
        self.fetch_missing: Callable[[list[int]], None] | None = None
        self._timing_countdown = FORWARD_TIMING_EVERY
        # The transport adapter's receiver of a local publisher, kept alive with it.
        self.receiver: object | None = None

    def on_close(self, listener: Callable[[Producer], None]) -> None:
        """Call ``listener`` once when this producer closes."""
        self._close_listeners.append(listener)

    def receive(
        self,
        seq: int,
        ts: int,
        marker: int,
        payload: bytes,
        audio_level: int | None = None,
        now: float | None = None,
    ) -> None:
        """Take one source packet (already SRTP-decrypted and RTX-unwrapped) and forward it."""
        if self.closed:
            return
        if now is None:
            now = time.time()
        keyframe = self.is_video and is_keyframe_start(self.codec.name, payload)
        packet = CachedPacket(seq, ts, marker, payload, keyframe, audio_level)
        self.cache.put(packet)
        self.last_packet = packet
        stats = self.stats
        stats.packets += 1
        stats.bytes += len(payload)
        if keyframe:
            stats.keyframes += 1
            self.last_keyframe_at = now
            self.last_keyframe_seq = seq
        if self._media_waiters and (keyframe or not self.is_video):
            waiters, self._media_waiters = self._media_waiters, []
            for waiter in waiters:
                waiter(self)
        if self.paused:
            return
        for listener in self.packet_listeners:
            listener(packet)
        if not self.consumers:
            return
        abs_time = abs_send_time_now(ntp_time(now))
        shared: dict[tuple[int | None, int | None], bytes] = {}
        for consumer in self.consumers:
            layout = consumer.writer.shared_layout
            ext = shared.get(layout)
            if ext is None:
                ext = shared[layout] = shared_extensions(layout, abs_time, audio_level)
            consumer.forward(packet, ext, now)
        self._timing_countdown -= 1
        if not self._timing_countdown:
            self._timing_countdown = FORWARD_TIMING_EVERY
            self.router.node.timing("forward", time.time() - now)

    @property
    def has_media(self) -> bool:
        """Whether a subscriber switched to it now would get media at once."""
        return self.last_keyframe_at > 0 if self.is_video else self.stats.packets > 0

    def recent_keyframe(self, now: float) -> list[CachedPacket] | None:
        """The cached packets from the last keyframe to the newest packet, if that keyframe
        arrived less than :data:`KEYFRAME_REPLAY_WINDOW` ago and every packet since is
        still cached (at most :data:`KEYFRAME_REPLAY_MAX`); else None."""
        first, last = self.last_keyframe_seq, self.last_packet
        if first is None or last is None or now - self.last_keyframe_at > KEYFRAME_REPLAY_WINDOW:
            return None
        count = ((last.seq - first) & 0xFFFF) + 1
        if count > KEYFRAME_REPLAY_MAX:
            return None
        packets = []
        for offset in range(count):
            packet = self.cache.get((first + offset) & 0xFFFF)
            if packet is None:
                return None
            packets.append(packet)
        return packets if packets[0].keyframe else None

    def when_media(self, callback: Callable[[Producer], None]) -> None:
        """Call ``callback(self)`` once it has media (asking the publisher for a keyframe
        until then); at once if it already has."""
        if self.has_media:
            callback(self)
            return
        self._media_waiters.append(callback)
        self.request_keyframe()

    def on_closing(self, listener: Callable[[Producer], None]) -> None:
        """Call ``listener`` when ``close`` starts, while the consumers are still attached."""
        self._closing_listeners.append(listener)

    def request_keyframe(self, now: float | None = None) -> None:
        """Ask the publisher for a keyframe, rate-limited."""
        if not self.is_video or self.closed:
            return
        if self.keyframe_limiter.request(time.time() if now is None else now):
            self.stats.plis += 1
            self.send_keyframe_request()

    def tick(self, now: float) -> None:
        """Timer work: held keyframe requests, retries for waiting consumers, rates."""
        if self.keyframe_limiter.poll(now):
            self.stats.plis += 1
            self.send_keyframe_request()
        elif (
            self.is_video
            and now - self.keyframe_limiter.last_sent >= self.keyframe_limiter.interval
            and (
                self._media_waiters
                or any(c.waiting_keyframe and c.sink is not None for c in self.consumers)
            )
        ):
            # A consumer that can receive still waits: the request, the keyframe or the
            # publisher's first packets were lost or late. Ask again, once per interval,
            # until a keyframe has been forwarded to every such consumer.
            self.request_keyframe(now)
        self.stats.sample(now)

    def close(self, reason: str | None = None) -> None:
        """Close the producer and all of its consumers (``reason`` is told to subscribers)."""
        if self.closed:
            return
        if reason is not None:
            self.close_reason = reason
        self.closed = True
        self._media_waiters.clear()
        closing, self._closing_listeners = self._closing_listeners, []
        for listener in closing:
            listener(self)
        for consumer in list(self.consumers):
            consumer.close()
        for listener in self._close_listeners:
            listener(self)
        self._close_listeners.clear()
        self.packet_listeners.clear()

    def describe(self) -> dict[str, object]:
        """Public description sent to clients."""
        return {
            "producer_id": self.id,
            "participant_id": self.participant_id,
            "kind": self.kind,
            "codec": self.codec.mime_type,
            "source": self.source,
        }


class Consumer:
    """One subscriber's view of one producer: rewrites and sends packets to its sink."""

    def __init__(
        self,
        producer: Producer,
        subscriber_id: str,
        *,
        consumer_id: str | None = None,
        paused: bool = False,
    ) -> None:
        self.id = consumer_id or _new_id("co")
        self.producer = producer
        self.subscriber_id = subscriber_id
        self.kind = producer.kind
        self.params = OutboundParams(ssrc=0, payload_type=0)
        self.writer = HeaderWriter(self.params)
        self.rtx_writer: HeaderWriter | None = None
        self.rtx_seq = random.randint(0, 0x7FFF)
        self.rewriter = SequenceRewriter(
            producer.codec.clock_rate, random.randint(0, 0x7FFF), random.getrandbits(32)
        )
        self.stats = StreamStats()
        self.paused = paused
        self.closed = False
        self.waiting_keyframe = producer.is_video
        self.sink: Sink | None = None
        self._gated = True
        self._close_listeners: list[Callable[[Consumer], None]] = []
        self._created_at = time.time()  # until the first packet is forwarded

    def on_close(self, listener: Callable[[Consumer], None]) -> None:
        """Call ``listener`` once when this consumer closes."""
        self._close_listeners.append(listener)

    def attach(self, params: OutboundParams, sink: Sink, now: float | None = None) -> None:
        """Start sending to ``sink`` with what the subscriber negotiated.

        Call it once the subscriber's transport can carry media: a video consumer then
        asks for a keyframe, and keeps asking (see :meth:`Producer.tick`) until one
        has been forwarded to it.
        """
        self.params = params
        self.writer = HeaderWriter(params)
        if params.rtx_ssrc is not None and params.rtx_payload_type is not None:
            self.rtx_writer = HeaderWriter(
                OutboundParams(
                    ssrc=params.rtx_ssrc,
                    payload_type=params.rtx_payload_type,
                    mid=params.mid,
                    mid_ext_id=params.mid_ext_id,
                    abs_send_time_ext_id=params.abs_send_time_ext_id,
                )
            )
        self.sink = sink
        if not self.producer.is_video:
            self._update_gate()
            return
        self.waiting_keyframe = True
        self._update_gate()
        wall = time.time() if now is None else now
        recent = None if self.paused else self.producer.recent_keyframe(wall)
        if recent is None:
            self.producer.request_keyframe(now)
            return
        # The keyframe the producer got a moment ago (for another subscriber, or asked for
        # when a relay flow opened): start with it rather than wait for the next one.
        self.stats.keyframes_replayed += 1
        abs_time = abs_send_time_now(ntp_time(wall))
        for packet in recent:
            ext = shared_extensions(self.writer.shared_layout, abs_time, packet.audio_level)
            self.forward(packet, ext, wall)

    def forward(self, packet: CachedPacket, shared_ext: bytes, now: float) -> None:
        """Rewrite one source packet for this subscriber and send it. Hot path."""
        if self._gated and not self._pass_gate(packet):
            return
        rw = self.rewriter
        if rw._need_rebase:
            seq, ts = rw.map(packet.seq, packet.ts, now)
        else:  # SequenceRewriter.map without the rebase, inlined: this runs per consumer
            seq = (packet.seq + rw._seq_delta) & 0xFFFF
            ts = (packet.ts + rw._ts_delta) & 0xFFFFFFFF
            if ((seq - rw.last_seq) & 0xFFFF) < 0x8000:
                rw.last_seq = seq
                rw.last_ts = ts
                rw.last_wall = now
        payload = packet.payload
        self.sink(self.writer.packet(packet.marker, seq, ts, shared_ext, payload))  # type: ignore[misc]
        stats = self.stats
        stats.packets += 1
        stats.bytes += len(payload)

    def _update_gate(self) -> None:
        # One flag on the hot path instead of three checks.
        self._gated = self.sink is None or self.paused or self.waiting_keyframe
        if not self._gated and self._created_at:  # forwarding starts with the next packet
            self.producer.router.node.timing("first_packet", time.time() - self._created_at)
            self._created_at = 0.0

    def _pass_gate(self, packet: CachedPacket) -> bool:
        if self.sink is None or self.paused:
            return False
        if self.waiting_keyframe:
            if not packet.keyframe:
                return False
            self.waiting_keyframe = False
            self.rewriter.rebase()
        self._update_gate()
        return True

    def switch_to(self, producer: Producer, now: float | None = None) -> None:
        """Continue on ``producer``, another incarnation of the same track (its publisher
        moved): same SSRC and continuous sequence numbers and timestamps for the subscriber,
        video resuming at the new producer's next keyframe."""
        if producer is self.producer or self.closed:
            return
        if self in self.producer.consumers:
            self.producer.consumers.remove(self)
        self._end_frame(self.producer)
        self.producer = producer
        producer.consumers.append(self)
        self.rewriter.rebase()
        if producer.is_video:
            self.waiting_keyframe = True
            if self.sink is not None and not self.paused:
                producer.request_keyframe(now)
        self._update_gate()

    def handle_nack(self, lost: list[int]) -> None:
        """Answer a subscriber's NACK from the producer's cache (as RTX when negotiated)."""
        sink = self.sink
        if sink is None:
            return
        self.stats.nacks += 1
        writer = self.rtx_writer or self.writer
        ext = shared_extensions(
            writer.shared_layout, abs_send_time_now(ntp_time(time.time())), None
        )
        missing: list[int] = []
        for out_seq in lost:
            source_seq = self.rewriter.source_seq(out_seq)
            if source_seq is None:
                continue  # sent before a switch or pause: that source is gone
            src = self.producer.cache.get(source_seq)
            if src is None:
                missing.append(source_seq)
                continue
            seq, ts = self.rewriter.peek(src.seq, src.ts)
            if seq != out_seq:
                continue
            if self.rtx_writer is not None:
                rtx_seq = self.rtx_seq
                self.rtx_seq = (rtx_seq + 1) & 0xFFFF
                data = wrap_rtx(
                    self.rtx_writer.header(src.marker, rtx_seq, ts, ext), seq, src.payload
                )
            else:
                data = self.writer.header(src.marker, seq, ts, ext) + src.payload
            sink(data)
            self.stats.retransmits += 1
        if missing and self.producer.fetch_missing is not None:
            self.producer.fetch_missing(missing)

    def handle_keyframe_request(self) -> None:
        """A subscriber sent PLI/FIR: pass it upstream (rate-limited by the producer)."""
        self.stats.plis += 1
        self.producer.request_keyframe()

    def handle_receiver_report(self, fraction_lost: int, packets_lost: int, jitter: int) -> None:
        """Record what the subscriber reports about this stream."""
        self.stats.fraction_lost = fraction_lost / 256
        self.stats.packets_lost = packets_lost
        self.stats.jitter = jitter / self.producer.codec.clock_rate

    def sender_report(self, now: float) -> tuple[int, int, int, int]:
        """(ntp, rtp timestamp, packet count, octet count) for an RTCP Sender Report."""
        rw = self.rewriter
        if rw.started:
            rtp_ts = (rw.last_ts + int((now - rw.last_wall) * rw.clock_rate)) & 0xFFFFFFFF
        else:
            rtp_ts = rw.last_ts
        return (
            ntp_time(now),
            rtp_ts,
            self.stats.packets & 0xFFFFFFFF,
            self.stats.bytes & 0xFFFFFFFF,
        )

    def _end_frame(self, producer: Producer) -> None:
        """Forwarding of ``producer`` stops here: if its last packet was inside a frame, skip
        one output sequence number, so the subscriber sees that frame as incomplete (and
        drops it) instead of decoding half a frame joined to what comes next."""
        last = producer.last_packet
        if last is not None and not last.marker and self.rewriter.started:
            self.rewriter.skip()

    def pause(self) -> None:
        """Stop forwarding; sequence numbers stay continuous on resume."""
        self.paused = True
        self._end_frame(self.producer)
        self._update_gate()

    def resume(self) -> None:
        """Resume forwarding, starting at the next keyframe for video."""
        if not self.paused:
            return
        self.paused = False
        self.rewriter.rebase()
        if self.producer.is_video:
            self.waiting_keyframe = True
            self.producer.request_keyframe()
        self._update_gate()

    def close(self) -> None:
        """Detach from the producer and notify listeners."""
        if self.closed:
            return
        self.closed = True
        self.sink = None
        self._gated = True
        if self in self.producer.consumers:
            self.producer.consumers.remove(self)
        for listener in self._close_listeners:
            listener(self)
        self._close_listeners.clear()

    def describe(self) -> dict[str, object]:
        """Public description sent to the subscriber."""
        return {
            "consumer_id": self.id,
            "producer_id": self.producer.id,
            "participant_id": self.producer.participant_id,
            "source": self.producer.source,
            "kind": self.kind,
            "mid": self.params.mid,
            "paused": self.paused,
        }


def same_codec(a: CodecInfo, b: CodecInfo) -> bool:
    """Whether a consumer of ``a`` can carry ``b`` without renegotiating."""
    if a.mime_type.lower() != b.mime_type.lower() or a.clock_rate != b.clock_rate:
        return False
    if a.name.upper() == "H264":
        keys = ("packetization-mode", "profile-level-id")
        return all(
            str(a.parameters.get(k, "")).lower()[:4] == str(b.parameters.get(k, "")).lower()[:4]
            for k in keys
        )
    return True


class Router:
    """One room: its producers and consumers."""

    def __init__(self, room: str, node: Node) -> None:
        self.room = room
        self.node = node
        self.producers: dict[str, Producer] = {}
        self.consumers: dict[str, Consumer] = {}

    def add_producer(self, producer: Producer) -> Producer:
        """Register a producer created for this room."""
        self.producers[producer.id] = producer
        producer.on_close(self._forget_producer)
        return producer

    def create_consumer(
        self, producer_id: str, subscriber_id: str, paused: bool = False
    ) -> Consumer:
        """Subscribe ``subscriber_id`` to a producer; refuses if the node is overloaded."""
        producer = self.producers.get(producer_id)
        if producer is None or producer.closed:
            raise SfuError("unknown_producer", f"no producer {producer_id!r} in this room")
        refusal = self.node.admission.admit(producer.stats.packet_rate)
        if refusal is not None:
            self.node.consumers_refused += 1
            raise SfuError("overloaded", f"node refuses new consumers: {refusal}")
        consumer = Consumer(producer, subscriber_id, paused=paused)
        producer.consumers.append(consumer)
        self.consumers[consumer.id] = consumer
        consumer.on_close(self._forget_consumer)
        return consumer

    def _forget_producer(self, producer: Producer) -> None:
        self.producers.pop(producer.id, None)

    def _forget_consumer(self, consumer: Consumer) -> None:
        if self.consumers.pop(consumer.id, None) is not None:
            self.node.admission.release()

    def tick(self, now: float) -> None:
        """Timer work for every producer and consumer."""
        for producer in list(self.producers.values()):
            producer.tick(now)
        for consumer in self.consumers.values():
            consumer.stats.sample(now)

    def close(self) -> None:
        """Close every producer (and so every consumer)."""
        for producer in list(self.producers.values()):
            producer.close()


# The supervisor's node (peer/supervisor.py) is an interpreted subclass.
@mypyc_attr(allow_interpreted_subclasses=True)
class Node:
    """All routers on this node, plus node-wide admission control."""

    def __init__(self, admission: AdmissionPolicy | None = None) -> None:
        self.routers: dict[str, Router] = {}
        self.admission = admission or AdmissionPolicy()
        self.consumers_refused = 0
        # Receives sampled timings ("forward", "first_packet") in seconds; set by monitoring.
        self.timing: Callable[[str, float], None] = lambda name, seconds: None
        # Members over all rooms; room membership lives above the engine (peer.room).
        self.participant_count: Callable[[], int] = lambda: 0

    def router(self, room: str) -> Router:
        """The room's router, created on first use."""
        router = self.routers.get(room)
        if router is None:
            router = self.routers[room] = Router(room, self)
        return router

    def close_router(self, room: str) -> None:
        """Close a room's router and everything in it."""
        router = self.routers.pop(room, None)
        if router is not None:
            router.close()

    def tick(self, now: float) -> None:
        """Timer work for all rooms."""
        for router in list(self.routers.values()):
            router.tick(now)

    def totals(self) -> dict[str, float | int]:
        """Node-wide counters for stats and metrics."""
        producers = [p for r in self.routers.values() for p in r.producers.values()]
        consumers = [c for r in self.routers.values() for c in r.consumers.values()]
        return {
            "rooms": len(self.routers),
            "participants": self.participant_count(),
            "producers": len(producers),
            "consumers": len(consumers),
            "ingress_packets": sum(p.stats.packets for p in producers),
            "egress_packets": sum(c.stats.packets for c in consumers),
            "ingress_bitrate": round(sum(p.stats.bitrate for p in producers)),
            "egress_bitrate": round(sum(c.stats.bitrate for c in consumers)),
            "egress_packet_rate": round(sum(c.stats.packet_rate for c in consumers), 1),
        }
