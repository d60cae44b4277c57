"""One UDP port for every ICE transport of a node (``--ice-port``): routing and media."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from peer import aiortc_adapter as rtc
from peer.client import CascadeClient
from peer.ice_port import IcePortRoutes, is_stun, stun_username
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.server import NodeConfig, NodeServer
from tests.conftest import SECRET, token

PEER = ("127.0.0.1", 40000)
OTHER = ("127.0.0.1", 40001)


def stun(kind: int, transaction: bytes, username: str | None = None) -> bytes:
    """A STUN message of type ``kind`` (0x0001 request, 0x0101 response, 0x0111 error)."""
    body = b""
    if username is not None:
        value = username.encode()
        body = struct.pack("!HH", 0x0006, len(value)) + value + b"\0" * (-len(value) % 4)
    return struct.pack("!HHI", kind, len(body), 0x2112A442) + transaction + body


def test_a_check_names_its_transport_and_teaches_its_address():
    routes: IcePortRoutes[str] = IcePortRoutes()
    routes.add("ufA", "a")
    routes.add("ufB", "b")
    assert routes.route(b"\x80" + os.urandom(40), PEER) is None  # media before any check
    assert routes.route(stun(0x0001, b"t" * 12, "ufB:theirs"), PEER) == "b"
    assert routes.route(b"\x80" + os.urandom(40), PEER) == "b"  # SRTP
    assert routes.route(b"\x16\xfe\xfd" + os.urandom(40), PEER) == "b"  # DTLS
    assert routes.route(b"\x80" + os.urandom(40), OTHER) is None
    assert routes.unroutable == 2


def test_responses_go_to_the_transport_that_asked():
    routes: IcePortRoutes[str] = IcePortRoutes()
    routes.add("ufA", "a")
    routes.add("ufB", "b")
    routes.sent("a", stun(0x0001, b"A" * 12, "theirs:ufA"))
    routes.sent("b", b"\x80" + os.urandom(40))  # not a request: nothing learnt
    # from an address nobody has learnt, to the asker only
    assert routes.route(stun(0x0101, b"A" * 12), PEER) == "a"
    assert routes.route(stun(0x0111, b"A" * 12), PEER) == "a"
    assert routes.route(stun(0x0101, b"Z" * 12), PEER) is None


def test_a_known_address_moves_to_the_transport_its_latest_check_names():
    routes: IcePortRoutes[str] = IcePortRoutes()
    routes.add("ufA", "a")
    routes.add("ufB", "b")
    routes.route(stun(0x0001, b"1" * 12, "ufA:x"), PEER)
    routes.route(stun(0x0001, b"2" * 12, "ufB:x"), PEER)
    assert routes.route(b"\x80\x00", PEER) == "b"
    routes.remove("b")
    assert routes.route(b"\x80\x00", PEER) is None  # not given back to a
    assert routes.route(stun(0x0001, b"3" * 12, "ufB:x"), PEER) is None
    assert len(routes) == 1 and routes.members() == ["a"]


def test_removing_a_transport_forgets_its_ufrag_addresses_and_transactions():
    routes: IcePortRoutes[str] = IcePortRoutes()
    routes.add("ufA", "a")
    routes.route(stun(0x0001, b"1" * 12, "ufA:x"), PEER)
    routes.sent("a", stun(0x0001, b"T" * 12, "x:ufA"))
    routes.remove("a")
    assert routes.route(b"\x80\x00", PEER) is None
    assert routes.route(stun(0x0101, b"T" * 12), OTHER) is None
    routes.add("ufA", "a2")  # the ufrag is free again
    assert routes.route(stun(0x0001, b"4" * 12, "ufA:x"), PEER) == "a2"


def test_one_ufrag_per_port():
    routes: IcePortRoutes[str] = IcePortRoutes()
    routes.add("ufA", "a")
    routes.add("ufA", "a")  # the same again is fine
    with pytest.raises(ValueError, match="already"):
        routes.add("ufA", "b")


def test_a_ufrag_names_its_member():
    routes: IcePortRoutes[str] = IcePortRoutes()
    routes.add("ufA", "a")
    assert routes.member_of("ufA") == "a" and routes.member_of("ufB") is None
    routes.remove("a")
    assert routes.member_of("ufA") is None


def test_malformed_stun_routes_nowhere():
    routes: IcePortRoutes[str] = IcePortRoutes()
    routes.add("ufA", "a")
    good = stun(0x0001, b"1" * 12, "ufA:x")
    cases = [
        good[:19],  # shorter than a header
        good[:4] + b"\0\0\0\0" + good[8:],  # no magic cookie
        good[:2] + b"\x00\x40" + good[4:],  # length beyond the datagram
        good[:24],  # attribute cut short
        good[:20] + struct.pack("!HH", 0x0006, 3) + b"\xff\xfe\xfd\0",  # not UTF-8
        stun(0x0001, b"1" * 12),  # no USERNAME
        stun(0x0001, b"1" * 12, "nobody:x"),
        b"",
    ]
    for data in cases:
        assert routes.route(data, PEER) is None, data
    assert routes.unroutable == len(cases)
    assert routes.route(b"\x80\x00", PEER) is None  # nothing was learnt


def test_stun_helpers():
    message = stun(0x0001, b"1" * 12, "ab:cd")
    assert is_stun(message) and stun_username(message) == "ab:cd"
    assert not is_stun(b"\x80" + message[1:])
    assert stun_username(stun(0x0001, b"1" * 12)) is None


def test_only_so_many_transactions_are_kept():
    routes: IcePortRoutes[str] = IcePortRoutes(max_transactions=2)
    routes.add("ufA", "a")
    for i in range(3):
        routes.sent("a", stun(0x0001, bytes([i]) * 12, "x:ufA"))
    assert routes.route(stun(0x0101, b"\0" * 12), PEER) is None  # the oldest, forgotten
    assert routes.route(stun(0x0101, b"\2" * 12), PEER) == "a"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def port_node() -> AsyncIterator[NodeServer]:
    server = NodeServer(
        NodeConfig(port=0, api_secret=SECRET, dev=True, max_cpu=100.0, ice_port=_free_udp_port())
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _candidate_ports(sdp: str) -> set[int]:
    return {int(m) for m in re.findall(r"a=candidate:\S+ \d+ udp \d+ \S+ (\d+) typ", sdp)}


@pytest.mark.parametrize("batched", [True, False], ids=["sendmmsg", "sendto"])
async def test_every_participant_talks_to_the_one_port(
    port_node: NodeServer, batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rtc, "BATCHED_SENDS", batched)
    port = port_node.config.ice_port
    made: list[CascadeClient] = []

    async def join(identity: str) -> CascadeClient:
        client = CascadeClient(port_node.url)
        await client.connect()
        made.append(client)
        await client.join("one-port", token("one-port", identity))
        return client

    try:
        pub = await join("alice")
        await pub.publish([PatternVideoTrack(320, 240, periodic_keyframes=False), ToneAudioTrack()])
        subs = [await join(f"bob{i}") for i in range(3)]
        for sub in subs:
            await sub.wait_for_tracks(1, "video", timeout=20)
            await sub.wait_for_tracks(1, "audio", timeout=20)
        # the node offered only the shared port, to everyone
        sdps = [pub._publish_pc.remoteDescription.sdp] + [  # type: ignore[union-attr]
            s._subscribe_pc.remoteDescription.sdp  # type: ignore[union-attr]
            for s in subs
        ]
        assert all(_candidate_ports(sdp) == {port} for sdp in sdps)
        stats = port_node.stats()["ice_port"]
        assert isinstance(stats, dict)
        assert (stats["port"], stats["transports"]) == (port, 4)
        if batched:  # a video packet's three copies leave in one call
            assert stats["batched_datagrams"] > 2.5 * stats["sendmmsg_calls"] > 0
        else:
            assert stats["batched_datagrams"] == stats["sendmmsg_calls"] == 0
        assert stats["batch_dropped"] == 0

        # a stranger's datagrams: garbage, a check for nobody, a forged check naming a
        # participant's transport, media from an address nobody has learnt
        ufrag = pub._publish_pc.remoteDescription.sdp.split("a=ice-ufrag:")[1].split()[0]  # type: ignore[union-attr]
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.bind(("127.0.0.1", 0))
        for data in (
            os.urandom(200),
            stun(0x0001, os.urandom(12), "nobody:x"),
            stun(0x0001, os.urandom(12), f"{ufrag}:x"),
            b"\x80" + os.urandom(300),
            b"\x16\xfe\xfd" + os.urandom(100),
        ):
            for _ in range(20):
                stranger.sendto(data, ("127.0.0.1", port))
        stranger.close()
        videos = [t for s in subs for t in s.tracks.values() if t.kind == "video"]
        before = [t.frames_decoded for t in videos]
        await asyncio.sleep(1.5)
        assert all(t.frames_decoded > b + 10 for t, b in zip(videos, before, strict=True))
        assert all(t.stats()["decode_errors"] == 0 for s in subs for t in s.tracks.values())
        # garbage and the check for nobody; the rest went to the transport the forged
        # check named, which dropped it
        assert port_node.stats()["ice_port"]["unroutable"] >= 40  # type: ignore[index]

        # leaving gives the transports' routes back
        for sub in subs:
            await sub.close()
        for _ in range(50):
            if port_node.stats()["ice_port"]["transports"] == 1:  # type: ignore[index]
                break
            await asyncio.sleep(0.1)
        assert port_node.stats()["ice_port"]["transports"] == 1  # type: ignore[index]
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


async def test_a_taken_port_fails_the_start() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        server = NodeServer(NodeConfig(port=0, api_secret=SECRET, ice_port=taken.getsockname()[1]))
        with pytest.raises(OSError):
            await server.start()
        await server.stop()


async def test_a_ufrag_taken_on_the_port_is_replaced_before_the_sdp(
    port_node: NodeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aioice's 4-character ufrags collide among a few hundred transports; on the shared
    port a node connection gets a longer one, and a fresh one if that is taken."""
    fresh = iter(["AAAAAAAA", "AAAAAAAA", "BBBBBBBB"])
    monkeypatch.setattr(rtc, "_new_ufrag", lambda: next(fresh, "CCCCCCCC"))
    made: list[CascadeClient] = []
    try:
        for identity in ("alice", "bob"):
            client = CascadeClient(port_node.url)
            await client.connect()
            made.append(client)
            await client.join("ufrags", token("ufrags", identity))
        pub, sub = made
        await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        (track,) = await sub.wait_for_tracks(1, "video", timeout=20)
        assert track.stats()["decode_errors"] == 0

        def ufrag(pc: object) -> str:
            sdp = pc.remoteDescription.sdp  # type: ignore[attr-defined]
            return str(sdp.split("a=ice-ufrag:")[1].split()[0])

        assert ufrag(pub._publish_pc) == "AAAAAAAA"
        assert ufrag(sub._subscribe_pc) == "BBBBBBBB"
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_one_port_per_ice_address() -> None:
    ports = await rtc.open_shared_ice_ports(["127.0.0.1", "::1"], 0)
    try:
        numbers = {a: p.address[1] for a, p in ports.by_address.items()}
        assert set(numbers) == {"127.0.0.1", "::1"} and all(numbers.values())
        assert ports.port == numbers["127.0.0.1"]
    finally:
        ports.close()
    # a fixed port must be free on every address
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as taken:
        taken.bind(("::1", 0))
        number = taken.getsockname()[1]
        with pytest.raises(OSError):
            await rtc.open_shared_ice_ports(["127.0.0.1", "::1"], number)
