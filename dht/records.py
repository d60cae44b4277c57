"""Signed directory records: types, canonical encoding, signing, validation, merging.

Sans-I/O: nothing here touches the network or the clock; callers pass ``now``.

Wire format (msgpack, canonical): ``[envelope: bin, signature: bin(64)]`` where the signature
is Ed25519 over ``RECORD_DOMAIN + envelope`` and ``envelope`` is the canonical encoding of
:class:`Envelope`. The envelope names the DHT key it is stored under, the publisher's public
key, a sequence number, an absolute expiry and a typed body.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

import msgspec

from dht.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeIdentity,
    check_certificate,
    node_id_from_public_key,
    verify_signature,
)

RECORD_DOMAIN = b"cascade/dht-record/v1\x00"
FORMAT_VERSION = 1
KEY_BYTES = 20

DEFAULT_TTL = 10.0
"""Default record lifetime in seconds (refreshed every third of it)."""
MAX_TTL = 30.0
"""Holders refuse records that expire further than this in the future."""
MAX_CLOCK_SKEW = 2.0
MAX_RECORD_BYTES = 4096

_KEY_PREFIX = b"cascade/dht-key/v1\x00"
_T = TypeVar("_T", bound=msgspec.Struct)

Bytes20 = Annotated[bytes, msgspec.Meta(min_length=20, max_length=20)]
Bytes32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Bytes64 = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
Count = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1e6)]
RegionName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
RoomName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Text = Annotated[str, msgspec.Meta(max_length=256)]
ShortText = Annotated[str, msgspec.Meta(max_length=64)]
MediaKind = Literal["audio", "video"]
Latitude = Annotated[float, msgspec.Meta(ge=-90.0, le=90.0)]
Longitude = Annotated[float, msgspec.Meta(ge=-180.0, le=180.0)]


class Load(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Load report: CPU fraction (0..1 per core summed), counts, and spare capacity fraction."""

    cpu: Fraction = 0.0
    rooms: Count = 0
    producers: Count = 0
    consumers: Count = 0
    headroom: Fraction = 1.0
    capacity: Count = 0
    spilled: Count = 0
    """Placements of this region's clients this node sent to another region, last minute."""


class NodeRecord(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """What a node publishes about itself."""

    node_id: Bytes20
    region: RegionName
    signaling_url: Text = ""
    relay_address: Text = ""
    relay_key: Annotated[bytes, msgspec.Meta(max_length=32)] = b""
    load: Load = Load()
    version: ShortText = ""
    location: tuple[Latitude, Longitude] | None = None
    """Operator-declared (latitude, longitude): placement's distance between regions."""
    draining: bool = False
    """The node takes no new participants (placement never chooses it)."""

    @property
    def node_id_hex(self) -> str:
        """The node id as hex."""
        return self.node_id.hex()


class Producer(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """A media producer in a room, with its kind."""

    id: ShortText
    kind: MediaKind


class Member(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """A participant of a room on the hosting node: its id and display name."""

    id: ShortText
    name: ShortText = ""


MAX_MEMBERS = 40
"""Members listed per room entry (the count stays exact): keeps records under their limit."""


class RoomEntry(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One hosting node's entry for a room."""

    room: RoomName
    node_id: Bytes20
    participants: Count = 0
    producers: tuple[Producer, ...] = ()
    members: Annotated[tuple[Member, ...], msgspec.Meta(max_length=MAX_MEMBERS)] = ()


class RecordKind(enum.IntEnum):
    """Body type of a record."""

    NODE = 1
    ROOM = 2
    TOMBSTONE = 3


class Envelope(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """The signed part of a record."""

    format: int
    key: Bytes20
    publisher: Bytes32
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    expires_ms: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    kind: int
    body: bytes
    certificate: bytes = b""


class _Wire(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    envelope: bytes
    signature: Bytes64


Body = NodeRecord | RoomEntry | None


class RejectReason(enum.Enum):
    """Why a record was refused."""

    GARBAGE = "garbage"
    OVERSIZE = "oversize"
    BAD_SIGNATURE = "bad signature"
    WRONG_KEY = "bound to another key"
    IMPERSONATION = "body names another node"
    EXPIRED = "expired"
    TTL_TOO_LONG = "ttl over maximum"
    STALE = "sequence not newer"
    UNCERTIFIED = "publisher key not certified"
    FULL = "key full"


class RecordRejected(Exception):
    """A record failed validation."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}{': ' + detail if detail else ''}")
        self.reason = reason


@dataclass(frozen=True)
class ValidationPolicy:
    """Limits a holder or reader applies to records. ``operator_key`` enables fleet mode."""

    max_ttl: float = MAX_TTL
    max_clock_skew: float = MAX_CLOCK_SKEW
    max_record_bytes: int = MAX_RECORD_BYTES
    operator_key: bytes | None = None


@dataclass(frozen=True)
class SignedRecord:
    """A record whose signature and contents have been checked."""

    wire: bytes
    key: bytes
    publisher: bytes
    node_id: bytes
    seq: int
    expires_at: float
    kind: RecordKind
    body: Body

    def is_live(self, now: float) -> bool:
        """Unexpired and not a tombstone."""
        return self.kind is not RecordKind.TOMBSTONE and self.expires_at > now


# ---------------------------------------------------------------------------- keys


def dht_key(name: str) -> bytes:
    """Hash a directory name into a 160-bit DHT key."""
    return hashlib.sha256(_KEY_PREFIX + name.encode()).digest()[:KEY_BYTES]


def room_key(room: str) -> bytes:
    """Key holding the hosting-node entries of ``room``."""
    return dht_key("room:" + room)


def node_key(node_id: bytes) -> bytes:
    """Key holding a node's own record."""
    return dht_key("node:" + node_id.hex())


def region_key(region: str) -> bytes:
    """Key enumerating the nodes of ``region``."""
    return dht_key("region:" + region)


REGIONS_KEY = dht_key("regions")
"""Global key enumerating all nodes (and so all regions)."""


def node_record_keys(record: NodeRecord) -> tuple[bytes, bytes, bytes]:
    """The keys a node record is published under: node, region, global."""
    return node_key(record.node_id), region_key(record.region), REGIONS_KEY


_REGION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def is_valid_region(region: str) -> bool:
    """Region names are 1-64 characters of letters, digits, ``.``, ``_`` and ``-``."""
    return bool(_REGION_RE.match(region))


# ---------------------------------------------------------------------------- encoding

_encoder = msgspec.msgpack.Encoder()
_wire_decoder = msgspec.msgpack.Decoder(_Wire)
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_node_decoder = msgspec.msgpack.Decoder(NodeRecord)
_room_decoder = msgspec.msgpack.Decoder(RoomEntry)


def encode(value: msgspec.Struct) -> bytes:
    """Canonical msgpack encoding of a record type."""
    return _encoder.encode(value)


def _kind_of(body: Body) -> RecordKind:
    if body is None:
        return RecordKind.TOMBSTONE
    return RecordKind.NODE if isinstance(body, NodeRecord) else RecordKind.ROOM


def sign_record(
    identity: NodeIdentity,
    key: bytes,
    body: Body,
    *,
    seq: int,
    expires_at: float,
    certificate: bytes = b"",
) -> bytes:
    """Build and sign the wire form of a record (``body=None`` makes a tombstone)."""
    if len(key) != KEY_BYTES:
        raise ValueError("DHT keys are 20 bytes")
    body_bytes = b"" if body is None else encode(body)
    try:  # encoding does not check field constraints: holders would refuse the record
        if isinstance(body, NodeRecord):
            _node_decoder.decode(body_bytes)
        elif isinstance(body, RoomEntry):
            _room_decoder.decode(body_bytes)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid record body: {exc}") from None
    envelope = Envelope(
        format=FORMAT_VERSION,
        key=key,
        publisher=identity.public_key,
        seq=seq,
        expires_ms=int(expires_at * 1000),
        kind=int(_kind_of(body)),
        body=body_bytes,
        certificate=certificate,
    )
    envelope_bytes = encode(envelope)
    wire = encode(_Wire(envelope_bytes, identity.sign(RECORD_DOMAIN + envelope_bytes)))
    if len(wire) > MAX_RECORD_BYTES:
        raise ValueError(f"record is {len(wire)} bytes, over {MAX_RECORD_BYTES}")
    return wire


def _strict_decode(decoder: msgspec.msgpack.Decoder[_T], data: bytes) -> _T:
    """Decode and insist on the canonical form (re-encoding must give the same bytes)."""
    try:
        value = decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RecordRejected(RejectReason.GARBAGE, str(exc)) from None
    if encode(value) != data:
        raise RecordRejected(RejectReason.GARBAGE, "not canonical")
    return value


def _expected_keys(kind: RecordKind, body: Body) -> tuple[bytes, ...]:
    if isinstance(body, NodeRecord):
        return node_record_keys(body)
    if isinstance(body, RoomEntry):
        return (room_key(body.room),)
    return ()


def verify_record(
    wire: object,
    *,
    now: float,
    key: bytes | None = None,
    policy: ValidationPolicy = ValidationPolicy(),
) -> SignedRecord:
    """Check a record completely; raise :class:`RecordRejected` with the reason if it fails.

    ``key`` is the DHT key the record was found or stored under; the record must be bound to it.
    """
    if not isinstance(wire, bytes) or not wire:
        raise RecordRejected(RejectReason.GARBAGE, "not a non-empty byte string")
    if len(wire) > policy.max_record_bytes:
        raise RecordRejected(RejectReason.OVERSIZE, f"{len(wire)} bytes")
    outer = _strict_decode(_wire_decoder, wire)
    envelope = _strict_decode(_envelope_decoder, outer.envelope)
    if envelope.format != FORMAT_VERSION:
        raise RecordRejected(RejectReason.GARBAGE, f"format {envelope.format}")
    try:
        kind = RecordKind(envelope.kind)
    except ValueError:
        raise RecordRejected(RejectReason.GARBAGE, f"kind {envelope.kind}") from None
    if key is not None and envelope.key != key:
        raise RecordRejected(RejectReason.WRONG_KEY)
    expires_at = envelope.expires_ms / 1000
    if expires_at <= now:
        raise RecordRejected(RejectReason.EXPIRED)
    if expires_at > now + policy.max_ttl + policy.max_clock_skew:
        raise RecordRejected(RejectReason.TTL_TOO_LONG)
    if len(outer.signature) != SIGNATURE_BYTES or len(envelope.publisher) != PUBLIC_KEY_BYTES:
        raise RecordRejected(RejectReason.GARBAGE)
    if not verify_signature(envelope.publisher, outer.signature, RECORD_DOMAIN + outer.envelope):
        raise RecordRejected(RejectReason.BAD_SIGNATURE)
    if policy.operator_key is not None and not check_certificate(
        envelope.certificate,
        operator_public_key=policy.operator_key,
        node_public_key=envelope.publisher,
        now=now,
    ):
        raise RecordRejected(RejectReason.UNCERTIFIED)
    node_id = node_id_from_public_key(envelope.publisher)
    body: Body = None
    if kind is RecordKind.TOMBSTONE:
        if envelope.body:
            raise RecordRejected(RejectReason.GARBAGE, "tombstone with a body")
    else:
        decoded: NodeRecord | RoomEntry
        if kind is RecordKind.NODE:
            decoded = _strict_decode(_node_decoder, envelope.body)
        else:
            decoded = _strict_decode(_room_decoder, envelope.body)
        body = decoded
        if decoded.node_id != node_id:
            raise RecordRejected(RejectReason.IMPERSONATION)
        if envelope.key not in _expected_keys(kind, body):
            raise RecordRejected(RejectReason.WRONG_KEY, "body does not belong under this key")
    return SignedRecord(
        wire=wire,
        key=envelope.key,
        publisher=envelope.publisher,
        node_id=node_id,
        seq=envelope.seq,
        expires_at=expires_at,
        kind=kind,
        body=body,
    )


class RecordVerifier:
    """:func:`verify_record` with a bounded cache, so a record seen again (refreshed copies
    held by several peers, a holder's own copy) costs no second signature check."""

    def __init__(self, policy: ValidationPolicy | None = None, capacity: int = 4096) -> None:
        self.policy = policy or ValidationPolicy()
        self.capacity = capacity
        self._cache: dict[bytes, SignedRecord] = {}

    def verify(self, wire: object, *, now: float, key: bytes | None = None) -> SignedRecord:
        """Like :func:`verify_record` under this verifier's policy."""
        cached = self._cache.get(wire) if isinstance(wire, bytes) else None
        if cached is None:
            record = verify_record(wire, now=now, key=key, policy=self.policy)
            if len(self._cache) >= self.capacity:
                del self._cache[next(iter(self._cache))]
            self._cache[record.wire] = record
            return record
        # signature, encoding and certificate were checked; time and key binding may differ
        if key is not None and cached.key != key:
            raise RecordRejected(RejectReason.WRONG_KEY)
        if cached.expires_at <= now:
            raise RecordRejected(RejectReason.EXPIRED)
        if cached.expires_at > now + self.policy.max_ttl + self.policy.max_clock_skew:
            raise RecordRejected(RejectReason.TTL_TOO_LONG)
        return cached


# ---------------------------------------------------------------------------- merging


def supersedes(new: SignedRecord, old: SignedRecord) -> bool:
    """True if ``new`` replaces ``old`` (same publisher, higher sequence)."""
    return new.publisher == old.publisher and new.seq > old.seq


def merge_records(records: Iterable[SignedRecord]) -> dict[bytes, SignedRecord]:
    """Keep the highest-sequence record of each publisher (tombstones included)."""
    newest: dict[bytes, SignedRecord] = {}
    for record in records:
        current = newest.get(record.publisher)
        if current is None or record.seq > current.seq:
            newest[record.publisher] = record
    return newest


def live_records(records: Iterable[SignedRecord], now: float) -> list[SignedRecord]:
    """Merge, then drop tombstones and expired records; sorted by node id."""
    merged = merge_records(records).values()
    return sorted((r for r in merged if r.is_live(now)), key=lambda r: r.node_id)


class SequenceCounter:
    """Strictly increasing sequence numbers that stay monotonic across restarts.

    Uses wall-clock microseconds, bumped past the last value issued.
    """

    def __init__(self) -> None:
        self._last = 0

    def next(self, now: float) -> int:
        """The next sequence number, given the current wall-clock time."""
        self._last = max(self._last + 1, int(now * 1_000_000))
        return self._last
