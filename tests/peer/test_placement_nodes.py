"""Placement on live nodes: a join on any node is redirected to the node placement
chooses, the SDK follows, and the room's participants see each other."""

from __future__ import annotations

import asyncio

import aiohttp

from dht import Directory, NodeIdentity
from dht.directory import SOFTWARE_VERSION
from peer.client import CascadeClient
from peer.media import PatternVideoTrack
from peer.overlay import Overlay
from peer.placement import PlacementPolicy
from peer.scaling import ScalePolicy
from peer.server import NodeConfig, NodeServer
from peer.supervisor import Supervisor
from tests.conftest import SECRET, token


async def start(
    region: str,
    bootstrap: list[tuple[str, int]],
    location: tuple[float, float],
    *,
    scale: ScalePolicy | None = None,
    webhook: str | None = None,
    watermark: float = 0.30,
    workers: int = 1,
    **config: object,
) -> tuple[NodeServer, Overlay]:
    identity = NodeIdentity.generate()
    node_config = NodeConfig(
        port=0,
        api_secret=SECRET,
        max_cpu=100.0,
        relay_port=0,
        identity=identity.private_key,
        **config,  # type: ignore[arg-type]
    )
    server = Supervisor(node_config, workers) if workers > 1 else NodeServer(node_config)
    await server.start()
    directory = Directory(identity, region, host="127.0.0.1", port=0, bootstrap=bootstrap, ttl=6.0)
    overlay = Overlay(
        server,
        directory,
        interval=0.3,
        location=location,
        scale=scale,
        scale_webhook=webhook,
        placement=PlacementPolicy(watermark=watermark, version=SOFTWARE_VERSION),
    )
    await overlay.start()
    return server, overlay


async def wait_for_nodes(overlay: Overlay, count: int) -> None:
    for _ in range(100):
        if len(overlay.placement_nodes()) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("nodes never appeared in the directory")


async def test_joins_are_redirected_to_the_room_node_of_the_clients_region():
    nodes: list[tuple[NodeServer, Overlay]] = []
    clients: list[CascadeClient] = []
    try:
        nodes.append(await start("eu", [], (48.9, 2.4)))
        seed = [nodes[0][1].directory.address]
        nodes.append(await start("eu", seed, (50.1, 8.7)))
        nodes.append(await start("us", seed, (38.9, -77.0)))
        (eu1, _), (eu2, o2), (us, _) = nodes
        for _, overlay in nodes:
            await wait_for_nodes(overlay, 3)

        async def client(url: str, who: str, **join: object) -> CascadeClient:
            c = CascadeClient(url)
            clients.append(c)
            await c.connect()
            await c.join("meet", token("meet", who), **join)  # type: ignore[arg-type]
            return c

        alice = await client(eu1.url, "alice")
        assert alice.redirects == []
        await alice.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        # The room is announced; a client of eu reaching the other eu node is sent to eu1.
        for _ in range(50):
            if await o2.directory.room_hosts("meet"):
                break
            await asyncio.sleep(0.1)
        bob = await client(eu2.url, "bob")
        assert [r["url"] for r in bob.redirects] == [eu1.url]
        assert bob.redirects[0]["reason"] == "room_in_region"
        # A client reaching the us node with an eu hint is sent there too.
        carol = await client(us.url, "carol", region="eu")
        assert carol.url == eu1.url
        # Without a hint, a client of us stays in us (the room is opened there, relayed).
        dave = await client(us.url, "dave")
        assert dave.redirects == [] and dave.url == us.url
        for viewer in (bob, carol, dave):
            (track,) = await viewer.wait_for_tracks(1, "video", timeout=20)
            assert track.participant_id == alice.participant_id
        # GET /place gives the same ranking to applications that choose themselves.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{us.url}/place", params={"room": "meet", "region": "eu"}) as resp,
        ):
            body = await resp.json()
        assert body["candidates"][0]["url"] == eu1.url
        assert body["candidates"][0]["reason"] == "room_in_region"
        assert {c["region"] for c in body["candidates"]} == {"eu", "us"}
        # A join another node redirected here (hops 1) stays while this node has headroom,
        # although this node's placement would send it on: no ping-pong between two views.
        erin = CascadeClient(eu2.url)
        clients.append(erin)
        await erin.connect()
        reply = await erin.request(
            {"type": "join", "room": "meet", "token": token("meet", "erin"), "hops": 1}
        )
        assert reply["type"] == "joined"
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        for server, overlay in reversed(nodes):
            await overlay.stop()
            await server.stop()


async def test_a_full_node_sends_the_next_participant_to_a_second_node_of_the_region():
    # Watermark 80 % free and 10 consumers per node: two consumers fill a node.
    nodes: list[tuple[NodeServer, Overlay]] = []
    clients: list[CascadeClient] = []
    try:
        nodes.append(await start("eu", [], (48.9, 2.4), watermark=0.8, max_consumers=10))
        seed = [nodes[0][1].directory.address]
        nodes.append(await start("eu", seed, (50.1, 8.7), watermark=0.8, max_consumers=10))
        (eu1, o1), (eu2, _) = nodes
        await wait_for_nodes(o1, 2)

        async def client(url: str, who: str) -> CascadeClient:
            c = CascadeClient(url)
            clients.append(c)
            await c.connect()
            await c.join("fill", token("fill", who), name=who)
            return c

        alice = await client(eu1.url, "alice")
        await alice.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        first_half = [alice]
        for who in ("bob", "dan"):
            viewer = await client(eu1.url, who)
            await viewer.wait_for_tracks(1, "video", timeout=20)
            first_half.append(viewer)
        await asyncio.sleep(1.5)  # load is sampled once a second
        carol = await client(eu1.url, "carol")
        assert carol.url == eu2.url
        assert carol.redirects[0]["reason"] == "open_in_region"
        names = {p["name"] for p in carol.room_state["participants"]}
        assert names == {"alice", "bob", "dan"}
        await carol.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        (track,) = await carol.wait_for_tracks(1, "video", timeout=20)
        assert track.participant_id == alice.participant_id
        for member in first_half:
            others = await member.wait_for_tracks(1 if member is alice else 2, "video", timeout=20)
            assert carol.participant_id in {t.participant_id for t in others}
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        for server, overlay in reversed(nodes):
            await overlay.stop()
            await server.stop()
