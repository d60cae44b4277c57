"""/metrics on a real node after a 1 -> 3 call: parses with prometheus_client's parser and
agrees with what the subscribers received; /stats gains node info and history."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor import NodeMonitor
from peer.client import CascadeClient, CascadeError
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.server import NodeConfig, NodeServer
from tests.conftest import SECRET, token


@pytest.fixture
async def monitored() -> AsyncIterator[tuple[NodeServer, NodeMonitor]]:
    server = NodeServer(NodeConfig(port=0, api_secret=SECRET, max_cpu=100.0, relay_port=0))
    monitor = NodeMonitor(server)
    monitor.attach()
    await server.start()
    try:
        yield server, monitor
    finally:
        await server.stop()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    return sum(
        v for lab, v in parsed.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


async def test_metrics_after_one_to_three_call_agree_with_subscribers(monitored):
    server, monitor = monitored
    clients: list[CascadeClient] = []

    async def join(identity: str) -> CascadeClient:
        c = CascadeClient(server.url)
        await c.connect()
        await c.join("standup", token("standup", identity))
        clients.append(c)
        return c

    try:
        pub = await join("alice")
        await pub.publish([PatternVideoTrack(160, 120), ToneAudioTrack()])
        subs = [await join(f"sub{i}") for i in range(3)]
        for sub in subs:
            await sub.wait_for_tracks(1, "video", timeout=20)
            await sub.wait_for_tracks(1, "audio", timeout=20)
        await asyncio.sleep(4.0)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                text = await resp.text()
            received = {
                kind: sum(
                    t.stats()["packets_received"]  # type: ignore[misc]
                    for s in subs
                    for t in s.tracks.values()
                    if t.kind == kind
                )
                for kind in ("audio", "video")
            }
            parsed = samples(text)
            for kind in ("audio", "video"):
                sent = value(parsed, "cascade_packets_total", direction="out", kind=kind)
                assert received[kind] > 50
                assert abs(sent - received[kind]) <= 0.02 * received[kind], (kind, sent, received)
                ingress = value(parsed, "cascade_packets_total", direction="in", kind=kind)
                assert ingress > 0
            node_labels = {"node_id": monitor.node_id, "region": "none"}
            assert value(parsed, "cascade_rooms", **node_labels) == 1
            assert value(parsed, "cascade_participants") == 4
            assert value(parsed, "cascade_producers") == 2
            assert value(parsed, "cascade_consumers") == 6
            assert value(parsed, "cascade_joins_total", outcome="ok") == 4
            assert value(parsed, "cascade_consumer_first_packet_seconds_count") == 6
            assert value(parsed, "cascade_forward_latency_seconds_count") > 0
            assert value(parsed, "cascade_process_resident_memory_bytes") > 0
            assert "cascade_producer_jitter_seconds" in parsed
            for name, rows in parsed.items():
                if name.startswith("cascade_"):
                    for labels, _ in rows:
                        assert labels["node_id"] == monitor.node_id, name

            async with http.get(f"{server.url}/stats") as resp:
                stats = await resp.json()
            assert stats["node"]["node_id"] == monitor.node_id
            assert stats["counters"]["joins"] == {"ok": 4}
            async with http.get(f"{server.url}/stats/history") as resp:
                history = await resp.json()
            assert history["fields"][0] == "time"
            assert len(history["samples"]) >= 3
            consumers = history["fields"].index("consumers")
            assert history["samples"][-1][consumers] == 6

        # Counters never go down when streams close.
        await pub.close()
        await asyncio.sleep(1.5)
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as resp:
            after = samples(await resp.text())
        for kind in ("audio", "video"):
            before = value(parsed, "cascade_packets_total", direction="out", kind=kind)
            assert value(after, "cascade_packets_total", direction="out", kind=kind) >= before
        assert value(after, "cascade_consumers") == 0
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_bad_token_join_is_counted(monitored):
    server, _ = monitored
    c = CascadeClient(server.url)
    await c.connect()
    try:
        with pytest.raises(CascadeError):
            await c.join("standup", "not-a-token")
    finally:
        await c.close()
    assert sum(server.join_outcomes.values()) == 1
    assert "ok" not in server.join_outcomes


async def test_grafana_dashboard_uses_series_the_node_exports():
    import json
    import re
    from pathlib import Path

    from dht import Directory, NodeIdentity

    identity = NodeIdentity.generate()
    server = NodeServer(
        NodeConfig(port=0, api_secret=SECRET, relay_port=0, identity=identity.private_key)
    )
    directory = Directory(identity, "eu", port=0)
    NodeMonitor(server, directory).attach()
    # what peer.overlay.Overlay.describe returns (GET /overlay)
    region = {"nodes": 1, "capacity": 2000, "used": 3, "spilled": 0, "signal": "steady"}
    server.overlay_view = lambda: {"regions": {"eu": region}}
    await server.start()
    await directory.start(announce=False)
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
    finally:
        await directory.stop()
        await server.stop()
    exported = {f.name for f in text_string_to_metric_families(text)}
    assert "cascade_dht_lookup_seconds" in exported
    assert "cascade_region_scale_signal" in exported
    dash = json.loads(
        (Path(__file__).resolve().parents[2] / "monitor/grafana/cascade-overlay.json").read_text()
    )
    used = {
        re.sub(r"_(bucket|total)$", "", name)
        for panel in dash["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"cascade_[a-z_]+", target["expr"])
    }
    assert used and used <= exported, used - exported


async def test_node_serves_the_dashboard_of_itself(monitored):
    server, monitor = monitored
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/dashboard") as resp:
            assert resp.status == 200  # redirected to /dashboard/
            assert "Cascade overlay" in await resp.text()
        for _ in range(100):
            async with http.get(f"{server.url}/dashboard/api/snapshot") as resp:
                snap = await resp.json()
            if snap["nodes"] and snap["nodes"][0]["status"] == "up":
                break
            await asyncio.sleep(0.1)
        assert [(n["id"], n["status"]) for n in snap["nodes"]] == [(monitor.node_id, "up")]
        async with http.get(f"{server.url}/dashboard/static/app.js") as resp:
            assert resp.status == 200
            assert "javascript" in resp.headers["Content-Type"]
        vendor = "/dashboard/static/vendor/cytoscape-3.34.4/cytoscape.esm.min.js"
        async with http.get(server.url + vendor) as resp:
            assert "javascript" in resp.headers["Content-Type"]
