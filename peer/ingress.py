"""Sans-I/O receive side of a published track: what aiortc's receive path did for us, done
in the engine on already-decrypted RTP.

A publisher's packets reach :meth:`IngressStream.receive` as plain RTP bytes (the adapter
did the SRTP); the stream reads only the header fields forwarding needs, unwraps RTX,
keeps RFC 3550 receive statistics, tracks gaps for NACK and hands each media packet to the
producer. RTCP towards the publisher (NACK on a gap, then receiver reports, NACK retries
and REMB from :meth:`IngressStream.poll`) leaves as bytes for the adapter to protect and
send. Time is always passed in; nothing here touches sockets or asyncio.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

# (seq, timestamp, marker, payload, audio level or None): Producer.receive's shape.
PacketHandler = Callable[[int, int, int, bytes, int | None], None]

RTCP_RR = 201
RTCP_RTPFB = 205
RTCP_PSFB = 206
NACK_FMT = 1
REMB_FMT = 15
_RTCP_HEADER = struct.Struct("!BBHI")
_REPORT_BLOCK = struct.Struct("!IIIIII")
_NACK_ITEM = struct.Struct("!HH")


@dataclass(frozen=True, slots=True)
class IngressConfig:
    """What the publisher negotiated for one receiver (from its SDP)."""

    kind: str
    clock_rate: int
    payload_types: frozenset[int]
    # RTX payload type -> the media payload type it repairs (``apt``)
    rtx_payload_types: dict[int, int] = field(default_factory=dict)
    # RTX SSRC -> media SSRC (``a=ssrc-group:FID``), when the publisher announced them
    rtx_ssrcs: dict[int, int] = field(default_factory=dict)
    audio_level_ext_id: int | None = None
    nack: bool = False
    remb: bool = False


class ReceiveStatistics:
    """RFC 3550 receiver statistics of one media SSRC: extended highest sequence number,
    cumulative and interval loss, interarrival jitter (appendix A.1, A.3, A.8)."""

    __slots__ = (
        "base_seq",
        "cycles",
        "expected_prior",
        "jitter_q4",
        "last_transit",
        "max_seq",
        "received",
        "received_prior",
        "started",
    )

    def __init__(self) -> None:
        self.started = False
        self.base_seq = 0
        self.max_seq = 0
        self.cycles = 0
        self.received = 0
        self.expected_prior = 0
        self.received_prior = 0
        self.jitter_q4 = 0  # jitter in clock units, times 16
        self.last_transit: int | None = None

    def update(self, seq: int, ts: int, arrival: int, recovered: bool = False) -> None:
        """Count one packet; ``arrival`` is the arrival time in the stream's clock units.
        A packet recovered by RTX counts as received but not for jitter."""
        self.received += 1
        if not self.started:
            self.started = True
            self.base_seq = self.max_seq = seq
        else:
            delta = (seq - self.max_seq) & 0xFFFF
            if 0 < delta < 0x8000:
                if seq < self.max_seq:
                    self.cycles += 0x10000
                self.max_seq = seq
        if recovered:
            return
        transit = arrival - ts
        last = self.last_transit
        self.last_transit = transit
        if last is not None:
            d = (transit - last) & 0xFFFFFFFF
            if d >= 0x80000000:
                d = 0x100000000 - d
            self.jitter_q4 += d - ((self.jitter_q4 + 8) >> 4)

    @property
    def extended_max(self) -> int:
        """Extended highest sequence number received."""
        return self.cycles + self.max_seq

    @property
    def expected(self) -> int:
        """Packets expected so far (from the first sequence number to the highest)."""
        return self.extended_max - self.base_seq + 1 if self.started else 0

    @property
    def lost(self) -> int:
        """Cumulative packets lost (negative with duplicates), clamped to 24 bits signed."""
        return max(-0x800000, min(self.expected - self.received, 0x7FFFFF))

    @property
    def jitter(self) -> int:
        """Interarrival jitter in clock units."""
        return self.jitter_q4 >> 4

    def fraction_lost(self) -> int:
        """Loss since the previous call, as a fraction of 256 (RFC 3550 A.3)."""
        expected = self.expected
        expected_interval = expected - self.expected_prior
        received_interval = self.received - self.received_prior
        self.expected_prior = expected
        self.received_prior = self.received
        lost_interval = expected_interval - received_interval
        if expected_interval <= 0 or lost_interval <= 0:
            return 0
        return min(255, (lost_interval << 8) // expected_interval)


class NackTracker:
    """Which sequence numbers of one stream are missing, and when to ask for them.

    A gap is NACKed when it is seen (:meth:`add` returns it); :meth:`poll` asks again
    every ``retry_interval`` for what is still missing, at most ``max_tries`` times per
    packet and never for packets older than ``max_age`` seconds or further than
    ``max_missing`` sequence numbers behind: a packet that late is no use to a viewer.
    """

    __slots__ = ("_missing", "max_age", "max_missing", "max_seq", "max_tries", "retry_interval")

    def __init__(
        self,
        retry_interval: float = 0.1,
        max_tries: int = 10,
        max_age: float = 1.0,
        max_missing: int = 512,
    ) -> None:
        self.retry_interval = retry_interval
        self.max_tries = max_tries
        self.max_age = max_age
        self.max_missing = max_missing
        self.max_seq: int | None = None
        # seq -> [first seen missing at, last asked at, times asked]
        self._missing: dict[int, list[float]] = {}

    @property
    def missing(self) -> list[int]:
        """Sequence numbers currently missing, oldest first."""
        return list(self._missing)

    def add(self, seq: int, now: float) -> list[int]:
        """A packet arrived; returns sequence numbers newly found missing (NACK them now)."""
        high = self.max_seq
        if high is None:
            self.max_seq = seq
            return []
        delta = (seq - high) & 0xFFFF
        if delta == 0:
            return []
        if delta >= 0x8000:  # older than the highest: a retransmission or reordering
            self._missing.pop(seq, None)
            return []
        self.max_seq = seq
        if delta == 1:
            return []
        if delta - 1 > self.max_missing:  # the stream jumped: start over, ask for nothing
            self._missing.clear()
            return []
        new = [(high + i) & 0xFFFF for i in range(1, delta)]
        missing = self._missing
        for s in new:
            missing[s] = [now, now, 1.0]
        if len(missing) > self.max_missing:
            for s in list(missing)[: len(missing) - self.max_missing]:
                del missing[s]
        return new

    def repaired(self, seq: int) -> bool:
        """A retransmission of ``seq`` arrived: True if it was missing (and no longer is)."""
        return self._missing.pop(seq, None) is not None

    def poll(self, now: float) -> list[int]:
        """Sequence numbers to NACK again now; forgets those past their tries or age."""
        again: list[int] = []
        expired: list[int] = []
        for seq, entry in self._missing.items():
            first, last, tries = entry
            if now - first > self.max_age or tries >= self.max_tries:
                expired.append(seq)
            elif now - last >= self.retry_interval:
                entry[1] = now
                entry[2] = tries + 1
                again.append(seq)
        for seq in expired:
            del self._missing[seq]
        return again

    def deadline(self) -> float | None:
        """When :meth:`poll` has work next, or None with nothing missing."""
        if not self._missing:
            return None
        return min(e[1] for e in self._missing.values()) + self.retry_interval


class RembPolicy:
    """The bitrate this node tells a video publisher it may send (REMB).

    Loss-based, on what actually arrived: while the publisher's stream loses less than
    2 % the estimate is allowed to grow to 1.5x the received rate (never below
    ``floor``), above 10 % loss it drops to the rate that got through. The publisher's
    own estimator works below this cap.
    """

    __slots__ = ("_bytes", "_window_start", "ceiling", "estimate", "floor")

    def __init__(self, floor: int = 1_000_000, ceiling: int = 10_000_000) -> None:
        self.floor = floor
        self.ceiling = ceiling
        self.estimate = floor
        self._bytes = 0
        self._window_start: float | None = None

    def on_packet(self, size: int, now: float) -> None:
        """Count one received packet's bytes."""
        if self._window_start is None:
            self._window_start = now
        self._bytes += size

    def update(self, now: float, fraction_lost: float) -> int | None:
        """The new estimate in bits/s at a report (None before any packet arrived)."""
        start = self._window_start
        if start is None or now <= start:
            return None
        rate = self._bytes * 8 / (now - start)
        self._bytes = 0
        self._window_start = now
        if fraction_lost > 0.10:
            estimate = rate * (1 - 0.5 * fraction_lost)
        elif fraction_lost < 0.02:
            estimate = max(rate * 1.5, self.floor)
        else:
            estimate = max(rate, self.estimate * 0.95)
        self.estimate = int(min(max(estimate, 30_000), self.ceiling))
        return self.estimate


class IngressStream:
    """One publisher track as the node receives it: demuxed RTP in, media out to the
    producer (``handler``), RTCP feedback out as bytes.

    ``rtcp_ssrc`` is the sender SSRC of our RTCP (the node's receiver SSRC).
    """

    def __init__(
        self,
        config: IngressConfig,
        handler: PacketHandler,
        rtcp_ssrc: int = 0,
        *,
        report_interval: float = 1.0,
        remb: RembPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.rtcp_ssrc = rtcp_ssrc
        self.media_ssrc: int | None = None
        self.stats = ReceiveStatistics()
        self.nack = NackTracker() if config.nack else None
        self.remb = (remb or RembPolicy()) if config.remb else None
        self.report_interval = report_interval
        self._rng = rng or random.Random()
        self._next_report: float | None = None
        self._lsr = 0  # middle 32 bits of the last SR's NTP time
        self._lsr_at = 0.0
        self.rtx_received = 0
        self.rtx_unused = 0  # RTX for packets not missing (any more)
        self.discarded = 0  # not RTP, unknown payload type, RTX without a payload
        self.nacks_sent = 0
        self.rembs_sent = 0
        self.reports_sent = 0
        self.last_fraction_lost = 0

    # -- packets ----------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Take one decrypted RTP packet; returns RTCP to send at once (a NACK on a gap)."""
        n = len(data)
        if n < 12:
            self.discarded += 1
            return []
        b0 = data[0]
        pos = 12 + 4 * (b0 & 0x0F)
        level: int | None = None
        if b0 & 0x10:
            if n < pos + 4:
                self.discarded += 1
                return []
            ext_end = pos + 4 + 4 * ((data[pos + 2] << 8) | data[pos + 3])
            level_id = self.config.audio_level_ext_id
            if level_id is not None and data[pos] == 0xBE and data[pos + 1] == 0xDE:
                level = _one_byte_element(data, pos + 4, min(ext_end, n), level_id)
            pos = ext_end
        end = n - data[-1] if b0 & 0x20 else n
        if pos > end:
            self.discarded += 1
            return []
        pt = data[1] & 0x7F
        marker = data[1] >> 7
        seq = (data[2] << 8) | data[3]
        ts = int.from_bytes(data[4:8], "big")
        ssrc = int.from_bytes(data[8:12], "big")
        config = self.config
        recovered = False
        if pt not in config.payload_types:
            if pt not in config.rtx_payload_types:
                self.discarded += 1
                return []
            # RTX (RFC 4588): the original sequence number, then the original payload
            if end - pos < 2:  # padding-only probe
                self.rtx_received += 1
                return []
            media = config.rtx_ssrcs.get(ssrc, self.media_ssrc)
            if media is None or media != self.media_ssrc:
                self.discarded += 1
                return []
            self.rtx_received += 1
            seq = (data[pos] << 8) | data[pos + 1]
            if self.nack is None or not self.nack.repaired(seq):
                # not a gap we asked for (a duplicate, or one given up on): do not forward
                self.rtx_unused += 1
                return []
            pos += 2
            ssrc = media
            recovered = True
        elif ssrc != self.media_ssrc:
            self._new_media_ssrc(ssrc)
        self.stats.update(seq, ts, int(now * config.clock_rate), recovered)
        if self.remb is not None:
            self.remb.on_packet(n, now)
        out: list[bytes] = []
        if self.nack is not None:
            lost = self.nack.add(seq, now)
            if lost:
                out.append(self._nack_packet(lost))
        self.handler(seq, ts, marker, data[pos:end], level)
        return out

    def _new_media_ssrc(self, ssrc: int) -> None:
        self.media_ssrc = ssrc
        self.stats = ReceiveStatistics()
        if self.nack is not None:
            self.nack = NackTracker(
                self.nack.retry_interval, self.nack.max_tries, self.nack.max_age
            )

    def on_sender_report(self, ssrc: int, ntp_timestamp: int, now: float) -> None:
        """The publisher's Sender Report for ``ssrc`` arrived: LSR/DLSR for our reports."""
        if ssrc == self.media_ssrc:
            self._lsr = (ntp_timestamp >> 16) & 0xFFFFFFFF
            self._lsr_at = now

    # -- timers -----------------------------------------------------------------

    def deadline(self, now: float) -> float:
        """When :meth:`poll` should run next."""
        if self._next_report is None:
            self._next_report = now + self._report_gap()
        due = self._next_report
        if self.nack is not None:
            retry = self.nack.deadline()
            if retry is not None and retry < due:
                due = retry
        return due

    def _report_gap(self) -> float:
        # RFC 3550 6.3.5: randomized over [0.5, 1.5] of the interval
        return self.report_interval * (0.5 + self._rng.random())

    def poll(self, now: float) -> list[bytes]:
        """RTCP due now: NACK retries, and each report interval a receiver report (plus
        REMB for video)."""
        out: list[bytes] = []
        if self.nack is not None:
            again = self.nack.poll(now)
            if again:
                out.append(self._nack_packet(again))
        if self._next_report is None:
            self._next_report = now + self._report_gap()
        elif now >= self._next_report:
            self._next_report = now + self._report_gap()
            if self.media_ssrc is not None and self.stats.started:
                fraction = self.stats.fraction_lost()
                self.last_fraction_lost = fraction
                out.append(self._receiver_report(fraction, now))
                self.reports_sent += 1
                if self.remb is not None:
                    bitrate = self.remb.update(now, fraction / 256)
                    if bitrate is not None:
                        out.append(remb_packet(self.rtcp_ssrc, bitrate, [self.media_ssrc]))
                        self.rembs_sent += 1
        return out

    # -- RTCP -------------------------------------------------------------------

    def _nack_packet(self, lost: list[int]) -> bytes:
        self.nacks_sent += 1
        assert self.media_ssrc is not None
        return nack_packet(self.rtcp_ssrc, self.media_ssrc, lost)

    def _receiver_report(self, fraction: int, now: float) -> bytes:
        assert self.media_ssrc is not None
        stats = self.stats
        dlsr = 0
        if self._lsr:
            delay = now - self._lsr_at
            if 0 < delay < 65536:
                dlsr = int(delay * 65536)
        block = report_block(
            self.media_ssrc,
            fraction,
            stats.lost,
            stats.extended_max,
            stats.jitter,
            self._lsr,
            dlsr,
        )
        return receiver_report(self.rtcp_ssrc, [block])


def _one_byte_element(data: bytes, pos: int, end: int, wanted: int) -> int | None:
    # RFC 8285 one-byte header elements: the ssrc-audio-level byte's low 7 bits.
    while pos < end:
        b = data[pos]
        if b == 0:  # padding
            pos += 1
            continue
        ident = b >> 4
        if ident == 15:
            return None
        length = (b & 0x0F) + 1
        if ident == wanted:
            return data[pos + 1] & 0x7F if pos + 1 < end else None
        pos += 1 + length
    return None


def report_block(
    ssrc: int, fraction: int, lost: int, extended_max: int, jitter: int, lsr: int, dlsr: int
) -> bytes:
    """One RFC 3550 reception report block (24 bytes)."""
    return _REPORT_BLOCK.pack(
        ssrc,
        ((fraction & 0xFF) << 24) | (lost & 0xFFFFFF),
        extended_max & 0xFFFFFFFF,
        jitter & 0xFFFFFFFF,
        lsr & 0xFFFFFFFF,
        dlsr & 0xFFFFFFFF,
    )


def receiver_report(sender_ssrc: int, blocks: list[bytes]) -> bytes:
    """RTCP Receiver Report (PT 201) with up to 31 report blocks."""
    blocks = blocks[:31]
    length = 1 + 6 * len(blocks)
    return _RTCP_HEADER.pack(0x80 | len(blocks), RTCP_RR, length, sender_ssrc) + b"".join(blocks)


def nack_items(lost: list[int]) -> list[tuple[int, int]]:
    """Generic NACK FCI items (PID, BLP) covering ``lost`` (RFC 4585 6.2.1)."""
    items: list[tuple[int, int]] = []
    pid: int | None = None
    blp = 0
    for seq in sorted(set(lost), key=lambda s: (s - lost[0]) & 0xFFFF):
        if pid is not None:
            d = (seq - pid) & 0xFFFF
            if 1 <= d <= 16:
                blp |= 1 << (d - 1)
                continue
            items.append((pid, blp))
        pid, blp = seq, 0
    if pid is not None:
        items.append((pid, blp))
    return items


def nack_packet(sender_ssrc: int, media_ssrc: int, lost: list[int]) -> bytes:
    """RTCP transport feedback: Generic NACK for ``lost`` sequence numbers."""
    fci = b"".join([_NACK_ITEM.pack(pid, blp) for pid, blp in nack_items(lost)[:200]])
    return (
        _RTCP_HEADER.pack(0x80 | NACK_FMT, RTCP_RTPFB, 2 + len(fci) // 4, sender_ssrc)
        + media_ssrc.to_bytes(4, "big")
        + fci
    )


def remb_packet(sender_ssrc: int, bitrate: int, ssrcs: list[int]) -> bytes:
    """RTCP payload-specific feedback: REMB (draft-alvestrand-rmcat-remb) for ``ssrcs``."""
    exponent = 0
    mantissa = max(0, bitrate)
    while mantissa > 0x3FFFF:
        mantissa >>= 1
        exponent += 1
    fci = (
        b"REMB"
        + bytes([len(ssrcs), (exponent << 2) | (mantissa >> 16)])
        + (mantissa & 0xFFFF).to_bytes(2, "big")
        + b"".join([s.to_bytes(4, "big") for s in ssrcs])
    )
    return (
        _RTCP_HEADER.pack(0x80 | REMB_FMT, RTCP_PSFB, 2 + len(fci) // 4, sender_ssrc)
        + b"\x00\x00\x00\x00"
        + fci
    )
