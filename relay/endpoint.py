"""QUIC transport of the relay (asyncio + aioquic): the endpoint, its links, its connections.

* :class:`RelayEndpoint` — one per node: a QUIC server (origin side, serves local
  producers to authorised peers) and a factory of :class:`RelayLink` (remote side).
* :class:`RelayLink` — a persistent, authenticated connection to one peer node that
  reconnects with backoff; its :meth:`RelayLink.subscribe` returns a shared
  :class:`~relay.flows.RemoteProducer`.

Everything the relay decides lives in the sans-I/O layer (:mod:`relay.connection`,
:mod:`relay.origin`, :mod:`relay.remote`, :mod:`relay.handshake`); this module maps QUIC
events onto a :class:`~relay.connection.RelayConnection`, moves its output into aioquic
and runs its timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import Callable
from typing import Any, cast

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import auth, congestion  # noqa: F401  (registers the media congestion control)
from .admission import PendingAdmission
from .aio import Timer, open_remote_producer
from .config import RelayConfig, RelayCounters, RelayError, RelayRefused, SubscribeError
from .connection import RelayConnection
from .flows import LIVE, OriginFlowStats, RemoteProducer, call_each
from .handshake import ClientHandshake, ServerHandshake
from .origin import OriginFlows
from .protocol import ALPN, ControlMessage, ErrorCode, RoomState
from .quic_adapter import AdmittingQuicServer, QuicProtocolBase, peer_certificate
from .remote import RemoteFlows
from .source import ProducerLookup
from .udp import open_udp

__all__ = [
    "RelayConfig",
    "RelayCounters",
    "RelayEndpoint",
    "RelayError",
    "RelayLink",
    "RelayRefused",
    "SubscribeError",
]

_AUTH_ERRORS = (ErrorCode.UNAUTHORIZED, ErrorCode.AUTH_FAILED, ErrorCode.WRONG_PEER)

_StreamDataReceived = events.StreamDataReceived


class QuicRelayProtocol(QuicProtocolBase):
    """Carries one :class:`RelayConnection` over one aioquic connection.

    The control stream is the first client-initiated bidirectional stream; flow
    datagrams are QUIC DATAGRAM frames (sent and received through aioquic's fast path
    in the steady state, see :mod:`relay.quic_adapter`). Outgoing datagrams are written
    to the socket every ``datagram_flush_batch`` packets (so the peer starts on a burst
    while the rest is built) or at the end of the event-loop iteration; received
    datagrams are ACKed once per loop iteration.
    """

    def __init__(
        self, quic: QuicConnection, core: RelayConnection, is_client: bool, **kw: Any
    ) -> None:
        cfg = core.config
        super().__init__(
            quic,
            fast_path=cfg.quic_fast_path,
            acks=cfg.quic_acks,
            **kw,
        )
        self.core = core
        self.is_client = is_client
        self.ctrl_id: int | None = None
        self.settled = asyncio.Event()
        self.dead_event = asyncio.Event()
        self._batch = core.config.datagram_flush_batch
        self._soon: asyncio.Handle | None = None
        self._stalled = False
        self._close_sent = False
        self._relay_timer = Timer(self.loop, self._on_timer)
        core.notify = self._on_output
        self._relay_timer.arm(core.deadline())

    # -- input --------------------------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        """Feed one UDP datagram to QUIC; once authenticated, batch the ACK/transmit.

        aioquic transmits after every datagram; deferring it with ``call_soon`` lets one
        transmit (and ACK) cover every datagram read in the same loop iteration.
        """
        self.receive(cast(bytes, data), addr)
        core = self.core
        if not core.authed:
            self._service()
        elif self.pending or core.control_out or core.datagrams_out:
            if self._soon is None:
                self._soon = self.loop.call_soon(self._service)
        elif not self.drains:
            # nothing of ours to send: what QUIC owes the peer (the ACK, delayed by
            # up to 1 ms anyway) goes out when its timer fires (armed at the end of the
            # read by datagrams_drained when the transport reports it)
            self.arm_quic_timer_after_receive()

    def stats(self) -> dict[str, int]:
        """The fast path's counters and how often aioquic's timer fired."""
        return {**self.fast.stats(), "timer_fires": self.timer_fires}

    def datagram_frame_received(self, data: bytes) -> None:
        """A flow datagram: straight to the connection (hot path)."""
        self.core.receive_datagram(data, self.loop.time())

    def quic_event_received(self, event: events.QuicEvent) -> None:
        """Map one aioquic event onto the relay connection."""
        core = self.core
        if isinstance(event, _StreamDataReceived):
            sid = event.stream_id
            if self.ctrl_id is None and not self.is_client and sid % 4 == 0:
                self.ctrl_id = sid
            if sid != self.ctrl_id:
                core.counters.streams_unexpected += 1
                return
            core.receive_control(event.data, event.end_stream, self.loop.time())
        elif isinstance(event, events.HandshakeCompleted):
            key = None
            if self.is_client:
                self.ctrl_id = self.quic.get_next_available_stream_id()
                # if a future aioquic moves the peer certificate, the handshake fails
                # closed (key None)
                cert = peer_certificate(self.quic)
                key = auth.certificate_key(cert) if cert is not None else None
            core.handshake_completed(event.alpn_protocol, key, self.loop.time())
        elif isinstance(event, events.ConnectionTerminated):
            core.connection_lost(event.error_code, event.reason_phrase or "connection closed")
        if core.authed and not self.settled.is_set():
            self.settled.set()
        if core.dead:
            self.settled.set()
            self.dead_event.set()

    # -- output -------------------------------------------------------------------------

    def _on_output(self) -> None:
        core = self.core
        if core.dead:
            self.settled.set()
            self.dead_event.set()
        if len(core.datagrams_out) >= self._batch and not self._stalled:
            # a burst: put what we have on the wire now
            self._service()
            if self.pending:
                # congestion-limited: stop flushing per packet until the next iteration
                self._stalled = True
                self.loop.call_soon(self._unstall)
        elif self._soon is None:
            self._soon = self.loop.call_soon(self._service)

    def _unstall(self) -> None:
        self._stalled = False
        self._service()

    def _service(self) -> None:
        """Move the connection's output into QUIC, transmit, re-arm the timer."""
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        core = self.core
        quic = self.quic
        if core.control_out and self.ctrl_id is not None and not self._close_sent:
            self.send_stream_data(self.ctrl_id, core.take_control())
        out = core.datagrams_out
        if out:
            core.datagrams_out = []
            if not self._close_sent:
                send = quic.send_datagram_frame
                for data in out:
                    send(data)
        if core.close_out is not None and not self._close_sent:
            self._close_sent = True
            code, reason = core.close_out
            self.close_quic(code, reason)
        self.transmit()
        core.backlog = len(self.pending)
        self._relay_timer.arm(core.deadline())

    def _on_timer(self) -> None:
        self.core.poll(self.loop.time())
        self._service()

    def abort(self, code: int, reason: str) -> None:
        """Close with an application error now."""
        self.core.abort(code, reason)
        self._service()

    def connection_lost(self, exc: Exception | None) -> None:
        """The UDP socket closed."""
        self.core.connection_lost(ErrorCode.SHUTDOWN, "socket closed")
        self._relay_timer.cancel()
        self.settled.set()
        self.dead_event.set()


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
        self.connects = 0
        self.disconnects = 0
        self._loop = asyncio.get_running_loop()
        #: the sans-I/O flow state of this link (survives reconnects)
        self.flows = RemoteFlows(endpoint.config, endpoint.counters, self._loop.time)
        self._timer = Timer(self._loop, self._on_timer)
        self.flows.notify = self._arm
        self._conn: QuicRelayProtocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._inflight: dict[str, asyncio.Future[RemoteProducer]] = {}
        self._state_cbs: list[Callable[[str], None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._task = asyncio.create_task(self._run(), name=f"relay-link-{peer_key.hex()[:8]}")

    # -- public -------------------------------------------------------------------------

    @property
    def producers(self) -> dict[str, RemoteProducer]:
        """Open remote producers by producer id (a copy)."""
        return dict(self.flows.producers)

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time to the peer (seconds), once measured."""
        return self.flows.rtt

    @property
    def connection(self) -> RelayConnection | None:
        """The live connection's protocol state, if any."""
        return self._conn.core if self._conn is not None else None

    @property
    def local_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the current connection's UDP socket, if connected."""
        if self._transport is None:
            return None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return host, port

    def update_address(self, host: str, port: int) -> None:
        """Use a new address for the peer from the next (re)connection on."""
        self.host = host
        self.port = port

    def send(self, msg: ControlMessage) -> bool:
        """Send a control message on the live connection; False if the link is not live.
        Messages sent on a link arrive in order with its SUBSCRIBEs."""
        conn = self._conn
        if self.state != LIVE or conn is None or not conn.core.authed:
            return False
        conn.core.send_msg(msg)
        return True

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
        rp = self.flows.producers.get(producer_id)
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
        self.flows.close()
        self._timer.cancel()
        self.endpoint._links.pop(self.peer_key, None)

    # -- connection management ------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        cfg = self.endpoint.config
        while self.state != "closed":
            conn: QuicRelayProtocol | None = None
            try:
                conn = await self._connect()
                await asyncio.wait_for(conn.settled.wait(), cfg.connect_timeout)
            except TimeoutError:
                if conn is not None and not conn.core.dead:
                    conn.abort(ErrorCode.TIMEOUT, "connect timeout")
                self._fail(RelayError("connect timeout"))
            except OSError as exc:
                self._fail(RelayError(f"connect failed: {exc}"))
            if conn is not None and not conn.core.dead and conn.core.authed:
                attempt = 0
                await conn.dead_event.wait()
            self._teardown_conn(ErrorCode.NO_ERROR, "")
            if self.state == "closed":
                return
            delay = min(cfg.reconnect_max, cfg.reconnect_min * (2**attempt))
            attempt = min(attempt + 1, 16)
            await asyncio.sleep(delay * (0.75 + 0.5 * random.random()))

    async def _connect(self) -> QuicRelayProtocol:
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
            congestion_control_algorithm=cfg.congestion_control,
        )
        quic = QuicConnection(configuration=config)
        core = RelayConnection(
            cfg,
            ep.counters,
            self._loop.time(),
            handshake=ClientHandshake(ep.private_key, self.peer_key, ep.public_key),
            remote=self.flows,
        )
        core.on_up = self._on_up
        core.on_down = self._on_down
        core.on_room_state = ep._room_state
        transport, proto = await open_udp(
            lambda: QuicRelayProtocol(quic, core, True), (cfg.host, 0), cfg.udp_offload
        )
        self._transport = transport
        assert isinstance(proto, QuicRelayProtocol)
        self._conn = proto
        proto.connect((self.host, self.port))
        return proto

    def _teardown_conn(self, code: int, reason: str) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self.endpoint._retire_stats(conn)
        if conn is not None and not conn.core.dead:
            conn.abort(code, reason)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _fail(self, err: RelayError) -> None:
        self.last_error = err
        self._notify()

    def _on_up(self, core: RelayConnection) -> None:
        if self._conn is None or core is not self._conn.core:
            return
        self.connects += 1
        self.last_error = None
        self._set_state(LIVE)

    def _on_down(self, core: RelayConnection, code: int, reason: str) -> None:
        if self._conn is None or core is not self._conn.core:
            return
        was_live = self.state == LIVE
        if code in _AUTH_ERRORS:
            self._fail(RelayRefused(code, reason))
        elif not was_live:
            self._fail(RelayError(f"connection failed ({code}): {reason}"))
        if was_live:
            self.disconnects += 1
        if self.state != "closed":
            self._set_state("interrupted")

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

    async def _open(
        self, producer_id: str, fut: asyncio.Future[RemoteProducer], timeout: float
    ) -> None:
        try:
            await self.wait_live(timeout)
            rp = await open_remote_producer(self.flows, producer_id, timeout)
            if not fut.done():
                fut.set_result(rp)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else RelayError("cancelled"))
        finally:
            if self._inflight.get(producer_id) is fut:
                del self._inflight[producer_id]

    # -- timers -------------------------------------------------------------------------

    def _arm(self) -> None:
        self._timer.arm(self.flows.deadline())

    def _on_timer(self) -> None:
        self.flows.poll(self._loop.time())
        self._arm()

    def __repr__(self) -> str:
        return f"<RelayLink {self.peer_key.hex()[:16]} {self.host}:{self.port} {self.state}>"


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
        #: ``room_state_received(peer_key, msg)``: a peer told its share of a room
        self.room_state_received: Callable[[bytes, RoomState], None] = lambda key, msg: None
        self.config = config or RelayConfig()
        self.counters = RelayCounters()
        self.admission = PendingAdmission(self.config.admission)
        self.certificate = auth.make_certificate(private_key)
        self._server: AdmittingQuicServer | None = None
        self._sessions: set[QuicRelayProtocol] = set()
        self._links: dict[bytes, RelayLink] = {}
        self._closing: set[asyncio.Future[None]] = set()
        self._retired: dict[str, int] = {}

    async def start(self) -> None:
        """Start the QUIC server on ``config.host:config.port``."""
        cfg = self.config
        qc = QuicConfiguration(
            is_client=False,
            alpn_protocols=[ALPN],
            max_datagram_frame_size=65535,
            max_datagram_size=cfg.max_datagram_size,
            idle_timeout=cfg.idle_timeout,
            congestion_control_algorithm=cfg.congestion_control,
        )
        qc.certificate = self.certificate
        qc.private_key = self.private_key
        _, server = await open_udp(
            lambda: AdmittingQuicServer(
                self.admission.admit,
                self.admission.settle,
                configuration=qc,
                create_protocol=self._accept,
            ),
            (cfg.host, cfg.port),
            cfg.udp_offload,
        )
        assert isinstance(server, AdmittingQuicServer)
        self._server = server

    def _accept(self, quic: QuicConnection, **kw: Any) -> QuicRelayProtocol:
        core = RelayConnection(
            self.config,
            self.counters,
            asyncio.get_running_loop().time(),
            handshake=ServerHandshake(
                self.private_key, lambda key: self.authorize(key), self.public_key
            ),
            admission=self.admission,
            source=self._server.take_admitting_source() if self._server else None,
        )
        core.origin = OriginFlows(
            core,
            lambda producer_id: self.lookup(producer_id),
            self.config,
            self.counters,
            lambda key, pid: key is not None and self.may_subscribe(key, pid),
        )
        core.on_room_state = self._room_state
        self.counters.connections_accepted += 1
        proto = QuicRelayProtocol(quic, core, False, **kw)
        self._sessions.add(proto)
        core.on_up = self._supersede
        core.on_down = lambda c, code, reason: self._session_down(proto)
        return proto

    def _session_down(self, proto: QuicRelayProtocol) -> None:
        if proto in self._sessions:
            self._sessions.discard(proto)
            self._retire_stats(proto)

    def _retire_stats(self, proto: QuicRelayProtocol) -> None:
        for key, value in proto.stats().items():
            self._retired[key] = self._retired.get(key, 0) + value

    def _room_state(self, core: RelayConnection, msg: RoomState) -> None:
        if core.peer_key is not None:
            self.room_state_received(core.peer_key, msg)

    def send_room_state(self, peer_key: bytes, msg: RoomState) -> bool:
        """Send ``msg`` to ``peer_key`` on a live connection: the link to it, else one it
        opened to this node. False if there is none."""
        link = self._links.get(peer_key)
        if link is not None and link.send(msg):
            return True
        for session in self._sessions:
            core = session.core
            if core.peer_key == peer_key and core.authed and not core.dead:
                core.send_msg(msg)
                return True
        return False

    def _supersede(self, core: RelayConnection) -> None:
        # a reconnecting peer supersedes its previous (probably dead) connection, so
        # there is never more than one flow per (producer, remote node)
        for other in list(self._sessions):
            theirs = other.core
            if theirs is not core and theirs.peer_key == core.peer_key and theirs.authed:
                other.abort(ErrorCode.SHUTDOWN, "superseded by a new connection")

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on (after :meth:`start`)."""
        address = self._server.local_address() if self._server is not None else None
        if address is None:
            raise RelayError("endpoint not started")
        return address

    def quic_stats(self) -> dict[str, int]:
        """Packets sent and received by the QUIC fast path and calls to aioquic's general
        path, summed over every connection so far (both roles)."""
        protos = list(self._sessions) + [
            link._conn for link in self._links.values() if link._conn is not None
        ]
        total = dict(self._retired)
        for proto in protos:
            for key, value in proto.stats().items():
                total[key] = total.get(key, 0) + value
        return total

    @property
    def connections(self) -> list[RelayConnection]:
        """Inbound connections (this node serves them), as protocol state."""
        return [s.core for s in self._sessions]

    def revoke(self, peer_key: bytes) -> None:
        """``peer_key`` is no longer authorized: close its inbound connections (ending the
        flows served on them) and the link to it (ending the flows pulled from it)."""
        self.admission.counters.revoked += 1
        for session in list(self._sessions):
            if session.core.peer_key == peer_key:
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
            (s.core.peer_key, f.producer_id, f.flow_id, f.stats)
            for s in list(self._sessions)
            if s.core.origin is not None
            for f in s.core.origin.flows.values()
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
