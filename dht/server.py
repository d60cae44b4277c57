"""Kademlia ``Server`` subclass storing and finding signed multi-writer records."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kademlia.network import Server
from kademlia.node import Node

from dht.protocol import CrawlResult, DirectoryProtocol, RecordCrawl, map_address
from dht.records import (
    RecordRejected,
    RejectReason,
    SignedRecord,
    ValidationPolicy,
    merge_records,
)
from dht.storage import RecordStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DhtConfig:
    """Tuning of the DHT layer."""

    ksize: int = 20
    alpha: int = 3
    replicas: int = 8
    """Records are stored on this many closest peers; lookups ask this many."""
    quorum: int = 3
    """A lookup waits for at least this many of the closest peers to answer."""
    rpc_timeout: float = 1.0
    round_timeout: float = 0.12
    """A query unanswered this long stops holding up a crawl."""
    lookup_timeout: float = 3.0
    dead_for: float = 15.0
    """Peers that timed out are skipped by crawls this long, unless heard from again."""
    table_refresh_interval: float = 300.0
    holder_cache_ttl: float = 8.0
    """How long a publisher reuses the holder set found for a key before crawling again."""


@dataclass(frozen=True)
class Lookup:
    """Verified records found under a key, merged across holders."""

    records: list[SignedRecord]
    """Highest-sequence record of each publisher (tombstones included; may have expired)."""
    holders: int
    """How many peers answered."""
    rejected: int
    """Records that failed verification."""


class DirectoryServer(Server):
    """A kademlia node whose values are validated, per-publisher signed records."""

    protocol_class = DirectoryProtocol

    def __init__(
        self,
        node_id: bytes,
        *,
        policy: ValidationPolicy | None = None,
        config: DhtConfig | None = None,
        storage: RecordStorage | None = None,
    ) -> None:
        self.config = config = config or DhtConfig()
        self.policy = policy = policy or ValidationPolicy()
        super().__init__(
            ksize=config.ksize,
            alpha=config.alpha,
            node_id=node_id,
        )
        self.storage: RecordStorage = storage if storage is not None else RecordStorage(policy)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._holders: dict[bytes, tuple[float, list[Node]]] = {}
        self.protocol: DirectoryProtocol | None
        self.family = socket.AF_INET
        self.lookups = 0
        # Called with each lookup's duration in seconds (set by monitoring).
        self.lookup_timing: Callable[[float], None] = lambda seconds: None

    def _create_protocol(self) -> DirectoryProtocol:
        return DirectoryProtocol(
            self.node,
            self.storage,
            self.ksize,
            rpc_timeout=self.config.rpc_timeout,
            dead_for=self.config.dead_for,
            answer_neighbors=self.config.replicas,
        )

    async def listen(self, port: int, interface: str = "127.0.0.1") -> None:
        """Bind the UDP socket (port 0 picks a free one)."""
        self.family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        await super().listen(port, interface)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self.transport is None:
            raise RuntimeError("not listening")
        sockname = self.transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    def refresh_table(self, interval: float | None = None) -> None:
        """Periodically refresh lonely buckets (never republishes stored values)."""
        interval = interval or self.config.table_refresh_interval
        task = asyncio.ensure_future(self._refresh_table())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        loop = asyncio.get_event_loop()
        self.refresh_loop = loop.call_later(interval, self.refresh_table, interval)

    async def _refresh_table(self) -> None:
        if self.protocol is None:
            return
        ids = self.protocol.get_refresh_ids()
        await asyncio.gather(*(self._crawl(key, fetch_records=False) for key in ids))

    def _usable(self, addrs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        usable = []
        for host, port in addrs:
            mapped = map_address(host, self.family)
            if mapped is None:
                log.warning("bootstrap %s:%s unreachable from this address family", host, port)
            else:
                usable.append((mapped, port))
        return usable

    async def bootstrap(self, addrs: Sequence[tuple[str, int]]) -> list[Node]:
        """Ping literal-IP contacts, then crawl towards our own id."""
        if self.protocol is None:
            raise RuntimeError("not listening")
        gathered = await asyncio.gather(*map(self.bootstrap_node, self._usable(addrs)))
        nodes = [n for n in gathered if n is not None]
        for node in nodes:
            self.protocol.welcome_if_new(node)
        result = await self._crawl(self.node.id, peers=nodes, fetch_records=False)
        return result.holders

    @property
    def contacts(self) -> int:
        """How many peers the routing table holds."""
        if self.protocol is None:
            return 0
        return sum(len(bucket) for bucket in self.protocol.router.buckets)

    async def heal(self, addrs: Sequence[tuple[str, int]]) -> None:
        """If the routing table is thin (peers lost to timeouts), re-join: ping the bootstrap
        contacts and crawl towards our own id from them and whatever peers remain."""
        if self.protocol is None or self.contacts >= self.ksize:
            return
        gathered = await asyncio.gather(*map(self.bootstrap_node, self._usable(addrs)))
        peers = [n for n in gathered if n is not None]
        for node in peers:
            self.protocol.welcome_if_new(node)
        peers.extend(self.protocol.router.find_neighbors(self.node, self.ksize))
        await self._crawl(self.node.id, peers=peers, fetch_records=False)

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        """Ping one address; its Node if it answered."""
        assert self.protocol is not None
        ok, node_id = await self.protocol.ping(addr, self.node.id)
        if ok and isinstance(node_id, bytes) and len(node_id) == 20:
            return Node(node_id, addr[0], addr[1])
        return None

    async def _crawl(
        self, key: bytes, *, peers: list[Node] | None = None, fetch_records: bool = True
    ) -> CrawlResult:
        assert self.protocol is not None
        target = Node(key)
        if peers is None:
            peers = self.protocol.router.find_neighbors(target, self.ksize)
        loop = asyncio.get_running_loop()
        crawl = RecordCrawl(
            self.protocol,
            target,
            peers,
            self.ksize,
            self.alpha,
            replicas=self.config.replicas,
            quorum=self.config.quorum,
            round_timeout=self.config.round_timeout,
            deadline=loop.time() + self.config.lookup_timeout,
            fetch_records=fetch_records,
        )
        return await crawl.find()

    async def get_records(self, key: bytes) -> Lookup:
        """Look ``key`` up on the closest peers (and locally); verify and merge the records."""
        if self.protocol is None:
            raise RuntimeError("not listening")
        started = time.monotonic()
        self.lookups += 1
        result = await self._crawl(key)
        wires = set(result.records)
        if not result.settled and self.contacts > 0:
            # cut short (stalled process, mass timeouts): one more try, merging both
            retry = await self._crawl(key)
            wires.update(retry.records)
            seen = {h.id for h in result.holders}
            result.holders.extend(h for h in retry.holders if h.id not in seen)
        now = self.storage.clock()
        wires.update(r.wire for r in self.storage.records(key))
        verified: list[SignedRecord] = []
        rejected = 0
        for wire in wires:
            try:
                verified.append(self.storage.verifier.verify(wire, now=now, key=key))
            except RecordRejected:
                rejected += 1
        newest = merge_records(verified)
        self.lookup_timing(time.monotonic() - started)
        return Lookup(list(newest.values()), len(result.holders), rejected)

    async def put_record(self, key: bytes, wire: bytes) -> int:
        """Store a record on the closest peers (and locally if we are among them).

        The holder set found by a crawl is reused for ``holder_cache_ttl`` seconds (newcomers
        closer to the key are handed records by the old holders, see ``welcome_if_new``);
        if too few cached holders accept, a fresh crawl runs. Returns how many holders
        accepted the record (0 if no peer answered).
        """
        if self.protocol is None:
            raise RuntimeError("not listening")
        loop = asyncio.get_running_loop()
        cached = self._holders.get(key)
        if cached is not None and cached[0] > loop.time():
            accepted = await self._store_on(key, wire, cached[1], [])
            if accepted >= min(self.config.quorum, len(cached[1])):
                return accepted
            del self._holders[key]
        result = await self._crawl(key, fetch_records=False)
        if len(result.holders) >= self.config.quorum:
            if len(self._holders) > 4096:
                now = loop.time()
                self._holders = {k: v for k, v in self._holders.items() if v[0] > now}
            self._holders[key] = (loop.time() + self.config.holder_cache_ttl, result.holders)
        return await self._store_on(key, wire, result.holders, result.unresponsive)

    async def _store_on(
        self, key: bytes, wire: bytes, holders: list[Node], unresponsive: list[Node]
    ) -> int:
        assert self.protocol is not None
        target = Node(key)
        accepted = 0
        if len(holders) < self.config.replicas or self.node.distance_to(target) < max(
            h.distance_to(target) for h in holders
        ):
            try:
                self.storage.put(key, wire)
                accepted += 1
            except RecordRejected as exc:
                if exc.reason is RejectReason.STALE:
                    # a newer record of ours for this key was stored meanwhile (two
                    # publishes of one key overlapped): the newest one is kept, as it should
                    log.debug("own record superseded locally by a newer one")
                else:
                    log.warning("own record refused locally: %s", exc)
        for peer in unresponsive:  # slow, maybe alive: store without waiting
            self.protocol.keep_alive(
                asyncio.ensure_future(self.protocol.call_store(peer, key, wire))
            )
        answers: list[Any] = await asyncio.gather(
            *(self.protocol.call_store(h, key, wire) for h in holders)
        )
        accepted += sum(1 for ok, value in answers if ok and value is True)
        return accepted

    def stop(self) -> None:
        """Close the socket and stop the table refresh."""
        super().stop()
        if self.protocol is not None:
            self.protocol.close()
        for task in self._tasks:
            task.cancel()
        self.protocol = None
