"""DHT directory benchmark: 50 real kademlia nodes on 127.0.0.1 in one process.

Measures lookup latency (steady, right after killing 20% of the nodes, and once their
records expired), correctness of every lookup, time until a dead node's records vanish,
bytes per announce and per lookup, background refresh traffic, and record sign/verify cost.
Prints a human table, then one JSON line.

    .venv/bin/python -m bench.dht [--nodes 50] [--rooms 20] [--lookups 300] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from dht import DEFAULT_TTL, Directory, NodeIdentity, Producer, sign_record, verify_record
from dht.records import RoomEntry, room_key

HOST = "127.0.0.1"


@dataclass
class LatencyStats:
    samples: list[float] = field(default_factory=list)
    wrong: int = 0
    missing: int = 0
    extra: int = 0

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.samples)
        if not ordered:
            return {"n": 0}

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

        return {
            "n": len(ordered),
            "p50_ms": round(pct(0.50), 2),
            "p95_ms": round(pct(0.95), 2),
            "max_ms": round(ordered[-1] * 1000, 2),
            "wrong": self.wrong,
            "missing_hosts": self.missing,
            "extra_hosts": self.extra,
        }


def total_bytes(nodes: list[Directory]) -> int:
    return sum(d.server.protocol.traffic.bytes_sent for d in nodes if d.server.protocol is not None)


async def start_nodes(count: int, ttl: float) -> list[Directory]:
    nodes: list[Directory] = []
    for i in range(count):
        seeds = random.sample(nodes, min(3, len(nodes)))
        directory = Directory(
            NodeIdentity.generate(),
            ("eu-west", "us-east", "ap-south")[i % 3],
            host=HOST,
            bootstrap=[d.address for d in seeds],
            ttl=ttl,
            signaling_url=f"https://node{i}.bench/ws",
            relay_address=f"{HOST}:{30000 + i}",
        )
        await directory.start()
        nodes.append(directory)
    return nodes


async def measure_lookups(
    observers: list[Directory],
    rooms: dict[str, set[bytes]],
    count: int,
    *,
    allowed_extra: dict[str, set[bytes]] | None = None,
) -> LatencyStats:
    """Sequential lookups from random observers; a lookup is wrong unless it returns
    exactly the expected hosts (plus, optionally, not-yet-expired dead ones)."""
    stats = LatencyStats()
    names = list(rooms)
    for _ in range(count):
        observer = random.choice(observers)
        room = random.choice(names)
        start = time.perf_counter()
        entries = await observer.room_hosts(room)
        stats.samples.append(time.perf_counter() - start)
        found = {e.node_id for e in entries}
        extra = (allowed_extra or {}).get(room, set())
        if not (rooms[room] <= found <= rooms[room] | extra):
            stats.wrong += 1
            stats.missing += len(rooms[room] - found)
            stats.extra += len(found - rooms[room] - extra)
    return stats


async def bytes_per_operation(nodes: list[Directory], rooms: list[str]) -> dict[str, float]:
    """Pause refreshes; count every byte sent by every node during announces and lookups."""
    refreshers = [d._refresher for d in nodes]
    for task in refreshers:
        if task is not None:
            task.cancel()
    await asyncio.sleep(0.5)
    before = total_bytes(nodes)
    announcers = random.sample(nodes, 10)
    for d in announcers:
        await d.announce_room(random.choice(rooms), participants=2)
    per_announce = (total_bytes(nodes) - before) / len(announcers)
    await asyncio.sleep(0.2)
    before = total_bytes(nodes)
    for _ in range(20):
        await random.choice(nodes).room_hosts(random.choice(rooms))
    per_lookup = (total_bytes(nodes) - before) / 20
    for d in nodes:  # restart at random phases, as nodes started at different times would be
        d._refresher = asyncio.create_task(_delayed(random.uniform(0, d.refresh_interval), d))
    return {"announce_bytes": round(per_announce), "lookup_bytes": round(per_lookup)}


async def _delayed(delay: float, directory: Directory) -> None:
    await asyncio.sleep(delay)
    await directory._refresh_forever()


def crypto_costs(iterations: int = 2000) -> dict[str, float]:
    identity = NodeIdentity.generate()
    entry = RoomEntry(
        room="bench-room",
        node_id=identity.node_id,
        participants=4,
        producers=(Producer("mic", "audio"), Producer("cam", "video")),
    )
    key = room_key("bench-room")
    now = time.time()
    start = time.perf_counter()
    for seq in range(iterations):
        wire = sign_record(identity, key, entry, seq=seq, expires_at=now + DEFAULT_TTL)
    sign_us = (time.perf_counter() - start) / iterations * 1e6
    start = time.perf_counter()
    for _ in range(iterations):
        verify_record(wire, now=now, key=key)
    verify_us = (time.perf_counter() - start) / iterations * 1e6
    return {
        "record_bytes": len(wire),
        "sign_us": round(sign_us, 1),
        "verify_us": round(verify_us, 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    random.seed(args.seed)
    ttl = args.ttl
    t0 = time.perf_counter()
    nodes = await start_nodes(args.nodes, ttl)
    startup_s = time.perf_counter() - t0

    # rooms hosted by 1..5 nodes each
    rooms: dict[str, set[bytes]] = {}
    hosts_of: dict[str, list[Directory]] = {}
    for r in range(args.rooms):
        name = f"room-{r}"
        hosts = random.sample(nodes, random.randint(1, 5))
        await asyncio.gather(*(h.announce_room(name, participants=3) for h in hosts))
        rooms[name] = {h.node_id for h in hosts}
        hosts_of[name] = hosts
    # a 5-host room for the headline check
    five = random.sample(nodes, 5)
    await asyncio.gather(*(h.announce_room("five-hosts", participants=1) for h in five))
    rooms["five-hosts"] = {h.node_id for h in five}
    hosts_of["five-hosts"] = five

    steady = await measure_lookups(nodes, rooms, args.lookups)
    costs = await bytes_per_operation(nodes, list(rooms))
    # hosts announced during the byte measurement join the expected sets
    for d in nodes:
        for room in d.hosted_rooms:
            rooms[room].add(d.node_id)

    # background traffic per node per second (refreshes only)
    before, t_bg = total_bytes(nodes), time.perf_counter()
    await asyncio.sleep(ttl)
    background = (total_bytes(nodes) - before) / (time.perf_counter() - t_bg) / len(nodes)

    # kill 20% of the nodes (no withdrawal), at least one host of the five-host room
    victims = {five[0], *random.sample([d for d in nodes if d is not five[0]], args.nodes // 5 - 1)}
    live = [d for d in nodes if d not in victims]
    dead_ids = {d.node_id for d in victims}
    live_rooms = {room: ids - dead_ids for room, ids in rooms.items()}
    dead_rooms = {room: ids & dead_ids for room, ids in rooms.items()}
    for d in victims:
        await d.stop(withdraw=False)
    killed_at = time.time()
    # the latest signed expiry of any dead node's record held anywhere: the hard bound
    expire_bound = max(
        (
            r.expires_at - killed_at
            for d in live
            for key in d.server.storage.stored_keys()
            for r in d.server.storage.records(key)
            if r.node_id in dead_ids
        ),
        default=0.0,
    )

    churn = await measure_lookups(live, live_rooms, args.churn_lookups, allowed_extra=dead_rooms)
    churn_elapsed = time.time() - killed_at

    # time until no live observer sees any dead host
    rooms_with_dead = [room for room, ids in dead_rooms.items() if ids]
    vanish_s = float("nan")
    while time.time() - killed_at < ttl + 30:
        sample = random.sample(live, 5)
        results = await asyncio.gather(
            *(o.room_hosts(room) for o in sample for room in rooms_with_dead)
        )
        if not any({e.node_id for e in entries} & dead_ids for entries in results):
            vanish_s = time.time() - killed_at
            break
        await asyncio.sleep(0.1)

    after = await measure_lookups(live, live_rooms, args.lookups)
    every_live = await asyncio.gather(*(d.room_hosts("five-hosts") for d in live))
    five_ok = all(
        {e.node_id for e in entries} == live_rooms["five-hosts"] for entries in every_live
    )
    region_ok = True
    for region in ("eu-west", "us-east", "ap-south"):
        listed = {n.node_id for n in await live[0].region_nodes(region)}
        expected = {d.node_id for d in live if d.region == region}
        if listed != expected:
            print(region, "missing", len(expected - listed), "extra", len(listed - expected))
        region_ok &= listed == expected
    if not five_ok:
        print("five", [len({e.node_id for e in x} ^ live_rooms["five-hosts"]) for x in every_live])

    for d in live:
        await d.stop(withdraw=False)
    return {
        "bench": "dht",
        "nodes": args.nodes,
        "rooms": len(rooms),
        "ttl_s": ttl,
        "startup_s": round(startup_s, 2),
        "steady": steady.summary(),
        "churn_20pct_dead": churn.summary(),
        "churn_phase_s": round(churn_elapsed, 2),
        "after_expiry_20pct_dead": after.summary(),
        "dead_records_gone_s": round(vanish_s, 2),
        "dead_records_expire_within_s": round(expire_bound, 2),
        "five_host_room_exact_from_all_live": five_ok,
        "region_listing_exact": region_ok,
        **costs,
        "background_bytes_per_node_s": round(background),
        **crypto_costs(),
    }


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("nodes / rooms / ttl", f"{result['nodes']} / {result['rooms']} / {result['ttl_s']} s"),
        ("startup (sequential joins)", f"{result['startup_s']} s"),
    ]
    for label, key in (
        ("lookup steady", "steady"),
        ("lookup right after 20% killed", "churn_20pct_dead"),
        ("lookup 20% dead, records expired", "after_expiry_20pct_dead"),
    ):
        s = result[key]
        rows.append(
            (
                label,
                f"p50 {s['p50_ms']} ms  p95 {s['p95_ms']} ms  max {s['max_ms']} ms  "
                f"wrong {s['wrong']}/{s['n']}",
            )
        )
    rows += [
        (
            "dead node's records gone after",
            f"{result['dead_records_gone_s']} s (all signed to expire within "
            f"{result['dead_records_expire_within_s']} s; ttl {result['ttl_s']} s)",
        ),
        (
            "5-host room exact from every live node",
            str(result["five_host_room_exact_from_all_live"]),
        ),
        ("region listing exact", str(result["region_listing_exact"])),
        ("bytes per announce (all nodes)", str(result["announce_bytes"])),
        ("bytes per lookup (all nodes)", str(result["lookup_bytes"])),
        ("refresh traffic per node", f"{result['background_bytes_per_node_s']} B/s"),
        ("record size", f"{result['record_bytes']} B"),
        ("sign / verify", f"{result['sign_us']} us / {result['verify_us']} us"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--lookups", type=int, default=300)
    parser.add_argument("--churn-lookups", type=int, default=100)
    parser.add_argument("--ttl", type=float, default=DEFAULT_TTL)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    result = asyncio.run(run(args))
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
