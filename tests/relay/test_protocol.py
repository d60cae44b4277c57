"""Unit tests of the sans-I/O wire format."""

from __future__ import annotations

import struct

import msgspec
import pytest

from relay import protocol as p
from tests.relay.helpers import VP8, make_rtp

ALL: list[p.ControlMessage] = [
    p.Hello(1, b"k" * 32, b"n" * 32, b"s" * 64),
    p.Hello(1, b"k" * 32, b"n" * 32),
    p.Auth(b"s" * 64),
    p.AuthOk(),
    p.Subscribe(7, "producer-1"),
    p.Subscribed(7, 3, "producer-1", "video", dict(VP8)),
    p.ErrorMsg(7, p.ErrorCode.NOT_FOUND, "unknown producer"),
    p.Unsubscribe(3),
    p.KeyframeRequest(3),
    p.Nack(3, [1, 2, 65535]),
    p.ProducerClosed(3),
    p.Heartbeat(5, 123.25),
    p.HeartbeatAck(5, 123.25),
    p.Stats(3, 100, 20000, 1, 2),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_round_trip(msg: p.ControlMessage) -> None:
    dec = p.ControlDecoder()
    assert dec.feed(p.encode_message(msg)) == [msg]


def test_stream_reassembly_byte_by_byte() -> None:
    data = b"".join(p.encode_message(m) for m in ALL)
    dec = p.ControlDecoder()
    out: list[p.ControlMessage] = []
    for i in range(len(data)):
        out.extend(dec.feed(data[i : i + 1]))
    assert out == ALL
    assert dec.messages == len(ALL)


def test_frame_header_is_version_and_length() -> None:
    raw = p.encode_message(p.Unsubscribe(9))
    version, length = struct.unpack_from("!BI", raw)
    assert version == p.PROTOCOL_VERSION
    assert length == len(raw) - p.FRAME_HEADER_SIZE


def test_oversized_frame_raises_before_buffering() -> None:
    dec = p.ControlDecoder()
    with pytest.raises(p.MessageTooLarge) as ei:
        dec.feed(struct.pack("!BI", 1, p.MAX_CONTROL_MESSAGE + 1))
    assert ei.value.code == p.ErrorCode.MESSAGE_TOO_LARGE


def test_encode_refuses_oversized() -> None:
    with pytest.raises(p.MessageTooLarge):
        p.encode_message(p.Subscribed(1, 1, "x", "video", {"blob": b"x" * (p.MAX_CONTROL_MESSAGE)}))


def test_wrong_version_raises() -> None:
    body = msgspec.msgpack.encode(p.Unsubscribe(1))
    with pytest.raises(p.UnsupportedVersion):
        p.ControlDecoder().feed(struct.pack("!BI", 9, len(body)) + body)


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        msgspec.msgpack.encode([99, 1]),  # unknown message type
        msgspec.msgpack.encode([13, "not-an-int"]),  # wrong field type
        msgspec.msgpack.encode([15, 1, list(range(p.MAX_NACK_SEQS + 1))]),  # NACK too long
        msgspec.msgpack.encode([15, 1, [70000]]),  # seq out of range
        msgspec.msgpack.encode([1, 1, b"short", b"n" * 32, b""]),  # bad key length
        msgspec.msgpack.encode({"t": 13}),  # map instead of array
    ],
)
def test_malformed_body_is_skipped_and_counted(body: bytes) -> None:
    dec = p.ControlDecoder()
    good = p.encode_message(p.KeyframeRequest(4))
    out = dec.feed(struct.pack("!BI", 1, len(body)) + body + good)
    assert out == [p.KeyframeRequest(4)]
    assert dec.malformed == 1


def test_decode_body_raises_clear_type() -> None:
    with pytest.raises(p.MalformedMessage):
        p.decode_body(b"\x00garbage")
    assert issubclass(p.MalformedMessage, p.ProtocolError)


def test_datagram_round_trip() -> None:
    rtp = make_rtp(1234)
    data = p.datagram_prefix(0x7EADBEEF) + rtp
    flow, is_rtcp, pkt = p.parse_datagram(data)
    assert (flow, is_rtcp) == (0x7EADBEEF, False)
    assert pkt == rtp
    assert p.rtp_seq(pkt) == 1234


def test_rtcp_datagram_round_trip() -> None:
    sr = bytes([0x80, 200, 0, 6]) + bytes(24)  # an empty sender report
    flow, is_rtcp, pkt = p.parse_datagram(p.datagram_prefix(42, rtcp=True) + sr)
    assert (flow, is_rtcp, pkt) == (42, True, sr)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x01",
        b"\x00\x00\x00\x01" + b"\x80" * 11,  # RTP shorter than 12 bytes
        b"\x80\x00\x00\x01" + b"\x80" * 7,  # RTCP shorter than 8 bytes
        b"\x00\x00\x00\x01" + b"\x00" * 20,
    ],
)
def test_garbage_datagrams_rejected(data: bytes) -> None:
    with pytest.raises(p.MalformedDatagram):
        p.parse_datagram(data)
