"""The sans-I/O receive side (peer/ingress.py): tables, no event loop."""

from __future__ import annotations

import random
import struct

import pytest
from aiortc.rtp import RtcpPacket, RtcpPsfbPacket, RtcpRrPacket, RtcpRtpfbPacket, unpack_remb_fci

from peer.ingress import (
    IngressConfig,
    IngressStream,
    NackTracker,
    ReceiveStatistics,
    RembPolicy,
    nack_items,
    nack_packet,
    receiver_report,
    remb_packet,
    report_block,
)

VIDEO = IngressConfig(
    kind="video",
    clock_rate=90000,
    payload_types=frozenset({96}),
    rtx_payload_types={97: 96},
    rtx_ssrcs={2222: 1111},
    nack=True,
    remb=True,
)
AUDIO = IngressConfig(
    kind="audio",
    clock_rate=48000,
    payload_types=frozenset({111}),
    audio_level_ext_id=1,
)


def rtp(
    seq: int,
    ts: int = 0,
    *,
    pt: int = 96,
    ssrc: int = 1111,
    marker: int = 0,
    payload: bytes = b"payload",
    csrcs: int = 0,
    ext: bytes | None = None,
    padding: int = 0,
) -> bytes:
    b0 = 0x80 | csrcs | (0x10 if ext is not None else 0) | (0x20 if padding else 0)
    out = struct.pack("!BBHII", b0, (marker << 7) | pt, seq, ts, ssrc)
    out += b"\x00\x00\x00\x07" * csrcs
    if ext is not None:
        ext += b"\x00" * (-len(ext) % 4)
        out += struct.pack("!HH", 0xBEDE, len(ext) // 4) + ext
    out += payload
    if padding:
        out += b"\x00" * (padding - 1) + bytes([padding])
    return out


class Sink:
    def __init__(self) -> None:
        self.packets: list[tuple[int, int, int, bytes, int | None]] = []

    def __call__(self, seq: int, ts: int, marker: int, payload: bytes, level: int | None) -> None:
        self.packets.append((seq, ts, marker, payload, level))


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (rtp(7, 900, marker=1), (7, 900, 1, b"payload", None)),
        (rtp(8, 1, csrcs=2), (8, 1, 0, b"payload", None)),
        (rtp(9, 2, ext=b"\x12abc"), (9, 2, 0, b"payload", None)),
        (rtp(10, 3, padding=5), (10, 3, 0, b"payload", None)),
        (rtp(0xFFFF, 0xFFFFFFFF, ext=b"", padding=1), (0xFFFF, 0xFFFFFFFF, 0, b"payload", None)),
    ],
)
def test_header_fields_forwarding_needs(packet: bytes, expected: tuple[object, ...]) -> None:
    sink = Sink()
    IngressStream(VIDEO, sink).receive(packet, 100.0)
    assert sink.packets == [expected]


@pytest.mark.parametrize(
    ("ext", "level"),
    [
        (b"\x10\xa5", 0x25),  # id 1, one byte: V bit and level 37
        (b"\x00\x00\x10\x05", 5),  # padding bytes before the element
        (b"\x21\x00\x00\x10\x06", 6),  # another element (id 2, two bytes) first
        (b"\x21\x00\x00", None),  # no audio level element
    ],
)
def test_audio_level_is_read(ext: bytes, level: int | None) -> None:
    sink = Sink()
    IngressStream(AUDIO, sink).receive(rtp(1, pt=111, ssrc=5, ext=ext), 1.0)
    assert sink.packets[0][4] == level


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x80" * 11,
        struct.pack("!BBHII", 0x90, 96, 1, 0, 1111) + b"\xbe\xde",  # extension header cut short
        struct.pack("!BBHII", 0x90, 96, 1, 0, 1111) + b"\xbe\xde\x00\x09",  # extension too long
        struct.pack("!BBHII", 0xA0, 96, 1, 0, 1111) + b"\xff",  # padding longer than packet
        struct.pack("!BBHII", 0x8F, 96, 1, 0, 1111),  # 15 CSRCs announced, none there
        rtp(1, pt=100),  # a payload type nobody negotiated
        rtp(1, pt=97, ssrc=2222),  # RTX before any media: nothing to repair
    ],
)
def test_malformed_packets_are_discarded_not_raised(packet: bytes) -> None:
    sink = Sink()
    stream = IngressStream(VIDEO, sink)
    assert stream.receive(packet, 1.0) == []
    assert sink.packets == [] and stream.discarded == 1


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    stream = IngressStream(VIDEO, Sink())
    stream.receive(rtp(1), 0.0)
    for _ in range(5000):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 60)))
        if data:
            data = bytes([0x80 | (data[0] & 0x3F)]) + data[1:]
        stream.receive(data, 1.0)
        stream.poll(rng.random() * 10)


def test_rtx_is_unwrapped_to_the_media_stream_and_fills_the_gap() -> None:
    sink = Sink()
    stream = IngressStream(VIDEO, sink, rtcp_ssrc=42)
    stream.receive(rtp(10, 900), 1.0)
    nacks = stream.receive(rtp(13, 900), 1.01)
    assert len(nacks) == 1
    fb = RtcpPacket.parse(nacks[0])[0]
    assert isinstance(fb, RtcpRtpfbPacket)
    assert (fb.ssrc, fb.media_ssrc, fb.lost) == (42, 1111, [11, 12])
    stream.receive(rtp(500, 900, pt=97, ssrc=2222, payload=b"\x00\x0bagain"), 1.05)
    assert sink.packets[-1] == (11, 900, 0, b"again", None)
    assert stream.nack is not None and stream.nack.missing == [12]
    assert stream.rtx_received == 1
    assert stream.stats.received == 3 and stream.stats.lost == 1
    # an RTX padding probe (no OSN) is not media
    assert stream.receive(rtp(501, 0, pt=97, ssrc=2222, payload=b"", padding=4), 1.06) == []
    assert len(sink.packets) == 3


def test_rtx_from_an_unannounced_ssrc_repairs_the_current_media_ssrc() -> None:
    sink = Sink()
    stream = IngressStream(VIDEO, sink)
    stream.receive(rtp(1, ssrc=77), 0.0)
    stream.receive(rtp(3, ssrc=77), 0.0)
    stream.receive(rtp(9, pt=97, ssrc=78, payload=b"\x00\x02x"), 0.0)
    assert sink.packets[-1][:4] == (2, 0, 0, b"x")


def test_rtx_for_a_packet_not_missing_is_not_forwarded_twice() -> None:
    sink = Sink()
    stream = IngressStream(VIDEO, sink)
    stream.receive(rtp(1), 0.0)
    stream.receive(rtp(2), 0.0)
    stream.receive(rtp(7, pt=97, ssrc=2222, payload=b"\x00\x02late"), 0.1)  # 2 already here
    assert [p[0] for p in sink.packets] == [1, 2]
    assert stream.rtx_unused == 1 and stream.stats.received == 2


@pytest.mark.parametrize(
    ("seqs", "missing"),
    [
        ([1, 2, 3], []),
        ([1, 4], [2, 3]),
        ([1, 4, 2], [3]),
        ([65534, 1], [65535, 0]),  # across the wrap
        ([1, 4, 3, 2], []),
        ([1, 1, 1], []),  # duplicates
        ([1, 1000], []),  # a jump far beyond max_missing: start over
        ([5, 3], []),  # older than the first: reordering, nothing missing
    ],
)
def test_nack_tracker_gaps(seqs: list[int], missing: list[int]) -> None:
    tracker = NackTracker(max_missing=512)
    for seq in seqs:
        tracker.add(seq, 0.0)
    assert tracker.missing == missing


def test_nack_tracker_retries_then_gives_up() -> None:
    tracker = NackTracker(retry_interval=0.1, max_tries=3, max_age=1.0)
    tracker.add(1, 0.0)
    assert tracker.add(3, 0.0) == [2]
    assert tracker.deadline() == pytest.approx(0.1)
    assert tracker.poll(0.05) == []
    assert tracker.poll(0.1) == [2]
    assert tracker.poll(0.15) == []
    assert tracker.poll(0.2) == [2]
    assert tracker.poll(0.3) == []  # third try was the last
    assert tracker.missing == [] and tracker.deadline() is None
    tracker.add(6, 1.0)
    assert tracker.poll(2.5) == [] and tracker.missing == []  # too old to be of use


def test_nack_items_pack_runs_of_sixteen() -> None:
    assert nack_items([5]) == [(5, 0)]
    assert nack_items([5, 6, 21]) == [(5, 0b1000000000000001)]
    assert nack_items([5, 22]) == [(5, 0), (22, 0)]
    assert nack_items([65535, 0, 1]) == [(65535, 0b11)]
    lost = [100, 101, 117, 140, 141]
    parsed = RtcpPacket.parse(nack_packet(1, 2, lost))[0]
    assert isinstance(parsed, RtcpRtpfbPacket) and parsed.lost == lost


@pytest.mark.parametrize(
    ("packets", "expected", "lost", "fraction"),
    [
        (list(range(100)), 100, 0, 0),
        ([s for s in range(100) if s % 4 != 1], 100, 25, 64),
        ([65530, 65531, 65535, 0, 3], 10, 5, 128),  # cycles across the wrap
        ([1, 2, 2, 3], 3, -1, 0),  # a duplicate: negative loss, as RFC 3550 says
    ],
)
def test_receive_statistics(packets: list[int], expected: int, lost: int, fraction: int) -> None:
    stats = ReceiveStatistics()
    for seq in packets:
        stats.update(seq, 0, 0)
    assert stats.expected == expected
    assert stats.lost == lost
    assert stats.fraction_lost() == fraction
    assert stats.fraction_lost() == 0  # nothing new since


def test_jitter_follows_rfc3550() -> None:
    steady, shaky = ReceiveStatistics(), ReceiveStatistics()
    for i in range(200):
        steady.update(i, i * 3000, 1_000_000 + i * 3000)
        shaky.update(i, i * 3000, 1_000_000 + i * 3000 + (900 if i % 2 else 0))
    assert steady.jitter == 0
    assert 800 < shaky.jitter <= 900  # converges on the mean deviation, 900 units
    recovered = ReceiveStatistics()
    recovered.update(1, 0, 0)
    recovered.update(2, 3000, 90000, recovered=True)  # late repair: not jitter
    assert recovered.jitter == 0 and recovered.received == 2


def test_reports_remb_and_lsr_on_the_report_interval() -> None:
    stream = IngressStream(VIDEO, Sink(), rtcp_ssrc=42, rng=random.Random(1))
    for i in range(100):
        if i % 10 != 5:
            stream.receive(rtp(i, i * 3000, payload=b"x" * 1000), i / 100)
    stream.on_sender_report(1111, 0x0001_2345_6789_0000, 0.5)
    stream.poll(1.0)  # starts the report interval: [0.5, 1.5] of a second
    reports: list[tuple[float, list[bytes]]] = []
    for step in range(1, 200):
        now = 1.0 + step / 100
        out = [p for p in stream.poll(now) if p[1] != 205]  # NACK retries aside
        if out:
            reports.append((now, out))
    due, out = reports[0]
    assert 1.5 <= due <= 2.5
    rr, remb = (RtcpPacket.parse(p)[0] for p in out)
    assert isinstance(rr, RtcpRrPacket) and rr.ssrc == 42
    block = rr.reports[0]
    assert (block.ssrc, block.packets_lost, block.highest_sequence) == (1111, 10, 99)
    assert block.fraction_lost == 25  # 10 of 100
    assert block.lsr == 0x2345_6789
    assert block.dlsr == pytest.approx((due - 0.5) * 65536, abs=2)
    assert isinstance(remb, RtcpPsfbPacket) and remb.fmt == 15
    bitrate, ssrcs = unpack_remb_fci(remb.fci)
    assert ssrcs == [1111] and bitrate > 0


def test_audio_gets_reports_but_no_nack_or_remb() -> None:
    stream = IngressStream(AUDIO, Sink(), rtcp_ssrc=3, report_interval=0.1)
    assert stream.receive(rtp(1, pt=111, ssrc=9), 0.0) == []
    assert stream.receive(rtp(5, pt=111, ssrc=9), 0.02) == []
    out = stream.poll(stream.deadline(0.05))
    assert [type(RtcpPacket.parse(p)[0]) for p in out] == [RtcpRrPacket]


@pytest.mark.parametrize(
    ("rate_bytes", "loss", "expected"),
    [
        (250_000, 0.0, 3_000_000),  # 2 Mbit/s, no loss: room to grow by half
        (25_000, 0.0, 1_000_000),  # a slow start never caps below the floor
        (250_000, 0.2, 1_800_000),  # heavy loss: back off below what got through
        (2_500_000, 0.0, 10_000_000),  # the ceiling
    ],
)
def test_remb_policy(rate_bytes: int, loss: float, expected: int) -> None:
    policy = RembPolicy(floor=1_000_000, ceiling=10_000_000)
    assert policy.update(1.0, 0.0) is None
    policy.on_packet(rate_bytes, 0.0)
    assert policy.update(1.0, loss) == expected


def test_rtcp_packing_round_trips_through_aiortc() -> None:
    rr = RtcpPacket.parse(receiver_report(9, [report_block(5, 12, -3, 70000, 44, 1, 2)]))[0]
    assert isinstance(rr, RtcpRrPacket)
    r = rr.reports[0]
    assert (r.ssrc, r.fraction_lost, r.packets_lost, r.highest_sequence) == (5, 12, -3, 70000)
    assert (r.jitter, r.lsr, r.dlsr) == (44, 1, 2)
    remb = RtcpPacket.parse(remb_packet(9, 123_456_789, [1, 2]))[0]
    assert isinstance(remb, RtcpPsfbPacket)
    bitrate, ssrcs = unpack_remb_fci(remb.fci)
    assert ssrcs == [1, 2] and abs(bitrate - 123_456_789) < 123_456_789 / 2**17
