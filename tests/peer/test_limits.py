"""The node edge's limits (docs/limits.md), each hit while a call is in progress."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from peer.client import CascadeClient
from peer.limits import EdgeLimits, TokenBuckets
from peer.media import PatternVideoTrack
from peer.server import NodeConfig, NodeServer
from tests.conftest import SECRET, token
from tests.peer.raw_ws import RawWebSocket

LIMITS = EdgeLimits(
    max_ws_connections=11,
    max_ws_connections_per_ip=4,
    http_header_timeout=1.0,
    ws_message_timeout=1.0,
    join_rate=0.01,
    join_burst=3,
)


@pytest.fixture
async def call() -> AsyncIterator[tuple[NodeServer, object]]:
    """A node with small limits and a call on it (publisher and subscriber on 127.0.0.1)."""
    node = NodeServer(NodeConfig(port=0, api_secret=SECRET, dev=True, max_cpu=100.0, limits=LIMITS))
    await node.start()
    pub, sub = CascadeClient(node.url), CascadeClient(node.url)
    try:
        await pub.connect()
        await pub.join("call", token("call", "alice"))
        await pub.publish([PatternVideoTrack(160, 120)])
        await sub.connect()
        await sub.join("call", token("call", "bob"))
        (track,) = await sub.wait_for_tracks(1, "video")
        yield node, track
    finally:
        await pub.close()
        await sub.close()
        await node.stop()


async def still_flowing(track) -> None:
    frames = track.frames_decoded
    for _ in range(100):
        await asyncio.sleep(0.05)
        if track.frames_decoded > frames + 5:
            return
    raise AssertionError("the call stopped")


def test_token_buckets_refill_and_forget() -> None:
    buckets = TokenBuckets(rate=1.0, burst=2, idle=10.0)
    assert buckets.allow("a", 0.0) and buckets.allow("a", 0.0)
    assert not buckets.allow("a", 0.5)
    assert buckets.allow("a", 1.6)
    buckets.expire(30.0)
    assert len(buckets) == 0


async def test_websocket_connections_per_ip_and_total(call) -> None:
    node, track = call
    host, port = node.config.host, node.config.port
    held = []
    for source in ("127.0.0.2", "127.0.0.3"):
        for _ in range(4):
            held.append(await RawWebSocket.connect(host, port, source=source))
        ws, status = await RawWebSocket.try_connect(host, port, source=source)
        assert ws is None and status == 429
    # 2 (the call) + 8 held + 1 = the total limit of 11.
    held.append(await RawWebSocket.connect(host, port, source="127.0.0.4"))
    ws, status = await RawWebSocket.try_connect(host, port, source="127.0.0.4")
    assert ws is None and status == 503
    limits = node.stats()["limits"]
    assert limits["ws_refused_per_ip_limit"] == 2 and limits["ws_refused_total_limit"] == 1
    await still_flowing(track)
    for ws in held:
        ws.close()
    for _ in range(100):
        again, _ = await RawWebSocket.try_connect(host, port, source="127.0.0.4")
        if again is not None:
            again.close()
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("closed connections were not released")


async def test_half_sent_http_headers_time_out(call) -> None:
    node, track = call
    reader, writer = await asyncio.open_connection(
        node.config.host, node.config.port, local_addr=("127.0.0.5", 0)
    )
    writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n")
    with contextlib.suppress(ConnectionError):
        for _ in range(10):  # dribble a header byte now and then; never finish
            await asyncio.sleep(0.3)
            writer.write(b"X")
            await writer.drain()
    try:
        rest = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        rest = b""
    assert rest == b""  # closed by the node, with no response
    writer.close()
    assert node.stats()["limits"]["http_header_timeouts"] == 1
    await still_flowing(track)


async def test_dribbled_websocket_message_times_out(call) -> None:
    node, track = call
    raw = await RawWebSocket.connect(node.config.host, node.config.port, source="127.0.0.6")
    frame = RawWebSocket.frame(b'{"type": "ping", "pad": "' + b"x" * 200 + b'"}')
    raw.writer.write(frame[:20])
    code = None
    for i in range(20, 60):  # one byte every 0.2 s
        raw.writer.write(frame[i : i + 1])
        await asyncio.sleep(0.2)
        if raw.reader.at_eof() or raw.reader._buffer:  # the node spoke: read its close
            break
    code = await raw.close_code()
    assert code == 1008
    raw.close()
    assert node.stats()["limits"]["ws_message_timeouts"] == 1
    await still_flowing(track)


async def test_joins_are_rate_limited_per_source(call) -> None:
    node, track = call
    raw = await RawWebSocket.connect(node.config.host, node.config.port, source="127.0.0.7")
    codes = []
    for i in range(5):
        room = f"r{i}"
        await raw.send_text(json.dumps({"type": "join", "room": room, "token": "bad", "id": i}))
        _, payload = await raw.receive()
        codes.append(json.loads(payload)["code"])
    assert codes == ["bad_token"] * 3 + ["rate_limited"] * 2
    assert node.stats()["limits"]["joins_rate_limited"] == 2
    raw.close()
    await still_flowing(track)
