"""Unit tests of the sans-I/O RTP core: rewriting, continuity, keyframes, cache, tokens."""

from __future__ import annotations

import struct

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from common.ratelimit import KeyframeLimiter
from peer.engine import CodecInfo, Consumer, Node, Producer, Router, SfuError
from peer.rtp import (
    URI_ABS_SEND_TIME,
    URI_MID,
    CachedPacket,
    HeaderWriter,
    OutboundParams,
    PacketCache,
    SequenceRewriter,
    is_keyframe_start,
    parse_rtcp_nack_fci,
    shared_extensions,
)
from peer.stats import AdmissionPolicy

SECRET = "unit-secret-0123456789abcdef-0123456789"


def parse(data: bytes, mid_id: int = 1, abs_id: int = 3) -> RtpPacket:
    ext = HeaderExtensionsMap()
    ext.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(id=mid_id, uri=URI_MID),
                RTCRtpHeaderExtensionParameters(id=abs_id, uri=URI_ABS_SEND_TIME),
            ]
        )
    )
    return RtpPacket.parse(data, ext)


def test_header_writer_output_parses_with_rewritten_fields():
    params = OutboundParams(
        ssrc=0xDEADBEEF, payload_type=97, mid="3", mid_ext_id=1, abs_send_time_ext_id=3
    )
    writer = HeaderWriter(params)
    ext = shared_extensions(writer.shared_layout, 0x123456, None)
    data = writer.header(1, 65535, 0xFFFFFFFF, ext) + b"payload"
    packet = parse(data)
    assert packet.ssrc == 0xDEADBEEF and packet.payload_type == 97
    assert packet.sequence_number == 65535 and packet.timestamp == 0xFFFFFFFF
    assert packet.marker == 1
    assert packet.extensions.mid == "3"
    assert packet.extensions.abs_send_time == 0x123456
    assert packet.payload == b"payload"


def test_header_writer_without_extensions():
    writer = HeaderWriter(OutboundParams(ssrc=5, payload_type=111))
    data = writer.header(0, 1, 2, b"") + b"x"
    packet = RtpPacket.parse(data)
    assert (packet.ssrc, packet.payload_type, packet.sequence_number, packet.timestamp) == (
        5,
        111,
        1,
        2,
    )
    assert len(data) == 13


def test_sequence_rewriter_continuous_across_switch_and_wrap():
    rw = SequenceRewriter(90000, initial_seq=65534, initial_ts=100)
    assert rw.map(1000, 5000, now=0.0) == (65534, 100)
    assert rw.map(1001, 8000, now=0.033) == (65535, 3100)
    assert rw.map(1002, 11000, now=0.066) == (0, 6100)  # wraps
    rw.rebase()  # switch to another source with unrelated numbering
    seq, ts = rw.map(40000, 777, now=1.066)
    assert seq == 1
    assert ts == (6100 + 90000) & 0xFFFFFFFF  # advanced by one second of wall clock
    assert rw.source_seq(1) == 40000
    # A retransmission of an older packet does not move "last" back.
    rw.map(39999, 0, now=1.1)
    assert rw.last_seq == 1


def vp8_payload(keyframe: bool, start: bool = True, picture_id: int | None = 300) -> bytes:
    b0 = 0x10 if start else 0
    if picture_id is None:
        return bytes([b0]) + bytes([0x00 if keyframe else 0x01]) + b"\x00" * 10
    return (
        bytes([0x80 | b0, 0x80])
        + struct.pack("!H", 0x8000 | picture_id)
        + bytes([0x00 if keyframe else 0x01])
        + b"\x00" * 10
    )


def test_keyframe_detection():
    assert is_keyframe_start("VP8", vp8_payload(True))
    assert is_keyframe_start("VP8", vp8_payload(True, picture_id=None))
    assert not is_keyframe_start("VP8", vp8_payload(False))
    assert not is_keyframe_start("VP8", vp8_payload(True, start=False))
    assert not is_keyframe_start("VP8", b"")
    assert is_keyframe_start("H264", bytes([0x65, 0x88]))  # IDR slice
    assert is_keyframe_start("H264", bytes([0x67, 0x42]))  # SPS
    assert not is_keyframe_start("H264", bytes([0x41, 0x9A]))  # non-IDR
    stap = (
        bytes([0x18])
        + struct.pack("!H", 2)
        + bytes([0x67, 0x42])
        + struct.pack("!H", 2)
        + bytes([0x68, 0xCE])
    )
    assert is_keyframe_start("H264", stap)
    assert is_keyframe_start("H264", bytes([0x7C, 0x85]))  # FU-A start of IDR
    assert not is_keyframe_start("H264", bytes([0x7C, 0x05]))  # FU-A continuation
    assert is_keyframe_start("opus", b"\x01")


def test_packet_cache_returns_exact_sequence_only():
    cache = PacketCache(8)
    cache.put(CachedPacket(3, 0, 0, b"a", False, None))
    cache.put(CachedPacket(11, 0, 0, b"b", False, None))  # same slot, evicts 3
    assert cache.get(3) is None
    assert cache.get(11).payload == b"b"
    with pytest.raises(ValueError):
        PacketCache(1000)


def test_nack_fci():
    fci = struct.pack("!HH", 100, 0b101)
    assert parse_rtcp_nack_fci(fci) == [100, 101, 103]


def test_keyframe_limiter_holds_and_releases():
    lim = KeyframeLimiter(0.5)
    assert lim.request(0.0)
    assert not lim.request(0.1)
    assert not lim.poll(0.3)
    assert lim.poll(0.6)
    assert not lim.poll(0.7)


def test_admission_refuses_before_overload():
    node = Node(AdmissionPolicy(max_consumers=2, max_cpu=0.8))
    router = node.router("r")
    producer = router.add_producer(
        Producer(router, "p", "audio", CodecInfo("audio/opus", 48000, 2))
    )
    router.create_consumer(producer.id, "s1")
    node.admission.update(0.9, 0, 1)
    with pytest.raises(SfuError) as info:
        router.create_consumer(producer.id, "s2")
    assert info.value.code == "overloaded"
    node.admission.update(0.1, 0, 2)
    with pytest.raises(SfuError):
        router.create_consumer(producer.id, "s2")
    node.admission.update(0.1, 0, 1)
    router.create_consumer(producer.id, "s2")


def test_producer_fanout_keyframe_gate_and_nack():
    node = Node()
    router = node.router("r")
    producer = router.add_producer(Producer(router, "p", "video", CodecInfo("video/VP8", 90000)))
    sent: list[bytes] = []
    consumer = router.create_consumer(producer.id, "s")
    consumer.attach(OutboundParams(ssrc=42, payload_type=97), sent.append)
    producer.receive(10, 1000, 1, vp8_payload(False), now=1.0)
    assert sent == []  # waits for a keyframe
    producer.receive(11, 4000, 0, vp8_payload(True), now=1.1)
    producer.receive(12, 4000, 1, vp8_payload(False, start=False), now=1.1)
    assert len(sent) == 2
    first, second = RtpPacket.parse(sent[0]), RtpPacket.parse(sent[1])
    assert first.ssrc == 42 and second.sequence_number == (first.sequence_number + 1) & 0xFFFF
    consumer.handle_nack([first.sequence_number])
    assert RtpPacket.parse(sent[-1]).payload == first.payload
    producer.close()
    assert consumer.closed and not router.consumers


def _video_router() -> tuple[Producer, list[float], list[bytes]]:
    node = Node()
    router = node.router("r")
    producer = router.add_producer(
        Producer(router, "p", "video", CodecInfo("video/VP8", 90000), keyframe_request_delay=0.5)
    )
    asked: list[float] = []
    producer.send_keyframe_request = lambda: asked.append(clock[0])
    return producer, asked, []


clock = [0.0]


def _run(producer: Producer, start: float, end: float) -> None:
    t = start
    while t < end - 1e-9:
        clock[0] = t
        producer.tick(t)
        t = round(t + 0.1, 3)


def test_waiting_consumers_get_keyframe_requests_until_one_is_forwarded():
    producer, asked, sent = _video_router()
    # Three consumers created at once, attached at once (one negotiation): one request.
    consumers = [producer.router.create_consumer(producer.id, f"s{i}") for i in range(3)]
    clock[0] = 0.0
    for c in consumers:
        c.attach(OutboundParams(ssrc=1, payload_type=97), sent.append, now=0.0)
    assert asked == [0.0]
    # No keyframe arrives (request or keyframe lost, publisher not sending yet): the
    # producer asks again once per keyframe-request interval, never faster.
    _run(producer, 0.1, 2.05)
    assert asked == [0.0, 0.5, 1.0, 1.5, 2.0]
    producer.receive(1, 100, 1, vp8_payload(True), now=2.05)
    assert len(sent) == 3 and not any(c.waiting_keyframe for c in consumers)
    _run(producer, 2.1, 4.0)
    assert asked == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_unattached_consumer_does_not_ask_until_it_can_receive():
    producer, asked, sent = _video_router()
    consumer = producer.router.create_consumer(producer.id, "s")
    _run(producer, 0.0, 1.0)
    assert asked == []  # its transport is not connected: a keyframe now would be wasted
    clock[0] = 1.0
    consumer.attach(OutboundParams(ssrc=1, payload_type=97), sent.append, now=1.0)
    assert asked == [1.0]


def test_request_inside_the_throttle_window_is_held_not_lost():
    producer, asked, sent = _video_router()
    a = producer.router.create_consumer(producer.id, "a")
    b = producer.router.create_consumer(producer.id, "b")
    clock[0] = 0.0
    a.attach(OutboundParams(ssrc=1, payload_type=97), sent.append, now=0.0)
    producer.receive(1, 100, 1, vp8_payload(False), now=0.05)  # no keyframe yet
    clock[0] = 0.2
    b.attach(OutboundParams(ssrc=2, payload_type=97), sent.append, now=0.2)
    assert asked == [0.0]
    _run(producer, 0.3, 0.65)
    assert asked == [0.0, 0.5]  # b's request, held until the window ended


def test_a_consumer_starting_just_after_a_keyframe_gets_it_from_the_cache():
    producer, asked, sent = _video_router()
    clock[0] = 0.0
    a = producer.router.create_consumer(producer.id, "a")
    a.attach(OutboundParams(ssrc=1, payload_type=97), sent.append, now=0.0)
    producer.receive(10, 100, 0, vp8_payload(True), now=0.05)  # keyframe, two packets
    producer.receive(11, 100, 1, vp8_payload(False), now=0.05)
    producer.receive(12, 3100, 1, vp8_payload(False), now=0.08)
    later: list[bytes] = []
    b = producer.router.create_consumer(producer.id, "b")
    b.attach(OutboundParams(ssrc=2, payload_type=97), later.append, now=0.3)
    # b starts at once with the keyframe and what followed, in order; nobody asks again
    assert [p[1] & 0x80 for p in map(bytes, later)] == [0, 0x80, 0x80]
    first = [RtpPacket.parse(p) for p in later]
    assert [(p.sequence_number - first[0].sequence_number) & 0xFFFF for p in first] == [0, 1, 2]
    assert not b.waiting_keyframe and b.stats.keyframes_replayed == 1
    assert asked == [0.0]
    producer.receive(13, 6100, 1, vp8_payload(False), now=0.1)
    assert len(later) == 4  # then live
    # Past the replay window a new consumer asks for a fresh keyframe instead.
    c = producer.router.create_consumer(producer.id, "c")
    clock[0] = 1.55
    c.attach(OutboundParams(ssrc=3, payload_type=97), sent.append, now=0.05 + 1.5)
    assert asked == [0.0, 1.55] and c.waiting_keyframe


def _switchable(source: str) -> tuple[Router, Producer, Consumer, list[bytes]]:
    """A video producer of ``source`` and an attached consumer of it (SSRC 42)."""
    router = Node().router("r")
    old = router.add_producer(
        Producer(router, "p", "video", CodecInfo("video/VP8", 90000), source=source)
    )
    sent: list[bytes] = []
    consumer = router.create_consumer(old.id, "s")
    consumer.attach(OutboundParams(ssrc=42, payload_type=97), sent.append)
    return router, old, consumer, sent


def _incarnation(router: Router, source: str) -> Producer:
    return router.add_producer(
        Producer(router, "p2", "video", CodecInfo("video/VP8", 90000), source=source)
    )


def test_a_switched_consumer_continues_one_stream_and_never_repairs_with_the_new_source():
    router, old, consumer, sent = _switchable("alice/cam")
    old.receive(500, 1000, 1, vp8_payload(True), now=1.0)
    old.receive(501, 4000, 1, vp8_payload(False), now=1.033)
    before = [RtpPacket.parse(p) for p in sent]
    new = _incarnation(router, "alice/cam")
    asked: list[int] = []
    new.send_keyframe_request = lambda: asked.append(1)
    consumer.switch_to(new)
    assert consumer.producer is new and consumer in new.consumers and not old.consumers
    assert asked  # the new incarnation is asked for a keyframe at once
    new.receive(9000, 77, 1, vp8_payload(False), now=1.066)
    assert len(sent) == 2  # waits for the new source's keyframe
    new.receive(9001, 3077, 1, vp8_payload(True), now=1.1)
    new.receive(500, 6077, 1, vp8_payload(False), now=1.133)  # same source seq as an old one
    after = [RtpPacket.parse(p) for p in sent[2:]]
    assert [p.ssrc for p in after] == [42, 42]
    assert after[0].sequence_number == (before[-1].sequence_number + 1) & 0xFFFF
    assert after[0].timestamp > before[-1].timestamp
    count = len(sent)
    consumer.handle_nack([before[0].sequence_number])  # a packet of the old source
    assert len(sent) == count
    consumer.handle_nack([after[0].sequence_number])
    assert RtpPacket.parse(sent[-1]).payload == after[0].payload


def test_nacks_long_after_a_rebase_are_still_answered():
    node = Node()
    router = node.router("r")
    producer = router.add_producer(
        Producer(router, "p", "audio", CodecInfo("audio/opus", 48000, 2))
    )
    sent: list[bytes] = []
    consumer = router.create_consumer(producer.id, "s")
    consumer.attach(OutboundParams(ssrc=7, payload_type=111), sent.append)
    for i in range(70_000):
        producer.receive(i & 0xFFFF, i * 960, 1, b"\x01\x02", now=i * 0.02)
    last = RtpPacket.parse(sent[-1]).sequence_number
    count = len(sent)
    consumer.handle_nack([(last - 5) & 0xFFFF])
    assert len(sent) == count + 1


def test_a_switch_inside_a_frame_leaves_a_hole_so_the_half_frame_is_dropped():
    router, old, consumer, sent = _switchable("a/cam")
    old.receive(10, 1000, 1, vp8_payload(True), now=1.0)
    old.receive(11, 4000, 0, vp8_payload(False), now=1.03)  # first half of a frame
    new = _incarnation(router, "a/cam")
    consumer.switch_to(new)
    new.receive(700, 50, 1, vp8_payload(True), now=1.1)
    seqs = [RtpPacket.parse(p).sequence_number for p in sent]
    assert seqs[2] == (seqs[1] + 2) & 0xFFFF
