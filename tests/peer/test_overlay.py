"""Nodes that find each other through the DHT and relay a shared room automatically."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from dht import Directory, NodeIdentity
from peer.client import CascadeClient
from peer.media import PatternVideoTrack
from peer.overlay import Overlay
from peer.server import NodeConfig, NodeServer
from tests.conftest import SECRET, token


async def start_node(
    region: str, bootstrap: list[tuple[str, int]], interval: float = 0.5
) -> tuple[NodeServer, Overlay]:
    identity = NodeIdentity.generate()
    server = NodeServer(
        NodeConfig(
            port=0, api_secret=SECRET, max_cpu=100.0, relay_port=0, identity=identity.private_key
        )
    )
    await server.start()
    directory = Directory(identity, region, host="127.0.0.1", port=0, bootstrap=bootstrap, ttl=6.0)
    overlay = Overlay(server, directory, interval=interval)
    await overlay.start()
    return server, overlay


async def test_room_spanning_three_nodes_found_via_dht():
    nodes: list[tuple[NodeServer, Overlay]] = []
    clients: list[CascadeClient] = []
    try:
        nodes.append(await start_node("eu", []))
        seed = nodes[0][1].directory.address
        nodes.append(await start_node("us", [seed]))
        nodes.append(await start_node("ap", [seed]))
        (a, _), (b, _), (c, overlay_c) = nodes
        assert sorted(await overlay_c.directory.regions()) == ["ap", "eu", "us"]

        async def client(node: NodeServer, identity: str) -> CascadeClient:
            cl = CascadeClient(node.url)
            await cl.connect()
            await cl.join("world", token("world", identity))
            clients.append(cl)
            return cl

        pub = await client(a, "alice")
        await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        sub_b = await client(b, "bob")
        sub_c = await client(c, "carol")
        for sub in (sub_b, sub_c):
            (track,) = await sub.wait_for_tracks(1, "video", timeout=20)
            assert (track.width, track.height) == (160, 120)
        # B and C each pulled the producer from A over their own relay link.
        for node in (b, c):
            assert node.relay is not None
            assert [link for link in node.relay._links.values() if link.producers]
        hosts = await overlay_c.directory.room_hosts("world")
        assert len(hosts) == 3
    finally:
        await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)
        for server, overlay in reversed(nodes):
            await overlay.stop()
            await server.stop()


@contextlib.asynccontextmanager
async def eu_and_us() -> AsyncIterator[list[tuple[NodeServer, Overlay]]]:
    """Two overlay nodes, eu and us, stopped on exit."""
    nodes: list[tuple[NodeServer, Overlay]] = []
    try:
        nodes.append(await start_node("eu", []))
        nodes.append(await start_node("us", [nodes[0][1].directory.address]))
        yield nodes
    finally:
        for server, overlay in reversed(nodes):
            await overlay.stop()
            await server.stop()


async def test_participants_of_other_nodes_are_listed_and_their_joins_and_leaves_reported():
    clients: list[CascadeClient] = []
    async with eu_and_us() as nodes:
        (a, _), (b, _) = nodes

        async def client(node: NodeServer, identity: str) -> CascadeClient:
            cl = CascadeClient(node.url)
            await cl.connect()
            await cl.join("roster", token("roster", identity), name=identity.title())
            clients.append(cl)
            return cl

        alice = await client(a, "alice")
        bob = await client(b, "bob")
        listed = {p["participant_id"]: p["name"] for p in bob.room_state["participants"]}
        assert listed == {alice.participant_id: "Alice"}
        event = await alice.wait_event("participant_joined", timeout=10)
        assert event["participant"]["name"] == "Bob"
        dave = await client(a, "dave")
        assert dave.participant_id
        joined = await bob.wait_event("participant_joined", timeout=10)
        assert joined["participant"] == {
            "participant_id": dave.participant_id,
            "name": "Dave",
            "node_id": a_node_id(nodes[0][1]),
        }
        await dave.close()
        await bob.wait_event("participant_left", participant_id=dave.participant_id, timeout=10)
        await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)


def a_node_id(overlay: Overlay) -> str:
    return overlay.directory.node_id.hex()


async def test_remote_producers_are_pulled_on_demand_for_explicit_subscribers():
    clients: list[CascadeClient] = []
    async with eu_and_us() as nodes:
        (a, _), (b, _) = nodes
        pub = CascadeClient(a.url)
        clients.append(pub)
        await pub.connect()
        await pub.join("ondemand", token("ondemand", "alice"))
        (video,) = await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        viewer = CascadeClient(b.url)
        clients.append(viewer)
        await viewer.connect()
        for _ in range(50):
            state = await viewer.join("ondemand", token("ondemand", "bob"), auto_subscribe=False)
            if state["producers"]:
                break
            await viewer.leave()
            await viewer.close()
            viewer = CascadeClient(b.url)
            clients.append(viewer)
            await viewer.connect()
            await asyncio.sleep(0.2)
        listed = {p["producer_id"]: p for p in state["producers"]}
        assert listed[video["producer_id"]]["remote"] is True
        await asyncio.sleep(2.0)  # several directory syncs: nothing is relayed unasked
        assert video["producer_id"] not in b.node.routers["ondemand"].producers
        await viewer.subscribe(video["producer_id"])
        (track,) = await viewer.wait_for_tracks(1, "video", timeout=20)
        assert (track.width, track.height) == (160, 120)
        await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)
