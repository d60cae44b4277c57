"""Vertical scaling with worker processes: one node, 1 or 2 media workers, each held to the
same CPU slice by a cgroup v1 ``cpu`` quota (root), the rest of the machine left to the load
generator (this process: SDK publishers and counting subscribers, plus the supervisor).

    python -m bench.workers                      # everything below
    python -m bench.workers --only signaling     # the cost of forwarding signaling over IPC

Parts:
- ``signaling``: ping round trip through a single-process node against one forwarded to a
  worker over its Unix socket (no quota).
- ``capacity``: rooms of 1 publisher (video + audio) and ``--room-subs`` subscribers are added
  one per step; a step passes at 0 decode errors (one decoding probe per worker), at most
  0.1 % packets lost at the subscribers, no subscriber stalled (its stream stopped) and at
  least 97 % of the step's rate delivered (rooms x the first step's packets/s: a saturated
  worker first builds a backlog, which is not loss yet); a step that fails is measured once
  more and fails only if that window fails too (``--no-confirm``: one window). Reported: the
  rate of the highest
  step that passed, with 1 worker and with 2 workers,
  and where packing put each room (at low load every participant is on worker 0; the second
  worker takes the overflow). The packing
  watermark is ``--watermark`` of the slice (a worker's CPU cannot pass its quota).
  ``--repeat N`` runs 1 and 2 workers alternately N times and reports the median of the
  pairs' ratios; ``--period`` shortens the cgroup period (a 5 % slice as 1 ms every 20 ms rather
  than 5 ms every 100 ms throttles a worker in shorter spells).
- ``spanning``: CPU of the workers per forwarded packet for one room (1 publisher,
  ``--span-subs`` subscribers) spanning 2 workers (publisher and half the subscribers on
  worker 0, the other half on worker 1, through the pipe) against the same room on 1 worker.
- ``overlay``: two ``cascade node`` processes in one overlay; the publisher on one, and
  ``--overlay-subs`` subscribers on the other, which runs 2 workers (the subscribers spread
  over both) or, as the baseline in the same run, 1 process. Reported: relay flows (one per
  producer, whichever workers consume it), the receiving node's CPU per forwarded packet
  (supervisor + workers against the single process) and the supervisor's share (the relay
  end: QUIC plus one pipe hop per consuming worker). No quota.

Prints ratios, then one JSON line. Short steps: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil

from peer import aiortc_adapter as rtc
from peer.client import CascadeClient
from peer.config import parse_ice_port
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.packing import Packing, PackReason
from peer.server import NodeConfig, NodeServer
from peer.supervisor import Supervisor
from peer.tokens import issue_token

SECRET = "bench-workers-secret-0123456789abcdef0123"
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
DELIVERED = 0.97  # a capacity step passes if subscribers got this share of what was sent


# -- cgroup v1 cpu quota ---------------------------------------------------------------


class CpuSlices:
    """One cgroup per worker under the v1 ``cpu`` controller, each with the same quota."""

    def __init__(self, quota_us: int, period_us: int = PERIOD_US) -> None:
        self.quota_us = quota_us
        self.period_us = period_us
        self.root = CGROUP_CPU / f"cascade-bench-{os.getpid()}"
        self.groups: list[Path] = []

    def available(self) -> str | None:
        """Why quotas cannot be used here, or None."""
        if os.geteuid() != 0:
            return "needs root (cgroup quotas)"
        if not (CGROUP_CPU / "cgroup.procs").exists():
            return f"no cgroup v1 cpu controller at {CGROUP_CPU}"
        return None

    def place(self, index: int, pid: int) -> None:
        """Put ``pid`` alone in slice ``index`` (created on first use)."""
        self.root.mkdir(exist_ok=True)
        group = self.root / f"w{index}"
        if group not in self.groups:
            group.mkdir(exist_ok=True)
            (group / "cpu.cfs_period_us").write_text(str(self.period_us))
            (group / "cpu.cfs_quota_us").write_text(str(self.quota_us))
            self.groups.append(group)
        (group / "cgroup.procs").write_text(str(pid))

    def throttled(self) -> dict[str, int]:
        """``nr_throttled`` of each slice (cpu.stat)."""
        out = {}
        for group in self.groups:
            stat = dict(
                line.split() for line in (group / "cpu.stat").read_text().splitlines() if line
            )
            out[group.name] = int(stat.get("nr_throttled", 0))
        return out

    def remove(self) -> None:
        """Move any process back to the root group and delete the slices."""
        for group in self.groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    (CGROUP_CPU / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        with contextlib.suppress(OSError):
            self.root.rmdir()


# -- load ------------------------------------------------------------------------------


def pin(node: Supervisor, worker_id: int) -> None:
    """Place the next participants on ``worker_id`` (spanning part only)."""
    node.pool.choose = lambda room, watermark: Packing(  # type: ignore[method-assign]
        worker_id, PackReason.UNDER_WATERMARK
    )


class Load:
    """The generator's clients."""

    def __init__(self, url: str, width: int, bitrate: int) -> None:
        self.url = url
        self.width = width
        self.bitrate = bitrate
        self.clients: list[CascadeClient] = []
        self.counters: list[rtc.RtpCounter] = []
        self.probes: list[Any] = []

    async def client(
        self, room: str, name: str, count_only: bool = True, counted: bool = True
    ) -> CascadeClient:
        c = CascadeClient(self.url, count_only=count_only, request_timeout=30)
        self.clients.append(c)
        await c.connect()
        await c.join(room, issue_token(SECRET, room, name))
        if c.counter is not None and counted:
            self.counters.append(c.counter)
        return c

    async def publisher(self, room: str) -> CascadeClient:
        pub = await self.client(room, f"{room}-pub", counted=False)
        height = self.width * 3 // 4
        await pub.publish(
            [
                PatternVideoTrack(self.width, height, 30, self.bitrate, periodic_keyframes=False),
                ToneAudioTrack(),
            ]
        )
        return pub

    async def probe(self, room: str) -> None:
        c = await self.client(room, f"{room}-probe", count_only=False)
        tracks = await c.wait_for_tracks(1, "video", timeout=30)
        self.probes.append(tracks[0])

    def snapshot(self) -> tuple[int, int, int, list[int]]:
        each = [c.packets() for c in self.counters]
        lost = sum(c.lost() for c in self.counters)
        errors = sum(t.stats()["decode_errors"] for t in self.probes)
        return sum(each), lost, errors, each

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)


async def wait_flowing(counters: list[rtc.RtpCounter], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.packets() > 20 for c in counters):
            return
        await asyncio.sleep(0.2)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


async def window(load: Load, pids: list[int], seconds: float) -> dict[str, float]:
    """Forwarded packets/s, loss, decode errors and CPU over ``seconds``."""
    me = psutil.Process()
    p0, l0, e0, each0 = load.snapshot()
    c0, g0, t0 = cpu_seconds(pids), me.cpu_times(), time.monotonic()
    await asyncio.sleep(seconds)
    p1, l1, e1, each1 = load.snapshot()
    # A subscriber whose stream died loses nothing it can count: count it as stalled.
    stalled = sum(1 for a, b in zip(each0, each1, strict=False) if b - a < 10)
    c1, g1, dt = cpu_seconds(pids), me.cpu_times(), time.monotonic() - t0
    packets = p1 - p0
    lost = l1 - l0
    return {
        "forwarded_pps": round(packets / dt),
        "loss": round(lost / max(1, packets + lost), 5),
        "decode_errors": e1 - e0,
        "stalled": stalled,
        "worker_cpu": round((c1 - c0) / dt, 3),
        "generator_cpu": round((g1.user + g1.system - g0.user - g0.system) / dt, 3),
        "cpu_us_per_packet": round((c1 - c0) * 1e6 / packets, 2) if packets else 0.0,
    }


@contextlib.asynccontextmanager
async def node(
    workers: int,
    watermark: float,
    slices: CpuSlices | None,
    uvloop: bool = True,
    ice_port: int | None = 0,
) -> AsyncIterator[Supervisor]:
    config = NodeConfig(
        ice_port=ice_port,
        port=0,
        api_secret=SECRET,
        max_cpu=100.0,
        max_consumers=100_000,
        max_egress_pps=1e9,
    )
    config.limits.max_ws_connections_per_ip = 0
    config.limits.join_rate = 0
    # Workers run uvloop, as `cascade node` does by default (--no-uvloop: asyncio's loop).
    server = Supervisor(config, workers, watermark=watermark, uvloop=uvloop)
    await server.start()
    try:
        if slices is not None:
            for handle in server.pool.workers:
                assert handle.pid is not None
                slices.place(handle.worker_id, handle.pid)
        yield server
    finally:
        await server.stop()


def per_packet_ratio(case: dict[str, Any], baseline: dict[str, Any]) -> float:
    """CPU per packet of ``case`` over ``baseline``'s."""
    return round(case["cpu_us_per_packet"] / max(0.01, baseline["cpu_us_per_packet"]), 3)


def worker_pids(server: Supervisor) -> list[int]:
    return [h.pid for h in server.pool.workers if h.pid is not None]


# -- parts -----------------------------------------------------------------------------


async def signaling(pings: int) -> dict[str, Any]:
    """Ping round trip: in-process node against a node forwarding to a worker."""

    async def rtts(url: str) -> list[float]:
        c = CascadeClient(url)
        await c.connect()
        await c.join("sig", issue_token(SECRET, "sig", "pinger"))
        out = []
        for _ in range(pings):
            t0 = time.perf_counter()
            await c.ping()
            out.append(time.perf_counter() - t0)
        await c.close()
        return out

    single = NodeServer(NodeConfig(port=0, api_secret=SECRET, max_cpu=100.0))
    await single.start()
    try:
        direct = await rtts(single.url)
    finally:
        await single.stop()
    async with node(2, 0.6, None) as server:
        forwarded = await rtts(server.url)
    d, f = statistics.median(direct) * 1e6, statistics.median(forwarded) * 1e6
    print(
        f"signaling: ping median {d:.0f} us in-process, {f:.0f} us through a worker "
        f"(+{f - d:.0f} us, {f / d:.2f}x)"
    )
    return {"ping_us_in_process": round(d), "ping_us_forwarded": round(f), "ratio": round(f / d, 2)}


def step_passed(result: dict[str, Any], expected: float) -> bool:
    """A capacity window passes: no loss past 0.1 %, no decode error, no stalled
    subscriber, and at least :data:`DELIVERED` of the step's rate delivered."""
    return bool(
        result["loss"] <= 0.001
        and result["decode_errors"] == 0
        and result["stalled"] == 0
        and result["forwarded_pps"] >= DELIVERED * expected
    )


async def capacity(workers: int, args: argparse.Namespace, slices: CpuSlices) -> dict[str, Any]:
    """Add rooms until a step loses more than 0.1 % or a probe sees a decode error."""
    watermark = args.watermark * slices.quota_us / slices.period_us
    steps: list[dict[str, Any]] = []
    best = best_rooms = 0
    per_room = 0.0  # forwarded packets/s of one room, from the first step
    async with node(workers, watermark, slices, args.uvloop, args.ice_port) as server:
        load = Load(server.url, args.width, args.bitrate)
        probed: set[int] = set()
        try:
            for step in range(1, args.max_rooms + 1):
                room = f"room{step}"
                await load.publisher(room)
                subs = [load.client(room, f"{room}-s{i}") for i in range(args.room_subs)]
                await asyncio.gather(*subs)
                where = sorted({h.worker_id for h in server.pool.workers if room in h.rooms})
                for worker_id in where:
                    if worker_id not in probed:
                        probed.add(worker_id)
                        await load.probe(room)
                await wait_flowing(load.counters)
                await asyncio.sleep(args.warmup)
                result: dict[str, Any] = dict(
                    await window(load, worker_pids(server), args.duration)
                )
                result["rooms"] = step
                result["workers_of_room"] = where
                result["participants"] = [len(h.conns) for h in server.pool.workers]
                if step == 1:
                    per_room = float(result["forwarded_pps"])
                # A worker past its slice first falls behind (a backlog in its socket
                # buffers, not loss yet): the step must deliver what its rooms send.
                expected = per_room * step
                result["expected_pps"] = round(expected)
                ok = step_passed(result, expected)
                if not ok and args.confirm:
                    # A throttled worker can fall behind for one window and catch up in
                    # the next: a step fails when two windows in a row do.
                    first = result
                    await asyncio.sleep(args.warmup)
                    result = dict(await window(load, worker_pids(server), args.duration))
                    result.update(
                        rooms=step,
                        workers_of_room=where,
                        participants=[len(h.conns) for h in server.pool.workers],
                        expected_pps=round(expected),
                        first_window=first,
                    )
                    ok = step_passed(result, expected)
                steps.append(result)
                print(
                    f"  {workers} worker(s), {step} rooms: {result['forwarded_pps']} pps "
                    f"of {expected:.0f}, "
                    f"loss {result['loss']:.3%}, decode errors {result['decode_errors']}, "
                    f"stalled {result['stalled']}, "
                    f"workers {result['worker_cpu']:.2f} CPU, generator "
                    f"{result['generator_cpu']:.2f} CPU, participants per worker "
                    f"{result['participants']} {'ok' if ok else 'FAIL'}",
                    flush=True,
                )
                if not ok:
                    break
                best, best_rooms = round(expected), step
        finally:
            throttled = slices.throttled()
            await load.close()
    return {
        "workers": workers,
        "max_pps": best,
        "max_rooms": best_rooms,
        "steps": steps,
        "throttled": throttled,
    }


async def spanning(args: argparse.Namespace, slices: CpuSlices) -> dict[str, Any]:
    """CPU per forwarded packet: one room on 1 worker against the same room on 2."""
    out: dict[str, Any] = {}
    for case in ("one_worker", "two_workers"):
        async with node(2, 0.6, slices, args.uvloop, args.ice_port) as server:
            load = Load(server.url, args.width, args.bitrate)
            try:
                pin(server, 0)
                await load.publisher("span")
                half = args.span_subs // 2
                for i in range(args.span_subs):
                    if case == "two_workers" and i == half:
                        pin(server, 1)
                    await load.client("span", f"s{i}")
                await wait_flowing(load.counters)
                await asyncio.sleep(args.warmup)
                # The least disturbed of three windows (the machine is shared).
                windows = [await window(load, worker_pids(server), args.duration) for _ in range(3)]
                out[case] = min(windows, key=lambda w: w["cpu_us_per_packet"] or 1e9)
            finally:
                await load.close()
    ratio = out["ratio"] = per_packet_ratio(out["two_workers"], out["one_worker"])
    print(
        f"spanning: {out['one_worker']['cpu_us_per_packet']} us/packet on 1 worker, "
        f"{out['two_workers']['cpu_us_per_packet']} us/packet spanning 2 ({ratio:.2f}x)"
    )
    return out


async def overlay(args: argparse.Namespace) -> dict[str, Any]:
    """A producer of another node relayed into a node with 2 workers, against 1 process."""
    from bench.cluster import Cluster

    out: dict[str, Any] = {}
    for case, extra in (
        ("one_process", ("--workers", "1")),
        # A tiny watermark: every worker is "full", so each join goes to the least loaded.
        ("two_workers", ("--workers", "2", "--worker-watermark", "0.01")),
    ):
        cluster = Cluster()
        origin = cluster.add("origin", "eu", extra=("--workers", "1"))
        receiver = cluster.add("receiver", "eu", extra=extra)
        clients: list[CascadeClient] = []
        try:
            await cluster.start()
            for _ in range(100):  # until each node sees the other in the directory
                views = [await n.get("/overlay") for n in (origin, receiver)]
                if all(len(v.get("nodes", [])) >= 2 for v in views):
                    break
                await asyncio.sleep(0.2)

            async def client(
                url: str, name: str, clients: list[CascadeClient] = clients, tokens: Any = cluster
            ) -> Any:
                c = CascadeClient(url, count_only=True, request_timeout=30)
                clients.append(c)
                await c.connect()
                await c.join("relayed", tokens.token("relayed", name), follow_placement=False)
                return c

            pub = await client(origin.url, "pub")
            height = args.width * 3 // 4
            await pub.publish(
                [
                    PatternVideoTrack(
                        args.width, height, 30, args.bitrate, periodic_keyframes=False
                    ),
                    ToneAudioTrack(),
                ]
            )
            subs = [await client(receiver.url, f"s{i}") for i in range(args.overlay_subs)]
            counters = [c.counter for c in subs if c.counter is not None]
            await wait_flowing(counters)
            await asyncio.sleep(args.warmup)
            assert receiver.proc is not None
            supervisor = psutil.Process(receiver.proc.pid)
            pids = [supervisor.pid] + [p.pid for p in supervisor.children()]
            stats = await receiver.get("/stats")
            flows = sum(link["flows"] for link in stats.get("relay", {}).get("links", []))
            windows = []
            for _ in range(3):
                packets0 = sum(c.packets() for c in counters)
                lost0 = sum(c.lost() for c in counters)
                total0, sup0, t0 = cpu_seconds(pids), cpu_seconds(pids[:1]), time.monotonic()
                await asyncio.sleep(args.duration)
                dt = time.monotonic() - t0
                packets = sum(c.packets() for c in counters) - packets0
                lost = sum(c.lost() for c in counters) - lost0
                total, sup = cpu_seconds(pids) - total0, cpu_seconds(pids[:1]) - sup0
                windows.append(
                    {
                        "forwarded_pps": round(packets / dt),
                        "loss": round(lost / max(1, packets + lost), 5),
                        "node_cpu": round(total / dt, 3),
                        "cpu_us_per_packet": round(total * 1e6 / max(1, packets), 2),
                        "supervisor_cpu_us_per_packet": round(sup * 1e6 / max(1, packets), 2),
                    }
                )
            best = min(windows, key=lambda w: w["cpu_us_per_packet"])
            best["relay_flows"] = flows
            best["processes"] = len(pids)
            out[case] = best
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            cluster.stop()
    ratio = out["ratio"] = per_packet_ratio(out["two_workers"], out["one_process"])
    print(
        f"overlay: relay flows {out['one_process']['relay_flows']} (1 process) and "
        f"{out['two_workers']['relay_flows']} (2 workers); receiving node "
        f"{out['one_process']['cpu_us_per_packet']} us/packet in 1 process, "
        f"{out['two_workers']['cpu_us_per_packet']} us/packet with 2 workers ({ratio:.2f}x; "
        f"supervisor {out['two_workers']['supervisor_cpu_us_per_packet']} us/packet)"
    )
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rtc.set_ice_addresses(["127.0.0.1"])
    report: dict[str, Any] = {
        "bench": "workers",
        "quota_us": args.quota,
        "period_us": args.period,
        "uvloop": args.uvloop,
    }
    parts = args.only or ["signaling", "capacity", "spanning", "overlay"]
    if "signaling" in parts:
        report["signaling"] = await signaling(args.pings)
    if "overlay" in parts:
        report["overlay"] = await overlay(args)
    slices = CpuSlices(args.quota, args.period)
    if {"capacity", "spanning"} & set(parts):
        why = slices.available()
        if why is not None:
            raise SystemExit(f"bench.workers: {why}")
    try:
        if "capacity" in parts:
            # 1 and 2 workers alternately, so that a slow spell of the machine hits both.
            runs = []
            for _ in range(args.repeat):
                one = await capacity(1, args, slices)
                two = await capacity(2, args, slices)
                ratio = two["max_pps"] / max(1, one["max_pps"])
                runs.append({"one": one, "two": two, "ratio": round(ratio, 2)})
                print(
                    f"capacity: {one['max_pps']} pps with 1 worker, {two['max_pps']} pps with 2 "
                    f"({ratio:.2f}x; slice {args.quota / args.period:.0%} of a core each, "
                    f"period {args.period / 1000:g} ms)",
                    flush=True,
                )
            ones = [r["one"]["max_pps"] for r in runs]
            twos = [r["two"]["max_pps"] for r in runs]
            # Each pair ran back to back: the median of the pairs' ratios is the figure.
            paired = statistics.median(r["ratio"] for r in runs)
            of_medians = statistics.median(twos) / max(1, statistics.median(ones))
            report["capacity"] = {
                **runs[-1],
                "runs": runs,
                "ratios": [r["ratio"] for r in runs],
                "median_ratio": round(paired, 2),
                "ratio_of_medians": round(of_medians, 2),
            }
            if args.repeat > 1:
                listed = ", ".join(f"{r['ratio']:.2f}" for r in runs)
                print(
                    f"capacity, {args.repeat} alternating runs: ratios {listed}, median "
                    f"{paired:.2f}x (ratio of the medians {statistics.median(ones):.0f} and "
                    f"{statistics.median(twos):.0f} pps: {of_medians:.2f}x)"
                )
        if "spanning" in parts:
            report["spanning"] = await spanning(args, slices)
    finally:
        slices.remove()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument(
        "--only", action="append", choices=["signaling", "capacity", "spanning", "overlay"]
    )
    parser.add_argument("--quota", type=int, default=20_000, help="us of CPU per period per worker")
    parser.add_argument(
        "--period",
        type=int,
        default=PERIOD_US,
        help="cgroup cpu.cfs_period_us (a shorter period throttles in shorter, smoother slices)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="capacity: run 1 and 2 workers alternately N times"
    )
    parser.add_argument(
        "--watermark", type=float, default=0.6, help="packing watermark, of the slice"
    )
    parser.add_argument("--room-subs", type=int, default=8)
    parser.add_argument(
        "--confirm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="capacity: a failed step is measured once more and fails only if that "
        "window fails too (--no-confirm: the first window decides)",
    )
    parser.add_argument(
        "--ice-port",
        type=parse_ice_port,
        default=0,
        help="the workers' ICE ports as cascade node --ice-port (per-transport: a socket each)",
    )
    parser.add_argument("--max-rooms", type=int, default=12)
    parser.add_argument("--span-subs", type=int, default=16)
    parser.add_argument("--overlay-subs", type=int, default=8)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--bitrate", type=int, default=300_000)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--pings", type=int, default=300)
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="workers on uvloop (default, as cascade node); --no-uvloop: asyncio's own loop, "
        "whose higher cost per packet lets a worker saturate its slice before the generator",
    )
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
