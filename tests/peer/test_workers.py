"""A node over worker processes: real supervisor, real worker processes, real aiortc clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
from collections.abc import AsyncIterator

import psutil
import pytest

from peer.client import CascadeClient
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.packing import Packing, PackReason
from peer.server import NodeConfig
from peer.supervisor import Supervisor
from tests.conftest import SECRET, token


def _free_port_pair() -> int:
    """A UDP port P with P + 1 free too (each worker binds its own ICE port)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port < 65535:
                with (
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
                    contextlib.suppress(OSError),
                ):
                    b.bind(("127.0.0.1", port + 1))
                    return port
    raise RuntimeError("no two adjacent free UDP ports")


def ice_ports(client: CascadeClient) -> set[int]:
    """The ports in the node's ICE candidates, as this client got them."""
    sdps = [pc.remoteDescription.sdp for pc in (client._publish_pc, client._subscribe_pc) if pc]
    return {int(p) for sdp in sdps for p in re.findall(r"udp \d+ \S+ (\d+) typ host", sdp)}


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    # max_cpu far above any reading: the clients share this machine's cores with the workers.
    config = NodeConfig(port=0, api_secret=SECRET, max_cpu=100.0, ice_port=_free_port_pair())
    node = Supervisor(config, workers=2)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


@pytest.fixture
async def join(supervisor: Supervisor):
    made: list[CascadeClient] = []

    async def make(room: str, identity: str) -> CascadeClient:
        client = CascadeClient(supervisor.url)
        await client.connect()
        made.append(client)
        await client.join(room, token(room, identity))
        return client

    yield make
    await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


def pin(supervisor: Supervisor, worker_id: int) -> None:
    """Place the next participants on ``worker_id`` (the policy has its own table tests)."""
    supervisor.pool.choose = lambda room, watermark: Packing(  # type: ignore[method-assign]
        worker_id, PackReason.UNDER_WATERMARK
    )


def worker_of(supervisor: Supervisor, client: CascadeClient) -> int:
    found = [
        h.worker_id
        for h in supervisor.pool.workers
        for conn in h.conns
        if supervisor.conns[conn].participant_id == client.participant_id
    ]
    assert len(found) == 1
    return found[0]


async def test_room_on_a_worker_decodes_video_and_audio(supervisor, join) -> None:
    pub = await join("r1", "alice")
    await pub.publish([PatternVideoTrack(320, 240, periodic_keyframes=False), ToneAudioTrack()])
    subs = [await join("r1", f"bob{i}") for i in range(2)]
    for sub in subs:
        (video,) = await sub.wait_for_tracks(1, "video", timeout=30)
        await sub.wait_for_tracks(1, "audio", timeout=30)
        assert (video.width, video.height) == (320, 240)
    await asyncio.sleep(1.0)
    for sub in subs:
        for track in sub.tracks.values():
            assert track.stats()["decode_errors"] == 0
            assert track.frames_decoded > 5
    # Low load: packing keeps the whole room on one worker, the other has nobody.
    workers = {worker_of(supervisor, c) for c in [pub, *subs]}
    assert len(workers) == 1
    # everyone's media on that worker's one ICE port (the node's --ice-port + its index)
    assert supervisor.config.ice_port is None  # the supervisor carries no media
    base = supervisor.pool.setup.ice_port
    assert base and all(ice_ports(c) == {base + min(workers)} for c in [pub, *subs])
    stats = await (await _get(supervisor, "/stats"))
    assert stats["totals"]["consumers"] == 4
    assert stats["codec_instances"] == 0
    assert set(stats["rooms"]["r1"]) == {pub.participant_id, *(s.participant_id for s in subs)}
    idle = [w for w in stats["workers"] if w["worker_id"] not in workers]
    assert idle and idle[0]["participants"] == 0 and idle[0]["up"]
    # each worker's own port, as an operator reads it
    assert [w["ice_port"]["port"] for w in stats["workers"]] == [base, base + 1]


async def test_killed_worker_participants_told_others_keep_receiving(supervisor, join) -> None:
    pin(supervisor, 0)
    pub0 = await join("a", "alice")
    await pub0.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    sub0 = await join("a", "bob")
    pin(supervisor, 1)
    frank = await join("a", "frank")  # room "a" spans both workers
    pub1 = await join("b", "carol")
    await pub1.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    sub1 = await join("b", "dave")
    await sub0.wait_for_tracks(1, "video", timeout=30)
    await frank.wait_for_tracks(1, "video", timeout=30)
    (kept,) = await sub1.wait_for_tracks(1, "video", timeout=30)
    victim = supervisor.pool.workers[0]
    old_pid = victim.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    (watched,) = [t for t in sub0.tracks.values() if t.kind == "video"]
    for client in (pub0, sub0):
        event = await client.wait_event("reconnect", timeout=20)
        assert event["url"] == supervisor.url
    # frank, on the surviving worker, sees the dead worker's participants leave.
    await frank.wait_event("participant_left", participant_id=pub0.participant_id, timeout=20)
    await frank.wait_event("producer_removed", reason="origin_lost", timeout=20)
    # Participants of the other worker keep receiving.
    before = kept.frames_decoded
    await asyncio.sleep(1.5)
    assert kept.frames_decoded > before + 5
    assert kept.stats()["decode_errors"] == 0
    # The worker comes back, with a new process, and takes participants again.
    for _ in range(200):
        if victim.up and victim.pid != old_pid:
            break
        await asyncio.sleep(0.05)
    assert victim.up and victim.pid != old_pid and victim.restarts == 1
    # The SDK rejoined by itself: bob decodes alice again, on the track he had.
    frames = watched.frames_decoded
    for _ in range(400):
        if watched.frames_decoded > frames + 10:
            break
        await asyncio.sleep(0.05)
    assert watched.frames_decoded > frames + 10 and not watched.ended
    assert [m["reason"] for m in pub0.moves] == ["reconnect"]
    pin(supervisor, 0)
    again = await join("a", "alice-again")
    await again.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    watcher = await join("a", "erin")
    await watcher.wait_for_tracks(1, "video", timeout=30)
    assert worker_of(supervisor, watcher) == 0
    # the new process bound the dead one's ICE port again
    assert ice_ports(watcher) == {supervisor.pool.setup.ice_port}


async def test_supervisor_stop_leaves_no_process() -> None:
    node = Supervisor(NodeConfig(port=0, api_secret=SECRET), workers=2)
    await node.start()
    pids = [h.pid for h in node.pool.workers]
    assert all(pid is not None and psutil.pid_exists(pid) for pid in pids)
    await node.stop()
    for pid in pids:
        assert pid is not None
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(node.pool.socket_path)


async def _get(supervisor: Supervisor, path: str):
    import aiohttp

    async def fetch():
        async with aiohttp.ClientSession() as session, session.get(supervisor.url + path) as r:
            return await r.json()

    return fetch()


async def test_room_spanning_two_workers(supervisor, join) -> None:
    """Publishers and subscribers of one room on both workers: everyone decodes everyone,
    sees everyone, and pause/resume (a keyframe request through the pipe) works across."""
    pin(supervisor, 0)
    alice = await join("span", "alice")
    await alice.publish([PatternVideoTrack(320, 240, periodic_keyframes=False), ToneAudioTrack()])
    pin(supervisor, 1)
    bob = await join("span", "bob")
    assert alice.participant_id in {p["participant_id"] for p in bob.room_state["participants"]}
    carol = await join("span", "carol")
    await carol.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    pin(supervisor, 0)
    dave = await join("span", "dave")
    assert [worker_of(supervisor, c) for c in (alice, bob, carol, dave)] == [0, 1, 1, 0]
    await alice.wait_event(
        "participant_joined", participant={"participant_id": bob.participant_id, "name": "bob"}
    )
    # bob (worker 1) gets alice's video and audio through the pipe, carol's locally;
    # dave (worker 0) gets carol's through the pipe, alice's locally.
    videos = await bob.wait_for_tracks(2, "video", timeout=30)
    assert sorted((t.width, t.height) for t in videos) == [(160, 120), (320, 240)]
    await bob.wait_for_tracks(1, "audio", timeout=30)
    videos = await dave.wait_for_tracks(2, "video", timeout=30)
    assert sorted((t.width, t.height) for t in videos) == [(160, 120), (320, 240)]
    (from_carol,) = await alice.wait_for_tracks(1, "video", timeout=30)
    assert (from_carol.width, from_carol.height) == (160, 120)
    await asyncio.sleep(1.0)
    for client in (alice, bob, dave):
        for track in client.tracks.values():
            assert track.stats()["decode_errors"] == 0
            assert track.frames_decoded > 5
    # One pipe flow per producer per worker that consumes it: worker 1 piped alice's two
    # producers once, though bob consumes them (carol too).
    stats = await (await _get(supervisor, "/stats"))
    piped = {w["worker_id"]: sorted(w["piped_producers"]) for w in stats["workers"]}
    assert piped == {
        0: sorted(p["producer_id"] for p in carol.producers),
        1: sorted(p["producer_id"] for p in alice.producers),
    }
    assert set(stats["rooms"]["span"]) == {c.participant_id for c in (alice, bob, carol, dave)}
    # Pause and resume across the pipe: the resumed consumer waits for a keyframe, which
    # only a keyframe request through the pipe to alice's worker brings.
    piped = next(t for t in bob.tracks.values() if t.kind == "video" and t.width == 320)
    await bob.pause(piped.consumer_id)
    await asyncio.sleep(0.5)
    paused_at = piped.frames_decoded
    await asyncio.sleep(0.5)
    assert piped.frames_decoded <= paused_at + 1
    await bob.resume(piped.consumer_id)
    for _ in range(200):
        if piped.frames_decoded > paused_at + 5:
            break
        await asyncio.sleep(0.05)
    assert piped.frames_decoded > paused_at + 5
    assert piped.stats()["decode_errors"] == 0
    # A publisher on one worker leaves: subscribers on the other are told.
    await alice.close()
    await bob.wait_event("participant_left", participant_id=alice.participant_id, timeout=20)
    await bob.wait_event("producer_removed", timeout=20)


class LossyPipe:
    """A pipe over loopback UDP through this test process, dropping a share of the flow
    datagrams each way (control datagrams, tagged 0, pass: a lost one costs a timeout)."""

    def __init__(self, loss: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.dropped = 0
        self._relays: list[socket.socket] = []

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        def udp() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            return sock

        a, relay_a, relay_b, b = udp(), udp(), udp(), udp()
        a.connect(relay_a.getsockname())
        relay_a.connect(a.getsockname())
        b.connect(relay_b.getsockname())
        relay_b.connect(b.getsockname())
        loop = asyncio.get_running_loop()
        for src, dst in ((relay_a, relay_b), (relay_b, relay_a)):
            loop.add_reader(src.fileno(), self._forward, src, dst)
        self._relays += [relay_a, relay_b]
        return a, b

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except (BlockingIOError, ConnectionRefusedError):
                return
            if data[:4] != b"\0\0\0\0" and self.rng.random() < self.loss:
                self.dropped += 1
                continue
            with contextlib.suppress(OSError):
                dst.send(data)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._relays:
            loop.remove_reader(sock.fileno())
            sock.close()


async def test_nack_repair_across_a_lossy_pipe(supervisor, join) -> None:
    """3 % loss each way on the pipe between the workers: the pipe's NACKs are answered
    from the origin worker's cache and the subscriber decodes without errors."""
    lossy = LossyPipe(0.03, seed=21)
    supervisor.pipe_sockets = lossy.sockets
    try:
        pin(supervisor, 0)
        alice = await join("lossy", "alice")
        await alice.publish(
            [PatternVideoTrack(320, 240, bitrate=600_000, periodic_keyframes=False)]
        )
        pin(supervisor, 1)
        bob = await join("lossy", "bob")
        (track,) = await bob.wait_for_tracks(1, "video", timeout=30)
        frames = track.frames_decoded
        await asyncio.sleep(5.0)
        assert lossy.dropped > 5  # the pipe really lost packets
        assert track.stats()["decode_errors"] == 0
        assert track.frames_decoded - frames > 60
        # Repairs counted so far (asked of the worker): on a loaded machine the first
        # losses and their repairs can come late in the window.
        repaired = 0
        for _ in range(50):
            stats = await (await _get(supervisor, "/stats"))
            repaired = stats["workers"][1]["pipe_repaired"]
            if repaired:
                break
            await asyncio.sleep(0.2)
        assert repaired > 0
    finally:
        lossy.close()


async def test_idle_workers_run_no_timers(supervisor, join) -> None:
    """A worker hosting nobody sleeps: it does not wake up while the other one carries a
    call (counted as voluntary context switches of its process)."""
    pin(supervisor, 0)
    pub = await join("busy", "alice")
    await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    sub = await join("busy", "bob")
    await sub.wait_for_tracks(1, "video", timeout=30)
    idle = psutil.Process(supervisor.pool.workers[1].pid)
    busy = psutil.Process(supervisor.pool.workers[0].pid)
    idle_before = idle.num_ctx_switches().voluntary
    busy_before = busy.num_ctx_switches().voluntary
    await asyncio.sleep(2.0)
    assert busy.num_ctx_switches().voluntary - busy_before > 40  # it does forward
    assert idle.num_ctx_switches().voluntary - idle_before <= 2


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_cli_node_with_workers_leaves_no_process(stop_signal) -> None:
    """``cascade node --workers 2``: stopped (SIGTERM) or killed (SIGKILL), the supervisor
    leaves no worker process behind."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, CASCADE_EXTENSIONS="none", CASCADE_API_SECRET=SECRET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer.cli", "node", "--port", "0", "--workers", "2",
         "--log-level", "WARNING", "--no-uvloop"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("cascade node listening on "), line
        url = line.split()[-1]
        assert proc.stdout.readline().strip() == "media workers: 2 processes"
        pids: list[int] = []
        for _ in range(100):
            with urllib.request.urlopen(url + "/stats", timeout=5) as resp:
                workers = json.load(resp)["workers"]
            pids = [w["pid"] for w in workers if w["up"]]
            if len(pids) == 2:
                break
            time.sleep(0.1)
        assert len(pids) == 2
        children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert set(pids) <= children
        proc.send_signal(stop_signal)
        proc.wait(30)
        for _ in range(100):
            if not any(psutil.pid_exists(pid) for pid in pids):
                break
            time.sleep(0.1)
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        assert all(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in alive)
        if stop_signal == signal.SIGTERM:
            assert proc.returncode == 0
            assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_consumers_refused_by_a_worker_count_on_the_node() -> None:
    # Two consumers for the node: one per worker, so a worker's second consumer is refused.
    config = NodeConfig(port=0, api_secret=SECRET, max_cpu=100.0, max_consumers=2)
    node = Supervisor(config, workers=2)
    await node.start()
    clients: list[CascadeClient] = []
    try:
        pin(node, 0)
        for who in ("alice", "bob", "carol"):
            client = CascadeClient(node.url)
            clients.append(client)
            await client.connect()
            await client.join("full", token("full", who))
            if who == "alice":
                await client.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
        await clients[1].wait_for_tracks(1, "video", timeout=30)
        for _ in range(100):  # workers report their counters once a second
            if node.node.consumers_refused >= 1:
                break
            await asyncio.sleep(0.1)
        assert node.node.consumers_refused == 1
        victim = node.pool.workers[0]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        for _ in range(200):
            if victim.restarts == 1 and victim.up:
                break
            await asyncio.sleep(0.05)
        assert node.node.consumers_refused == 1  # a counter: kept across the restart
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await node.stop()


async def test_a_taken_worker_ice_port_fails_the_start_before_any_worker() -> None:
    base = _free_port_pair()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", base + 1))
        node = Supervisor(NodeConfig(port=0, api_secret=SECRET, ice_port=base), workers=2)
        with pytest.raises(OSError, match=f"ICE port 127.0.0.1:{base + 1} of worker 1"):
            await node.start()
        assert all(h.pid is None for h in node.pool.workers)
        await node.stop()
