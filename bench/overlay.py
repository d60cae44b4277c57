"""Overlay benchmark: six node processes in three regions, SDK participants joining rooms
through random nodes with random region hints.

    python -m bench.overlay [--rooms 10] [--participants 60] [--publish-share 0.34]

Reports join -> first decoded frame (p50/p95) for subscribers placed on the publisher's node,
after a redirect, and when the room had to be relayed to their node; the share of
participants placed in their own region; relay flows against the minimum the placement needs;
nodes per room against the minimum (the number of regions its participants come from); and
directory (DHT) bytes per node per second. The baseline of the first-frame figures is the same
run's same-node joins. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from peer import aiortc_adapter as rtc
from peer.client import CascadeClient, mint_token
from peer.demo import DemoNode, start_nodes, stop_nodes
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.tokens import new_secret

SITES = (
    ("eu", (48.86, 2.35)),
    ("eu", (50.11, 8.68)),
    ("us", (38.90, -77.04)),
    ("us", (37.77, -122.42)),
    ("ap", (35.68, 139.69)),
    ("ap", (1.35, 103.82)),
)


@dataclass
class Joined:
    room: str
    hint: str
    entry: str
    client: CascadeClient
    publisher: bool
    started: float
    first_frames: dict[str, float] = field(default_factory=dict)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


async def run(rooms: int, participants: int, publish_share: float, seed: int) -> dict:
    rng = random.Random(seed)
    base, dht = 18580, 14580
    plan = [
        DemoNode(
            f"{region}-{i}",
            region,
            loc,
            base + i,
            dht + i,
            None if i == 0 else f"127.0.0.1:{dht}",
            ("--max-cpu", "50", "--max-consumers", "400", "--dht-ttl", "6", "--ws-per-ip", "0"),
        )
        for i, (region, loc) in enumerate(SITES)
    ]
    secret = new_secret()
    env = {**os.environ, "CASCADE_API_SECRET": secret}
    procs = start_nodes(plan, env)
    region_of = {n.url: n.region for n in plan}
    joined: list[Joined] = []
    try:
        await asyncio.sleep(3.0)  # every node sees every other in the directory
        dht_before = {n.url: _get(f"{n.url}/overlay")["dht"] for n in plan}
        t_before = time.monotonic()
        rtc.set_ice_addresses(["127.0.0.1"])
        names = [f"room{r}" for r in range(rooms)]
        per_room = max(2, participants // rooms)
        publishers_per_room = max(1, round(per_room * publish_share))
        regions = sorted({r for r, _ in SITES})

        async def join(room: str, who: str, publisher: bool) -> Joined:
            entry = rng.choice(plan).url
            hint = rng.choice(regions)
            client = CascadeClient(entry)
            started = time.monotonic()
            await client.connect()
            await client.join(
                room,
                mint_token(room, who, secret=secret),
                region=hint,
                auto_subscribe=not publisher,
                name=who,
            )
            j = Joined(room, hint, entry, client, publisher, started)
            joined.append(j)
            if publisher:
                await client.publish(
                    [
                        PatternVideoTrack(320, 240, bitrate=250_000, periodic_keyframes=False),
                        ToneAudioTrack(),
                    ]
                )
            return j

        # Publishers first (their rooms get placed), then subscribers in random order.
        for room in names:
            for p in range(publishers_per_room):
                await join(room, f"{room}-pub{p}", True)
                await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        order = [(room, s) for room in names for s in range(per_room - publishers_per_room)]
        rng.shuffle(order)
        subs = []
        for room, s in order:
            subs.append(await join(room, f"{room}-sub{s}", False))
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for j in subs:
                for t in j.client.tracks.values():
                    if (
                        t.kind == "video"
                        and t.first_frame_at
                        and t.producer_id not in j.first_frames
                    ):
                        j.first_frames[t.producer_id] = t.first_frame_at - j.started
            if all(len(j.first_frames) >= publishers_per_room for j in subs):
                break
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - t_before
        for j in subs:
            if len(j.first_frames) < publishers_per_room:
                tracks = [
                    (t.kind, t.producer_id[-6:], t.frames_decoded) for t in j.client.tracks.values()
                ]
                print(
                    f"missing: {j.room} sub on {j.client.url} (entry {j.entry}, hint {j.hint},"
                    f" redirects {len(j.client.redirects)}): {tracks}",
                    file=sys.stderr,
                )
        views = {n.url: _get(f"{n.url}/overlay") for n in plan}

        # Where everyone ended up.
        node_of = {id(j): j.client.url for j in joined}
        publisher_node: dict[str, str] = {}
        room_of_producer: dict[str, str] = {}
        for j in joined:
            if j.publisher:
                for producer in j.client.producers:
                    publisher_node[str(producer["producer_id"])] = j.client.url
                    room_of_producer[str(producer["producer_id"])] = j.room
        same, redirected, relayed = [], [], []
        for j in subs:
            for producer_id, delay in j.first_frames.items():
                if publisher_node.get(producer_id) != node_of[id(j)]:
                    relayed.append(delay)
                elif j.client.redirects:
                    redirected.append(delay)
                else:
                    same.append(delay)
        in_region = sum(1 for j in joined if region_of[node_of[id(j)]] == j.hint)
        # Flows: relayed producers on each node; minimum: per room, each producer to every
        # other node hosting subscribers of that room.
        flows = sum(
            len(v["relayed_producers"].get(room, [])) for v in views.values() for room in names
        )
        minimum_flows = 0
        nodes_per_room, min_nodes_per_room = [], []
        for room in names:
            members = [j for j in joined if j.room == room]
            hosts = {node_of[id(j)] for j in members}
            sub_hosts = {node_of[id(j)] for j in members if not j.publisher}
            for pid, host in publisher_node.items():
                if room_of_producer[pid] == room:
                    minimum_flows += len(sub_hosts - {host})
            nodes_per_room.append(len(hosts))
            min_nodes_per_room.append(len({j.hint for j in members}))
        dht_bytes = [
            (views[u]["dht"]["bytes_sent"] - dht_before[u]["bytes_sent"]) / elapsed for u in views
        ]
        expected = len(subs) * publishers_per_room
        got = sum(len(j.first_frames) for j in subs)
        return {
            "nodes": len(plan),
            "rooms": rooms,
            "participants": len(joined),
            "publishers": sum(1 for j in joined if j.publisher),
            "videos_decoded": f"{got}/{expected}",
            "first_frame_same_node_ms": {
                "p50": pct(same, 0.5),
                "p95": pct(same, 0.95),
                "n": len(same),
            },
            "first_frame_after_redirect_ms": {
                "p50": pct(redirected, 0.5),
                "p95": pct(redirected, 0.95),
                "n": len(redirected),
            },
            "first_frame_relayed_ms": {
                "p50": pct(relayed, 0.5),
                "p95": pct(relayed, 0.95),
                "n": len(relayed),
            },
            "redirect_ratio_p50": (
                round(pct(redirected, 0.5) / pct(same, 0.5), 2)  # type: ignore[operator]
                if same and redirected
                else None
            ),
            "relay_ratio_p50": (
                round(pct(relayed, 0.5) / pct(same, 0.5), 2)  # type: ignore[operator]
                if same and relayed
                else None
            ),
            "in_region_share": round(in_region / len(joined), 3),
            "relay_flows": flows,
            "relay_flows_minimum": minimum_flows,
            "nodes_per_room_mean": round(statistics.mean(nodes_per_room), 2),
            "nodes_per_room_minimum_mean": round(statistics.mean(min_nodes_per_room), 2),
            "dht_bytes_sent_per_node_per_s": round(statistics.mean(dht_bytes)),
        }
    finally:
        await asyncio.gather(*(j.client.close() for j in joined), return_exceptions=True)
        stop_nodes(procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--participants", type=int, default=60)
    parser.add_argument("--publish-share", type=float, default=0.34)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = asyncio.run(run(args.rooms, args.participants, args.publish_share, args.seed))
    for key, value in result.items():
        print(f"{key:34} {value}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
