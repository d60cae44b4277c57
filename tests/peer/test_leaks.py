"""Nothing leaks when participants come and go at awkward moments."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

import psutil
import pytest

from peer.client import CascadeClient
from peer.media import PatternVideoTrack
from peer.server import NodeConfig, NodeServer
from tests.conftest import SECRET, token


def udp_sockets() -> int:
    return len(psutil.Process().net_connections(kind="udp"))


async def settle(read: Callable[[], int], baseline: int, timeout: float = 30.0) -> int:
    """The count once it is back to ``baseline`` (or whatever it is at the timeout)."""
    count = read()
    for _ in range(int(timeout / 0.25)):
        gc.collect()
        count = read()
        if count <= baseline:
            break
        await asyncio.sleep(0.25)
    return count


async def join_and_leave_at_once(rounds: int) -> None:
    node = NodeServer(NodeConfig(port=0, api_secret=SECRET, dev=True, max_cpu=100.0))
    await node.start()
    pub = CascadeClient(node.url)
    watcher = CascadeClient(node.url)
    try:
        await pub.connect()
        await pub.join("room", token("room", "alice"))
        await pub.publish([PatternVideoTrack(160, 120)])
        await watcher.connect()
        await watcher.join("room", token("room", "watcher"))
        (track,) = await watcher.wait_for_tracks(1, "video")
        await asyncio.sleep(0.5)
        baseline = udp_sockets()
        for i in range(rounds):
            c = CascadeClient(node.url)
            await c.connect()
            join = asyncio.ensure_future(c.join("room", token("room", f"churn{i}")))
            if i % 2:
                await join
            # Leave at once or a little later: before, during or after the node's offer.
            await asyncio.sleep(0.003 * (i % 11))
            await c.close()
            await asyncio.gather(join, return_exceptions=True)
        assert await settle(udp_sockets, baseline) <= baseline
        members = {s.participant_id for s in node.rooms.members("room")}
        assert members == {pub.participant_id, watcher.participant_id}
        frames = track.frames_decoded
        await asyncio.sleep(0.5)
        assert track.frames_decoded > frames
    finally:
        await pub.close()
        await watcher.close()
        await node.stop()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_join_and_leave_at_once_leaks_no_udp_socket(loop: str) -> None:
    """Issue 7.3: connect -> join -> leave at once, in a room with a producer, 100 times
    (nodes started from the CLI run on uvloop)."""
    factory = asyncio.new_event_loop
    if loop == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(join_and_leave_at_once(100))
