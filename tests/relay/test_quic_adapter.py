"""The aioquic adapter's fast path against an unmodified aioquic ``QuicConnection``.

Two connections are joined in memory (no sockets): one side drives its connection through
:class:`relay.quic_adapter.DatagramFastPath`, the other is stock aioquic (or both fast).
What is checked is what a peer sees: every DATAGRAM payload decoded in order, ACKs that
empty the sender's flight, losses declared for exactly the packets dropped, stream data and
closes still carried by aioquic's own path.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.logger import QuicLogger
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay import make_certificate
from relay.protocol import ALPN
from relay.quic_adapter import FAST_PATH_ENV, DatagramFastPath, fast_path_enabled

CLIENT_ADDR = ("127.0.0.1", 40000)
SERVER_ADDR = ("127.0.0.1", 4433)


class Side:
    """One connection, driven through the fast path or as stock aioquic."""

    def __init__(self, quic: QuicConnection, addr: tuple[str, int], fast: bool) -> None:
        self.quic = quic
        self.addr = addr
        self.fast = DatagramFastPath(quic) if fast else None
        self.datagrams: list[bytes] = []
        self.stream: dict[int, bytes] = {}
        self.terminated: events.ConnectionTerminated | None = None

    def send(self, now: float) -> list[bytes]:
        if self.fast is not None:
            return [d for d, _ in self.fast.datagrams_to_send(now)]
        return [d for d, _ in self.quic.datagrams_to_send(now=now)]

    def receive(self, data: bytes, peer: tuple[str, int], now: float) -> None:
        if self.fast is not None:
            self.datagrams.extend(self.fast.receive_datagram(data, peer, now))
        else:
            self.quic.receive_datagram(data, peer, now=now)
        self.drain()

    def timer(self, now: float) -> None:
        at = self.quic.get_timer()
        if at is not None and at <= now:
            if self.fast is not None:
                self.fast.handle_timer(now)
            else:
                self.quic.handle_timer(now=now)
            self.drain()

    def drain(self) -> None:
        event = self.quic.next_event()
        while event is not None:
            if isinstance(event, events.DatagramFrameReceived):
                self.datagrams.append(event.data)
            elif isinstance(event, events.StreamDataReceived):
                self.stream[event.stream_id] = self.stream.get(event.stream_id, b"") + event.data
            elif isinstance(event, events.ConnectionTerminated):
                self.terminated = event
            event = self.quic.next_event()

    def touch(self) -> None:
        if self.fast is not None:
            self.fast.touch()


class Link:
    """Two sides joined in memory; ``drop(direction, index, data)`` may lose datagrams."""

    def __init__(self, client: Side, server: Side, now: float) -> None:
        self.client, self.server, self.now = client, server, now
        self.drop: Callable[[str, int, bytes], bool] = lambda d, i, data: False
        self.sent = {"c>s": 0, "s>c": 0}
        self.dropped: dict[str, list[int]] = {"c>s": [], "s>c": []}

    def _move(self, src: Side, dst: Side, direction: str) -> bool:
        out = src.send(self.now)
        for data in out:
            index = self.sent[direction]
            self.sent[direction] += 1
            if self.drop(direction, index, data):
                self.dropped[direction].append(index)
                continue
            dst.receive(data, src.addr, self.now)
        return bool(out)

    def step(self, dt: float = 0.001) -> None:
        """Deliver both ways, then let time pass and run due timers."""
        for _ in range(50):
            moved = self._move(self.client, self.server, "c>s")
            moved |= self._move(self.server, self.client, "s>c")
            if not moved:
                break
        self.now += dt
        self.client.timer(self.now)
        self.server.timer(self.now)

    def run(self, seconds: float, dt: float = 0.001) -> None:
        for _ in range(int(seconds / dt)):
            self.step(dt)


def make_link(
    fast_client: bool, fast_server: bool, *, server_logger: QuicLogger | None = None
) -> Link:
    """A handshaken client/server pair (the relay's QUIC settings) joined in memory."""
    key = Ed25519PrivateKey.generate()
    common: dict[str, Any] = {"alpn_protocols": [ALPN], "max_datagram_frame_size": 65535}
    server_cfg = QuicConfiguration(is_client=False, quic_logger=server_logger, **common)
    server_cfg.certificate = make_certificate(key)
    server_cfg.private_key = key
    client_cfg = QuicConfiguration(
        is_client=True, verify_mode=ssl.CERT_NONE, server_name="cascade-node", **common
    )
    now = 1000.0
    client = QuicConnection(configuration=client_cfg)
    client.connect(SERVER_ADDR, now=now)
    server = QuicConnection(
        configuration=server_cfg,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    link = Link(Side(client, CLIENT_ADDR, fast_client), Side(server, SERVER_ADDR, fast_server), now)
    link.run(0.05)
    return link


def payloads(count: int, tag: bytes = b"") -> list[bytes]:
    """Distinct datagrams of varied sizes, from 1 byte to nearly a full packet."""
    sizes = (1, 40, 63, 64, 300, 1100, 1150)
    out = []
    for i in range(count):
        size = sizes[i % len(sizes)]
        head = tag + i.to_bytes(4, "big")
        out.append(bytes([i & 0xFF]) if size < len(head) else head + bytes(size - len(head)))
    return out


def send_all(link: Link, side: Side, data: list[bytes], per_step: int = 10) -> None:
    for start in range(0, len(data), per_step):
        for d in data[start : start + per_step]:
            side.quic.send_datagram_frame(d)
        link.step(0.0005)


def bytes_in_flight(logger: QuicLogger) -> int:
    """The server's bytes in flight, as its qlog last reported them."""
    trace = logger.to_dict()["traces"][0]
    metrics = [e["data"] for e in trace["events"] if e["name"] == "recovery:metrics_updated"]
    return int([m for m in metrics if "bytes_in_flight" in m][-1]["bytes_in_flight"])


def lost_packets(logger: QuicLogger) -> list[int]:
    trace = logger.to_dict()["traces"][0]
    lost = [e for e in trace["events"] if e["name"] == "recovery:packet_lost"]
    return [e["data"]["packet_number"] for e in lost]


# -- interop --------------------------------------------------------------------------


def test_fast_sender_to_stock_receiver_decodes_every_datagram_and_is_acked() -> None:
    link = make_link(fast_client=False, fast_server=True)
    fast = link.server.fast
    assert fast is not None
    start, built = link.sent["s>c"], fast.packets_sent
    data = payloads(300)
    send_all(link, link.server, data)
    link.run(0.1)
    assert link.client.datagrams == data
    assert fast.packets_sent - built == link.sent["s>c"] - start  # built here, not by aioquic
    assert fast.packets_received > 0  # the stock receiver's ACKs, parsed here
    assert link.server.quic._loss.bytes_in_flight == 0


def test_stock_sender_to_fast_receiver_and_fast_acks_empty_its_flight() -> None:
    logger = QuicLogger()
    link = make_link(fast_client=True, fast_server=False, server_logger=logger)
    data = payloads(300)
    send_all(link, link.server, data)
    link.run(0.1)
    assert link.client.datagrams == data
    fast = link.client.fast
    assert fast is not None
    assert fast.packets_received >= link.sent["s>c"] - 20  # all but the handshake's
    assert fast.packets_sent > 0  # ACK-only packets built here
    assert bytes_in_flight(logger) == 0
    assert lost_packets(logger) == []


def test_both_ends_fast() -> None:
    link = make_link(fast_client=True, fast_server=True)
    one, two = payloads(200, b"a"), payloads(200, b"b")
    send_all(link, link.server, one)
    send_all(link, link.client, two)
    link.run(0.1)
    assert link.client.datagrams == one
    assert link.server.datagrams == two
    for side in (link.client, link.server):
        assert side.quic._loss.bytes_in_flight == 0


def test_losses_give_correct_ack_ranges() -> None:
    """Drop some packets from a stock sender: it must declare lost exactly those."""
    logger = QuicLogger()
    link = make_link(fast_client=True, fast_server=False, server_logger=logger)
    first = link.sent["s>c"]
    losses = {first + i for i in (3, 4, 5, 17, 40, 41, 90, 150, 151, 152, 153)}
    link.drop = lambda direction, index, data: direction == "s>c" and index in losses
    data = [i.to_bytes(4, "big") + bytes(1000) for i in range(200)]  # one per packet
    send_all(link, link.server, data, per_step=5)
    link.run(0.5)
    assert set(link.dropped["s>c"]) == losses
    assert len(link.client.datagrams) == len(data) - len(losses)
    assert link.client.datagrams == [d for d in data if d in link.client.datagrams]
    # the sender declared lost exactly as many packets as were dropped: an ACK range that
    # covered a dropped packet, or missed a delivered one, would change that count
    assert len(lost_packets(logger)) == len(losses)
    assert bytes_in_flight(logger) == 0


def test_stream_data_lost_under_the_fast_path_is_retransmitted() -> None:
    link = make_link(fast_client=False, fast_server=True)
    server = link.server
    sid = link.client.quic.get_next_available_stream_id()
    link.client.quic.send_stream_data(sid, b"hello")
    link.step()
    # the next packet the fast side sends carries stream data: drop it
    target = link.sent["s>c"]
    link.drop = lambda direction, index, data: direction == "s>c" and index == target
    server.quic.send_stream_data(sid, b"control bytes")
    server.touch()
    link.step()
    assert link.dropped["s>c"] == [target]
    data = payloads(60)
    send_all(link, server, data)
    link.run(1.0)
    assert link.client.stream.get(sid) == b"control bytes"
    assert link.client.datagrams == data
    assert server.quic._loss.bytes_in_flight == 0


def test_mixed_stream_and_datagram_packets_from_a_stock_sender() -> None:
    link = make_link(fast_client=True, fast_server=False)
    sid = link.client.quic.get_next_available_stream_id()
    link.client.quic.send_stream_data(sid, b"x")
    link.client.touch()
    link.step()
    data = payloads(50)
    for i, d in enumerate(data):
        link.server.quic.send_datagram_frame(d)
        if i % 10 == 0:
            link.server.quic.send_stream_data(sid, bytes([i]))
        link.step(0.0002)
    link.run(0.1)
    fast = link.client.fast
    assert fast is not None
    assert link.client.datagrams == data
    assert link.client.stream[sid] == bytes(range(0, 50, 10))
    assert fast.general_receives > 0 and fast.packets_received > 0


def test_key_update_by_the_peer_falls_back_then_resumes() -> None:
    link = make_link(fast_client=True, fast_server=False)
    fast = link.client.fast
    assert fast is not None
    before = payloads(30, b"1")
    send_all(link, link.server, before)
    general = fast.general_receives
    link.server.quic.request_key_update()
    after = payloads(60, b"2")
    send_all(link, link.server, after)
    link.run(0.1)
    assert link.client.datagrams == before + after
    assert fast.general_receives > general  # the first packet of the new phase
    received, general = fast.packets_received, fast.general_receives
    more = [bytes(1000) + bytes([i]) for i in range(30)]
    send_all(link, link.server, more)
    link.run(0.05)
    assert link.client.datagrams == before + after + more
    assert fast.packets_received >= received + 30  # fast again in the new phase
    assert fast.general_receives == general


def test_key_update_by_the_fast_sender_is_understood_by_stock_aioquic() -> None:
    link = make_link(fast_client=False, fast_server=True)
    link.server.quic.request_key_update()
    data = payloads(80)
    send_all(link, link.server, data)
    link.run(0.1)
    assert link.client.datagrams == data
    assert link.server.quic._loss.bytes_in_flight == 0


def test_close_from_the_fast_side_reaches_the_peer() -> None:
    link = make_link(fast_client=False, fast_server=True)
    send_all(link, link.server, payloads(20))
    link.server.quic.close(error_code=0x105, reason_phrase="bye")
    link.server.touch()
    link.run(2.0)  # the peer reports it at the end of its draining period
    assert link.client.terminated is not None
    assert link.client.terminated.error_code == 0x105


# -- bad input ------------------------------------------------------------------------


def test_garbage_short_forged_and_replayed_packets_are_rejected() -> None:
    link = make_link(fast_client=True, fast_server=False)
    client = link.client
    fast = client.fast
    assert fast is not None
    link.server.quic.send_datagram_frame(b"genuine")
    genuine = link.server.send(link.now)[0]
    client.receive(genuine, SERVER_ADDR, link.now)
    assert client.datagrams == [b"genuine"]
    cid = genuine[1:9]
    forged = bytearray(genuine)
    forged[-1] ^= 1
    rng = os.urandom
    bad = [
        b"",
        b"\x40",
        genuine[:12],
        genuine[:30],
        bytes(forged),
        genuine,  # replay
        b"\x40" + cid + rng(40),
        b"\x5f" + cid + rng(1200),
        rng(1200),
        b"\xc0" + rng(100),
    ]
    for data in bad:
        client.receive(data, SERVER_ADDR, link.now)
    client.receive(genuine, ("127.0.0.1", 9), link.now)  # right packet, wrong address
    assert client.datagrams == [b"genuine"]
    assert fast.rejected >= 2
    assert client.terminated is None
    # the connection still works both ways
    data = payloads(40)
    send_all(link, link.server, data)
    link.run(0.05)
    assert client.datagrams == [b"genuine", *data]


def test_disabled_fast_path_leaves_everything_to_aioquic(monkeypatch: pytest.MonkeyPatch) -> None:
    link = make_link(fast_client=False, fast_server=False)
    off = DatagramFastPath(link.server.quic, enabled=False)
    link.server.fast = off
    data = payloads(30)
    send_all(link, link.server, data)
    link.run(0.05)
    assert link.client.datagrams == data
    assert off.packets_sent == 0 and off.packets_received == 0
    monkeypatch.setenv(FAST_PATH_ENV, "0")
    assert not fast_path_enabled(True)
    monkeypatch.setenv(FAST_PATH_ENV, "1")
    assert fast_path_enabled(True) and not fast_path_enabled(False)


def test_losses_of_fast_packets_are_detected_by_the_fast_sender() -> None:
    link = make_link(fast_client=False, fast_server=True)
    first = link.sent["s>c"]
    losses = {first + i for i in (0, 7, 8, 9, 50, 99)}
    link.drop = lambda direction, index, data: direction == "s>c" and index in losses
    data = [i.to_bytes(4, "big") + bytes(1000) for i in range(100)]
    send_all(link, link.server, data, per_step=4)
    link.run(0.5)
    assert set(link.dropped["s>c"]) == losses
    assert len(link.client.datagrams) == len(data) - len(losses)
    assert link.server.quic._loss.bytes_in_flight == 0  # lost ones declared, others acked
    # and the link goes on
    more = payloads(20, b"z")
    send_all(link, link.server, more)
    link.run(0.1)
    assert link.client.datagrams[-20:] == more


def test_stream_data_queued_while_the_window_is_full_goes_first_when_it_opens() -> None:
    link = make_link(fast_client=False, fast_server=True)
    server = link.server
    fast = server.fast
    assert fast is not None
    sid = link.client.quic.get_next_available_stream_id()
    link.client.quic.send_stream_data(sid, b"hello")
    link.step()
    # the client's ACKs are lost for a while: the server's window fills with datagrams
    link.drop = lambda direction, index, data: direction == "c>s"
    for i in range(40):
        server.quic.send_datagram_frame(i.to_bytes(2, "big") + bytes(1100))
    link.step(0.0001)
    assert server.quic._loss.bytes_in_flight > 0
    server.quic.send_stream_data(sid, b"control while congested")
    server.touch()
    link.step(0.0001)
    link.drop = lambda direction, index, data: False
    link.run(1.0)
    assert link.client.stream.get(sid) == b"control while congested"
    assert len(link.client.datagrams) == 40
    more = payloads(30, b"m")
    send_all(link, server, more)
    link.run(0.1)
    assert link.client.datagrams[-30:] == more
    assert server.quic._loss.bytes_in_flight == 0
    assert fast.packets_sent > 40
