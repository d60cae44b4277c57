"""Kademlia protocol and crawler subclasses: validated stores, paged multi-record answers,
short RPC timeouts and crawls with a per-round timeout that never re-add dead peers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import umsgpack
from kademlia.crawling import SpiderCrawl
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from dht.records import KEY_BYTES, RecordRejected
from dht.storage import RESPONSE_BUDGET, RecordStorage

log = logging.getLogger(__name__)

MAX_DATAGRAM = 9000
"""Datagrams larger than this are dropped unread (rpcudp itself never sends more than ~8 KiB
of request; our answers stay under ``RESPONSE_BUDGET`` plus a node list)."""

LATE_TIMER = 0.05
"""A timeout firing this late means the process was stalled; it gets one extension."""

RECEIVE_BUFFER = 1 << 20
"""Requested UDP receive buffer (bytes)."""
PROBE_INTERVAL = 2.0
"""How often a peer skipped as recently dead is pinged to see if it is back."""

_Address = tuple[Any, ...]


def map_address(host: str, listen_family: int) -> str | None:
    """Adapt a literal IP for a socket of ``listen_family``; None if unreachable from it.

    An IPv6 (dual-stack) socket reaches IPv4 peers as ``::ffff:a.b.c.d``.
    """
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if listen_family == socket.AF_INET:
        if addr.version == 4:
            return str(addr)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return None
    if addr.version == 4:
        return f"::ffff:{addr}"
    return host


def _is_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == KEY_BYTES


@dataclass
class TrafficCounters:
    """Bytes and datagrams through one protocol instance."""

    bytes_sent: int = 0
    bytes_received: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    stores_accepted: int = 0
    stores_rejected: int = 0


class _CountingTransport:
    """Wraps a datagram transport to count outgoing bytes."""

    def __init__(self, transport: Any, counters: TrafficCounters) -> None:
        self._transport = transport
        self._counters = counters

    def sendto(self, data: bytes, addr: _Address | None = None) -> None:
        self._counters.bytes_sent += len(data)
        self._counters.datagrams_sent += 1
        self._transport.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class DirectoryProtocol(KademliaProtocol):
    """KademliaProtocol whose storage holds signed multi-writer records."""

    def __init__(
        self,
        source_node: Node,
        storage: RecordStorage,
        ksize: int,
        *,
        rpc_timeout: float = 1.0,
        response_budget: int = RESPONSE_BUDGET,
        dead_for: float = 15.0,
        answer_neighbors: int = 8,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = rpc_timeout
        self.storage: RecordStorage = storage
        self.response_budget = response_budget
        self.answer_neighbors = answer_neighbors
        self.traffic = TrafficCounters()
        self._tasks: set[asyncio.Future[Any]] = set()
        self.dead_for = dead_for
        self._recently_dead: dict[bytes, float] = {}
        self._welcomed: dict[bytes, float] = {}
        self._extended: set[bytes] = set()
        self._probed: dict[bytes, float] = {}
        self.family = socket.AF_INET

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.keep_alive(asyncio.ensure_future(coro))

    def close(self) -> None:
        """Cancel background tasks and pending requests (the transport is closed elsewhere)."""
        for task in list(self._tasks):
            task.cancel()
        for future, timeout in self._outstanding.values():
            timeout.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        self._extended.clear()

    def keep_alive(self, task: asyncio.Future[Any]) -> None:
        """Hold a reference to a background task until it finishes."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ transport hygiene

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.family = sock.family
            # bursts (refresh storms, hot keys) overflow the default ~200 KB buffer; drops
            # look like dead peers. The kernel caps this at net.core.rmem_max.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.transport = _CountingTransport(transport, self.traffic)

    def datagram_received(self, data: bytes, addr: _Address) -> None:
        self.traffic.bytes_received += len(data)
        self.traffic.datagrams_received += 1
        if len(data) > MAX_DATAGRAM or len(data) < 22:
            return
        msg_id = data[1:21]
        try:
            message = umsgpack.unpackb(data[21:])
        except Exception:  # umsgpack raises many types on garbage
            return
        if data[:1] == b"\x00":
            self._spawn(self._accept_request_safely(msg_id, message, addr))
        elif data[:1] == b"\x01":
            self._accept_response(msg_id, message, addr)

    async def _accept_request_safely(self, msg_id: bytes, message: Any, addr: _Address) -> None:
        try:
            await self._accept_request(msg_id, message, addr)
        except Exception as exc:  # malformed request: wrong arity, types, ...
            log.debug("dropped malformed request from %s: %s", addr, exc)

    def _accept_response(self, msg_id: bytes, data: Any, address: _Address) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is None:
            return
        self._extended.discard(msg_id)
        future, timeout = pending
        timeout.cancel()
        if not future.done():
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._outstanding.get(msg_id)
        if pending is None:
            return
        future, handle = pending
        loop = asyncio.get_running_loop()
        lag = loop.time() - handle.when()
        if lag > LATE_TIMER and msg_id not in self._extended:
            # this process was stalled: the answer may be waiting in a socket buffer (or its
            # handler not yet run); give it a moment instead of declaring the peer dead
            self._extended.add(msg_id)
            new_handle = loop.call_later(max(lag, LATE_TIMER), self._timeout, msg_id)
            self._outstanding[msg_id] = (future, new_handle)
            return
        self._extended.discard(msg_id)
        del self._outstanding[msg_id]
        if not future.done():
            future.set_result((False, None))

    # ------------------------------------------------------------------ RPC handlers

    def rpc_ping(self, sender: _Address, nodeid: bytes) -> bytes | None:
        if not _is_id(nodeid):
            return None
        result: bytes = super().rpc_ping(sender, nodeid)
        return result

    def rpc_store(self, sender: _Address, nodeid: bytes, key: bytes, value: object) -> bool:
        """Accept a record only if it validates; never lets a value be erased."""
        if not (_is_id(nodeid) and _is_id(key)):
            return False
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        try:
            self.storage.put(key, value)
        except RecordRejected as exc:
            self.traffic.stores_rejected += 1
            log.debug("store from %s refused: %s", sender, exc)
            return False
        self.traffic.stores_accepted += 1
        return True

    def rpc_find_node(self, sender: _Address, nodeid: bytes, key: bytes) -> list[Any] | None:
        if not (_is_id(nodeid) and _is_id(key)):
            return None
        result: list[Any] = super().rpc_find_node(sender, nodeid, key)
        return result

    def rpc_find_value(
        self, sender: _Address, nodeid: bytes, key: bytes, after: bytes = b""
    ) -> dict[str, Any] | None:
        """Answer with a page of records (bounded bytes) plus, on the first page, neighbours."""
        if not (_is_id(nodeid) and _is_id(key) and isinstance(after, bytes) and len(after) <= 32):
            return None
        page = self.storage.page(key, after, self.response_budget)
        answer: dict[str, Any] = {"records": page.records, "next": page.next_after}
        if not after:
            self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
            neighbors = self.router.find_neighbors(
                Node(key), self.answer_neighbors, exclude=Node(nodeid, *sender[:2])
            )
            answer["nodes"] = [tuple(n) for n in neighbors]
        return answer

    # ------------------------------------------------------------------ calls

    async def call_find_records(
        self, node_to_ask: Node, key: bytes, after: bytes = b""
    ) -> tuple[bool, Any]:
        """find_value on one peer; (responded, answer)."""
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.find_value(address, self.source_node.id, key, after)
        checked: tuple[bool, Any] = self.handle_call_response(result, node_to_ask)
        return checked

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        """Drop unresponsive peers from the routing table; welcome responsive ones."""
        if not result[0]:
            log.debug("no response from %s, removing from router", node)
            self.router.remove_contact(node)
            now = asyncio.get_running_loop().time()
            if len(self._recently_dead) > 4096:
                self._recently_dead = {k: t for k, t in self._recently_dead.items() if t > now}
            self._recently_dead[node.id] = now + self.dead_for
            return result
        self.welcome_if_new(node)
        return result

    def is_recently_dead(self, node_id: bytes) -> bool:
        """True if the peer timed out lately and has not been heard from since.

        Crawls skip such peers even when other nodes still list them.
        """
        until = self._recently_dead.get(node_id)
        if until is None:
            return False
        if until <= asyncio.get_running_loop().time():
            del self._recently_dead[node_id]
            return False
        return True

    def skip_as_dead(self, node: Node) -> bool:
        """True if crawls should skip ``node`` because it timed out lately.

        Such a peer is pinged at most every ``PROBE_INTERVAL`` seconds: one that was only
        overloaded answers, which clears the mark (see :meth:`welcome_if_new`).
        """
        if not self.is_recently_dead(node.id):
            return False
        now = asyncio.get_running_loop().time()
        if self._probed.get(node.id, 0.0) <= now:
            if len(self._probed) > 4096:
                self._probed = {k: t for k, t in self._probed.items() if t > now}
            self._probed[node.id] = now + PROBE_INTERVAL
            self._spawn(self.call_ping(node))
        return True

    def welcome_if_new(self, node: Node) -> None:
        """Add a new contact; hand it the records it is now among the closest holders of.

        Unlike kademlia's version, storage keys are already hashed and are not hashed again.
        """
        self._recently_dead.pop(node.id, None)
        if not self.router.is_new_node(node):
            return
        # a node parked in a full bucket's replacement list stays "new" to kademlia; hand it
        # records at most once per `dead_for` seconds instead of on every message
        now = asyncio.get_running_loop().time()
        if self._welcomed.get(node.id, 0.0) > now:
            self.router.add_contact(node)
            return
        if len(self._welcomed) > 4096:
            self._welcomed = {k: t for k, t in self._welcomed.items() if t > now}
        self._welcomed[node.id] = now + self.dead_for
        for key, wire in self.storage:
            keynode = Node(key)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                last = neighbors[-1].distance_to(keynode)
                new_node_close = node.distance_to(keynode) < last
                first = neighbors[0].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < first
            if not neighbors or (new_node_close and this_closest):
                self._spawn(self.call_store(node, key, wire))
        self.router.add_contact(node)


@dataclass
class CrawlResult:
    """Outcome of a record crawl."""

    records: list[bytes] = field(default_factory=list)
    holders: list[Node] = field(default_factory=list)
    """The closest peers that answered, nearest first."""
    unresponsive: list[Node] = field(default_factory=list)
    """Peers of the closest set that had not answered (slow or dead) when the crawl ended."""
    dead: int = 0
    rounds: int = 0
    settled: bool = False
    """True if a quorum of the closest peers answered (not cut short by deadline or lack of
    peers)."""


def _parse_nodes(raw: object, family: int) -> list[Node]:
    """Contacts from an answer, addresses adapted to our socket family (others dropped)."""
    nodes: list[Node] = []
    if not isinstance(raw, list):
        return nodes
    for item in raw[:64]:
        if (
            isinstance(item, list | tuple)
            and len(item) == 3
            and _is_id(item[0])
            and isinstance(item[1], str)
            and isinstance(item[2], int)
            and 0 < item[2] < 65536
        ):
            try:
                host = map_address(item[1], family)
            except ValueError:
                continue
            if host is not None:
                nodes.append(Node(item[0], host, item[2]))
    return nodes


class RecordCrawl(SpiderCrawl):
    """Iterative lookup of ``key`` that collects answers from the ``replicas`` closest
    responsive peers (the window).

    At most ``alpha`` queries are "active"; a query unanswered after ``round_timeout`` becomes
    "slow": it no longer blocks new queries and leaves the window, so the next closest peer
    is asked instead. The crawl ends when every peer of the window answered and at least
    ``quorum`` of the ``replicas`` closest peers not known dead (slow ones included) answered.
    Peers that time out are dropped and never re-added within the crawl (nor, for a while,
    by later crawls: see :meth:`DirectoryProtocol.is_recently_dead`).
    """

    def __init__(
        self,
        protocol: DirectoryProtocol,
        node: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        *,
        replicas: int,
        quorum: int,
        round_timeout: float,
        deadline: float,
        fetch_records: bool = True,
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
        self.protocol: DirectoryProtocol = protocol
        self.replicas = replicas
        self.quorum = quorum
        self.round_timeout = round_timeout
        self.deadline = deadline
        self.fetch_records = fetch_records
        self.dead: set[bytes] = set()
        self.slow: set[bytes] = set()
        self.answered: set[bytes] = set()
        self.result = CrawlResult()

    def _query(self, peer: Node, after: bytes) -> Coroutine[Any, Any, tuple[bool, Any]]:
        if self.fetch_records:
            return self.protocol.call_find_records(peer, self.node.id, after)
        return self._find_node(peer)

    async def _find_node(self, peer: Node) -> tuple[bool, Any]:
        result: tuple[bool, Any] = await self.protocol.call_find_node(peer, self.node)
        if result[0]:
            return True, {"nodes": result[1]}
        return result

    def _window(self) -> list[Node]:
        """The closest peers neither dead nor slow."""
        return [n for n in self.nearest if n.id not in self.slow][: self.replicas]

    def _settled(self, window: list[Node], paging: bool) -> bool:
        if paging or not all(n.id in self.answered for n in window):
            return False
        # slow peers may just be overloaded (a hot key): require a quorum of answers from
        # the closest peers not known dead, so an overloaded holder set is waited for
        core = list(self.nearest)[: self.replicas]
        answered = sum(1 for n in core if n.id in self.answered)
        return answered >= min(self.quorum, len(core))

    async def find(self) -> CrawlResult:
        """Crawl until the window is settled (or the deadline passes)."""
        loop = asyncio.get_running_loop()
        inflight: dict[asyncio.Future[tuple[bool, Any]], tuple[Node, bytes, float]] = {}
        try:
            while True:
                now = loop.time()
                if now >= self.deadline:
                    break
                for peer, _, started in inflight.values():
                    if now - started >= self.round_timeout and peer.id not in self.answered:
                        self.slow.add(peer.id)
                window = self._window()
                paging = any(after for _, after, _ in inflight.values())
                if self._settled(window, paging):
                    self.result.settled = True
                    break
                active = sum(
                    1 for peer, _, started in inflight.values() if peer.id not in self.slow
                )
                uncontacted = self.nearest.get_uncontacted()
                window_ids = {n.id for n in window}
                if all(n.id in window_ids for n in uncontacted[: self.alpha]):
                    # converged: query every remaining peer of the window at once
                    launch = [n for n in uncontacted if n.id in window_ids]
                else:
                    launch = uncontacted[: max(self.alpha - active, 0)]
                for peer in launch:
                    self.nearest.mark_contacted(peer)
                    fut = asyncio.ensure_future(self._query(peer, b""))
                    inflight[fut] = (peer, b"", now)
                if not inflight:
                    break
                self.result.rounds += 1
                timeout = min(self.round_timeout, self.deadline - now)
                done, _ = await asyncio.wait(
                    inflight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    # the process may just have been descheduled: let answers already in
                    # the socket buffer through before declaring anyone slow
                    for _ in range(3):
                        await asyncio.sleep(0)
                    done = {f for f in inflight if f.done()}
                for finished in done:
                    peer, _, _ = inflight.pop(finished)
                    self._handle(peer, finished.result(), inflight, loop.time())
        finally:
            # let stragglers finish in the background: a timeout still evicts the dead peer
            # from the routing table (handle_call_response); answers are simply ignored
            for pending in inflight:
                self.protocol.keep_alive(pending)
        closest = list(self.nearest)
        self.result.holders = [n for n in closest if n.id in self.answered][: self.replicas]
        self.result.unresponsive = [n for n in closest[: self.replicas] if n.id in self.slow]
        self.result.dead = len(self.dead)
        return self.result

    def _handle(
        self,
        peer: Node,
        response: tuple[bool, Any],
        inflight: dict[asyncio.Future[tuple[bool, Any]], tuple[Node, bytes, float]],
        now: float,
    ) -> None:
        ok, answer = response
        if not ok or not isinstance(answer, dict):
            self.dead.add(peer.id)
            self.slow.add(peer.id)
            self.nearest.remove([peer.id])
            return
        nodes = [
            n
            for n in _parse_nodes(answer.get("nodes"), self.protocol.family)
            if n.id not in self.dead and not self.protocol.skip_as_dead(n)
        ]
        nodes = [n for n in nodes if n.id != self.protocol.source_node.id]
        if nodes:
            self.nearest.push(nodes)
        records = answer.get("records")
        if isinstance(records, list):
            self.result.records.extend(r for r in records[:256] if isinstance(r, bytes))
        after = answer.get("next")
        if isinstance(after, bytes) and after and self.fetch_records:
            fut = asyncio.ensure_future(self._query(peer, after))
            inflight[fut] = (peer, after, now)
            return
        self.answered.add(peer.id)
        self.slow.discard(peer.id)
