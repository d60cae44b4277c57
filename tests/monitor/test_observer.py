"""The dashboard's observer against hostile or failing nodes, and its sans-I/O parts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from monitor import NodeMonitor
from monitor.access import AccessRule, is_loopback, startup_refusal
from monitor.history import HistoryRing
from monitor.ledger import CounterLedger
from monitor.observer import DashboardApp, Observer
from monitor.overview import BadStats, OverlayView, parse_node_stats
from peer.server import NodeConfig, NodeServer
from tests.conftest import SECRET

# -- sans-I/O pieces --------------------------------------------------------------------


def test_ledger_keeps_counts_of_closed_streams():
    ledger: CounterLedger[str] = CounterLedger(2)
    assert ledger.update([("a", "in", (10, 100)), ("b", "in", (5, 50))]) == {"in": [15, 150]}
    # b closed: its last values stay in the total
    assert ledger.update([("a", "in", (20, 200))]) == {"in": [25, 250]}
    assert ledger.update([("c", "out", (1, 1))]) == {"in": [25, 250], "out": [1, 1]}
    assert ledger.update([]) == {"in": [25, 250], "out": [1, 1]}


def test_history_ring_keeps_the_last_samples():
    ring = HistoryRing(3, ("time", "x"))
    for t in range(5):
        ring.append((float(t), t * 10.0))
    assert ring.since() == [(2.0, 20.0), (3.0, 30.0), (4.0, 40.0)]
    assert ring.since(3.0) == [(4.0, 40.0)]
    with pytest.raises(ValueError):
        ring.append((1.0,))


@pytest.mark.parametrize(
    ("host", "token", "public", "refused"),
    [
        ("127.0.0.1", None, False, False),
        ("::1", None, False, False),
        ("localhost", None, False, False),
        ("0.0.0.0", None, False, True),
        ("10.1.2.3", None, False, True),
        ("10.1.2.3", "secret", False, False),
        ("10.1.2.3", None, True, False),
    ],
)
def test_startup_rule(host, token, public, refused):
    assert (startup_refusal(host, token, public) is not None) == refused


def test_access_rule():
    assert is_loopback("127.0.0.2") and not is_loopback("192.0.2.1")
    rule = AccessRule.for_listener("10.0.0.1", "s3cret", False)
    assert rule.allows("Bearer s3cret")
    assert rule.allows(None, "s3cret")
    assert not rule.allows(None)
    assert not rule.allows("Bearer wrong")
    assert not rule.allows("Basic s3cret")
    assert AccessRule.for_listener("127.0.0.1", None, False).allows(None)
    assert not AccessRule.for_listener("10.0.0.1", None, False).allows("Bearer ")


@pytest.mark.parametrize(
    "raw",
    [None, [], "x", 3, {"totals": 1}, {"totals": {}, "rooms": {"r": []}}, {"nope": {}}],
)
def test_garbage_stats_are_refused(raw):
    with pytest.raises(BadStats):
        parse_node_stats(raw)


def test_odd_values_are_neutralised():
    stats = parse_node_stats(
        {
            "totals": {"rooms": "many", "consumers": float("nan"), "participants": True},
            "cpu": 1e400,
            "rooms": {
                "r": {"p": {"name": 7, "producers": {"x": {"kind": "video", "bitrate": "z"}}}}
            },
            "relay": {"links": [{"peer": "ab", "state": "live", "bitrate": 5}, "junk"]},
        }
    )
    assert stats.totals["rooms"] == 0 and stats.totals["consumers"] == 0
    assert stats.cpu == 0
    assert stats.rooms == {"r": {"participants": 1, "producers": 1, "consumers": 0}}
    assert stats.streams[0]["bitrate"] == 0 and stats.streams[0]["name"] == "p"
    assert [link["peer"] for link in stats.links] == ["ab"]


def test_view_alerts_and_missing():
    view = OverlayView()
    rec = [{"node_id": "n1", "region": "eu", "url": "http://x"}]
    view.observe_directory(0.0, [*rec, {"node_id": "n2", "region": "us", "url": "http://y"}])
    good = {
        "totals": {"rooms": 1},
        "node": {"draining": True},
        "counters": {"consumers_refused": 2},
        "relay": {"links": [{"peer": "n2", "state": "interrupted"}]},
    }
    view.observe_poll("n1", 1.0, good)
    view.observe_poll("n2", 1.0, None, "connection refused")
    view.observe_directory(2.0, rec)
    view.observe_overlay(  # the shape of GET /overlay
        {
            "regions": {
                "eu": {"nodes": 1, "capacity": 2000, "used": 1900, "free_fraction": 0.05,
                       "spilled": 3, "signal": "scale_out"},
                "us": {"nodes": 1, "capacity": 2000, "used": 0, "signal": "steady"},
                "xx": "junk",
            }
        }
    )  # fmt: skip
    kinds = {(a["kind"], a["node"]) for a in view.alerts(3.0)}
    assert kinds == {
        ("node_missing", "n2"),
        ("node_draining", "n1"),
        ("admission_refusals", "n1"),
        ("relay_interrupted", "n1"),
        ("scale_out", None),
    }
    snap = view.snapshot(3.0)
    assert {n["id"]: n["status"] for n in snap["nodes"]} == {"n1": "draining", "n2": "missing"}
    assert snap["edges"][0]["source"] == "n2" and snap["edges"][0]["target"] == "n1"
    assert [r["signal"] for r in snap["regions"]] == ["scale_out", "steady"]
    assert snap["regions"][0]["used"] == 1900 and snap["regions"][0]["spilled"] == 3


def test_streams_page_filters_sorts_and_pages():
    view = OverlayView()
    view.observe_directory(0.0, [{"node_id": "n1", "region": "eu", "url": "u"}])
    members = {
        f"p{i}": {"name": f"user{i}", "producers": {f"s{i}": {"kind": "audio", "bitrate": i}}}
        for i in range(120)
    }
    view.observe_poll("n1", 1.0, {"totals": {}, "rooms": {"a": members, "b": {}}})
    page = view.streams(room="a", sort="bitrate", descending=True, offset=50, limit=50)
    assert page["total"] == 120
    assert [r["bitrate"] for r in page["rows"][:2]] == [69, 68]
    assert view.streams(search="user7")["total"] == 11  # user7, user70..79
    assert view.streams(room="b")["total"] == 0


# -- observer against real HTTP servers that misbehave -------------------------------------


@pytest.fixture
async def bad_nodes() -> AsyncIterator[dict[str, str]]:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>not stats</html>" * 100)

    async def wrong_json(request: web.Request) -> web.Response:
        return web.json_response({"totals": "nope", "rooms": [1, 2]})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(4)
        return web.json_response({})

    async def huge_history(request: web.Request) -> web.Response:
        return web.json_response({"fields": ["time"], "samples": "x"})

    app = web.Application()
    app.router.add_get("/garbage/stats", garbage)
    app.router.add_get("/garbage/stats/history", garbage)
    app.router.add_get("/wrong/stats", wrong_json)
    app.router.add_get("/wrong/stats/history", huge_history)
    app.router.add_get("/slow/stats", slow)
    app.router.add_get("/slow/stats/history", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    try:
        yield {"garbage": f"{base}/garbage", "wrong": f"{base}/wrong", "slow": f"{base}/slow"}
    finally:
        await runner.cleanup()


async def test_observer_survives_garbage_slow_and_vanishing_nodes(bad_nodes):
    server = NodeServer(NodeConfig(port=0, api_secret=SECRET, max_cpu=100.0))
    NodeMonitor(server).attach()
    await server.start()
    gone = NodeServer(NodeConfig(port=0, api_secret=SECRET, max_cpu=100.0))
    await gone.start()
    records = [
        {"node_id": "good", "region": "eu", "url": server.url},
        {"node_id": "gone", "region": "eu", "url": gone.url},
        *({"node_id": k, "region": "us", "url": v} for k, v in bad_nodes.items()),
    ]

    async def lister() -> list[dict[str, object]]:
        return records

    dashboard = DashboardApp(lambda: Observer(lister, interval=0.5, poll_timeout=1.0))
    app = web.Application()
    dashboard.mount(app, "")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/api/events") as events:
                assert events.headers["Content-Type"] == "text/event-stream"
                stopped = False
                snapshots = []
                deadline = time.monotonic() + 30
                async for line in events.content:
                    if line.startswith(b"data: "):
                        snapshots.append(json.loads(line[6:]))
                        status = {n["id"]: n["status"] for n in snapshots[-1]["nodes"]}
                        if not stopped and status["gone"] == "up":
                            await gone.stop()  # disappears while being polled
                            stopped = True
                        if status == {
                            "good": "up",
                            "gone": "unreachable",
                            "garbage": "unreachable",
                            "wrong": "unreachable",
                            "slow": "unreachable",
                        }:
                            break
                    assert time.monotonic() < deadline, snapshots[-1:]
            # the slow node never held up the others: several snapshots kept coming
            assert stopped and len(snapshots) >= 2
            errors = {n["id"]: n["error"] for n in snapshots[-1]["nodes"]}
            assert "not JSON" in errors["garbage"]
            assert "bad answer" in errors["wrong"]
            assert "timeout" in errors["slow"]
            assert {a["kind"] for a in snapshots[-1]["alerts"]} == {"node_unreachable"}
            # the page and API still answer
            async with http.get(f"{url}/") as resp:
                assert resp.status == 200
            async with http.get(f"{url}/api/streams?sort=nonsense&limit=abc") as resp:
                assert resp.status == 400
            async with http.get(f"{url}/api/streams?sort=nonsense") as resp:
                assert resp.status == 200
            async with http.get(f"{url}/api/history?node=good") as resp:
                assert len((await resp.json())["samples"]) >= 1
    finally:
        await dashboard.stop()
        await runner.cleanup()
        await server.stop()
