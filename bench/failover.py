"""Drain and failover benchmark: real node processes on 127.0.0.1, SDK participants.

    python -m bench.failover [--runs 3]

drain: three nodes (eu-1, eu-2, us-1). Two publishers on eu-1, one on eu-2, a watcher on
us-1; everyone subscribes to everyone. eu-1 gets SIGTERM (it drains). Reported per
subscribed video track: the media gap around its switch (last frame before to first frame
after), and the time from SIGTERM to the node's exit.

kill: three nodes (eu, us, ap). A publisher on eu, one watcher on us and one on ap. eu gets
SIGKILL. Reported per watcher: the media gap (same definition, so it includes detection,
the publisher's failover and the relays' switch), and per surviving node the time until the
dead node is no longer listed among its live nodes.

The baseline is the video frame interval of the same run (gaps cannot be shorter). Last
line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench.cluster import Cluster, ClusterNode, until
from peer import aiortc_adapter as rtc
from peer.client import CascadeClient
from peer.media import PatternVideoTrack, ToneAudioTrack

FPS = 15


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": pct(values, 0.5),
        "p95": pct(values, 0.95),
        "max": round(max(values), 3) if values else None,
    }


async def participant(
    cluster: Cluster, node: ClusterNode, room: str, name: str, publish: bool
) -> CascadeClient:
    client = CascadeClient(node.url)
    await client.connect()
    await client.join(room, cluster.token(room, name), name=name, follow_placement=False)
    if publish:
        video = PatternVideoTrack(320, 240, FPS, 300_000, periodic_keyframes=False)
        await client.publish([video, ToneAudioTrack()])
    return client


def videos(client: CascadeClient) -> list[Any]:
    return [t for t in client.tracks.values() if t.kind == "video" and not t.ended]


def new_gaps(tracks: list[Any], before: dict[int, int]) -> list[float]:
    """Per track, the longest gap since ``before`` (its number of gaps then)."""
    return [max(t.gaps[before[id(t)] :]) for t in tracks if len(t.gaps) > before[id(t)]]


async def listed(node: ClusterNode, node_id: str) -> bool:
    overlay = await node.get("/overlay")
    return any(n["node_id"] == node_id for n in overlay["nodes"])


async def wait_mesh(cluster: Cluster) -> None:
    for node in cluster.nodes:
        for _ in range(150):
            if len((await node.get("/overlay"))["nodes"]) >= len(cluster.nodes):
                break
            await asyncio.sleep(0.2)


async def drain_run() -> dict[str, Any]:
    cluster = Cluster()
    a = cluster.add("eu-1", "eu", location=(48.86, 2.35))
    b = cluster.add("eu-2", "eu", location=(50.11, 8.68))
    c = cluster.add("us-1", "us", location=(38.9, -77.0))
    clients: list[CascadeClient] = []
    try:
        await cluster.start()
        await wait_mesh(cluster)
        room = "drain"
        for node, name, pub in ((a, "p1", True), (a, "p2", True), (b, "p3", True), (c, "w", False)):
            clients.append(await participant(cluster, node, room, name, pub))
        want = {"p1": 2, "p2": 2, "p3": 2, "w": 3}
        names = ["p1", "p2", "p3", "w"]
        ok = await until(
            lambda: all(
                len([t for t in videos(cl) if t.frames_decoded > 5]) >= want[n]
                for cl, n in zip(clients, names, strict=True)
            ),
            40,
        )
        tracks = [t for cl in clients for t in videos(cl)]
        gaps_before = {id(t): len(t.gaps) for t in tracks}
        signalled = time.monotonic()
        a.terminate()
        exited = await until(lambda: not a.alive, 60, 0.02)
        exit_seconds = time.monotonic() - signalled
        frames = {id(t): t.frames_decoded for t in tracks}
        await until(lambda: all(t.frames_decoded > frames[id(t)] + FPS for t in tracks), 20)
        gaps = new_gaps(tracks, gaps_before)
        ended = [
            f"{n}<-{t.source.split('/')[0]}"
            for cl, n in zip(clients, names, strict=True)
            for t in cl.tracks.values()
            if t.kind == "video" and t.ended and id(t) in gaps_before
        ]
        return {
            "decoding_before": ok,
            "exited": exited,
            "exit_seconds": round(exit_seconds, 3),
            "moved": sum(len(cl.moves) for cl in clients),
            "gaps": gaps,
            "tracks": len(tracks),
            "ended": sum(t.ended for t in tracks),
            "ended_tracks": ended,
            "decode_errors": sum(t.stats()["decode_errors"] for t in tracks),
        }
    finally:
        await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)
        cluster.stop()


async def kill_run() -> dict[str, Any]:
    cluster = Cluster()
    eu = cluster.add("eu", "eu", location=(48.86, 2.35))
    us = cluster.add("us", "us", location=(38.9, -77.0))
    ap = cluster.add("ap", "ap", location=(1.35, 103.8))
    clients: list[CascadeClient] = []
    try:
        await cluster.start()
        await wait_mesh(cluster)
        room = "kill"
        publisher = await participant(cluster, eu, room, "pub", True)
        watchers = [await participant(cluster, n, room, f"w-{n.name}", False) for n in (us, ap)]
        clients = [publisher, *watchers]
        ok = await until(
            lambda: all(videos(w) and videos(w)[0].frames_decoded > 5 for w in watchers), 40
        )
        tracks = [videos(w)[0] for w in watchers]
        gaps_before = {id(t): len(t.gaps) for t in tracks}
        killed = time.monotonic()
        eu.kill()
        frames = [t.frames_decoded for t in tracks]
        back = await until(
            lambda: all(t.frames_decoded > f for t, f in zip(tracks, frames, strict=True)), 30, 0.01
        )
        resumed = time.monotonic() - killed
        forgotten: dict[str, float | None] = {}
        for node in (us, ap):
            forgotten[node.name] = None
        deadline = killed + eu.ttl + 15
        while time.monotonic() < deadline and None in forgotten.values():
            for node in (us, ap):
                if forgotten[node.name] is None and not await listed(node, eu.node_id):
                    forgotten[node.name] = round(time.monotonic() - killed, 2)
            await asyncio.sleep(0.2)
        return {
            "decoding_before": ok,
            "resumed": back,
            "first_frame_after_kill": round(resumed, 3),
            "gaps": [
                max(t.gaps[gaps_before[id(t)] :]) for t in tracks if t.gaps[gaps_before[id(t)] :]
            ],
            "publisher_moves": publisher.moves,
            "directory_forgets_dead_node_s": forgotten,
            "decode_errors": sum(t.stats()["decode_errors"] for t in tracks),
        }
    finally:
        await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)
        cluster.stop()


async def run(runs: int) -> dict[str, Any]:
    rtc.set_ice_addresses(["127.0.0.1"])
    drains = []
    kills = []
    for i in range(runs):
        drains.append(await drain_run())
        print(f"drain run {i + 1}: {json.dumps(drains[-1])}", flush=True)
        kills.append(await kill_run())
        print(f"kill run {i + 1}: {json.dumps(kills[-1])}", flush=True)
    drain_gaps = [g for r in drains for g in r["gaps"]]
    kill_gaps = [g for r in kills for g in r["gaps"]]
    forgets = [
        v for r in kills for v in r["directory_forgets_dead_node_s"].values() if v is not None
    ]
    frame = 1 / FPS
    return {
        "runs": runs,
        "frame_interval_s": round(frame, 3),
        "drain_gap_s": summary(drain_gaps),
        "drain_gap_p95_vs_frame": round((pct(drain_gaps, 0.95) or 0) / frame, 1),
        "drain_exit_s": summary([r["exit_seconds"] for r in drains]),
        "drain_tracks_ended": sum(r["ended"] for r in drains),
        "drain_decode_errors": sum(r["decode_errors"] for r in drains),
        "kill_gap_s": summary(kill_gaps),
        "kill_gap_p95_vs_frame": round((pct(kill_gaps, 0.95) or 0) / frame, 1),
        "kill_first_frame_s": summary([r["first_frame_after_kill"] for r in kills]),
        "dead_node_forgotten_s": summary(forgets),
        "kill_decode_errors": sum(r["decode_errors"] for r in kills),
        "targets": {"drain_gap_p95_s": 1.0, "kill_gap_p95_s": 5.0},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.runs))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
