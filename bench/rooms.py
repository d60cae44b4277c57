"""Many small rooms: R rooms of 5 participants, each publishing 640x480 VP8 (~500 kbps,
pre-encoded) plus Opus and subscribing to the 4 others — on Cascade and, in the same run,
on Janus VideoRoom (event_loops = 1).

Same setup as bench/fanout.py (server pinned to CPU 0, participants on CPU 1, two network
namespaces this script creates). Reports server CPU microseconds per forwarded packet
(utime+stime / packets the subscribers received), server CPU %, forwarded packets/s, fps
of the received videos, decode errors of the decoding participant, and the ratios.

    python -m bench.rooms                         # R = 10 rooms, Cascade then Janus
    python -m bench.rooms --rooms 6 --duration 5 --no-janus
    python -m bench.rooms --ingress-baseline      # + Cascade on aiortc's receive path
    python -m bench.rooms --rtcp-baseline         # + Cascade with RTCP through aiortc
    python -m bench.rooms --gc-baseline           # + Cascade with CPython's GC defaults
    python -m bench.rooms --source-baseline       # + Cascade's forwarding core not compiled
    python -m bench.rooms --port-per-transport-baseline   # + a socket per ICE transport
    python -m bench.rooms --rooms 4 --concurrent  # all cases at once, same seconds measured

Choose R so that Cascade's server CPU is about 50 % of its core (printed). Prints a table,
then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from bench import fanout
from bench import janus as janus_mod
from bench.fanout import CaseResult
from peer import aiortc_adapter as rtc
from peer.client import CascadeClient
from peer.tokens import issue_token

ROOM_SIZE = 5
VIDEOS = ROOM_SIZE - 1  # videos each participant receives


class _ClientProbe:
    """The one participant that decodes what it receives: frames per video, decode errors."""

    def __init__(self, client: CascadeClient) -> None:
        self.client = client

    def _videos(self) -> list[Any]:
        return [t for t in self.client.tracks.values() if t.kind == "video"]

    def packets(self) -> int:
        pc = self.client._subscribe_pc
        if pc is None:
            return 0
        return sum(rtc.receiver_loss(t.receiver)[0] for t in pc.getTransceivers())

    @property
    def frames(self) -> float:
        videos = self._videos()
        return sum(t.frames_decoded for t in videos) / max(1, len(videos))

    @property
    def errors(self) -> Any:
        return _Count(sum(t.decode_errors.count for t in self._videos() if t.decode_errors))


class _Count:
    def __init__(self, count: int) -> None:
        self.count = count


class _JanusProbe:
    """A decoding Janus subscriber of the 4 other feeds."""

    def __init__(self, sub: janus_mod.JanusSubscriber, tasks: set[asyncio.Task[Any]]) -> None:
        self.sub = sub
        self.counts: list[int] = []
        self.decode_errors: list[Any] = []
        pc = sub.pc

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind != "video":
                return
            for t in pc.getTransceivers():
                if t.receiver.track is track:
                    self.decode_errors.append(rtc.count_decode_errors(t.receiver))
            index = len(self.counts)
            self.counts.append(0)

            async def consume() -> None:
                with contextlib.suppress(Exception):
                    while True:
                        await track.recv()
                        self.counts[index] += 1

            tasks.add(asyncio.ensure_future(consume()))

    def packets(self) -> int:
        return sum(rtc.receiver_loss(t.receiver)[0] for t in self.sub.pc.getTransceivers())

    @property
    def frames(self) -> float:
        return sum(self.counts) / max(1, len(self.counts))

    @property
    def errors(self) -> Any:
        return _Count(sum(e.count for e in self.decode_errors))


async def run_cascade(
    args: argparse.Namespace,
    fast_ingress: bool = True,
    fast_rtcp: bool = True,
    gc_tuning: bool = True,
    port: int = 18080,
    ready: asyncio.Barrier | None = None,
    compiled: bool = True,
    shared_port: bool = True,
) -> CaseResult:
    """R rooms of 5 SDK participants on one Cascade node (``ready``: wait there for the
    other cases before warming up and measuring, see ``--concurrent``)."""
    name = fanout.cascade_case_name(fast_ingress, fast_rtcp, gc_tuning, compiled, shared_port)
    result = CaseResult(name, args.rooms)
    server = fanout.start_cascade(port, fast_ingress, fast_rtcp, gc_tuning, compiled, shared_port)
    clients: list[CascadeClient] = []
    try:
        fanout.wait_port(port)
        url = f"http://{fanout.SERVER_IP}:{port}"

        async def participant(room: int, i: int) -> CascadeClient | None:
            decode = room == 0 and i == 0
            c = CascadeClient(url, count_only=not decode)
            clients.append(c)
            try:
                await c.connect()
                name = f"room{room}"
                await c.join(name, issue_token(fanout.SECRET, name, f"p{i}"))
                await c.publish(fanout.publisher_tracks(args.bitrate))
            except Exception as exc:  # an overloaded load core: report it, measure the rest
                result.notes.append(f"room {room} participant {i}: {exc!r}")
                return None
            return c

        made = await fanout.gather_batched(
            [participant(r, i) for r in range(args.rooms) for i in range(ROOM_SIZE)], batch=5
        )
        joined = [c for c in made if c is not None]
        counters = [c.counter for c in joined if c.counter is not None]
        probe_clients = [c for c in joined if c.counter is None]
        await wait_streams(counters)
        for c in probe_clients:
            await c.wait_for_tracks(VIDEOS, "video", timeout=30)
        await _all_ready(ready)
        await asyncio.sleep(args.warmup)
        probes = [_ClientProbe(c) for c in probe_clients]
        await fanout.measure(server.pid, counters, probes, args.duration, result, VIDEOS)
        result.connected += len(probe_clients)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        fanout.stop_process(server)
    return result


async def wait_streams(counters: list[rtc.RtpCounter], timeout: float = 60) -> None:
    """Until every counter receives all 2 x 4 streams (or the timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if all(sum(1 for s in c.streams.values() if s[0] > 20) >= 2 * VIDEOS for c in counters):
            return
        await asyncio.sleep(0.2)
    print("# not every participant receives every stream", file=sys.stderr)


async def _all_ready(ready: asyncio.Barrier | None) -> None:
    if ready is not None:
        await ready.wait()


async def run_janus(args: argparse.Namespace, ready: asyncio.Barrier | None = None) -> CaseResult:
    """The same rooms on Janus VideoRoom: each participant publishes on one handle and
    subscribes to the 4 other feeds on one multistream handle."""
    result = CaseResult("janus", args.rooms)
    port = 18088
    folder = Path(tempfile.mkdtemp(prefix="cascade-janus-"))
    janus_mod.write_config(folder, port, fanout.SERVER_IP, event_loops=1)
    server = janus_mod.start_janus(folder, fanout.SERVER_CPU, fanout.in_server_ns())
    base = f"http://{fanout.SERVER_IP}:{port}/janus"
    peers: list[Any] = []
    tasks: set[asyncio.Task[Any]] = set()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        fanout.wait_port(port)
        publishers: list[list[janus_mod.JanusPublisher]] = []
        for r in range(args.rooms):
            room = 5000 + r
            await janus_mod.create_room(http, base, room, publishers=ROOM_SIZE)
            pubs = [janus_mod.JanusPublisher(http, base, room) for _ in range(ROOM_SIZE)]
            peers.extend(pubs)
            await asyncio.gather(*(p.publish(fanout.publisher_tracks(args.bitrate)) for p in pubs))
            publishers.append(pubs)
        for _ in range(400):
            if all(p.pc.connectionState == "connected" for room in publishers for p in room):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        subs: list[janus_mod.JanusSubscriber] = []
        probes: list[_JanusProbe] = []
        for r, pubs in enumerate(publishers):
            for i, me in enumerate(pubs):
                feeds = [p.feed_id for p in pubs if p is not me and p.feed_id is not None]
                decode = r == 0 and i == 0
                sub = janus_mod.JanusSubscriber(http, base, 5000 + r, feeds, count_only=not decode)
                if decode:
                    probes.append(_JanusProbe(sub, tasks))
                subs.append(sub)
        peers.extend(subs)
        await fanout.gather_batched([s.start() for s in subs], batch=5)
        counters = [s.counter for s in subs if s.counter is not None]
        await wait_streams(counters)
        await _all_ready(ready)
        await asyncio.sleep(args.warmup)
        await fanout.measure(server.pid, counters, probes, args.duration, result, VIDEOS)
        result.connected += len(probes)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
        await http.close()
        fanout.stop_process(server)
        shutil.rmtree(folder, ignore_errors=True)
    return result


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    rtc.set_ice_addresses([fanout.LOAD_IP])
    cases: list[Any] = [lambda ready: run_cascade(args, ready=ready)]
    if args.ingress_baseline:
        cases.append(lambda ready: run_cascade(args, fast_ingress=False, port=18081, ready=ready))
    if args.rtcp_baseline:
        cases.append(lambda ready: run_cascade(args, fast_rtcp=False, port=18082, ready=ready))
    if args.gc_baseline:
        cases.append(lambda ready: run_cascade(args, gc_tuning=False, port=18083, ready=ready))
    if args.before_baseline:
        cases.append(
            lambda ready: run_cascade(
                args, fast_rtcp=False, gc_tuning=False, port=18084, ready=ready
            )
        )
    if args.source_baseline:
        cases.append(lambda ready: run_cascade(args, port=18085, ready=ready, compiled=False))
    if args.port_per_transport_baseline:
        cases.append(lambda ready: run_cascade(args, port=18086, ready=ready, shared_port=False))
    if args.janus:
        cases.append(lambda ready: run_janus(args, ready=ready))
    results = await fanout.run_cases(cases, args.concurrent)
    print()
    print(f"{args.rooms} rooms x {ROOM_SIZE} participants (N column: rooms)")
    fanout.print_table(results)
    by = {r.server: r for r in results}
    ratios: dict[str, float] = {}
    janus = by.get("janus")
    for name, key in (
        ("cascade", "cascade_over_janus"),
        *((server, f"{prefix}_over_janus") for server, prefix in fanout.BASELINES),
    ):
        found = by.get(name)
        if found and janus and janus.cpu_us_per_packet:
            ratios[f"{key}_rooms"] = round(found.cpu_us_per_packet / janus.cpu_us_per_packet, 3)
    print()
    for k, v in ratios.items():
        print(f"{k}: {v}")
    return {
        "benchmark": "rooms",
        "rooms": args.rooms,
        "room_size": ROOM_SIZE,
        "bitrate": args.bitrate,
        "duration": args.duration,
        "load_average": os.getloadavg()[0],
        "concurrent": args.concurrent,
        "results": [asdict(r) for r in results],
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--bitrate", type=int, default=500_000)
    parser.add_argument("--janus", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ingress-baseline", action="store_true")
    parser.add_argument(
        "--rtcp-baseline", action="store_true", help="+ Cascade with RTCP through aiortc"
    )
    parser.add_argument(
        "--gc-baseline", action="store_true", help="+ Cascade with CPython's GC defaults"
    )
    parser.add_argument(
        "--before-baseline",
        action="store_true",
        help="+ Cascade with both RTCP through aiortc and CPython's GC defaults",
    )
    parser.add_argument(
        "--source-baseline",
        action="store_true",
        help="+ Cascade with CASCADE_COMPILED=0 (the forwarding core from its sources)",
    )
    parser.add_argument(
        "--port-per-transport-baseline",
        action="store_true",
        help="+ Cascade with a socket per ICE transport (--ice-port per-transport)",
    )
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="run the cases at the same time (each with --rooms rooms), measured together",
    )
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.in_netns:
        return fanout.in_namespace(argv, module="bench.rooms")
    if args.janus and not janus_mod.janus_available():
        print("janus not installed (apt-get install janus); skipping it", file=sys.stderr)
        args.janus = False
    os.sched_setaffinity(0, {fanout.LOAD_CPU})
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    report = asyncio.run(run_all(args))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
