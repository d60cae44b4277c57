"""Sans-I/O origin side: the flows one connection serves from local producers.

One :class:`OriginFlows` per connection. SUBSCRIBE opens (or shares) the flow of a local
producer; its packets are tagged with the flow id and queued on the connection as
datagrams; NACKs are answered from the producer's cache and keyframe requests are
rate-limited before they reach the producer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from .config import RelayConfig, RelayCounters
from .flows import KeyframeLimiter, OriginFlowStats
from .protocol import (
    MAX_FLOW_ID,
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
    datagram_prefix,
)
from .source import PacketListener, PendingSource, ProducerLookup, RelaySource

__all__ = ["OriginFlow", "OriginFlows", "OriginOutput"]

log = logging.getLogger(__name__)

#: Control messages an origin handles (sent by the remote side).
ORIGIN_MESSAGES = (Subscribe, Unsubscribe, KeyframeRequest, Nack, Stats)


class OriginOutput(Protocol):
    """Where an :class:`OriginFlows` puts what it sends (its connection)."""

    def send_msg(self, msg: ControlMessage) -> None:
        """Queue one control message."""
        ...

    def send_datagram(self, data: bytes) -> bool:
        """Queue one flow datagram; False if it was dropped (too large, queue full)."""
        ...


class OriginFlow:
    """One producer served on one connection."""

    __slots__ = (
        "flow_id",
        "limiter",
        "listener",
        "prefix",
        "producer_id",
        "rtcp_listener",
        "source",
        "stats",
    )

    def __init__(self, flow_id: int, producer_id: str, source: RelaySource, interval: float):
        self.flow_id = flow_id
        self.producer_id = producer_id
        self.source = source
        self.prefix = datagram_prefix(flow_id)
        self.limiter = KeyframeLimiter(interval)
        self.stats = OriginFlowStats()
        self.listener: PacketListener | None = None
        self.rtcp_listener: PacketListener | None = None


class OriginFlows:
    """The flow table of one connection's origin role.

    ``lookup`` resolves producer ids; ``may_subscribe(peer_key, producer_id)`` is asked
    before a new flow is opened (``peer_key`` is None on an unauthenticated pipe).
    """

    def __init__(
        self,
        out: OriginOutput,
        lookup: ProducerLookup,
        config: RelayConfig,
        counters: RelayCounters,
        may_subscribe: Callable[[bytes | None, str], bool] | None = None,
    ) -> None:
        self.out = out
        self.lookup = lookup
        self.config = config
        self.counters = counters
        self.may_subscribe = may_subscribe
        self.peer_key: bytes | None = None
        self.flows: dict[int, OriginFlow] = {}
        self.by_producer: dict[str, OriginFlow] = {}
        self._next_flow = 1
        self._closed = False

    def on_message(self, msg: ControlMessage, now: float) -> None:
        """A control message from the remote side (one of :data:`ORIGIN_MESSAGES`)."""
        if isinstance(msg, Nack):
            self._on_nack(msg)
        elif isinstance(msg, KeyframeRequest):
            flow = self.flows.get(msg.flow_id)
            if flow is None:
                self.counters.unknown_flow_requests += 1
            elif flow.limiter.allow(now):
                flow.stats.keyframes_forwarded += 1
                flow.source.request_keyframe()
            else:
                flow.stats.keyframes_dropped += 1
        elif isinstance(msg, Subscribe):
            self._on_subscribe(msg)
        elif isinstance(msg, Unsubscribe):
            flow = self.flows.get(msg.flow_id)
            if flow is None:
                self.counters.unknown_flow_requests += 1
            else:
                self._drop_flow(flow)
        elif isinstance(msg, Stats):
            flow = self.flows.get(msg.flow_id)
            if flow is not None:
                flow.stats.remote_packets = msg.packets
                flow.stats.remote_lost = msg.lost
                flow.stats.remote_repaired = msg.repaired
        else:
            self.counters.control_unexpected += 1

    def _permitted(self, producer_id: str) -> bool:
        if self.may_subscribe is None:
            return True
        try:
            return self.may_subscribe(self.peer_key, producer_id)
        except Exception:
            log.exception("relay: may_subscribe callback failed")
            return False

    def _on_subscribe(self, msg: Subscribe) -> None:
        send = self.out.send_msg
        flow = self.by_producer.get(msg.producer_id)
        if flow is None:
            if not self._permitted(msg.producer_id):
                send(ErrorMsg(msg.request_id, ErrorCode.UNAUTHORIZED, "not allowed to pull this"))
                return
            if len(self.flows) >= self.config.max_flows_per_connection:
                send(ErrorMsg(msg.request_id, ErrorCode.TOO_MANY_FLOWS, "too many flows"))
                return
            try:
                found = self.lookup(msg.producer_id)
            except Exception:
                log.exception("relay: producer lookup failed")
                found = None
            if isinstance(found, PendingSource):
                found.when_resolved(lambda source: self._resolved(msg, source))
                return
            self._open_flow(msg, found)
            return
        self._answer(msg, flow)

    def _resolved(self, msg: Subscribe, source: RelaySource | None) -> None:
        """A deferred lookup answered: finish the SUBSCRIBE (unless the connection closed
        meanwhile, or another request opened the flow first)."""
        if self._closed:
            return
        flow = self.by_producer.get(msg.producer_id)
        if flow is not None:
            self._answer(msg, flow)
        else:
            self._open_flow(msg, source)

    def _open_flow(self, msg: Subscribe, source: RelaySource | None) -> None:
        send = self.out.send_msg
        if source is None:
            send(ErrorMsg(msg.request_id, ErrorCode.NOT_FOUND, "unknown producer"))
            return
        if len(self.flows) >= self.config.max_flows_per_connection:
            send(ErrorMsg(msg.request_id, ErrorCode.TOO_MANY_FLOWS, "too many flows"))
            return
        if self._next_flow > MAX_FLOW_ID:
            send(ErrorMsg(msg.request_id, ErrorCode.TOO_MANY_FLOWS, "out of flow ids"))
            return
        flow = OriginFlow(self._next_flow, msg.producer_id, source, self.config.keyframe_interval)
        self._next_flow += 1
        self._answer(msg, flow)

    def _answer(self, msg: Subscribe, flow: OriginFlow) -> None:
        send = self.out.send_msg
        source = flow.source
        try:
            codec = dict(source.codec_params())
            kind = source.kind
        except Exception as exc:
            send(ErrorMsg(msg.request_id, ErrorCode.CODEC_UNAVAILABLE, str(exc)[:200]))
            return
        send(Subscribed(msg.request_id, flow.flow_id, msg.producer_id, kind, codec))
        if flow.listener is None:
            self.flows[flow.flow_id] = flow
            self.by_producer[flow.producer_id] = flow
            flow.listener = self._make_listener(flow)
            source.add_packet_listener(flow.listener)
            add_rtcp = getattr(source, "add_rtcp_listener", None)
            if add_rtcp is not None:
                flow.rtcp_listener = self._make_rtcp_listener(flow)
                add_rtcp(flow.rtcp_listener)
            source.on_close(lambda: self._source_closed(flow))

    def _make_listener(self, flow: OriginFlow) -> PacketListener:
        prefix = flow.prefix
        stats = flow.stats
        send = self.out.send_datagram

        def on_packet(pkt: bytes) -> None:
            if send(prefix + pkt):
                stats.packets += 1
                stats.bytes += len(pkt)
            else:
                stats.dropped += 1

        return on_packet

    def _make_rtcp_listener(self, flow: OriginFlow) -> PacketListener:
        prefix = datagram_prefix(flow.flow_id, rtcp=True)
        send = self.out.send_datagram

        def on_rtcp(pkt: bytes) -> None:
            send(prefix + pkt)

        return on_rtcp

    def _on_nack(self, msg: Nack) -> None:
        flow = self.flows.get(msg.flow_id)
        if flow is None:
            self.counters.unknown_flow_requests += 1
            return
        stats = flow.stats
        stats.nack_requests += 1
        get = flow.source.get_cached_packet
        send = self.out.send_datagram
        for seq in msg.seqs:
            pkt = get(seq)
            if pkt is None:
                stats.nack_misses += 1
            elif send(flow.prefix + pkt):
                stats.retransmits += 1

    def _source_closed(self, flow: OriginFlow) -> None:
        if self.flows.get(flow.flow_id) is flow:
            self._drop_flow(flow)
            lost = bool(getattr(flow.source, "lost", False))
            self.out.send_msg(ProducerClosed(flow.flow_id, lost))

    def _drop_flow(self, flow: OriginFlow) -> None:
        self.flows.pop(flow.flow_id, None)
        self.by_producer.pop(flow.producer_id, None)
        if flow.listener is not None:
            try:
                flow.source.remove_packet_listener(flow.listener)
            except Exception:
                log.exception("relay: remove_packet_listener failed")
            flow.listener = None
        if flow.rtcp_listener is not None:
            try:
                flow.source.remove_rtcp_listener(flow.rtcp_listener)  # type: ignore[attr-defined]
            except Exception:
                log.exception("relay: remove_rtcp_listener failed")
            flow.rtcp_listener = None

    def close(self) -> None:
        """The connection is gone: stop listening to every producer."""
        self._closed = True
        for flow in list(self.flows.values()):
            self._drop_flow(flow)
