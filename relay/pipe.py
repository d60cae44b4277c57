"""Datagram transport of the relay: a pipe between two processes of one node.

A :class:`RelayPipe` carries the relay protocol over one *connected* datagram socket — a
Unix datagram socket (``socket.socketpair(AF_UNIX, SOCK_DGRAM)`` inherited from a
supervisor, or bound paths) or loopback UDP — instead of QUIC. Both ends serve their
local producers (``lookup``) and pull the other's (:meth:`RelayPipe.subscribe`), with the
same flow semantics as between nodes: one flow per producer per pipe however many local
listeners, NACKs answered from the origin producer's cache, keyframe requests sent
upstream (rate-limited at both ends), linger after the last listener, and the remote
producer closes when the origin producer closes.

Wire format: every datagram is either a flow datagram exactly as in a QUIC DATAGRAM frame
(4-byte flow tag, then RTP, or RTCP with the tag's top bit set) or, with the tag
``0x00000000`` (never a flow id), one control frame as on the QUIC control stream
(docs/relay-protocol.md). There is no encryption and no authentication: the socket is the
trust boundary (keep it inside the node: a socketpair, or a Unix socket in a directory
only the node's user can enter). Heartbeats detect a dead peer; closing sends
``ErrorMsg(0, code, reason)``. Unix datagram sockets neither lose nor reorder datagrams
(a full receiver makes the sender keep them until it can write); over UDP a lost flow
datagram is repaired by NACK, a lost control message costs a subscribe timeout.

Usage (each process)::

    pipe = await RelayPipe.open(sock, lookup=router.producer_source)
    remote_producer = await pipe.subscribe(producer_id)   # local consumers attach to it
    ...
    await pipe.close()
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable

from .aio import Timer, open_remote_producer
from .config import RelayConfig, RelayCounters, RelayError
from .connection import RelayConnection
from .flows import OriginFlowStats, RemoteProducer, call_each
from .origin import OriginFlows
from .protocol import ErrorCode, ErrorMsg, encode_message
from .remote import RemoteFlows
from .source import ProducerLookup

__all__ = ["CONTROL_TAG", "PIPE_MAX_DATAGRAM", "RelayPipe", "pipe_socketpair"]

log = logging.getLogger(__name__)

#: Flow tag of a datagram carrying a control frame.
CONTROL_TAG = b"\x00\x00\x00\x00"
#: Largest flow datagram a pipe sends (fits loopback UDP and default Unix socket buffers).
PIPE_MAX_DATAGRAM = 65000
#: Bytes buffered by asyncio (receiver not keeping up) beyond which flow packets are dropped.
# Datagrams read per wake-up of the pipe's socket at most.
PIPE_READ_BATCH = 64
PIPE_MAX_BUFFERED = 4 * 1024 * 1024


def pipe_socketpair() -> tuple[socket.socket, socket.socket]:
    """Two connected, non-blocking Unix datagram sockets (one per process)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class RelayPipe:
    """One end of a relay pipe (see the module docstring). Create with :meth:`open`."""

    def __init__(
        self,
        lookup: ProducerLookup,
        config: RelayConfig | None = None,
        counters: RelayCounters | None = None,
        name: str = "pipe",
    ) -> None:
        self.name = name
        self.config = config or RelayConfig()
        self.counters = counters or RelayCounters()
        self._loop = asyncio.get_running_loop()
        self.state = "live"
        #: pulled producers (survive nothing: the pipe does not reconnect)
        self.flows = RemoteFlows(self.config, self.counters, self._loop.time)
        self.connection = RelayConnection(
            self.config,
            self.counters,
            self._loop.time(),
            remote=self.flows,
            max_payload=PIPE_MAX_DATAGRAM,
        )
        self.connection.origin = OriginFlows(self.connection, lookup, self.config, self.counters)
        # The pipe reads and writes its socket itself (add_reader / add_writer): an event
        # loop refuses a writer on a socket that a transport owns, and a full receiver
        # must make the sender wait for writability, not fail.
        self._sock: socket.socket | None = None
        #: datagrams the socket refused (receiver full), sent when it is writable again
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._inflight: dict[str, asyncio.Future[RemoteProducer]] = {}
        self._close_cbs: list[Callable[[], None]] = []
        self._closing = False
        self._conn_timer = Timer(self._loop, self._on_conn_timer)
        self._flow_timer = Timer(self._loop, self._on_flow_timer)
        self._close_sent = False

    @classmethod
    async def open(
        cls,
        sock: socket.socket,
        lookup: ProducerLookup,
        config: RelayConfig | None = None,
        *,
        name: str = "pipe",
    ) -> RelayPipe:
        """Start a pipe over ``sock``, a connected datagram socket (AF_UNIX or AF_INET)."""
        pipe = cls(lookup, config, name=name)
        sock.setblocking(False)
        pipe._sock = sock
        pipe._loop.add_reader(sock.fileno(), pipe._readable)
        conn = pipe.connection
        conn.notify = pipe._flush
        conn.on_down = pipe._on_down
        pipe.flows.notify = pipe._arm_flows
        pipe._flush()
        pipe._arm_flows()
        return pipe

    # -- public -------------------------------------------------------------------------

    @property
    def producers(self) -> dict[str, RemoteProducer]:
        """Producers pulled from the other end, by producer id (a copy)."""
        return dict(self.flows.producers)

    def origin_flows(self) -> list[tuple[str, int, OriginFlowStats]]:
        """``(producer_id, flow_id, stats)`` of every flow this end serves."""
        origin = self.connection.origin
        if origin is None:
            return []
        return [(f.producer_id, f.flow_id, f.stats) for f in origin.flows.values()]

    async def subscribe(self, producer_id: str, timeout: float = 10.0) -> RemoteProducer:
        """The shared :class:`RemoteProducer` of ``producer_id`` on the other end.

        Same contract as :meth:`relay.RelayLink.subscribe`: one flow per producer,
        closed ``linger`` seconds after its last listener leaves. Raises
        :class:`~relay.SubscribeError`, :class:`~relay.RelayError` (pipe closed) or
        :class:`TimeoutError`.
        """
        if self.state != "live":
            raise RelayError("pipe closed")
        rp = self.flows.producers.get(producer_id)
        if rp is not None and not rp.closed:
            return rp
        fut = self._inflight.get(producer_id)
        if fut is None:
            fut = self._loop.create_future()
            self._inflight[producer_id] = fut
            try:
                rp = await open_remote_producer(self.flows, producer_id, timeout)
                fut.set_result(rp)
                return rp
            except Exception as exc:
                fut.set_exception(exc)
                fut.exception()  # retrieved here; waiters re-raise it
                raise
            finally:
                del self._inflight[producer_id]
        return await asyncio.shield(fut)

    def on_close(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` once when the pipe closes (either end, or the peer died)."""
        if self.state == "closed":
            cb()
        else:
            self._close_cbs.append(cb)

    async def close(self, lost: bool = False) -> None:
        """Close the pipe: tell the peer, end every flow in both directions. ``lost``: the
        other end is gone (its process died), so what came through it was lost, not ended
        (:attr:`~relay.RemoteProducer.lost`)."""
        if self.state == "closed":
            return
        self._closing = not lost
        self.connection.abort(ErrorCode.SHUTDOWN, "pipe closed")
        await asyncio.sleep(0)

    # -- transport ----------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        # Every waiting datagram per wake-up (bounded, so other sockets get their turn).
        for _ in range(PIPE_READ_BATCH):
            try:
                data = sock.recv(PIPE_MAX_DATAGRAM + 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._error(exc)
                return
            if data:
                self._received(data)
            if self._sock is None:
                return

    def _received(self, data: bytes) -> None:
        conn = self.connection
        now = self._loop.time()
        if data[:4] == CONTROL_TAG:
            conn.receive_control(data[4:], False, now)
            self._conn_timer.arm(conn.deadline())
        else:
            conn.receive_datagram(data, now)

    def _send(self, data: bytes, droppable: bool) -> None:
        if self._backlog:
            self._queue(data, droppable)
            return
        try:
            self._sock.send(data)  # type: ignore[union-attr]
        except BlockingIOError:
            self._queue(data, droppable)
            self._loop.add_writer(self._sock.fileno(), self._drain)  # type: ignore[union-attr]
        except OSError as exc:
            self._error(exc)

    def _queue(self, data: bytes, droppable: bool) -> None:
        if droppable and self._backlog_bytes > PIPE_MAX_BUFFERED:
            self.counters.datagrams_queue_full += 1
            return
        self._backlog.append(data)
        self._backlog_bytes += len(data)

    def _drain(self) -> None:
        backlog = self._backlog
        try:
            while backlog:
                self._sock.send(backlog[0])  # type: ignore[union-attr]
                self._backlog_bytes -= len(backlog.popleft())
        except BlockingIOError:
            return
        except OSError as exc:
            backlog.clear()
            self._error(exc)
        self._backlog_bytes = 0
        if self._sock is not None:
            self._loop.remove_writer(self._sock.fileno())

    def _flush(self) -> None:
        conn = self.connection
        if self._sock is None or self._close_sent:
            conn.control_out.clear()
            conn.datagrams_out.clear()
            return
        send = self._send
        if conn.control_out:
            frames, conn.control_out = conn.control_out, []
            for frame in frames:
                send(CONTROL_TAG + frame, False)
        if conn.datagrams_out:
            out, conn.datagrams_out = conn.datagrams_out, []
            for data in out:
                send(data, True)
        if conn.close_out is not None:
            self._close_sent = True
            code, reason = conn.close_out
            send(CONTROL_TAG + encode_message(ErrorMsg(0, code, reason[:1000])), False)
        self._conn_timer.arm(conn.deadline())

    def _error(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError | BrokenPipeError | ConnectionResetError):
            self.connection.connection_lost(ErrorCode.SHUTDOWN, "peer gone")
        else:
            log.debug("relay pipe %s: %s", self.name, exc)

    def _on_down(self, conn: RelayConnection, code: int, reason: str) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        log.info("relay pipe %s closed: %s (%d)", self.name, reason, code)
        self._loop.call_soon(self._finish)

    def _finish(self) -> None:
        # Closed from the other end (or it died): what came through it was lost, not ended.
        self.flows.close(lost=not self._closing)
        self._conn_timer.cancel()
        self._flow_timer.cancel()
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            if self._backlog:
                self._loop.remove_writer(sock.fileno())
            sock.close()
        self._backlog.clear()
        cbs, self._close_cbs = self._close_cbs, []
        call_each(cbs, "relay pipe on_close")

    # -- timers -------------------------------------------------------------------------

    def _on_conn_timer(self) -> None:
        self.connection.poll(self._loop.time())
        self._conn_timer.arm(self.connection.deadline())

    def _arm_flows(self) -> None:
        self._flow_timer.arm(self.flows.deadline())

    def _on_flow_timer(self) -> None:
        self.flows.poll(self._loop.time())
        self._arm_flows()

    def __repr__(self) -> str:
        return f"<RelayPipe {self.name} {self.state} pulls={len(self.flows.producers)}>"
