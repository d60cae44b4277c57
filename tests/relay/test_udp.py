"""The relay's UDP transport on loopback: draining reads, segmented sends, coalesced reads;
and our QUIC fast path over it against a stock aioquic server."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay import make_certificate
from relay.quic_adapter import QuicProtocolBase
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


# -- a stock aioquic endpoint over real sockets ----------------------------------------


class Echo(QuicConnectionProtocol):
    """Stock aioquic (its protocol, transport and packet path): echoes every datagram
    (``_quic`` is how aioquic's own examples reach the connection)."""

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.DatagramFrameReceived):
            self._quic.send_datagram_frame(event.data)
            self.transmit()


class FastClient(QuicProtocolBase):
    """Our side: fast path and offloaded sockets."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.echoed: list[bytes] = []
        self.all_back = asyncio.Event()
        self.expected = 0
        self.connected = asyncio.Event()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.receive(data if isinstance(data, bytes) else data.encode(), addr)
        self.transmit()

    def datagram_frame_received(self, data: bytes) -> None:
        self.echoed.append(data)
        if len(self.echoed) >= self.expected:
            self.all_back.set()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.connected.set()


async def test_stock_aioquic_server_talks_to_our_fast_offloaded_client() -> None:
    key = Ed25519PrivateKey.generate()
    server_cfg = QuicConfiguration(
        is_client=False, alpn_protocols=["echo"], max_datagram_frame_size=65535
    )
    server_cfg.certificate = make_certificate(key)
    server_cfg.private_key = key
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = await serve("127.0.0.1", port, configuration=server_cfg, create_protocol=Echo)
    client_cfg = QuicConfiguration(
        is_client=True,
        alpn_protocols=["echo"],
        verify_mode=ssl.CERT_NONE,
        max_datagram_frame_size=65535,
    )
    quic = QuicConnection(configuration=client_cfg)
    transport, proto = await open_udp(lambda: FastClient(quic), ("127.0.0.1", 0), offload=True)
    assert isinstance(proto, FastClient) and isinstance(transport, DrainingDatagramTransport)
    try:
        proto.connect(("127.0.0.1", port))
        await asyncio.wait_for(proto.connected.wait(), 10)
        data = [i.to_bytes(4, "big") + bytes(1000) for i in range(300)]
        # bursts of 10, each echoed before the next: no socket buffer can overflow, so
        # these unreliable datagrams all come back even on a busy machine
        for start in range(0, len(data), 10):
            proto.expected = start + 10
            proto.all_back.clear()
            for d in data[start : start + 10]:
                quic.send_datagram_frame(d)
            proto.transmit()
            await asyncio.wait_for(proto.all_back.wait(), 20)
        assert proto.echoed == data
        stats = proto.fast.stats()
        assert stats["fast_packets_sent"] >= 250
        assert stats["fast_packets_received"] >= 250
        assert transport.segmented_sends > 0
    finally:
        transport.close()
        server.close()
