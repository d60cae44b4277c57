"""Rooms spanning the worker processes of one node: the worker's side.

Each worker reports its members and local producers of every room it hosts to the
supervisor (:class:`~peer.ipc.RoomState`), which passes them to the other workers of that room
(:class:`~peer.ipc.SiblingRoom`). With those, a worker tells its members who else is in the
room (``participant_joined`` / ``participant_left``, ``joined``'s lists) and pipes the other
workers' producers in: one relay flow per producer per worker that consumes it, pulled with the
relay's own link and flow logic (NACKs answered from the origin's cache, keyframe requests
upstream, linger, close with the producer) from the sibling's relay endpoint on loopback, and
bridged into the local router like a producer of another node. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from peer.ipc import Frame, Member, ProducerInfo, RoomState, SiblingRoom

if TYPE_CHECKING:
    from peer.server import NodeServer

log = logging.getLogger("cascade.siblings")
PIPE_HOST = "127.0.0.1"


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
            members = [Member(m.participant_id, m.name) for m in hosted.members]
            producers = [
                ProducerInfo(p.id, p.kind)
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
                producer.close("origin_left")
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
                await self.server.pull_remote_producer(
                    room, sibling.pipe_key, PIPE_HOST, sibling.pipe_port, producer_id
                )
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
                self._task(self._pull(room, sibling, producer.producer_id))

    async def _pull(self, room: str, sibling: SiblingRoom, producer_id: str) -> None:
        try:
            await self.server.pull_remote_producer(
                room, sibling.pipe_key, PIPE_HOST, sibling.pipe_port, producer_id
            )
        except Exception as exc:
            log.info("could not pipe %s from worker %d: %r", producer_id, sibling.worker_id, exc)
        finally:
            self._pulling.discard((room, producer_id))


__all__ = ["SiblingRooms"]
