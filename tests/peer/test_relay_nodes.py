"""Two real nodes joined by a real QUIC relay link: subscribers on B decode a publisher on A."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from peer.client import CascadeClient
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.server import NodeConfig, NodeServer
from tests.conftest import SECRET, token


@pytest.fixture
async def two_nodes() -> AsyncIterator[tuple[NodeServer, NodeServer]]:
    a = NodeServer(NodeConfig(port=0, api_secret=SECRET, max_cpu=100.0, relay_port=0))
    b = NodeServer(NodeConfig(port=0, api_secret=SECRET, max_cpu=100.0, relay_port=0))
    a.config.relay_peers.add(b.relay_public_key)
    b.config.relay_peers.add(a.relay_public_key)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await b.stop()
        await a.stop()


async def connect(node: NodeServer, room: str, identity: str, **kw: object) -> CascadeClient:
    client = CascadeClient(node.url, **kw)  # type: ignore[arg-type]
    await client.connect()
    await client.join(room, token(room, identity))
    return client


async def pull_all(a: NodeServer, b: NodeServer, room: str, producers: list[dict]) -> None:
    assert a.relay is not None
    host, port = a.relay.address
    for p in producers:
        await b.pull_remote_producer(room, a.relay_public_key, host, port, p["producer_id"])


async def test_ten_subscribers_on_b_decode_publisher_on_a_over_one_flow(two_nodes):
    a, b = two_nodes
    clients: list[CascadeClient] = []
    try:
        pub = await connect(a, "span", "alice")
        clients.append(pub)
        producers = await pub.publish(
            [
                PatternVideoTrack(320, 240, bitrate=500_000, periodic_keyframes=False),
                ToneAudioTrack(),
            ]
        )
        first = await connect(b, "span", "sub0")
        clients.append(first)
        await pull_all(a, b, "span", producers)
        (track,) = await first.wait_for_tracks(1, "video", timeout=20)
        assert (track.width, track.height) == (320, 240)
        await first.wait_for_tracks(1, "audio", timeout=20)

        assert b.relay is not None
        (link,) = b.relay._links.values()
        flows = link.producers
        assert set(flows) == {p["producer_id"] for p in producers}

        async def link_rate(seconds: float) -> float:
            before = sum(rp.stats.bytes for rp in flows.values())
            await asyncio.sleep(seconds)
            return (sum(rp.stats.bytes for rp in flows.values()) - before) / seconds

        await asyncio.sleep(1.0)
        one = await link_rate(4.0)
        for i in range(1, 10):
            clients.append(await connect(b, "span", f"sub{i}"))
        for c in clients[1:]:
            (t,) = await c.wait_for_tracks(1, "video", timeout=20)
            assert (t.width, t.height) == (320, 240)
        await asyncio.sleep(2.0)
        ten = await link_rate(4.0)
        # Still one flow per producer: the link carries the same bytes for 10 subscribers as for 1
        # (ten flows would be 10x; the margin absorbs a publisher slowed by a loaded machine).
        assert set(link.producers) == set(flows)
        assert abs(ten - one) / one < 0.25, (one, ten)
        for c in clients[1:]:
            for t in c.tracks.values():
                assert t.stats()["decode_errors"] == 0
        assert a.stats()["codec_instances"] == 0 and b.stats()["codec_instances"] == 0
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_origin_producer_closing_reaches_remote_subscribers(two_nodes):
    a, b = two_nodes
    clients: list[CascadeClient] = []
    try:
        pub = await connect(a, "bye", "alice")
        clients.append(pub)
        producers = await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        sub = await connect(b, "bye", "bob")
        clients.append(sub)
        await pull_all(a, b, "bye", producers)
        (track,) = await sub.wait_for_tracks(1, "video", timeout=20)
        await pub.unpublish(producers[0]["producer_id"])
        await sub.wait_event(
            "producer_removed", producer_id=producers[0]["producer_id"], timeout=10
        )
        for _ in range(100):
            if track.ended:
                break
            await asyncio.sleep(0.05)
        assert track.ended
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_unauthorised_node_cannot_pull(two_nodes):
    a, b = two_nodes
    a.config.relay_peers.clear()  # A no longer knows B
    pub = await connect(a, "deny", "alice")
    try:
        producers = await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(pull_all(a, b, "deny", producers), 15)
        assert "deny" not in b.node.routers or not b.node.routers["deny"].producers
        assert info.type.__name__ in (
            "RelayRefused",
            "SubscribeError",
            "RelayError",
            "TimeoutError",
        )
    finally:
        await pub.close()


@pytest.fixture
async def impaired_nodes(two_nodes):
    from tests.impairment import Impairment, ImpairmentProxy

    a, b = two_nodes
    assert a.relay is not None
    proxy = ImpairmentProxy(
        a.relay.address,
        up=Impairment(delay=0.02, loss=0.02, seed=11),
        down=Impairment(delay=0.02, loss=0.02, seed=12),
    )
    await proxy.start()
    yield a, b, proxy
    proxy.close()


async def pull_via(proxy, a: NodeServer, b: NodeServer, room: str, producers: list[dict]) -> None:
    host, port = proxy.address
    for p in producers:
        await b.pull_remote_producer(room, a.relay_public_key, host, port, p["producer_id"])


async def test_lossy_delayed_link_repaired_and_late_joiner_fast(impaired_nodes):
    a, b, proxy = impaired_nodes  # 2% loss and 20 ms each way (40 ms RTT)
    clients: list[CascadeClient] = []
    try:
        pub = await connect(a, "lossy", "alice")
        clients.append(pub)
        producers = await pub.publish(
            [PatternVideoTrack(320, 240, bitrate=600_000, periodic_keyframes=False)]
        )
        sub = await connect(b, "lossy", "bob")
        clients.append(sub)
        await pull_via(proxy, a, b, "lossy", producers)
        (track,) = await sub.wait_for_tracks(1, "video", timeout=20)
        frames = track.frames_decoded
        await asyncio.sleep(5.0)
        assert proxy.down.dropped > 5  # the link really lost packets
        assert track.stats()["decode_errors"] == 0
        assert track.frames_decoded - frames > 100
        assert b.relay is not None
        (link,) = b.relay._links.values()
        (rp,) = link.producers.values()
        assert rp.stats.repaired > 0
        # A subscriber joining on B now decodes within 1 s + link RTT.
        await asyncio.sleep(1.0)
        late = await connect(b, "lossy", "late")
        clients.append(late)
        (lt,) = await late.wait_for_tracks(1, "video", timeout=10)
        assert lt.first_frame_at is not None
        assert lt.first_frame_at - lt.subscribed_at < 1.0 + 0.04 + 0.1
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_cut_link_detected_reported_and_recovered(impaired_nodes):
    a, b, proxy = impaired_nodes
    proxy.up.loss = proxy.down.loss = 0.0
    clients: list[CascadeClient] = []
    try:
        pub = await connect(a, "cut", "alice")
        clients.append(pub)
        producers = await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        sub = await connect(b, "cut", "bob")
        clients.append(sub)
        await pull_via(proxy, a, b, "cut", producers)
        (track,) = await sub.wait_for_tracks(1, "video", timeout=20)
        pid = producers[0]["producer_id"]
        loop = asyncio.get_running_loop()
        cut_at = loop.time()
        proxy.set_blocked(True)
        await sub.wait_event("producer_state", producer_id=pid, state="interrupted", timeout=6)
        assert loop.time() - cut_at < 4.0
        stalled = track.frames_decoded
        await asyncio.sleep(0.5)
        assert track.frames_decoded - stalled <= 2
        proxy.set_blocked(False)
        await sub.wait_event("producer_state", producer_id=pid, state="live", timeout=15)
        resumed = track.frames_decoded
        for _ in range(100):
            if track.frames_decoded > resumed + 15:
                break
            await asyncio.sleep(0.1)
        assert track.frames_decoded > resumed + 15
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
