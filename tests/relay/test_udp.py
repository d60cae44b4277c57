"""The relay's UDP transport on loopback: draining reads, segmented sends, coalesced reads."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from relay.udp import DrainingDatagramTransport, open_udp


class Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.arrived = asyncio.Event()
        self.expected = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.append(data)
        if len(self.datagrams) >= self.expected:
            self.arrived.set()


def burst() -> list[bytes]:
    """Equal-sized datagrams with a shorter last one, then other sizes, all distinct."""
    same = [bytes([i]) * 1134 for i in range(12)]
    return [*same, b"short" * 20, b"x", b"y" * 1200, b"z" * 1200, b"w" * 700]


async def open_pair(offload: bool) -> tuple[DrainingDatagramTransport, Collector, Any]:
    receiver, proto = await open_udp(Collector, ("127.0.0.1", 0), offload)
    sender, _ = await open_udp(asyncio.DatagramProtocol, ("127.0.0.1", 0), offload)
    assert isinstance(proto, Collector) and isinstance(sender, DrainingDatagramTransport)
    assert isinstance(receiver, DrainingDatagramTransport)
    return sender, proto, receiver


async def test_segmented_sends_arrive_as_the_same_datagrams_in_order() -> None:
    sender, collector, receiver = await open_pair(offload=True)
    data = burst()
    collector.expected = len(data)
    sender.sendto_many(data, receiver.get_extra_info("sockname"))
    await asyncio.wait_for(collector.arrived.wait(), 10)
    assert collector.datagrams == data
    assert sender.gso and receiver.gro
    # 12 equal + the shorter one in one send; 1200, 1200, 700 in another
    assert sender.segmented_sends == 2
    assert sender.segmented_datagrams == 16
    sender.close()
    receiver.close()


async def test_segmented_sends_reach_a_socket_that_does_not_coalesce() -> None:
    sender, _, other = await open_pair(offload=True)
    other.close()
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind(("127.0.0.1", 0))
    plain.settimeout(5)
    data = burst()
    sender.sendto_many(data, plain.getsockname())
    got = [plain.recv(65535) for _ in data]
    assert got == data
    plain.close()
    sender.close()


async def test_without_offload_every_datagram_is_sent_alone() -> None:
    sender, collector, receiver = await open_pair(offload=False)
    data = burst()
    collector.expected = len(data)
    sender.sendto_many(data, receiver.get_extra_info("sockname"))
    await asyncio.wait_for(collector.arrived.wait(), 10)
    assert collector.datagrams == data
    assert sender.segmented_sends == 0 and not receiver.gro
    sender.close()
    receiver.close()
