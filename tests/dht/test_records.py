"""Sans-I/O tests: record encoding, signing, validation and merging."""

from __future__ import annotations

import msgspec
import pytest

from dht import (
    Load,
    NodeIdentity,
    NodeRecord,
    Producer,
    RecordRejected,
    RejectReason,
    RoomEntry,
    ValidationPolicy,
    issue_certificate,
    sign_record,
    verify_record,
)
from dht.records import (
    REGIONS_KEY,
    Envelope,
    RecordKind,
    SequenceCounter,
    encode,
    live_records,
    merge_records,
    node_key,
    region_key,
    room_key,
)

NOW = 1_800_000_000.0


def room_wire(
    identity: NodeIdentity,
    room: str = "r1",
    *,
    seq: int = 1,
    expires_at: float = NOW + 10,
    participants: int = 3,
    key: bytes | None = None,
    node_id: bytes | None = None,
    certificate: bytes = b"",
) -> bytes:
    entry = RoomEntry(
        room=room,
        node_id=node_id or identity.node_id,
        participants=participants,
        producers=(Producer("mic", "audio"), Producer("cam", "video")),
    )
    return sign_record(
        identity,
        key or room_key(room),
        entry,
        seq=seq,
        expires_at=expires_at,
        certificate=certificate,
    )


def rejected(wire: object, key: bytes = room_key("r1"), **kw: object) -> RejectReason:
    with pytest.raises(RecordRejected) as info:
        verify_record(wire, now=NOW, key=key, **kw)  # type: ignore[arg-type]
    return info.value.reason


def test_room_record_round_trip() -> None:
    alice = NodeIdentity.generate()
    record = verify_record(room_wire(alice), now=NOW, key=room_key("r1"))
    assert record.kind is RecordKind.ROOM
    assert record.publisher == alice.public_key
    assert record.node_id == alice.node_id
    assert isinstance(record.body, RoomEntry)
    assert record.body.participants == 3
    assert [p.kind for p in record.body.producers] == ["audio", "video"]
    assert record.is_live(NOW)
    assert not record.is_live(NOW + 11)


def test_node_record_valid_under_its_three_keys_only() -> None:
    alice = NodeIdentity.generate()
    body = NodeRecord(
        node_id=alice.node_id,
        region="eu-west",
        signaling_url="https://a/ws",
        relay_address="127.0.0.1:7000",
        relay_key=alice.public_key,
        load=Load(cpu=0.5, rooms=2, producers=4, consumers=9, headroom=0.4),
        version="cascade/0.1.0",
    )
    for key in (node_key(alice.node_id), region_key("eu-west"), REGIONS_KEY):
        wire = sign_record(alice, key, body, seq=1, expires_at=NOW + 5)
        record = verify_record(wire, now=NOW, key=key)
        assert record.body == body
    wrong = sign_record(alice, region_key("us-east"), body, seq=1, expires_at=NOW + 5)
    assert rejected(wrong, key=region_key("us-east")) is RejectReason.WRONG_KEY


def test_encoding_is_deterministic_and_small() -> None:
    alice = NodeIdentity.generate()
    entry = RoomEntry(room="r1", node_id=alice.node_id, participants=1)
    assert encode(entry) == encode(msgspec.msgpack.decode(encode(entry), type=RoomEntry))
    assert len(room_wire(alice)) < 300


def test_rejects_tampered_payload() -> None:
    alice = NodeIdentity.generate()
    wire = room_wire(alice, participants=3)
    tampered = wire.replace(encode(3)[-1:] + b"\x92", encode(9)[-1:] + b"\x92", 1)
    assert tampered != wire
    assert rejected(tampered) in {RejectReason.BAD_SIGNATURE, RejectReason.GARBAGE}
    # flipping any single bit anywhere in the record makes it invalid
    for index in range(len(wire)):
        flipped = bytearray(wire)
        flipped[index] ^= 0x01
        rejected(bytes(flipped))


def test_rejects_impersonation() -> None:
    alice, mallory = NodeIdentity.generate(), NodeIdentity.generate()
    # mallory signs an entry naming alice as the host
    assert rejected(room_wire(mallory, node_id=alice.node_id)) is RejectReason.IMPERSONATION
    # mallory puts alice's public key in the envelope but signs with her own key
    env = Envelope(1, room_key("r1"), alice.public_key, 5, int((NOW + 5) * 1000), 2, b"")
    payload = encode(
        RoomEntry(room="r1", node_id=alice.node_id, participants=1),
    )
    env = msgspec.structs.replace(env, body=payload)
    env_bytes = encode(env)
    from dht.records import RECORD_DOMAIN, _Wire

    forged = encode(_Wire(env_bytes, mallory.sign(RECORD_DOMAIN + env_bytes)))
    assert rejected(forged) is RejectReason.BAD_SIGNATURE


def test_rejects_replay_under_another_key() -> None:
    alice = NodeIdentity.generate()
    wire = room_wire(alice, "r1")
    assert rejected(wire, key=room_key("r2")) is RejectReason.WRONG_KEY
    # signed for r2's key but the body says r1: refused even under r2's key
    mismatched = room_wire(alice, "r1", key=room_key("r2"))
    assert rejected(mismatched, key=room_key("r2")) is RejectReason.WRONG_KEY


def test_rejects_expired_and_over_long_ttl() -> None:
    alice = NodeIdentity.generate()
    assert rejected(room_wire(alice, expires_at=NOW - 1)) is RejectReason.EXPIRED
    assert rejected(room_wire(alice, expires_at=NOW)) is RejectReason.EXPIRED
    assert rejected(room_wire(alice, expires_at=NOW + 3600)) is RejectReason.TTL_TOO_LONG
    policy = ValidationPolicy(max_ttl=5, max_clock_skew=0)
    assert rejected(room_wire(alice, expires_at=NOW + 6), policy=policy) is (
        RejectReason.TTL_TOO_LONG
    )


@pytest.mark.parametrize(
    "garbage",
    [b"", None, 7, "text", [b"a"], {"value": b"x"}, b"\x00" * 50, b"\x92\xc4\x00\xc4\x00"],
)
def test_rejects_garbage(garbage: object) -> None:
    assert rejected(garbage) is RejectReason.GARBAGE


def test_rejects_oversize() -> None:
    assert rejected(b"\x00" * 5000) is RejectReason.OVERSIZE


def test_rejects_non_canonical_encoding() -> None:
    alice = NodeIdentity.generate()
    wire = room_wire(alice)
    outer = msgspec.msgpack.decode(wire)
    # same content, an extra trailing element
    assert rejected(msgspec.msgpack.encode([*outer, 0])) is RejectReason.GARBAGE


def test_tombstone_round_trip() -> None:
    alice = NodeIdentity.generate()
    wire = sign_record(alice, room_key("r1"), None, seq=9, expires_at=NOW + 5)
    record = verify_record(wire, now=NOW, key=room_key("r1"))
    assert record.kind is RecordKind.TOMBSTONE
    assert record.body is None
    assert not record.is_live(NOW)


def test_fleet_mode_requires_operator_certificate() -> None:
    operator, alice, mallory = (NodeIdentity.generate() for _ in range(3))
    policy = ValidationPolicy(operator_key=operator.public_key)
    cert = issue_certificate(operator, alice.public_key)
    ok = verify_record(room_wire(alice, certificate=cert), now=NOW, policy=policy)
    assert ok.publisher == alice.public_key
    # validly signed, no certificate
    assert rejected(room_wire(mallory), policy=policy) is RejectReason.UNCERTIFIED
    # alice's certificate does not cover mallory's key
    assert rejected(room_wire(mallory, certificate=cert), policy=policy) is (
        RejectReason.UNCERTIFIED
    )
    # certificate signed by someone other than the operator
    self_signed = issue_certificate(mallory, mallory.public_key)
    assert rejected(room_wire(mallory, certificate=self_signed), policy=policy) is (
        RejectReason.UNCERTIFIED
    )
    # expired certificate
    stale = issue_certificate(operator, alice.public_key, valid_for=-1)
    assert rejected(room_wire(alice, certificate=stale), policy=policy) is (
        RejectReason.UNCERTIFIED
    )


def test_merge_keeps_highest_sequence_per_publisher() -> None:
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    key = room_key("r1")
    a1 = verify_record(room_wire(alice, seq=1, participants=1), now=NOW, key=key)
    a2 = verify_record(room_wire(alice, seq=2, participants=2), now=NOW, key=key)
    b1 = verify_record(room_wire(bob, seq=7), now=NOW, key=key)
    merged = merge_records([a2, b1, a1, a1])
    assert merged == {alice.public_key: a2, bob.public_key: b1}
    tomb = verify_record(sign_record(alice, key, None, seq=3, expires_at=NOW + 5), now=NOW, key=key)
    assert [r.publisher for r in live_records([a1, a2, b1, tomb], NOW)] == [bob.public_key]


def test_sequence_counter_is_strictly_increasing() -> None:
    counter = SequenceCounter()
    values = [counter.next(NOW) for _ in range(5)]
    assert values == sorted(set(values))
    assert counter.next(NOW - 100) > values[-1]  # clock stepping back
    assert counter.next(NOW + 1) >= int((NOW + 1) * 1_000_000)


def test_region_names_are_restricted() -> None:
    alice = NodeIdentity.generate()
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(
            encode(NodeRecord(node_id=alice.node_id, region="bad region")), type=NodeRecord
        )


def test_signing_refuses_bodies_holders_would_refuse() -> None:
    alice = NodeIdentity.generate()
    bad_kind = RoomEntry(room="r1", node_id=alice.node_id, producers=(Producer("x", "screen"),))  # type: ignore[arg-type]
    too_long = RoomEntry(room="r" * 200, node_id=alice.node_id)
    for body in (bad_kind, too_long):
        with pytest.raises(ValueError):
            sign_record(alice, room_key("r1"), body, seq=1, expires_at=NOW + 5)
