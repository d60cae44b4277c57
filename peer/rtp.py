"""Sans-I/O RTP forwarding primitives: keyframe detection, per-consumer header
rewriting, sequence/timestamp continuity, RTX wrapping and the packet cache.

Nothing here touches sockets or asyncio; everything is plain data in, bytes out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_VERSION_EXT = 0x90  # V=2, P=0, X=1, CC=0
RTP_VERSION_NOEXT = 0x80

URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
URI_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"

_FIXED = struct.Struct("!BBHI")
_SEQ = struct.Struct("!H")


def is_keyframe_start(codec_name: str, payload: bytes) -> bool:
    """True if this RTP payload starts a keyframe (VP8 key frame, H.264 IDR/SPS)."""
    if not payload:
        return False
    name = codec_name.upper()
    if name == "VP8":
        return _vp8_keyframe_start(payload)
    if name == "H264":
        return _h264_keyframe(payload)
    return True  # audio and unknown codecs: every packet is a valid start


def _vp8_keyframe_start(payload: bytes) -> bool:
    # RFC 7741 payload descriptor, then the VP8 payload header (P bit 0 = key frame).
    b0 = payload[0]
    if not (b0 & 0x10) or (b0 & 0x0F) != 0:  # S bit set and partition 0
        return False
    pos = 1
    if b0 & 0x80:
        if len(payload) < 2:
            return False
        x = payload[1]
        pos = 2
        if x & 0x80:  # I: picture id
            if len(payload) <= pos:
                return False
            pos += 2 if payload[pos] & 0x80 else 1
        if x & 0x40:  # L: TL0PICIDX
            pos += 1
        if x & 0x30:  # T or K
            pos += 1
    if len(payload) <= pos:
        return False
    return (payload[pos] & 0x01) == 0


def _h264_keyframe(payload: bytes) -> bool:
    nal_type = payload[0] & 0x1F
    if nal_type in (5, 7):  # IDR slice, SPS
        return True
    if nal_type == 24:  # STAP-A: scan aggregated NAL units
        pos = 1
        while pos + 2 < len(payload):
            size = (payload[pos] << 8) | payload[pos + 1]
            if payload[pos + 2] & 0x1F in (5, 7):
                return True
            pos += 2 + size
        return False
    if nal_type == 28 and len(payload) > 1:  # FU-A start fragment of an IDR
        return bool(payload[1] & 0x80) and (payload[1] & 0x1F) == 5
    return False


@dataclass(frozen=True, slots=True)
class OutboundParams:
    """What a subscriber negotiated for one consumer: SSRCs, payload types, extension ids."""

    ssrc: int
    payload_type: int
    mid: str | None = None
    mid_ext_id: int | None = None
    abs_send_time_ext_id: int | None = None
    audio_level_ext_id: int | None = None
    rtx_ssrc: int | None = None
    rtx_payload_type: int | None = None


class HeaderWriter:
    """Builds RTP headers for one consumer.

    The part of the extension block that is the same for every consumer of a
    packet (abs-send-time, audio level) is built once per packet by
    :func:`shared_extensions`; the per-consumer part (mid and padding) is
    precomputed here so that rewriting costs one ``struct.pack`` and two joins.
    """

    __slots__ = ("_b0", "_pt", "_suffix", "params", "shared_layout")

    def __init__(self, params: OutboundParams) -> None:
        self.params = params
        self._pt = params.payload_type & 0x7F
        # shared_layout tells the caller which shared elements to put in the packet.
        self.shared_layout = (params.abs_send_time_ext_id, params.audio_level_ext_id)
        shared_len = (4 if params.abs_send_time_ext_id else 0) + (
            2 if params.audio_level_ext_id else 0
        )
        own = b""
        if params.mid_ext_id and params.mid:
            mid = params.mid.encode()[:16]
            own = bytes([(params.mid_ext_id << 4) | (len(mid) - 1)]) + mid
        total = len(own) + shared_len
        if total == 0:
            self._b0 = RTP_VERSION_NOEXT
            self._suffix = struct.pack("!I", params.ssrc)
        else:
            pad = (-total) % 4
            words = (total + pad) // 4
            self._b0 = RTP_VERSION_EXT
            self._suffix = struct.pack("!IHH", params.ssrc, 0xBEDE, words) + own + b"\x00" * pad

    def packet(self, marker: int, seq: int, ts: int, shared_ext: bytes, payload: bytes) -> bytes:
        """A whole outgoing packet: header, extensions and payload in one allocation."""
        fixed = _FIXED.pack(self._b0, (marker << 7) | self._pt, seq, ts)
        if self._b0 == RTP_VERSION_NOEXT:
            return b"".join((fixed, self._suffix, payload))
        return b"".join((fixed, self._suffix, shared_ext, payload))

    def header(self, marker: int, seq: int, ts: int, shared_ext: bytes) -> bytes:
        """Header bytes (fixed header + extension block) for one outgoing packet."""
        if self._b0 == RTP_VERSION_NOEXT:
            return _FIXED.pack(self._b0, (marker << 7) | self._pt, seq, ts) + self._suffix
        return _FIXED.pack(self._b0, (marker << 7) | self._pt, seq, ts) + self._suffix + shared_ext


def shared_extensions(
    layout: tuple[int | None, int | None], abs_send_time: int, audio_level: int | None
) -> bytes:
    """Extension elements every consumer with the same ids shares for one packet."""
    abs_id, level_id = layout
    out = b""
    if abs_id:
        out += bytes([(abs_id << 4) | 2]) + (abs_send_time & 0xFFFFFF).to_bytes(3, "big")
    if level_id:
        out += bytes([(level_id << 4) | 0, (audio_level if audio_level is not None else 127)])
    return out


def abs_send_time_now(ntp_time: int) -> int:
    """24-bit abs-send-time (6.18 fixed point seconds) from a 64-bit NTP time."""
    return (ntp_time >> 14) & 0xFFFFFF


class SequenceRewriter:
    """Maps a source's (seq, timestamp) into one consumer's continuous output space.

    ``rebase`` is called whenever the source changes (first packet, resume after
    a pause, switch to another producer); the next output packet then follows
    the last one sent, with the timestamp advanced by the wall-clock gap.
    """

    __slots__ = (
        "_first_out",
        "_need_rebase",
        "_seq_delta",
        "_ts_delta",
        "clock_rate",
        "last_seq",
        "last_ts",
        "last_wall",
        "started",
    )

    def __init__(self, clock_rate: int, initial_seq: int, initial_ts: int) -> None:
        self.clock_rate = clock_rate
        self.last_seq = (initial_seq - 1) & 0xFFFF
        self.last_ts = initial_ts & 0xFFFFFFFF
        self.last_wall = 0.0
        self.started = False
        self._seq_delta = 0
        self._ts_delta = 0
        self._need_rebase = True
        self._first_out = 0

    def rebase(self) -> None:
        """Make the next packet continue the output stream (after pause or switch)."""
        self._need_rebase = True

    def skip(self) -> None:
        """Leave one sequence number out of the output (a frame that will never complete)."""
        self.last_seq = (self.last_seq + 1) & 0xFFFF
        self._need_rebase = True

    def map(self, seq: int, ts: int, now: float) -> tuple[int, int]:
        """Output (seq, ts) for a source packet, updating the continuity state."""
        if self._need_rebase:
            self._need_rebase = False
            out_seq = (self.last_seq + 1) & 0xFFFF
            if self.started:
                gap = max(1, int((now - self.last_wall) * self.clock_rate))
                out_ts = (self.last_ts + gap) & 0xFFFFFFFF
            else:
                out_ts = self.last_ts
            self._seq_delta = (out_seq - seq) & 0xFFFF
            self._ts_delta = (out_ts - ts) & 0xFFFFFFFF
            self._first_out = out_seq
            self.started = True
        out_seq = (seq + self._seq_delta) & 0xFFFF
        out_ts = (ts + self._ts_delta) & 0xFFFFFFFF
        # Retransmissions and reordered packets must not move the "last" marker back.
        if ((out_seq - self.last_seq) & 0xFFFF) < 0x8000:
            self.last_seq = out_seq
            self.last_ts = out_ts
            self.last_wall = now
        return out_seq, out_ts

    def source_seq(self, out_seq: int) -> int | None:
        """The source sequence number an output sequence number was mapped from; None for
        one sent before the last rebase (another source, or before a pause)."""
        span = (self.last_seq - self._first_out) & 0xFFFF
        if span >= 0x8000:  # long after the rebase: only recent packets can be asked for
            self._first_out = (self.last_seq - 0x4000) & 0xFFFF
            span = 0x4000
        if ((out_seq - self._first_out) & 0xFFFF) > span:
            return None
        return (out_seq - self._seq_delta) & 0xFFFF

    def peek(self, seq: int, ts: int) -> tuple[int, int]:
        """Output (seq, ts) for an already-forwarded source packet (retransmission)."""
        return (seq + self._seq_delta) & 0xFFFF, (ts + self._ts_delta) & 0xFFFFFFFF


def wrap_rtx(header: bytes, original_seq: int, payload: bytes) -> bytes:
    """RTX packet (RFC 4588): the RTX header followed by OSN and the original payload."""
    return header + _SEQ.pack(original_seq) + payload


@dataclass(slots=True)
class CachedPacket:
    """One received source packet, kept for NACK answers and consumer starts."""

    seq: int
    ts: int
    marker: int
    payload: bytes
    keyframe: bool
    audio_level: int | None


class PacketCache:
    """Ring buffer of the most recent source packets keyed by sequence number."""

    __slots__ = ("_mask", "_slots")

    def __init__(self, size: int = 1024) -> None:
        if size & (size - 1):
            raise ValueError("cache size must be a power of two")
        self._mask = size - 1
        self._slots: list[CachedPacket | None] = [None] * size

    def put(self, packet: CachedPacket) -> None:
        """Store a packet, evicting whatever used its slot."""
        self._slots[packet.seq & self._mask] = packet

    def get(self, seq: int) -> CachedPacket | None:
        """The cached packet with exactly this sequence number, if still held."""
        p = self._slots[seq & self._mask]
        if p is not None and p.seq == seq:
            return p
        return None


def parse_rtcp_nack_fci(fci: bytes) -> list[int]:
    """Lost sequence numbers from a Generic NACK FCI (RFC 4585 6.2.1)."""
    lost: list[int] = []
    for pos in range(0, len(fci) - 3, 4):
        pid, blp = struct.unpack_from("!HH", fci, pos)
        lost.append(pid)
        for i in range(16):
            if blp & (1 << i):
                lost.append((pid + i + 1) & 0xFFFF)
    return lost


def ntp_to_parts(ntp: int) -> tuple[int, int]:
    """Split a 64-bit NTP time into (seconds, fraction)."""
    return (ntp >> 32) & 0xFFFFFFFF, ntp & 0xFFFFFFFF


def ntp_time(unix_time: float) -> int:
    """64-bit NTP timestamp from a Unix time."""
    seconds = unix_time + 2208988800
    return (int(seconds) << 32) | int((seconds % 1) * (1 << 32))


_PLAIN = struct.Struct("!BBHII")


def plain_rtp(packet: CachedPacket, payload_type: int, ssrc: int) -> bytes:
    """A minimal RTP packet (no extensions) for a cached source packet: relay framing."""
    return (
        _PLAIN.pack(
            RTP_VERSION_NOEXT, (packet.marker << 7) | payload_type, packet.seq, packet.ts, ssrc
        )
        + packet.payload
    )


def parse_plain_rtp(data: bytes) -> tuple[int, int, int, bytes]:
    """(seq, timestamp, marker, payload) of an RTP packet; skips CSRCs, extensions, padding."""
    if len(data) < 12 or data[0] >> 6 != 2:
        raise ValueError("not an RTP packet")
    b0, b1, seq, ts, _ssrc = _PLAIN.unpack_from(data)
    pos = 12 + 4 * (b0 & 0x0F)
    if b0 & 0x10:
        if len(data) < pos + 4:
            raise ValueError("truncated RTP extension")
        pos += 4 + 4 * ((data[pos + 2] << 8) | data[pos + 3])
    end = len(data)
    if b0 & 0x20:
        end -= data[-1]
    if pos > end:
        raise ValueError("truncated RTP packet")
    return seq, ts, b1 >> 7, data[pos:end]
