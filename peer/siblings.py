"""Rooms spanning the worker processes of one node: the worker's side.

Each worker reports its members and local producers of every room it hosts to the
supervisor (:class:`~peer.ipc.RoomState`), which passes them to the other workers of that room
(:class:`~peer.ipc.SiblingRoom`). With those, a worker tells its members who else is in the
room (``participant_joined`` / ``participant_left``, ``joined``'s lists) and pipes the other
workers' producers in: one flow per producer per worker that consumes it, over the
:class:`~relay.RelayPipe` to that worker (a Unix datagram socket pair the supervisor handed
both workers), with the relay's own flow logic (NACKs answered from the origin's cache,
keyframe requests upstream, linger, close with the producer), bridged into the local router
like a producer of another node. See docs/architecture.md, "Worker processes".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from peer.engine import Producer
from peer.ipc import SUPERVISOR_ID, Frame, Member, ProducerInfo, RoomState, SiblingRoom
from peer.relay_bridge import bridge_remote_producer
from relay import RelayPipe

if TYPE_CHECKING:
    from peer.server import NodeServer

log = logging.getLogger("cascade.siblings")
PIPE_WAIT = 10.0
#: Seconds before pulling again the producers of a room whose pull failed (its origin did
#: not have it yet, a pipe was being replaced).
PULL_RETRY = 1.0


class SiblingRooms:
    """A worker's view of its rooms' members and producers on the other workers."""

    def __init__(self, server: NodeServer, send: Callable[[Frame], None]) -> None:
        self.server = server
        self._send = send
        self._reported: dict[str, tuple[list[Member], list[ProducerInfo]]] = {}
        self._siblings: dict[str, dict[int, SiblingRoom]] = {}
        self._pending: set[str] = set()
        self._pulling: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.pipes: dict[int, RelayPipe] = {}
        self._pipe_ready: dict[int, asyncio.Event] = {}
        server.remote_participants = self.remote_participants
        server.remote_producers = self.remote_producers
        server.pull_producer = self.pull_producer
        server.rooms.changed = self.changed

    def _task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what this worker reports -------------------------------------------------

    def changed(self, room: str) -> None:
        """Membership or producers of ``room`` may have changed here: report it (once per
        loop iteration, however many changes)."""
        if room in self._pending:
            return
        self._pending.add(room)
        asyncio.get_running_loop().call_soon(self._report, room)

    def _report(self, room: str) -> None:
        self._pending.discard(room)
        hosted = self.server.rooms.get(room)
        members: list[Member] = []
        producers: list[ProducerInfo] = []
        if hosted is not None:
            members = [
                Member(
                    m.participant_id,
                    m.name,
                    m.subscribes_automatically,
                    m.moving,
                    getattr(m, "region", None),
                )
                for m in hosted.members
            ]
            producers = [
                ProducerInfo(p.id, p.kind, p.participant_id)
                for p in hosted.router.producers.values()
                if p.origin == "local" and not p.closed
            ]
        state = (members, producers)
        if self._reported.get(room) == state:
            return
        if members or producers:
            self._reported[room] = state
        else:
            self._reported.pop(room, None)
            self._siblings.pop(room, None)
        self._send(RoomState(room, members, producers))
        if hosted is not None:
            self._pull_room(room)

    # -- what the other workers have ---------------------------------------------

    def sibling(self, frame: SiblingRoom) -> None:
        """Another worker's state of a room this worker hosts."""
        siblings = self._siblings.setdefault(frame.room, {})
        before = siblings.get(frame.worker_id)
        if frame.members or frame.producers:
            siblings[frame.worker_id] = frame
        else:
            siblings.pop(frame.worker_id, None)
        hosted = self.server.rooms.get(frame.room)
        if hosted is None:
            return
        old = {m.participant_id for m in before.members} if before else set()
        new = {m.participant_id: m for m in frame.members}
        for pid, member in new.items():
            if pid not in old:
                joined = {"participant_id": pid, "name": member.name}
                hosted.broadcast({"type": "participant_joined", "participant": joined})
        for pid in old - set(new):
            hosted.broadcast({"type": "participant_left", "participant_id": pid})
        # Producers the sibling no longer has (unpublished, or the worker died) close here
        # at once, not when the pipe flow times out.
        gone = {p.producer_id for p in before.producers} if before else set()
        gone -= {p.producer_id for p in frame.producers}
        for producer_id in gone:
            producer = hosted.router.producers.get(producer_id)
            if producer is not None and producer.origin == "relay":
                producer.close("origin_lost" if frame.lost else "origin_left")
        self._pull_room(frame.room)

    async def remote_participants(self, room: str) -> list[dict[str, object]]:
        """Participants of ``room`` on the other workers."""
        return [
            {"participant_id": m.participant_id, "name": m.name}
            for sibling in self._siblings.get(room, {}).values()
            for m in sibling.members
        ]

    def remote_producers(self, room: str) -> list[dict[str, object]]:
        """Producers of ``room`` on the other workers not piped here yet."""
        router = self.server.node.routers.get(room)
        here = set(router.producers) if router is not None else set()
        return [
            {"producer_id": p.producer_id, "kind": p.kind, "remote": True}
            for sibling in self._siblings.get(room, {}).values()
            for p in sibling.producers
            if p.producer_id not in here
        ]

    async def pull_producer(self, room: str, producer_id: str) -> bool:
        """Pipe one producer of ``room`` in from the worker that has it (a subscriber asked)."""
        for sibling in self._siblings.get(room, {}).values():
            if any(p.producer_id == producer_id for p in sibling.producers):
                await self.pipe_in(room, sibling.worker_id, producer_id)
                return True
        return False

    def _pull_room(self, room: str) -> None:
        """Pipe in every sibling producer of ``room`` when a member here subscribes
        automatically (others pull on demand, as between nodes)."""
        hosted = self.server.rooms.get(room)
        if hosted is None or not any(m.subscribes_automatically for m in hosted.members):
            return
        router = hosted.router
        for sibling in self._siblings.get(room, {}).values():
            for producer in sibling.producers:
                key = (room, producer.producer_id)
                if producer.producer_id in router.producers or key in self._pulling:
                    continue
                self._pulling.add(key)
                self._task(self._pull(room, sibling.worker_id, producer.producer_id))

    async def _pull(self, room: str, worker_id: int, producer_id: str) -> None:
        try:
            await self.pipe_in(room, worker_id, producer_id)
        except Exception as exc:
            log.info("could not pipe %s from worker %d: %r", producer_id, worker_id, exc)
            asyncio.get_running_loop().call_later(PULL_RETRY, self._pull_room, room)
        finally:
            self._pulling.discard((room, producer_id))

    async def pipe_in(self, room: str, worker_id: int, producer_id: str) -> Producer:
        """Pull ``producer_id`` from worker ``worker_id`` into ``room`` here (one flow per
        producer per worker, shared by every local consumer)."""
        router = self.server.node.router(room)
        existing = router.producers.get(producer_id)
        if existing is not None:
            return existing
        pipe = await self._pipe(worker_id)
        remote = await pipe.subscribe(producer_id)
        existing = router.producers.get(producer_id)
        if existing is not None:
            return existing
        producer = bridge_remote_producer(router, remote)
        hosted = self.server.rooms.get(room)
        if hosted is not None:
            hosted.announce_producer(producer)
        else:  # everyone here left meanwhile
            producer.close()
        return producer

    # -- pipes ------------------------------------------------------------------

    async def _pipe(self, worker_id: int) -> RelayPipe:
        """The pipe to ``worker_id``, waiting for the supervisor to hand it over."""
        pipe = self.pipes.get(worker_id)
        if pipe is None or pipe.state != "live":
            ready = self._pipe_ready.setdefault(worker_id, asyncio.Event())
            await asyncio.wait_for(ready.wait(), PIPE_WAIT)
            pipe = self.pipes[worker_id]
        return pipe

    async def open_pipe(self, worker_id: int, sock: Any) -> None:
        """The supervisor handed over a socket of a pipe to ``worker_id`` (a new one
        replaces the previous: that worker was restarted)."""
        old = self.pipes.pop(worker_id, None)
        if old is not None:
            await old.close()
        name = "supervisor" if worker_id == SUPERVISOR_ID else f"worker-{worker_id}"
        pipe = await RelayPipe.open(sock, self.server.relay_source, name=name)
        self.pipes[worker_id] = pipe

        def closed() -> None:
            if self.pipes.get(worker_id) is pipe:
                del self.pipes[worker_id]
                self._pipe_ready.pop(worker_id, None)

        pipe.on_close(closed)
        self._pipe_ready.setdefault(worker_id, asyncio.Event()).set()

    def pipe_stats(self) -> dict[str, object]:
        """Pipes of this worker: producers pulled through them and their repairs."""
        pulled = [rp for pipe in self.pipes.values() for rp in pipe.producers.values()]
        return {
            "pipes": sorted(self.pipes),
            "pipe_repaired": sum(rp.stats.repaired for rp in pulled),
            "pipe_lost": sum(rp.stats.lost for rp in pulled),
        }

    async def close(self) -> None:
        """Close every pipe."""
        for pipe in list(self.pipes.values()):
            await pipe.close()


__all__ = ["SiblingRooms"]
