"""Sans-I/O flow logic: loss detection, keyframe rate limiting, remote producers.

Time is always passed in (``now``, seconds, any monotonic origin), so everything here is
deterministic and unit-testable without an event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from common.ratelimit import KeyframeLimiter

from .protocol import MAX_NACK_SEQS
from .source import PacketListener

__all__ = [
    "FlowUpstream",
    "KeyframeLimiter",
    "NackTracker",
    "OriginFlowStats",
    "RemoteProducer",
    "RemoteProducerStats",
]

log = logging.getLogger(__name__)


def call_each(callbacks: Iterable[Callable[..., None]], what: str, *args: object) -> None:
    """Call every callback with ``args``; one that raises is logged and does not stop the rest."""
    for cb in list(callbacks):
        try:
            cb(*args)
        except Exception:
            log.exception("%s callback failed", what)


LIVE = "live"
INTERRUPTED = "interrupted"
CLOSED = "closed"


class NackTracker:
    """Detects RTP sequence gaps and decides when to NACK them.

    A gap is NACKed ``reorder_wait`` after it is seen (in case packets are merely
    reordered), then again every ``retry_interval`` up to ``max_retries`` times, after
    which the packets count as :attr:`lost`.  Jumps larger than ``max_gap`` reset the
    tracker (stream restart) instead of NACKing thousands of packets.
    """

    __slots__ = (
        "_highest",
        "duplicates",
        "gaps",
        "lost",
        "max_gap",
        "max_retries",
        "missing",
        "reorder_wait",
        "reordered",
        "repaired",
        "resets",
        "retry_interval",
    )

    def __init__(
        self,
        reorder_wait: float = 0.015,
        retry_interval: float = 0.1,
        max_retries: int = 5,
        max_gap: int = 512,
    ) -> None:
        self.reorder_wait = reorder_wait
        self.retry_interval = retry_interval
        self.max_retries = max_retries
        self.max_gap = max_gap
        self._highest = -1
        #: seq -> [next NACK time, NACKs sent so far]
        self.missing: dict[int, list[float]] = {}
        self.gaps = 0
        self.lost = 0
        self.repaired = 0
        self.reordered = 0
        self.duplicates = 0
        self.resets = 0

    def reset(self) -> None:
        """Forget the sequence state (new flow after a reconnect)."""
        self._highest = -1
        self.missing.clear()

    def on_packet(self, seq: int, now: float) -> int:
        """Record a received sequence number.

        Returns 0 for a new in-order (or forward-jumping) packet, 1 for a packet that was
        missing (:attr:`repaired` if NACKed before, else :attr:`reordered`), 2 for a
        duplicate or stale one (drop it).
        """
        highest = self._highest
        if highest < 0:
            self._highest = seq
            return 0
        diff = (seq - highest) & 0xFFFF
        if diff == 0:
            self.duplicates += 1
            return 2
        if diff < 0x8000:
            if diff > 1:
                if diff - 1 > self.max_gap:
                    self.resets += 1
                    self.missing.clear()
                else:
                    due = now + self.reorder_wait
                    missing = self.missing
                    for i in range(1, diff):
                        missing[(highest + i) & 0xFFFF] = [due, 0.0]
                    self.gaps += diff - 1
            self._highest = seq
            return 0
        # backwards
        entry = self.missing.pop(seq, None)
        if entry is not None:
            if entry[1]:
                self.repaired += 1
            else:
                self.reordered += 1
            return 1
        if 0x10000 - diff > self.max_gap:
            # far behind: the stream restarted with lower numbers
            self.resets += 1
            self.missing.clear()
            self._highest = seq
            return 0
        self.duplicates += 1
        return 2

    def expect(self, seqs: Iterable[int], now: float) -> None:
        """Accept retransmissions of ``seqs`` requested by someone else (not re-NACKed).

        They stay expected for ``2 x retry_interval``; expiring does not count as lost.
        """
        for seq in seqs:
            if seq not in self.missing:
                self.missing[seq] = [now + 2 * self.retry_interval, self.max_retries + 1.0]

    def deadline(self) -> float | None:
        """Earliest time :meth:`poll` has something to do, or None."""
        if not self.missing:
            return None
        return min(entry[0] for entry in self.missing.values())

    def poll(self, now: float) -> list[int]:
        """Sequence numbers to NACK now (retries scheduled, exhausted ones dropped)."""
        out: list[int] = []
        if not self.missing:
            return out
        expired: list[int] = []
        for seq, entry in self.missing.items():
            if entry[0] <= now:
                if entry[1] >= self.max_retries:
                    expired.append(seq)
                    continue
                entry[1] += 1
                entry[0] = now + self.retry_interval
                out.append(seq)
        for seq in expired:
            if self.missing.pop(seq)[1] <= self.max_retries:
                self.lost += 1
        return out


@dataclass(slots=True)
class RemoteProducerStats:
    """Receive-side counters of a :class:`RemoteProducer`."""

    packets: int = 0
    bytes: int = 0
    lost: int = 0
    repaired: int = 0
    reordered: int = 0
    duplicates: int = 0
    nacks_sent: int = 0
    nack_seqs_sent: int = 0
    keyframes_sent: int = 0
    keyframes_coalesced: int = 0
    listener_errors: int = 0
    local_cache_hits: int = 0
    rtcp_packets: int = 0


@dataclass(slots=True)
class OriginFlowStats:
    """Send-side counters of one origin flow (plus the remote's last STATS report)."""

    packets: int = 0
    bytes: int = 0
    dropped: int = 0
    nack_requests: int = 0
    retransmits: int = 0
    nack_misses: int = 0
    keyframes_forwarded: int = 0
    keyframes_dropped: int = 0
    remote_packets: int = 0
    remote_lost: int = 0
    remote_repaired: int = 0


class FlowUpstream(Protocol):
    """What a :class:`RemoteProducer` needs from its link (implemented by the adapter)."""

    def clock(self) -> float:
        """Current time in seconds."""
        ...

    def send_keyframe_request(self, producer: RemoteProducer) -> None:
        """Send KEYFRAME_REQUEST for the producer's current flow (if live)."""
        ...

    def send_nack(self, producer: RemoteProducer, seqs: list[int]) -> None:
        """Send NACK for the producer's current flow (if live)."""
        ...

    def wake_at(self, when: float) -> None:
        """Call :meth:`RemoteProducer.poll` on this producer no later than ``when``."""
        ...

    def listeners_changed(self, producer: RemoteProducer) -> None:
        """The producer's local listener count changed (drives the linger timer)."""
        ...


class RemoteProducer:
    """A producer living on another node, seen through one relay flow.

    The local Router treats it like a local producer: it implements the same interface
    as :class:`relay.RelaySource` (``kind``, ``codec_params``, packet listeners,
    ``request_keyframe``, ``get_cached_packet``, ``on_close``) plus :meth:`nack` for
    sequence numbers the local cache cannot answer.  Packets are the origin's RTP bytes
    (origin SSRC and sequence numbers), delivered in arrival order; repaired packets
    arrive late and out of order, like an RTX retransmission.
    """

    def __init__(
        self,
        producer_id: str,
        kind: str,
        codec: Mapping[str, object],
        upstream: FlowUpstream,
        *,
        keyframe_interval: float = 0.5,
        tracker: NackTracker | None = None,
        cache_size: int = 1024,
    ) -> None:
        if cache_size & (cache_size - 1):
            raise ValueError("cache_size must be a power of two")
        self.producer_id = producer_id
        self._kind = kind
        self._codec: dict[str, object] = dict(codec)
        self._upstream = upstream
        self.flow_id: int | None = None
        self.state = INTERRUPTED
        self.stats = RemoteProducerStats()
        self.tracker = tracker if tracker is not None else NackTracker()
        self.keyframes = KeyframeLimiter(keyframe_interval)
        self._listeners: tuple[PacketListener, ...] = ()
        self._rtcp_listeners: tuple[PacketListener, ...] = ()
        self._close_cbs: list[Callable[[], None]] = []
        #: Closed because its origin went away (a worker died, a link ended) rather than
        #: by the origin closing it: a republished track may follow.
        self.lost = False
        self._state_cbs: list[Callable[[str], None]] = []
        self._cache: list[bytes | None] = [None] * cache_size
        self._mask = cache_size - 1

    # -- RelaySource-compatible surface -------------------------------------------------

    @property
    def kind(self) -> str:
        """``"audio"`` or ``"video"``."""
        return self._kind

    @property
    def closed(self) -> bool:
        """True once the producer is gone for good (origin closed, unsubscribed)."""
        return self.state == CLOSED

    def codec_params(self) -> dict[str, object]:
        """Codec parameters announced by the origin (SUBSCRIBED)."""
        return dict(self._codec)

    @property
    def listener_count(self) -> int:
        """Number of local packet listeners."""
        return len(self._listeners)

    def add_packet_listener(self, cb: PacketListener) -> None:
        """Receive every RTP packet of the flow; the first listener cancels the linger."""
        if cb in self._listeners:
            return
        self._listeners = (*self._listeners, cb)
        self._upstream.listeners_changed(self)

    def remove_packet_listener(self, cb: PacketListener) -> None:
        """Stop receiving; after the last one leaves the flow closes after the linger."""
        if cb not in self._listeners:
            return
        self._listeners = tuple(x for x in self._listeners if x is not cb)
        self._upstream.listeners_changed(self)

    def add_rtcp_listener(self, cb: PacketListener) -> None:
        """Receive the origin producer's RTCP (sender reports), if the origin relays it."""
        if cb not in self._rtcp_listeners:
            self._rtcp_listeners = (*self._rtcp_listeners, cb)

    def remove_rtcp_listener(self, cb: PacketListener) -> None:
        """Stop receiving RTCP."""
        self._rtcp_listeners = tuple(x for x in self._rtcp_listeners if x is not cb)

    def request_keyframe(self) -> None:
        """Ask the origin producer for a keyframe (at most one per interval, coalesced)."""
        if self.state != LIVE:
            self.keyframes.pending = True  # sent once the flow is (re)established
            return
        now = self._upstream.clock()
        if self.keyframes.request(now):
            self.stats.keyframes_sent += 1
            self._upstream.send_keyframe_request(self)
        else:
            self.stats.keyframes_coalesced += 1
            deadline = self.keyframes.deadline()
            if deadline is not None:
                self._upstream.wake_at(deadline)

    def get_cached_packet(self, seq: int) -> bytes | None:
        """The packet with sequence ``seq`` if it is in the local relay cache."""
        pkt = self._cache[seq & self._mask]
        if pkt is not None and ((pkt[2] << 8) | pkt[3]) == seq:
            self.stats.local_cache_hits += 1
            return pkt
        return None

    def nack(self, seqs: Iterable[int]) -> None:
        """Forward a local consumer's NACK upstream for packets not in the local cache.

        The retransmissions are then delivered to the listeners even if the relay had
        already given up on (or never noticed) those packets.
        """
        want = [s & 0xFFFF for s in seqs if self.get_cached_packet(s & 0xFFFF) is None]
        if want and self.state == LIVE:
            want = want[:MAX_NACK_SEQS]
            self.tracker.expect(want, self._upstream.clock())
            self._send_nack(want)

    def on_close(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` once when the producer closes (immediately if already closed)."""
        if self.state == CLOSED:
            cb()
        else:
            self._close_cbs.append(cb)

    def on_state(self, cb: Callable[[str], None]) -> None:
        """Call ``cb(state)`` on ``"live"`` / ``"interrupted"`` / ``"closed"`` changes."""
        self._state_cbs.append(cb)

    # -- driven by the link adapter ----------------------------------------------------

    def on_rtp(self, pkt: bytes, now: float) -> None:
        """A flow packet arrived from the link (hot path)."""
        seq = (pkt[2] << 8) | pkt[3]
        tracker = self.tracker
        verdict = tracker.on_packet(seq, now)
        stats = self.stats
        if verdict == 2:
            stats.duplicates += 1
            return
        stats.packets += 1
        stats.bytes += len(pkt)
        self._cache[seq & self._mask] = pkt
        if verdict == 1:
            stats.repaired = tracker.repaired
            stats.reordered = tracker.reordered
        elif tracker.missing:
            self._upstream.wake_at(now + tracker.reorder_wait)
        for cb in self._listeners:
            try:
                cb(pkt)
            except Exception:
                stats.listener_errors += 1
                if stats.listener_errors < 10:
                    log.exception("relay packet listener failed")

    def on_rtcp(self, pkt: bytes) -> None:
        """An RTCP packet of the flow arrived from the link."""
        self.stats.rtcp_packets += 1
        for cb in self._rtcp_listeners:
            try:
                cb(pkt)
            except Exception:
                self.stats.listener_errors += 1

    def deadline(self) -> float | None:
        """Earliest time :meth:`poll` needs to run, or None."""
        d1 = self.tracker.deadline()
        d2 = self.keyframes.deadline() if self.state == LIVE else None
        if d1 is None:
            return d2
        if d2 is None:
            return d1
        return min(d1, d2)

    def poll(self, now: float) -> None:
        """Send due NACKs and deferred keyframe requests."""
        if self.state != LIVE:
            return
        seqs = self.tracker.poll(now)
        self.stats.lost = self.tracker.lost
        for i in range(0, len(seqs), MAX_NACK_SEQS):
            self._send_nack(seqs[i : i + MAX_NACK_SEQS])
        if self.keyframes.poll(now):
            self.stats.keyframes_sent += 1
            self._upstream.send_keyframe_request(self)

    def _send_nack(self, seqs: list[int]) -> None:
        self.stats.nacks_sent += 1
        self.stats.nack_seqs_sent += len(seqs)
        self._upstream.send_nack(self, seqs)

    def set_live(self, flow_id: int, codec: Mapping[str, object]) -> None:
        """The flow is (re)established with ``flow_id``."""
        self.flow_id = flow_id
        self._codec = dict(codec)
        self.tracker.reset()
        self._set_state(LIVE)
        # a decoder that missed packets during an outage needs a keyframe
        if self.keyframes.pending:
            self.keyframes.pending = False
            self.request_keyframe()

    def set_interrupted(self) -> None:
        """The link went down; the flow will be re-subscribed after reconnecting."""
        if self.state == LIVE:
            self.flow_id = None
            self.keyframes.pending = True
            self._set_state(INTERRUPTED)

    def close(self, lost: bool = False) -> None:
        """Close for good and notify ``on_close`` callbacks (idempotent). ``lost``: the
        producer did not end, its origin went away (:attr:`lost`)."""
        if self.state == CLOSED:
            return
        self.lost = lost
        self.flow_id = None
        self._set_state(CLOSED)
        self._listeners = ()
        self._rtcp_listeners = ()
        cbs, self._close_cbs = self._close_cbs, []
        call_each(cbs, "RemoteProducer on_close")

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        call_each(self._state_cbs, "RemoteProducer on_state", state)

    def __repr__(self) -> str:
        return (
            f"<RemoteProducer {self.producer_id} {self._kind} flow={self.flow_id} "
            f"state={self.state} listeners={len(self._listeners)}>"
        )
