"""Room changes cross nodes over the relay links at once, not at the next directory sync.

The periodic sync of both nodes is switched off (an hour's interval) after one sync each,
so only what a node pushes over a relay link (ROOM_STATE) can tell the other one that a
participant joined or left or a producer appeared; subscribers still decode everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from peer.client import CascadeClient
from peer.media import PatternVideoTrack
from peer.overlay import Overlay
from peer.server import NodeServer
from tests.conftest import token
from tests.peer.test_overlay import start_node as start_overlay_node

NO_SYNC = 3600.0


async def start_node(region: str, bootstrap: list[tuple[str, int]]) -> tuple[NodeServer, Overlay]:
    return await start_overlay_node(region, bootstrap, interval=NO_SYNC)


@contextlib.asynccontextmanager
async def two_unsynced_nodes() -> AsyncIterator[list[tuple[NodeServer, Overlay]]]:
    """Nodes eu and us that know each other from one directory sync, and sync no more."""
    nodes: list[tuple[NodeServer, Overlay]] = []
    try:
        nodes.append(await start_node("eu", []))
        nodes.append(await start_node("us", [nodes[0][1].directory.address]))
        for _, overlay in nodes:  # the last directory sync of the test
            await overlay.sync()
        yield nodes
    finally:
        for server, overlay in reversed(nodes):
            await overlay.stop()
            await server.stop()


async def test_joins_producers_and_leaves_reach_the_other_node_without_a_directory_sync():
    clients: list[CascadeClient] = []

    async def client(node: NodeServer, identity: str) -> CascadeClient:
        cl = CascadeClient(node.url)
        clients.append(cl)
        await cl.connect()
        await cl.join("pushed", token("pushed", identity), name=identity)
        return cl

    async with two_unsynced_nodes() as nodes:
        (a, _), (b, overlay_b) = nodes
        try:
            alice = await client(a, "alice")
            await alice.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
            # Bob's node has never synced since Alice's room opened: it finds her in the
            # directory at his join, and A lets it pull because B introduced itself first.
            bob = await client(b, "bob")
            (first,) = await bob.wait_for_tracks(1, "video", timeout=20)
            assert first.participant_id == alice.participant_id
            await alice.wait_event("participant_joined", timeout=10)
            while "pushed" in overlay_b._refreshing:  # bob's join is fully handled
                await asyncio.sleep(0.05)

            # Dave joins A and publishes: only A's pushes can tell B.
            dave = await client(a, "dave")
            joined = await bob.wait_event("participant_joined", timeout=10)
            assert joined["participant"]["participant_id"] == dave.participant_id
            (video,) = await dave.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
            await bob.wait_event("producer_added", timeout=10)
            tracks = await bob.wait_for_tracks(2, "video", timeout=20)
            assert {t.producer_id for t in tracks} >= {video["producer_id"]}

            await dave.close()
            await bob.wait_event("participant_left", participant_id=dave.participant_id, timeout=10)
            await bob.wait_event("producer_removed", producer_id=video["producer_id"], timeout=10)
        finally:
            await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)
