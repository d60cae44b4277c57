"""Record storage for DHT holders: newest valid record per publisher per key (no networking).

Subclasses kademlia's ``IStorage`` so a kademlia protocol can use it, but keeps several
records per key and validates every record before accepting it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kademlia.storage import IStorage

from dht.records import (
    KEY_BYTES,
    RecordRejected,
    RecordVerifier,
    RejectReason,
    SignedRecord,
    ValidationPolicy,
)

log = logging.getLogger(__name__)

MAX_RECORDS_PER_KEY = 256
MAX_KEYS = 65536
RESPONSE_BUDGET = 7000
"""Bytes of records per find_value answer (rpcudp refuses messages over 8 KiB)."""


@dataclass(frozen=True)
class RecordPage:
    """A slice of the records under one key, ordered by publisher key."""

    records: list[bytes]
    next_after: bytes | None
    """Publisher key to continue after, or None if this was the last page."""


class RecordStorage(IStorage):
    """Validating multi-writer storage. ``clock`` returns wall-clock seconds."""

    def __init__(
        self,
        policy: ValidationPolicy | None = None,
        *,
        max_records_per_key: int = MAX_RECORDS_PER_KEY,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.verifier = RecordVerifier(policy)
        self.max_records_per_key = max_records_per_key
        self.max_keys = max_keys
        self.clock = clock
        self._data: dict[bytes, dict[bytes, SignedRecord]] = {}
        self.rejected: dict[RejectReason, int] = {}

    @property
    def policy(self) -> ValidationPolicy:
        """The validation rules applied to every record."""
        return self.verifier.policy

    # ------------------------------------------------------------------ sans-I/O API

    def put(self, key: bytes, wire: object) -> SignedRecord:
        """Validate ``wire`` for ``key`` and keep it if it is the publisher's newest.

        Raises :class:`RecordRejected`. Re-storing the identical record is accepted.
        """
        try:
            return self._put(key, wire)
        except RecordRejected as exc:
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            raise

    def _put(self, key: bytes, wire: object) -> SignedRecord:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise RecordRejected(RejectReason.GARBAGE, "bad key")
        now = self.clock()
        record = self.verifier.verify(wire, now=now, key=key)
        records = self._data.get(key)
        if records is None:
            self.expire()
            if len(self._data) >= self.max_keys:
                raise RecordRejected(RejectReason.FULL, "too many keys")
            records = self._data[key] = {}
        current = records.get(record.publisher)
        if current is not None and current.expires_at > now:
            if current.wire == record.wire:
                return current
            if record.seq <= current.seq:
                raise RecordRejected(RejectReason.STALE)
        elif len(records) >= self.max_records_per_key:
            self._expire_key(key, now)
            if len(records) >= self.max_records_per_key:
                raise RecordRejected(RejectReason.FULL)
        records[record.publisher] = record
        return record

    def records(self, key: bytes) -> list[SignedRecord]:
        """Unexpired records under ``key`` (tombstones included), by publisher."""
        now = self.clock()
        self._expire_key(key, now)
        records = self._data.get(key, {})
        return [records[p] for p in sorted(records)]

    def page(self, key: bytes, after: bytes = b"", budget: int = RESPONSE_BUDGET) -> RecordPage:
        """Records under ``key`` with publisher key > ``after``, at most ``budget`` bytes.

        Always returns at least one record if any remain.
        """
        out: list[bytes] = []
        used = 0
        last = after
        for record in self.records(key):
            if record.publisher <= after:
                continue
            if out and used + len(record.wire) > budget:
                return RecordPage(out, last)
            out.append(record.wire)
            used += len(record.wire)
            last = record.publisher
        return RecordPage(out, None)

    def expire(self) -> None:
        """Drop every expired record and empty key."""
        now = self.clock()
        for key in list(self._data):
            self._expire_key(key, now)

    def _expire_key(self, key: bytes, now: float) -> None:
        records = self._data.get(key)
        if records is None:
            return
        for publisher in [p for p, r in records.items() if r.expires_at <= now]:
            del records[publisher]
        if not records:
            del self._data[key]

    def stored_keys(self) -> list[bytes]:
        """Keys currently holding records."""
        self.expire()
        return list(self._data)

    def __len__(self) -> int:
        return sum(len(r) for r in self._data.values())

    # ------------------------------------------------------------------ kademlia IStorage

    def __setitem__(self, key: bytes, value: object) -> None:
        try:
            self.put(key, value)
        except RecordRejected as exc:
            log.debug("refused record for %s: %s", key.hex(), exc)

    def __getitem__(self, key: bytes) -> list[bytes]:
        records = self.records(key)
        if not records:
            raise KeyError(key)
        return [r.wire for r in records]

    def get(self, key: bytes, default: list[bytes] | None = None) -> list[bytes] | None:
        """Wire forms of the records under ``key``, or ``default`` if none."""
        records = self.records(key)
        return [r.wire for r in records] if records else default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        """Nothing: publishers refresh their own records; holders never republish."""
        return []

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, wire) for every stored record; a key appears once per publisher."""
        self.expire()
        pairs = [(k, r.wire) for k, records in self._data.items() for r in records.values()]
        return iter(pairs)
