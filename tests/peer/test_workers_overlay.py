"""A node with worker processes in the overlay: one relay flow per producer per remote node.

Node eu runs a supervisor and two real worker processes; node us is a single-process node;
both find each other through a real DHT and relay over real QUIC. Participants of one room
sit on both workers of eu and on us; every subscriber decodes every publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bench.cluster import until
from dht import Directory, NodeIdentity
from peer.client import CascadeClient
from peer.media import PatternVideoTrack
from peer.overlay import Overlay
from peer.server import NodeConfig, NodeServer
from peer.supervisor import Supervisor
from relay import RelayError
from tests.conftest import SECRET, token
from tests.peer.test_drain import FRANKFURT, PARIS, grows
from tests.peer.test_overlay import start_node
from tests.peer.test_placement_nodes import start, wait_for_nodes
from tests.peer.test_workers import pin, worker_of

ROOM = "spread"


async def start_workers_node(
    region: str, bootstrap: list[tuple[str, int]]
) -> tuple[Supervisor, Overlay]:
    identity = NodeIdentity.generate()
    config = NodeConfig(
        port=0, api_secret=SECRET, max_cpu=100.0, relay_port=0, identity=identity.private_key
    )
    server = Supervisor(config, workers=2)
    await server.start()
    directory = Directory(identity, region, host="127.0.0.1", port=0, bootstrap=bootstrap, ttl=6.0)
    overlay = Overlay(server, directory, interval=0.5)
    await overlay.start()
    return server, overlay


@contextlib.asynccontextmanager
async def workers_and_single() -> AsyncIterator[tuple[Supervisor, NodeServer]]:
    nodes: list[tuple[NodeServer, Overlay]] = []
    try:
        eu = await start_workers_node("eu", [])
        nodes.append(eu)
        nodes.append(await start_node("us", [eu[1].directory.address]))
        for _, overlay in nodes:
            await overlay.sync()
        yield eu[0], nodes[1][0]
    finally:
        for server, overlay in reversed(nodes):
            await overlay.stop()
            await server.stop()


@contextlib.asynccontextmanager
async def joiner() -> AsyncIterator[Callable[[str, str], Awaitable[CascadeClient]]]:
    """Joins participants to ``ROOM`` on a node's URL; closes them all at the end."""
    clients: list[CascadeClient] = []

    async def join(url: str, identity: str) -> CascadeClient:
        cl = CascadeClient(url)
        clients.append(cl)
        await cl.connect()
        await cl.join(ROOM, token(ROOM, identity), name=identity)
        return cl

    try:
        yield join
    finally:
        await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)


async def _publish(client: CascadeClient) -> str:
    """Publish a small video; its producer id."""
    (video,) = await client.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    return str(video["producer_id"])


async def _one_publisher_per_worker(
    eu: Supervisor, join: Callable[[str, str], Awaitable[CascadeClient]]
) -> list[tuple[CascadeClient, str]]:
    """alice publishing on worker 0 and carol on worker 1 of ``eu``."""
    out = []
    for worker, name in enumerate(("alice", "carol")):
        pin(eu, worker)
        client = await join(eu.url, name)
        out.append((client, await _publish(client)))
    return out


async def _decodes(client: CascadeClient, producer_ids: set[str], timeout: float = 30) -> None:
    """``client`` shows video of every producer in ``producer_ids``, without decode errors."""
    tracks = await client.wait_for_tracks(len(producer_ids), "video", timeout=timeout)
    by_producer = {t.producer_id: t for t in tracks}
    assert producer_ids <= set(by_producer), (producer_ids, set(by_producer))
    for pid in producer_ids:
        track = by_producer[pid]
        frames = track.frames_decoded
        for _ in range(300):
            if track.frames_decoded > frames + 3:
                break
            await asyncio.sleep(0.1)
        assert track.frames_decoded > frames + 3, (pid, frames, track.frames_decoded)
        assert track.stats()["decode_errors"] == 0, pid


async def test_room_over_two_workers_and_a_second_node_one_flow_per_producer() -> None:
    async with workers_and_single() as (eu, us), joiner() as client:
        (alice, a_id), (carol, c_id) = await _one_publisher_per_worker(eu, client)
        assert {worker_of(eu, alice), worker_of(eu, carol)} == {0, 1}
        bob = await client(us.url, "bob")
        d_id = await _publish(bob)

        # us decodes the producers of both eu workers; each eu worker decodes the
        # other worker's producer and the one relayed from us.
        await _decodes(bob, {a_id, c_id})
        await _decodes(alice, {c_id, d_id})
        await _decodes(carol, {a_id, d_id})

        # One relay flow per producer per remote node, in both directions.
        eu_key = eu.relay_public_key
        us_key = us.relay_public_key
        assert us.relay is not None and eu.relay is not None
        assert set(us.relay.links[eu_key].producers) == {a_id, c_id}
        assert set(eu.relay.links[us_key].producers) == {d_id}
        served_by_us = [f for f in us.relay.origin_flows() if f[0] == eu_key]
        assert [f[1] for f in served_by_us] == [d_id]
        served_by_eu = sorted(f[1] for f in eu.relay.origin_flows() if f[0] == us_key)
        assert served_by_eu == sorted([a_id, c_id])

        # Everyone sees everyone, wherever they are.
        stats = await _get(eu, "/overlay")
        assert stats["relayed_producers"][ROOM] == [d_id]
        # Participants of the workers node know where to fail over.
        assert [f["url"] for f in alice.fallbacks] == [us.url]
        everyone = {alice.participant_id, carol.participant_id, bob.participant_id}
        for cl in (alice, carol, bob):
            assert _seen(cl) == everyone - {cl.participant_id}

        # A node of the directory without participants in a room may not pull its
        # producers from the workers (open mode), and the call goes on.
        host, port = eu.relay.address
        dave = CascadeClient(eu.url)
        try:
            await dave.connect()
            await dave.join("private", token("private", "dave"))
            private = await _publish(dave)
            await until(lambda: eu.hub.producer_room(private) == "private", 10)
            with pytest.raises(RelayError) as refused:
                await us.pull_remote_producer("private", eu_key, host, port, private)
            assert "not allowed" in str(refused.value)
        finally:
            await dave.close()
        await _decodes(bob, {a_id, c_id})

        # A publisher on a worker leaves: the other node sees it go.
        await carol.close()
        await bob.wait_event("producer_removed", producer_id=c_id, timeout=15)
        await bob.wait_event("participant_left", participant_id=carol.participant_id, timeout=15)
        await _decodes(bob, {a_id})


def _videos(client: CascadeClient) -> int:
    """Video tracks of ``client`` that are live and decoded frames."""
    return sum(
        1 for t in client.tracks.values() if t.kind == "video" and not t.ended and t.frames_decoded
    )


def _seen(client: CascadeClient) -> set[str]:
    """The other participants as ``client`` was told: its join's list, then events."""
    seen = {p["participant_id"] for p in client.room_state.get("participants", [])}
    for event in client.events:
        if event.get("type") == "participant_joined":
            seen.add(event["participant"]["participant_id"])
        elif event.get("type") == "participant_left":
            seen.discard(event["participant_id"])
    return seen


async def _get(server: NodeServer, path: str):
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(server.url + path) as response:
        assert response.status == 200
        return await response.json()


async def test_draining_a_workers_node_moves_its_participants_and_media_continues() -> None:
    """Participants on both workers of a draining node are told to move by their worker,
    rejoin the other node, and keep decoding on the same tracks."""
    first = await start("eu", [], PARIS, workers=2)
    second = await start("eu", [first[1].directory.address], FRANKFURT)
    nodes = [first, second]
    clients: list[CascadeClient] = []
    try:
        for _, overlay in nodes:
            await wait_for_nodes(overlay, 2)
        draining, other = first[0], second[0]
        assert isinstance(draining, Supervisor)
        for i, (server, worker) in enumerate(((draining, 0), (draining, 1), (other, None))):
            if worker is not None:
                pin(draining, worker)
            client = CascadeClient(server.url)
            await client.connect()
            await client.join(ROOM, token(ROOM, f"p{i}"), name=f"p{i}", follow_placement=False)
            await client.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
            clients.append(client)
        assert await until(lambda: all(_videos(c) == 2 for c in clients), 40)
        tracks_before = {id(c): {id(t) for t in c.tracks.values()} for c in clients}
        errors = {id(t): t.stats()["decode_errors"] for c in clients for t in c.tracks.values()}

        assert draining.start_drain()
        assert await until(lambda: draining.drained.is_set(), 40)
        assert draining.drain_status()["disconnected"] == 0
        assert all(c.url == other.url for c in clients)
        assert other.rooms.participant_count() == 3
        assert [len(c.moves) for c in clients] == [1, 1, 0]
        assert await until(lambda: all(_videos(c) == 2 for c in clients), 30)
        for client in clients:
            assert await grows(client)
            live = {id(t) for t in client.tracks.values() if not t.ended}
            if live != tracks_before[id(client)]:
                print("CLIENT", clients.index(client), client.moves)
                for e in client.events:
                    print("  ", {k: v for k, v in e.items() if k not in ("sdp", "producers")})
            assert live == tracks_before[id(client)]
            for track in client.tracks.values():
                assert track.stats()["decode_errors"] == errors[id(track)], track.stats()
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        for server, overlay in reversed(nodes):
            await overlay.stop()
            await server.stop()


async def test_a_killed_worker_ends_only_its_relayed_producers_and_its_publisher_comes_back():
    async with workers_and_single() as (eu, us), joiner() as client:
        (_alice, a_id), (carol, c_id) = await _one_publisher_per_worker(eu, client)
        bob = await client(us.url, "bob")
        await _decodes(bob, {a_id, c_id})
        kept = next(t for t in bob.tracks.values() if t.producer_id == a_id)
        watched = next(t for t in bob.tracks.values() if t.producer_id == c_id)

        pin(eu, 0)  # carol's rejoin goes to the surviving worker
        victim = eu.pool.workers[1]
        old_pid = victim.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await carol.wait_event("reconnect", timeout=20)
        # The other node keeps alice (the other worker) all along ...
        before = kept.frames_decoded
        assert await until(lambda: kept.frames_decoded > before + 10, 15)
        # ... and gets carol back, republished from worker 0, on the track it had.
        frames = watched.frames_decoded
        if not await until(lambda: watched.frames_decoded > frames + 10, 40):
            for e in bob.events:
                print("EVENT", {k: v for k, v in e.items() if k not in ("sdp",)})
            for t in bob.tracks.values():
                print("TRACK", t.producer_id, t.source, t.frames_decoded, t.stats())
            raise AssertionError("carol's track never resumed")
        assert not watched.ended
        assert worker_of(eu, carol) == 0
        assert us.relay is not None
        link = us.relay.links[eu.relay_public_key]
        assert await until(lambda: c_id not in link.producers, 20)
        assert a_id in link.producers and len(link.producers) == 2
        assert await until(lambda: victim.up and victim.pid != old_pid, 20)
        assert kept.stats()["decode_errors"] == 0
