"""A remote publisher reaches every viewer of the room, whatever the order of joins,
announcements and relay links (two nodes, two publishers on one, a viewer on the other)."""

from __future__ import annotations

import asyncio
import random

from peer.client import CascadeClient
from peer.media import PatternVideoTrack, ToneAudioTrack
from tests.conftest import token
from tests.peer.test_overlay import start_node

ROUNDS = 20
AT_ONCE = 4


async def one_round(eu_url: str, us_url: str, room: str, rng: random.Random) -> dict[str, int]:
    """Two publishers on eu and a viewer on us join ``room`` in random order and spacing;
    returns frames decoded by the viewer per publisher."""
    clients: dict[str, CascadeClient] = {}

    async def join(who: str) -> None:
        await asyncio.sleep(rng.uniform(0, 0.6))
        client = CascadeClient(us_url if who == "viewer" else eu_url)
        clients[who] = client
        await client.connect()
        # Publishers do not subscribe to each other: the viewer is what is measured, and
        # decoding costs this one process's CPU.
        await client.join(room, token(room, who), auto_subscribe=who == "viewer")
        if who != "viewer":
            await client.publish(
                [
                    PatternVideoTrack(160, 120, bitrate=150_000, periodic_keyframes=False),
                    ToneAudioTrack(),
                ]
            )

    started = asyncio.get_running_loop().time()
    order = ["pub1", "pub2", "viewer"]
    rng.shuffle(order)
    try:
        await asyncio.gather(*(join(who) for who in order))
        viewer = clients["viewer"]
        publishers = {clients["pub1"].participant_id, clients["pub2"].participant_id}
        await viewer.wait_for_tracks(2, "video", timeout=20)
        await viewer.wait_for_tracks(2, "audio", timeout=20)
        return {
            t.participant_id: t.frames_decoded
            for t in viewer.tracks.values()
            if t.kind == "video" and t.participant_id in publishers
        }
    except TimeoutError:
        viewer = clients.get("viewer")
        got = (
            {f"{t.kind}:{t.participant_id}": t.frames_decoded for t in viewer.tracks.values()}
            if viewer
            else {}
        )
        return {"timeout": 1, "at": round(asyncio.get_running_loop().time() - started), **got}
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)


async def test_remote_publishers_reach_the_viewer_in_every_join_order():
    rng = random.Random(8)
    eu, eu_overlay = await start_node("eu", [])
    us, us_overlay = await start_node("us", [eu_overlay.directory.address])
    try:
        failures = []
        for batch in range(ROUNDS // AT_ONCE):
            rooms = [f"order-{batch}-{i}" for i in range(AT_ONCE)]
            results = await asyncio.gather(
                *(one_round(eu.url, us.url, room, random.Random(rng.random())) for room in rooms)
            )
            for room, decoded in zip(rooms, results, strict=True):
                if "timeout" in decoded or len(decoded) != 2:
                    failures.append((room, decoded))
        assert failures == [], failures
    finally:
        for server, overlay in ((us, us_overlay), (eu, eu_overlay)):
            await overlay.stop()
            await server.stop()
