"""Sans-I/O RTCP for the node: the feedback subscribers and publishers send, read from
decrypted bytes without aiortc's object model, and the Sender Reports the node sends, built
as bytes; one schedule for every stream's reports.

:func:`parse_feedback` reads a compound RTCP packet (RFC 3550, 4585, 5104,
draft-alvestrand-rmcat-remb) and keeps only what an SFU acts on: reception report blocks (from
SR and RR), the Sender Report's NTP time, Generic NACK, PLI and FIR, REMB. Everything else
(SDES, BYE, APP, XR, transport-wide feedback) is skipped. Malformed input raises
:class:`RtcpError` and nothing of that datagram is used. Nothing here touches sockets, SRTP
or asyncio; time is passed in.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

RTCP_SR = 200
RTCP_RR = 201
RTCP_SDES = 202
RTCP_BYE = 203
RTCP_RTPFB = 205
RTCP_PSFB = 206
NACK_FMT = 1  # RTPFB
PLI_FMT = 1  # PSFB
FIR_FMT = 4  # PSFB
REMB_FMT = 15  # PSFB (application layer feedback)
SDES_CNAME = 1

_HEADER = struct.Struct("!BBHI")
_SENDER_INFO = struct.Struct("!QIII")
_BLOCK = struct.Struct("!IIIIII")


class RtcpError(ValueError):
    """A datagram that is not well-formed compound RTCP."""


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """One reception report block: what a receiver says about media SSRC ``ssrc``."""

    ssrc: int
    fraction_lost: int  # of 256
    packets_lost: int  # cumulative, signed
    highest_seq: int  # extended
    jitter: int  # clock units
    lsr: int
    dlsr: int


@dataclass(slots=True)
class RtcpFeedback:
    """What the SFU needs from one compound RTCP packet."""

    reports: list[ReportBlock] = field(default_factory=list)
    # (sender SSRC, NTP timestamp) of each Sender Report
    sender_reports: list[tuple[int, int]] = field(default_factory=list)
    # (media SSRC, lost sequence numbers) of each Generic NACK
    nacks: list[tuple[int, list[int]]] = field(default_factory=list)
    # media SSRCs asked for a keyframe (PLI, FIR)
    keyframe_requests: list[int] = field(default_factory=list)
    # (bitrate in bit/s, media SSRCs) of each REMB
    rembs: list[tuple[int, list[int]]] = field(default_factory=list)

    def media_ssrcs(self) -> set[int]:
        """Every media SSRC this feedback is about (report blocks, NACK, PLI/FIR, REMB)."""
        ssrcs = {r.ssrc for r in self.reports}
        ssrcs.update(s for s, _ in self.nacks)
        ssrcs.update(self.keyframe_requests)
        for _, remb_ssrcs in self.rembs:
            ssrcs.update(remb_ssrcs)
        return ssrcs


def parse_feedback(data: bytes) -> RtcpFeedback:
    """Read a (decrypted) compound RTCP packet; raises :class:`RtcpError` if malformed."""
    out = RtcpFeedback()
    n = len(data)
    if n < 4:
        raise RtcpError("RTCP packet too short")
    pos = 0
    while pos < n:
        if n - pos < 4:
            raise RtcpError("truncated RTCP header")
        b0 = data[pos]
        if b0 >> 6 != 2:
            raise RtcpError("RTCP version is not 2")
        pt = data[pos + 1]
        end = pos + 4 + 4 * ((data[pos + 2] << 8) | data[pos + 3])
        if end > n:
            raise RtcpError("RTCP length past the datagram")
        count = b0 & 0x1F
        body = end
        if b0 & 0x20:  # padding: only the last packet may carry it
            if end != n or end - pos < 8 or data[end - 1] == 0:
                raise RtcpError("bad RTCP padding")
            body = end - data[end - 1]
        if pt == RTCP_SR:
            if body - pos < 28 + 24 * count:
                raise RtcpError("SR too short")
            ssrc = int.from_bytes(data[pos + 4 : pos + 8], "big")
            ntp = _SENDER_INFO.unpack_from(data, pos + 8)[0]
            out.sender_reports.append((ssrc, ntp))
            _blocks(data, pos + 28, count, out.reports)
        elif pt == RTCP_RR:
            if body - pos < 8 + 24 * count:
                raise RtcpError("RR too short")
            _blocks(data, pos + 8, count, out.reports)
        elif pt in (RTCP_RTPFB, RTCP_PSFB):
            if body - pos < 12:
                raise RtcpError("feedback message too short")
            media = int.from_bytes(data[pos + 8 : pos + 12], "big")
            fci = pos + 12
            if pt == RTCP_RTPFB and count == NACK_FMT:
                out.nacks.append((media, _nack_lost(data, fci, body)))
            elif pt == RTCP_PSFB and count == PLI_FMT:
                out.keyframe_requests.append(media)
            elif pt == RTCP_PSFB and count == FIR_FMT:
                if (body - fci) % 8:
                    raise RtcpError("FIR entries are 8 bytes")
                for entry in range(fci, body, 8):
                    out.keyframe_requests.append(int.from_bytes(data[entry : entry + 4], "big"))
            elif pt == RTCP_PSFB and count == REMB_FMT and data[fci : fci + 4] == b"REMB":
                out.rembs.append(_remb(data, fci, body))
        pos = end
    return out


def _blocks(data: bytes, pos: int, count: int, out: list[ReportBlock]) -> None:
    for i in range(count):
        ssrc, lost_word, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, pos + 24 * i)
        lost = lost_word & 0xFFFFFF
        if lost & 0x800000:
            lost -= 0x1000000
        out.append(ReportBlock(ssrc, lost_word >> 24, lost, highest, jitter, lsr, dlsr))


def _nack_lost(data: bytes, pos: int, end: int) -> list[int]:
    if (end - pos) % 4:
        raise RtcpError("NACK items are 4 bytes")
    lost: list[int] = []
    for item in range(pos, end, 4):
        pid = (data[item] << 8) | data[item + 1]
        blp = (data[item + 2] << 8) | data[item + 3]
        lost.append(pid)
        bit = 0
        while blp:
            if blp & 1:
                lost.append((pid + bit + 1) & 0xFFFF)
            blp >>= 1
            bit += 1
    return lost


def _remb(data: bytes, pos: int, end: int) -> tuple[int, list[int]]:
    if end - pos < 8:
        raise RtcpError("REMB too short")
    count = data[pos + 4]
    exponent = data[pos + 5] >> 2
    mantissa = ((data[pos + 5] & 0x03) << 16) | (data[pos + 6] << 8) | data[pos + 7]
    if end - pos < 8 + 4 * count:
        raise RtcpError("REMB SSRC list past the packet")
    ssrcs = [int.from_bytes(data[p : p + 4], "big") for p in range(pos + 8, pos + 8 + 4 * count, 4)]
    return mantissa << exponent, ssrcs


# -- what the node sends ---------------------------------------------------------------


def sender_report(
    ssrc: int, ntp: int, rtp_timestamp: int, packet_count: int, octet_count: int
) -> bytes:
    """RTCP Sender Report (PT 200) without report blocks (the node's senders receive
    nothing on that SSRC)."""
    return _HEADER.pack(0x80, RTCP_SR, 6, ssrc) + _SENDER_INFO.pack(
        ntp & 0xFFFFFFFFFFFFFFFF,
        rtp_timestamp & 0xFFFFFFFF,
        packet_count & 0xFFFFFFFF,
        octet_count & 0xFFFFFFFF,
    )


def sdes_cnames(chunks: list[tuple[int, bytes]]) -> bytes:
    """RTCP SDES (PT 202): one CNAME chunk per (SSRC, CNAME), at most 31, each CNAME at
    most 255 bytes."""
    body = b""
    for ssrc, cname in chunks[:31]:
        cname = cname[:255]
        chunk = ssrc.to_bytes(4, "big") + bytes([SDES_CNAME, len(cname)]) + cname
        body += chunk + b"\x00" * (4 - len(chunk) % 4)  # the null item ends it, then pad
    header = bytes([0x80 | min(len(chunks), 31), RTCP_SDES]) + (len(body) // 4).to_bytes(2, "big")
    return header + body


def bye(ssrc: int) -> bytes:
    """RTCP BYE (PT 203) for one source."""
    return _HEADER.pack(0x81, RTCP_BYE, 1, ssrc)


K = TypeVar("K", bound=Hashable)


class ReportSchedule(Generic[K]):
    """When each of many streams sends its next report, on one timer for all of them.

    Each stream reports every ``interval`` randomised over [0.5, 1.5] (RFC 3550 6.3.5);
    :meth:`poll` returns every stream due up to ``slack`` seconds from now, so streams
    whose reports fall close together are served by one wakeup.
    """

    def __init__(
        self, interval: float = 1.0, slack: float = 0.05, rng: random.Random | None = None
    ) -> None:
        self.interval = interval
        self.slack = slack
        self._rng = rng or random.Random()
        self._due: dict[K, float] = {}

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def _gap(self) -> float:
        return self.interval * (0.5 + self._rng.random())

    def add(self, key: K, now: float) -> None:
        """Start reporting for ``key`` (its first report in a randomised interval)."""
        self._due[key] = now + self._gap()

    def discard(self, key: K) -> None:
        """Stop reporting for ``key``."""
        self._due.pop(key, None)

    def deadline(self) -> float | None:
        """When :meth:`poll` has work next (None without streams)."""
        return min(self._due.values()) if self._due else None

    def poll(self, now: float) -> list[K]:
        """The streams due now (each rescheduled one randomised interval later)."""
        limit = now + self.slack
        due = [key for key, at in self._due.items() if at <= limit]
        for key in due:
            self._due[key] = now + self._gap()
        return due
