"""Sans-I/O tests of the validating record storage."""

from __future__ import annotations

import pytest

from dht import NodeIdentity, RecordRejected, RecordStorage, RejectReason, sign_record
from dht.records import room_key
from tests.dht.test_records import NOW, room_wire


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


KEY = room_key("r1")


def make_storage(**kw: int) -> tuple[RecordStorage, Clock]:
    clock = Clock()
    return RecordStorage(clock=clock, **kw), clock


def test_keeps_newest_record_per_publisher() -> None:
    storage, _ = make_storage()
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    storage.put(KEY, room_wire(alice, seq=1, participants=1))
    storage.put(KEY, room_wire(bob, seq=1))
    storage.put(KEY, room_wire(alice, seq=2, participants=2))
    records = {r.publisher: r for r in storage.records(KEY)}
    assert set(records) == {alice.public_key, bob.public_key}
    assert records[alice.public_key].seq == 2
    assert storage.get(KEY) is not None and len(storage.get(KEY) or []) == 2


def test_rejects_stale_sequence_and_accepts_identical_duplicate() -> None:
    storage, _ = make_storage()
    alice = NodeIdentity.generate()
    newest = room_wire(alice, seq=5)
    storage.put(KEY, newest)
    storage.put(KEY, newest)  # idempotent
    for seq in (4, 5):
        with pytest.raises(RecordRejected) as info:
            storage.put(KEY, room_wire(alice, seq=seq, participants=99))
        assert info.value.reason is RejectReason.STALE
    assert [r.wire for r in storage.records(KEY)] == [newest]
    assert storage.rejected[RejectReason.STALE] == 2


def test_empty_or_garbage_value_cannot_erase() -> None:
    storage, _ = make_storage()
    alice = NodeIdentity.generate()
    wire = room_wire(alice)
    storage.put(KEY, wire)
    for value in (b"", None, 0, b"garbage", [wire]):
        storage[KEY] = value  # kademlia's interface: silently refused
        with pytest.raises(RecordRejected):
            storage.put(KEY, value)
    assert storage[KEY] == [wire]


def test_rejects_record_for_another_key_and_bad_key() -> None:
    storage, _ = make_storage()
    alice = NodeIdentity.generate()
    with pytest.raises(RecordRejected) as info:
        storage.put(room_key("other"), room_wire(alice))
    assert info.value.reason is RejectReason.WRONG_KEY
    with pytest.raises(RecordRejected):
        storage.put(b"short", room_wire(alice))


def test_expired_records_disappear() -> None:
    storage, clock = make_storage()
    alice = NodeIdentity.generate()
    storage.put(KEY, room_wire(alice, expires_at=NOW + 5))
    clock.now = NOW + 4.9
    assert len(storage.records(KEY)) == 1
    clock.now = NOW + 5
    assert storage.records(KEY) == []
    assert storage.get(KEY) is None
    assert list(storage) == []
    with pytest.raises(KeyError):
        storage[KEY]


def test_expired_record_can_be_replaced_by_any_valid_one() -> None:
    storage, clock = make_storage()
    alice = NodeIdentity.generate()
    storage.put(KEY, room_wire(alice, seq=9, expires_at=NOW + 1))
    clock.now = NOW + 2
    storage.put(KEY, room_wire(alice, seq=3, expires_at=NOW + 8))
    assert [r.seq for r in storage.records(KEY)] == [3]


def test_caps_records_per_key_and_keys() -> None:
    storage, _ = make_storage(max_records_per_key=3, max_keys=2)
    ids = [NodeIdentity.generate() for _ in range(4)]
    for identity in ids[:3]:
        storage.put(KEY, room_wire(identity))
    with pytest.raises(RecordRejected) as info:
        storage.put(KEY, room_wire(ids[3]))
    assert info.value.reason is RejectReason.FULL
    storage.put(KEY, room_wire(ids[0], seq=2))  # updates still allowed when full
    storage.put(room_key("r2"), room_wire(ids[0], "r2"))
    with pytest.raises(RecordRejected) as info:
        storage.put(room_key("r3"), room_wire(ids[0], "r3"))
    assert info.value.reason is RejectReason.FULL


def test_pages_respect_byte_budget_and_cover_everything() -> None:
    storage, _ = make_storage()
    ids = [NodeIdentity.generate() for _ in range(20)]
    wires = {room_wire(identity) for identity in ids}
    for wire in wires:
        storage.put(KEY, wire)
    budget = 3 * max(len(w) for w in wires)
    seen: list[bytes] = []
    after = b""
    while True:
        page = storage.page(KEY, after, budget)
        assert sum(len(w) for w in page.records) <= budget
        seen.extend(page.records)
        if page.next_after is None:
            break
        after = page.next_after
    assert sorted(seen) == sorted(wires)
    assert len(seen) == len(set(seen))


def test_iteration_and_no_republishing() -> None:
    storage, _ = make_storage()
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    storage.put(KEY, room_wire(alice))
    storage.put(KEY, room_wire(bob))
    tomb = sign_record(alice, room_key("r2"), None, seq=1, expires_at=NOW + 3)
    storage.put(room_key("r2"), tomb)
    assert sorted(k for k, _ in storage) == sorted([KEY, KEY, room_key("r2")])
    assert storage.iter_older_than(0) == []
    assert len(storage) == 3
