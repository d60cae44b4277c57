"""Draining a node: its participants move to other nodes live, their media continues on
the same SDK tracks, and the node ends empty."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from bench.cluster import until
from peer.admin import node_authorization
from peer.client import CascadeClient
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.overlay import Overlay
from peer.server import NodeServer
from tests.conftest import token
from tests.peer.test_placement_nodes import start, wait_for_nodes

PARIS, FRANKFURT = (48.86, 2.35), (50.11, 8.68)


@pytest.fixture
async def two_eu_nodes() -> AsyncIterator[list[tuple[NodeServer, Overlay]]]:
    first = await start("eu", [], PARIS)
    second = await start("eu", [first[1].directory.address], FRANKFURT)
    nodes = [first, second]
    try:
        for _, overlay in nodes:
            await wait_for_nodes(overlay, 2)
        yield nodes
    finally:
        for server, overlay in nodes:
            await overlay.stop()
            await server.stop()


def decoding(client: CascadeClient, publishers: int) -> bool:
    """Every track of ``publishers`` others is live and has decoded frames."""
    live = [t for t in client.tracks.values() if not t.ended and t.frames_decoded > 0]
    return len(live) >= 2 * publishers


async def grows(client: CascadeClient, by: int = 15, timeout: float = 20) -> bool:
    """Every live video track decodes ``by`` more frames."""
    start_counts = {id(t): t.frames_decoded for t in client.tracks.values() if t.kind == "video"}
    return await until(
        lambda: all(
            t.frames_decoded >= start_counts.get(id(t), 0) + by
            for t in client.tracks.values()
            if t.kind == "video" and not t.ended
        ),
        timeout,
    )


async def test_drain_moves_everyone_and_media_continues_on_the_same_tracks(two_eu_nodes):
    (draining, _), (other, _) = two_eu_nodes
    clients: list[CascadeClient] = []
    try:
        # Two rooms spanning both nodes: two participants on the node to drain, one on the other.
        for room in ("standup", "review"):
            for i, server in enumerate((draining, draining, other)):
                client = CascadeClient(server.url)
                await client.connect()
                await client.join(
                    room, token(room, f"{room}-{i}"), name=f"{room}-{i}", follow_placement=False
                )
                # Small video: 6 clients decode 4 streams each in this one process.
                video = PatternVideoTrack(320, 240, 15, 300_000, periodic_keyframes=False)
                await client.publish([video, ToneAudioTrack()])
                clients.append(client)
        assert draining.rooms.participant_count() == 4
        assert await until(lambda: all(decoding(c, 2) for c in clients), 40)
        tracks_before = {id(c): {id(t) for t in c.tracks.values()} for c in clients}
        errors_before = {
            id(t): t.stats()["decode_errors"] for c in clients for t in c.tracks.values()
        }

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            auth = node_authorization(draining.identity, "drain", time.time())
            async with http.post(
                f"{draining.url}/admin/drain", headers={"Authorization": "Bearer nope"}
            ) as refused:
                assert refused.status == 401
                assert (await refused.json())["code"] == "admin_token_not_configured"
            async with http.post(
                f"{draining.url}/admin/drain", headers={"Authorization": auth}
            ) as reply:
                assert reply.status == 200
                assert (await reply.json())["started"] is True

        assert await until(lambda: draining.drained.is_set(), 40)
        assert draining.rooms.participant_count() == 0
        assert draining.drain_status()["disconnected"] == 0
        assert all(c.url == other.url for c in clients)
        assert other.rooms.participant_count() == 6
        assert all(len(c.moves) == (1 if i % 3 < 2 else 0) for i, c in enumerate(clients))

        # Everyone decodes everyone again, on the tracks they had (no track ended).
        assert await until(lambda: all(decoding(c, 2) for c in clients), 30)
        for client in clients:
            assert await grows(client)
            live = [t for t in client.tracks.values() if not t.ended]
            if len(live) != 4 or any(
                t.stats()["decode_errors"] != errors_before[id(t)] for t in live
            ):
                print("BAD", clients.index(client), client.moves)
                for t in client.tracks.values():
                    print("  ", t.source, t.consumer_id, t.stats())
                for e in client.events:
                    print("  ", {k: v for k, v in e.items() if k != "sdp"})
            assert len(live) == 4
            assert {id(t) for t in live} == tracks_before[id(client)]
            for track in live:
                if track.stats()["decode_errors"]:
                    print(
                        "ERR",
                        clients.index(client),
                        client.moves,
                        track.source,
                        track.kind,
                        track.rebinds,
                        track.stats(),
                    )
            for track in live:  # none since the switch
                assert track.stats()["decode_errors"] == errors_before[id(track)], track.stats()
        gaps = [g for c in clients for t in c.tracks.values() if t.kind == "video" for g in t.gaps]
        assert gaps, "moved tracks report their gap"
        print(
            f"media gap after migrate: n={len(gaps)} p50={statistics.median(gaps):.3f}s "
            f"max={max(gaps):.3f}s"
        )
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_a_draining_node_sends_new_joins_elsewhere(two_eu_nodes):
    (draining, _), (other, _) = two_eu_nodes
    draining.start_drain()
    await asyncio.sleep(0.2)
    async with CascadeClient(draining.url) as client:
        await client.join("late", token("late", "late"), follow_placement=False)
        assert client.url == other.url
        assert client.redirects and client.redirects[0]["node_id"] == other.node_key
