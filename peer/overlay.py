"""The node's place in the overlay: it announces itself, its load and its rooms in
the DHT directory, and relays in the producers of every room it shares with other nodes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import time
from typing import Any

import aiohttp
import msgspec

from dht import Directory, Load, Member, NodeRecord, RoomEntry
from dht import Producer as DirectoryProducer
from dht.cli import split_host_port
from dht.directory import SOFTWARE_VERSION
from dht.records import MAX_MEMBERS
from peer.failover import OriginWatch
from peer.placement import NodeView, Placement, PlacementPolicy, RoomHost, place
from peer.relay_access import RelayAccess
from peer.scaling import (
    RegionCapacity,
    ScalePolicy,
    ScaleSignal,
    Signal,
    SignalChange,
    WebhookOutbox,
    is_region_leader,
    notification,
    region_capacity,
    sign_notification,
)
from peer.server import NodeServer
from relay.protocol import MAX_ROOM_ITEMS, RoomMember, RoomProducer, RoomState

log = logging.getLogger("cascade.overlay")

#: Seconds a room state pushed by a peer node over a relay link takes precedence over
#: what the directory says of that node's share of the room (the directory may lag).
PUSH_HOLD = 3.0
#: Seconds a room lookup in the directory is reused by the next join's placement and
#: participant list.
LOOKUP_REUSE = 0.5


def announced_relay_address(announce: str, bound_host: str, bound_port: int) -> str:
    """The relay address to publish: ``announce`` (HOST, HOST:PORT, HOST:0), else the bound
    address; a missing or zero port is the bound port."""
    host, port = bound_host, bound_port
    if announce:
        try:
            host, port = split_host_port(announce)
        except ValueError:
            host = announce.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Overlay:
    """Keeps a node's directory records current and pulls remote producers of shared rooms.

    Relay links are authorised against the directory, continuously: a peer may connect
    only while its Ed25519 key is the relay key of a live node record (signed by that same
    key, and in fleet mode certified by the operator); when the record is withdrawn or
    expires, its links are closed and its flows end. In open mode a peer may pull only
    producers of rooms it announces participants in (see :mod:`peer.relay_access`).
    """

    def __init__(
        self,
        server: NodeServer,
        directory: Directory,
        *,
        interval: float = 1.0,
        location: tuple[float, float] | None = None,
        placement: PlacementPolicy | None = None,
        scale: ScalePolicy | None = None,
        scale_webhook: str | None = None,
    ) -> None:
        self.server = server
        self.directory = directory
        self.interval = interval
        self.location = location
        self.placement_policy = placement or PlacementPolicy(version=SOFTWARE_VERSION)
        # node id -> (record, when it was last seen live in the directory)
        self._live: dict[bytes, tuple[NodeRecord, float]] = {}
        self.scale = ScaleSignal(scale or ScalePolicy())
        self.regions: dict[str, RegionCapacity] = {}
        self.scale_webhook = scale_webhook
        self.outbox = WebhookOutbox()
        self.notifications: collections.deque[dict[str, object]] = collections.deque(maxlen=50)
        self._spills: collections.deque[float] = collections.deque()
        self._leading: set[str] = set()
        self._outbox_changed = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self.access = RelayAccess(
            server.config.relay_peers,
            open_mode=directory.policy.operator_key is None,
            host_lifetime=directory.ttl,
        )
        self._announced: dict[str, tuple[object, ...]] = {}
        # room -> participants of the room on other nodes: id -> (name, node id hex)
        self._remote_members: dict[str, dict[str, tuple[str, str]]] = {}
        self._refreshing: set[str] = set()
        self._refresh_again: set[str] = set()
        # room -> its directory entries as last looked up, and when (monotonic)
        self._looked_up: dict[str, tuple[list[RoomEntry], float]] = {}
        # (room, node id) -> (its share as the node last pushed it, None once it left the
        # room; when received, monotonic)
        self._pushed: dict[tuple[str, bytes], tuple[RoomEntry | None, float]] = {}
        # Relay keys whose link pushes this node's shared rooms each time it comes up.
        self._push_on_live: set[bytes] = set()
        self._checking_hosts: set[str] = set()
        # room -> the room's entries as last read from the directory
        self._room_entries: dict[str, list[RoomEntry]] = {}
        self._nodes: dict[bytes, NodeRecord] = {}
        self._pulling: set[tuple[str, str]] = set()
        # Peer nodes seen dead (relay link down past a deadline, or record gone): ignored
        # from then on, their relayed producers removed, their links closed.
        self.origins = OriginWatch()
        self._pulled_from: dict[tuple[str, str], bytes] = {}  # (room, producer) -> node id
        self._watched_links: set[bytes] = set()
        self.dead_seen: dict[bytes, float] = {}  # node id -> when this node declared it dead
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def known_keys(self) -> set[bytes]:
        """Relay keys of the live nodes currently allowed to connect."""
        now = self.directory.clock()
        return {key for key, _ in self.access.tracked() if self.access.allowed(key, now)}

    def authorize(self, key: bytes) -> bool:
        """Relay admission: the key belongs to a live node in the directory."""
        return self.access.allowed(key, self.directory.clock())

    def may_pull(self, key: bytes, room: str) -> bool:
        """Whether the node of ``key`` may pull producers of ``room`` from this node."""
        now = self.directory.clock()
        if self.access.may_pull(key, room, now):
            return True
        if self.access.allowed(key, now):
            # A node that just announced the room may be newer than our view of its hosts:
            # look again, so that its retry is decided on the current directory.
            self._refresh_room_hosts(room)
        return False

    def _refresh_room_hosts(self, room: str) -> None:
        if room in self._checking_hosts:
            return
        self._checking_hosts.add(room)

        async def refresh() -> None:
            try:
                entries = await self._room_hosts(room)
                hosts = (e.node_id for e in entries if e.participants > 0)
                self.access.room_hosts(room, hosts, self.directory.clock())
            except Exception:
                log.exception("looking up the hosts of room %s failed", room)
            finally:
                self._checking_hosts.discard(room)

        task = asyncio.ensure_future(refresh())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def listen_hosts(self) -> list[str]:
        """Addresses this node listens on: signaling, DHT and relay."""
        hosts = [self.server.config.host, self.directory.address[0]]
        if self.server.relay is not None:
            hosts.append(self.server.relay.address[0])
        return hosts

    async def start(self) -> None:
        """Join the DHT, publish the node record and start syncing."""
        relay = self.server.relay
        relay_address = ""
        if relay is not None:
            host, port = relay.address
            relay_address = announced_relay_address(self.server.config.relay_announce, host, port)
        self.server.relay_authorizer = self.authorize
        self.server.relay_room_policy = self.may_pull
        self.server.placer = self.place
        self.server.overlay_view = self.describe
        self.server.remote_participants = self.remote_participants
        self.server.rooms.changed = self.room_changed
        if self.server.relay is not None:
            self.server.relay.room_state_received = self.room_state_received
        self.server.remote_producers = self.remote_producers
        self.server.pull_producer = self.pull_producer
        self.server.fallbacks = self.fallbacks
        self.server.drain_started = self.announce_draining
        self.server.node_key = self.directory.node_id.hex()
        if self.location is not None:
            self.directory.update_node(location=self.location)
        await self.directory.start(announce=False)
        warning = exposure_warning(self.access.open_mode, self.listen_hosts())
        if warning is not None:
            log.warning("%s", warning)  # the node's log goes to stderr at start
        await self.directory.announce_node(
            signaling_url=self.server.url,
            relay_address=relay_address,
            relay_key=self.server.relay_public_key,
            load=self._load(),
        )
        self._task = asyncio.ensure_future(self._run())
        if self.scale_webhook:
            self._sender = asyncio.ensure_future(self._send_webhooks())

    async def stop(self) -> None:
        """Withdraw this node's records and leave the DHT."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._tasks):
            task.cancel()
        if self._sender is not None:
            self._sender.cancel()
        await self.directory.stop()

    async def _room_hosts(self, room: str) -> list[RoomEntry]:
        """The room's entries in the directory, without those of nodes seen dead."""
        found = await self.directory.room_hosts(room)
        self._looked_up[room] = (found, time.monotonic())
        return self._current(room, found)

    def _current(self, room: str, found: list[RoomEntry]) -> list[RoomEntry]:
        entries = self._merge_pushed(room, found)
        dead = self.origins.dead
        return [e for e in entries if e.node_id not in dead] if dead else entries

    async def _recent_room_hosts(self, room: str) -> list[RoomEntry]:
        """As :meth:`_room_hosts`, reusing a lookup of the last ``LOOKUP_REUSE`` seconds
        (a join looks the room up to place the participant, then to list the others)."""
        cached = self._looked_up.get(room)
        if cached is not None and time.monotonic() - cached[1] <= LOOKUP_REUSE:
            return self._current(room, cached[0])
        return await self._room_hosts(room)

    def _forget_old(self, now: float) -> None:
        """Drop room lookups and pushed room states too old to be used."""
        for room, (_, at) in list(self._looked_up.items()):
            if now - at > LOOKUP_REUSE:
                del self._looked_up[room]
        for key, (_, at) in list(self._pushed.items()):
            if now - at > PUSH_HOLD:
                del self._pushed[key]

    def _merge_pushed(self, room: str, entries: list[RoomEntry]) -> list[RoomEntry]:
        """``entries`` with each node's share replaced by the one it pushed, while recent."""
        now = time.monotonic()
        pushed: dict[bytes, RoomEntry | None] = {}
        for key, (entry, at) in list(self._pushed.items()):
            if now - at > PUSH_HOLD:
                del self._pushed[key]
            elif key[0] == room:
                pushed[key[1]] = entry
        if not pushed:
            return entries
        merged = [e for e in entries if e.node_id not in pushed]
        merged += [e for e in pushed.values() if e is not None]
        merged.sort(key=lambda e: e.node_id)
        return merged

    async def announce_draining(self) -> None:
        """Say in the directory, now, that this node takes nobody new."""
        self.directory.update_node(draining=True, load=self._load())
        await self.directory.announce_node()

    def fallbacks(self, room: str, limit: int = 3) -> list[dict[str, object]]:
        """Other live nodes a participant may fail over to: own region first, then by
        headroom (none draining, stale, or seen dead)."""
        own = self.directory.node_id.hex()
        dead = {n.hex() for n in self.origins.dead}
        now = time.time()
        views = [
            v
            for v in self.placement_nodes()
            if v.node_id != own
            and v.node_id not in dead
            and not v.draining
            and v.expires_at > now
            and v.version == self.placement_policy.version
        ]
        views.sort(key=lambda v: (v.region != self.directory.region, -v.headroom, v.node_id))
        return [
            {"url": v.signaling_url, "node_id": v.node_id, "region": v.region}
            for v in views[:limit]
        ]

    def _watch_link(self, record: NodeRecord) -> None:
        """Report the relay link to ``record``'s node to the origin watch."""
        relay = self.server.relay
        if relay is None or record.node_id in self._watched_links:
            return
        link = relay.links.get(record.relay_key)
        if link is None:
            return
        self._watched_links.add(record.node_id)
        node_id = record.node_id

        def on_state(state: str) -> None:
            if state == "live":
                self.origins.link_up(node_id)
            elif state == "interrupted":
                self.origins.link_down(node_id, time.monotonic())
            elif state == "closed":
                self._watched_links.discard(node_id)

        link.on_state(on_state)
        if link.state == "interrupted":
            self.origins.link_down(node_id, time.monotonic())

    async def _check_origins(self) -> None:
        """Act on peer nodes that became dead: remove their relayed producers (subscribers
        get ``producer_removed`` with reason ``origin_lost``), close the relay link (no
        more redialling) and forget their members and room entries."""
        for node_id in self.origins.poll(time.monotonic()):
            await self._node_dead(node_id, "relay link down")

    async def _node_dead(self, node_id: bytes, why: str) -> None:
        if node_id == self.directory.node_id:
            return
        self.dead_seen.setdefault(node_id, time.time())
        log.info("node %s is gone (%s): dropping what came from it", node_id.hex()[:12], why)
        record = self._nodes.pop(node_id, None)
        self._live.pop(node_id, None)
        for (room, producer_id), origin in list(self._pulled_from.items()):
            if origin != node_id:
                continue
            del self._pulled_from[(room, producer_id)]
            router = self.server.node.routers.get(room)
            producer = router.producers.get(producer_id) if router is not None else None
            if producer is not None and producer.origin == "relay":
                producer.close("origin_lost")
        relay = self.server.relay
        if relay is not None and record is not None and record.relay_key:
            link = relay.links.get(record.relay_key)
            if link is not None:
                await link.close()
        for room, entries in list(self._room_entries.items()):
            kept = [e for e in entries if e.node_id != node_id]
            if len(kept) != len(entries):
                self._room_entries[room] = kept
                self._update_members(room, kept)

    def _load(self) -> Load:
        totals = self.server.node.totals()
        admission = self.server.node.admission
        return Load(
            cpu=min(1.0, max(0.0, admission.cpu)),
            rooms=int(totals["rooms"]),
            producers=int(totals["producers"]),
            consumers=int(totals["consumers"]),
            headroom=admission.headroom(),
            capacity=admission.max_consumers,
            spilled=len(self._spills),
        )

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("overlay sync failed")
            await asyncio.sleep(self.interval)

    async def sync(self) -> None:
        """One round: publish load and rooms, learn peers, pull missing remote producers."""
        self._forget_old(time.monotonic())
        self.directory.update_load(self._load())
        rooms = self.server.rooms
        for hosted in rooms:
            await self._announce_room(hosted.name)
        for room in list(self._announced):
            if rooms.get(room) is None:
                del self._announced[room]
                self._remote_members.pop(room, None)
                self.access.forget_room(room)
                self._room_entries.pop(room, None)
                self._looked_up.pop(room, None)
                await self.directory.withdraw_room(room)
        seen = time.time()
        live: dict[bytes, tuple[NodeRecord, float]] = {}
        listed: set[bytes] = set()
        for record, expires_at in await self.directory.node_entries():
            self.origins.record_seen(record.node_id, expires_at)
            if self.origins.is_dead(record.node_id):
                continue
            live[record.node_id] = (record, seen)
            self._nodes[record.node_id] = record
            if record.relay_key:
                listed.add(record.relay_key)
                self.access.seen(record.relay_key, record.node_id, expires_at)
        self._live = live
        await self._revoke_gone(listed)
        await self._check_origins()
        self._update_signal(seen)
        for hosted in rooms:
            await self._pull_room(hosted.name)

    async def _revoke_gone(self, listed: set[bytes]) -> None:
        """Revoke relay access of keys whose node record was withdrawn or expired."""
        for key, node_id in self.access.tracked():
            if key in listed:
                continue
            # Not in the global listing (a lookup can be partial): ask for that node. Only
            # its tombstone revokes at once; otherwise the grant lasts until the record's
            # expiry (a failed lookup on a loaded node must not cut a live peer off).
            entry, withdrawn = await self.directory.node_state(node_id)
            if withdrawn or (entry is not None and entry[0].relay_key != key):
                self.access.missing(key)
                if withdrawn:
                    self.origins.record_gone(node_id)
                    await self._node_dead(node_id, "record withdrawn")
                self._nodes.pop(node_id, None)
            elif entry is not None:
                self.access.seen(key, node_id, entry[1])
        relay = self.server.relay
        owners = dict(self.access.tracked())
        for key in self.access.revoke_due(self.directory.clock()):
            log.info("relay access revoked for %s (record withdrawn or expired)", key.hex()[:16])
            owner = owners.get(key)
            if owner is not None and not self.origins.is_dead(owner):
                self.origins.record_gone(owner)
                await self._node_dead(owner, "record expired")
            if relay is not None:
                relay.revoke(key)

    def _room_share(
        self, room: str
    ) -> tuple[int, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] | None:
        """This node's share of ``room``: participants, local producers (id, kind) of
        members not moving away, members (id, name); None if the room is not here."""
        hosted = self.server.rooms.get(room)
        if hosted is None:
            return None
        local = tuple(self.server.local_producers(room))
        members = tuple((m.participant_id, (m.name or "")[:64]) for m in hosted.members)
        return len(hosted), local, members

    async def _announce_room(self, room: str) -> None:
        share = self._room_share(room)
        if share is None:
            return
        if self._announced.get(room) == share:
            return
        self._announced[room] = share
        count, local, members = share
        await self.directory.announce_room(
            room,
            participants=count,
            producers=[
                DirectoryProducer(id=pid, kind="video" if kind == "video" else "audio")
                for pid, kind in local
            ],
            members=[Member(id=pid, name=name) for pid, name in members],
        )

    # -- room states pushed over relay links ---------------------------------------

    def _room_state(self, room: str) -> RoomState:
        share = self._room_share(room)
        if share is None:
            return RoomState(room=room, participants=0)
        count, local, members = share
        return RoomState(
            room=room,
            participants=count,
            producers=[
                RoomProducer(id=pid, kind="video" if kind == "video" else "audio")
                for pid, kind in local[:MAX_ROOM_ITEMS]
            ],
            members=[RoomMember(id=pid, name=name) for pid, name in members[:MAX_ROOM_ITEMS]],
        )

    def _push_room(self, room: str) -> None:
        """Tell every other node hosting ``room`` this node's share of it now, over the
        relay links (opened if needed: the state follows once the link is up)."""
        relay = self.server.relay
        if relay is None:
            return
        own = self.directory.node_id
        state: RoomState | None = None
        for entry in self._room_entries.get(room, []):
            if entry.node_id == own or self.origins.is_dead(entry.node_id):
                continue
            record = self._nodes.get(entry.node_id)
            if record is None or not record.relay_key or not record.relay_address:
                continue
            state = state or self._room_state(room)
            if not relay.send_room_state(record.relay_key, state):
                self._open_link(record)

    def _open_link(self, record: NodeRecord) -> None:
        """Open the relay link to ``record``'s node, pushing the rooms shared with it once
        it is up (and each time it comes back)."""
        relay = self.server.relay
        if relay is None or not self.authorize(record.relay_key):
            return
        host, port = split_host_port(record.relay_address)
        link = relay.link(record.relay_key, host, port)
        if record.relay_key in self._push_on_live:
            return
        self._push_on_live.add(record.relay_key)
        node_id, key = record.node_id, record.relay_key

        def on_state(state: str) -> None:
            if state == "closed":
                self._push_on_live.discard(key)
            elif state == "live":
                for room, entries in list(self._room_entries.items()):
                    if self.server.rooms.get(room) is not None and any(
                        e.node_id == node_id for e in entries
                    ):
                        link.send(self._room_state(room))

        link.on_state(on_state)
        # Not reported to the origin watch here: only links this node pulls media over are
        # (a link that carries room states alone says nothing about the peer's media).

    def room_state_received(self, key: bytes, msg: RoomState) -> None:
        """A peer node's share of a room, pushed over a relay link: it hosts the room (it
        may pull the room's producers), and the room's members and producers here follow
        at once (participants joined or left, new producers pulled)."""
        now = self.directory.clock()
        node_id = self.access.node_of(key, now)
        if node_id is None or node_id == self.directory.node_id:
            return
        if self.origins.is_dead(node_id):
            return
        room = msg.room
        entry: RoomEntry | None = None
        if msg.participants > 0:
            self.access.room_hosts(room, [node_id], now)
            entry = RoomEntry(
                room=room,
                node_id=node_id,
                participants=msg.participants,
                producers=tuple(DirectoryProducer(id=p.id, kind=p.kind) for p in msg.producers),
                members=tuple(Member(id=m.id, name=m.name) for m in msg.members[:MAX_MEMBERS]),
            )
        self._pushed[(room, node_id)] = (entry, time.monotonic())
        if self.server.rooms.get(room) is None:
            return
        known = self._room_entries.get(room, [])
        if entry is not None and not any(e.node_id == node_id for e in known):
            # A node new to the room: it gets this node's share at once in return.
            relay = self.server.relay
            if relay is not None:
                relay.send_room_state(key, self._room_state(room))
        entries = self._merge_pushed(room, known)
        self._room_entries[room] = entries
        self._update_members(room, entries)
        self._start_pulls(room, entries)

    def room_changed(self, room: str) -> None:
        """A participant joined or left ``room`` here, or a local producer was added or
        closed: tell the room's other nodes now (over the relay links), pull the room's
        remote producers now, and announce it in the directory."""
        try:
            self._push_room(room)
        except Exception:
            log.exception("pushing room %s failed", room)
        if room in self._refreshing:
            self._refresh_again.add(room)  # the running refresh goes round once more
            return
        self._refreshing.add(room)

        async def refresh() -> None:
            try:
                while True:
                    self._refresh_again.discard(room)
                    entries = self._room_entries.get(room)
                    if entries is not None:
                        self._start_pulls(room, entries)  # known hosts: no lookup first
                    await self._announce_room(room)
                    await self._pull_room(room)
                    if room not in self._refresh_again:
                        return
            except Exception:
                log.exception("refreshing room %s failed", room)
            finally:
                self._refreshing.discard(room)
                self._refresh_again.discard(room)

        task = asyncio.ensure_future(refresh())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def remote_participants(self, room: str) -> list[dict[str, object]]:
        """Participants of ``room`` on other nodes: as last synced when the room is already
        open here, else looked up in the directory now."""
        if room not in self._remote_members:
            entries = await self._recent_room_hosts(room)
            self._room_entries[room] = entries
            self._update_members(room, entries)
        return [
            {"participant_id": pid, "name": name, "node_id": node}
            for pid, (name, node) in sorted(self._remote_members.get(room, {}).items())
        ]

    def remote_producers(self, room: str) -> list[dict[str, object]]:
        """Producers of ``room`` on other nodes not relayed here yet (as last read)."""
        router = self.server.node.routers.get(room)
        here = set(router.producers) if router is not None else set()
        own = self.directory.node_id
        return [
            {"producer_id": p.id, "kind": p.kind, "node_id": e.node_id.hex(), "remote": True}
            for e in self._room_entries.get(room, [])
            if e.node_id != own
            for p in e.producers
            if p.id not in here
        ]

    async def pull_producer(self, room: str, producer_id: str) -> bool:
        """Relay one producer of ``room`` from the node hosting it now (a subscriber asked
        for it); False if no live node of the room has it."""
        entries = self._room_entries.get(room)
        if entries is None or not any(p.id == producer_id for e in entries for p in e.producers):
            entries = await self._room_hosts(room)
            self._room_entries[room] = entries
        for entry in entries:
            if entry.node_id == self.directory.node_id:
                continue
            if not any(p.id == producer_id for p in entry.producers):
                continue
            record = self._nodes.get(entry.node_id) or await self.directory.node(entry.node_id)
            if record is None or not record.relay_address or not record.relay_key:
                return False
            self.known_keys.add(record.relay_key)
            await self._introduce(room, record)
            host, port = split_host_port(record.relay_address)
            await self.server.pull_remote_producer(room, record.relay_key, host, port, producer_id)
            self._pulled_from[(room, producer_id)] = entry.node_id
            self._watch_link(record)
            return True
        return False

    def _update_members(self, room: str, entries: list[RoomEntry]) -> None:
        own = self.directory.node_id
        current = {
            m.id: (m.name, e.node_id.hex()) for e in entries if e.node_id != own for m in e.members
        }
        previous = self._remote_members.get(room, {})
        self._remote_members[room] = current
        if current == previous:
            return
        hosted = self.server.rooms.get(room)
        if hosted is None:
            return
        for pid, (name, node) in current.items():
            if pid not in previous:
                joined = {"participant_id": pid, "name": name, "node_id": node}
                hosted.broadcast({"type": "participant_joined", "participant": joined})
        for pid in previous:
            if pid not in current:
                hosted.broadcast({"type": "participant_left", "participant_id": pid})

    # -- placement ---------------------------------------------------------------

    def placement_nodes(self) -> list[NodeView]:
        """Live nodes as placement sees them (this node with its current load)."""
        ttl = self.directory.ttl
        views = []
        own = self.directory.node_id
        for node_id, (record, seen) in self._live.items():
            if node_id == own:
                continue
            views.append(_view(record, seen + ttl))
        mine = msgspec.structs.replace(
            self.directory.record, load=self._load(), draining=self.server.draining
        )
        views.append(_view(mine, float("inf")))
        return views

    def _update_signal(self, now: float) -> None:
        while self._spills and now - self._spills[0] > self.scale.policy.spill_window:
            self._spills.popleft()
        nodes = self.placement_nodes()
        spilled: dict[str, int] = {}
        for record, _seen in self._live.values():
            if record.node_id != self.directory.node_id and record.load.spilled:
                spilled[record.region] = spilled.get(record.region, 0) + record.load.spilled
        if self._spills:
            own = self.directory.region
            spilled[own] = spilled.get(own, 0) + len(self._spills)
        self.regions = region_capacity(nodes, spilled, watermark=self.placement_policy.watermark)
        own_id = self.directory.node_id.hex()
        changes = self.scale.update(self.regions, now)
        leading = {r for r in self.regions if is_region_leader(own_id, r, nodes)}
        # A node that just became its region's reporter states the region's signal once, so
        # receivers converge even if the previous reporter left mid-change.
        changed = {c.region for c in changes}
        for region in sorted(leading - self._leading - changed):
            signal = self.scale.signals.get(region, Signal.STEADY)
            changes.append(SignalChange(region, signal, signal, self.regions[region], now))
        self._leading = leading
        for change in changes:
            if change.region not in leading:
                continue
            body = notification(change, own_id)
            self.notifications.append(body)
            level = logging.WARNING if change.signal is Signal.SCALE_OUT else logging.INFO
            log.log(level, "scale signal %s", json.dumps(body, sort_keys=True))
            if self.scale_webhook:
                self.outbox.add(json.dumps(body, sort_keys=True).encode(), now)
                self._outbox_changed.set()

    async def _send_webhooks(self) -> None:
        assert self.scale_webhook is not None
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                now = time.time()
                for body in self.outbox.due(now):
                    headers = {"Content-Type": "application/json"}
                    headers.update(sign_notification(body, self.server.identity))
                    try:
                        async with http.post(self.scale_webhook, data=body, headers=headers) as r:
                            ok = 200 <= r.status < 300
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        log.info("scale webhook failed: %r", exc)
                        ok = False
                    self.outbox.done(body, ok, time.time())
                deadline = self.outbox.deadline()
                wait = 60.0 if deadline is None else max(0.05, deadline - time.time())
                self._outbox_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._outbox_changed.wait(), wait)

    def describe(self) -> dict[str, object]:
        """The overlay as this node sees it: regions, nodes, load, capacity, signals."""
        return {
            "node_id": self.directory.node_id.hex(),
            "region": self.directory.region,
            "regions": {
                region: {
                    **cap.as_dict(),
                    "signal": self.scale.signals.get(region, Signal.STEADY).value,
                }
                for region, cap in self.regions.items()
            },
            "nodes": [
                {
                    "node_id": n.node_id,
                    "region": n.region,
                    "url": n.signaling_url,
                    "headroom": round(n.headroom, 4),
                    "capacity": n.capacity,
                    "location": n.location,
                    "draining": n.draining,
                    "version": n.version,
                }
                for n in sorted(self.placement_nodes(), key=lambda v: (v.region, v.node_id))
            ],
            "notifications": list(self.notifications),
            "relayed_producers": {
                room: sorted(p.id for p in router.producers.values() if p.origin == "relay")
                for room, router in self.server.node.routers.items()
            },
            "dht": self._dht_traffic(),
        }

    def _dht_traffic(self) -> dict[str, int]:
        protocol = self.directory.server.protocol
        if protocol is None:
            return {}
        t = protocol.traffic
        return {"bytes_sent": t.bytes_sent, "bytes_received": t.bytes_received}

    async def place(self, room: str, region: str | None) -> Placement:
        """Rank the nodes a new participant of ``room`` from ``region`` should join."""
        entries = await self._recent_room_hosts(room)
        own = self.directory.node_id
        hosts = [RoomHost(e.node_id.hex(), e.participants) for e in entries if e.node_id != own]
        hosted = self.server.rooms.get(room)
        if hosted is not None:
            hosts.append(RoomHost(own.hex(), len(hosted)))
        client_region = region or self.directory.region
        placement = place(
            self.placement_nodes(),
            hosts,
            client_region,
            time.time(),
            policy=self.placement_policy,
            reached=own.hex(),
        )
        if placement.left_region and client_region == self.directory.region:
            self._spills.append(time.time())
        return placement

    async def _pull_room(self, room: str) -> None:
        if self.server.rooms.get(room) is None:
            return
        entries = await self._room_hosts(room)
        self._room_entries[room] = entries
        self._update_members(room, entries)
        hosts = (e.node_id for e in entries if e.participants > 0)
        self.access.room_hosts(room, hosts, self.directory.clock())
        if not self._auto_subscribed(room):
            return
        for entry in entries:
            if entry.node_id == self.directory.node_id or self.origins.is_dead(entry.node_id):
                continue
            if entry.node_id not in self._nodes:
                found = await self.directory.node_entry(entry.node_id)
                if found is not None and found[0].relay_key:
                    self._nodes[entry.node_id] = found[0]
                    self.access.seen(found[0].relay_key, found[0].node_id, found[1])
        self._start_pulls(room, entries)

    def _auto_subscribed(self, room: str) -> bool:
        hosted = self.server.rooms.get(room)
        return hosted is not None and any(m.subscribes_automatically for m in hosted.members)

    def _start_pulls(self, room: str, entries: list[RoomEntry]) -> None:
        """Relay in the producers of ``entries`` not here yet, when someone here subscribes
        automatically (otherwise producers are pulled on demand)."""
        hosted = self.server.rooms.get(room)
        if hosted is None or not self._auto_subscribed(room):
            return
        router = hosted.router
        for entry in entries:
            if entry.node_id == self.directory.node_id or self.origins.is_dead(entry.node_id):
                continue
            record = self._nodes.get(entry.node_id)
            if record is None or not record.relay_address or not record.relay_key:
                continue
            if not self.authorize(record.relay_key):
                continue
            for producer in entry.producers:
                key = (room, producer.id)
                if (
                    producer.id in router.producers
                    or key in self._pulling
                    or producer.id in self.server.superseded
                ):
                    continue
                self._pulling.add(key)
                task = asyncio.ensure_future(self._pull(room, record, producer.id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _introduce(self, room: str, record: NodeRecord) -> None:
        """Open the link to ``record``'s node and send it this node's share of ``room``
        first: the origin then knows this node hosts the room before it is asked for one
        of the room's producers (same connection, so in order)."""
        relay = self.server.relay
        if relay is None:
            return
        self._open_link(record)
        link = relay.links.get(record.relay_key)
        if link is None:
            return
        await link.wait_live(10.0)
        link.send(self._room_state(room))

    async def _pull(self, room: str, record: NodeRecord, producer_id: str) -> None:
        try:
            await self._introduce(room, record)
            host, port = split_host_port(record.relay_address)
            await self.server.pull_remote_producer(room, record.relay_key, host, port, producer_id)
            self._pulled_from[(room, producer_id)] = record.node_id
            self._watch_link(record)
        except Exception as exc:
            log.info("could not relay %s from %s: %r", producer_id, record.node_id_hex[:12], exc)
        finally:
            self._pulling.discard((room, producer_id))


def _view(record: NodeRecord, expires_at: float) -> NodeView:
    location = (record.location[0], record.location[1]) if record.location else None
    return NodeView(
        node_id=record.node_id.hex(),
        region=record.region,
        signaling_url=record.signaling_url,
        headroom=record.load.headroom,
        capacity=record.load.capacity,
        location=location,
        draining=record.draining,
        version=record.version,
        expires_at=expires_at,
    )


def exposure_warning(open_mode: bool, hosts: list[str]) -> str | None:
    """The start-up warning for a node in open mode listening beyond loopback, or None."""
    exposed = sorted({h for h in hosts if not _is_loopback(h)})
    if not open_mode or not exposed:
        return None
    return (
        f"WARNING: open mode, listening on non-loopback addresses ({', '.join(exposed)}): "
        "anyone who reaches the DHT port can publish a node record, open relay links to this "
        "node and pull the producers of any room it announces participants in. On a shared "
        "network use fleet mode (operator-certified node keys); see docs/security.md."
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "" (every interface), host names
        return False
