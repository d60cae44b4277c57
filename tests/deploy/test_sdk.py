"""The Python SDK as the README uses it: context manager, token helper, clean close; and
admission that reserves capacity when it admits."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from peer.client import CascadeClient, CascadeError, mint_token
from peer.media import PatternVideoTrack
from peer.server import NodeConfig, NodeServer
from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parents[2]


async def test_close_is_clean_with_warnings_as_errors(node: NodeServer):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "dev",
        "-W",
        "error",
        "-m",
        "tests.deploy.sdk_close_script",
        node.url,
        SECRET,
        "8",
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 150)
    text = err.decode()
    assert proc.returncode == 0, text
    for bad in ("never retrieved", "Unclosed", "pending", "Traceback", "Exception ignored"):
        assert bad not in text, text


async def test_mint_token_and_context_manager(node: NodeServer, monkeypatch):
    monkeypatch.setenv("CASCADE_API_SECRET", SECRET)
    async with CascadeClient(node.url) as client:
        joined = await client.join("ctx", mint_token("ctx", "alice", publish=False))
        assert joined["identity"] == "alice" and not joined["can_publish"]
    assert node.rooms.members("ctx") == []


async def test_concurrent_joins_cannot_overshoot_max_consumers():
    server = NodeServer(NodeConfig(port=0, api_secret=SECRET, max_consumers=1, max_cpu=100.0))
    await server.start()
    clients: list[CascadeClient] = []
    try:
        pub = CascadeClient(server.url)
        clients.append(pub)
        await pub.connect()
        await pub.join("adm", mint_token("adm", "pub", secret=SECRET))
        await pub.publish([PatternVideoTrack(160, 120)])
        viewers = [CascadeClient(server.url) for _ in range(4)]
        clients.extend(viewers)
        await asyncio.gather(*(v.connect() for v in viewers))
        # the node's sampled consumer count is still 0 while all four join at once
        await asyncio.gather(
            *(
                v.join("adm", mint_token("adm", f"v{i}", secret=SECRET))
                for i, v in enumerate(viewers)
            )
        )
        refused = []
        for v in viewers:
            try:
                await v.wait_event("error", timeout=3, code="overloaded")
                refused.append(v)
            except TimeoutError:
                pass
        assert server.node.totals()["consumers"] == 1
        assert len(refused) == 3
        (admitted,) = [v for v in viewers if v not in refused]
        await admitted.wait_for_tracks(1, "video")
        # a consumer that closes frees its place at once
        await admitted.close()
        late = CascadeClient(server.url)
        clients.append(late)
        await late.connect()
        await late.join("adm", mint_token("adm", "late", secret=SECRET), auto_subscribe=False)
        await late.subscribe(pub.producers[0]["producer_id"])
        second = CascadeClient(server.url)
        clients.append(second)
        await second.connect()
        await second.join("adm", mint_token("adm", "second", secret=SECRET), auto_subscribe=False)
        try:
            await second.subscribe(pub.producers[0]["producer_id"])
            raise AssertionError("expected overloaded")
        except CascadeError as exc:
            assert exc.code == "overloaded"
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await server.stop()
