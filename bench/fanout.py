"""Fan-out benchmark: 1 publisher (4 Mbps VP8 + Opus, pre-encoded) -> N subscribers.

Server pinned to CPU 0, publisher and subscribers on CPU 1, everything inside a network
namespace this script creates (loopback only). Reports server CPU microseconds per forwarded
packet (utime+stime of all its threads / packets the subscribers received), forwarded packets/s,
subscriber fps and decode errors, for Cascade at each N, and in the same run for Janus
(VideoRoom, event_loops = 1) at the same N and aiortc's MediaRelay (decode + re-encode) at N = 5.

    python -m bench.fanout                     # N = 10, 50, 100 (+ Janus, MediaRelay)
    python -m bench.fanout --sizes 10 --duration 5 --no-janus
    python -m bench.fanout --ingress-baseline  # + Cascade on aiortc's receive path (before)
    python -m bench.fanout --source-baseline   # + Cascade's forwarding core not compiled
    python -m bench.fanout --port-per-transport-baseline   # + Cascade with a socket per transport

Prints a table, then one JSON object as the last line. Diagnostics: CASCADE_BENCH_PROFILE=PREFIX
records a py-spy profile of the Cascade node per N (py-spy must be installed);
CASCADE_JANUS_LOG=FILE and CASCADE_JANUS_DEBUG=LEVEL keep Janus's log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import psutil
from aiortc import RTCPeerConnection, RTCSessionDescription

from bench import janus as janus_mod
from peer import aiortc_adapter as rtc
from peer.client import CascadeClient
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.tokens import issue_token

ROOT = Path(__file__).resolve().parents[1]
# Two network namespaces joined by a veth pair, made by this script: the servers live in one,
# the publisher and subscribers in the other (Janus never gathers ICE candidates on loopback).
SERVER_IP = "169.254.77.1"
LOAD_IP = "169.254.77.2"
SECRET = "bench-secret-0123456789abcdef-0123456789"
SERVER_CPU = 0
LOAD_CPU = 1
PROBES = 2  # subscribers that really decode, to count decode errors and decoded fps


@dataclass
class CaseResult:
    server: str
    subscribers: int
    cpu_us_per_packet: float = 0.0
    server_cpu_percent: float = 0.0
    load_cpu_percent: float = 0.0  # the load generator (publishers, subscribers), its own core
    forwarded_pps: float = 0.0
    subscriber_fps: float = 0.0
    decoded_fps: float = 0.0
    decode_errors: int = 0
    packets_lost: int = 0
    connected: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Probe:
    """A subscriber that decodes: frames, decode errors and packets received."""

    frames: int = 0
    errors: Any = None
    pc: Any = None

    def packets(self) -> int:
        if self.pc is None:
            return 0
        return sum(rtc.receiver_loss(t.receiver)[0] for t in self.pc.getTransceivers())


def probe_track(pc: RTCPeerConnection, probe: Probe, tasks: set[asyncio.Task[Any]]) -> None:
    """Decode the video track arriving on ``pc`` into ``probe``."""

    probe.pc = pc

    @pc.on("track")
    def on_track(track: Any) -> None:
        if track.kind != "video":
            return
        for t in pc.getTransceivers():
            if t.receiver.track is track:
                probe.errors = rtc.count_decode_errors(t.receiver)

        async def consume() -> None:
            with contextlib.suppress(Exception):
                while True:
                    await track.recv()
                    probe.frames += 1

        tasks.add(asyncio.ensure_future(consume()))


def video_ssrcs(counter: rtc.RtpCounter, count: int = 1) -> list[int]:
    """The ``count`` SSRCs with the most bytes (video, not audio)."""
    return sorted(counter.streams, key=lambda s: counter.streams[s][4], reverse=True)[:count]


async def measure(
    pid: int,
    counters: list[rtc.RtpCounter],
    probes: list[Any],
    duration: float,
    result: CaseResult,
    videos_per_counter: int = 1,
) -> None:
    """Server CPU time and subscriber counters over ``duration`` seconds (fps over the
    ``videos_per_counter`` largest streams each counter receives)."""
    proc = psutil.Process(pid)
    videos = [video_ssrcs(c, videos_per_counter) for c in counters]

    def cpu() -> float:
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def snapshot() -> tuple[int, list[int], int]:
        frames = [
            c.frames(ssrc) for c, ssrcs in zip(counters, videos, strict=True) for ssrc in ssrcs
        ]
        packets = sum(c.packets() for c in counters) + sum(p.packets() for p in probes)
        return packets, frames, sum(c.lost() for c in counters)

    result.connected = sum(1 for c in counters if c.packets() > 0)
    me = psutil.Process()
    cpu0, (pk0, fr0, lost0), pf0 = cpu(), snapshot(), [p.frames for p in probes]
    load0 = sum(me.cpu_times()[:2])
    t0 = time.monotonic()
    await asyncio.sleep(duration)
    cpu1, (pk1, fr1, lost1), pf1 = cpu(), snapshot(), [p.frames for p in probes]
    load1 = sum(me.cpu_times()[:2])
    dt = time.monotonic() - t0
    result.load_cpu_percent = round((load1 - load0) / dt * 100, 1)
    packets = pk1 - pk0
    result.cpu_us_per_packet = round((cpu1 - cpu0) * 1e6 / packets, 2) if packets else float("inf")
    result.server_cpu_percent = round((cpu1 - cpu0) / dt * 100, 1)
    result.forwarded_pps = round(packets / dt)
    fps = [(b - a) / dt for a, b in zip(fr0, fr1, strict=True)]
    result.subscriber_fps = round(sum(fps) / len(fps), 1) if fps else 0.0
    result.packets_lost = lost1 - lost0
    if probes:
        result.decoded_fps = round(
            sum(b - a for a, b in zip(pf0, pf1, strict=True)) / len(probes) / dt, 1
        )
        result.decode_errors = sum(p.errors.count if p.errors else 0 for p in probes)


async def wait_flowing(counters: list[rtc.RtpCounter], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.packets() > 50 for c in counters):
            return
        await asyncio.sleep(0.2)


def wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((SERVER_IP, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()


async def gather_batched(coros: list[Any], batch: int = 10) -> list[Any]:
    out = []
    for i in range(0, len(coros), batch):
        out += await asyncio.gather(*coros[i : i + batch])
    return out


def publisher_tracks(bitrate: int) -> list[Any]:
    return [PatternVideoTrack(640, 480, 30, bitrate), ToneAudioTrack()]


# -- Cascade ---------------------------------------------------------------------------


def start_cascade(
    port: int,
    fast_ingress: bool = True,
    fast_rtcp: bool = True,
    gc_tuning: bool = True,
    compiled: bool = True,
    shared_port: bool = True,
) -> subprocess.Popen[bytes]:
    """A Cascade node on the server core, in the servers' namespace, limits off."""
    # The node listens off loopback: monitoring (if loaded) wants a token.
    env = {"CASCADE_MONITOR_TOKEN": SECRET, **os.environ, "CASCADE_API_SECRET": SECRET}
    env["CASCADE_FAST_INGRESS"] = "1" if fast_ingress else "0"
    env["CASCADE_FAST_RTCP"] = "1" if fast_rtcp else "0"
    env["CASCADE_GC_TUNING"] = "1" if gc_tuning else "0"
    if not compiled:
        env["CASCADE_COMPILED"] = "0"
    cmd = [
        *in_server_ns(),
        "taskset",
        "-c",
        str(SERVER_CPU),
        sys.executable,
        "-m",
        "peer.cli",
        "node",
        "--host",
        SERVER_IP,
        "--ice-ip",
        SERVER_IP,
        "--port",
        str(port),
        "--max-consumers",
        "100000",
        "--max-cpu",
        "2.0",
        "--max-egress-pps",
        "10000000",
        "--ws-per-ip",
        "0",
        "--join-rate",
        "0",
        "--log-level",
        "WARNING",
        "--ice-port",
        "0" if shared_port else "per-transport",
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, preexec_fn=os.setpgrp, stdout=subprocess.DEVNULL
    )


def cascade_case_name(
    fast_ingress: bool,
    fast_rtcp: bool,
    gc_tuning: bool = True,
    compiled: bool = True,
    shared_port: bool = True,
) -> str:
    """``cascade``, or the baseline it is: publisher media or RTCP through aiortc,
    CPython's default collector settings, the forwarding core run from its sources, or a
    socket per ICE transport instead of the node's one port."""
    if not shared_port:
        return "cascade-port-per-transport"
    if not compiled:
        return "cascade-source"
    if not fast_ingress:
        return "cascade-aiortc-ingress"
    if not fast_rtcp:
        return "cascade-aiortc-rtcp" if gc_tuning else "cascade-aiortc-rtcp-default-gc"
    return "cascade" if gc_tuning else "cascade-default-gc"


async def run_cascade(
    n: int,
    args: argparse.Namespace,
    fast_ingress: bool = True,
    fast_rtcp: bool = True,
    gc_tuning: bool = True,
    port: int = 18080,
    ready: asyncio.Barrier | None = None,
    compiled: bool = True,
    shared_port: bool = True,
) -> CaseResult:
    """One publisher, ``n`` subscribers on a Cascade node (``ready``: wait there for the
    other cases before warming up and measuring, see ``--concurrent``)."""
    name = cascade_case_name(fast_ingress, fast_rtcp, gc_tuning, compiled, shared_port)
    result = CaseResult(name, n)
    server = start_cascade(port, fast_ingress, fast_rtcp, gc_tuning, compiled, shared_port)
    clients: list[CascadeClient] = []
    try:
        wait_port(port)
        url = f"http://{SERVER_IP}:{port}"
        pub = CascadeClient(url)
        clients.append(pub)
        await pub.connect()
        await pub.join("bench", issue_token(SECRET, "bench", "pub"))
        await pub.publish(publisher_tracks(args.bitrate))

        async def subscriber(i: int, decode: bool) -> CascadeClient:
            c = CascadeClient(url, count_only=not decode)
            await c.connect()
            await c.join("bench", issue_token(SECRET, "bench", f"sub{i}"))
            return c

        probes_n = min(PROBES, n)
        subs = await gather_batched([subscriber(i, i < probes_n) for i in range(n)])
        clients += subs
        counters = [c.counter for c in subs if c.counter is not None]
        probe_clients = [c for c in subs if c.counter is None]
        await wait_flowing(counters)
        if probe_clients:
            await asyncio.gather(
                *(c.wait_for_tracks(1, "video", timeout=20) for c in probe_clients)
            )
        if ready is not None:
            await ready.wait()
        await asyncio.sleep(args.warmup)
        probes = []
        for c in probe_clients:
            video = next(t for t in c.tracks.values() if t.kind == "video")
            probes.append(_CascadeProbe(c, video))
        profile = os.environ.get("CASCADE_BENCH_PROFILE")
        if profile:  # py-spy flame data of the node during the measurement window
            subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "-p",
                    str(server.pid),
                    "-d",
                    str(int(args.duration)),
                    "-f",
                    "raw",
                    "-o",
                    f"{profile}-n{n}.txt",
                    "--nonblocking",
                ]
            )
        await measure(server.pid, counters, probes, args.duration, result)
        # The probes decode on the load core; count them as subscribers too.
        result.connected += len(probe_clients)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        stop_process(server)
    return result


class _CascadeProbe:
    def __init__(self, client: CascadeClient, track: Any) -> None:
        self.client = client
        self.track = track

    def packets(self) -> int:
        pc = self.client._subscribe_pc
        if pc is None:
            return 0
        return sum(rtc.receiver_loss(t.receiver)[0] for t in pc.getTransceivers())

    @property
    def frames(self) -> int:
        return int(self.track.frames_decoded)

    @property
    def errors(self) -> Any:
        return self.track.decode_errors


# -- Janus -----------------------------------------------------------------------------


async def run_janus(
    n: int, args: argparse.Namespace, ready: asyncio.Barrier | None = None
) -> CaseResult:
    result = CaseResult("janus", n)
    port = 18088
    folder = Path(tempfile.mkdtemp(prefix="cascade-janus-"))
    janus_mod.write_config(
        folder,
        port,
        SERVER_IP,
        event_loops=1,
        debug_level=int(os.environ.get("CASCADE_JANUS_DEBUG", "2")),
    )
    server = janus_mod.start_janus(folder, SERVER_CPU, in_server_ns())
    base = f"http://{SERVER_IP}:{port}/janus"
    pcs: list[Any] = []
    tasks: set[asyncio.Task[Any]] = set()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        wait_port(port)
        room = 4242
        await janus_mod.create_room(http, base, room)
        pub = janus_mod.JanusPublisher(http, base, room)
        pcs.append(pub)
        await pub.publish(publisher_tracks(args.bitrate))
        assert pub.feed_id is not None
        for _ in range(200):  # a feed exists for subscribers only once its PeerConnection is up
            if pub.pc.connectionState == "connected":
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        print(f"# janus publisher connection: {pub.pc.connectionState}", file=sys.stderr)
        probes_n = min(PROBES, n)
        subs = [
            janus_mod.JanusSubscriber(http, base, room, pub.feed_id, count_only=i >= probes_n)
            for i in range(n)
        ]
        probes = [Probe() for _ in range(probes_n)]
        for sub, probe in zip(subs, probes, strict=False):
            probe_track(sub.pc, probe, tasks)
        pcs += subs
        await gather_batched([s.start() for s in subs])
        counters = [s.counter for s in subs if s.counter is not None]
        await wait_flowing(counters)
        if ready is not None:
            await ready.wait()
        await asyncio.sleep(args.warmup)
        await measure(server.pid, counters, probes, args.duration, result)
        result.connected += probes_n
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(p.close() for p in pcs), return_exceptions=True)
        await http.close()
        stop_process(server)
        shutil.rmtree(folder, ignore_errors=True)
    return result


# -- MediaRelay ------------------------------------------------------------------------


async def run_mediarelay(n: int, args: argparse.Namespace) -> CaseResult:
    result = CaseResult("mediarelay", n)
    port = 18090
    server = subprocess.Popen(
        [
            *in_server_ns(),
            "taskset",
            "-c",
            str(SERVER_CPU),
            sys.executable,
            "-m",
            "bench.mediarelay_server",
            "--host",
            SERVER_IP,
            "--port",
            str(port),
        ],
        cwd=ROOT,
        preexec_fn=os.setpgrp,
        stdout=subprocess.DEVNULL,
    )
    pcs: list[RTCPeerConnection] = []
    tasks: set[asyncio.Task[Any]] = set()
    http = aiohttp.ClientSession()
    try:
        wait_port(port)
        url = f"http://{SERVER_IP}:{port}"
        pub = RTCPeerConnection(rtc.rtc_configuration())
        pcs.append(pub)
        for track in publisher_tracks(args.bitrate):
            t = pub.addTransceiver(track, direction="sendonly")
            rtc.hook_keyframe_requests(t.sender, getattr(track, "request_keyframe", lambda: None))
        await pub.setLocalDescription(await pub.createOffer())
        async with http.post(f"{url}/publish", json={"sdp": pub.localDescription.sdp}) as r:
            answer = await r.json()
        await pub.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        await asyncio.sleep(1.0)
        probes_n = min(PROBES, n)
        probes = [Probe() for _ in range(probes_n)]
        counters: list[rtc.RtpCounter] = []

        async def subscriber(i: int) -> None:
            pc = RTCPeerConnection(rtc.rtc_configuration())
            pcs.append(pc)
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            if i < probes_n:
                probe_track(pc, probes[i], tasks)
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(f"{url}/subscribe", json={"sdp": pc.localDescription.sdp}) as r:
                reply = await r.json()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type="answer"))
            if i >= probes_n:
                counter = rtc.RtpCounter()
                counter.install(pc)
                counters.append(counter)

        await gather_batched([subscriber(i) for i in range(n)])
        await wait_flowing(counters)
        await asyncio.sleep(args.warmup)
        await measure(server.pid, counters, probes, args.duration, result)
        result.connected += probes_n
        result.notes.append("re-encodes with aiortc's VP8 encoder (its own bitrate control)")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(p.close() for p in pcs), return_exceptions=True)
        await http.close()
        stop_process(server)
    return result


# -- driver ------------------------------------------------------------------------------


def print_table(results: list[CaseResult]) -> None:
    width = max([23, *(len(r.server) + 1 for r in results)])
    header = (
        f"{'server':<{width}}{'N':>5}{'µs/pkt':>9}{'cpu%':>7}{'fwd pkt/s':>11}"
        f"{'sub fps':>9}{'dec fps':>9}{'dec err':>9}{'lost':>7}{'conn':>6}{'load%':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.server:<{width}}{r.subscribers:>5}{r.cpu_us_per_packet:>9.2f}{r.server_cpu_percent:>7.1f}"
            f"{r.forwarded_pps:>11}{r.subscriber_fps:>9.1f}{r.decoded_fps:>9.1f}"
            f"{r.decode_errors:>9}{r.packets_lost:>7}{r.connected:>6}{r.load_cpu_percent:>7.1f}"
        )


async def run_cases(cases: list[Any], concurrent: bool) -> list[CaseResult]:
    """Run each ``case(ready)`` in turn, or all at once: then every case waits for the
    others at a barrier before warming up, so all are measured over the same seconds and
    whatever else runs on the machine hits them alike."""
    results: list[CaseResult] = []
    if not concurrent:
        for case in cases:
            results.append(await case(None))
            print_partial(results[-1])
        return results
    barrier = asyncio.Barrier(len(cases))

    async def run(case: Any) -> CaseResult:
        try:
            return cast(CaseResult, await case(barrier))
        except BaseException:
            await barrier.abort()
            raise

    results = list(await asyncio.gather(*(run(case) for case in cases)))
    for r in results:
        print_partial(r)
    return results


# Cascade baselines in the same run: (case name, ratio key prefix)
BASELINES = (
    ("cascade-aiortc-ingress", "aiortc_ingress"),
    ("cascade-aiortc-rtcp", "aiortc_rtcp"),
    ("cascade-default-gc", "default_gc"),
    ("cascade-aiortc-rtcp-default-gc", "aiortc_rtcp_default_gc"),
    ("cascade-source", "source"),
    ("cascade-port-per-transport", "port_per_transport"),
)


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    rtc.set_ice_addresses([LOAD_IP])
    results: list[CaseResult] = []
    for n in args.sizes:
        cases: list[Any] = [lambda ready, n=n: run_cascade(n, args, ready=ready)]
        if args.ingress_baseline:
            cases.append(
                lambda ready, n=n: run_cascade(n, args, fast_ingress=False, port=18081, ready=ready)
            )
        if args.rtcp_baseline:
            cases.append(
                lambda ready, n=n: run_cascade(n, args, fast_rtcp=False, port=18082, ready=ready)
            )
        if args.gc_baseline:
            cases.append(
                lambda ready, n=n: run_cascade(n, args, gc_tuning=False, port=18083, ready=ready)
            )
        if args.source_baseline:
            cases.append(
                lambda ready, n=n: run_cascade(n, args, port=18085, ready=ready, compiled=False)
            )
        if args.port_per_transport_baseline:
            cases.append(
                lambda ready, n=n: run_cascade(n, args, port=18086, ready=ready, shared_port=False)
            )
        if args.janus:
            cases.append(lambda ready, n=n: run_janus(n, args, ready=ready))
        results += await run_cases(cases, args.concurrent)
    if args.mediarelay:
        results.append(await run_mediarelay(5, args))
        print_partial(results[-1])
        results.append(await run_cascade(5, args))
        print_partial(results[-1])
    print()
    print_table(results)
    by = {(r.server, r.subscribers): r for r in results}
    ratios: dict[str, float] = {}
    for n in args.sizes:
        c, j = by.get(("cascade", n)), by.get(("janus", n))
        if c and j and j.cpu_us_per_packet:
            ratios[f"cascade_over_janus_n{n}"] = round(c.cpu_us_per_packet / j.cpu_us_per_packet, 3)
        for server, key in BASELINES:
            old = by.get((server, n))
            if old and j and j.cpu_us_per_packet:
                ratios[f"{key}_over_janus_n{n}"] = round(
                    old.cpu_us_per_packet / j.cpu_us_per_packet, 3
                )
    c5, m5 = by.get(("cascade", 5)), by.get(("mediarelay", 5))
    if c5 and m5 and c5.cpu_us_per_packet:
        ratios["mediarelay_over_cascade_n5"] = round(m5.cpu_us_per_packet / c5.cpu_us_per_packet, 1)
    # MediaRelay saturates a core at N = 5, so it cannot be measured at a larger N; compare
    # its cost per packet with Cascade's at the largest N measured.
    largest = max(args.sizes)
    cl = by.get(("cascade", largest))
    if cl and m5 and cl.cpu_us_per_packet:
        ratios[f"mediarelay_n5_over_cascade_n{largest}"] = round(
            m5.cpu_us_per_packet / cl.cpu_us_per_packet, 1
        )
    print()
    for k, v in ratios.items():
        print(f"{k}: {v}")
    return {
        "benchmark": "fanout",
        "bitrate": args.bitrate,
        "duration": args.duration,
        "results": [asdict(r) for r in results],
        "ratios": ratios,
    }


def print_partial(r: CaseResult) -> None:
    print(
        f"# {r.server} N={r.subscribers}: {r.cpu_us_per_packet} µs/pkt, {r.forwarded_pps} pkt/s, "
        f"fps {r.subscriber_fps}, decode errors {r.decode_errors}",
        file=sys.stderr,
        flush=True,
    )


def in_server_ns() -> list[str]:
    """Command prefix that runs a server in the servers' namespace."""
    return ["ip", "netns", "exec", os.environ["CASCADE_BENCH_SERVER_NS"]]


def in_namespace(argv: list[str], module: str = "bench.fanout") -> int:
    """Re-run ``module`` with ``--in-netns`` in a load namespace, with the servers'
    namespace across a veth."""
    tag = uuid.uuid4().hex[:6]
    srv, load = f"cascade-srv-{tag}", f"cascade-load-{tag}"

    def run(*cmd: str) -> None:
        subprocess.run(list(cmd), check=True)

    try:
        run("ip", "netns", "add", srv)
        run("ip", "netns", "add", load)
        run(
            "ip",
            "link",
            "add",
            f"cs{tag}",
            "netns",
            srv,
            "type",
            "veth",
            "peer",
            "name",
            f"cl{tag}",
            "netns",
            load,
        )
        for ns, dev, ip in ((srv, f"cs{tag}", SERVER_IP), (load, f"cl{tag}", LOAD_IP)):
            run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/30", "dev", dev)
            run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
        env = {**os.environ, "CASCADE_BENCH_SERVER_NS": srv}
        return subprocess.call(
            [
                "ip",
                "netns",
                "exec",
                load,
                sys.executable,
                "-m",
                module,
                "--in-netns",
                *argv,
            ],
            cwd=ROOT,
            env=env,
        )
    finally:
        subprocess.run(["ip", "netns", "delete", srv], check=False)
        subprocess.run(["ip", "netns", "delete", load], check=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10, 50, 100]
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--bitrate", type=int, default=4_000_000)
    parser.add_argument("--janus", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--mediarelay", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--ingress-baseline",
        action="store_true",
        help="also run Cascade with CASCADE_FAST_INGRESS=0 (aiortc's receive path), as before",
    )
    parser.add_argument(
        "--rtcp-baseline",
        action="store_true",
        help="also run Cascade with CASCADE_FAST_RTCP=0 (RTCP through aiortc), as before",
    )
    parser.add_argument(
        "--gc-baseline",
        action="store_true",
        help="also run Cascade with CASCADE_GC_TUNING=0 (CPython's collector defaults)",
    )
    parser.add_argument(
        "--source-baseline",
        action="store_true",
        help="also run Cascade with CASCADE_COMPILED=0 (the forwarding core from its sources)",
    )
    parser.add_argument(
        "--port-per-transport-baseline",
        action="store_true",
        help="also run Cascade with a socket per ICE transport (--ice-port per-transport)",
    )
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="run the cases of each size at the same time, measured over the same seconds",
    )
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.in_netns:
        return in_namespace(argv)
    if args.janus and not janus_mod.janus_available():
        print("janus not installed (apt-get install janus); skipping it", file=sys.stderr)
        args.janus = False
    os.sched_setaffinity(0, {LOAD_CPU})
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    report = asyncio.run(run_all(args))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
