"""peer/rtcp.py: the node's RTCP reader and builders, checked against aiortc's RTCP
serializer and parser (an independent implementation), and the shared report schedule."""

from __future__ import annotations

import contextlib
import itertools
import random

import pytest
from aiortc.rtp import (
    RtcpByePacket,
    RtcpPacket,
    RtcpPsfbPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSdesPacket,
    RtcpSenderInfo,
    RtcpSourceInfo,
    RtcpSrPacket,
    pack_remb_fci,
)

from peer.ingress import nack_packet, remb_packet
from peer.rtcp import (
    ReportBlock,
    ReportSchedule,
    RtcpError,
    bye,
    parse_feedback,
    sdes_cnames,
    sender_report,
)


def _block(ssrc: int, lost: int = 3) -> RtcpReceiverInfo:
    return RtcpReceiverInfo(
        ssrc=ssrc, fraction_lost=17, packets_lost=lost, highest_sequence=70000, jitter=90,
        lsr=0x1234, dlsr=0x10000,
    )  # fmt: skip


def _sr(ssrc: int, blocks: list[RtcpReceiverInfo]) -> bytes:
    info = RtcpSenderInfo(
        ntp_timestamp=0x0102030405060708, rtp_timestamp=9, packet_count=10, octet_count=11
    )
    return bytes(RtcpSrPacket(ssrc=ssrc, sender_info=info, reports=blocks))


FIR = bytes([0x84, 206, 0, 4]) + (7).to_bytes(4, "big") + b"\0\0\0\0"
FIR += (0xAA).to_bytes(4, "big") + b"\x05\0\0\0"

CASES = [
    # (name, datagram, expected: reports, sender_reports, nacks, keyframe_requests, rembs)
    (
        "RR with two blocks",
        bytes(RtcpRrPacket(ssrc=1, reports=[_block(0xA), _block(0xB, lost=-2)])),
        [ReportBlock(0xA, 17, 3, 70000, 90, 0x1234, 0x10000),
         ReportBlock(0xB, 17, -2, 70000, 90, 0x1234, 0x10000)],
        [], [], [], [],
    ),
    (
        "SR (NTP time) with a block, then SDES",
        _sr(5, [_block(0xC)])
        + bytes(RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc=5, items=[(1, b"cname")])])),
        [ReportBlock(0xC, 17, 3, 70000, 90, 0x1234, 0x10000)],
        [(5, 0x0102030405060708)], [], [], [],
    ),
    (
        "Generic NACK: PID and BLP",
        bytes(RtcpRtpfbPacket(fmt=1, ssrc=1, media_ssrc=0xD, lost=[10, 11, 14, 100])),
        [], [], [(0xD, [10, 11, 14, 100])], [], [],
    ),
    (
        "our own NACK builder",
        nack_packet(1, 0xD, [10, 12, 40]),
        [], [], [(0xD, [10, 12, 40])], [], [],
    ),
    (
        "our own NACK builder across the sequence wrap",
        nack_packet(1, 0xD, [65534, 65535, 0, 3]),
        [], [], [(0xD, [65534, 65535, 0, 3])], [], [],
    ),
    ("PLI", bytes(RtcpPsfbPacket(fmt=1, ssrc=1, media_ssrc=0xE)), [], [], [], [0xE], []),
    ("FIR: the SSRC in the entry", FIR, [], [], [], [0xAA], []),
    (
        "REMB",
        bytes(RtcpPsfbPacket(fmt=15, ssrc=1, media_ssrc=0, fci=pack_remb_fci(750000, [3, 4]))),
        [], [], [], [], [(750000 - 750000 % 4, [3, 4])],
    ),
    ("our own REMB builder", remb_packet(1, 2_000_000, [6]), [], [], [], [], [(2_000_000, [6])]),
    (
        "BYE and transport-wide feedback are skipped",
        bytes(RtcpByePacket(sources=[1, 2]))
        + bytes([0x8F, 205, 0, 3]) + b"\0\0\0\x01" + b"\0\0\0\x02" + b"\0\0\0\0",
        [], [], [], [], [],
    ),
    (
        "RR then PLI then NACK in one compound",
        bytes(RtcpRrPacket(ssrc=1, reports=[_block(0xA)]))
        + bytes(RtcpPsfbPacket(fmt=1, ssrc=1, media_ssrc=0xA))
        + bytes(RtcpRtpfbPacket(fmt=1, ssrc=1, media_ssrc=0xA, lost=[7])),
        [ReportBlock(0xA, 17, 3, 70000, 90, 0x1234, 0x10000)], [], [(0xA, [7])], [0xA], [],
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "data", "reports", "srs", "nacks", "plis", "rembs"), CASES, ids=[c[0] for c in CASES]
)
def test_parse_feedback(name, data, reports, srs, nacks, plis, rembs):
    fb = parse_feedback(data)
    assert fb.reports == reports
    assert fb.sender_reports == srs
    assert fb.nacks == nacks
    assert fb.keyframe_requests == plis
    assert fb.rembs == rembs


RR = bytes(RtcpRrPacket(ssrc=1, reports=[_block(0xA)]))
MALFORMED = [
    ("empty", b""),
    ("three bytes", b"\x80\xc9\x00"),
    ("version 1", bytes([0x40]) + RR[1:]),
    ("length past the datagram", RR[:2] + b"\x00\x09" + RR[4:]),
    ("RR shorter than its block count", bytes([0x82]) + RR[1:]),
    ("truncated second header", RR + b"\x80\xc9"),
    ("NACK with a half item", bytes([0x81, 205, 0, 3]) + b"\0" * 8 + b"\0\0"),
    ("FIR with a half entry", bytes([0x84, 206, 0, 3]) + b"\0" * 12),
    ("REMB SSRC count past the end", bytes([0x8F, 206, 0, 4]) + b"\0" * 8 + b"REMB\x09\0\0\0"),
    ("padding with a zero count", bytes([0xA0, 201, 0, 1]) + b"\0\0\0\0"),
    ("feedback without a media SSRC", bytes([0x81, 206, 0, 1]) + b"\0" * 4),
]


@pytest.mark.parametrize(("name", "data"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_rtcp_is_an_error(name, data):
    with pytest.raises(RtcpError):
        parse_feedback(data)


def test_random_bytes_raise_rtcp_error_or_parse():
    rng = random.Random(14)
    for _ in range(2000):
        data = bytes([0x80 | rng.randrange(64), rng.choice([200, 201, 205, 206])]) + bytes(
            rng.randrange(256) for _ in range(rng.randrange(0, 60))
        )
        with contextlib.suppress(RtcpError):
            parse_feedback(data)


def test_sender_report_sdes_bye_read_by_aiortc():
    data = (
        sender_report(0xABC, 0x1122334455667788, 1234, 50, 60000)
        + sender_report(0xDEF, 1, 2, 3, 4)
        + sdes_cnames([(0xABC, b"node"), (0xDEF, b"a-longer-cname")])
        + bye(0xABC)
    )
    sr1, sr2, sdes, bye_packet = RtcpPacket.parse(data)
    assert isinstance(sr1, RtcpSrPacket) and sr1.ssrc == 0xABC and not sr1.reports
    info = sr1.sender_info
    assert (info.ntp_timestamp, info.rtp_timestamp, info.packet_count, info.octet_count) == (
        0x1122334455667788,
        1234,
        50,
        60000,
    )
    assert isinstance(sr2, RtcpSrPacket) and sr2.ssrc == 0xDEF
    assert isinstance(sdes, RtcpSdesPacket)
    assert [(c.ssrc, c.items) for c in sdes.chunks] == [
        (0xABC, [(1, b"node")]),
        (0xDEF, [(1, b"a-longer-cname")]),
    ]
    assert isinstance(bye_packet, RtcpByePacket) and bye_packet.sources == [0xABC]
    assert parse_feedback(data).sender_reports == [(0xABC, 0x1122334455667788), (0xDEF, 1)]


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 255, 300])
def test_sdes_chunk_ends_with_a_null_item_and_pads_to_32_bits(length):
    data = sdes_cnames([(7, b"x" * length)])
    assert len(data) % 4 == 0
    (sdes,) = RtcpPacket.parse(data)
    assert sdes.chunks[0].items == [(1, b"x" * min(length, 255))]


def test_report_schedule_randomises_and_batches():
    schedule: ReportSchedule[str] = ReportSchedule(interval=1.0, slack=0.05, rng=random.Random(1))
    assert schedule.deadline() is None and schedule.poll(0.0) == []
    for name in "abcd":
        schedule.add(name, 0.0)
    first = schedule.deadline()
    assert first is not None and 0.5 <= first <= 1.5
    sent: dict[str, list[float]] = {name: [] for name in "abcd"}
    now = 0.0
    polls = 0
    while now < 20.0:
        deadline = schedule.deadline()
        assert deadline is not None
        now = max(now, deadline)
        polls += 1
        for name in schedule.poll(now):
            sent[name].append(now)
    for times in sent.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.45 <= g <= 1.55 for g in gaps)
        assert 13 <= len(times) <= 40
    assert polls <= sum(len(t) for t in sent.values())
    schedule.discard("a")
    assert "a" not in schedule and len(schedule) == 3
