"""Chaos: four node processes, 20 SDK participants in four rooms, a random node SIGKILLed
and restarted every 15 s. Afterwards every participant receives every publisher of its
room, nobody is left on a dead node, no node lists a dead one, and nothing leaked.

``CASCADE_CHAOS_SECONDS`` sets how long the killing goes on (default 120), and
``CASCADE_CHAOS_SEED`` which nodes die (default 7)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import pytest

from bench.cluster import Cluster, ClusterNode
from peer.client import CascadeClient
from peer.media import PatternVideoTrack, ToneAudioTrack

CHAOS_SECONDS = float(os.environ.get("CASCADE_CHAOS_SECONDS", "120"))
KILL_EVERY = 15.0
DOWN_FOR = 3.0
REGIONS = ("eu", "us", "ap")


class Member:
    def __init__(self, room: str, name: str, client: CascadeClient, publishes: bool) -> None:
        self.room = room
        self.name = name
        self.client = client
        self.publishes = publishes
        self.video_source = ""


async def until(pred: Any, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(step)
    return bool(await pred())


def video_of(member: Member, source: str):
    for track in member.client.tracks.values():
        if track.source == source and track.kind == "video" and not track.ended:
            return track
    return None


async def everyone_receives_everyone(members: list[Member]) -> list[str]:
    """``viewer<-publisher`` for each video that does not decode new frames now."""
    pairs = [
        (m, p) for m in members for p in members if p.publishes and p.room == m.room and p is not m
    ]
    before = {}
    for m, p in pairs:
        track = video_of(m, p.video_source)
        before[(m.name, p.name)] = track.frames_decoded if track else None
    await asyncio.sleep(1.5)
    missing = []
    for m, p in pairs:
        track = video_of(m, p.video_source)
        was = before[(m.name, p.name)]
        if track is None or was is None or track.frames_decoded <= was:
            missing.append(f"{m.name}<-{p.name}")
    return missing


def diagnose(members: list[Member]) -> str:
    """Where each participant is and what it receives (for failure messages)."""
    lines = []
    for m in members:
        c = m.client
        tracks = ", ".join(
            f"{t.source.split('/')[0]}:{t.kind[0]}{'E' if t.ended else ''}{'H' if t.held else ''}"
            f"={t.frames_decoded}"
            for t in c.tracks.values()
        )
        moves = [(mv["reason"], mv["to"][-5:], mv["attempts"]) for mv in c.moves]
        kinds = [e["type"] for e in c.events[-8:]]
        lines.append(f"{m.name} @{c.url[-5:]} moves={moves} tracks=[{tracks}] last={kinds}")
    dump = os.environ.get("CASCADE_CHAOS_DUMP")
    if dump:
        import json

        with open(dump, "w") as f:
            for m in members:
                f.write(json.dumps({"name": m.name, "moves": m.client.moves}) + "\n")
                for e in m.client.events:
                    if e.get("type") != "offer":
                        f.write("  " + json.dumps(e)[:300] + "\n")
                    else:
                        f.write("  offer " + json.dumps(e.get("consumers"))[:600] + "\n")
    return "\n".join(lines)


async def node_view(cluster: Cluster, members: list[Member], missing: list[str]) -> str:
    """What the viewers' nodes hold for the pairs that do not receive."""
    by_url = {n.url: n for n in cluster.nodes}
    by_name = {m.name: m for m in members}
    lines = []
    for pair in missing:
        viewer, publisher = (by_name[n] for n in pair.split("<-"))
        node = by_url.get(viewer.client.url)
        if node is None:
            lines.append(f"{pair}: viewer on unknown node {viewer.client.url}")
            continue
        stats = await node.get("/stats")
        overlay = await node.get("/overlay")
        mine = stats["rooms"].get(viewer.room, {}).get(viewer.client.participant_id, {})
        consumers = {
            c["producer_id"]: (c["kind"], c["packets"]) for c in mine.get("consumers", {}).values()
        }
        wanted = [p["producer_id"] for p in publisher.client.producers]
        lines.append(
            f"{pair}: viewer on {node.name}, publisher on {publisher.client.url[-5:]} with "
            f"{wanted}; viewer consumes {consumers}; relayed here "
            f"{overlay['relayed_producers'].get(viewer.room)}"
        )
    return "\n".join(lines)


async def process_counts(node: ClusterNode) -> dict[str, int]:
    return dict((await node.get("/stats"))["process"])


@pytest.mark.timeout(CHAOS_SECONDS + 400)
async def test_random_kills_and_restarts_leave_every_call_whole():
    rng = random.Random(int(os.environ.get("CASCADE_CHAOS_SEED", "7")))
    cluster = Cluster()
    sites = (("eu-1", "eu", (48.86, 2.35)), ("eu-2", "eu", (50.11, 8.68)),
             ("us-1", "us", (38.9, -77.0)), ("ap-1", "ap", (1.35, 103.8)))  # fmt: skip
    for name, region, location in sites:
        cluster.add(name, region, location=location)
    members: list[Member] = []
    try:
        await cluster.start()
        for node in cluster.nodes:
            assert await until(lambda node=node: _lists(node, len(cluster.nodes)), 40), node.tail()
        idle = {n.name: await process_counts(n) for n in cluster.nodes}

        for r in range(4):
            room = f"room-{r}"
            for i in range(5):
                entry = rng.choice(cluster.nodes)
                client = CascadeClient(entry.url, request_timeout=20)
                await client.connect()
                name = f"{room}-{i}"
                await client.join(room, cluster.token(room, name), name=name,
                                  region=rng.choice(REGIONS))  # fmt: skip
                member = Member(room, name, client, publishes=i < 2)
                if member.publishes:
                    video = PatternVideoTrack(160, 120, 10, 150_000, periodic_keyframes=False)
                    produced = await client.publish([video, ToneAudioTrack()])
                    member.video_source = next(
                        p["source"] for p in produced if p["kind"] == "video"
                    )
                members.append(member)

        async def all_receive() -> bool:
            return not await everyone_receives_everyone(members)

        if not await until(all_receive, 60):
            missing = await everyone_receives_everyone(members)
            detail = await node_view(cluster, members, missing)
            pytest.fail(f"before any kill, not receiving: {missing}\n{detail}")

        kills: list[str] = []
        started = time.monotonic()
        while time.monotonic() - started < CHAOS_SECONDS:
            victim = rng.choice(cluster.nodes)
            victim.kill()
            kills.append(victim.name)
            await asyncio.sleep(DOWN_FOR)
            await cluster.restart(victim)
            await asyncio.sleep(max(0.0, KILL_EVERY - DOWN_FOR))

        # Everyone receives every publisher of its room again.
        missing: list[str] = []

        async def converged() -> bool:
            nonlocal missing
            missing = await everyone_receives_everyone(members)
            return not missing

        if not await until(converged, 60):
            detail = await node_view(cluster, members, missing)
            pytest.fail(
                f"after kills {kills}, not receiving: {missing}\n{diagnose(members)}\n{detail}"
            )

        # Nobody is left on a dead node: each participant is known to the node it talks to.
        by_url = {n.url: n for n in cluster.nodes}
        for member in members:
            node = by_url[member.client.url]
            rooms = (await node.get("/stats"))["rooms"]
            assert member.client.participant_id in rooms.get(member.room, {}), member.name

        # No node lists a node that is not running, or relays a producer nobody publishes.
        ids = {n.node_id for n in cluster.nodes}
        local: set[str] = set()
        for node in cluster.nodes:
            for room in (await node.get("/stats"))["rooms"].values():
                for participant in room.values():
                    local.update(participant["producers"])
        for node in cluster.nodes:
            overlay = await node.get("/overlay")
            assert {n["node_id"] for n in overlay["nodes"]} <= ids
            relayed = {p for ps in overlay["relayed_producers"].values() for p in ps}
            assert relayed <= local, (node.name, relayed - local)

        # Everyone leaves: the nodes return to their idle counts of tasks and sockets.
        await asyncio.gather(*(m.client.close() for m in members))
        members = []

        async def idle_again() -> bool:
            for node in cluster.nodes:
                now = await process_counts(node)
                if now["fds"] > idle[node.name]["fds"] + 12:
                    return False
                if now["asyncio_tasks"] > idle[node.name]["asyncio_tasks"] + 12:
                    return False
            return True

        if not await until(idle_again, 30, 1.0):
            counts = {n.name: (idle[n.name], await process_counts(n)) for n in cluster.nodes}
            pytest.fail(f"nodes did not return to idle: {counts}")
        print(f"chaos: {len(kills)} kills ({', '.join(kills)}), all calls whole afterwards")
    finally:
        await asyncio.gather(*(m.client.close() for m in members), return_exceptions=True)
        cluster.stop()


async def _lists(node: ClusterNode, count: int) -> bool:
    try:
        return len((await node.get("/overlay"))["nodes"]) >= count
    except Exception:
        return False
