"""Real kademlia nodes on 127.0.0.1: multi-writer rooms, forged records, enumeration."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import pytest_asyncio
import umsgpack
from kademlia.node import Node

from dht import Directory, Load, NodeIdentity, Producer, RejectReason, RoomEntry, sign_record
from dht.records import REGIONS_KEY, RecordKind, room_key, verify_record
from dht.server import DirectoryServer
from dht.storage import RESPONSE_BUDGET
from tests.dht.cluster import HOST, REGIONS, TEST_CONFIG, eventually, start_cluster, stop_cluster

pytestmark = pytest.mark.asyncio(loop_scope="module")

CLUSTER_SIZE = 32
ROOM = "standup"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[list[Directory]]:
    nodes = await start_cluster(CLUSTER_SIZE, ttl=10.0)
    yield nodes
    await stop_cluster(nodes)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hosts(cluster: list[Directory]) -> list[Directory]:
    chosen = cluster[3:8]
    await asyncio.gather(
        *(
            d.announce_room(ROOM, participants=i + 1, producers=[Producer(f"mic{i}", "audio")])
            for i, d in enumerate(chosen)
        )
    )
    return chosen


async def test_five_hosts_of_one_room_seen_from_every_node(
    cluster: list[Directory], hosts: list[Directory]
) -> None:
    expected = sorted(d.node_id for d in hosts)
    results = await asyncio.gather(*(d.room_hosts(ROOM) for d in cluster))
    for entries in results:
        assert [e.node_id for e in entries] == expected
    by_node = {e.node_id: e for e in results[0]}
    for i, d in enumerate(hosts):
        assert by_node[d.node_id].participants == i + 1
        assert by_node[d.node_id].producers == (Producer(f"mic{i}", "audio"),)


async def test_unknown_room_has_no_hosts(cluster: list[Directory]) -> None:
    assert await cluster[0].room_hosts("nobody-here") == []


async def test_enumerates_regions_and_region_nodes(cluster: list[Directory]) -> None:
    assert await cluster[5].regions() == sorted(REGIONS)
    for region in REGIONS:
        nodes = await cluster[11].region_nodes(region)
        assert sorted(n.node_id for n in nodes) == sorted(
            d.node_id for d in cluster if d.region == region
        )
    everyone = await cluster[2].nodes()
    assert len(everyone) == CLUSTER_SIZE
    record = await cluster[20].node(cluster[9].node_id)
    assert record is not None
    assert record.signaling_url == cluster[9].record.signaling_url
    assert record.relay_key == cluster[9].identity.public_key


async def test_load_update_is_published_by_refresh(cluster: list[Directory]) -> None:
    target = cluster[13]
    load = Load(cpu=0.7, rooms=3, producers=5, consumers=11, headroom=0.25)
    target.update_load(load)

    async def published() -> bool:
        record = await cluster[1].node(target.node_id)
        return record is not None and record.load == load

    # no explicit announce: the periodic refresh (every ttl/3) must carry it
    assert await eventually(published, timeout=30)


async def test_withdrawn_room_and_stopped_node_disappear_at_once(cluster: list[Directory]) -> None:
    a, b, observer = cluster[25], cluster[26], cluster[0]
    await asyncio.gather(a.announce_room("short"), b.announce_room("short"))
    assert len(await observer.room_hosts("short")) == 2
    await a.withdraw_room("short")
    assert [e.node_id for e in await observer.room_hosts("short")] == [b.node_id]
    await b.stop()  # graceful: tombstones for node and rooms
    assert await observer.room_hosts("short") == []
    assert await observer.node(b.node_id) is None
    assert b.node_id not in {n.node_id for n in await observer.nodes()}


async def test_forged_records_rejected_by_every_holder_and_never_returned(
    cluster: list[Directory], hosts: list[Directory]
) -> None:
    live = [d for d in cluster if d.server.protocol is not None]
    attacker = DirectoryServer(NodeIdentity.generate().node_id, config=TEST_CONFIG)
    await attacker.listen(0, HOST)
    await attacker.bootstrap([live[0].address])
    try:
        await _forge_and_check(live, hosts, attacker)
    finally:
        attacker.stop()


async def _forge_and_check(
    live: list[Directory], hosts: list[Directory], attacker: DirectoryServer
) -> None:
    loop_now = live[0].clock
    mallory = NodeIdentity.generate()
    victim = hosts[0]
    key = room_key(ROOM)
    holders = [
        d
        for d in live
        if any(r.publisher == victim.identity.public_key for r in d.server.storage.records(key))
    ]
    assert holders, "the victim's record is held somewhere"
    current = next(
        r
        for r in holders[0].server.storage.records(key)
        if r.publisher == victim.identity.public_key
    )
    now = loop_now()
    oldest_held = min(
        r.seq
        for d in holders
        for r in d.server.storage.records(key)
        if r.publisher == victim.identity.public_key
    )

    def entry(node_id: bytes, participants: int = 99, room: str = ROOM) -> RoomEntry:
        return RoomEntry(room=room, node_id=node_id, participants=participants)

    # captured victim record (its real wire), tampered: participants changed, signature kept
    outer = msgspec.msgpack.decode(current.wire)
    envelope = msgspec.msgpack.decode(outer[0])
    envelope[6] = msgspec.msgpack.encode([ROOM, victim.node_id, 1000, []])
    tampered = msgspec.msgpack.encode([msgspec.msgpack.encode(envelope), outer[1]])

    other_room_wire = sign_record(
        victim.identity,
        room_key("elsewhere"),
        entry(victim.node_id, room="elsewhere"),
        seq=current.seq + 10,
        expires_at=now + 8,
    )
    forged_everywhere: dict[str, object] = {
        "impersonation": sign_record(
            mallory, key, entry(victim.node_id), seq=current.seq + 1, expires_at=now + 8
        ),
        "tampered payload": tampered,
        "replay under another key": other_room_wire,
        "expired": sign_record(mallory, key, entry(mallory.node_id), seq=1, expires_at=now - 1),
        "over-long ttl": sign_record(
            mallory, key, entry(mallory.node_id), seq=1, expires_at=now + 3600
        ),
        "garbage bytes": b"\x92\xc4\x03abc\xc4\x02zz",
        "garbage type": {"value": b"x"},
        "empty erase value": b"",
        "none erase value": None,
    }
    older = sign_record(
        victim.identity,
        key,
        entry(victim.node_id, participants=7),
        seq=oldest_held - 1,
        expires_at=now + 8,
    )
    protocol = attacker.protocol
    assert protocol is not None

    async def store_everywhere(targets: list[Directory], value: object) -> list[object]:
        answers = await asyncio.gather(
            *(protocol.call_store(Node(d.node_id, *d.address), key, value) for d in targets)
        )
        return [value for ok, value in answers if ok]

    for name, value in forged_everywhere.items():
        answers = await store_everywhere(live, value)
        assert answers and all(a is False for a in answers), name
    # an older sequence is refused by every node holding the newer record
    answers = await store_everywhere(holders, older)
    assert answers and all(a is False for a in answers)

    forged_wires = {v for v in forged_everywhere.values() if isinstance(v, bytes)} | {older}
    for d in live:
        stored = {
            r.wire for k in d.server.storage.stored_keys() for r in d.server.storage.records(k)
        }
        assert not stored & forged_wires
        assert d.server.storage.records(room_key("elsewhere")) == []
    for counter in (RejectReason.IMPERSONATION, RejectReason.EXPIRED, RejectReason.GARBAGE):
        assert all(d.server.storage.rejected.get(counter, 0) >= 1 for d in live)

    expected = sorted(d.node_id for d in hosts)
    results = await asyncio.gather(*(d.room_hosts(ROOM) for d in live))
    for entries in results:
        assert [e.node_id for e in entries] == expected
        assert all(e.participants < 99 for e in entries)
        assert mallory.node_id not in {e.node_id for e in entries}
    lookup = await live[1].server.get_records(key)
    assert all(r.kind is RecordKind.ROOM for r in lookup.records)
    assert await live[1].room_hosts("elsewhere") == []


async def test_large_keys_are_paged_in_bounded_answers(cluster: list[Directory]) -> None:
    live = [d for d in cluster if d.server.protocol is not None]
    holder = next(d for d in live if len(d.server.storage.records(REGIONS_KEY)) > 20)
    asker = next(d for d in live if d is not holder)
    assert asker.server.protocol is not None
    peer = Node(holder.node_id, *holder.address)
    assert holder.server.protocol is not None
    budget = 1500
    holder.server.protocol.response_budget = budget  # force several pages
    collected: list[bytes] = []
    after = b""
    pages = 0
    while True:
        ok, answer = await asker.server.protocol.call_find_records(peer, REGIONS_KEY, after)
        assert ok
        pages += 1
        assert sum(len(w) for w in answer["records"]) <= budget
        assert len(umsgpack.packb(answer)) < 8192
        collected.extend(answer["records"])
        if answer["next"] is None:
            break
        after = answer["next"]
    holder.server.protocol.response_budget = RESPONSE_BUDGET
    assert pages >= 3
    # Records may be refreshed (new sequence, new bytes) while we page: compare publishers.
    paged = {verify_record(w, now=time.time(), key=REGIONS_KEY).publisher for w in collected}
    assert len(paged) == len(collected)
    assert paged == {r.publisher for r in holder.server.storage.records(REGIONS_KEY)}
