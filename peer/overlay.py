"""The node's place in the overlay: it announces itself, its load and its rooms in
the DHT directory, and relays in the producers of every room it shares with other nodes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import sys
from typing import Any

from dht import Directory, Load, NodeRecord
from dht import Producer as DirectoryProducer
from dht.cli import split_host_port
from peer.relay_access import RelayAccess
from peer.server import NodeServer

log = logging.getLogger("cascade.overlay")


class Overlay:
    """Keeps a node's directory records current and pulls remote producers of shared rooms.

    Relay links are authorised against the directory, continuously: a peer may connect
    only while its Ed25519 key is the relay key of a live node record (signed by that same
    key, and in fleet mode certified by the operator); when the record is withdrawn or
    expires, its links are closed and its flows end. In open mode a peer may pull only
    producers of rooms it announces participants in (see :mod:`peer.relay_access`).
    """

    def __init__(self, server: NodeServer, directory: Directory, *, interval: float = 1.0) -> None:
        self.server = server
        self.directory = directory
        self.interval = interval
        self.access = RelayAccess(
            server.config.relay_peers, open_mode=directory.policy.operator_key is None
        )
        self._announced: dict[str, tuple[int, tuple[tuple[str, str], ...]]] = {}
        self._nodes: dict[bytes, NodeRecord] = {}
        self._pulling: set[tuple[str, str]] = set()
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
        return self.access.may_pull(key, room, self.directory.clock())

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
            relay_address = f"{host}:{port}"
        self.server.relay_authorizer = self.authorize
        self.server.relay_room_policy = self.may_pull
        await self.directory.start(announce=False)
        warning = exposure_warning(self.access.open_mode, self.listen_hosts())
        if warning is not None:
            log.warning("%s", warning)
            print(warning, file=sys.stderr, flush=True)
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
                self.access.forget_room(room)
                await self.directory.withdraw_room(room)
        await self._follow_directory()
        for room, router in list(routers.items()):
            if router.participants:
                await self._pull_room(room)

    async def _follow_directory(self) -> None:
        """Grant relay access to live node records; revoke it from withdrawn or expired ones."""
        listed: set[bytes] = set()
        for record, expires_at in await self.directory.node_entries():
            self._nodes[record.node_id] = record
            if record.relay_key:
                listed.add(record.relay_key)
                self.access.seen(record.relay_key, record.node_id, expires_at)
        for key, node_id in self.access.tracked():
            if key in listed:
                continue
            # Not in the global listing (a lookup can be partial): ask for that node.
            entry = await self.directory.node_entry(node_id)
            if entry is None or entry[0].relay_key != key:
                self.access.missing(key)
                self._nodes.pop(node_id, None)
            else:
                self.access.seen(key, node_id, entry[1])
        relay = self.server.relay
        for key in self.access.revoke_due(self.directory.clock()):
            log.info("relay access revoked for %s (record withdrawn or expired)", key.hex()[:16])
            if relay is not None:
                relay.revoke(key)

    async def _pull_room(self, room: str) -> None:
        router = self.server.node.routers.get(room)
        if router is None:
            return
        entries = await self.directory.room_hosts(room)
        self.access.room_hosts(room, (e.node_id for e in entries if e.participants > 0))
        for entry in entries:
            if entry.node_id == self.directory.node_id:
                continue
            record = self._nodes.get(entry.node_id)
            if record is None:
                found = await self.directory.node_entry(entry.node_id)
                if found is not None and found[0].relay_key:
                    record = found[0]
                    self.access.seen(record.relay_key, record.node_id, found[1])
            if record is None or not record.relay_address or not record.relay_key:
                continue
            if not self.authorize(record.relay_key):
                continue
            self._nodes[entry.node_id] = record
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
    except ValueError:  # "" (every interface), "0.0.0.0"-like names, host names
        return False
