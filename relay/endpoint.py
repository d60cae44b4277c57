"""asyncio + aioquic adapter: the relay endpoint, its links and connections.

* :class:`RelayEndpoint` — one per node: a QUIC server (origin side, serves local
  producers to authorised peers) and a factory of :class:`RelayLink` (remote side).
* :class:`RelayLink` — a persistent, authenticated connection to one peer node, with
  heartbeat, dead-link detection, reconnect with backoff and re-subscription. Its
  :meth:`RelayLink.subscribe` returns a shared :class:`~relay.flows.RemoteProducer`.

The protocol logic lives in :mod:`relay.protocol` and :mod:`relay.flows`; this module
only moves bytes, runs timers and maps QUIC events onto them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import auth
from .admission import AdmissionLimits, PendingAdmission
from .flows import LIVE, KeyframeLimiter, NackTracker, OriginFlowStats, RemoteProducer, call_each
from .protocol import (
    ALPN,
    DATAGRAM_HEADER_SIZE,
    MAX_FLOW_ID,
    PROTOCOL_VERSION,
    RTCP_FLAG,
    Auth,
    AuthOk,
    ControlDecoder,
    ControlMessage,
    ErrorCode,
    ErrorMsg,
    Heartbeat,
    HeartbeatAck,
    Hello,
    KeyframeRequest,
    Nack,
    ProducerClosed,
    ProtocolError,
    Stats,
    Subscribe,
    Subscribed,
    Unsubscribe,
    datagram_prefix,
    encode_message,
)
from .source import PacketListener, ProducerLookup, RelaySource

__all__ = [
    "RelayConfig",
    "RelayCounters",
    "RelayEndpoint",
    "RelayError",
    "RelayLink",
    "RelayRefused",
    "SubscribeError",
]

log = logging.getLogger(__name__)

_AUTH_ERRORS = (ErrorCode.UNAUTHORIZED, ErrorCode.AUTH_FAILED, ErrorCode.WRONG_PEER)


@dataclass
class RelayConfig:
    """Tunables of an endpoint (times in seconds)."""

    #: Local address; the server binds it and diallers bind an ephemeral port on it.
    host: str = "127.0.0.1"
    #: UDP port of the QUIC server (0 = ephemeral).
    port: int = 0
    heartbeat_interval: float = 0.5
    #: No control traffic for this long = dead link (connection closed, listeners told).
    dead_after: float = 2.5
    #: Unauthenticated connections: limits, rates and the handshake/auth deadlines.
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    connect_timeout: float = 5.0
    #: Flow kept open this long after the last local listener left.
    linger: float = 2.0
    #: Minimum spacing of keyframe requests per flow (both ends).
    keyframe_interval: float = 0.5
    nack_reorder_wait: float = 0.015
    #: Minimum NACK retry spacing (raised to 1.5 x RTT + 10 ms when the RTT is larger).
    nack_retry_interval: float = 0.05
    nack_max_retries: int = 5
    nack_max_gap: int = 512
    #: Remote-side packet cache per flow (answers local NACKs); power of two.
    remote_cache_size: int = 1024
    reconnect_min: float = 0.2
    reconnect_max: float = 5.0
    #: UDP payload size used by QUIC (loopback/LAN: 1452 fits an Ethernet MTU).
    max_datagram_size: int = 1452
    #: Cap of DATAGRAM frames queued in QUIC (congestion-limited); extra packets dropped.
    max_pending_datagrams: int = 2048
    #: Flush queued DATAGRAM frames to the socket once this many are waiting (bursts);
    #: smaller ones go out at the end of the current event-loop iteration.
    datagram_flush_batch: int = 2
    stats_interval: float = 2.0
    max_flows_per_connection: int = 4096
    #: QUIC idle timeout (backstop; the heartbeat detects death much earlier).
    idle_timeout: float = 10.0


@dataclass
class RelayCounters:
    """Things counted and dropped by an endpoint (all connections, both roles)."""

    datagrams_malformed: int = 0
    datagrams_unknown_flow: int = 0
    datagrams_unexpected: int = 0
    datagrams_too_large: int = 0
    datagrams_queue_full: int = 0
    orphans_replayed: int = 0
    control_malformed: int = 0
    control_unexpected: int = 0
    control_fatal: int = 0
    streams_unexpected: int = 0
    auth_refused: int = 0
    connections_accepted: int = 0
    connections_closed: int = 0
    heartbeat_timeouts: int = 0
    unknown_flow_requests: int = 0


class RelayError(Exception):
    """Base class of relay errors raised to callers."""


class RelayRefused(RelayError):
    """The peer (or this node) refused the connection; ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"relay connection refused ({code}): {reason}")
        self.code = code
        self.reason = reason


class SubscribeError(RelayError):
    """The origin answered SUBSCRIBE with an error."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"subscribe failed ({code}): {reason}")
        self.code = code
        self.reason = reason


class _Conn(QuicConnectionProtocol):
    """Shared part of both connection roles: control stream, heartbeat, teardown."""

    is_client = False

    def __init__(self, quic: QuicConnection, endpoint: RelayEndpoint, **kw: Any) -> None:
        super().__init__(quic, **kw)
        self.endpoint = endpoint
        self.cfg = endpoint.config
        self.counters = endpoint.counters
        self.ctrl_id: int | None = None
        self.decoder = ControlDecoder()
        self.authed = False
        self.dead = False
        self.peer_key: bytes | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.rtt: float | None = None
        self.last_rx = self._loop.time()
        self.started = self._loop.time()
        self.handshake_done = False
        self.dead_event = asyncio.Event()
        #: set once authenticated or dead
        self.settled = asyncio.Event()
        self._hb_seq = 0
        self._hb_handle: asyncio.TimerHandle | None = self._loop.call_later(
            self.cfg.heartbeat_interval, self._tick
        )
        pending = getattr(quic, "_datagrams_pending", None)
        self.dgram_queue: deque[bytes] = pending if isinstance(pending, deque) else deque()
        self.max_payload = self.cfg.max_datagram_size - 64
        self._flush_stalled = False

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        """Feed one UDP datagram to QUIC; once authenticated, batch the ACK/transmit.

        aioquic transmits after every datagram; deferring it with ``call_soon`` lets one
        transmit (and ACK) cover every datagram read in the same loop iteration.
        """
        self._quic.receive_datagram(cast(bytes, data), addr, now=self._loop.time())
        self._process_events()
        if self.authed:
            if self._transmit_task is None:
                self._transmit_task = self._loop.call_soon(self.transmit)
        else:
            self.transmit()

    # -- sending --------------------------------------------------------------------

    def send_msg(self, msg: ControlMessage) -> None:
        """Queue one control message (no-op once the connection is dead)."""
        if self.dead or self.ctrl_id is None:
            return
        self._quic.send_stream_data(self.ctrl_id, encode_message(msg))
        self._transmit_soon()

    def send_datagram(self, data: bytes) -> bool:
        """Queue one DATAGRAM frame; False (counted) if too large or the queue is full."""
        if len(data) > self.max_payload:
            self.counters.datagrams_too_large += 1
            return False
        if len(self.dgram_queue) >= self.cfg.max_pending_datagrams:
            self.counters.datagrams_queue_full += 1
            return False
        self._quic.send_datagram_frame(data)
        if len(self.dgram_queue) >= self.cfg.datagram_flush_batch and not self._flush_stalled:
            # a burst: put what we have on the wire now, so the peer starts on it
            # while we build the rest
            self.transmit()
            if self.dgram_queue:
                # congestion-limited: stop flushing per packet until the next iteration
                self._flush_stalled = True
                self._loop.call_soon(self._unstall)
        elif self._transmit_task is None:
            self._transmit_task = self._loop.call_soon(self.transmit)
        return True

    def _unstall(self) -> None:
        self._flush_stalled = False
        if not self.dead:
            self.transmit()

    # -- events -----------------------------------------------------------------------

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.DatagramFrameReceived):
            if self.authed:
                self.on_datagram(event.data)
            else:
                self.counters.datagrams_unexpected += 1
        elif isinstance(event, events.StreamDataReceived):
            self._on_stream(event)
        elif isinstance(event, events.HandshakeCompleted):
            self.handshake_done = True
            self.on_handshake(event)
        elif isinstance(event, events.ConnectionTerminated):
            self.terminate(event.error_code, event.reason_phrase or "connection closed", False)

    def _on_stream(self, event: events.StreamDataReceived) -> None:
        sid = event.stream_id
        if self.ctrl_id is None and not self.is_client and sid % 4 == 0:
            self.ctrl_id = sid
        if sid != self.ctrl_id:
            self.counters.streams_unexpected += 1
            return
        if self.dead:
            return
        try:
            msgs = self.decoder.feed(event.data)
        except ProtocolError as exc:
            self.counters.control_fatal += 1
            self.abort(exc.code, str(exc))
            return
        finally:
            self.counters.control_malformed += self.decoder.malformed
            self.decoder.malformed = 0
        if event.end_stream and not self.dead:
            self.abort(ErrorCode.PROTOCOL_VIOLATION, "control stream closed")
            return
        if msgs:
            self.last_rx = self._loop.time()
        for msg in msgs:
            if self.dead:
                return
            try:
                if isinstance(msg, Heartbeat):
                    self.send_msg(HeartbeatAck(msg.seq, msg.sent_at))
                elif isinstance(msg, HeartbeatAck):
                    self._rtt_sample(self._loop.time() - msg.sent_at)
                else:
                    self.on_message(msg)
            except Exception:
                log.exception("relay: error handling %s", type(msg).__name__)
                self.counters.control_malformed += 1

    def _rtt_sample(self, sample: float) -> None:
        if sample < 0 or sample > 60:
            return
        self.rtt = sample if self.rtt is None else 0.875 * self.rtt + 0.125 * sample
        self.on_rtt(self.rtt)

    def _tick(self) -> None:
        self._hb_handle = None
        if self.dead:
            return
        now = self._loop.time()
        if not self.authed:
            expired = self.pending_expired(now)
            if expired is not None:
                self.abort(ErrorCode.TIMEOUT, f"{expired} timed out")
                return
        elif now - self.last_rx > self.cfg.dead_after:
            self.counters.heartbeat_timeouts += 1
            self.abort(ErrorCode.HEARTBEAT_TIMEOUT, "no heartbeat from peer")
            return
        if self.authed:
            self._hb_seq += 1
            self.send_msg(Heartbeat(self._hb_seq, now))
            self.on_tick(now)
        self._hb_handle = self._loop.call_later(self.cfg.heartbeat_interval, self._tick)

    def abort(self, code: int, reason: str) -> None:
        """Close the connection with an application error and tear down at once."""
        if self.dead:
            return
        # Strangers that never authenticated are counted, not logged one by one.
        level = logging.INFO if self.authed or self.peer_key else logging.DEBUG
        log.log(level, "relay: closing connection to %s: %s (%d)", self._peer_name(), reason, code)
        self.close(error_code=code, reason_phrase=reason)
        self.terminate(code, reason, True)

    def terminate(self, code: int, reason: str, local: bool) -> None:
        """Mark dead and run role cleanup exactly once."""
        if self.dead:
            return
        self.dead = True
        self.authed = False
        self.close_code = code
        self.close_reason = reason
        self.counters.connections_closed += 1
        if self._hb_handle is not None:
            self._hb_handle.cancel()
            self._hb_handle = None
        self.dead_event.set()
        self.settled.set()
        try:
            self.on_dead(code, reason, local)
        except Exception:
            log.exception("relay: cleanup failed")

    def _peer_name(self) -> str:
        return self.peer_key.hex()[:16] if self.peer_key else "?"

    # -- role hooks -------------------------------------------------------------------

    def pending_expired(self, now: float) -> str | None:
        """Why this not yet authenticated connection is out of time, if it is."""
        limit = self.cfg.admission.auth_timeout
        return "authentication" if now - self.started > limit else None

    def on_handshake(self, event: events.HandshakeCompleted) -> None:
        """TLS handshake completed."""

    def on_message(self, msg: ControlMessage) -> None:
        """A control message other than heartbeats."""

    def on_datagram(self, data: bytes) -> None:
        """A DATAGRAM frame after authentication."""
        self.counters.datagrams_unexpected += 1

    def on_rtt(self, rtt: float) -> None:
        """New smoothed RTT estimate."""

    def on_tick(self, now: float) -> None:
        """Called every heartbeat interval while authenticated."""

    def on_dead(self, code: int, reason: str, local: bool) -> None:
        """The connection is gone."""


class _OriginFlow:
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


class _ServerConn(_Conn):
    """Inbound connection: authenticates the client, then serves it local producers."""

    def __init__(self, quic: QuicConnection, endpoint: RelayEndpoint, **kw: Any) -> None:
        super().__init__(quic, endpoint, **kw)
        self.flows: dict[int, _OriginFlow] = {}
        self.by_producer: dict[str, _OriginFlow] = {}
        self._next_flow = 1
        self._client_nonce = b""
        self._server_nonce = b""
        #: source address, counted by admission until authenticated or closed
        self.source: str | None = endpoint._admitting_source
        endpoint._admitting_source = None
        endpoint.counters.connections_accepted += 1
        endpoint._sessions.add(self)

    def pending_expired(self, now: float) -> str | None:
        expired = self.endpoint.admission.expired(self.started, self.handshake_done, now)
        return None if expired is None else f"{expired}"

    def _settle(self) -> None:
        if self.source is not None:
            self.endpoint.admission.settle(self.source)
            self.source = None

    def on_message(self, msg: ControlMessage) -> None:
        if not self.authed:
            self._auth_step(msg)
            return
        if isinstance(msg, Nack):
            self._on_nack(msg)
        elif isinstance(msg, KeyframeRequest):
            flow = self.flows.get(msg.flow_id)
            if flow is None:
                self.counters.unknown_flow_requests += 1
            elif flow.limiter.allow(self._loop.time()):
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

    def _auth_step(self, msg: ControlMessage) -> None:
        ep = self.endpoint
        if isinstance(msg, Hello) and not self._client_nonce:
            if msg.version != PROTOCOL_VERSION:
                self.abort(ErrorCode.UNSUPPORTED_VERSION, f"version {msg.version} unsupported")
                return
            self.peer_key = msg.public_key
            try:
                allowed = ep.authorize(msg.public_key)
            except Exception:
                log.exception("relay: authorize callback failed")
                allowed = False
            if not allowed:
                ep.counters.auth_refused += 1
                ep.admission.counters.refused_unauthorized += 1
                self.abort(ErrorCode.UNAUTHORIZED, "node key not authorized")
                return
            self._client_nonce = msg.nonce
            self._server_nonce = os.urandom(32)
            data = auth.transcript(
                b"server", msg.public_key, ep.public_key, msg.nonce, self._server_nonce
            )
            sig = auth.sign_transcript(ep.private_key, data)
            self.send_msg(Hello(PROTOCOL_VERSION, ep.public_key, self._server_nonce, sig))
        elif isinstance(msg, Auth) and self._client_nonce and self.peer_key is not None:
            data = auth.transcript(
                b"client", self.peer_key, ep.public_key, self._client_nonce, self._server_nonce
            )
            if not auth.verify_transcript(self.peer_key, msg.signature, data):
                ep.counters.auth_refused += 1
                self.abort(ErrorCode.AUTH_FAILED, "client signature invalid")
                return
            self.authed = True
            self._settle()
            self.last_rx = self._loop.time()
            self.send_msg(AuthOk())
            # a reconnecting peer supersedes its previous (probably dead) connection, so
            # there is never more than one flow per (producer, remote node)
            for other in list(ep._sessions):
                if other is not self and other.peer_key == self.peer_key and other.authed:
                    other.abort(ErrorCode.SHUTDOWN, "superseded by a new connection")
        else:
            ep.counters.auth_refused += 1
            self.abort(ErrorCode.PROTOCOL_VIOLATION, "message before authentication")

    def _on_subscribe(self, msg: Subscribe) -> None:
        flow = self.by_producer.get(msg.producer_id)
        if flow is None:
            try:
                permitted = self.peer_key is not None and self.endpoint.may_subscribe(
                    self.peer_key, msg.producer_id
                )
            except Exception:
                log.exception("relay: may_subscribe callback failed")
                permitted = False
            if not permitted:
                self.send_msg(
                    ErrorMsg(msg.request_id, ErrorCode.UNAUTHORIZED, "not allowed to pull this")
                )
                return
            if len(self.flows) >= self.cfg.max_flows_per_connection:
                self.send_msg(ErrorMsg(msg.request_id, ErrorCode.TOO_MANY_FLOWS, "too many flows"))
                return
            try:
                source = self.endpoint.lookup(msg.producer_id)
            except Exception:
                log.exception("relay: producer lookup failed")
                source = None
            if source is None:
                self.send_msg(ErrorMsg(msg.request_id, ErrorCode.NOT_FOUND, "unknown producer"))
                return
            if self._next_flow > MAX_FLOW_ID:
                self.send_msg(ErrorMsg(msg.request_id, ErrorCode.TOO_MANY_FLOWS, "out of flow ids"))
                return
            flow = _OriginFlow(self._next_flow, msg.producer_id, source, self.cfg.keyframe_interval)
            self._next_flow += 1
        source = flow.source
        try:
            codec = dict(source.codec_params())
            kind = source.kind
        except Exception as exc:
            self.send_msg(ErrorMsg(msg.request_id, ErrorCode.CODEC_UNAVAILABLE, str(exc)[:200]))
            return
        self.send_msg(Subscribed(msg.request_id, flow.flow_id, msg.producer_id, kind, codec))
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

    def _make_listener(self, flow: _OriginFlow) -> PacketListener:
        prefix = flow.prefix
        stats = flow.stats
        send = self.send_datagram

        def on_packet(pkt: bytes) -> None:
            if send(prefix + pkt):
                stats.packets += 1
                stats.bytes += len(pkt)
            else:
                stats.dropped += 1

        return on_packet

    def _make_rtcp_listener(self, flow: _OriginFlow) -> PacketListener:
        prefix = datagram_prefix(flow.flow_id, rtcp=True)
        send = self.send_datagram

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
        for seq in msg.seqs:
            pkt = get(seq)
            if pkt is None:
                stats.nack_misses += 1
            elif self.send_datagram(flow.prefix + pkt):
                stats.retransmits += 1

    def _source_closed(self, flow: _OriginFlow) -> None:
        if self.flows.get(flow.flow_id) is flow:
            self._drop_flow(flow)
            self.send_msg(ProducerClosed(flow.flow_id))

    def _drop_flow(self, flow: _OriginFlow) -> None:
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

    def on_dead(self, code: int, reason: str, local: bool) -> None:
        self._settle()
        for flow in list(self.flows.values()):
            self._drop_flow(flow)
        self.endpoint._sessions.discard(self)


class _ClientConn(_Conn):
    """Outbound connection owned by a :class:`RelayLink`."""

    is_client = True

    def __init__(self, quic: QuicConnection, link: RelayLink, **kw: Any) -> None:
        super().__init__(quic, link.endpoint, **kw)
        self.link = link
        self.peer_key = link.peer_key
        self._nonce = os.urandom(32)
        self._hello_at = 0.0
        self.ready = False
        self.orphans: deque[tuple[int, bytes, float]] = deque(maxlen=64)

    def on_handshake(self, event: events.HandshakeCompleted) -> None:
        if event.alpn_protocol != ALPN:
            self.abort(ErrorCode.PROTOCOL_VIOLATION, "ALPN mismatch")
            return
        # aioquic keeps the verified peer certificate in a private attribute; if a future
        # version moves it we fail closed (the control-stream signatures alone would not
        # stop a man in the middle relaying them between two TLS sessions)
        cert = getattr(getattr(self._quic, "tls", None), "_peer_certificate", None)
        key = auth.certificate_key(cert) if cert is not None else None
        if key != self.link.peer_key:
            self.endpoint.counters.auth_refused += 1
            reason = (
                "server certificate is not the expected node key"
                if cert is not None
                else "cannot read the server certificate"
            )
            self.abort(ErrorCode.WRONG_PEER, reason)
            return
        self.ctrl_id = self._quic.get_next_available_stream_id()
        self._hello_at = self._loop.time()
        self.send_msg(Hello(PROTOCOL_VERSION, self.endpoint.public_key, self._nonce))

    def on_message(self, msg: ControlMessage) -> None:
        link = self.link
        if not self.authed:
            ep = self.endpoint
            if isinstance(msg, Hello) and self._hello_at and not self.ready:
                if msg.public_key != link.peer_key:
                    ep.counters.auth_refused += 1
                    self.abort(ErrorCode.WRONG_PEER, "peer is not the expected node key")
                    return
                data = auth.transcript(
                    b"server", ep.public_key, link.peer_key, self._nonce, msg.nonce
                )
                if not auth.verify_transcript(link.peer_key, msg.signature, data):
                    ep.counters.auth_refused += 1
                    self.abort(ErrorCode.AUTH_FAILED, "server signature invalid")
                    return
                self._rtt_sample(self._loop.time() - self._hello_at)
                data = auth.transcript(
                    b"client", ep.public_key, link.peer_key, self._nonce, msg.nonce
                )
                self.ready = True
                self.send_msg(Auth(auth.sign_transcript(ep.private_key, data)))
            elif isinstance(msg, AuthOk) and self.ready:
                self.authed = True
                self.last_rx = self._loop.time()
                self.settled.set()
                link._on_connected(self)
            else:
                self.abort(ErrorCode.PROTOCOL_VIOLATION, "unexpected message during auth")
            return
        if isinstance(msg, Subscribed | ErrorMsg):
            link._on_reply(msg)
        elif isinstance(msg, ProducerClosed):
            link._on_producer_closed(msg.flow_id)
        else:
            self.counters.control_unexpected += 1

    def on_datagram(self, data: bytes) -> None:
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
        rp = self.link._flows.get(flow_id)
        if rp is None:
            self.counters.datagrams_unknown_flow += 1
            # may be a first packet overtaking its SUBSCRIBED answer: keep it briefly
            self.orphans.append((flow_id, data[4:], self._loop.time()))
            return
        rp.on_rtp(data[4:], self._loop.time())

    def _on_rtcp(self, data: bytes) -> None:
        if (data[4] & 0xC0) != 0x80:
            self.counters.datagrams_malformed += 1
            return
        rp = self.link._flows.get(int.from_bytes(data[:4], "big") ^ RTCP_FLAG)
        if rp is None:
            self.counters.datagrams_unknown_flow += 1
            return
        rp.on_rtcp(data[4:])

    def replay_orphans(self, flow_id: int, rp: RemoteProducer) -> None:
        """Deliver early packets of a flow that arrived before its SUBSCRIBED."""
        if not self.orphans:
            return
        now = self._loop.time()
        keep: deque[tuple[int, bytes, float]] = deque(maxlen=64)
        for fid, pkt, at in self.orphans:
            if fid == flow_id and now - at < 1.0:
                self.counters.orphans_replayed += 1
                rp.on_rtp(pkt, now)
            else:
                keep.append((fid, pkt, at))
        self.orphans = keep

    def on_rtt(self, rtt: float) -> None:
        self.link._on_rtt(rtt)

    def on_tick(self, now: float) -> None:
        self.link._on_tick(self, now)

    def on_dead(self, code: int, reason: str, local: bool) -> None:
        self.link._on_conn_dead(self, code, reason)


class RelayLink:
    """Persistent authenticated connection to one peer node (the remote side).

    Create with :meth:`RelayEndpoint.link`.  Runs until :meth:`close`: connects,
    authenticates, re-subscribes every open :class:`RemoteProducer` after each
    reconnect, and reports ``"connecting" / "live" / "interrupted" / "closed"`` through
    :meth:`on_state` (remote producers also get ``on_state`` callbacks).
    """

    def __init__(self, endpoint: RelayEndpoint, peer_key: bytes, host: str, port: int) -> None:
        self.endpoint = endpoint
        self.peer_key = peer_key
        self.host = host
        self.port = port
        self.state = "connecting"
        self.last_error: RelayError | None = None
        self.rtt: float | None = None
        self.connects = 0
        self.disconnects = 0
        self._conn: _ClientConn | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._producers: dict[str, RemoteProducer] = {}
        self._flows: dict[int, RemoteProducer] = {}
        self._inflight: dict[str, asyncio.Future[RemoteProducer]] = {}
        self._replies: dict[int, Callable[[Subscribed | ErrorMsg], None]] = {}
        self._next_req = 1
        self._state_cbs: list[Callable[[str], None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._linger: dict[str, asyncio.TimerHandle] = {}
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at: float | None = None
        self._loop = asyncio.get_running_loop()
        self._stats_due = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._task = asyncio.create_task(self._run(), name=f"relay-link-{peer_key.hex()[:8]}")

    # -- public -------------------------------------------------------------------------

    @property
    def producers(self) -> dict[str, RemoteProducer]:
        """Open remote producers by producer id (a copy)."""
        return dict(self._producers)

    def update_address(self, host: str, port: int) -> None:
        """Use a new address for the peer from the next (re)connection on."""
        self.host = host
        self.port = port

    def on_state(self, cb: Callable[[str], None]) -> None:
        """Call ``cb(state)`` on every link state change."""
        self._state_cbs.append(cb)

    async def wait_live(self, timeout: float | None = None) -> None:
        """Wait until authenticated; raises :class:`RelayRefused` if the peer refuses us."""

        async def wait() -> None:
            while self.state != LIVE:
                if self.state == "closed":
                    raise RelayError("link closed")
                fut = self._loop.create_future()
                self._waiters.append(fut)
                await fut
                if isinstance(self.last_error, RelayRefused) and self.state != LIVE:
                    raise self.last_error

        await asyncio.wait_for(wait(), timeout)

    async def subscribe(self, producer_id: str, timeout: float = 10.0) -> RemoteProducer:
        """The shared :class:`RemoteProducer` of ``producer_id`` on the peer.

        Opens the flow on first use; later calls return the same object while it is
        open.  The flow closes ``linger`` seconds after its last packet listener leaves
        (or if it never gets one).  Raises :class:`SubscribeError` or
        :class:`RelayRefused`, or :class:`TimeoutError`.
        """
        rp = self._producers.get(producer_id)
        if rp is not None and not rp.closed:
            return rp
        fut = self._inflight.get(producer_id)
        if fut is None:
            fut = self._loop.create_future()
            self._inflight[producer_id] = fut
            task = asyncio.create_task(self._open(producer_id, fut, timeout))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(fut)

    async def close(self) -> None:
        """Close the link and every remote producer on it."""
        if self.state == "closed":
            return
        self._set_state("closed")
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        self._teardown_conn(ErrorCode.SHUTDOWN, "link closed")
        for rp in list(self._producers.values()):
            rp.close()
        self._producers.clear()
        self._flows.clear()
        for h in self._linger.values():
            h.cancel()
        self._linger.clear()
        if self._wake is not None:
            self._wake.cancel()
        self.endpoint._links.pop(self.peer_key, None)

    # -- connection management ------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        cfg = self.endpoint.config
        while self.state != "closed":
            conn: _ClientConn | None = None
            try:
                conn = await self._connect()
                await asyncio.wait_for(conn.settled.wait(), cfg.connect_timeout)
            except TimeoutError:
                if conn is not None and not conn.dead:
                    conn.abort(ErrorCode.TIMEOUT, "connect timeout")
                self._fail(RelayError("connect timeout"))
            except OSError as exc:
                self._fail(RelayError(f"connect failed: {exc}"))
            if conn is not None and not conn.dead and conn.authed:
                attempt = 0
                await conn.dead_event.wait()
            self._teardown_conn(ErrorCode.NO_ERROR, "")
            if self.state == "closed":
                return
            delay = min(cfg.reconnect_max, cfg.reconnect_min * (2**attempt))
            attempt = min(attempt + 1, 16)
            await asyncio.sleep(delay * (0.75 + 0.5 * random.random()))

    async def _connect(self) -> _ClientConn:
        ep = self.endpoint
        cfg = ep.config
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            verify_mode=ssl.CERT_NONE,  # the certificate key is checked against peer_key
            server_name="cascade-node",
            max_datagram_frame_size=65535,
            max_datagram_size=cfg.max_datagram_size,
            idle_timeout=cfg.idle_timeout,
        )
        quic = QuicConnection(configuration=config)
        transport, proto = await self._loop.create_datagram_endpoint(
            lambda: _ClientConn(quic, self), local_addr=(cfg.host, 0)
        )
        self._transport = transport
        conn = proto
        assert isinstance(conn, _ClientConn)
        self._conn = conn
        conn.connect((self.host, self.port))
        return conn

    def _teardown_conn(self, code: int, reason: str) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.dead:
            conn.abort(code, reason)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _fail(self, err: RelayError) -> None:
        self.last_error = err
        self._notify()

    def _on_connected(self, conn: _ClientConn) -> None:
        if conn is not self._conn:
            return
        self.connects += 1
        self.last_error = None
        self._set_state(LIVE)
        for rp in list(self._producers.values()):
            if not rp.closed:
                self._resubscribe(rp)

    def _on_conn_dead(self, conn: _ClientConn, code: int, reason: str) -> None:
        if conn is not self._conn:
            return
        was_live = self.state == LIVE
        if code in _AUTH_ERRORS:
            self._fail(RelayRefused(code, reason))
        elif not was_live:
            self._fail(RelayError(f"connection failed ({code}): {reason}"))
        self._flows.clear()
        replies, self._replies = self._replies, {}
        err = ErrorMsg(0, ErrorCode.SHUTDOWN, f"link down: {reason}")
        for cb in replies.values():
            cb(err)
        if was_live:
            self.disconnects += 1
        if self.state != "closed":
            self._set_state("interrupted")
        for rp in list(self._producers.values()):
            rp.set_interrupted()

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        call_each(self._state_cbs, "relay link state", state)
        self._notify()

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- subscriptions ----------------------------------------------------------------

    def _request(self, producer_id: str, cb: Callable[[Subscribed | ErrorMsg], None]) -> bool:
        conn = self._conn
        if conn is None or not conn.authed:
            return False
        req = self._next_req
        self._next_req = (req + 1) & 0xFFFFFFFF or 1
        self._replies[req] = cb
        conn.send_msg(Subscribe(req, producer_id))
        return True

    async def _open(
        self, producer_id: str, fut: asyncio.Future[RemoteProducer], timeout: float
    ) -> None:
        try:
            await self.wait_live(timeout)
            reply: asyncio.Future[Subscribed | ErrorMsg] = self._loop.create_future()

            def on_reply(msg: Subscribed | ErrorMsg) -> None:
                if not reply.done():
                    reply.set_result(msg)

            if not self._request(producer_id, on_reply):
                raise RelayError("link not live")
            msg = await asyncio.wait_for(reply, timeout)
            if isinstance(msg, ErrorMsg):
                raise SubscribeError(msg.code, msg.reason)
            rp = self._producers.get(producer_id)
            if rp is None or rp.closed:
                rp = self._make_producer(msg)
            self._attach(rp, msg)
            if not fut.done():
                fut.set_result(rp)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else RelayError("cancelled"))
        finally:
            if self._inflight.get(producer_id) is fut:
                del self._inflight[producer_id]

    def _make_producer(self, msg: Subscribed) -> RemoteProducer:
        cfg = self.endpoint.config
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
        self._producers[msg.producer_id] = rp
        self._arm_linger(rp)
        return rp

    def _attach(self, rp: RemoteProducer, msg: Subscribed) -> None:
        if rp.flow_id is not None:
            self._flows.pop(rp.flow_id, None)
        self._flows[msg.flow_id] = rp
        rp.set_live(msg.flow_id, msg.codec)
        if self._conn is not None:
            self._conn.replay_orphans(msg.flow_id, rp)

    def _resubscribe(self, rp: RemoteProducer) -> None:
        def on_reply(msg: Subscribed | ErrorMsg) -> None:
            if rp.closed:
                # closed (linger) while the re-SUBSCRIBE was in flight: release the flow
                conn = self._conn
                if isinstance(msg, Subscribed) and conn is not None and conn.authed:
                    conn.send_msg(Unsubscribe(msg.flow_id))
                return
            if isinstance(msg, Subscribed):
                self._attach(rp, msg)
            elif msg.code != ErrorCode.SHUTDOWN:
                # the producer is gone on the origin
                self._forget(rp)
                rp.close()

        self._request(rp.producer_id, on_reply)

    def _on_reply(self, msg: Subscribed | ErrorMsg) -> None:
        cb = self._replies.pop(msg.request_id, None)
        if cb is None:
            self.endpoint.counters.control_unexpected += 1
        else:
            cb(msg)

    def _on_producer_closed(self, flow_id: int) -> None:
        rp = self._flows.get(flow_id)
        if rp is None:
            self.endpoint.counters.unknown_flow_requests += 1
            return
        self._forget(rp)
        rp.close()

    def _forget(self, rp: RemoteProducer) -> None:
        if rp.flow_id is not None and self._flows.get(rp.flow_id) is rp:
            del self._flows[rp.flow_id]
        if self._producers.get(rp.producer_id) is rp:
            del self._producers[rp.producer_id]
        h = self._linger.pop(rp.producer_id, None)
        if h is not None:
            h.cancel()

    def _arm_linger(self, rp: RemoteProducer) -> None:
        h = self._linger.pop(rp.producer_id, None)
        if h is not None:
            h.cancel()
        if rp.listener_count == 0 and not rp.closed:
            self._linger[rp.producer_id] = self._loop.call_later(
                self.endpoint.config.linger, self._linger_expired, rp
            )

    def _linger_expired(self, rp: RemoteProducer) -> None:
        self._linger.pop(rp.producer_id, None)
        if rp.listener_count or rp.closed:
            return
        conn = self._conn
        if rp.flow_id is not None and conn is not None and conn.authed:
            conn.send_msg(Unsubscribe(rp.flow_id))
        self._forget(rp)
        rp.close()

    # -- FlowUpstream (called by RemoteProducer) -----------------------------------

    def clock(self) -> float:
        """Event loop time."""
        return self._loop.time()

    def send_keyframe_request(self, producer: RemoteProducer) -> None:
        """Send KEYFRAME_REQUEST upstream."""
        conn = self._conn
        if conn is not None and conn.authed and producer.flow_id is not None:
            conn.send_msg(KeyframeRequest(producer.flow_id))

    def send_nack(self, producer: RemoteProducer, seqs: list[int]) -> None:
        """Send NACK upstream."""
        conn = self._conn
        if conn is not None and conn.authed and producer.flow_id is not None:
            conn.send_msg(Nack(producer.flow_id, seqs))

    def listeners_changed(self, producer: RemoteProducer) -> None:
        """Start or cancel the linger timer."""
        if self._producers.get(producer.producer_id) is producer:
            self._arm_linger(producer)

    def wake_at(self, when: float) -> None:
        """Run :meth:`RemoteProducer.poll` around ``when``."""
        if self._wake_at is not None and self._wake_at <= when:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = when
        self._wake = self._loop.call_at(when, self._on_wake)

    def _on_wake(self) -> None:
        self._wake = None
        self._wake_at = None
        now = self._loop.time()
        nxt: float | None = None
        for rp in list(self._flows.values()):
            d = rp.deadline()
            if d is not None and d <= now + 0.001:
                rp.poll(now)
                d = rp.deadline()
            if d is not None and (nxt is None or d < nxt):
                nxt = d
        if nxt is not None:
            self.wake_at(max(nxt, now + 0.002))

    def _retry_interval(self) -> float:
        cfg = self.endpoint.config
        if self.rtt is None:
            return max(cfg.nack_retry_interval, 0.1)
        return max(cfg.nack_retry_interval, 1.5 * self.rtt + 0.01)

    def _on_rtt(self, rtt: float) -> None:
        self.rtt = rtt
        ri = self._retry_interval()
        for rp in self._producers.values():
            rp.tracker.retry_interval = ri

    def _on_tick(self, conn: _ClientConn, now: float) -> None:
        if now < self._stats_due:
            return
        self._stats_due = now + self.endpoint.config.stats_interval
        for rp in self._flows.values():
            if rp.flow_id is not None:
                s = rp.stats
                conn.send_msg(Stats(rp.flow_id, s.packets, s.bytes, s.lost, s.repaired))

    def __repr__(self) -> str:
        return f"<RelayLink {self.peer_key.hex()[:16]} {self.host}:{self.port} {self.state}>"


class _AdmittingServer(QuicServer):
    """aioquic's server, asking :class:`~relay.admission.PendingAdmission` before an
    Initial packet from a new source creates a connection (refused ones are dropped
    silently, costing one header parse). Uses aioquic 1.7's ``QuicServer._protocols``."""

    def __init__(self, endpoint: RelayEndpoint, **kw: Any) -> None:
        super().__init__(**kw)
        self._endpoint = endpoint

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        data = cast(bytes, data)
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._configuration.connection_id_length
            )
        except ValueError:
            return
        if (
            header.packet_type == QuicPacketType.INITIAL
            and len(data) >= 1200
            and header.destination_cid not in self._protocols
        ):
            source = str(addr[0])
            if not self._endpoint.admission.admit(source, self._loop.time()):
                return
            self._endpoint._admitting_source = source
            try:
                super().datagram_received(data, addr)
            finally:
                if self._endpoint._admitting_source is not None:  # no connection was made
                    self._endpoint._admitting_source = None
                    self._endpoint.admission.settle(source)
            return
        super().datagram_received(data, addr)


class RelayEndpoint:
    """The relay endpoint of one node.

    ``private_key`` is the node's Ed25519 identity; ``lookup`` resolves local producer
    ids for peers that subscribe; ``authorize(public_key_bytes)`` decides which peer
    nodes may connect (default: nobody).  Call :meth:`start` to listen and
    :meth:`link` to reach a peer.
    """

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        lookup: ProducerLookup,
        authorize: Callable[[bytes], bool] | None = None,
        config: RelayConfig | None = None,
    ) -> None:
        self.private_key = private_key
        self.public_key = auth.public_key_bytes(private_key)
        self.lookup = lookup
        self.authorize: Callable[[bytes], bool] = authorize or (lambda key: False)
        #: ``may_subscribe(peer_key, producer_id)``: whether an authenticated peer may pull
        #: that producer (default: any producer ``lookup`` finds).
        self.may_subscribe: Callable[[bytes, str], bool] = lambda key, producer_id: True
        self.config = config or RelayConfig()
        self.counters = RelayCounters()
        self.admission = PendingAdmission(self.config.admission)
        self._admitting_source: str | None = None
        self.certificate = auth.make_certificate(private_key)
        self._server: QuicServer | None = None
        self._sessions: set[_ServerConn] = set()
        self._links: dict[bytes, RelayLink] = {}
        self._closing: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        """Start the QUIC server on ``config.host:config.port``."""
        cfg = self.config
        qc = QuicConfiguration(
            is_client=False,
            alpn_protocols=[ALPN],
            max_datagram_frame_size=65535,
            max_datagram_size=cfg.max_datagram_size,
            idle_timeout=cfg.idle_timeout,
        )
        qc.certificate = self.certificate
        qc.private_key = self.private_key

        def create(quic: QuicConnection, **kw: Any) -> _ServerConn:
            return _ServerConn(quic, self, **kw)

        loop = asyncio.get_running_loop()
        _, server = await loop.create_datagram_endpoint(
            lambda: _AdmittingServer(self, configuration=qc, create_protocol=create),
            local_addr=(cfg.host, cfg.port),
        )
        self._server = server

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on (after :meth:`start`)."""
        if self._server is None or self._server._transport is None:
            raise RelayError("endpoint not started")
        host, port = self._server._transport.get_extra_info("sockname")[:2]
        return host, port

    def revoke(self, peer_key: bytes) -> None:
        """``peer_key`` is no longer authorized: close its inbound connections (ending the
        flows served on them) and the link to it (ending the flows pulled from it)."""
        self.admission.counters.revoked += 1
        for session in list(self._sessions):
            if session.peer_key == peer_key:
                session.abort(ErrorCode.UNAUTHORIZED, "node key no longer in the directory")
        link = self._links.get(peer_key)
        if link is not None:
            task = asyncio.ensure_future(link.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def link(self, peer_key: bytes, host: str, port: int) -> RelayLink:
        """The :class:`RelayLink` to ``peer_key`` at ``host:port`` (created on first call)."""
        link = self._links.get(peer_key)
        if link is None or link.state == "closed":
            link = RelayLink(self, peer_key, host, port)
            self._links[peer_key] = link
        return link

    @property
    def links(self) -> dict[bytes, RelayLink]:
        """Open outbound links by peer key (a copy)."""
        return dict(self._links)

    def origin_flows(self) -> list[tuple[bytes | None, str, int, OriginFlowStats]]:
        """``(peer_key, producer_id, flow_id, stats)`` of every flow served to peers."""
        return [
            (s.peer_key, f.producer_id, f.flow_id, f.stats)
            for s in list(self._sessions)
            for f in s.flows.values()
        ]

    async def close(self) -> None:
        """Close every link and inbound connection and stop listening."""
        for link in list(self._links.values()):
            await link.close()
        for s in list(self._sessions):
            s.abort(ErrorCode.SHUTDOWN, "endpoint closing")
        if self._server is not None:
            self._server.close()
            self._server = None
