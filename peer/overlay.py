"""The node's place in the overlay: it announces itself, its load and its rooms in
the DHT directory, and relays in the producers of every room it shares with other nodes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from dht import Directory, Load, NodeRecord
from dht import Producer as DirectoryProducer
from dht.cli import split_host_port
from dht.directory import SOFTWARE_VERSION
from peer.placement import NodeView, Placement, PlacementPolicy, RoomHost, place
from peer.server import NodeServer

log = logging.getLogger("cascade.overlay")


class Overlay:
    """Keeps a node's directory records current and pulls remote producers of shared rooms.

    Relay links are authorised against the directory: a peer may connect only if its
    Ed25519 key is the relay key of a live node record (signed by that same key, and in
    fleet mode certified by the operator).
    """

    def __init__(
        self,
        server: NodeServer,
        directory: Directory,
        *,
        interval: float = 1.0,
        location: tuple[float, float] | None = None,
        placement: PlacementPolicy | None = None,
    ) -> None:
        self.server = server
        self.directory = directory
        self.interval = interval
        self.location = location
        self.placement_policy = placement or PlacementPolicy(version=SOFTWARE_VERSION)
        # node id -> (record, when it was last seen live in the directory)
        self._live: dict[bytes, tuple[NodeRecord, float]] = {}
        self.known_keys: set[bytes] = set()
        self._announced: dict[str, tuple[int, tuple[tuple[str, str], ...]]] = {}
        self._nodes: dict[bytes, NodeRecord] = {}
        self._pulling: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def authorize(self, key: bytes) -> bool:
        """Relay admission: the key belongs to a live node in the directory."""
        return key in self.known_keys or key in self.server.config.relay_peers

    async def start(self) -> None:
        """Join the DHT, publish the node record and start syncing."""
        relay = self.server.relay
        relay_address = ""
        if relay is not None:
            host, port = relay.address
            relay_address = f"{host}:{port}"
        self.server.relay_authorizer = self.authorize
        self.server.placer = self.place
        self.server.node_key = self.directory.node_id.hex()
        if self.location is not None:
            self.directory.update_node(location=self.location)
        await self.directory.start(announce=False)
        await self.directory.announce_node(
            signaling_url=self.server.url,
            relay_address=relay_address,
            relay_key=self.server.relay_public_key,
            load=self._load(),
        )
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Withdraw this node's records and leave the DHT."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._tasks):
            task.cancel()
        await self.directory.stop()

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
        self.directory.update_load(self._load())
        routers = self.server.node.routers
        for room, router in list(routers.items()):
            if not router.participants:
                continue
            local = tuple(
                sorted((p.id, p.kind) for p in router.producers.values() if p.origin == "local")
            )
            state = (len(router.participants), local)
            if self._announced.get(room) != state:
                await self.directory.announce_room(
                    room,
                    participants=state[0],
                    producers=[
                        DirectoryProducer(id=pid, kind="video" if kind == "video" else "audio")
                        for pid, kind in local
                    ],
                )
                self._announced[room] = state
        for room in list(self._announced):
            hosted = routers.get(room)
            if hosted is None or not hosted.participants:
                del self._announced[room]
                await self.directory.withdraw_room(room)
        seen = time.time()
        live: dict[bytes, tuple[NodeRecord, float]] = {}
        for record in await self.directory.nodes():
            live[record.node_id] = (record, seen)
            self._nodes[record.node_id] = record
            if record.relay_key:
                self.known_keys.add(record.relay_key)
        self._live = live
        for room, router in list(routers.items()):
            if router.participants:
                await self._pull_room(room)

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
        mine = msgspec.structs.replace(self.directory.record, load=self._load())
        views.append(_view(mine, float("inf")))
        return views

    async def place(self, room: str, region: str | None) -> Placement:
        """Rank the nodes a new participant of ``room`` from ``region`` should join."""
        entries = await self.directory.room_hosts(room)
        own = self.directory.node_id
        hosts = [RoomHost(e.node_id.hex(), e.participants) for e in entries if e.node_id != own]
        router = self.server.node.routers.get(room)
        if router is not None and router.participants:
            hosts.append(RoomHost(own.hex(), len(router.participants)))
        return place(
            self.placement_nodes(),
            hosts,
            region or self.directory.region,
            time.time(),
            policy=self.placement_policy,
            reached=own.hex(),
        )

    async def _pull_room(self, room: str) -> None:
        router = self.server.node.routers.get(room)
        if router is None:
            return
        for entry in await self.directory.room_hosts(room):
            if entry.node_id == self.directory.node_id:
                continue
            record = self._nodes.get(entry.node_id) or await self.directory.node(entry.node_id)
            if record is None or not record.relay_address or not record.relay_key:
                continue
            self._nodes[entry.node_id] = record
            self.known_keys.add(record.relay_key)
            for producer in entry.producers:
                key = (room, producer.id)
                if producer.id in router.producers or key in self._pulling:
                    continue
                self._pulling.add(key)
                task = asyncio.ensure_future(self._pull(room, record, producer.id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _pull(self, room: str, record: NodeRecord, producer_id: str) -> None:
        try:
            host, port = split_host_port(record.relay_address)
            await self.server.pull_remote_producer(room, record.relay_key, host, port, producer_id)
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
