"""Soak: a 1 -> 10 call on a node started from the CLI, with join/leave churn and a trickle of
hostile input on every port (HTTP/WebSocket, ICE, DHT, QUIC relay), for a fixed duration.

At the end the node's RSS must be within 30 MB of its value after warm-up, its file descriptors
and asyncio tasks back to their baseline, and the stable subscribers must have decoded without
a single error. Everything stays on 127.0.0.1.

    python -m bench.soak --seconds 600

Prints a table and ends with one JSON line. tests/test_soak.py runs a 60-second version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.hostile import hostile_datagrams, send_datagrams
from peer import aiortc_adapter as rtc
from peer.client import CascadeClient, SubscribedTrack
from peer.media import PatternVideoTrack
from peer.tokens import issue_token

ROOT = Path(__file__).resolve().parent.parent
ROOM = "soak"
RSS_BUDGET_MB = 30.0
CRASH_SHAPES = (
    '{"type": ["join"]}',
    '{"type": {"join": 1}}',
    '{"type": "ping", "id": ' + "[" * 1000 + "]" * 1000 + "}",
    "not json",
    '{"type": "join", "room": "soak\\n", "token": "x"}',
    '{"type": "publish", "sdp": "garbage garbage"}',
)


@dataclass
class SoakReport:
    """What one soak run measured (sizes in MB)."""

    seconds: float
    warmup: float
    stable_subscribers: int
    churners: int
    rss_baseline_mb: float = 0.0
    rss_final_mb: float = 0.0
    rss_growth_mb: float = 0.0
    rss_ratio: float = 0.0
    fds_baseline: int = 0
    fds_final: int = 0
    tasks_baseline: int = 0
    tasks_final: int = 0
    # Coroutine name -> change in its task count between the baseline and the end.
    tasks_grown: dict[str, int] = field(default_factory=dict)
    decode_errors: int = 0
    frames_per_subscriber_min: int = 0
    churn_cycles: int = 0
    churn_errors: int = 0
    hostile_datagrams: int = 0
    hostile_messages: int = 0
    half_requests: int = 0
    bad_messages: int = 0
    datagrams_dropped: int = 0
    limits: dict[str, int] = field(default_factory=dict)
    hostile: bool = True
    ok: bool = False

    def check(self) -> list[str]:
        """What failed (empty if the run passed)."""
        failures = []
        if self.rss_growth_mb > RSS_BUDGET_MB:
            failures.append(f"RSS grew {self.rss_growth_mb:.1f} MB (budget {RSS_BUDGET_MB})")
        if self.fds_final > self.fds_baseline:
            failures.append(f"fds {self.fds_baseline} -> {self.fds_final}")
        if self.tasks_final > self.tasks_baseline:
            failures.append(f"asyncio tasks {self.tasks_baseline} -> {self.tasks_final}")
        if self.decode_errors:
            failures.append(f"{self.decode_errors} decode errors")
        if self.frames_per_subscriber_min <= 0:
            failures.append("a stable subscriber stopped decoding")
        return failures


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeProcess:
    """A node started the way users start it: ``cascade node`` in its own process (uvloop)."""

    def __init__(self) -> None:
        self.secret = secrets.token_urlsafe(32)
        self.admin_token = secrets.token_urlsafe(32)
        self.port = free_port(socket.SOCK_STREAM)
        self.dht_port = free_port(socket.SOCK_DGRAM)
        self.relay_port = free_port(socket.SOCK_DGRAM)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        cmd = [
            sys.executable, "-m", "peer.cli", "node", "--port", str(self.port),
            "--region", "soak", "--dht-port", str(self.dht_port),
            "--relay-port", str(self.relay_port), "--max-cpu", "100",
            "--log-level", "WARNING", "--workers", "1",
        ]  # fmt: skip
        env = {
            **os.environ,
            "CASCADE_API_SECRET": self.secret,
            "CASCADE_ADMIN_TOKEN": self.admin_token,
        }
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/healthz") as r:
                        if r.status == 200:
                            return
                if self.proc.poll() is not None:
                    raise RuntimeError("node exited at start")
                await asyncio.sleep(0.1)
        raise RuntimeError("node did not start")

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.url + "/stats") as r:
            data: dict[str, Any] = await r.json()
            return data

    async def task_census(self) -> dict[str, int]:
        """The node's asyncio tasks by coroutine (``GET /admin/tasks``)."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.url + "/admin/tasks", headers=headers) as r,
        ):
            data: dict[str, Any] = await r.json()
            return dict(data["by_coroutine"])

    def token(self, identity: str) -> str:
        return issue_token(self.secret, ROOM, identity, ttl=7200)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def candidate_ports(sdp: str) -> set[tuple[str, int]]:
    """(host, port) of the a=candidate lines of an SDP (the node's ICE ports)."""
    ports = set()
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            ports.add((parts[4], int(parts[5])))
    return ports


def fake_quic_initial() -> bytes:
    dcid, scid = os.urandom(8), os.urandom(8)
    head = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([8]) + dcid + bytes([8]) + scid + b"\0"
    body = 1200 - len(head) - 2
    return head + (0x4000 | body).to_bytes(2, "big") + os.urandom(body)


class Soak:
    """The scenario; :meth:`run` returns a :class:`SoakReport`."""

    def __init__(self, seconds: float, warmup: float, stable: int, churners: int) -> None:
        self.report = SoakReport(seconds, warmup, stable, churners)
        self.node = NodeProcess()
        self.clients: list[CascadeClient] = []
        self.tracks: list[SubscribedTrack] = []
        self.churn_on = asyncio.Event()
        self.in_room = 0
        self.stopping = False
        self.ice_ports: set[tuple[str, int]] = set()
        self._datagrams: Iterator[bytes] = itertools.cycle(hostile_datagrams())
        self.with_hostile = True

    async def client(self, identity: str, **kw: Any) -> CascadeClient:
        c = CascadeClient(self.node.url, **kw)
        await c.connect()
        await c.join(ROOM, self.node.token(identity))
        return c

    async def churner(self, n: int) -> None:
        rng = random.Random(n)
        for cycle in itertools.count():
            await self.churn_on.wait()
            if self.stopping:
                return
            c = CascadeClient(self.node.url, count_only=True)
            self.in_room += 1
            try:
                await c.connect()
                await c.join(ROOM, self.node.token(f"churn{n}-{cycle}"))
                # Sometimes leave at once, sometimes after media flowed for a while.
                if rng.random() < 0.3:
                    await asyncio.sleep(rng.uniform(0, 0.2))
                else:
                    for _ in range(300):  # media arrives (counted, not decoded)
                        if c.counter is not None and c.counter.packets() > 0:
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise TimeoutError("no media for a churning subscriber")
                    await asyncio.sleep(rng.uniform(1.0, 3.0))
                self.report.churn_cycles += 1
            except Exception as exc:
                self.report.churn_errors += 1
                if os.environ.get("SOAK_DEBUG"):
                    print("churn error:", repr(exc), file=sys.stderr)
            finally:
                await c.close()
                self.in_room -= 1
            await asyncio.sleep(rng.uniform(0.5, 1.5))

    async def hostile(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp_ports = {("127.0.0.1", self.node.dht_port), ("127.0.0.1", self.node.relay_port)}
        try:
            for tick in itertools.count():
                batch = [next(self._datagrams) for _ in range(10)]
                self.report.hostile_datagrams += send_datagrams(
                    self.ice_ports | udp_ports, batch, sock
                )
                send_datagrams([("127.0.0.1", self.node.relay_port)], [fake_quic_initial()], sock)
                if tick % 4 == 0:
                    await self.hostile_message(CRASH_SHAPES[tick // 4 % len(CRASH_SHAPES)])
                if tick % 10 == 0:
                    await self.half_request()
                await asyncio.sleep(0.5)
        finally:
            sock.close()

    async def hostile_message(self, text: str) -> None:
        url = self.node.url.replace("http", "ws") + "/ws"
        with contextlib.suppress(Exception):
            async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
                await ws.send_str(text)
                await ws.receive(timeout=5)
                self.report.hostile_messages += 1

    async def half_request(self) -> None:
        with contextlib.suppress(Exception):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.node.port)
            writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n")  # never finished
            self.report.half_requests += 1
            # the node closes it after its header timeout; read to EOF in the background
            task = asyncio.ensure_future(asyncio.wait_for(reader.read(), 30))
            task.add_done_callback(lambda _: writer.close())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def pause_churn(self) -> None:
        self.churn_on.clear()
        while self.in_room:
            await asyncio.sleep(0.1)

    async def settle(self, baseline: dict[str, int], timeout: float = 30.0) -> dict[str, int]:
        proc: dict[str, int] = {}
        for _ in range(int(timeout / 0.5)):
            proc = (await self.node.stats())["process"]
            if (
                proc["fds"] <= baseline["fds"]
                and proc["asyncio_tasks"] <= baseline["asyncio_tasks"]
            ):
                break
            await asyncio.sleep(0.5)
        return proc

    async def run(self) -> SoakReport:
        self._background: set[asyncio.Future[Any]] = set()
        r = self.report
        await self.node.start()
        tasks: list[asyncio.Future[None]] = []
        try:
            pub = await self.client("publisher")
            self.clients.append(pub)
            # Video only: the decoding subscribers share this process's CPU with the
            # churners and the hostile sender; audio decoding adds nothing to what is soaked.
            await pub.publish([PatternVideoTrack(160, 120)])
            for i in range(r.stable_subscribers):
                sub = await self.client(f"viewer{i}")
                self.clients.append(sub)
                self.tracks += await sub.wait_for_tracks(1, "video", timeout=30)
            for c in self.clients:
                for pc in (c._publish_pc, c._subscribe_pc):
                    if pc is not None and pc.remoteDescription is not None:
                        self.ice_ports |= candidate_ports(pc.remoteDescription.sdp)
            tasks = [asyncio.ensure_future(self.churner(n)) for n in range(r.churners)]
            if self.with_hostile:
                tasks.append(asyncio.ensure_future(self.hostile()))
            self.churn_on.set()
            await asyncio.sleep(r.warmup)
            await self.pause_churn()
            await asyncio.sleep(2.0)
            base = (await self.node.stats())["process"]
            census0 = await self.node.task_census()
            frames0 = [t.frames_decoded for t in self.tracks]
            self.churn_on.set()
            await asyncio.sleep(r.seconds)
            await self.pause_churn()
            self.stopping = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for t in list(self._background):
                t.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            final = await self.settle(base)
            census1 = await self.node.task_census()
            r.tasks_grown = {
                name: census1.get(name, 0) - census0.get(name, 0)
                for name in sorted(set(census0) | set(census1))
                if census1.get(name, 0) != census0.get(name, 0)
            }
            if os.environ.get("SOAK_DEBUG") and self.node.proc is not None:
                import psutil

                proc = psutil.Process(self.node.proc.pid)
                for conn in proc.net_connections(kind="all"):
                    print("node socket:", conn, file=sys.stderr)
            stats = await self.node.stats()
            r.rss_baseline_mb = base["rss_bytes"] / 1e6
            r.rss_final_mb = final["rss_bytes"] / 1e6
            r.rss_growth_mb = r.rss_final_mb - r.rss_baseline_mb
            r.rss_ratio = r.rss_final_mb / r.rss_baseline_mb
            r.fds_baseline, r.fds_final = base["fds"], final["fds"]
            r.tasks_baseline, r.tasks_final = base["asyncio_tasks"], final["asyncio_tasks"]
            r.decode_errors = sum(t.decode_errors.count for t in self.tracks if t.decode_errors)
            r.frames_per_subscriber_min = min(
                t.frames_decoded - f for t, f in zip(self.tracks, frames0, strict=True)
            )
            r.bad_messages = int(stats["bad_messages"])
            r.datagrams_dropped = int(stats["datagrams_dropped"])
            r.limits = dict(stats["limits"])
            r.ok = not r.check()
            return r
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
            self.node.stop()


async def soak(
    seconds: float,
    *,
    warmup: float = 10.0,
    stable: int = 7,
    churners: int = 3,
    hostile: bool = True,
) -> SoakReport:
    """Run the soak scenario for ``seconds`` after ``warmup``."""
    rtc.set_ice_addresses(["127.0.0.1"])
    scenario = Soak(seconds, warmup, stable, churners)
    scenario.with_hostile = hostile
    report = await scenario.run()
    report.hostile = hostile
    return report


def print_table(r: SoakReport) -> None:
    print(f"soak: {r.seconds:.0f} s after {r.warmup:.0f} s warm-up, 1 -> {r.stable_subscribers}"
          f" stable + {r.churners} churning subscribers")  # fmt: skip
    print(f"  RSS        {r.rss_baseline_mb:8.1f} MB -> {r.rss_final_mb:8.1f} MB"
          f"  ({r.rss_growth_mb:+.1f} MB, x{r.rss_ratio:.3f})")  # fmt: skip
    print(f"  fds        {r.fds_baseline:8d}    -> {r.fds_final:8d}")
    print(f"  tasks      {r.tasks_baseline:8d}    -> {r.tasks_final:8d}")
    for name, change in r.tasks_grown.items():
        print(f"    {change:+4d}  {name}")
    print(f"  decode errors {r.decode_errors}, min frames per stable subscriber "
          f"{r.frames_per_subscriber_min}")  # fmt: skip
    print(f"  churn cycles {r.churn_cycles} ({r.churn_errors} errors), hostile datagrams "
          f"{r.hostile_datagrams}, messages {r.hostile_messages}, half requests "
          f"{r.half_requests}")  # fmt: skip
    for failure in r.check():
        print(f"  FAILED: {failure}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--stable", type=int, default=7)
    ap.add_argument("--churners", type=int, default=3)
    ap.add_argument("--no-hostile", action="store_true", help="churn only (for comparison)")
    args = ap.parse_args(argv)
    started = time.monotonic()
    report = asyncio.run(
        soak(
            args.seconds,
            warmup=args.warmup,
            stable=args.stable,
            churners=args.churners,
            hostile=not args.no_hostile,
        )
    )
    print_table(report)
    sys.stdout.flush()
    print(json.dumps({**asdict(report), "wall_seconds": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
