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
        producers = await pub.publish([PatternVideoTrack(320, 240, bitrate=500_000), ToneAudioTrack()])
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
        # Still one flow per producer: the link carries the same bytes for 10 subscribers as for 1.
        assert set(link.producers) == set(flows)
        assert abs(ten - one) / one < 0.05, (one, ten)
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
        producers = await pub.publish([PatternVideoTrack(160, 120)])
        sub = await connect(b, "bye", "bob")
        clients.append(sub)
        await pull_all(a, b, "bye", producers)
        (track,) = await sub.wait_for_tracks(1, "video", timeout=20)
        await pub.unpublish(producers[0]["producer_id"])
        await sub.wait_event("producer_removed", producer_id=producers[0]["producer_id"], timeout=10)
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
        producers = await pub.publish([PatternVideoTrack(160, 120)])
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(pull_all(a, b, "deny", producers), 15)
        assert "deny" not in b.node.routers or not b.node.routers["deny"].producers
        assert info.type.__name__ in ("RelayRefused", "SubscribeError", "RelayError", "TimeoutError")
    finally:
        await pub.close()
