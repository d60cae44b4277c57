"""The scale-out signal on live nodes: a full region sends its next client to the nearest
region, its reporting node POSTs a signed notification, and adding a node clears it."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from peer.client import CascadeClient
from peer.media import PatternVideoTrack
from peer.scaling import ScalePolicy, verify_notification
from tests.conftest import token
from tests.peer.test_placement_nodes import start, wait_for_nodes

FAST = ScalePolicy(hold=1.0, spill_window=2.0)


async def test_full_region_spills_raises_signed_scale_out_then_clears():
    received: list[tuple[bytes, dict[str, str]]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]

    nodes = []
    clients: list[CascadeClient] = []
    try:
        nodes.append(await start("eu", [], (48.9, 2.4), scale=FAST))
        seed = [nodes[0][1].directory.address]
        nodes.append(
            await start("ap", seed, (35.7, 139.7), max_consumers=4, scale=FAST, webhook=hook_url)
        )
        (eu, _), (ap1, ap1_overlay) = nodes
        await wait_for_nodes(ap1_overlay, 2)

        async def client(url: str, who: str) -> CascadeClient:
            c = CascadeClient(url)
            clients.append(c)
            await c.connect()
            await c.join("big", token("big", who))
            return c

        pub = await client(ap1.url, "pub")
        await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        for i in range(3):
            viewer = await client(ap1.url, f"v{i}")
            await viewer.wait_for_tracks(1, "video", timeout=20)
        await asyncio.sleep(1.5)  # the node's load is sampled once a second
        late = await client(ap1.url, "late")
        assert late.url == eu.url  # no headroom left in ap: the nearest region
        assert late.redirects[0]["reason"] == "open_nearest_region"
        await late.wait_for_tracks(1, "video", timeout=20)  # relayed from ap

        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.1)
        body, headers = received[0]
        key = ap1.relay_public_key
        assert verify_notification(body, headers, key)
        first = json.loads(body)
        assert (first["region"], first["signal"]) == ("ap", "scale_out")
        assert first["spilled"] >= 1
        overlay_view = ap1_overlay.describe()
        assert overlay_view["regions"]["ap"]["signal"] == "scale_out"  # type: ignore[index]

        # A second ap node: capacity returns, the spill ages out, the signal clears.
        nodes.append(await start("ap", seed, (1.35, 103.8), scale=FAST))
        for _ in range(150):
            if json.loads(received[-1][0])["signal"] != "scale_out":
                break
            await asyncio.sleep(0.1)
        signals = [json.loads(b)["signal"] for b, _ in received]
        # Cleared: steady, or straight to scale-in (one ap node could now be drained).
        assert signals[0] == "scale_out" and signals[-1] in ("steady", "scale_in"), signals
        assert all(verify_notification(b, h, key) for b, h in received)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        for server, overlay in reversed(nodes):
            await overlay.stop()
            await server.stop()
        await runner.cleanup()
