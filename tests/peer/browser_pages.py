"""Run inside a private network namespace by test_browser.py: nodes started in this
process, headless Chromium pages joining one room through the demo page in sequence,
then a report of which page decodes which participant's video.

    python -m tests.peer.browser_pages --pages 4 --gap 0.5 [--nodes 2] [--rejoin]

Prints one JSON object: per page, frames decoded per remote participant name, and the
tile captions the page shows.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from playwright.async_api import Browser, Page, async_playwright

from dht import Directory, NodeIdentity
from peer.overlay import Overlay
from peer.server import NodeConfig, NodeServer
from peer.supervisor import Supervisor
from tests.peer.browser_scenario import CHROMIUM_ARGS

DEBUG = bool(os.environ.get("CASCADE_DEBUG"))
SECRET = "browser-test-secret-0123456789abcdef"
_STARTED = time.monotonic()


def dump_tasks_later(seconds: float) -> None:
    """After ``seconds``, print every pending asyncio task's stack to stderr (a daemon
    timer): a scenario killed at its timeout shows where it was waiting."""

    def dump() -> None:
        tasks = [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]
        progress(f"still running: {len(tasks)} pending asyncio tasks")
        for task in tasks:
            try:
                task.print_stack(limit=6, file=sys.stderr)
            except Exception as exc:  # the loop keeps running meanwhile
                print(f"{task!r}: {exc!r}", file=sys.stderr)

    timer = threading.Timer(seconds, dump)
    timer.daemon = True
    timer.start()


async def report_loop_lag(threshold: float = 1.0) -> None:
    """Print on stderr each time this process's event loop (the nodes' loop) woke up more
    than ``threshold`` seconds late: a loaded machine starves it."""
    while True:
        asked = time.monotonic()
        await asyncio.sleep(0.1)
        late = time.monotonic() - asked - 0.1
        if late > threshold:
            progress(f"event loop {late:.1f} s late")


def progress(step: str) -> None:
    """One timestamped line on stderr: a scenario that times out shows how far it got."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {step}", file=sys.stderr, flush=True)


# Frames decoded per remote participant (by the name the page learnt for it).
FRAMES_BY_NAME = """async () => {
  const s = window.cascade;
  if (!s.subPc) return {};
  const out = {};
  (await s.subPc.getStats()).forEach((r) => {
    if (r.type !== "inbound-rtp" || r.kind !== "video") return;
    const consumer = s.byMid.get(r.mid);
    if (!consumer) return;
    const name = s.names.get(consumer.participant_id) || consumer.participant_id;
    out[name] = (out[name] || 0) + (r.framesDecoded || 0);
  });
  return out;
}"""

# What a page knows of its own connection (for failure output).
PAGE_STATE = """() => { const s = window.cascade; return {
  node: s.node, participant: s.participantId, moves: s.moves,
  status: document.getElementById('status').textContent,
  pub: s.pubPc && s.pubPc.connectionState, sub: s.subPc && s.subPc.connectionState,
  mids: [...s.byMid.keys()] }; }"""

# Tags every video tile, then lists the tags: a tile kept across a move keeps its tag.
TAG_TILES = """() => [...document.querySelectorAll('figure[data-kind=video]')].map((f) => {
  f.dataset.tag ??= Math.random().toString(36).slice(2); return f.dataset.tag; })"""

CAPTIONS = """() => [...document.querySelectorAll('figure[data-kind=video] figcaption')]
  .map((c) => c.textContent)"""


async def start_overlay(count: int, workers: int = 1) -> tuple[list[NodeServer], list[Overlay]]:
    """``count`` nodes (ports 8080, 8081, ...) in one DHT, each in its own region; the first
    runs ``workers`` media worker processes (pages spread over them: watermark 0)."""
    servers: list[NodeServer] = []
    overlays: list[Overlay] = []
    bootstrap: list[tuple[str, int]] = []
    for i in range(count):
        identity = NodeIdentity.generate()
        config = NodeConfig(
            port=8080 + i,
            api_secret=SECRET,
            dev=True,
            relay_port=0,
            identity=identity.private_key,
        )
        server = (
            Supervisor(config, workers, watermark=0.0)
            if i == 0 and workers > 1
            else NodeServer(config)
        )
        await server.start()
        directory = Directory(
            identity, f"r{i}", host="127.0.0.1", port=0, bootstrap=bootstrap, ttl=6.0
        )
        overlay = Overlay(server, directory, interval=0.5)
        await overlay.start()
        bootstrap = bootstrap or [directory.address]
        servers.append(server)
        overlays.append(overlay)
    return servers, overlays


async def join_page(
    browser: Browser, url: str, name: str, room: str, region: str | None = None
) -> Page:
    progress(f"{name} joins on {url}")
    page = await browser.new_page(viewport={"width": 1000, "height": 700})
    if DEBUG:

        def trace(ws: Any) -> None:
            ws.on("framesent", lambda f: progress(f"{name} > {str(f)[:200]}"))
            ws.on("framereceived", lambda f: progress(f"{name} < {str(f)[:200]}"))

        page.on("websocket", trace)
    await page.goto(url)
    refused = {
        f"{srv.url[-4:]} {k}": v
        for srv in SERVERS
        for k, v in srv.stats()["limits"].items()
        if v and k != "relay_pending"
    }
    progress(f"{name} loaded the page (nodes' limits hit so far: {refused})")
    await page.fill("#room", room)
    await page.fill("#name", name)
    if region:
        await page.fill("#region", region)
    await page.click("#join-button")
    progress(f"{name} clicked join")
    await page.wait_for_function("window.cascade.published !== undefined", timeout=30000)
    progress(f"{name} published")
    return page


async def leave_page(page: Page) -> None:
    await page.click("#leave-button")
    await page.wait_for_function("window.cascade.sig === null", timeout=10000)


async def rejoin_page(page: Page) -> None:
    await page.click("#join-button")
    await page.wait_for_function("window.cascade.published !== undefined", timeout=30000)


def missing(frames: dict[str, dict[str, int]], expect: dict[str, set[str]]) -> list[str]:
    """``"viewer<-publisher"`` for each expected video a page does not decode."""
    return [
        f"{name}<-{other}"
        for name, others in sorted(expect.items())
        for other in sorted(others)
        if frames.get(name, {}).get(other, 0) <= 10
    ]


def media_summary(servers: list[NodeServer]) -> str:
    """Per node and participant: packets, keyframes and PLIs of each video producer, and
    packets of each video consumer (with its producer, PLIs and replayed keyframes)."""
    lines = []
    for server in servers:
        for members in server.stats()["rooms"].values():
            for pid, m in members.items():
                prods = [
                    f"{k[-4:]}:{v['packets']}/kf{v['keyframes']}/pli{v['plis']}"
                    for k, v in m.get("producers", {}).items()
                    if v["kind"] == "video"
                ]
                cons = [
                    f"{v['producer_id'][-4:]}:{v['packets']}/pli{v['plis']}"
                    f"/kf{v['keyframes_replayed']}"
                    for v in m.get("consumers", {}).values()
                    if v["kind"] == "video"
                ]
                lines.append(f"{server.url[-4:]} {m['name']} ({pid}) pub {prods} sub {cons}")
    return "\n".join(lines)


SERVERS: list[NodeServer] = []


async def wait_all_decode(
    pages: dict[str, Page], expect: dict[str, set[str]], timeout: float
) -> dict[str, dict[str, int]]:
    """Poll until every page decodes > 10 frames of each expected name, or time out."""
    deadline = time.monotonic() + timeout
    frames: dict[str, dict[str, int]] = {}
    while True:
        for name, page in pages.items():
            frames[name] = await page.evaluate(FRAMES_BY_NAME)
        if not missing(frames, expect) or time.monotonic() > deadline:
            progress(f"decoding: missing {missing(frames, expect)} {frames}")
            if missing(frames, expect):
                print(media_summary(SERVERS), file=sys.stderr)
                for name, page in pages.items():
                    seen = await page.evaluate(PAGE_STATE)
                    print(f"{name}: {json.dumps(seen)[:600]}", file=sys.stderr)
            return frames
        await asyncio.sleep(0.25)


async def live_streams(pages: dict[str, Page], timeout: float, want: int) -> dict[str, int]:
    """Per page, how many remote videos decode new frames (sampled 2 s apart); polls
    until every page has ``want`` of them or ``timeout`` passes. Does not rely on names."""
    deadline = time.monotonic() + timeout
    while True:
        before = {n: await p.evaluate(FRAMES_BY_NAME) for n, p in pages.items()}
        await asyncio.sleep(2.0)
        after = {n: await p.evaluate(FRAMES_BY_NAME) for n, p in pages.items()}
        live = {
            n: sum(1 for k, v in after[n].items() if v - before[n].get(k, 0) >= 2) for n in pages
        }
        if all(v >= want for v in live.values()) or time.monotonic() > deadline:
            progress(f"live streams per page: {live}")
            return live


async def run(
    pages_n: int,
    gap: float,
    nodes_n: int,
    rejoin: bool,
    screenshot: str | None,
    region_hint: str | None = None,
    drain: bool = False,
    workers: int = 1,
) -> dict:
    servers: list[NodeServer] = []
    overlays: list[Overlay] = []
    if nodes_n == 1:
        server = NodeServer(NodeConfig(port=8080, api_secret=SECRET, dev=True))
        await server.start()
        servers.append(server)
    else:
        servers, overlays = await start_overlay(nodes_n, workers)
    SERVERS[:] = servers
    lag = asyncio.ensure_future(report_loop_lag())
    result: dict[str, Any] = {}
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
            )
            pages: dict[str, Page] = {}
            for i in range(pages_n):
                name = f"page{i + 1}"
                url = servers[i % len(servers)].url
                pages[name] = await join_page(browser, url, name, "demo", region_hint)
                await asyncio.sleep(gap)
            names = set(pages)
            expect = {n: names - {n} for n in names}
            if isinstance(servers[0], Supervisor):  # pages per worker of the first node
                result["worker_pages_joined"] = [len(h.conns) for h in servers[0].pool.workers]
            result["frames"] = await wait_all_decode(pages, expect, 30)
            result["missing"] = missing(result["frames"], expect)
            result["live"] = await live_streams(pages, 20, pages_n - 1)
            if isinstance(servers[0], Supervisor):  # pages per worker of the first node
                result["worker_pages"] = [len(h.conns) for h in servers[0].pool.workers]
            result["captions"] = {n: await p.evaluate(CAPTIONS) for n, p in pages.items()}
            if screenshot:
                await pages[f"page{pages_n}"].screenshot(path=screenshot)
            if drain:
                # The last node drains: its pages move to another node and keep their tiles.
                tags = {n: await p.evaluate(TAG_TILES) for n, p in pages.items()}
                drained = servers[-1]
                moving = [n for i, n in enumerate(pages) if i % len(servers) == len(servers) - 1]
                drained.start_drain()
                await asyncio.wait_for(drained.drained.wait(), 60)
                result["drain"] = drained.drain_status()
                result["frames_after_drain"] = await wait_all_decode(pages, expect, 30)
                result["missing_after_drain"] = missing(result["frames_after_drain"], expect)
                result["live_after_drain"] = await live_streams(pages, 25, pages_n - 1)
                after = {n: await p.evaluate(TAG_TILES) for n, p in pages.items()}
                result["tiles_kept"] = {n: set(tags[n]) <= set(after[n]) for n in pages}
                result["tile_counts"] = {n: [len(tags[n]), len(after[n])] for n in pages}
                result["moves"] = {
                    n: await pages[n].evaluate("window.cascade.moves") for n in moving
                }
                if screenshot:
                    await pages[moving[0]].screenshot(path=screenshot)
            if rejoin:
                first = pages["page1"]
                await leave_page(first)
                progress("page1 left")
                await asyncio.sleep(1.0)
                await rejoin_page(first)
                progress("page1 rejoined")
                result["frames_after_rejoin"] = await wait_all_decode(pages, expect, 30)
                result["missing_after_rejoin"] = missing(result["frames_after_rejoin"], expect)
                result["live_after_rejoin"] = await live_streams(pages, 25, pages_n - 1)
            result["nodes_used"] = {
                n: await p.evaluate("window.cascade.node") for n, p in pages.items()
            }
            result["status"] = {
                n: await p.evaluate("document.getElementById('status').textContent")
                for n, p in pages.items()
            }
            result["expect"] = {n: sorted(v) for n, v in expect.items()}
            result["node_stats"] = [s.stats() for s in servers]
            await browser.close()
    finally:
        lag.cancel()
        for overlay in overlays:
            await overlay.stop()
        for server in servers:
            await server.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--gap", type=float, default=0.5)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--rejoin", action="store_true")
    parser.add_argument("--screenshot")
    parser.add_argument("--region-hint", help="region every page asks for (nodes are r0, r1, ...)")
    parser.add_argument("--drain", action="store_true", help="drain the last node, then check")
    parser.add_argument("--workers", type=int, default=1, help="media workers of the first node")
    args = parser.parse_args()
    if os.environ.get("CASCADE_LOG"):  # e.g. INFO: the nodes' log lines, timestamped
        logging.basicConfig(
            level=os.environ["CASCADE_LOG"], format="%(relativeCreated)8.0fms %(name)s %(message)s"
        )
    if os.environ.get("CASCADE_TASK_DUMP_AFTER"):
        dump_tasks_later(float(os.environ["CASCADE_TASK_DUMP_AFTER"]))
    result = asyncio.run(
        run(
            args.pages,
            args.gap,
            args.nodes,
            args.rejoin,
            args.screenshot,
            args.region_hint,
            args.drain,
            args.workers,
        )
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
