"""A node killed without warning (SIGKILL): its publisher fails over to another node by
itself, and its subscribers on other nodes get the media back on the same tracks."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.cluster import Cluster, until
from peer.client import CascadeClient
from peer.media import PatternVideoTrack, ToneAudioTrack


@pytest.fixture
async def three_regions():
    cluster = Cluster()
    cluster.add("eu", "eu", location=(48.86, 2.35))
    cluster.add("us", "us", location=(40.71, -74.0))
    cluster.add("ap", "ap", location=(1.35, 103.8))
    try:
        await cluster.start()
        for node in cluster.nodes:  # everyone sees everyone
            assert await _sees(node, 3)
        yield cluster
    finally:
        cluster.stop()


async def _sees(node, count: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        overlay = await node.get("/overlay")
        if len(overlay["nodes"]) >= count:
            return True
        await asyncio.sleep(0.2)
    return False


def video(client: CascadeClient):
    return [t for t in client.tracks.values() if t.kind == "video" and not t.ended]


async def test_a_killed_publishers_node_fails_over_and_subscribers_get_it_back(three_regions):
    eu, us, ap = three_regions.nodes
    room = "failover"
    publisher = CascadeClient(eu.url)
    watchers = [CascadeClient(us.url), CascadeClient(ap.url)]
    try:
        await publisher.connect()
        joined = await publisher.join(
            room, three_regions.token(room, "pub"), follow_placement=False
        )
        assert {f["node_id"] for f in joined["fallbacks"]} == {us.node_id, ap.node_id}
        await publisher.publish(
            [PatternVideoTrack(320, 240, 15, 300_000, periodic_keyframes=False), ToneAudioTrack()]
        )
        for i, watcher in enumerate(watchers):
            await watcher.connect()
            await watcher.join(room, three_regions.token(room, f"w{i}"), follow_placement=False)
        assert await until(lambda: all(len(video(w)) == 1 for w in watchers), 30)
        assert await until(lambda: all(video(w)[0].frames_decoded > 10 for w in watchers), 30)
        tracks = [video(w)[0] for w in watchers]

        eu.kill()
        killed = time.monotonic()
        # The publisher notices, rejoins through a fallback and republishes.
        assert await until(lambda: len(publisher.moves) == 1, 20)
        assert publisher.url in (us.url, ap.url)
        assert publisher.moves[0]["reason"] == "failover"
        # Each watcher decodes the publisher again, on the track it had.
        frames = [t.frames_decoded for t in tracks]
        assert await until(
            lambda: all(t.frames_decoded > f + 15 for t, f in zip(tracks, frames, strict=True)),
            30,
        )
        back = time.monotonic() - killed
        for watcher, track in zip(watchers, tracks, strict=True):
            assert video(watcher) == [track]
            assert not track.ended
            assert track.gaps, "the outage is reported as a gap"
        print(f"media back after kill: {back:.2f}s, gaps {[round(t.gaps[-1], 2) for t in tracks]}")
        assert publisher.tracks == {}  # never offered its own (dead) streams

        # The surviving nodes stop using the dead node: no relayed producer from it, not
        # listed, within the record lifetime.
        async def forgotten() -> bool:
            for node in (us, ap):
                overlay = await node.get("/overlay")
                if any(n["node_id"] == eu.node_id for n in overlay["nodes"]):
                    return False
            return True

        deadline = time.monotonic() + eu.ttl + 10
        while time.monotonic() < deadline and not await forgotten():
            await asyncio.sleep(0.5)
        assert await forgotten()
    finally:
        await asyncio.gather(publisher.close(), *(w.close() for w in watchers))
