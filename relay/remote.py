"""Sans-I/O remote side: the flows one node pulls from a peer, across reconnects.

A :class:`RemoteFlows` belongs to one link (a QUIC link to a peer node, or a pipe to a
sibling worker). It outlives the connections beneath it: :meth:`RemoteFlows.attach`
hands it a live connection (every open producer is re-subscribed), :meth:`detach` marks
its producers interrupted. It implements :class:`relay.flows.FlowUpstream` for its
:class:`~relay.flows.RemoteProducer` objects. Time comes from ``clock()`` or is passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from .config import RelayConfig, RelayCounters, RelayError, SubscribeError
from .flows import NackTracker, RemoteProducer
from .protocol import (
    DATAGRAM_HEADER_SIZE,
    RTCP_FLAG,
    ControlMessage,
    ErrorCode,
    ErrorMsg,
    KeyframeRequest,
    Nack,
    ProducerClosed,
    Stats,
    Subscribe,
    Subscribed,
    Unsubscribe,
)

__all__ = ["REMOTE_MESSAGES", "RemoteFlows", "RemoteOutput", "SubscribeResult"]

#: Control messages the remote side handles (sent by the origin).
REMOTE_MESSAGES = (Subscribed, ErrorMsg, ProducerClosed)

#: What :meth:`RemoteFlows.open` reports: the producer, or why it could not be opened.
SubscribeResult = RemoteProducer | RelayError

_ORPHANS = 64


class RemoteOutput(Protocol):
    """Where a :class:`RemoteFlows` sends control messages (its live connection)."""

    def send_msg(self, msg: ControlMessage) -> None:
        """Queue one control message."""
        ...


class RemoteFlows:
    """Subscriptions, remote producers, linger, loss repair and STATS of one link."""

    def __init__(
        self, config: RelayConfig, counters: RelayCounters, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self.counters = counters
        self._clock = clock
        self.conn: RemoteOutput | None = None
        self.producers: dict[str, RemoteProducer] = {}
        self.flows: dict[int, RemoteProducer] = {}
        self.rtt: float | None = None
        #: called when :meth:`deadline` moved earlier (the adapter re-arms its timer)
        self.notify: Callable[[], None] = lambda: None
        self._replies: dict[int, Callable[[Subscribed | ErrorMsg], None]] = {}
        self._next_req = 1
        self._lingers: dict[str, float] = {}
        self._wake_at: float | None = None
        self._stats_due: float | None = None
        self._orphans: deque[tuple[int, bytes, float]] = deque(maxlen=_ORPHANS)

    # -- link lifecycle ---------------------------------------------------------------

    def attach(self, conn: RemoteOutput, now: float) -> None:
        """A connection is live: re-subscribe every open producer over it."""
        self.conn = conn
        self._stats_due = now + self.config.stats_interval
        self._orphans.clear()
        for rp in list(self.producers.values()):
            if not rp.closed:
                self._resubscribe(rp)
        self.notify()

    def detach(self, reason: str) -> None:
        """The connection is gone: pending requests fail, producers are interrupted."""
        self.conn = None
        self._stats_due = None
        self.flows.clear()
        self._orphans.clear()
        replies, self._replies = self._replies, {}
        err = ErrorMsg(0, ErrorCode.SHUTDOWN, f"link down: {reason}")
        for cb in replies.values():
            cb(err)
        for rp in list(self.producers.values()):
            rp.set_interrupted()

    def close(self, lost: bool = False) -> None:
        """Close every remote producer for good (the link closes; ``lost``: it went down
        without being closed, see :attr:`RemoteProducer.lost`)."""
        if self.conn is not None:
            self.detach("link closed")
        for rp in list(self.producers.values()):
            rp.close(lost=lost)
        self.producers.clear()
        self.flows.clear()
        self._lingers.clear()
        self._wake_at = None

    # -- subscriptions ------------------------------------------------------------------

    def open(self, producer_id: str, on_result: Callable[[SubscribeResult], None]) -> bool:
        """Send SUBSCRIBE for ``producer_id``; ``on_result`` gets the shared producer or a
        :class:`SubscribeError`. False (nothing sent) if no connection is live."""

        def on_reply(msg: Subscribed | ErrorMsg) -> None:
            if isinstance(msg, ErrorMsg):
                on_result(SubscribeError(msg.code, msg.reason))
                return
            rp = self.producers.get(producer_id)
            if rp is None or rp.closed:
                rp = self._make_producer(msg)
            self._attach_flow(rp, msg)
            on_result(rp)

        return self._request(producer_id, on_reply)

    def _request(self, producer_id: str, cb: Callable[[Subscribed | ErrorMsg], None]) -> bool:
        conn = self.conn
        if conn is None:
            return False
        req = self._next_req
        self._next_req = (req + 1) & 0xFFFFFFFF or 1
        self._replies[req] = cb
        conn.send_msg(Subscribe(req, producer_id))
        return True

    def _retry_interval(self) -> float:
        cfg = self.config
        if self.rtt is None:
            return max(cfg.nack_retry_interval, 0.1)
        return max(cfg.nack_retry_interval, 1.5 * self.rtt + 0.01)

    def _make_producer(self, msg: Subscribed) -> RemoteProducer:
        cfg = self.config
        tracker = NackTracker(
            reorder_wait=cfg.nack_reorder_wait,
            retry_interval=self._retry_interval(),
            max_retries=cfg.nack_max_retries,
            max_gap=cfg.nack_max_gap,
        )
        rp = RemoteProducer(
            msg.producer_id,
            msg.kind,
            msg.codec,
            self,
            keyframe_interval=cfg.keyframe_interval,
            tracker=tracker,
            cache_size=cfg.remote_cache_size,
        )
        self.producers[msg.producer_id] = rp
        self._arm_linger(rp)
        return rp

    def _attach_flow(self, rp: RemoteProducer, msg: Subscribed) -> None:
        if rp.flow_id is not None:
            self.flows.pop(rp.flow_id, None)
        self.flows[msg.flow_id] = rp
        rp.set_live(msg.flow_id, msg.codec)
        self._replay_orphans(msg.flow_id, rp)

    def _resubscribe(self, rp: RemoteProducer) -> None:
        def on_reply(msg: Subscribed | ErrorMsg) -> None:
            if rp.closed:
                # closed (linger) while the re-SUBSCRIBE was in flight: release the flow
                if isinstance(msg, Subscribed) and self.conn is not None:
                    self.conn.send_msg(Unsubscribe(msg.flow_id))
                return
            if isinstance(msg, Subscribed):
                self._attach_flow(rp, msg)
            elif msg.code != ErrorCode.SHUTDOWN:
                # the producer is gone on the origin
                self._forget(rp)
                rp.close()

        self._request(rp.producer_id, on_reply)

    def _forget(self, rp: RemoteProducer) -> None:
        if rp.flow_id is not None and self.flows.get(rp.flow_id) is rp:
            del self.flows[rp.flow_id]
        if self.producers.get(rp.producer_id) is rp:
            del self.producers[rp.producer_id]
        self._lingers.pop(rp.producer_id, None)

    def _arm_linger(self, rp: RemoteProducer) -> None:
        self._lingers.pop(rp.producer_id, None)
        if rp.listener_count == 0 and not rp.closed:
            when = self._clock() + self.config.linger
            self._lingers[rp.producer_id] = when
            self.wake_at(when)

    # -- input from the connection ---------------------------------------------------

    def on_message(self, msg: ControlMessage, now: float) -> None:
        """A control message from the origin (one of :data:`REMOTE_MESSAGES`)."""
        if isinstance(msg, Subscribed | ErrorMsg):
            cb = self._replies.pop(msg.request_id, None)
            if cb is None:
                self.counters.control_unexpected += 1
            else:
                cb(msg)
        elif isinstance(msg, ProducerClosed):
            rp = self.flows.get(msg.flow_id)
            if rp is None:
                self.counters.unknown_flow_requests += 1
                return
            self._forget(rp)
            rp.close(lost=msg.lost)
        else:
            self.counters.control_unexpected += 1

    def receive_datagram(self, data: bytes, now: float) -> None:
        """One flow datagram (4-byte flow tag + RTP or RTCP) from the origin (hot path)."""
        if len(data) < DATAGRAM_HEADER_SIZE + 12 or (data[4] & 0xC0) != 0x80:
            if len(data) >= DATAGRAM_HEADER_SIZE + 8 and data[0] & 0x80:
                self._on_rtcp(data)  # short RTCP packets (e.g. receiver-report-sized)
            else:
                self.counters.datagrams_malformed += 1
            return
        flow_id = int.from_bytes(data[:4], "big")
        if flow_id & RTCP_FLAG:
            self._on_rtcp(data)
            return
        rp = self.flows.get(flow_id)
        if rp is None:
            self.counters.datagrams_unknown_flow += 1
            # may be a first packet overtaking its SUBSCRIBED answer: keep it briefly
            self._orphans.append((flow_id, data[4:], now))
            return
        rp.on_rtp(data[4:], now)

    def _on_rtcp(self, data: bytes) -> None:
        if (data[4] & 0xC0) != 0x80:
            self.counters.datagrams_malformed += 1
            return
        rp = self.flows.get(int.from_bytes(data[:4], "big") ^ RTCP_FLAG)
        if rp is None:
            self.counters.datagrams_unknown_flow += 1
            return
        rp.on_rtcp(data[4:])

    def _replay_orphans(self, flow_id: int, rp: RemoteProducer) -> None:
        if not self._orphans:
            return
        now = self._clock()
        keep: deque[tuple[int, bytes, float]] = deque(maxlen=_ORPHANS)
        for fid, pkt, at in self._orphans:
            if fid == flow_id and now - at < 1.0:
                self.counters.orphans_replayed += 1
                rp.on_rtp(pkt, now)
            else:
                keep.append((fid, pkt, at))
        self._orphans = keep

    def set_rtt(self, rtt: float) -> None:
        """New smoothed RTT of the link: NACK retries are spaced by it."""
        self.rtt = rtt
        ri = self._retry_interval()
        for rp in self.producers.values():
            rp.tracker.retry_interval = ri

    # -- timers -------------------------------------------------------------------------

    def deadline(self) -> float | None:
        """Earliest time :meth:`poll` has something to do, or None."""
        a, b = self._wake_at, self._stats_due
        if a is None:
            return b
        if b is None:
            return a
        return a if a < b else b

    def poll(self, now: float) -> None:
        """Due NACKs, deferred keyframe requests, lingers and STATS."""
        if self._stats_due is not None and now >= self._stats_due and self.conn is not None:
            self._stats_due = now + self.config.stats_interval
            for rp in self.flows.values():
                if rp.flow_id is not None:
                    s = rp.stats
                    self.conn.send_msg(Stats(rp.flow_id, s.packets, s.bytes, s.lost, s.repaired))
        if self._wake_at is None or now < self._wake_at:
            return
        self._wake_at = None
        nxt: float | None = None
        for rp in list(self.flows.values()):
            d = rp.deadline()
            if d is not None and d <= now + 0.001:
                rp.poll(now)
                d = rp.deadline()
            if d is not None and (nxt is None or d < nxt):
                nxt = d
        if nxt is not None:
            nxt = max(nxt, now + 0.002)
        for pid, when in list(self._lingers.items()):
            if when <= now:
                del self._lingers[pid]
                self._linger_expired(pid)
            elif nxt is None or when < nxt:
                nxt = when
        if nxt is not None and (self._wake_at is None or nxt < self._wake_at):
            self._wake_at = nxt

    def _linger_expired(self, producer_id: str) -> None:
        rp = self.producers.get(producer_id)
        if rp is None or rp.listener_count or rp.closed:
            return
        if rp.flow_id is not None and self.conn is not None:
            self.conn.send_msg(Unsubscribe(rp.flow_id))
        self._forget(rp)
        rp.close()

    # -- FlowUpstream (called by RemoteProducer) -----------------------------------

    def clock(self) -> float:
        """Current time."""
        return self._clock()

    def send_keyframe_request(self, producer: RemoteProducer) -> None:
        """Send KEYFRAME_REQUEST upstream."""
        if self.conn is not None and producer.flow_id is not None:
            self.conn.send_msg(KeyframeRequest(producer.flow_id))

    def send_nack(self, producer: RemoteProducer, seqs: list[int]) -> None:
        """Send NACK upstream."""
        if self.conn is not None and producer.flow_id is not None:
            self.conn.send_msg(Nack(producer.flow_id, seqs))

    def listeners_changed(self, producer: RemoteProducer) -> None:
        """Start or cancel the linger."""
        if self.producers.get(producer.producer_id) is producer:
            self._arm_linger(producer)

    def wake_at(self, when: float) -> None:
        """Run :meth:`poll` no later than ``when``."""
        if self._wake_at is None or when < self._wake_at:
            self._wake_at = when
            self.notify()

    @property
    def live(self) -> bool:
        """True while a connection is attached."""
        return self.conn is not None

    def __len__(self) -> int:
        return len(self.producers)
