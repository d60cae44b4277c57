"""The overlay on a node with worker processes: the supervisor's side.

The supervisor owns the node's identity, its directory records and its relay endpoint; media
runs in the workers. :class:`RelayHub` lets the overlay (:mod:`peer.overlay`) run on the
supervisor unchanged, with the same rule as a single-process node: **one relay flow per
producer per remote node**, whichever workers consume it.

- The supervisor's ``Rooms`` hold a stand-in (:class:`WorkerMember`) for every participant
  on a worker, kept from the workers' ``RoomState`` reports: the overlay announces the node's
  whole membership, and its local producers come from the same reports.
- A producer of another node is relayed into the supervisor's router, as on any node, and
  piped from there to each worker of the room that consumes it. To the workers the
  supervisor is one more sibling (:data:`~peer.ipc.SUPERVISOR_ID`) whose members and
  producers are the room's on other nodes; a worker pulls them through its pipe to the
  supervisor exactly as it pulls another worker's.
- A producer of a worker pulled by another node is piped from its worker to the
  supervisor and served from there: the pipe's remote producer is the relay source
  (a chained hop: NACKs answered from the supervisor's copy, keyframe requests upstream).

See docs/architecture.md, "Worker processes".
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from peer.engine import Node, Producer
from peer.ipc import (
    SUPERVISOR_ID,
    Channel,
    Member,
    ProducerInfo,
    RoomState,
    SiblingRoom,
    send_pipe,
)
from peer.relay_bridge import ProducerRelaySource
from peer.room import Rooms
from relay import PendingSource, RelayPipe, RelaySource

log = logging.getLogger("cascade.relay_hub")

#: Seconds a deferred relay lookup may take (a pipe to open, a producer to relay in);
#: below the 10 s a subscriber waits for its answer.
FETCH_TIMEOUT = 8.0
#: Messages to room members that the workers produce themselves from sibling states; the
#: supervisor's stand-ins only note that the room's view for the workers may have changed.
_ROOM_CHANGES = frozenset(
    {"participant_joined", "participant_left", "producer_added", "producer_removed"}
)


class HubHost(Protocol):
    """What the hub needs of the supervisor (``peer.supervisor.Supervisor``)."""

    rooms: Rooms
    node: Node
    pipe_sockets: Callable[[], tuple[socket.socket, socket.socket]]
    # Set by the overlay (None outside one).
    pull_producer: Callable[[str, str], Awaitable[bool]] | None
    remote_participants: Callable[[str], Awaitable[list[dict[str, object]]]]
    remote_producers: Callable[[str], list[dict[str, object]]]

    def room_workers(self, room: str) -> set[int]:
        """Workers with participants of ``room``."""

    def worker_link(self, worker_id: int) -> tuple[Channel | None, socket.socket | None]:
        """The worker's frame channel and pipe channel (None while it is down)."""

    def tell(self, participant_id: str, message: dict[str, object]) -> None:
        """Send ``message`` to a participant on any worker."""

    async def hang_up(self, participant_id: str) -> None:
        """End a participant's session."""


class WorkerMember:
    """A participant on a worker, as the supervisor's rooms (and so the overlay) see it."""

    def __init__(self, hub: RelayHub, worker_id: int, room: str, member: Member) -> None:
        self.hub = hub
        self.worker_id = worker_id
        self.room = room
        self.participant_id = member.participant_id
        self.name = member.name
        self.auto = member.auto
        self.moving = member.moving
        self.region = member.region

    @property
    def subscribes_automatically(self) -> bool:
        """Whether the participant consumes every producer of the room as it appears."""
        return self.auto

    def post(self, message: dict[str, object]) -> None:
        """What the overlay tells the room reaches the workers as sibling states, except
        relay link states, which only the supervisor knows: those go to the client."""
        kind = message.get("type")
        if kind in _ROOM_CHANGES:
            self.hub.room_changed(self.room)
        elif kind == "producer_state":
            self.hub.supervisor.tell(self.participant_id, message)

    def describe(self) -> dict[str, object]:
        """The participant as other members see it."""
        return {"participant_id": self.participant_id, "name": self.name}

    def auto_subscribe_to(self, producer: Producer) -> None:
        """Subscriptions happen on the worker (it pulls the producer through its pipe)."""

    def stats(self) -> dict[str, object]:
        """Stream stats live on the worker (``/stats`` asks each worker)."""
        return {"worker_id": self.worker_id}

    def codec_instances(self) -> int:
        """An SFU runs no codec."""
        return 0

    async def close(self) -> None:
        """End the participant's connection (its worker ends its session)."""
        await self.hub.supervisor.hang_up(self.participant_id)


class RelayHub:
    """The supervisor's side of the overlay: stand-in members, the node's local producers
    for the directory, and the pipes between the relay endpoint and the workers."""

    def __init__(self, supervisor: HubHost) -> None:
        self.supervisor = supervisor
        # (room, worker id) -> that worker's local producers of the room
        self._producers: dict[tuple[str, int], list[ProducerInfo]] = {}
        # (room, worker id) -> the supervisor's sibling state last sent to that worker
        self._sent: dict[tuple[str, int], SiblingRoom] = {}
        self.pipes: dict[int, RelayPipe] = {}
        self._opening: dict[int, asyncio.Task[RelayPipe]] = {}
        self._fetching: dict[str, PendingSource] = {}
        self._served: dict[str, ProducerRelaySource] = {}
        self._changed: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def active(self) -> bool:
        """Whether the node is in an overlay (the overlay set its hooks)."""
        return self.supervisor.pull_producer is not None

    def _task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the workers' rooms, for the overlay -----------------------------------------

    def worker_state(self, worker_id: int, state: RoomState) -> None:
        """A worker's members and local producers of a room: keep the stand-ins and the
        node's share of the room current."""
        rooms = self.supervisor.rooms
        room = state.room
        present = {m.participant_id: m for m in state.members}
        hosted = rooms.get(room)
        for member in hosted.members if hosted is not None else []:
            if (
                isinstance(member, WorkerMember)
                and member.worker_id == worker_id
                and member.participant_id not in present
            ):
                rooms.leave(room, member)
        for pid, reported in present.items():
            hosted = rooms.get(room)
            current = hosted.member(pid) if hosted is not None else None
            if isinstance(current, WorkerMember):
                current.name, current.auto = reported.name, reported.auto
                current.moving, current.region = reported.moving, reported.region
            elif current is None:
                rooms.join(room, WorkerMember(self, worker_id, room, reported))
        key = (room, worker_id)
        before = self._producers.get(key, [])
        if state.producers:
            self._producers[key] = list(state.producers)
        else:
            self._producers.pop(key, None)
        if not state.members and not state.producers:
            self._sent.pop(key, None)
        if before != state.producers and rooms.get(room) is not None:
            rooms.changed(room)  # the node's share of the room changed

    def local_producers(self, room: str) -> list[tuple[str, str]]:
        """Producers of ``room`` published on the workers by members not moving away."""
        hosted = self.supervisor.rooms.get(room)
        if hosted is None:
            return []
        staying = {m.participant_id for m in hosted.members if not m.moving}
        return sorted(
            (p.producer_id, p.kind)
            for (name, _), producers in self._producers.items()
            if name == room
            for p in producers
            if not p.participant_id or p.participant_id in staying
        )

    def has_local_producers(self) -> bool:
        """Whether any worker still has a producer of its own (lingering ones included)."""
        return bool(self._producers)

    def producer_room(self, producer_id: str) -> str | None:
        """The room of a producer published on one of the workers."""
        for (room, _), producers in self._producers.items():
            if any(p.producer_id == producer_id for p in producers):
                return room
        return None

    def _worker_of(self, producer_id: str) -> int | None:
        for (_, worker_id), producers in self._producers.items():
            if any(p.producer_id == producer_id for p in producers):
                return worker_id
        return None

    # -- what the workers see of other nodes ----------------------------------------

    def room_changed(self, room: str) -> None:
        """The room's members or producers on other nodes may have changed: tell the
        room's workers (once per loop iteration)."""
        if not self.active or room in self._changed:
            return
        self._changed.add(room)
        self._task(self._refresh(room))

    def refresh_all(self) -> None:
        """Check every room (producers of other nodes not relayed yet appear in the
        directory without any event here)."""
        for hosted in self.supervisor.rooms:
            self.room_changed(hosted.name)

    async def _refresh(self, room: str) -> None:
        await asyncio.sleep(0)
        self._changed.discard(room)
        try:
            state = await self._state(room)
        except Exception:
            log.exception("room %s: reading its state on other nodes failed", room)
            return
        for worker_id in self.supervisor.room_workers(room):
            self._send(worker_id, state)

    async def _state(self, room: str) -> SiblingRoom:
        """The room on other nodes, as one sibling: members, and producers (relayed here
        already or not)."""
        supervisor = self.supervisor
        remote = await supervisor.remote_participants(room)
        members = [Member(str(p["participant_id"]), _name(p.get("name"))) for p in remote]
        producers: dict[str, ProducerInfo] = {}
        router = supervisor.node.routers.get(room)
        if router is not None:
            for producer in router.producers.values():
                if producer.origin == "relay" and not producer.closed:
                    producers[producer.id] = ProducerInfo(
                        producer.id, producer.kind, producer.participant_id
                    )
        for info in supervisor.remote_producers(room):
            pid = str(info["producer_id"])
            producers.setdefault(pid, ProducerInfo(pid, str(info.get("kind", "video"))))
        return SiblingRoom(room, SUPERVISOR_ID, members, sorted(producers.values(), key=_by_id))

    def _send(self, worker_id: int, state: SiblingRoom) -> None:
        key = (state.room, worker_id)
        previous = self._sent.get(key)
        if previous == state or (previous is None and not state.members and not state.producers):
            return
        channel, _ = self.supervisor.worker_link(worker_id)
        if channel is None:
            return
        if state.producers:
            try:
                self._open_pipe(worker_id)
            except ConnectionError as exc:
                log.warning("no pipe to worker %d: %s", worker_id, exc)
                return  # sent again at the next refresh
        self._sent[key] = state
        channel.send(state)

    async def introduce(self, worker_id: int, room: str) -> None:
        """Before a participant's join reaches ``worker_id``: the room on other nodes, so
        that the join's reply lists it."""
        if not self.active:
            return
        try:
            state = await self._state(room)
        except Exception:
            log.exception("room %s: reading its state on other nodes failed", room)
            return
        self._send(worker_id, state)

    # -- pipes ---------------------------------------------------------------------

    def _open_pipe(self, worker_id: int) -> asyncio.Task[RelayPipe]:
        """The pipe to ``worker_id``, opened once: one end handed to the worker, the other
        served here."""
        opening = self._opening.get(worker_id)
        if opening is not None:
            return opening
        _, pipe_channel = self.supervisor.worker_link(worker_id)
        ours, theirs = self.supervisor.pipe_sockets()
        try:
            if pipe_channel is None:
                raise ConnectionError(f"worker {worker_id} is down")
            send_pipe(pipe_channel, SUPERVISOR_ID, theirs)
        except OSError as exc:
            ours.close()
            raise ConnectionError(f"handing a pipe to worker {worker_id}: {exc!r}") from exc
        finally:
            theirs.close()

        async def open_pipe() -> RelayPipe:
            pipe = await RelayPipe.open(ours, self._serve_worker, name=f"worker-{worker_id}")
            self.pipes[worker_id] = pipe

            def closed() -> None:
                if self.pipes.get(worker_id) is pipe:
                    del self.pipes[worker_id]
                if self._opening.get(worker_id) is task:
                    del self._opening[worker_id]

            pipe.on_close(closed)
            return pipe

        task = self._opening[worker_id] = asyncio.ensure_future(open_pipe())
        return task

    async def _pipe(self, worker_id: int) -> RelayPipe:
        pipe = await self._open_pipe(worker_id)
        if pipe.state != "live":
            self._opening.pop(worker_id, None)
            pipe = await self._open_pipe(worker_id)
        return pipe

    def worker_lost(self, worker_id: int) -> None:
        """A worker died: its pipe goes (a new one is made for its replacement)."""
        task = self._opening.pop(worker_id, None)
        pipe = self.pipes.pop(worker_id, None)
        if pipe is not None:
            self._task(pipe.close(lost=True))
        elif task is not None:
            task.cancel()
        for key in [k for k in self._sent if k[1] == worker_id]:
            del self._sent[key]

    # -- relay sources ---------------------------------------------------------------

    def serve_node(self, producer_id: str) -> RelaySource | PendingSource | None:
        """A worker's producer for another node's relay link: piped here first."""
        worker_id = self._worker_of(producer_id)
        if worker_id is None:
            return None
        pipe = self.pipes.get(worker_id)
        if pipe is not None and pipe.state == "live":
            piped = pipe.producers.get(producer_id)
            if piped is not None and not piped.closed:
                return piped
        return self._fetch(producer_id, self._pipe_from_worker(worker_id, producer_id))

    async def _pipe_from_worker(self, worker_id: int, producer_id: str) -> RelaySource | None:
        pipe = await self._pipe(worker_id)
        return await pipe.subscribe(producer_id, timeout=FETCH_TIMEOUT)

    def _serve_worker(self, producer_id: str) -> RelaySource | PendingSource | None:
        """A producer of another node for a worker's pipe: relayed here first."""
        source = self._relayed(producer_id)
        if source is not None:
            return source
        room = next(
            (
                state.room
                for state in self._sent.values()
                if any(p.producer_id == producer_id for p in state.producers)
            ),
            None,
        )
        if room is None:
            return None
        return self._fetch(producer_id, self._relay_in(room, producer_id))

    async def _relay_in(self, room: str, producer_id: str) -> RelaySource | None:
        pull = self.supervisor.pull_producer
        if pull is None or not await pull(room, producer_id):
            return None
        return self._relayed(producer_id)

    def _relayed(self, producer_id: str) -> ProducerRelaySource | None:
        served = self._served.get(producer_id)
        if served is not None and not served.producer.closed:
            return served
        for router in self.supervisor.node.routers.values():
            producer = router.producers.get(producer_id)
            if producer is not None and producer.origin == "relay" and not producer.closed:
                served = self._served[producer_id] = ProducerRelaySource(producer)
                producer.on_close(self._forget_served)
                return served
        return None

    def _forget_served(self, producer: Producer) -> None:
        self._served.pop(producer.id, None)

    def _fetch(
        self, producer_id: str, fetch: Coroutine[Any, Any, RelaySource | None]
    ) -> PendingSource:
        """A lookup answered when ``fetch`` finishes (one fetch per producer at a time)."""
        pending = self._fetching.get(producer_id)
        if pending is not None:
            fetch.close()
            return pending
        pending = self._fetching[producer_id] = PendingSource()

        async def run() -> None:
            source: RelaySource | None = None
            try:
                source = await asyncio.wait_for(fetch, FETCH_TIMEOUT)
            except Exception as exc:
                log.info("could not fetch producer %s: %r", producer_id, exc)
            finally:
                if self._fetching.get(producer_id) is pending:
                    del self._fetching[producer_id]
                pending.resolve(source)

        self._task(run())
        return pending

    async def close(self) -> None:
        """Close every pipe and pending fetch."""
        for task in list(self._tasks):
            task.cancel()
        for pipe in list(self.pipes.values()):
            await pipe.close()
        for pending in list(self._fetching.values()):
            pending.resolve(None)


def _name(value: object) -> str | None:
    return None if value is None else str(value)


def _by_id(info: ProducerInfo) -> str:
    return info.producer_id


__all__ = ["HubHost", "RelayHub", "WorkerMember"]
