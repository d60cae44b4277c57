"""The async directory API a Cascade node uses: announce itself and its rooms, find others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import msgspec

from dht.identity import NodeIdentity
from dht.records import (
    DEFAULT_TTL,
    MAX_MEMBERS,
    MAX_TTL,
    REGIONS_KEY,
    Body,
    Load,
    Member,
    NodeRecord,
    Producer,
    RecordKind,
    RoomEntry,
    SequenceCounter,
    SignedRecord,
    ValidationPolicy,
    is_valid_region,
    node_key,
    node_record_keys,
    region_key,
    room_key,
    sign_record,
)
from dht.server import DhtConfig, DirectoryServer

log = logging.getLogger(__name__)

SOFTWARE_VERSION = "cascade/0.1.0"


class Directory:
    """A node's view of the Cascade directory, backed by a Kademlia DHT node.

    Records are signed with ``identity``, expire after ``ttl`` seconds and are refreshed
    every ``ttl / 3``; :meth:`stop` withdraws them (tombstones). ``operator_key`` enables fleet
    mode (records need an operator ``certificate`` for their publisher key).
    """

    def __init__(
        self,
        identity: NodeIdentity,
        region: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bootstrap: Sequence[tuple[str, int]] = (),
        ttl: float = DEFAULT_TTL,
        signaling_url: str = "",
        relay_address: str = "",
        relay_key: bytes | None = None,
        version: str = SOFTWARE_VERSION,
        certificate: bytes = b"",
        operator_key: bytes | None = None,
        config: DhtConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not is_valid_region(region):
            raise ValueError(f"invalid region name {region!r}")
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be in (0, {MAX_TTL}]")
        self.identity = identity
        self.region = region
        self.ttl = ttl
        self.refresh_interval = ttl / 3
        self.certificate = certificate
        self.policy = ValidationPolicy(max_ttl=MAX_TTL, operator_key=operator_key)
        self.clock = clock
        self.server = DirectoryServer(identity.node_id, policy=self.policy, config=config)
        self.server.storage.clock = clock
        self._listen = (host, port)
        self._bootstrap = list(bootstrap)
        self._record = NodeRecord(
            node_id=identity.node_id,
            region=region,
            signaling_url=signaling_url,
            relay_address=relay_address,
            relay_key=identity.public_key if relay_key is None else relay_key,
            version=version,
        )
        self._rooms: dict[str, RoomEntry] = {}
        self._tombstones: dict[bytes, float] = {}
        self._seq = SequenceCounter()
        # key -> sequence number of the newest record of ours being published under it
        self._latest: dict[bytes, int] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._announced = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def node_id(self) -> bytes:
        """This node's 20-byte id."""
        return self.identity.node_id

    @property
    def address(self) -> tuple[str, int]:
        """The DHT UDP address this node listens on."""
        return self.server.address

    @property
    def record(self) -> NodeRecord:
        """The node record as it will next be published."""
        return self._record

    async def start(self, *, announce: bool = True) -> None:
        """Listen, bootstrap, publish the node record and start refreshing."""
        host, port = self._listen
        await self.server.listen(port, host)
        if self._bootstrap:
            await self.server.bootstrap(self._bootstrap)
        if announce:
            await self.announce_node()
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def stop(self, *, withdraw: bool = True) -> None:
        """Stop refreshing; withdraw all records (unless ``withdraw=False``); close."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if withdraw and self.server.protocol is not None:
            keys: list[bytes] = []
            if self._announced:
                keys.extend(node_record_keys(self._record))
            keys.extend(room_key(room) for room in self._rooms)
            self._rooms.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(self._publish(k, None) for k in keys)),
                    self.server.config.lookup_timeout * 2,
                )
        self.server.stop()

    async def __aenter__(self) -> Directory:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ publishing

    async def _publish(self, key: bytes, body: Body) -> int:
        now = self.clock()
        seq = self._seq.next(now)
        wire = sign_record(
            self.identity,
            key,
            body,
            seq=seq,
            expires_at=now + self.ttl,
            certificate=self.certificate,
        )
        self._latest[key] = seq
        if body is None:
            self._tombstones[key] = now + self.ttl
        else:
            self._tombstones.pop(key, None)
        try:
            accepted = await self.server.put_record(key, wire)
            if self.clock() >= now + self.ttl:
                log.warning(
                    "a record outlived its %.0f s ttl while being published (peers too slow "
                    "to answer): it expires on its holders before it is refreshed",
                    self.ttl,
                )
            elif accepted < self.server.config.quorum and self._latest.get(key) == seq:
                # too few holders took it (lost contacts, overload): crawl and store again,
                # unless a newer record of ours for this key is on its way already
                accepted = max(accepted, await self.server.put_record(key, wire))
            return accepted
        except Exception:
            log.exception("publishing to %s failed", key.hex())
            return 0

    async def _publish_node(self) -> None:
        record = self._record
        await asyncio.gather(*(self._publish(k, record) for k in node_record_keys(record)))

    async def announce_node(
        self,
        *,
        signaling_url: str | None = None,
        relay_address: str | None = None,
        relay_key: bytes | None = None,
        load: Load | None = None,
    ) -> None:
        """Update the given fields of the node record and publish it now."""
        self.update_node(
            signaling_url=signaling_url, relay_address=relay_address, relay_key=relay_key, load=load
        )
        self._announced = True
        await self._publish_node()

    def update_node(
        self,
        *,
        signaling_url: str | None = None,
        relay_address: str | None = None,
        relay_key: bytes | None = None,
        load: Load | None = None,
        location: tuple[float, float] | None = None,
        draining: bool | None = None,
    ) -> None:
        """Update node record fields; published at the next refresh (within ``ttl / 3``)."""
        changes: dict[str, object] = {}
        if location is not None:
            changes["location"] = tuple(location)
        if draining is not None:
            changes["draining"] = draining
        if signaling_url is not None:
            changes["signaling_url"] = signaling_url
        if relay_address is not None:
            changes["relay_address"] = relay_address
        if relay_key is not None:
            changes["relay_key"] = relay_key
        if load is not None:
            changes["load"] = load
        if changes:
            record = msgspec.structs.replace(self._record, **changes)
            try:  # refuse now what every holder would refuse later
                msgspec.msgpack.decode(msgspec.msgpack.encode(record), type=NodeRecord)
            except msgspec.ValidationError as exc:
                raise ValueError(f"invalid node record: {exc}") from None
            self._record = record

    def update_load(self, load: Load) -> None:
        """Record the current load; published at the next refresh."""
        self.update_node(load=load)

    async def announce_room(
        self,
        room: str,
        *,
        participants: int = 0,
        producers: Iterable[Producer] = (),
        members: Iterable[Member] = (),
    ) -> None:
        """Publish (or update) this node's entry for ``room`` now; kept refreshed. At most
        ``MAX_MEMBERS`` members are listed (the first ones); ``participants`` stays exact."""
        entry = RoomEntry(
            room=room,
            node_id=self.node_id,
            participants=participants,
            producers=tuple(producers),
            members=tuple(members)[:MAX_MEMBERS],
        )
        self._rooms[room] = entry
        await self._publish(room_key(room), entry)

    async def withdraw_room(self, room: str) -> None:
        """Stop hosting ``room``: publish a tombstone and stop refreshing the entry."""
        self._rooms.pop(room, None)
        await self._publish(room_key(room), None)

    @property
    def hosted_rooms(self) -> list[str]:
        """Rooms this node currently announces."""
        return sorted(self._rooms)

    async def refresh(self) -> None:
        """Republish every live record (and recent tombstones) with a new sequence and expiry,
        while healing a thin routing table. The records are signed at once: a heal slowed by
        peers that time out must not hold them back until they have expired."""
        now = self.clock()
        self._tombstones = {k: t for k, t in self._tombstones.items() if t > now}
        jobs: list[Awaitable[object]] = [self.server.heal(self._bootstrap)]
        jobs.extend(self._publish(room_key(r), e) for r, e in self._rooms.items())
        jobs.extend(self._publish(k, None) for k in list(self._tombstones))
        keys = {room_key(r) for r in self._rooms} | set(self._tombstones)
        if self._announced:
            jobs.append(self._publish_node())
            keys.update(node_record_keys(self._record))
        self._latest = {k: v for k, v in self._latest.items() if k in keys}
        await asyncio.gather(*jobs)

    async def _refresh_forever(self) -> None:
        # Jittered (75-100% of the interval) so that nodes started together do not refresh
        # in lock-step bursts; counted from the start of the previous refresh, so that a
        # slow one (a loaded machine) does not stretch the time between two signings.
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            wait = self.refresh_interval * random.uniform(0.75, 1.0) - (loop.time() - started)
            await asyncio.sleep(max(0.0, wait))
            started = loop.time()
            try:
                await self.refresh()
            except Exception:
                log.exception("directory refresh failed")

    # ------------------------------------------------------------------ lookups

    async def _live(self, key: bytes) -> list[SignedRecord]:
        lookup = await self.server.get_records(key)
        now = self.clock()
        live = [r for r in lookup.records if r.is_live(now)]
        return sorted(live, key=lambda r: r.node_id)

    async def room_hosts(self, room: str) -> list[RoomEntry]:
        """Entries of every node currently hosting ``room``, ordered by node id."""
        return [r.body for r in await self._live(room_key(room)) if isinstance(r.body, RoomEntry)]

    async def node(self, node_id: bytes) -> NodeRecord | None:
        """The current record of one node, if it is alive."""
        for record in await self._live(node_key(node_id)):
            if isinstance(record.body, NodeRecord) and record.body.node_id == node_id:
                return record.body
        return None

    async def node_entry(self, node_id: bytes) -> tuple[NodeRecord, float] | None:
        """The current record of one node and when it expires, if it is alive."""
        entry, _ = await self.node_state(node_id)
        return entry

    async def node_state(self, node_id: bytes) -> tuple[tuple[NodeRecord, float] | None, bool]:
        """(live record and its expiry, or None; whether the node withdrew its record).

        Withdrawn means the newest record found is the node's tombstone: unlike an empty
        answer (which a failed lookup also gives), it says for sure the node left.
        """
        lookup = await self.server.get_records(node_key(node_id))
        now = self.clock()
        withdrawn = False
        for record in lookup.records:
            if record.node_id != node_id:
                continue
            if record.kind is RecordKind.TOMBSTONE:
                withdrawn = True
            elif record.is_live(now) and isinstance(record.body, NodeRecord):
                return (record.body, record.expires_at), False
        return None, withdrawn

    async def node_entries(self) -> list[tuple[NodeRecord, float]]:
        """Records of all live nodes (global key), each with its expiry time."""
        records = await self._live(REGIONS_KEY)
        return [(r.body, r.expires_at) for r in records if isinstance(r.body, NodeRecord)]

    async def region_nodes(self, region: str) -> list[NodeRecord]:
        """Records of the live nodes of ``region``."""
        records = await self._live(region_key(region))
        return [r.body for r in records if isinstance(r.body, NodeRecord)]

    async def nodes(self) -> list[NodeRecord]:
        """Records of all live nodes (global key)."""
        records = await self._live(REGIONS_KEY)
        return [r.body for r in records if isinstance(r.body, NodeRecord)]

    async def regions(self) -> list[str]:
        """Regions that have at least one live node."""
        return sorted({n.region for n in await self.nodes()})
