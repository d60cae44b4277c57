"""Run inside a private network namespace by test_browser.py: a node, then two
headless Chromium pages on its demo page; the second decodes the first's camera."""

from __future__ import annotations

import asyncio
import json
import sys

from playwright.async_api import async_playwright

from peer.server import NodeConfig, NodeServer

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
]

FRAMES_DECODED = """async () => {
  const pc = window.cascade.subPc;
  if (!pc) return 0;
  let frames = 0;
  (await pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") frames += r.framesDecoded || 0;
  });
  return frames;
}"""


async def main() -> int:
    server = NodeServer(
        NodeConfig(port=8080, api_secret="browser-test-secret-0123456789abcdef", dev=True)
    )
    await server.start()
    result: dict[str, object] = {}
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
            )
            publisher = await browser.new_page()
            viewer = await browser.new_page()
            await publisher.goto(server.url)
            await publisher.fill("#name", "camera")
            await publisher.click("#join-button")
            await publisher.wait_for_function(
                "window.cascade.published !== undefined", timeout=20000
            )
            await viewer.goto(server.url)
            await viewer.fill("#name", "viewer")
            await viewer.uncheck("#publish")
            await viewer.click("#join-button")
            frames = 0
            for _ in range(100):
                frames = await viewer.evaluate(FRAMES_DECODED)
                if frames > 30:
                    break
                await asyncio.sleep(0.2)
            result["frames_decoded"] = frames
            result["video_tiles"] = await viewer.evaluate(
                "document.querySelectorAll('figure[data-kind=video] video').length"
            )
            result["video_width"] = await viewer.evaluate(
                "Math.max(...[...document.querySelectorAll('figure[data-kind=video] video')]"
                ".map(v => v.videoWidth))"
            )
            result["server_codec_instances"] = server.stats()["codec_instances"]
            result["totals"] = server.stats()["totals"]
            result["rooms"] = server.stats()["rooms"]
            result["sub_state"] = await viewer.evaluate(
                "window.cascade.subPc && window.cascade.subPc.connectionState"
            )
            result["status"] = await viewer.evaluate(
                "document.getElementById('status').textContent"
            )
            await browser.close()
    finally:
        await server.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
