"""A node over several cores: one supervisor process and N media worker processes.

The supervisor (:class:`Supervisor`, a :class:`~peer.server.NodeServer`) owns the public HTTP /
WebSocket port, the edge limits, tokens, the node identity and placement. Media runs in worker
processes (:mod:`peer.worker`), each with its own aiortc transports, engine and routers. A
participant's connection is bound to a worker at ``join`` by the packing policy
(:mod:`peer.packing`); from then on its messages are forwarded over the worker's Unix socket
(:mod:`peer.ipc`) and the worker's replies come back the same way. :class:`WorkerPool` starts
the workers, restarts one that dies (its participants get a ``reconnect`` event) and stops them
all with the supervisor. See docs/architecture.md, "Worker processes".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil
from aiohttp import WSCloseCode, web

from peer.engine import Node
from peer.ipc import (
    Channel,
    ClientData,
    Frame,
    Hangup,
    Hello,
    Load,
    Migrate,
    Open,
    RoomState,
    SessionEnded,
    SiblingRoom,
    StatsReply,
    StatsRequest,
    ToClient,
    WorkerSetup,
    pipe_channel,
    send_pipe,
)
from peer.packing import DEFAULT_WATERMARK, Packing, WorkerLoad, choose_worker, smoothed_cpu
from peer.relay_hub import RelayHub, WorkerMember
from peer.server import NodeConfig, NodeServer
from peer.session import MIGRATED_LINGER, join_redirect
from peer.signaling import ClientMessage, Join, Ping, ProtocolError, encode, error_message
from peer.stats import AdmissionPolicy
from peer.tokens import TokenError
from relay import PendingSource, RelaySource, pipe_socketpair

log = logging.getLogger("cascade.supervisor")
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
START_TIMEOUT = 30.0
STOP_GRACE = 3.0
RESTART_BACKOFF = (0.2, 10.0)


def usable_cores() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass
class WorkerHandle:
    """The supervisor's view of one worker process."""

    worker_id: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    ps: psutil.Process | None = None
    up: bool = False
    cpu: float = 0.0
    #: ``cpu`` averaged for packing (:func:`peer.packing.smoothed_cpu`)
    packing_cpu: float = 0.0
    cpu_sampled_at: float = 0.0
    load: Load | None = None
    restarts: int = 0
    started_at: float = 0.0
    pipe_channel: socket.socket | None = None
    conns: set[int] = field(default_factory=set)
    rooms: dict[str, int] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        """The current process id (None before the first start)."""
        return self.process.pid if self.process is not None else None

    def view(self) -> WorkerLoad:
        """Packing's input for this worker."""
        return WorkerLoad(
            self.worker_id,
            self.packing_cpu,
            self.load.consumers if self.load else 0,
            frozenset(self.rooms),
            self.up,
            len(self.conns),
        )

    def describe(self) -> dict[str, object]:
        """This worker in ``/stats``."""
        return {
            "worker_id": self.worker_id,
            "pid": self.pid,
            "up": self.up,
            "cpu": round(self.cpu, 3),
            "packing_cpu": round(self.packing_cpu, 3),
            "participants": len(self.conns),
            "consumers": self.load.consumers if self.load else 0,
            "egress_packet_rate": self.load.egress_pps if self.load else 0.0,
            "rooms": sorted(self.rooms),
            "restarts": self.restarts,
        }


class WorkerPool:
    """Starts, watches, restarts and stops the worker processes."""

    def __init__(
        self,
        count: int,
        setup: WorkerSetup,
        on_frame: Callable[[WorkerHandle, Frame], None],
        on_lost: Callable[[WorkerHandle], None],
        *,
        log_level: str = "WARNING",
        log_json: bool = False,
        uvloop: bool = False,
    ) -> None:
        self.workers = [WorkerHandle(i) for i in range(count)]
        self.log_json = log_json
        self.setup = setup
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.log_level = log_level
        self.uvloop = uvloop
        self._dir = tempfile.mkdtemp(prefix="cascade-workers-")
        self.socket_path = os.path.join(self._dir, "supervisor.sock")
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.started = asyncio.Event()

    async def start(self) -> None:
        """Start every worker and wait until each has connected."""
        os.chmod(self._dir, 0o700)  # the socket carries the token secret
        self._server = await asyncio.start_unix_server(self._accept, self.socket_path)
        for handle in self.workers:
            await self._spawn(handle)
        await asyncio.wait_for(
            asyncio.gather(*(h.ready.wait() for h in self.workers)), START_TIMEOUT
        )
        self.started.set()

    def _task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, handle: WorkerHandle) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        args = [
            sys.executable,
            "-m",
            "peer.worker",
            "--socket",
            self.socket_path,
            "--worker-id",
            str(handle.worker_id),
            "--parent",
            str(os.getpid()),
            "--log-level",
            self.log_level,
        ]
        if self.uvloop:
            args.append("--uvloop")
        if self.log_json:
            args.append("--log-json")
        ours, theirs = pipe_channel()
        args += ["--pipe-channel", str(theirs.fileno())]
        handle.ready.clear()
        handle.started_at = time.monotonic()
        try:
            handle.process = await asyncio.create_subprocess_exec(
                *args, env=env, stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(),)
            )
        finally:
            theirs.close()
        if handle.pipe_channel is not None:
            handle.pipe_channel.close()
        handle.pipe_channel = ours
        handle.ps = psutil.Process(handle.process.pid)
        with contextlib.suppress(psutil.Error):
            handle.ps.cpu_percent(None)
        self._task(self._watch(handle, handle.process))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = Channel(reader, writer)
        hello = await channel.receive()
        if not isinstance(hello, Hello) or not 0 <= hello.worker_id < len(self.workers):
            channel.close()
            return
        handle = self.workers[hello.worker_id]
        if handle.pid != hello.pid:  # a stale worker of a previous start
            channel.close()
            return
        port = worker_ice_port(self.setup, hello.worker_id)
        channel.send(msgspec.structs.replace(self.setup, ice_port=port))
        handle.channel = channel
        handle.up = True
        handle.load = None
        handle.cpu = handle.packing_cpu = handle.cpu_sampled_at = 0.0
        if handle.ps is not None:
            # Measure from here: the worker's start-up (imports) is not load, and counted it
            # made a just-started node look full, sending its first joins elsewhere.
            with contextlib.suppress(psutil.Error):
                handle.ps.cpu_percent(None)
        handle.ready.set()
        log.debug("worker %d up (pid %d)", handle.worker_id, hello.pid)
        try:
            while (frame := await channel.receive()) is not None:
                self.on_frame(handle, frame)
        except Exception as exc:  # a bad frame: the worker is restarted
            log.warning("worker %d channel failed: %r", handle.worker_id, exc)
            if handle.process is not None and handle.process.returncode is None:
                handle.process.kill()
        finally:
            channel.close()

    async def _watch(self, handle: WorkerHandle, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self._stopping or handle.process is not process:
            return
        log.warning("worker %d (pid %d) exited with %s; restarting", handle.worker_id,
                    process.pid, code)  # fmt: skip
        handle.up = False
        handle.channel = None
        handle.cpu = handle.packing_cpu = handle.cpu_sampled_at = 0.0
        self.on_lost(handle)
        handle.load = None
        if handle.pipe_channel is not None:
            handle.pipe_channel.close()
            handle.pipe_channel = None
        handle.conns.clear()
        handle.rooms.clear()
        lived = time.monotonic() - handle.started_at
        delay = RESTART_BACKOFF[0] if lived > RESTART_BACKOFF[1] else min(
            RESTART_BACKOFF[1], RESTART_BACKOFF[0] * 2 ** min(handle.restarts, 6)
        )  # fmt: skip
        await asyncio.sleep(delay)
        if self._stopping:
            return
        handle.restarts += 1
        await self._spawn(handle)

    def sample_cpu(self) -> None:
        """Measure each worker's CPU since the last sample (fraction of one core), and the
        average packing compares with its watermark."""
        now = time.monotonic()
        for handle in self.workers:
            if handle.ps is None or not handle.up:
                continue
            try:
                handle.cpu = handle.ps.cpu_percent(None) / 100.0
            except psutil.Error:
                handle.cpu = 0.0
            if handle.cpu_sampled_at:
                elapsed = now - handle.cpu_sampled_at
                handle.packing_cpu = smoothed_cpu(handle.packing_cpu, handle.cpu, elapsed)
            handle.cpu_sampled_at = now

    def choose(self, room: str, watermark: float) -> Packing | None:
        """The worker for a new participant of ``room`` (see :mod:`peer.packing`)."""
        return choose_worker([h.view() for h in self.workers], room, watermark)

    async def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after a grace period)."""
        self._stopping = True
        for handle in self.workers:
            if handle.channel is not None:
                handle.channel.close()
            if handle.process is not None and handle.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    handle.process.send_signal(signal.SIGTERM)
        for handle in self.workers:
            process = handle.process
            if process is None:
                continue
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            handle.up = False
            if handle.pipe_channel is not None:
                handle.pipe_channel.close()
                handle.pipe_channel = None
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


class RemoteSession:
    """The supervisor's side of one participant connection: answers what it can before
    ``join``, then forwards everything to the worker that holds the participant."""

    _ids = itertools.count(1)

    def __init__(self, supervisor: Supervisor, send: Callable[[dict[str, object]], Any],
                 ws: web.WebSocketResponse) -> None:  # fmt: skip
        self.supervisor = supervisor
        self.conn = next(self._ids)
        self._send = send
        self._ws = ws
        self.worker: WorkerHandle | None = None
        self.room: str | None = None
        self.participant_id: str | None = None
        self._closed = False
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    async def handle(self, message: ClientMessage) -> None:
        """One validated client message."""
        worker = self.worker
        if worker is not None:
            if worker.channel is not None:
                worker.channel.send(ClientData(self.conn, msgspec.json.encode(message)))
            return
        if isinstance(message, Ping):
            await self._send({"type": "pong", "id": message.id, "time": time.time()})
        elif isinstance(message, Join):
            await self._join(message)
        else:
            await self._send(error_message("not_joined", "join a room first", message.id))

    async def _join(self, message: Join) -> None:
        supervisor = self.supervisor
        try:
            supervisor.tokens.verify(message.token, message.room)
        except TokenError as exc:
            supervisor.join_outcomes[exc.code] += 1
            await self._send(error_message(exc.code, exc.message, message.id))
            return
        try:
            redirect = await join_redirect(supervisor, message)
        except ProtocolError as exc:
            await self._send(error_message(exc.code, exc.message, message.id))
            return
        if redirect is not None:
            await self._send(redirect)
            return
        if not supervisor.pool.started.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(supervisor.pool.started.wait(), START_TIMEOUT)
        packing = supervisor.pool.choose(message.room, supervisor.watermark)
        if packing is None:
            await self._send(
                error_message("overloaded", "no media worker is up; retry shortly", message.id)
            )
            return
        worker = supervisor.pool.workers[packing.worker_id]
        if worker.channel is None:
            await self._send(error_message("overloaded", "retry shortly", message.id))
            return
        self.worker = worker
        self.room = message.room
        worker.conns.add(self.conn)
        worker.rooms[message.room] = worker.rooms.get(message.room, 0) + 1
        supervisor.conns[self.conn] = self
        # The room's members and producers on the other workers, before the join, so that
        # its reply lists them.
        for worker_id, state in supervisor._room_states.get(message.room, {}).items():
            if worker_id != worker.worker_id:
                supervisor._ensure_pipe(worker, supervisor.pool.workers[worker_id])
                worker.channel.send(supervisor._sibling_frame(worker_id, state))
        # ... and the room on other nodes (the supervisor is one more sibling).
        await supervisor.hub.introduce(worker.worker_id, message.room)
        if worker.channel is None or self.worker is not worker:
            await self._send(error_message("overloaded", "retry shortly", message.id))
            return
        worker.channel.send(Open(self.conn))
        worker.channel.send(ClientData(self.conn, msgspec.json.encode(message)))

    def deliver(self, text: str) -> None:
        """Queue one message from the worker to the client, in order."""
        if self._closed:
            return
        if self.participant_id is None and text.startswith('{"type":"joined"'):
            joined = msgspec.json.decode(text)
            self.participant_id = str(joined.get("participant_id"))
            if self.room is not None and not joined.get("fallbacks"):
                # Only the supervisor knows the overlay: the nodes to fail over to.
                fallbacks = self.supervisor.fallbacks(self.room)
                if fallbacks:
                    joined["fallbacks"] = fallbacks
                    text = encode(joined)
        self._outbox.put_nowait(text)
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while (text := await self._outbox.get()) is not None:
            with contextlib.suppress(Exception):
                if not self._ws.closed:
                    await self._ws.send_str(text)

    def ended(self, code: WSCloseCode = WSCloseCode.OK, reason: bytes = b"") -> None:
        """The worker closed the session (or died): close the socket once queued messages
        are written."""
        self._unbind()
        self._closed = True
        self._outbox.put_nowait(None)

        async def close_after_writes() -> None:
            if self._writer is not None:
                with contextlib.suppress(Exception):
                    await self._writer
            with contextlib.suppress(Exception):
                await self._ws.close(code=code, message=reason)

        self.supervisor.background(close_after_writes())

    def worker_lost(self) -> None:
        """The worker holding this participant died: tell the client to reconnect."""
        self.deliver(
            encode(
                {
                    "type": "reconnect",
                    "url": self.supervisor.url,
                    "reason": "worker_restarted",
                }
            )
        )
        self.ended(WSCloseCode.SERVICE_RESTART, b"worker_restarted")

    def _unbind(self) -> None:
        worker = self.worker
        self.supervisor.conns.pop(self.conn, None)
        if worker is None:
            return
        self.worker = None
        worker.conns.discard(self.conn)
        if self.room is not None and self.room in worker.rooms:
            worker.rooms[self.room] -= 1
            if worker.rooms[self.room] <= 0:
                del worker.rooms[self.room]

    async def close(self) -> None:
        """The client's socket closed: end the session on its worker."""
        worker = self.worker
        if worker is not None and worker.channel is not None:
            worker.channel.send(Hangup(self.conn))
        self._unbind()
        if not self._closed:
            self._closed = True
            self._outbox.put_nowait(None)


class WorkersNode(Node):
    """The supervisor's Node: no routers of its own; totals and admission are the sum over
    the workers."""

    def __init__(self, pool: Callable[[], WorkerPool | None], admission: AdmissionPolicy) -> None:
        self._pool = pool
        # Refusals counted by worker processes that have since been restarted.
        self._refused_by_former_workers = 0
        super().__init__(admission)

    @property
    def consumers_refused(self) -> int:
        """Consumers refused by admission control, over the workers (a counter: a worker's
        count outlives its process)."""
        pool = self._pool()
        live = 0
        if pool is not None:
            for handle in pool.workers:
                if handle.load is not None:
                    live += int(handle.load.totals.get("consumers_refused", 0))
        return self._refused_by_former_workers + live

    @consumers_refused.setter
    def consumers_refused(self, value: int) -> None:
        self._refused_by_former_workers = value

    def worker_lost(self, handle: WorkerHandle) -> None:
        """Keep what a lost worker counted (before its load report is dropped); its
        replacement starts from zero."""
        if handle.load is not None:
            self._refused_by_former_workers += int(handle.load.totals.get("consumers_refused", 0))

    def totals(self) -> dict[str, float | int]:
        """Node-wide counters summed over the workers' last load reports."""
        out: dict[str, float | int] = {
            "rooms": 0,
            "participants": 0,
            "producers": 0,
            "consumers": 0,
            "ingress_packets": 0,
            "egress_packets": 0,
            "ingress_bitrate": 0,
            "egress_bitrate": 0,
            "egress_packet_rate": 0.0,
        }
        pool = self._pool()
        if pool is None:
            return out
        rooms: set[str] = set()
        for handle in pool.workers:
            rooms |= set(handle.rooms)
            if handle.load is not None and handle.up:
                for key, value in handle.load.totals.items():
                    if key in out and key != "rooms":
                        out[key] += value if isinstance(out[key], float) else int(value)
        out["rooms"] = len(rooms)
        out["egress_packet_rate"] = round(float(out["egress_packet_rate"]), 1)
        return out


def worker_ice_port(setup: WorkerSetup, worker_id: int) -> int | None:
    """A worker's ICE port: the node's fixed one plus the worker's index (0 and None
    as they are: any free port, a port per transport)."""
    return setup.ice_port + worker_id if setup.ice_port else setup.ice_port


def check_ice_ports(setup: WorkerSetup, workers: int) -> None:
    """Raise OSError, naming the worker, if one of the workers' fixed ICE ports is taken
    (else that worker would fail and be restarted for ever)."""
    for worker_id in range(workers):
        port = worker_ice_port(setup, worker_id)
        if not port:
            return
        for address in setup.ice_addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((address, port))
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"ICE port {address}:{port} of worker {worker_id} is taken"
                    ) from None


class Supervisor(NodeServer):
    """A node whose media runs in ``workers`` worker processes."""

    def __init__(
        self,
        config: NodeConfig,
        workers: int,
        *,
        watermark: float = DEFAULT_WATERMARK,
        log_level: str = "WARNING",
        log_json: bool = False,
        uvloop: bool = False,
    ) -> None:
        # the workers bind the shared ICE ports, the supervisor carries no media
        super().__init__(dataclasses.replace(config, ice_port=None))
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.watermark = watermark
        self.conns: dict[int, RemoteSession] = {}
        self._stats_requests = itertools.count(1)
        self._stats_waiting: dict[int, asyncio.Future[bytes]] = {}
        # Node admission over the workers: each worker may use max_cpu of its core, the
        # consumer and egress limits are the node's, split evenly.
        self.node = self.workers_node = WorkersNode(
            lambda: self.pool,
            AdmissionPolicy(
                max_consumers=config.max_consumers,
                max_cpu=config.max_cpu * workers,
                max_egress_pps=config.max_egress_pps,
            ),
        )
        public_key = config.token_public_key.public_bytes_raw() if config.token_public_key else b""
        self._room_states: dict[str, dict[int, RoomState]] = {}
        # Worker pairs that have a pipe (made when they first share a room).
        self._pipes: set[frozenset[int]] = set()
        # Makes the two connected datagram sockets of a pipe (tests may add impairment).
        self.pipe_sockets: Callable[[], tuple[socket.socket, socket.socket]] = pipe_socketpair
        # In an overlay: stand-ins for the workers' participants, and the relay's pipes.
        self.hub = RelayHub(self)
        base = WorkerSetup(
            api_secret=config.api_secret,
            token_public_key=public_key,
            ice_addresses=list(config.ice_addresses),
            ice_announce=config.ice_announce,
            ice_port=config.ice_port,
            max_consumers=math.ceil(config.max_consumers / workers),
            max_cpu=config.max_cpu,
            max_egress_pps=config.max_egress_pps / workers,
            keyframe_request_delay=config.keyframe_request_delay,
            answer_timeout=config.answer_timeout,
        )
        self.pool = WorkerPool(
            workers,
            base,
            self._on_frame,
            self._on_lost,
            log_level=log_level,
            log_json=log_json,
            uvloop=uvloop,
        )

    def open_session(self, send: Any, ws: web.WebSocketResponse) -> Any:
        """A connection's session: forwarded to a worker once it joins."""
        return RemoteSession(self, send, ws)

    def background(self, coro: Any) -> None:
        """Run ``coro`` as a task the supervisor keeps a reference to."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_frame(self, handle: WorkerHandle, frame: Frame) -> None:
        if isinstance(frame, ToClient):
            session = self.conns.get(frame.conn)
            if session is not None and session.worker is handle:
                session.deliver(frame.data.decode())
        elif isinstance(frame, SessionEnded):
            session = self.conns.get(frame.conn)
            if session is not None and session.worker is handle:
                session.ended()
        elif isinstance(frame, Load):
            handle.load = frame
        elif isinstance(frame, RoomState):
            self._room_state(handle, frame)
        elif isinstance(frame, StatsReply):
            waiting = self._stats_waiting.pop(frame.request, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(frame.data)

    def _on_lost(self, handle: WorkerHandle) -> None:
        self.workers_node.worker_lost(handle)
        self.hub.worker_lost(handle.worker_id)
        for conn in list(handle.conns):
            session = self.conns.get(conn)
            if session is not None:
                session.worker_lost()
        for room, states in list(self._room_states.items()):
            if handle.worker_id in states:
                self._room_state(handle, RoomState(room, [], []), lost=True)
        self._pipes = {pair for pair in self._pipes if handle.worker_id not in pair}

    def _sibling_frame(self, worker_id: int, state: RoomState, lost: bool = False) -> SiblingRoom:
        return SiblingRoom(state.room, worker_id, state.members, state.producers, lost)

    def _ensure_pipe(self, a: WorkerHandle, b: WorkerHandle) -> None:
        """Give workers ``a`` and ``b`` a pipe, once (idle workers keep none: a pipe's
        heartbeats are timers)."""
        pair = frozenset((a.worker_id, b.worker_id))
        if pair in self._pipes or a.pipe_channel is None or b.pipe_channel is None:
            return
        one, other = self.pipe_sockets()
        try:
            send_pipe(a.pipe_channel, b.worker_id, one)
            send_pipe(b.pipe_channel, a.worker_id, other)
            self._pipes.add(pair)
        except OSError as exc:
            log.warning("handing a pipe to workers %s failed: %r", sorted(pair), exc)
        finally:
            one.close()
            other.close()

    def _room_state(self, handle: WorkerHandle, state: RoomState, lost: bool = False) -> None:
        """A worker's members and producers of a room changed: pass it to the room's other
        workers (and, to a worker new in the room, theirs). ``lost``: the worker died."""
        self.hub.worker_state(handle.worker_id, state)
        states = self._room_states.setdefault(state.room, {})
        joined = handle.worker_id not in states
        if state.members or state.producers:
            states[handle.worker_id] = state
        else:
            states.pop(handle.worker_id, None)
            if not states:
                del self._room_states[state.room]
        frame = self._sibling_frame(handle.worker_id, state, lost)
        for worker_id in states:
            other = self.pool.workers[worker_id]
            if worker_id == handle.worker_id or other.channel is None:
                continue
            self._ensure_pipe(handle, other)
            other.channel.send(frame)
            if joined and handle.channel is not None:
                handle.channel.send(self._sibling_frame(worker_id, states[worker_id]))

    async def _tick(self) -> None:
        # The supervisor forwards no media to clients: once a second it measures the
        # workers and keeps the edge's limits. In an overlay it holds the producers relayed
        # from other nodes, whose timers (held keyframe requests) run every 0.1 s.
        self.pool.sample_cpu()
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.1 if self.node.routers else 1.0)
            if self.node.routers:
                self.node.tick(time.time())
            now = time.monotonic()
            if now - last < 1.0:
                continue
            last = now
            self.hub.refresh_all()
            self.pool.sample_cpu()
            self._close_stalled_messages(now)
            self._join_buckets.expire(now)
            totals = self.node.totals()
            self.node.admission.update(
                sum(h.cpu for h in self.pool.workers),
                float(totals["egress_packet_rate"]),
                int(totals["consumers"]),
            )

    async def start(self) -> None:
        """Listen (a port in use fails before any worker starts, the workers' ICE ports
        included), then start the workers; joins that arrive meanwhile wait for them."""
        check_ice_ports(self.pool.setup, len(self.pool.workers))
        await super().start()
        await self.pool.start()

    async def stop(self) -> None:
        """Close every connection, stop serving and stop every worker."""
        for session in list(self.conns.values()):
            await session.close()
        await self.hub.close()
        await super().stop()
        await self.pool.stop()

    # -- the overlay (peer/relay_hub.py) ----------------------------------------------

    def relay_lookup(self, producer_id: str) -> RelaySource | PendingSource | None:
        """A worker's producer for another node: piped to the supervisor first."""
        return self.hub.serve_node(producer_id)

    def producer_room(self, producer_id: str) -> str | None:
        """The room of a producer on a worker, or relayed into the supervisor."""
        return self.hub.producer_room(producer_id) or super().producer_room(producer_id)

    def local_producers(self, room: str) -> list[tuple[str, str]]:
        """Producers of ``room`` published on the workers (by members staying here)."""
        return self.hub.local_producers(room)

    def room_workers(self, room: str) -> set[int]:
        """Workers with participants of ``room``."""
        workers = set(self._room_states.get(room, {}))
        workers.update(h.worker_id for h in self.pool.workers if room in h.rooms)
        return workers

    def worker_link(self, worker_id: int) -> tuple[Channel | None, socket.socket | None]:
        """The worker's frame channel and pipe channel (None while it is down)."""
        handle = self.pool.workers[worker_id]
        return handle.channel, handle.pipe_channel

    def _session_of(self, participant_id: str) -> RemoteSession | None:
        for session in self.conns.values():
            if session.participant_id == participant_id:
                return session
        return None

    def tell(self, participant_id: str, message: dict[str, object]) -> None:
        """Send ``message`` to a participant on any worker."""
        session = self._session_of(participant_id)
        if session is not None:
            session.deliver(encode(message))

    async def _migrate(self, room: str, member: object) -> None:
        """Drain: the participant's worker tells it where to move."""
        if not isinstance(member, WorkerMember):
            return
        session = self._session_of(member.participant_id)
        if session is None or session.worker is None or session.worker.channel is None:
            return
        target = await self.migration_target(room, member.region, member.participant_id)
        if target is not None and session.worker is not None and session.worker.channel:
            session.worker.channel.send(Migrate(session.conn, target))

    async def _wait_lingering_producers(self) -> None:
        """As a single-process node: the workers' producers of participants that moved
        stay a few seconds, and the node exits after them."""
        deadline = time.monotonic() + MIGRATED_LINGER + 1.0
        while time.monotonic() < deadline and self.hub.has_local_producers():
            await asyncio.sleep(0.1)

    async def hang_up(self, participant_id: str) -> None:
        """End a participant's session on its worker and close its socket."""
        session = self._session_of(participant_id)
        if session is not None:
            await session.close()
            session.ended(WSCloseCode.GOING_AWAY, b"node stopping")

    async def worker_stats(self, timeout: float = 5.0) -> list[dict[str, Any] | None]:
        """Each worker's own ``/stats`` (None for a worker that is down or did not answer)."""

        async def one(handle: WorkerHandle) -> dict[str, Any] | None:
            if handle.channel is None:
                return None
            request = next(self._stats_requests)
            waiting = self._stats_waiting[request] = asyncio.get_running_loop().create_future()
            handle.channel.send(StatsRequest(request))
            try:
                data = await asyncio.wait_for(waiting, timeout)
            except TimeoutError:
                self._stats_waiting.pop(request, None)
                return None
            stats: dict[str, Any] = msgspec.json.decode(data)
            return stats

        return list(await asyncio.gather(*(one(h) for h in self.pool.workers)))

    def stats(self) -> dict[str, object]:
        """Node totals summed over the workers, and each worker's load."""
        stats = super().stats()
        stats["workers"] = [h.describe() for h in self.pool.workers]
        return stats

    async def stats_handler(self, request: web.Request) -> web.Response:
        stats = self.stats()
        described = [h.describe() for h in self.pool.workers]
        rooms: dict[str, dict[str, object]] = {}
        codec_instances = 0
        for entry, worker in zip(described, await self.worker_stats(), strict=True):
            if worker is None:
                continue
            # Producers of other workers piped into this one (one flow each).
            entry["piped_producers"] = worker.get("piped_producers", [])
            entry["pipe_repaired"] = worker.get("pipe_repaired", 0)
            entry["pipes"] = worker.get("pipes", [])
            entry["ice_port"] = worker.get("ice_port")  # the worker's shared ICE port
            codec_instances += int(worker.get("codec_instances", 0))
            for room, members in dict(worker.get("rooms", {})).items():
                rooms.setdefault(room, {}).update(members)
        stats["workers"] = described
        stats["rooms"] = rooms
        stats["codec_instances"] = codec_instances
        return web.json_response(stats)


__all__ = ["RemoteSession", "Supervisor", "WorkerHandle", "WorkerPool", "usable_cores"]
