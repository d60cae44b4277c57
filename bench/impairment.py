"""A small UDP impairment proxy (delay, jitter, loss) for tests and benchmarks.

``tc netem`` is unavailable here, so links are impaired in user space:

* :class:`Impairment` is the sans-I/O decision core: for each datagram it answers
  "drop" (``None``) or "deliver at time T", from a seeded RNG.
* :class:`ImpairmentProxy` is the asyncio adapter: it listens on 127.0.0.1, opens one
  upstream socket per client address towards ``target`` and forwards both directions,
  each with its own :class:`Impairment`.  Set ``blocked = True`` to cut the link.

Only 127.0.0.1 is ever bound or addressed, except that a proxy running inside a network
namespace a test created may listen on that namespace's addresses (``start(host=...)``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Any, cast

LOCALHOST = "127.0.0.1"


@dataclass
class Impairment:
    """Per-direction impairment decisions (times in seconds)."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    seed: int = 1
    blocked: bool = False
    #: keep packet order even with jitter (a packet never overtakes the previous one)
    preserve_order: bool = True
    rng: random.Random = field(init=False)
    _last: float = field(init=False, default=float("-inf"))
    passed: int = field(init=False, default=0)
    dropped: int = field(init=False, default=0)
    bytes_passed: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def decide(self, now: float, size: int) -> float | None:
        """Delivery time for a datagram of ``size`` bytes received at ``now``, or None."""
        if self.blocked or (self.loss > 0 and self.rng.random() < self.loss):
            self.dropped += 1
            return None
        at = now + self.delay
        if self.jitter > 0:
            at += self.rng.uniform(0, self.jitter)
        if self.preserve_order and at <= self._last:
            at = self._last + 1e-6  # strictly later: equal timer deadlines may swap
        self._last = at
        self.passed += 1
        self.bytes_passed += size
        return at


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, proxy: ImpairmentProxy, client: tuple[str, int]) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._forward(self.proxy.down, data, self.client, None)


class _Front(asyncio.DatagramProtocol):
    def __init__(self, proxy: ImpairmentProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._from_client(data, addr)


class ImpairmentProxy:
    """Bidirectional impaired UDP forwarder ``127.0.0.1:port`` -> ``target``.

    ``up`` impairs client -> target traffic, ``down`` target -> client traffic.
    """

    def __init__(
        self,
        target: tuple[str, int],
        up: Impairment | None = None,
        down: Impairment | None = None,
    ) -> None:
        if target[0] != LOCALHOST:
            raise ValueError("the impairment proxy only forwards to 127.0.0.1")
        self.target = target
        self.up = up or Impairment(seed=1)
        self.down = down or Impairment(seed=2)
        self._front: asyncio.DatagramTransport | None = None
        self._upstreams: dict[tuple[str, int], _Upstream] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[int, list[Any]] = {id(self.up): [], id(self.down): []}
        self._timers: dict[int, tuple[float, asyncio.Handle]] = {}
        self._counter = itertools.count()
        self.port = 0

    async def start(self, port: int = 0, host: str = LOCALHOST) -> ImpairmentProxy:
        """Listen on ``host``:``port`` (0 = ephemeral); returns self. ``host`` other than
        127.0.0.1 only inside a network namespace the test created."""
        self._loop = asyncio.get_running_loop()
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Front(self), local_addr=(host, port)
        )
        self._front = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]
        return self

    @property
    def address(self) -> tuple[str, int]:
        """Where clients should send."""
        return LOCALHOST, self.port

    def set_blocked(self, blocked: bool) -> None:
        """Cut (or restore) both directions."""
        self.up.blocked = blocked
        self.down.blocked = blocked

    @property
    def bytes_total(self) -> int:
        """UDP payload bytes forwarded in both directions."""
        return self.up.bytes_passed + self.down.bytes_passed

    def _from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        up = self._upstreams.get(addr)
        if up is None:
            pending = self._pending.get(addr)
            if pending is not None:
                pending.append(data)
                return
            self._pending[addr] = [data]
            assert self._loop is not None
            self._loop.create_task(self._open_upstream(addr))
            return
        self._forward(self.up, data, None, up)

    async def _open_upstream(self, addr: tuple[str, int]) -> None:
        assert self._loop is not None
        _, proto = await self._loop.create_datagram_endpoint(
            lambda: _Upstream(self, addr), local_addr=(LOCALHOST, 0), remote_addr=self.target
        )
        assert isinstance(proto, _Upstream)
        self._upstreams[addr] = proto
        for data in self._pending.pop(addr, []):
            self._forward(self.up, data, None, proto)

    def _forward(
        self,
        imp: Impairment,
        data: bytes,
        client: tuple[str, int] | None,
        upstream: _Upstream | None,
    ) -> None:
        assert self._loop is not None
        now = self._loop.time()
        at = imp.decide(now, len(data))
        if at is None:
            return
        queue = self._queues[id(imp)]
        if at <= now and not queue:
            self._send(data, client, upstream)
            return
        # one timer per direction over a heap: event-loop timers are not FIFO for equal
        # (or, on uvloop, same-millisecond) deadlines, which would reorder packets
        heapq.heappush(queue, (at, next(self._counter), data, client, upstream))
        self._arm(imp, queue)

    def _arm(self, imp: Impairment, queue: list[Any]) -> None:
        assert self._loop is not None
        key = id(imp)
        head = queue[0][0]
        timer = self._timers.get(key)
        if timer is not None:
            if timer[0] <= head:
                return
            timer[1].cancel()
        self._timers[key] = (head, self._loop.call_at(head, self._flush, imp))

    def _flush(self, imp: Impairment) -> None:
        assert self._loop is not None
        self._timers.pop(id(imp), None)
        queue = self._queues[id(imp)]
        now = self._loop.time()
        while queue and queue[0][0] <= now + 0.0005:
            _, _, data, client, upstream = heapq.heappop(queue)
            self._send(data, client, upstream)
        if queue:
            self._arm(imp, queue)

    def _send(self, data: bytes, client: tuple[str, int] | None, up: _Upstream | None) -> None:
        if up is not None:
            if up.transport is not None and not up.transport.is_closing():
                up.transport.sendto(data)
        elif client is not None and self._front is not None and not self._front.is_closing():
            self._front.sendto(data, client)

    def close(self) -> None:
        """Stop forwarding and close every socket."""
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for up in self._upstreams.values():
            if up.transport is not None:
                up.transport.close()
        self._upstreams.clear()
        if self._front is not None:
            self._front.close()
            self._front = None
