"""Rooms of a node: who is in each room, and what the room tells its members.

A :class:`Room` is the one place that knows a room's members on this node (the engine's
:class:`~peer.engine.Router` knows only producers and consumers). Sessions and the overlay
talk to rooms; the HTTP edge only creates sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from peer.engine import Node, Producer, Router, same_codec

log = logging.getLogger("cascade.room")


class Member(Protocol):
    """What a room needs of a participant (a signaling session, or a test double)."""

    participant_id: str
    name: str | None
    moving: bool
    """Told to move to another node (drain): its producers are on their way out."""

    @property
    def subscribes_automatically(self) -> bool:
        """Whether the participant consumes every producer of the room as it appears."""

    def post(self, message: dict[str, object]) -> None:
        """Queue a message to the participant."""

    def describe(self) -> dict[str, object]:
        """The participant as other members see it."""

    def auto_subscribe_to(self, producer: Producer) -> None:
        """Consume ``producer`` if the participant auto-subscribes."""

    def stats(self) -> dict[str, object]:
        """The participant's producer and consumer stats."""

    def codec_instances(self) -> int:
        """Media codecs running on the node for this participant (0 for an SFU)."""

    async def close(self) -> None:
        """Leave the room and release the participant's transports."""


class Room:
    """One room on this node: its router and its members, in join order."""

    def __init__(self, name: str, router: Router) -> None:
        self.name = name
        self.router = router
        self._members: dict[str, Member] = {}
        #: called when a local producer is added or closes (the room's share changed)
        self.changed: Callable[[], None] = lambda: None

    @property
    def members(self) -> list[Member]:
        """Members in join order."""
        return list(self._members.values())

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, participant_id: object) -> bool:
        return participant_id in self._members

    def member(self, participant_id: str) -> Member | None:
        """The member with this id, if present."""
        return self._members.get(participant_id)

    def broadcast(self, message: dict[str, object], exclude: str | None = None) -> None:
        """Post ``message`` to every member except ``exclude``."""
        for member in list(self._members.values()):
            if member.participant_id != exclude:
                member.post(message)

    def announce_producer(self, producer: Producer) -> bool:
        """Tell members about a new producer (local or relayed), auto-subscribe them, and
        tell them again when it closes.

        A track republished after its publisher moved (same ``source``) replaces the older
        incarnation, which closes as ``migrating``; an incoming producer older than the one
        already here is closed at once and False returned.

        A member that cannot take the producer (its media connection just closed: it is
        leaving or moving) is skipped; every other member still gets it.
        """
        owner = producer.participant_id
        for other in list(self.router.producers.values()):
            if other is producer or other.source != producer.source or other.closed:
                continue
            if other.created_at > producer.created_at:
                producer.close("migrating")
                return False
            self._replace(other, producer)

        def removed(p: Producer) -> None:
            self.broadcast(
                {"type": "producer_removed", "producer_id": p.id, "reason": p.close_reason},
                exclude=owner,
            )
            if p.origin == "local":
                self.changed()

        producer.on_close(removed)
        for member in self.members:
            if member.participant_id == owner:
                continue
            member.post({"type": "producer_added", "producer": producer.describe()})
            try:
                member.auto_subscribe_to(producer)
            except Exception:
                log.exception("%s could not subscribe to %s", member.participant_id, producer.id)
        if producer.origin == "local":
            self.changed()
        return True

    def _replace(self, old: Producer, new: Producer) -> None:
        """``new`` is a republished ``old`` (same source, its publisher moved). Once ``new``
        has media (or ``old`` ends first), ``old``'s consumers continue on ``new`` with the
        same stream (``consumer_switched``), and ``old`` closes as ``migrating``."""
        if not same_codec(old.codec, new.codec):
            old.close("migrating")  # its subscribers get consumer_closed and a new consumer
            return
        done = False

        def hand_over(_: Producer) -> None:
            nonlocal done
            if done or new.closed:
                return
            done = True
            for consumer in list(old.consumers):
                consumer.switch_to(new)
                member = self._members.get(consumer.subscriber_id)
                if member is not None:
                    member.post(
                        {
                            "type": "consumer_switched",
                            "consumer_id": consumer.id,
                            "producer_id": new.id,
                            "previous_producer_id": old.id,
                            "source": new.source,
                        }
                    )
            owner = self._members.get(old.participant_id)
            if old.origin == "local" and (owner is None or owner.moving):
                return  # it lingers until its own timer: other nodes may still relay it
            old.close("migrating")

        old.on_closing(hand_over)
        new.when_media(hand_over)


class Rooms:
    """Every room of this node. ``changed(room)`` is called after each join and leave (the
    overlay announces membership and pulls remote producers from it)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._rooms: dict[str, Room] = {}
        self.changed: Callable[[str], None] = lambda room: None
        node.participant_count = self.participant_count

    def get(self, name: str) -> Room | None:
        """The room, if anyone is in it here."""
        return self._rooms.get(name)

    def members(self, name: str) -> list[Member]:
        """Members of ``name`` on this node (empty if the room is not here)."""
        room = self._rooms.get(name)
        return room.members if room is not None else []

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self._rooms.values()))

    def __len__(self) -> int:
        return len(self._rooms)

    def participant_count(self) -> int:
        """Members over all rooms."""
        return sum(len(room) for room in self._rooms.values())

    def join(self, name: str, member: Member) -> tuple[Room, list[Member]]:
        """Add ``member`` to room ``name`` (opening it); returns the room and the members that
        were already there, after telling them about the newcomer."""
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name, self.node.router(name))
            room.changed = lambda: self.changed(name)
        others = room.members
        room._members[member.participant_id] = member
        room.broadcast(
            {"type": "participant_joined", "participant": member.describe()},
            exclude=member.participant_id,
        )
        self.changed(name)
        return room, others

    def leave(self, name: str, member: Member, reason: str = "left") -> None:
        """Remove ``member``; tells the others (with ``reason``: "left", or "migrated" when
        it moved to another node), and closes the room once it is empty."""
        room = self._rooms.get(name)
        if room is None or room._members.get(member.participant_id) is not member:
            return
        del room._members[member.participant_id]
        room.broadcast(
            {"type": "participant_left", "participant_id": member.participant_id, "reason": reason}
        )
        if not room._members:
            del self._rooms[name]
            self._close_router_when_idle(name, room.router)
        self.changed(name)

    def _close_router_when_idle(self, name: str, router: Router) -> None:
        """Close an empty room's router, once no local producer lingers in it (producers of
        participants that moved to another node stay a few seconds)."""
        lingering = [p for p in router.producers.values() if p.origin == "local" and not p.closed]
        if not lingering:
            if self.node.routers.get(name) is router:
                self.node.close_router(name)
            return

        def closed(_: Producer) -> None:
            if name not in self._rooms and all(p.closed for p in lingering):
                self._close_router_when_idle(name, router)

        for producer in lingering:
            producer.on_close(closed)
