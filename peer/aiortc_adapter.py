"""Every use of aiortc/aioice private internals lives here (pinned: aiortc 1.16.0,
aioice 0.13.0). The rest of Cascade talks to aiortc only through these helpers.

What we rely on, and why:

- Fast ingress (:func:`tap_receiver`, :class:`_IngressDemux`; opt-in, see
  :func:`fast_ingress_enabled`): a tapped receiver's media
  never takes aiortc's receive path. ``aioice.ice.Connection.data_received`` is replaced
  per publisher connection (where aioice hands over a non-STUN datagram, before its
  ``_queue`` and aiortc's DTLS task); media of tapped receivers is decrypted there with
  ``RTCDtlsTransport._rx_srtp`` (pylibsrtp's ``Session._srtp`` / ``_cdata`` / ``_buffer``
  and ``srtp_unprotect`` called directly, as :func:`sender_sink` protects) and handed to
  :class:`peer.ingress.IngressStream`. SSRCs are routed with
  ``RTCDtlsTransport._rtp_router`` (``ssrc_table``, ``payload_type_table``: aiortc's own
  SSRC-then-unique-payload-type rule); a learned SSRC is added to ``ssrc_table`` so
  aiortc routes the publisher's Sender Reports to the receiver. When ``receive()``
  configures a receiver, media already waiting in ``Connection._queue`` is taken out and
  delivered first, in order. Our RTCP (NACK, RR, REMB) is protected with
  ``RTCDtlsTransport._tx_srtp`` and sent on the nominated pair
  (``_connection._nominated``). ``RTCRtpReceiver._RTCRtpReceiver__rtcp_ssrc`` is the
  sender SSRC of that RTCP; ``RTCRtpReceiver._handle_rtcp_packet`` is wrapped to read
  Sender Reports (LSR/DLSR); ``RTCRtpReceiver.stop`` is wrapped so a stopped receiver's
  media no longer reaches the producer.
- Fast RTCP (:meth:`_IngressDemux._receive_rtcp`, :class:`_SenderReports`; see
  :func:`fast_rtcp_enabled`): the same per-connection demux (installed by
  :func:`hook_sender` on a subscribe connection) decrypts SRTCP with
  ``srtp_unprotect_rtcp`` on ``RTCDtlsTransport._rx_srtp`` and routes what
  :func:`peer.rtcp.parse_feedback` read through ``RTCDtlsTransport._rtp_router``
  (``senders``: hooked senders carry ``_cascade_rtcp``; ``ssrc_table``: tapped receivers).
  Feedback for a sender or receiver we did not hook goes, decrypted, to
  ``RTCDtlsTransport._handle_rtcp_data``. ``RTCRtpSender._run_rtcp`` is replaced per
  instance: it sets ``_RTCRtpSender__rtcp_started`` / ``__rtcp_exited`` (awaited by
  ``stop()``), joins the shared Sender Report timer and sends BYE when cancelled; SRs
  carry ``RTCRtpSender._ssrc`` and the CNAME ``_RTCRtpSender__cname``, are protected with
  ``_tx_srtp`` and sent on the nominated pair.
- ``RTCRtpReceiver._RTCRtpReceiver__jitter_buffer``: replaced per tapped receiver so that
  a packet which still reaches aiortc's path (none should) is never decoded. The
  decoder thread is stopped right away. ``__remote_streams`` / ``__rtx_ssrc`` are still
  read for receivers that are not tapped (clients' :func:`receiver_loss`).
- ``aioice.ice.StunProtocol.datagram_received``: datagrams whose first byte is 128..191
  (RTP/RTCP, RFC 7983) go straight to the connection without aioice's STUN parser.
- ``RTCRtpReceiver._send_rtcp_pli``: asks the publisher for a keyframe.
- ``aioice.ice.Connection._protocols``: :class:`RtpCounter` (load generators) enlarges the
  receive buffers of a connection's sockets.
- ``RTCRtpSender._retransmit`` / ``_send_keyframe`` / ``_send_rtcp`` /
  ``_handle_rtcp_packet``: overridden per sender to answer NACK from the
  producer cache, pass PLI upstream, write correct Sender Reports and read
  Receiver Reports.
- ``RTCDtlsTransport._tx_srtp`` and aioice's nominated pair: the forwarding
  hot path protects and sends synchronously, without a coroutine per packet.
- ``aioice.ice.get_host_addresses``: ICE listen addresses are configurable.
- ``aioice.ice.Connection.gather_candidates`` and its ``_local_candidates``: host
  candidates announce a configured address instead of the bound one (a node binding
  0.0.0.0 or behind 1:1 NAT), like mediasoup's announced IP.
- ``aioice.ice.Connection.gather_candidates`` and its ``_protocols`` /
  ``_closing``: gathering runs shielded from cancellation (uvloop's
  ``create_datagram_endpoint`` leaks the socket it was binding when cancelled),
  and sockets it opens after the connection started closing are closed when it
  ends (``close()`` only closes the sockets gathered so far). Without this, a
  participant leaving while the node gathers for its offer leaks UDP sockets. The
  gathered sockets also get a larger receive buffer (:data:`ICE_RECEIVE_BUFFER`).
- ``aioice.ice.Connection.get_component_candidates``, ``_protocols`` and
  ``local_username``; ``aioice.ice.StunProtocol`` built by us: a node connection gathering
  under :func:`set_local_description` with shared ports gets, per ICE address, a
  ``StunProtocol`` whose transport is a :class:`_PortMember` of the node's
  :class:`SharedIcePort` (its host candidate built as aioice builds one), routed by its
  ``local_username``, which is first made longer and unique on the node's ports
  (``Connection._local_username``, read again by aiortc for the SDP after gathering).
  ``sender_sink`` then binds the consumer to the port's :class:`peer.egress.SendBatch`.
- ``aioice.ice.StunProtocol.connection_lost``: closes our dup of the ICE socket
  (see :func:`_send_socket`) when the ICE socket closes, instead of whenever the
  garbage collector gets to the protocol.
- ``aioice.ice.Connection.connect`` and its ``_closing`` / ``_query_consent_task``: a
  connection closed while its ICE checks were completing still starts consent checks
  when ``connect()`` resumes after ``close()`` (aioice 0.13). Their loop runs over the
  cleared nominated pairs, so it never fails and never ends: one task waking every
  5 s per such connection, for the life of the process. The wrapped ``connect()``
  stops them.
- ``RTCDtlsTransport._recv_next``: one call handles one received datagram; its
  loop (``__run``) ends on any exception but ``pylibsrtp.Error``, so an empty
  datagram (``data[0]``), an oversized RTP-range one (pylibsrtp's ``ValueError``)
  or any other surprise from a stranger would end the transport for good. The
  guard makes every exception but ``ConnectionError`` (the transport closed) and
  cancellation drop that one datagram; :data:`dropped_datagrams` counts them.
- ``RTCPeerConnection._RTCPeerConnection__isClosed``: ``close()`` interrupted (its
  task cancelled) or failing half-way leaves this future pending, and every later
  ``close()`` awaits it for ever. :func:`close_peer_connection` runs each close once,
  shielded from its callers' cancellation, and settles the future if it failed.
- ``aioice.ice.StunProtocol.datagram_received``: STUN parsing raises more than
  the ``ValueError`` it catches (e.g. ``struct.error`` on a truncated attribute);
  on uvloop an exception there closes the ICE socket. Guarded the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import aioice.candidate
import aioice.ice
import aioice.utils
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtp import RtcpRrPacket, RtcpSenderInfo, RtcpSrPacket, RtpPacket
from pylibsrtp._binding import ffi as _srtp_ffi
from pylibsrtp._binding import lib as _srtp_lib

from peer import datagrams
from peer.egress import BatchScope, ProtectedSender, SendBatch
from peer.ice_port import IcePortRoutes
from peer.ingress import IngressConfig, IngressStream, PacketHandler
from peer.rtcp import ReportSchedule, RtcpFeedback, bye, parse_feedback, sdes_cnames, sender_report
from peer.rtp import URI_ABS_SEND_TIME, URI_AUDIO_LEVEL, URI_MID, OutboundParams

log = logging.getLogger("cascade.rtc")
_ORIGINAL_GET_HOST_ADDRESSES = aioice.ice.get_host_addresses
_ORIGINAL_RECV_NEXT = RTCDtlsTransport._recv_next


class DroppedDatagrams:
    """Datagrams whose handling raised inside aiortc's receive loop and were dropped."""

    __slots__ = ("count", "last_error")

    def __init__(self) -> None:
        self.count = 0
        self.last_error = ""


dropped_datagrams = DroppedDatagrams()


async def _guarded_recv_next(self: RTCDtlsTransport) -> None:
    # Receives and handles one datagram. Whatever a datagram does to the DTLS, SRTP,
    # RTP/RTCP parsing or our RTCP hooks, it must not end the loop that carries every
    # later packet of this transport: only a closed transport (ConnectionError) or a
    # cancellation may do that.
    try:
        await _ORIGINAL_RECV_NEXT(self)
    except ConnectionError:
        raise
    except Exception as exc:
        _drop(exc)


def _drop(exc: Exception) -> None:
    dropped_datagrams.count += 1
    dropped_datagrams.last_error = f"{type(exc).__name__}: {exc}"[:200]
    log.debug("dropped a datagram: %r", exc)


_ORIGINAL_STUN_DATAGRAM_RECEIVED = aioice.ice.StunProtocol.datagram_received


def _guarded_stun_datagram_received(
    self: aioice.ice.StunProtocol, data: bytes | str, addr: tuple[Any, ...]
) -> None:
    try:
        if isinstance(data, bytes) and data and 127 < data[0] < 192:
            # RTP/RTCP (RFC 7983): never STUN, skip its parser
            self.receiver.data_received(data, self.local_candidate.component)
        else:
            _ORIGINAL_STUN_DATAGRAM_RECEIVED(self, data, addr)
    except Exception as exc:
        _drop(exc)


_ORIGINAL_GATHER_CANDIDATES = aioice.ice.Connection.gather_candidates
_ORIGINAL_STUN_CONNECTION_LOST = aioice.ice.StunProtocol.connection_lost


def _stun_connection_lost(self: aioice.ice.StunProtocol, exc: Exception | None) -> None:
    dup = _dup_sockets.pop(self, None)
    if dup is not None:
        dup.close()
    _ORIGINAL_STUN_CONNECTION_LOST(self, exc)


async def _gather_candidates_without_leaks(self: aioice.ice.Connection) -> None:
    gathering = asyncio.ensure_future(_announcing_gather_candidates(self))
    gathering.add_done_callback(lambda task: _close_if_closing(self, task))
    await asyncio.shield(gathering)


_ORIGINAL_ICE_CONNECT = aioice.ice.Connection.connect


async def _connect_without_orphan_consent(self: aioice.ice.Connection) -> None:
    await _ORIGINAL_ICE_CONNECT(self)
    if getattr(self, "_closing", False):
        task = self._query_consent_task
        self._query_consent_task = None
        if task is not None:
            task.cancel()


def _close_if_closing(conn: aioice.ice.Connection, gathering: asyncio.Future[None]) -> None:
    if not gathering.cancelled():
        gathering.exception()  # retrieved: the awaiting caller may be gone
    if getattr(conn, "_closing", False):
        for protocol in conn._protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        conn._protocols.clear()


RTCDtlsTransport._recv_next = _guarded_recv_next  # type: ignore[method-assign]
aioice.ice.Connection.gather_candidates = _gather_candidates_without_leaks  # type: ignore[method-assign]
aioice.ice.Connection.connect = _connect_without_orphan_consent  # type: ignore[method-assign]
aioice.ice.StunProtocol.connection_lost = _stun_connection_lost  # type: ignore[method-assign]
aioice.ice.StunProtocol.datagram_received = _guarded_stun_datagram_received  # type: ignore[method-assign]
_ice_addresses: list[str] | None = None
_ice_announce: str | None = None
_background: set[asyncio.Future[None]] = set()


def set_ice_addresses(addresses: list[str] | None, announce: str | None = None) -> None:
    """Restrict ICE host candidates to ``addresses`` (None restores aioice's default).

    aioice advertises every interface (and never loopback) by default; a node, test
    or benchmark sets this before creating peer connections. ``announce`` replaces the
    address of every host candidate of its family (IPv4 or IPv6) in what is offered to
    the other side, while the sockets stay bound to ``addresses`` (e.g. 0.0.0.0).
    """
    global _ice_addresses, _ice_announce
    _ice_addresses = list(addresses) if addresses is not None else None
    _ice_announce = announce
    if addresses is None:
        aioice.ice.get_host_addresses = _ORIGINAL_GET_HOST_ADDRESSES
    else:
        aioice.ice.get_host_addresses = _configured_host_addresses


# Media sockets get a larger receive buffer (the kernel caps it at net.core.rmem_max): a
# process briefly starved of CPU then queues a burst instead of dropping it.
ICE_RECEIVE_BUFFER = 2 * 1024 * 1024


async def _announcing_gather_candidates(self: aioice.ice.Connection) -> None:
    await _ORIGINAL_GATHER_CANDIDATES(self)
    for protocol in self._protocols:
        if isinstance(protocol.transport, _PortMember):
            continue  # the shared port has its own, larger buffer
        sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ICE_RECEIVE_BUFFER)
    announce = _ice_announce
    if announce is None:
        return
    v6 = ":" in announce
    for candidate in self._local_candidates:
        # the candidate object is also the socket's protocol.local_candidate: pairing and
        # checks keep using the bound socket, only the advertised address changes
        if candidate.type == "host" and (":" in candidate.host) == v6:
            candidate.host = announce


# Receive buffer of a shared ICE port (the kernel doubles it for bookkeeping).
SHARED_PORT_BUFFER = 16 * 1024 * 1024


class SharedIcePort(asyncio.DatagramProtocol):
    """One UDP socket carrying the ICE transports of every node connection on one address.

    Each transport keeps its own aioice ``StunProtocol`` (checks, consent, candidates as
    before) whose asyncio transport is a :class:`_PortMember` of this socket; datagrams
    are routed to it by :class:`peer.ice_port.IcePortRoutes`.
    """

    def __init__(self) -> None:
        self.routes: IcePortRoutes[aioice.ice.StunProtocol] = IcePortRoutes()
        self.transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] = ("", 0)
        self._send_socket: socket.socket | None = None
        self._scope = _batch_scope()
        self._batch: SendBatch | None = None
        self._batch_made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.address = tuple(transport.get_extra_info("sockname")[:2])
        if sock is not None:
            # every participant's media queues here: as large as the kernel allows
            _set_buffer(sock, SHARED_PORT_BUFFER, receive=True)
            size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
            if size < SHARED_PORT_BUFFER // 4:
                log.warning(
                    "ICE port %s: receive buffer %d KiB (net.core.rmem_max); a node with "
                    "many participants wants %d MiB",
                    self.address[1],
                    size // 1024,
                    SHARED_PORT_BUFFER // (1 << 20),
                )

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        address = (addr[0], addr[1])
        protocol = self.routes.route(data, address)
        if protocol is not None:
            # what this datagram fans out to leaves in one sendmmsg when it is handled
            scope = self._scope
            scope.enter()
            try:
                protocol.datagram_received(data, address)
            finally:
                scope.exit()

    def error_received(self, exc: Exception) -> None:
        log.debug("ICE port %s: %r", self.address, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._batch is not None:
            self._batch.flush()
            self._batch = None
        if self._send_socket is not None:
            self._send_socket.close()
            self._send_socket = None
        for member in list(self.routes.members()):
            if isinstance(member.transport, _PortMember):
                member.transport.close()

    def send_socket(self) -> socket.socket:
        """A plain non-blocking dup of the port's socket (see :func:`_send_socket`)."""
        if self._send_socket is None:
            assert self.transport is not None
            raw = self.transport.get_extra_info("socket")
            sock = socket.socket(raw.family, socket.SOCK_DGRAM, 0, os.dup(raw.fileno()))
            sock.setblocking(False)
            _set_buffer(sock, 8 * 1024 * 1024, receive=False)
            self._send_socket = sock
        return self._send_socket

    def batch(self) -> SendBatch | None:
        """The port's :class:`peer.egress.SendBatch` (None without ``sendmmsg`` or when
        :data:`BATCHED_SENDS` is off)."""
        if not self._batch_made and self.transport is not None:
            self._batch_made = True
            if BATCHED_SENDS and datagrams.available():
                self._batch = datagrams.send_batch(self.send_socket(), self._scope)
        return self._batch

    def batch_stats(self) -> dict[str, int]:
        """Datagrams sent in batches, the ``sendmmsg`` calls and datagrams dropped."""
        batch = self._batch
        if batch is None:
            return {"sent": 0, "calls": 0, "dropped": 0}
        return {"sent": batch.sent, "calls": batch.calls, "dropped": batch.dropped}

    def attach(self, connection: aioice.ice.Connection, component: int) -> aioice.ice.StunProtocol:
        """A StunProtocol of ``connection`` on this port, with its host candidate."""
        protocol = aioice.ice.StunProtocol(connection)
        protocol.connection_made(_PortMember(self, protocol))
        host, port = self.address
        protocol.local_candidate = aioice.Candidate(
            foundation=aioice.candidate.candidate_foundation("host", "udp", host),
            component=component,
            transport="udp",
            priority=aioice.candidate.candidate_priority(component, "host"),
            host=host,
            port=port,
            type="host",
        )
        self.routes.add(connection.local_username, protocol)
        return protocol

    def close(self) -> None:
        """Close the socket (its transports' protocols are told)."""
        if self.transport is not None:
            self.transport.close()


class _PortMember(asyncio.DatagramTransport):
    """One ICE transport's view of a :class:`SharedIcePort`."""

    def __init__(self, port: SharedIcePort, protocol: aioice.ice.StunProtocol) -> None:
        super().__init__()
        self.port = port
        self._protocol = protocol
        self._closing = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing or self.port.transport is None:
            return
        self.port.routes.sent(self._protocol, data)
        self.port.transport.sendto(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self.port.transport is None:
            return default
        return self.port.transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.port.routes.remove(self._protocol)
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


class SharedIcePorts:
    """A node's shared ICE ports, one per ICE address (the same port number when free)."""

    def __init__(self, ports: dict[str, SharedIcePort]) -> None:
        self.by_address = ports

    @property
    def port(self) -> int:
        """The first port's number (0 if none is open)."""
        return next((p.address[1] for p in self.by_address.values()), 0)

    def stats(self) -> dict[str, int]:
        """The port, the transports on it and the datagrams nobody was found for."""
        ports = self.by_address.values()
        batches = [p.batch_stats() for p in ports]
        return {
            "port": self.port,
            "transports": sum(len(p.routes) for p in ports),
            "unroutable": sum(p.routes.unroutable for p in ports),
            "batched_datagrams": sum(b["sent"] for b in batches),
            "sendmmsg_calls": sum(b["calls"] for b in batches),
            "batch_dropped": sum(b["dropped"] for b in batches),
        }

    def close(self) -> None:
        """Close every port."""
        for port in self.by_address.values():
            port.close()


async def open_shared_ice_ports(addresses: list[str], port: int) -> SharedIcePorts:
    """Bind one UDP socket per address on ``port`` (0: a free port, then the same number
    on the other addresses where possible). Raises OSError if ``port`` is taken."""
    loop = asyncio.get_running_loop()
    ports: dict[str, SharedIcePort] = {}
    chosen = port
    try:
        for address in addresses:
            try:
                _, protocol = await loop.create_datagram_endpoint(
                    SharedIcePort, local_addr=(address, chosen)
                )
            except OSError:
                if port != 0 or chosen == 0:
                    raise
                # the first address's free port is taken on this one: any free port here
                _, protocol = await loop.create_datagram_endpoint(
                    SharedIcePort, local_addr=(address, 0)
                )
            ports[address] = protocol
            if chosen == 0:
                chosen = protocol.address[1]
    except OSError:
        for opened in ports.values():
            opened.close()
        raise
    return SharedIcePorts(ports)


# Fan-outs on a shared port leave in one sendmmsg (CASCADE_BATCHED_SENDS=0: a sendto each).
BATCHED_SENDS = os.environ.get("CASCADE_BATCHED_SENDS", "1") != "0"
_scopes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BatchScope] = (
    weakref.WeakKeyDictionary()
)


def _batch_scope() -> BatchScope:
    loop = asyncio.get_running_loop()
    scope = _scopes.get(loop)
    if scope is None:
        scope = _scopes[loop] = BatchScope(loop.call_soon)
    return scope


_shared_ports: contextvars.ContextVar[SharedIcePorts | None] = contextvars.ContextVar(
    "cascade_shared_ice_ports", default=None
)


async def set_local_description(pc: Any, description: Any, ports: SharedIcePorts | None) -> None:
    """``pc.setLocalDescription(description)``, gathering on ``ports`` if given (host
    candidates on the node's shared ICE ports instead of a socket per transport)."""
    token = _shared_ports.set(ports)
    try:
        await pc.setLocalDescription(description)
    finally:
        _shared_ports.reset(token)


_ORIGINAL_COMPONENT_CANDIDATES = aioice.ice.Connection.get_component_candidates


# ICE username fragment of a connection on a shared port: aioice's 4 characters collide
# among a few hundred transports (1 % at ~540), so longer, and unique on the node's ports.
SHARED_PORT_UFRAG_LENGTH = 8


def _new_ufrag() -> str:
    return aioice.utils.random_string(SHARED_PORT_UFRAG_LENGTH)


def _unique_ufrag(conn: aioice.ice.Connection, ports: SharedIcePorts) -> None:
    def taken(ufrag: str) -> bool:
        for port in ports.by_address.values():
            owner = port.routes.member_of(ufrag)
            if owner is not None and owner.receiver is not conn:
                return True
        return False

    ufrag = conn.local_username
    while len(ufrag) < SHARED_PORT_UFRAG_LENGTH or taken(ufrag):
        ufrag = _new_ufrag()
    # read again by aiortc after gathering, for the SDP (add_transport_description)
    conn._local_username = ufrag


async def _component_candidates(
    self: aioice.ice.Connection, component: int, addresses: list[str], timeout: int = 5
) -> list[Any]:
    ports = _shared_ports.get()
    if ports is None or component != 1:  # aiortc multiplexes RTCP: component 1 only
        return await _ORIGINAL_COMPONENT_CANDIDATES(self, component, addresses, timeout)
    _unique_ufrag(self, ports)
    candidates = []
    for address in addresses:
        port = ports.by_address.get(address)
        if port is None or port.transport is None:
            continue
        protocol = port.attach(self, component)
        self._protocols.append(protocol)
        candidates.append(protocol.local_candidate)
    return candidates


aioice.ice.Connection.get_component_candidates = _component_candidates  # type: ignore[method-assign]


def _configured_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    assert _ice_addresses is not None
    return [a for a in _ice_addresses if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


def rtc_configuration() -> RTCConfiguration:
    """Peer connection config: no STUN/TURN servers (aiortc defaults to a public STUN),
    and every transceiver on one bundled transport from its creation.

    With aiortc's default "balanced" policy, a transceiver shares the transport of the
    first transceiver of its kind; when an offer then bundles everything onto the first
    m-line, aiortc moves only transceivers not already sharing, so the second and later
    video transceivers created in one offer stay on a stopped transport and never send
    (a late joiner saw only the first of several videos). "max-bundle" avoids the move.
    """
    return RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


class SilentTrack(MediaStreamTrack):
    """A track that never yields: its sender only carries packets we inject."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._never: asyncio.Future[None] = asyncio.get_event_loop().create_future()

    async def recv(self) -> Any:
        await self._never
        raise asyncio.CancelledError

    def stop(self) -> None:
        if not self._never.done():
            self._never.cancel()
        super().stop()


class _ForwardingBuffer:
    """Stands in for aiortc's jitter buffer of a tapped receiver: nothing is decoded. A
    packet that still took aiortc's receive path is forwarded only while the fast path
    has delivered nothing for the receiver (it never should, see :meth:`_IngressDemux.
    drain_queue`); later it would reach the producer out of order, and is dropped."""

    __slots__ = ("tap",)

    def __init__(self, tap: _Tap) -> None:
        self.tap = tap

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        self.tap.aiortc_ssrc = packet.ssrc  # after RTX unwrap: the media SSRC
        stream = self.tap.stream
        if stream is not None and stream.stats.started:
            ingress_counters.late_drops += 1
            return False, None
        level = packet.extensions.audio_level
        self.tap.handler(
            packet.sequence_number,
            packet.timestamp,
            packet.marker,
            packet.payload,
            level[1] if level is not None else None,
        )
        return False, None

    def remove(self, count: int) -> None:  # pragma: no cover - aiortc API shape
        return None


class IngressCounters:
    """Node-wide counters of the fast ingress path."""

    __slots__ = (
        "late_drops",
        "packets",
        "rtcp_handed_to_aiortc",
        "rtcp_received",
        "rtcp_sent",
        "sender_reports",
        "srtp_errors",
    )

    def __init__(self) -> None:
        self.packets = 0
        self.late_drops = 0  # reached aiortc's path after the fast path began: dropped
        self.srtp_errors = 0  # failed authentication or replay: dropped
        self.rtcp_sent = 0
        self.rtcp_received = 0  # SRTCP datagrams handled on the fast path
        self.rtcp_handed_to_aiortc = 0  # decrypted, but for a sender/receiver not ours
        self.sender_reports = 0  # SRs sent by the shared report timer


ingress_counters = IngressCounters()


class _Tap:
    """A tapped receiver: its :class:`IngressStream` (engine) and the I/O around it."""

    def __init__(self, receiver: RTCRtpReceiver, handler: PacketHandler) -> None:
        self.receiver = receiver
        self.handler = handler
        self.stream: IngressStream | None = None  # once receive() configured it
        self.aiortc_ssrc: int | None = None  # media SSRC seen on aiortc's path
        self.dtls: Any = receiver.transport
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.stopped = False

    def configure(self, parameters: Any) -> None:
        kind = self.receiver.track.kind
        self.stream = IngressStream(
            ingress_config(kind, parameters), self.handler, self._rtcp_ssrc()
        )
        self._schedule()

    def _rtcp_ssrc(self) -> int:
        return getattr(self.receiver, "_RTCRtpReceiver__rtcp_ssrc", None) or 0

    def accepts(self, payload_type: int) -> bool:
        stream = self.stream
        if stream is None:
            return False
        config = stream.config
        return payload_type in config.payload_types or payload_type in config.rtx_payload_types

    def send_rtcp(self, packets: list[bytes]) -> None:
        _send_rtcp(self.dtls, packets)

    def _schedule(self) -> None:
        stream = self.stream
        if stream is None or self.stopped:
            return
        now = time.time()
        self._due = stream.deadline(now)
        self._timer = asyncio.get_event_loop().call_later(max(0.0, self._due - now), self._on_timer)

    def wake(self) -> None:
        """Poll sooner if the stream now has earlier work (a gap to NACK again)."""
        stream = self.stream
        if (
            stream is not None
            and self._timer is not None
            and stream.deadline(time.time()) < self._due
        ):
            self._timer.cancel()
            self._schedule()

    def _on_timer(self) -> None:
        self._timer = None
        stream = self.stream
        if stream is None or self.dtls._state in (DtlsState.CLOSED, DtlsState.FAILED):
            return
        try:
            stream.rtcp_ssrc = self._rtcp_ssrc()
            packets = stream.poll(time.time())
            if packets:
                self.send_rtcp(packets)
        except Exception as exc:
            _drop(exc)
        self._schedule()

    def stop(self) -> None:
        """No more timers (the receiver stopped)."""
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_sender_report(self, packet: Any) -> None:
        if self.stream is not None:
            self.stream.on_sender_report(packet.ssrc, packet.sender_info.ntp_timestamp, time.time())


def _send_rtcp(dtls: Any, packets: list[bytes]) -> None:
    """Protect each RTCP packet with the transport's SRTP session and send it on the
    nominated pair (nothing before DTLS completed)."""
    if dtls._state != DtlsState.CONNECTED or dtls._tx_srtp is None:
        return
    pair = dtls.transport._connection._nominated.get(1)
    if pair is None or pair.protocol.transport is None:
        return
    sock = _send_socket(pair.protocol)
    for packet in packets:
        with contextlib.suppress(BlockingIOError):
            sock.sendto(dtls._tx_srtp.protect_rtcp(packet), pair.remote_addr)
            ingress_counters.rtcp_sent += 1


def ingress_config(kind: str, parameters: Any) -> IngressConfig:
    """The engine's view of what a publisher negotiated (an RTCRtpReceiveParameters)."""
    media: dict[int, int] = {}
    rtx: dict[int, int] = {}
    for codec in parameters.codecs:
        if codec.mimeType.lower().endswith("/rtx"):
            apt = codec.parameters.get("apt")
            if isinstance(apt, int):
                rtx[codec.payloadType] = apt
        else:
            media[codec.payloadType] = codec.clockRate
    rtx = {pt: apt for pt, apt in rtx.items() if apt in media}
    clock_rate = next(iter(media.values()), 90000)
    ext = {e.uri: e.id for e in parameters.headerExtensions}
    rtx_ssrcs = {e.rtx.ssrc: e.ssrc for e in parameters.encodings if e.rtx is not None}
    video = kind == "video"
    return IngressConfig(
        kind=kind,
        clock_rate=clock_rate,
        payload_types=frozenset(media),
        rtx_payload_types=rtx,
        rtx_ssrcs=rtx_ssrcs,
        audio_level_ext_id=ext.get(URI_AUDIO_LEVEL),
        nack=video,
        remb=video,
    )


class _IngressDemux:
    """The fast ingress path of one ICE connection (a publisher's bundled transport).

    Sits where aioice hands a non-STUN datagram to the connection, before aiortc's queue
    and DTLS task: SRTP media of a tapped receiver is decrypted here with the transport's
    SRTP session and given to that receiver's :class:`IngressStream`; everything else
    (DTLS, SRTCP, other receivers' media) continues to aiortc unchanged. SSRCs are routed
    with aiortc's own rules (the SDP's SSRCs, else a payload type only one receiver has),
    and an SSRC learned from a payload type is kept only once a packet authenticated.
    """

    def __init__(self, conn: Any, dtls: Any) -> None:
        self.conn = conn
        self.dtls = dtls
        self.taps: dict[RTCRtpReceiver, _Tap] = {}
        self.routes: dict[bytes, _Tap] = {}  # SSRC (4 bytes, as on the wire) -> tap
        self._original = conn.data_received
        self._session: Any = None
        self._ctx: Any = None
        self._cdata: Any = None
        self._buffer: Any = None
        self._limit = 0
        self._length = _srtp_ffi.new("int *")
        self._unprotect = _srtp_lib.srtp_unprotect
        self._unprotect_rtcp = _srtp_lib.srtp_unprotect_rtcp
        self.rtcp = fast_rtcp_enabled()
        conn.data_received = self.data_received

    def data_received(self, data: bytes, component: int) -> None:
        if not self._deliver(data):
            self._original(data, component)

    def _deliver(self, data: bytes) -> bool:
        """Handle ``data`` on the fast path if it is media of a tapped receiver, or
        SRTCP (with :func:`fast_rtcp_enabled`)."""
        if len(data) < 12 or not 127 < data[0] < 192:
            return False
        if 191 < data[1] < 224:  # RTCP (RFC 5761)
            return self.rtcp and self._receive_rtcp(data)
        if self.dtls._state is not DtlsState.CONNECTED:
            return False
        key = data[8:12]
        tap = self.routes.get(key)
        if tap is not None:
            self._receive(tap, data)
            return True
        tap = self._route(data)
        if tap is None:
            return False
        if self._receive(tap, data):  # an SSRC is learned only from an authentic packet
            self.routes[key] = tap
            self.dtls._rtp_router.ssrc_table.setdefault(int.from_bytes(key, "big"), tap.receiver)
        return True

    def _route(self, data: bytes) -> _Tap | None:
        router = self.dtls._rtp_router
        receiver = router.ssrc_table.get(int.from_bytes(data[8:12], "big"))
        candidates = router.payload_type_table.get(data[1] & 0x7F, ())
        if receiver is None and len(candidates) == 1:
            receiver = next(iter(candidates))
        elif receiver not in candidates:
            return None
        tap = self.taps.get(receiver)
        if tap is None or not tap.accepts(data[1] & 0x7F):
            return None
        return tap

    def _receive(self, tap: _Tap, data: bytes) -> bool:
        try:
            plain = self._decrypt(data, self._unprotect)
            if plain is None:
                return False
            stream = tap.stream
            assert stream is not None
            ingress_counters.packets += 1
            rtcp = stream.receive(plain, time.time())
            if rtcp:
                tap.send_rtcp(rtcp)
                tap.wake()
            return True
        except Exception as exc:  # one datagram must never end anything
            _drop(exc)
            return False

    def _decrypt(self, data: bytes, unprotect: Any) -> bytes | None:
        """``data`` decrypted with the transport's SRTP session (``srtp_unprotect`` or
        ``srtp_unprotect_rtcp``); None, counted, if it fails authentication or replay."""
        if self._session is not self.dtls._rx_srtp:
            self._resolve()
        n = len(data)
        if n > self._limit:
            raise ValueError("datagram too long for SRTP")
        length = self._length
        length[0] = n
        self._buffer[0:n] = data
        if unprotect(self._ctx, self._cdata, length):
            ingress_counters.srtp_errors += 1
            return None
        return self._buffer[0 : length[0]]

    def _receive_rtcp(self, data: bytes) -> bool:
        """Decrypt SRTCP with the transport's session and act on it (:meth:`_dispatch`);
        False leaves the datagram to aiortc (SRTP not established yet)."""
        dtls = self.dtls
        if dtls._state is not DtlsState.CONNECTED or dtls._rx_srtp is None:
            return False
        try:
            plain = self._decrypt(data, self._unprotect_rtcp)
            if plain is None:
                return True
            feedback = parse_feedback(plain)
            ingress_counters.rtcp_received += 1
            if not self._dispatch(feedback):
                # for a sender or receiver aiortc knows and we do not: let aiortc act on it
                ingress_counters.rtcp_handed_to_aiortc += 1
                task = asyncio.ensure_future(dtls._handle_rtcp_data(plain))
                _background.add(task)
                task.add_done_callback(_background.discard)
        except Exception as exc:  # one datagram must never end anything
            _drop(exc)
        return True

    def _dispatch(self, feedback: RtcpFeedback) -> bool:
        """Give each piece of feedback to its hooked sender (RR, NACK, PLI/FIR, REMB) or
        tapped receiver (SR); False, acting on nothing, if any piece is for a sender or
        receiver aiortc knows that is not hooked or tapped here."""
        router = self.dtls._rtp_router
        senders = router.senders
        hooks: dict[int, _SenderHook | None] = {}
        for ssrc in feedback.media_ssrcs():
            sender = senders.get(ssrc)
            hook = getattr(sender, "_cascade_rtcp", None) if sender is not None else None
            if sender is not None and not isinstance(hook, _SenderHook):
                return False
            hooks[ssrc] = hook
        taps: list[tuple[_Tap, int, int]] = []
        for ssrc, ntp in feedback.sender_reports:
            receiver = router.ssrc_table.get(ssrc)
            if receiver is None:
                continue
            tap = self.taps.get(receiver)
            if tap is None:
                return False
            taps.append((tap, ssrc, ntp))
        now = time.time()
        for tap, ssrc, ntp in taps:
            if tap.stream is not None:
                tap.stream.on_sender_report(ssrc, ntp, now)
        for block in feedback.reports:
            hook = hooks.get(block.ssrc)
            if hook is not None:
                hook.on_receiver_report(block.fraction_lost, block.packets_lost, block.jitter)
        for ssrc, lost in feedback.nacks:
            hook = hooks.get(ssrc)
            if hook is not None and lost:
                hook.on_nack(lost)
        for ssrc in feedback.keyframe_requests:
            hook = hooks.get(ssrc)
            if hook is not None:
                hook.on_keyframe_request()
        for bitrate, ssrcs in feedback.rembs:
            for ssrc in ssrcs:
                hook = hooks.get(ssrc)
                if hook is not None:
                    hook.remb_bitrate = bitrate
        return True

    def forget(self, tap: _Tap) -> None:
        """A tapped receiver stopped (its transceiver or peer connection closed): none of
        its media reaches the producer any more."""
        self.taps.pop(tap.receiver, None)
        self.routes = {key: t for key, t in self.routes.items() if t is not tap}
        tap.stop()

    def drain_queue(self) -> None:
        """Take the datagrams aioice queued for aiortc before a receiver was configured
        through the fast path now, in arrival order; the rest goes back, in order.

        Between DTLS completing and ``receive()`` registering a receiver, its media waits
        in the connection's queue; handed to aiortc later it would reach the producer
        after newer packets of the fast path (a late keyframe start breaks a consumer).
        """
        queue = self.conn._queue
        pending = []
        while not queue.empty():
            pending.append(queue.get_nowait())
        for item in pending:
            if item is None or not self._deliver(item[0]):
                queue.put_nowait(item)

    def _resolve(self) -> None:
        session = self.dtls._rx_srtp
        if session is None:
            raise ConnectionError("SRTP not established")
        self._session = session
        self._cdata = session._cdata
        self._buffer = session._buffer
        self._limit = len(session._cdata)
        self._ctx = session._srtp[0]


def tap_receiver(receiver: RTCRtpReceiver, handler: PacketHandler) -> None:
    """Deliver every received RTP packet of ``receiver`` to ``handler``; never decode.

    ``handler(seq, timestamp, marker, payload, audio_level)`` is called synchronously
    on the event loop. With :func:`fast_ingress_enabled`, from the fast ingress path
    (:class:`_IngressDemux`): after SRTP,
    RTX unwrap and NACK towards the publisher, which also gets receiver reports and REMB
    (:class:`peer.ingress.IngressStream`). aiortc's receive path, jitter buffer and
    decoder never see these packets.
    """
    tap = _Tap(receiver, handler)
    receiver._cascade_tap = tap  # type: ignore[attr-defined]
    receiver._RTCRtpReceiver__jitter_buffer = _ForwardingBuffer(tap)  # type: ignore[attr-defined]
    _stop_decoder_thread(receiver)
    if not fast_ingress_enabled():
        _tap_aiortc_path(receiver)
        return
    dtls = receiver.transport
    conn = dtls.transport._connection
    demux = getattr(conn, "_cascade_ingress", None)
    if demux is None or demux.dtls is not dtls:
        demux = conn._cascade_ingress = _IngressDemux(conn, dtls)  # type: ignore[attr-defined]
    demux.taps[receiver] = tap
    original_receive = receiver.receive
    original_stop = receiver.stop
    original_handle_rtcp = receiver._handle_rtcp_packet

    async def receive(parameters: Any) -> None:
        await original_receive(parameters)
        # receive() starts aiortc's decoder thread; nothing is ever queued to it,
        # but stopping it makes "no decoder on the forwarding path" structural.
        _stop_decoder_thread(receiver)
        if tap.stream is None and not tap.stopped:
            tap.configure(parameters)
            with contextlib.suppress(Exception):
                demux.drain_queue()

    async def handle_rtcp(packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            tap.on_sender_report(packet)
        await original_handle_rtcp(packet)

    async def stop() -> None:
        demux.forget(tap)
        await original_stop()

    receiver.receive = receive  # type: ignore[method-assign]
    receiver.stop = stop  # type: ignore[method-assign]
    receiver._handle_rtcp_packet = handle_rtcp  # type: ignore[method-assign]


def fast_ingress_enabled() -> bool:
    """Whether publisher media takes the fast ingress path (:class:`_IngressDemux`): the
    default; ``CASCADE_FAST_INGRESS=0`` puts it back on aiortc's receive path up to the
    jitter buffer. (The decode error once seen at a drain switch with the fast path came
    from half frames at the switch, fixed in the engine: ``Consumer._end_frame``.)"""
    return os.environ.get("CASCADE_FAST_INGRESS", "1") != "0"


def _tap_aiortc_path(receiver: RTCRtpReceiver) -> None:
    original_receive = receiver.receive

    async def receive(parameters: Any) -> None:
        await original_receive(parameters)
        _stop_decoder_thread(receiver)

    receiver.receive = receive  # type: ignore[method-assign]


def _stop_decoder_thread(receiver: RTCRtpReceiver) -> None:
    thread = getattr(receiver, "_RTCRtpReceiver__decoder_thread", None)
    if thread is not None:
        receiver._RTCRtpReceiver__decoder_queue.put(None)  # type: ignore[attr-defined]
        receiver._RTCRtpReceiver__decoder_thread = None  # type: ignore[attr-defined]


def ingress_stream(receiver: RTCRtpReceiver) -> IngressStream | None:
    """The engine-side receive state of a tapped receiver (None before it was configured)."""
    tap = getattr(receiver, "_cascade_tap", None)
    return tap.stream if isinstance(tap, _Tap) else None


def media_ssrc(receiver: RTCRtpReceiver) -> int | None:
    """The media SSRC a tapped receiver last forwarded (never an RTX or probe SSRC)."""
    tap = getattr(receiver, "_cascade_tap", None)
    if not isinstance(tap, _Tap):
        return None
    return tap.stream.media_ssrc if tap.stream is not None else tap.aiortc_ssrc


def receiver_loss(receiver: RTCRtpReceiver) -> tuple[int, int, float]:
    """(packets received, packets lost, jitter in clock units) over the media streams."""
    stream = ingress_stream(receiver)
    if stream is not None:
        stats = stream.stats
        return stats.received, max(0, stats.lost), float(stats.jitter)
    streams = getattr(receiver, "_RTCRtpReceiver__remote_streams", {})
    rtx = set(getattr(receiver, "_RTCRtpReceiver__rtx_ssrc", {}))
    received = lost = 0
    jitter = 0.0
    for ssrc, s in streams.items():
        if ssrc in rtx:
            continue
        received += s.packets_received
        lost += max(0, s.packets_lost)
        jitter = max(jitter, s.jitter)
    return received, lost, jitter


def remote_media_ssrcs(receiver: RTCRtpReceiver) -> list[int]:
    """SSRCs (not RTX) an ordinary, untapped receiver has received media on."""
    streams = getattr(receiver, "_RTCRtpReceiver__remote_streams", {})
    rtx = set(getattr(receiver, "_RTCRtpReceiver__rtx_ssrc", {}))
    return [ssrc for ssrc in streams if ssrc not in rtx]


def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    """Send RTCP PLI to a publisher (fire and forget)."""
    task = asyncio.ensure_future(receiver._send_rtcp_pli(media_ssrc))
    _background.add(task)
    task.add_done_callback(_background.discard)


def decoder_running(receiver: RTCRtpReceiver) -> bool:
    """Whether aiortc's decoder thread exists for this receiver."""
    return getattr(receiver, "_RTCRtpReceiver__decoder_thread", None) is not None


def encoder_created(sender: RTCRtpSender) -> bool:
    """Whether aiortc created an encoder for this sender."""
    return getattr(sender, "_RTCRtpSender__encoder", None) is not None


def negotiated_codec(transceiver: RTCRtpTransceiver) -> Any | None:
    """The primary negotiated codec (RTCRtpCodecParameters) of a transceiver."""
    for codec in transceiver._codecs:
        if codec.mimeType.lower() != f"{transceiver.kind}/rtx":
            return codec
    return None


def outbound_params(transceiver: RTCRtpTransceiver) -> OutboundParams:
    """SSRCs, payload types and extension ids a subscriber negotiated for a sender."""
    sender = transceiver.sender
    codec = negotiated_codec(transceiver)
    if codec is None:
        raise ValueError("transceiver has no negotiated codec")
    rtx_pt = None
    for c in transceiver._codecs:
        if c.mimeType.lower().endswith("/rtx") and c.parameters.get("apt") == codec.payloadType:
            rtx_pt = c.payloadType
    ext = {e.uri: e.id for e in transceiver._headerExtensions}
    return OutboundParams(
        ssrc=sender._ssrc,
        payload_type=codec.payloadType,
        mid=transceiver.mid,
        mid_ext_id=ext.get(URI_MID),
        abs_send_time_ext_id=ext.get(URI_ABS_SEND_TIME),
        audio_level_ext_id=ext.get(URI_AUDIO_LEVEL),
        rtx_ssrc=sender._rtx_ssrc if rtx_pt is not None else None,
        rtx_payload_type=rtx_pt,
    )


_dup_sockets: weakref.WeakKeyDictionary[Any, socket.socket] = weakref.WeakKeyDictionary()


def _send_socket(protocol: Any) -> socket.socket:
    """A plain non-blocking socket sharing the ICE pair's UDP socket.

    Event-loop transports parse the address and run Python (or Cython) bookkeeping on
    every ``sendto``; a dup of the same file description sends with one syscall. One
    per ICE protocol, closed when the protocol goes away.
    """
    sock = _dup_sockets.get(protocol)
    if sock is None:
        if isinstance(protocol.transport, _PortMember):
            return protocol.transport.port.send_socket()
        raw = protocol.transport.get_extra_info("socket")
        sock = socket.socket(raw.family, socket.SOCK_DGRAM, 0, os.dup(raw.fileno()))
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        _dup_sockets[protocol] = sock
    return sock


def sender_sink(sender: RTCRtpSender) -> ProtectedSender:
    """The consumer's sink on ``sender``'s transport: a :class:`peer.egress.ProtectedSender`
    bound to it here.

    Protection calls libsrtp through pylibsrtp's own session and buffer (``Session._srtp``,
    ``_cdata``, ``_buffer``), without the per-call allocation and checks of
    ``Session.protect``; sending uses a dup of the nominated ICE pair's socket. Until the
    sender's DTLS transport is connected, packets are dropped (and counted); the first packet
    after that binds the SRTP session and the nominated pair.
    """
    dtls = sender.transport
    length = _srtp_ffi.new("int *")

    def resolve(sink: ProtectedSender) -> bool:
        if dtls._state != DtlsState.CONNECTED or dtls._tx_srtp is None:
            return False
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None or pair.protocol.transport is None:
            return False
        session = dtls._tx_srtp
        transport = pair.protocol.transport
        batch = transport.port.batch() if isinstance(transport, _PortMember) else None
        if batch is not None:
            name, namelen = datagrams.socket_address(pair.remote_addr)
            sink.bind_batch(
                protect=_srtp_lib.srtp_protect,
                ctx=session._srtp[0],
                batch=batch,
                name=name,
                namelen=namelen,
                keep=(session, name),
            )
            return True
        sink.bind(
            protect=_srtp_lib.srtp_protect,
            ctx=session._srtp[0],
            cdata=session._cdata,
            buffer=session._buffer,
            length=length,
            limit=len(session._cdata) - datagrams.SRTP_MAX_TRAILER_LEN,
            sendto=_send_socket(pair.protocol).sendto,
            addr=pair.remote_addr,
            keep=session,  # keeps the libsrtp context alive while it is used
        )
        return True

    return ProtectedSender(resolve)


def hook_sender(
    sender: RTCRtpSender,
    *,
    on_nack: Callable[[list[int]], None],
    on_keyframe_request: Callable[[], None],
    on_receiver_report: Callable[[int, int, int], None],
    sender_report: Callable[[float], tuple[int, int, int, int]],
) -> None:
    """Route a sender's RTCP feedback to a consumer and make its SRs describe our packets."""

    async def retransmit(sequence_number: int) -> None:
        on_nack([sequence_number])

    def send_keyframe() -> None:
        on_keyframe_request()

    original_send_rtcp: Callable[[list[Any]], Awaitable[None]] = sender._send_rtcp
    original_handle_rtcp: Callable[[Any], Awaitable[None]] = sender._handle_rtcp_packet

    async def send_rtcp(packets: list[Any]) -> None:
        for packet in packets:
            if isinstance(packet, RtcpSrPacket) and packet.ssrc == sender._ssrc:
                ntp, rtp_ts, count, octets = sender_report(time.time())
                packet.sender_info = RtcpSenderInfo(
                    ntp_timestamp=ntp, rtp_timestamp=rtp_ts, packet_count=count, octet_count=octets
                )
        await original_send_rtcp(packets)

    async def handle_rtcp(packet: Any) -> None:
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc == sender._ssrc:
                    on_receiver_report(report.fraction_lost, report.packets_lost, report.jitter)
        await original_handle_rtcp(packet)

    sender._retransmit = retransmit  # type: ignore[method-assign]
    sender._send_keyframe = send_keyframe  # type: ignore[method-assign]
    sender._send_rtcp = send_rtcp  # type: ignore[method-assign]
    sender._handle_rtcp_packet = handle_rtcp  # type: ignore[method-assign]
    if fast_rtcp_enabled():
        _hook_sender_rtcp(
            sender,
            _SenderHook(sender, on_nack, on_keyframe_request, on_receiver_report, sender_report),
        )


class _SenderHook:
    """A consumer's sender on the fast RTCP path: where its feedback goes, what its
    Sender Reports say."""

    __slots__ = (
        "on_keyframe_request",
        "on_nack",
        "on_receiver_report",
        "remb_bitrate",
        "sender",
        "sender_report",
    )

    def __init__(
        self,
        sender: RTCRtpSender,
        on_nack: Callable[[list[int]], None],
        on_keyframe_request: Callable[[], None],
        on_receiver_report: Callable[[int, int, int], None],
        sender_report: Callable[[float], tuple[int, int, int, int]],
    ) -> None:
        self.sender = sender
        self.on_nack = on_nack
        self.on_keyframe_request = on_keyframe_request
        self.on_receiver_report = on_receiver_report
        self.sender_report = sender_report
        self.remb_bitrate: int | None = None  # the subscriber's last REMB for this stream


def _hook_sender_rtcp(sender: RTCRtpSender, hook: _SenderHook) -> None:
    # Feedback: the connection's demux reads SRTCP before aiortc does. Sender Reports:
    # aiortc's per-sender RTCP task is replaced by one that only joins the shared timer.
    dtls = sender.transport
    conn = dtls.transport._connection
    demux = getattr(conn, "_cascade_ingress", None)
    if demux is None or demux.dtls is not dtls:
        demux = conn._cascade_ingress = _IngressDemux(conn, dtls)  # type: ignore[attr-defined]
    sender._cascade_rtcp = hook  # type: ignore[attr-defined]

    async def run_rtcp() -> None:
        sender._RTCRtpSender__rtcp_started.set()  # type: ignore[attr-defined]
        reports = _sender_reports()
        reports.add(hook)
        try:
            await asyncio.get_running_loop().create_future()  # until stop() cancels it
        except asyncio.CancelledError:
            pass
        finally:
            reports.discard(hook)
            with contextlib.suppress(Exception):
                _send_rtcp(sender.transport, [bye(sender._ssrc)])
            sender._RTCRtpSender__rtcp_exited.set()  # type: ignore[attr-defined]

    sender._run_rtcp = run_rtcp  # type: ignore[method-assign]


def fast_rtcp_enabled() -> bool:
    """Whether the node's RTCP takes the fast path: SRTCP read in the connection's demux
    (:meth:`_IngressDemux._receive_rtcp`) and Sender Reports of every consumer on one
    timer (:class:`_SenderReports`). The default; ``CASCADE_FAST_RTCP=0`` leaves RTCP to
    aiortc (a task per sender, its RTCP parser and routing)."""
    return os.environ.get("CASCADE_FAST_RTCP", "1") != "0"


class _SenderReports:
    """Sender Reports (with SDES CNAME) of every hooked sender of one event loop, sent
    from one timer: the due senders of one transport share a compound packet."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.schedule: ReportSchedule[_SenderHook] = ReportSchedule()
        self._timer: asyncio.TimerHandle | None = None
        self._at = 0.0

    def add(self, hook: _SenderHook) -> None:
        self.schedule.add(hook, time.time())
        self._arm()

    def discard(self, hook: _SenderHook) -> None:
        self.schedule.discard(hook)
        if not len(self.schedule) and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        deadline = self.schedule.deadline()
        if deadline is None or self.loop.is_closed():
            return
        if self._timer is not None:
            if self._at <= deadline:
                return
            self._timer.cancel()
        self._at = deadline
        self._timer = self.loop.call_later(max(0.0, deadline - time.time()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = time.time()
        by_transport: dict[int, tuple[Any, list[_SenderHook]]] = {}
        for hook in self.schedule.poll(now):
            dtls = hook.sender.transport
            by_transport.setdefault(id(dtls), (dtls, []))[1].append(hook)
        for dtls, hooks in by_transport.values():
            try:
                _send_rtcp(dtls, _report_packets(hooks, now))
            except Exception as exc:
                _drop(exc)
        self._arm()


_REPORTS_PER_PACKET = 8  # SR + SDES chunk ~ 60 bytes each: well under any MTU


def _report_packets(hooks: list[_SenderHook], now: float) -> list[bytes]:
    """Compound RTCP packets: Sender Reports of up to 8 senders, then their CNAMEs."""
    packets: list[bytes] = []
    for start in range(0, len(hooks), _REPORTS_PER_PACKET):
        reports: list[bytes] = []
        cnames: list[tuple[int, bytes]] = []
        for hook in hooks[start : start + _REPORTS_PER_PACKET]:
            ssrc = hook.sender._ssrc
            reports.append(sender_report(ssrc, *hook.sender_report(now)))
            cname = getattr(hook.sender, "_RTCRtpSender__cname", None)
            if cname:
                cnames.append((ssrc, cname.encode()))
        ingress_counters.sender_reports += len(reports)
        packets.append(b"".join(reports) + (sdes_cnames(cnames) if cnames else b""))
    return packets


_reports: _SenderReports | None = None


def _sender_reports() -> _SenderReports:
    global _reports
    loop = asyncio.get_running_loop()
    if _reports is None or _reports.loop is not loop:
        _reports = _SenderReports(loop)
    return _reports


def hook_keyframe_requests(sender: RTCRtpSender, on_request: Callable[[], None]) -> None:
    """Call ``on_request`` when the remote side asks this sender for a keyframe."""
    sender._send_keyframe = on_request  # type: ignore[method-assign]


def _ice_connections(pc: Any) -> list[tuple[Any, Any]]:
    """Each distinct (aioice Connection, RTCDtlsTransport) of a peer connection (BUNDLE
    shares one between transceivers)."""
    seen: dict[int, tuple[Any, Any]] = {}
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        conn = dtls.transport._connection
        seen.setdefault(id(conn), (conn, dtls))
    return list(seen.values())


CLOSE_TIMEOUT = 10.0
_closings: weakref.WeakKeyDictionary[Any, asyncio.Future[None]] = weakref.WeakKeyDictionary()


async def close_peer_connection(pc: Any, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close ``pc``, whatever state it is in (consent checks that an ICE connect()
    completing after the close would start are stopped by the wrapped ``connect()``).

    The close runs in a task of its own, once per connection, that a cancelled caller
    does not cancel: ``RTCPeerConnection.close()`` interrupted half-way leaves its
    ``_RTCPeerConnection__isClosed`` future pending, and every later ``close()`` would
    wait on it for ever (a client closed while one of its tasks was closing the same
    connection hung). A caller waits at most ``timeout``.
    """
    closing = _closings.get(pc)
    if closing is None:
        closing = _closings[pc] = asyncio.ensure_future(_close(pc))
    try:
        await asyncio.wait_for(asyncio.shield(closing), timeout)
    except TimeoutError:
        log.warning("peer connection still closing after %.0f s", timeout)


async def _close(pc: Any) -> None:
    try:
        await pc.close()
    except Exception as exc:
        log.debug("peer connection close failed: %r", exc)
        # aiortc's own future stays pending after a failed close: settle it.
        closed = getattr(pc, "_RTCPeerConnection__isClosed", None)
        if isinstance(closed, asyncio.Future) and not closed.done():
            closed.set_result(True)


def local_candidate_ports(pc: Any) -> list[tuple[str, int]]:
    """(host, port) of every local ICE candidate of a peer connection."""
    return [
        (cand.host, cand.port) for conn, _ in _ice_connections(pc) for cand in conn.local_candidates
    ]


class DecodeErrorCounter(threading.Event):
    """Replaces a receiver's decoder-error event to count decode failures."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def set(self) -> None:
        self.count += 1
        super().set()


def count_decode_errors(receiver: RTCRtpReceiver) -> DecodeErrorCounter:
    """Count aiortc decode failures of a (client-side) receiver; call before it starts."""
    counter = DecodeErrorCounter()
    receiver._RTCRtpReceiver__decoder_error = counter  # type: ignore[attr-defined]
    return counter


def set_receive_filter(pc: Any, keep: Callable[[bytes], bool]) -> None:
    """Drop incoming datagrams of ``pc`` for which ``keep`` is false (loss emulation)."""
    for conn, _ in _ice_connections(pc):
        original = conn.data_received

        def data_received(data: bytes, component: int, _orig: Any = original) -> None:
            if keep(data):
                _orig(data, component)

        conn.data_received = data_received


def _enlarge_receive_buffer(protocol: Any, size: int = 4 * 1024 * 1024) -> None:
    transport = getattr(protocol, "transport", None)
    raw = transport.get_extra_info("socket") if transport is not None else None
    if raw is None:
        return
    sock = socket.socket(raw.family, socket.SOCK_DGRAM, 0, os.dup(raw.fileno()))
    try:
        _set_buffer(sock, size, receive=True)
    finally:
        sock.close()


def _set_buffer(sock: socket.socket, size: int, *, receive: bool) -> None:
    """Set a socket's receive or send buffer: past ``net.core.[rw]mem_max`` when root
    (``SO_RCVBUFFORCE`` / ``SO_SNDBUFFORCE``), else up to it."""
    if receive:
        options = (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF)
    else:
        options = (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)
    for option in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, size)
                return


class RtpCounter:
    """Counts SRTP media arriving on a peer connection instead of handing it to aiortc.

    For load generators and benchmarks: a receive-only participant that only needs
    to know what arrived (packets, frames by marker bit, sequence gaps) costs a few
    microseconds per packet instead of aiortc's full receive path. RTCP, DTLS and
    STUN still go through aiortc.
    """

    def __init__(self) -> None:
        # ssrc -> [packets, marker packets, highest extended seq, first seq, bytes]
        self.streams: dict[int, list[int]] = {}
        self.errors = 0
        self._wrapped: set[int] = set()

    def packets(self) -> int:
        """Total media packets counted."""
        return sum(s[0] for s in self.streams.values())

    def frames(self, ssrc: int) -> int:
        """Packets with the marker bit (for video: completed frames) of one SSRC."""
        s = self.streams.get(ssrc)
        return s[1] if s else 0

    def lost(self) -> int:
        """Sequence numbers never seen, over all SSRCs."""
        return sum(max(0, s[2] - s[3] + 1 - s[0]) for s in self.streams.values())

    def install(self, pc: Any) -> None:
        """Intercept media on every ICE connection of ``pc`` (call after negotiation).

        Also enlarges the sockets' receive buffers (4 MiB, past ``rmem_max`` when root):
        a load generator that is descheduled for a few milliseconds then loses nothing."""
        for conn, dtls in _ice_connections(pc):
            if id(conn) not in self._wrapped:
                self._wrapped.add(id(conn))
                self._wrap(conn, dtls)
                for protocol in getattr(conn, "_protocols", []):
                    _enlarge_receive_buffer(protocol)

    def _wrap(self, conn: Any, dtls: Any) -> None:
        original = conn.data_received
        streams = self.streams

        def data_received(data: bytes, component: int) -> None:
            srtp = dtls._rx_srtp
            if srtp is None or len(data) < 12 or not 127 < data[0] < 192 or 191 < data[1] < 224:
                original(data, component)
                return
            try:
                plain = srtp.unprotect(data)
            except Exception:  # garbage or replay: count and drop
                self.errors += 1
                return
            ssrc = int.from_bytes(plain[8:12], "big")
            seq = (plain[2] << 8) | plain[3]
            s = streams.get(ssrc)
            if s is None:
                streams[ssrc] = [1, plain[1] >> 7, seq, seq, len(plain)]
                return
            s[0] += 1
            s[1] += plain[1] >> 7
            s[4] += len(plain)
            # extend the sequence number around the highest seen so far
            high = s[2]
            ext = (high & ~0xFFFF) | seq
            if ext < high - 0x8000:
                ext += 0x10000
            elif ext > high + 0x8000:
                ext -= 0x10000
            if ext > high:
                s[2] = ext

        conn.data_received = data_received
