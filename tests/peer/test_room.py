"""Room membership and broadcast, without sockets or an event loop."""

from __future__ import annotations

from peer.engine import CodecInfo, Node, Producer
from peer.room import Rooms


class Participant:
    def __init__(self, participant_id: str, auto: bool = True) -> None:
        self.participant_id = participant_id
        self.name: str | None = participant_id.upper()
        self.inbox: list[dict[str, object]] = []
        self.consumed: list[str] = []
        self.subscribes_automatically = auto
        self.moving = False

    def post(self, message: dict[str, object]) -> None:
        self.inbox.append(message)

    def describe(self) -> dict[str, object]:
        return {"participant_id": self.participant_id, "name": self.name}

    def auto_subscribe_to(self, producer: Producer) -> None:
        if self.subscribes_automatically:
            self.consumed.append(producer.id)

    def stats(self) -> dict[str, object]:
        return {}

    def codec_instances(self) -> int:
        return 0

    async def close(self) -> None:
        pass

    def types(self) -> list[object]:
        return [m["type"] for m in self.inbox]


def test_join_tells_the_others_and_returns_them() -> None:
    node = Node()
    rooms = Rooms(node)
    changed: list[str] = []
    rooms.changed = changed.append
    a, b, c = Participant("a"), Participant("b"), Participant("c")
    room, others = rooms.join("r", a)
    assert others == []
    _, others = rooms.join("r", b)
    assert others == [a]
    rooms.join("other", c)
    assert a.inbox == [{"type": "participant_joined", "participant": b.describe()}]
    assert b.inbox == [] and c.inbox == []
    assert [m.participant_id for m in rooms.members("r")] == ["a", "b"]
    assert changed == ["r", "r", "other"]
    assert node.totals()["participants"] == 3
    assert room.router is node.routers["r"]


def test_leave_tells_the_others_and_closes_an_empty_room() -> None:
    node = Node()
    rooms = Rooms(node)
    a, b = Participant("a"), Participant("b")
    rooms.join("r", a)
    room, _ = rooms.join("r", b)
    producer = room.router.add_producer(
        Producer(room.router, "a", "video", CodecInfo("video/VP8", 90000))
    )
    producer.close()  # a leaving session closes its producers first
    rooms.leave("r", a)
    assert b.inbox[-1] == {"type": "participant_left", "participant_id": "a", "reason": "left"}
    assert rooms.get("r") is room and "r" in node.routers
    rooms.leave("r", b)
    assert rooms.get("r") is None and "r" not in node.routers
    assert producer.closed
    assert node.totals()["participants"] == 0


def test_an_empty_room_keeps_its_router_while_a_moved_participants_producer_lingers() -> None:
    node = Node()
    rooms = Rooms(node)
    a = Participant("a")
    room, _ = rooms.join("r", a)
    codec = CodecInfo("video/VP8", 90000)
    lingering = room.router.add_producer(Producer(room.router, "a", "video", codec))
    rooms.leave("r", a, "migrated")
    assert rooms.get("r") is None and node.routers["r"] is room.router
    lingering.close("migrating")
    assert "r" not in node.routers


def test_leave_of_a_stranger_changes_nothing() -> None:
    rooms = Rooms(Node())
    a = Participant("a")
    rooms.join("r", a)
    rooms.leave("r", Participant("a"))  # same id, another object
    rooms.leave("nowhere", a)
    assert rooms.members("r") == [a]


class ClosedMedia(Participant):
    """A member whose media connection closed a moment ago: subscribing fails."""

    def auto_subscribe_to(self, producer: Producer) -> None:
        raise RuntimeError("RTCPeerConnection is closed")


def test_a_member_that_cannot_subscribe_does_not_cost_the_others_the_producer() -> None:
    node = Node()
    rooms = Rooms(node)
    owner, first, broken, last = (
        Participant("a"), Participant("b"), ClosedMedia("x"), Participant("c")
    )  # fmt: skip
    for p in (owner, first, broken, last):
        room, _ = rooms.join("r", p)
    changes: list[str] = []
    rooms.changed = changes.append
    producers = [
        room.router.add_producer(Producer(room.router, "a", kind, CodecInfo(mime, 90000)))
        for kind, mime in (("video", "video/VP8"), ("audio", "audio/opus"))
    ]
    for producer in producers:
        assert room.announce_producer(producer)
    ids = [p.id for p in producers]
    assert first.consumed == ids and last.consumed == ids
    assert changes == ["r", "r"]  # the room's share changed: told to the overlay each time
    producers[0].close()
    assert last.inbox[-1]["type"] == "producer_removed"
    assert changes == ["r", "r", "r"]


def test_a_new_producer_reaches_everyone_but_its_owner() -> None:
    node = Node()
    rooms = Rooms(node)
    owner, watcher, passive = Participant("a"), Participant("b"), Participant("c", auto=False)
    for p in (owner, watcher, passive):
        room, _ = rooms.join("r", p)
    for p in (owner, watcher, passive):
        p.inbox.clear()
    producer = room.router.add_producer(
        Producer(room.router, "a", "audio", CodecInfo("audio/opus", 48000, 2))
    )
    room.announce_producer(producer)
    assert owner.inbox == [] and owner.consumed == []
    assert watcher.types() == ["producer_added"] and watcher.consumed == [producer.id]
    assert passive.types() == ["producer_added"] and passive.consumed == []
    producer.close()
    assert watcher.inbox[-1] == {
        "type": "producer_removed",
        "producer_id": producer.id,
        "reason": "closed",
    }
    assert owner.inbox == []
