"""A media worker process: its own aiortc transports (own ICE ports), engine and routers.

Started by the supervisor (:mod:`peer.supervisor`) as ``python -m peer.worker --socket PATH
--worker-id N --parent PID``. It connects back over the Unix socket, receives its settings, then
runs the participant sessions the supervisor binds to it: client messages arrive as frames and
replies leave as frames (:mod:`peer.ipc`). An idle worker runs no timer: the engine's tick runs
only while the worker hosts a room. The worker exits when the supervisor goes away (the socket
closes, or the kernel's parent-death signal).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from typing import Any

import msgspec
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from peer import gc_tuning
from peer.ipc import (
    Channel,
    ClientData,
    FrameError,
    Hangup,
    Hello,
    Load,
    Migrate,
    Open,
    SessionEnded,
    SiblingRoom,
    StatsReply,
    StatsRequest,
    ToClient,
    WorkerSetup,
    receive_pipe,
)
from peer.logs import configure_logging
from peer.server import NodeConfig, NodeServer
from peer.session import ParticipantSession
from peer.siblings import SiblingRooms
from peer.signaling import ProtocolError, decode_client_message, encode, error_message

log = logging.getLogger("cascade.worker")
TICK_SECONDS = 0.1
LOAD_SECONDS = 1.0
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), and exit now if
    the parent is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)


class Worker:
    """The worker's side of the channel: sessions by connection id, and the engine tick."""

    def __init__(self, worker_id: int, channel: Channel, setup: WorkerSetup) -> None:
        public_key = (
            Ed25519PublicKey.from_public_bytes(setup.token_public_key)
            if setup.token_public_key
            else None
        )
        self.worker_id = worker_id
        self.channel = channel
        self.server = NodeServer(
            NodeConfig(
                api_secret=setup.api_secret,
                token_public_key=public_key,
                ice_addresses=setup.ice_addresses,
                ice_announce=setup.ice_announce,
                ice_port=setup.ice_port,
                max_consumers=setup.max_consumers,
                max_cpu=setup.max_cpu,
                max_egress_pps=setup.max_egress_pps,
                keyframe_request_delay=setup.keyframe_request_delay,
                answer_timeout=setup.answer_timeout,
            )
        )
        self.siblings = SiblingRooms(self.server, channel.send)
        self.sessions: dict[int, ParticipantSession] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._process = psutil.Process()
        self._tasks: set[asyncio.Task[None]] = set()
        self._queues: dict[int, asyncio.Queue[bytes | None]] = {}

    def _open(self, conn: int) -> None:
        channel = self.channel

        async def send(message: dict[str, object]) -> None:
            channel.send(ToClient(conn, encode(message).encode()))

        async def disconnect() -> None:
            # The media connection failed: the supervisor closes the client's socket, so the
            # client rejoins.
            await self._end(conn)

        self.sessions[conn] = ParticipantSession(self.server, send, disconnect)

    async def _client_data(self, conn: int, data: bytes) -> None:
        session = self.sessions.get(conn)
        if session is None:
            return
        try:
            message = decode_client_message(data)
        except ProtocolError as exc:  # the supervisor validated it: only a version skew
            self.channel.send(ToClient(conn, encode(error_message(exc.code, exc.message)).encode()))
            return
        await session.handle(message)
        if session.room is not None:
            self.siblings.changed(session.room.name)
        if session._closed:
            await self._end(conn)
        self._ensure_ticker()

    async def _end(self, conn: int) -> None:
        session = self.sessions.pop(conn, None)
        queue = self._queues.get(conn)
        if queue is not None:
            queue.put_nowait(None)
        if session is not None:
            await session.flush()
            await session.close()
            self.channel.send(SessionEnded(conn))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_ticker(self) -> None:
        if self.server.node.routers and (self._ticker is None or self._ticker.done()):
            self._ticker = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        """Engine timers and load reports, only while this worker hosts a room."""
        node = self.server.node
        self._process.cpu_percent(None)
        last_load = time.monotonic()
        while node.routers:
            await asyncio.sleep(TICK_SECONDS)
            node.tick(time.time())
            if time.monotonic() - last_load >= LOAD_SECONDS:
                last_load = time.monotonic()
                self._report_load()
        self._report_load()

    def _report_load(self) -> None:
        totals = self.server.node.totals()
        node = self.server.node
        node.admission.update(
            self._process.cpu_percent(None) / 100.0,
            float(totals["egress_packet_rate"]),
            int(totals["consumers"]),
        )
        self.channel.send(
            Load(
                consumers=int(totals["consumers"]),
                producers=int(totals["producers"]),
                egress_pps=float(totals["egress_packet_rate"]),
                totals={
                    **{k: float(v) for k, v in totals.items()},
                    "consumers_refused": float(node.consumers_refused),
                },
            )
        )

    def watch_pipes(self, channel: socket.socket) -> None:
        """Take the pipe sockets the supervisor hands over ``channel`` (SCM_RIGHTS)."""
        channel.setblocking(False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                handed = receive_pipe(channel)
            except BlockingIOError:
                return
            except (OSError, FrameError) as exc:
                log.warning("pipe channel: %r", exc)
                return
            if handed is None:
                loop.remove_reader(channel.fileno())
                return
            peer, sock = handed
            self._spawn(self.siblings.open_pipe(peer, sock))

        loop.add_reader(channel.fileno(), readable)

    async def run(self) -> None:
        """Serve frames until the supervisor closes the channel."""
        try:
            while True:
                frame = await self.channel.receive()
                if frame is None:
                    break
                if isinstance(frame, ClientData):
                    # Messages of one participant are handled in order; a slow one (an SDP
                    # offer) must not hold the others, so each connection has its own task.
                    self._dispatch(frame.conn, frame.data)
                elif isinstance(frame, SiblingRoom):
                    self.siblings.sibling(frame)
                    self._ensure_ticker()
                elif isinstance(frame, Open):
                    self._open(frame.conn)
                elif isinstance(frame, Hangup):
                    self._spawn(self._end(frame.conn))
                elif isinstance(frame, Migrate):
                    session = self.sessions.get(frame.conn)
                    if session is not None:
                        session.migrate(dict(frame.target))
                elif isinstance(frame, StatsRequest):
                    stats = self.server.stats()
                    stats["piped_producers"] = sorted(
                        p.id
                        for router in self.server.node.routers.values()
                        for p in router.producers.values()
                        if p.origin == "relay"
                    )
                    stats.update(self.siblings.pipe_stats())
                    data = msgspec.json.encode(stats)
                    self.channel.send(StatsReply(frame.request, data))
        finally:
            for conn in list(self.sessions):
                await self._end(conn)
            await self.siblings.close()
            self.server.close_ice_ports()

    def _dispatch(self, conn: int, data: bytes) -> None:
        queue = self._queues.get(conn)
        if queue is None:
            queue = self._queues[conn] = asyncio.Queue()
            self._spawn(self._drain(conn, queue))
        queue.put_nowait(data)

    async def _drain(self, conn: int, queue: asyncio.Queue[bytes | None]) -> None:
        try:
            while conn in self.sessions:
                data = await queue.get()
                if data is None:
                    break
                await self._client_data(conn, data)
        finally:
            if self._queues.get(conn) is queue:
                del self._queues[conn]


async def serve(socket_path: str, worker_id: int, pipe_channel: int) -> None:
    """Connect to the supervisor and serve until it goes away."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    channel = Channel(reader, writer)
    channel.send(Hello(worker_id, os.getpid()))
    setup = await channel.receive()
    if not isinstance(setup, WorkerSetup):
        raise SystemExit(f"worker {worker_id}: expected settings, got {setup!r}")
    worker = Worker(worker_id, channel, setup)
    try:
        await worker.server.open_ice_ports()
    except OSError as exc:
        raise SystemExit(
            f"worker {worker_id}: cannot bind ICE port {setup.ice_port}: {exc}"
        ) from None
    worker.watch_pipes(socket.socket(fileno=pipe_channel))
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    gc_tuning.tune()
    collector = asyncio.ensure_future(gc_tuning.collect_periodically())
    with contextlib.suppress(asyncio.CancelledError):
        await worker.run()
    collector.cancel()
    channel.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process."""
    parser = argparse.ArgumentParser(prog="cascade-worker")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--pipe-channel", type=int, required=True, help="inherited socket fd")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    configure_logging(args.log_level, args.log_json, worker=args.worker_id)
    if args.uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(serve(args.socket, args.worker_id, args.pipe_channel))
    except (ConnectionError, FileNotFoundError) as exc:
        print(f"worker {args.worker_id}: supervisor unreachable: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
