"""Relay benchmark: cost of carrying a producer across one QUIC relay hop on loopback.

The parent process is the *origin* node (relay server + a synthetic RTP producer); a
child process is the *remote* node (relay link + N local packet listeners). They are
pinned to different CPUs when two are available. All traffic stays on 127.0.0.1.

Measured, in the same run:

* relay CPU µs per packet on the origin (process CPU while sending minus the cost of
  generating the same packets with no listener) and on the remote (process CPU between
  first and last packet / packets);
* one-way latency origin-emit -> remote-listener (p50/p95; send timestamp inside the
  payload, CLOCK_MONOTONIC is shared by both processes) — and the same for a baseline
  that forwards the same packets over a plain UDP socket, so the *added* latency and
  the CPU ratio of the QUIC layer are printed;
* link bytes (UDP payload origin -> remote, counted by a pass-through proxy; the
  reverse direction, ACKs and control only, is reported separately) for 1, 10 and 50
  remote listeners of one producer.

    python -m bench.relay                      # defaults: 2000 pkt/s, 1100 B, 4 s
    python -m bench.relay --rate 1000 --seconds 2 --listeners 1,10,50
    python -m bench.relay --profile /tmp/relay-prof   # + cProfile of both ends (pstats files)
    python -m bench.relay --no-fast-path       # aioquic's general path only (both ends)
    python -m bench.relay --no-udp-offload     # one send/receive system call per packet
    python -m bench.relay --compare 3          # aioquic / fast path / + UDP offload / + ACK

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from relay import AckSettings, RelayConfig, RelayEndpoint, public_key_bytes

LOCAL = "127.0.0.1"
PRODUCER = "bench-cam"
_HDR = struct.Struct("!BBHII")
_TS = struct.Struct("!q")


def make_packet(seq: int, size: int) -> bytes:
    """RTP packet with the emit time (monotonic ns) in the first 8 payload bytes."""
    hdr = _HDR.pack(0x80, 96, seq & 0xFFFF, (seq * 3000) & 0xFFFFFFFF, 0x5EED)
    return hdr + _TS.pack(time.monotonic_ns()) + bytes(max(0, size - 20))


class BenchSource:
    """A RelaySource emitting synthetic packets, with a 1024-packet cache."""

    kind = "video"

    def __init__(self) -> None:
        self.listeners: list[Callable[[bytes], None]] = []
        self.cache: list[bytes | None] = [None] * 1024

    def codec_params(self) -> dict[str, object]:
        return {"mime_type": "video/VP8", "clock_rate": 90000, "payload_type": 96, "ssrc": 0x5EED}

    def add_packet_listener(self, cb: Callable[[bytes], None]) -> None:
        self.listeners.append(cb)

    def remove_packet_listener(self, cb: Callable[[bytes], None]) -> None:
        if cb in self.listeners:
            self.listeners.remove(cb)

    def request_keyframe(self) -> None:
        pass

    def get_cached_packet(self, seq: int) -> bytes | None:
        pkt = self.cache[seq & 1023]
        return pkt if pkt is not None and ((pkt[2] << 8) | pkt[3]) == seq else None

    def on_close(self, cb: Callable[[], None]) -> None:
        pass

    def emit(self, pkt: bytes) -> None:
        self.cache[((pkt[2] << 8) | pkt[3]) & 1023] = pkt
        for cb in self.listeners:
            cb(pkt)


def available_cpus() -> list[int]:
    """CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def pin(cpus: list[int], index: int) -> None:
    """Pin this process to ``cpus[index]`` if there is more than one CPU."""
    if len(cpus) > 1:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setaffinity(0, {cpus[index % len(cpus)]})


def new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    """A fresh event loop (uvloop if asked)."""
    if use_uvloop:
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


# ---------------------------------------------------------------------------- remote


class _Recorder:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.lat_ns: list[int] = []
        self.cpu_first = 0.0
        self.cpu_last = 0.0
        self.done = asyncio.Event()
        self.last_at = time.monotonic()

    def __call__(self, pkt: bytes) -> None:
        now = time.monotonic_ns()
        if self.count == 0:
            self.cpu_first = time.process_time()
        self.count += 1
        self.lat_ns.append(now - _TS.unpack_from(pkt, 12)[0])
        self.cpu_last = time.process_time()
        self.last_at = time.monotonic()
        if self.count >= self.expected:
            self.done.set()

    def report(self) -> dict[str, Any]:
        lat = sorted(self.lat_ns)
        n = len(lat)
        cpu = (self.cpu_last - self.cpu_first) / max(1, self.count - 1)
        return {
            "packets": self.count,
            "cpu_us_per_packet": cpu * 1e6,
            "lat_p50_us": lat[n // 2] / 1000 if n else None,
            "lat_p95_us": lat[min(n - 1, int(n * 0.95))] / 1000 if n else None,
            "lat_mean_us": statistics.fmean(lat) / 1000 if n else None,
        }


class _Sink:
    """A trivial local listener (stands in for a consumer)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, pkt: bytes) -> None:
        self.count += 1


async def _remote(pipe: Connection, job: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    rec = _Recorder(job["expected"])
    if job["mode"] == "udp":

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                rec(data)

        transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=(LOCAL, 0))
        pipe.send({"port": transport.get_extra_info("sockname")[1]})
        closer: Callable[[], Any] = transport.close
    else:
        key = Ed25519PrivateKey.from_private_bytes(job["key"])
        cfg = RelayConfig(
            quic_fast_path=job["fast_path"],
            udp_offload=job["udp_offload"],
            quic_acks=job["acks"],
            congestion_control=job["congestion"],
        )
        ep = RelayEndpoint(key, lambda _pid: None, config=cfg)
        link = ep.link(job["origin_key"], LOCAL, job["port"])
        await link.wait_live(10)
        rp = await link.subscribe(PRODUCER)
        rp.add_packet_listener(rec)
        sinks = [_Sink() for _ in range(job["listeners"] - 1)]  # distinct local listeners
        for sink in sinks:
            rp.add_packet_listener(sink)
        pipe.send({"ready": True})
        closer = ep.close
        quic_stats = ep.quic_stats
    profiler = cProfile.Profile() if job.get("profile") else None
    if profiler is not None:
        profiler.enable()
    # finish when everything arrived, the stream stalled, or a link that fell behind
    # (queued at the origin) is still delivering well after the emission ended
    give_up_at = time.monotonic() + 20.0 + job["expected"] / job["rate"]
    while not rec.done.is_set():
        await asyncio.sleep(0.1)
        if rec.count and time.monotonic() - rec.last_at > 2.0:
            break
        if time.monotonic() > give_up_at:
            break
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(os.path.join(job["profile"], f"remote-{job['mode']}.pstats"))
    report = rec.report()
    if job["mode"] != "udp":
        report["quic_stats"] = quic_stats()
    res = closer()
    if asyncio.iscoroutine(res):
        await res
    pipe.send(report)


def remote_main(pipe: Connection, job: dict[str, Any]) -> None:
    """Child process entry point."""
    pin(job["cpus"], 1)
    with asyncio.Runner(loop_factory=lambda: new_loop(job["uvloop"])) as runner:
        runner.run(_remote(pipe, job))


# ---------------------------------------------------------------------------- origin


async def _recv(pipe: Connection, timeout: float = 30.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    ready = await asyncio.wait_for(loop.run_in_executor(None, pipe.poll, timeout), timeout + 1)
    if not ready:
        raise TimeoutError("remote process did not answer")
    msg: dict[str, Any] = pipe.recv()
    return msg


async def emit(
    source_emit: Callable[[bytes], None], n: int, rate: float, size: int, tick: float = 0.005
) -> float:
    """Emit ``n`` packets paced at ``rate`` in bursts every ``tick`` s; returns CPU seconds."""
    cpu0 = time.process_time()
    t0 = time.monotonic()
    sent = 0
    while sent < n:
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        while sent < due:
            source_emit(make_packet(sent, size))
            sent += 1
        await asyncio.sleep(tick)
    await asyncio.sleep(0.3)  # drain: ACKs, last transmits
    return time.process_time() - cpu0


def spawn(job: dict[str, Any], args: argparse.Namespace) -> tuple[Any, Connection]:
    job["cpus"] = args.cpus
    job["uvloop"] = args.uvloop
    job["profile"] = args.profile if job.pop("profiled", False) else None
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=remote_main, args=(child, job), daemon=True)
    proc.start()
    return proc, parent


async def run_quic(args: argparse.Namespace, listeners: int, via_proxy: bool) -> dict[str, Any]:
    """One relay scenario; returns origin and remote figures (and link bytes via proxy)."""
    from bench.impairment import Impairment, ImpairmentProxy

    n = int(args.rate * args.seconds)
    okey = Ed25519PrivateKey.generate()
    rkey = Ed25519PrivateKey.generate()
    rpub = public_key_bytes(rkey)
    src = BenchSource()
    cfg = RelayConfig(
        datagram_flush_batch=args.flush_batch,
        max_datagram_size=args.max_datagram_size,
        quic_fast_path=args.fast_path,
        udp_offload=args.udp_offload,
        quic_acks=args.acks,
        congestion_control=args.congestion,
    )
    ep = RelayEndpoint(okey, {PRODUCER: src}.get, lambda k: k == rpub, cfg)
    await ep.start()
    proxy = None
    port = ep.address[1]
    if via_proxy:
        delay, loss = args.path_delay, args.path_loss
        proxy = await ImpairmentProxy(
            (LOCAL, port),
            up=Impairment(delay=delay, loss=loss, seed=1),
            down=Impairment(delay=delay, loss=loss, seed=2),
        ).start()
        port = proxy.port
    job = {
        "mode": "quic",
        "key": rkey.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        "origin_key": public_key_bytes(okey),
        "port": port,
        "listeners": listeners,
        "expected": n,
        "rate": args.rate,
        "profiled": not via_proxy,
        "fast_path": args.fast_path,
        "udp_offload": args.udp_offload,
        "acks": args.acks,
        "congestion": args.congestion,
    }
    proc, pipe = spawn(job, args)
    try:
        await _recv(pipe)
        await asyncio.sleep(0.3)
        before = ep.origin_flows()
        flow_count = len(before)
        stats = before[0][3] if before else None  # live object, read after the run
        down0 = proxy.down.bytes_passed if proxy else 0
        total0 = proxy.bytes_total if proxy else 0
        profiler = cProfile.Profile() if args.profile and not via_proxy else None
        if profiler is not None:
            profiler.enable()
        cpu = await emit(src.emit, n, args.rate, args.size, args.tick_ms / 1000)
        quic_stats = ep.quic_stats()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(args.profile, "origin-quic.pstats"))
        link_bytes = (proxy.down.bytes_passed - down0) if proxy else None
        link_total = (proxy.bytes_total - total0) if proxy else None
        remote = await _recv(pipe, timeout=60.0)
        return {
            "listeners": listeners,
            "sent": n,
            "origin_cpu_s": cpu,
            "origin_flows": flow_count,
            "origin_dropped": stats.dropped if stats else None,
            "origin_retransmits": stats.retransmits if stats else None,
            "link_bytes": link_bytes,
            "link_bytes_both_ways": link_total,
            "quic_stats": quic_stats,
            "remote": remote,
        }
    finally:
        proc.join(10)
        await ep.close()
        if proxy:
            proxy.close()


async def run_udp(args: argparse.Namespace) -> dict[str, Any]:
    """Baseline: the same packets forwarded over a plain UDP socket."""
    import socket

    n = int(args.rate * args.seconds)
    proc, pipe = spawn({"mode": "udp", "expected": n, "rate": args.rate}, args)
    try:
        port = (await _recv(pipe))["port"]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((LOCAL, port))
        src = BenchSource()
        send = sock.send

        def forward(pkt: bytes) -> None:
            send(pkt)

        src.add_packet_listener(forward)
        await asyncio.sleep(0.3)
        cpu = await emit(src.emit, n, args.rate, args.size, args.tick_ms / 1000)
        remote = await _recv(pipe, timeout=60.0)
        sock.close()
        return {"sent": n, "origin_cpu_s": cpu, "remote": remote}
    finally:
        proc.join(10)


async def run_generator(args: argparse.Namespace) -> float:
    """CPU of generating/pacing the packets with no listener (subtracted on the origin)."""
    n = int(args.rate * args.seconds)
    src = BenchSource()
    return await emit(src.emit, n, args.rate, args.size, args.tick_ms / 1000)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    pin(args.cpus, 0)
    n = int(args.rate * args.seconds)
    gen = await run_generator(args)
    udp = await run_udp(args)
    quic = await run_quic(args, 1, via_proxy=False)
    links = {}
    for count in args.listeners:
        links[count] = await run_quic(args, count, via_proxy=True)

    def per_pkt(cpu: float) -> float:
        return max(0.0, cpu - gen) / n * 1e6

    udp_origin = per_pkt(udp["origin_cpu_s"])
    quic_origin = per_pkt(quic["origin_cpu_s"])
    udp_remote = udp["remote"]["cpu_us_per_packet"]
    quic_remote = quic["remote"]["cpu_us_per_packet"]
    base = links[args.listeners[0]]["link_bytes"] or 1
    report: dict[str, Any] = {
        "bench": "relay",
        "packets": n,
        "rate_pps": args.rate,
        "packet_bytes": args.size,
        "cpus": len(args.cpus),
        "uvloop": args.uvloop,
        "tick_ms": args.tick_ms,
        "flush_batch": args.flush_batch,
        "max_datagram_size": args.max_datagram_size,
        "fast_path": args.fast_path,
        "udp_offload": args.udp_offload,
        "acks": dataclasses.asdict(args.acks),
        "congestion_control": args.congestion,
        "load_average": os.getloadavg(),
        "generator_cpu_us_per_packet": gen / n * 1e6,
        "origin_cpu_us_per_packet": {"quic": quic_origin, "udp": udp_origin},
        "remote_cpu_us_per_packet": {"quic": quic_remote, "udp": udp_remote},
        "latency_us": {
            "quic_p50": quic["remote"]["lat_p50_us"],
            "quic_p95": quic["remote"]["lat_p95_us"],
            "udp_p50": udp["remote"]["lat_p50_us"],
            "udp_p95": udp["remote"]["lat_p95_us"],
            "added_p50": quic["remote"]["lat_p50_us"] - udp["remote"]["lat_p50_us"],
            "added_p95": quic["remote"]["lat_p95_us"] - udp["remote"]["lat_p95_us"],
        },
        "delivered": {"quic": quic["remote"]["packets"], "udp": udp["remote"]["packets"]},
        "quic_stats": {"origin": quic["quic_stats"], "remote": quic["remote"].get("quic_stats")},
        "link_bytes": {str(k): v["link_bytes"] for k, v in links.items()},
        "link_bytes_both_ways": {str(k): v["link_bytes_both_ways"] for k, v in links.items()},
        "link_flows": {str(k): v["origin_flows"] for k, v in links.items()},
        "link_retransmits": {str(k): v["origin_retransmits"] for k, v in links.items()},
        "link_bytes_ratio": {
            f"{k}:{args.listeners[0]}": (v["link_bytes"] or 0) / base for k, v in links.items()
        },
        "delivered_per_listener_count": {str(k): v["remote"]["packets"] for k, v in links.items()},
    }
    return report


#: --compare configurations: (QUIC fast path, UDP offload, when the remote ACKs,
#: congestion control)
COMPARE_MODES: dict[str, tuple[bool, bool, AckSettings, str]] = {
    "aioquic": (False, False, AckSettings(ack_after=0, every=0), "reno"),
    "fast": (True, False, AckSettings(ack_after=0, every=0), "reno"),
    "fast+gso": (True, True, AckSettings(ack_after=0, every=0), "reno"),
    "fast+gso+ack": (True, True, AckSettings(every=0), "reno"),
    "fast+gso+thin": (True, True, AckSettings(), "reno"),
    "fast+gso+thin+media": (True, True, AckSettings(), RelayConfig.congestion_control),
}


async def compare_async(args: argparse.Namespace) -> dict[str, Any]:
    """The QUIC hop in each of ``args.modes``, round-robin, ``args.compare`` rounds."""
    pin(args.cpus, 0)
    n = int(args.rate * args.seconds)
    modes = [m for m in args.modes.split(",") if m]
    # through the impairment proxy, which runs in the origin's process: its CPU is not
    # the relay's then, only delivery, latency and losses are
    impaired = bool(args.path_delay or args.path_loss)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for _ in range(args.compare):
        for mode in modes:
            args.fast_path, args.udp_offload, args.acks, args.congestion = COMPARE_MODES[mode]
            gen = await run_generator(args)
            quic = await run_quic(args, 1, via_proxy=impaired)
            rem = quic["remote"]
            runs[mode].append(
                {
                    "origin_us": max(0.0, quic["origin_cpu_s"] - gen) / n * 1e6,
                    "remote_us": rem["cpu_us_per_packet"],
                    "lat_p50_us": rem["lat_p50_us"],
                    "lat_p95_us": rem["lat_p95_us"],
                    "delivered": rem["packets"],
                    "load_average": os.getloadavg()[0],
                    "origin_quic": quic["quic_stats"],
                    "remote_quic": rem.get("quic_stats"),
                }
            )
            if impaired:
                print(
                    f"  {mode}: delivered {rem['packets']} of {n}, latency p50 / p95 "
                    f"{rem['lat_p50_us'] / 1000:.1f} / {rem['lat_p95_us'] / 1000:.1f} ms, "
                    f"QUIC losses {quic['quic_stats']['packets_lost']}, "
                    f"remote ACKs {(rem.get('quic_stats') or {}).get('acks_sent')}, "
                    f"flow repairs {quic['origin_retransmits']}",
                    file=sys.stderr,
                )
    medians = {
        mode: {
            key: statistics.median(r[key] for r in values)
            for key in ("origin_us", "remote_us", "lat_p50_us", "lat_p95_us")
        }
        for mode, values in runs.items()
    }
    return {
        "bench": "relay_compare",
        "packets": n,
        "rate_pps": args.rate,
        "packet_bytes": args.size,
        "rounds": args.compare,
        "path_delay": args.path_delay,
        "path_loss": args.path_loss,
        "load_average": os.getloadavg(),
        "medians": medians,
        "runs": runs,
    }


def print_compare(r: dict[str, Any]) -> None:
    print(
        f"relay hop by configuration: {r['packets']} packets at {r['rate_pps']:.0f} pkt/s, "
        f"{r['rounds']} round-robin rounds (medians)"
    )
    print(f"{'':14}{'origin us':>8}{'remote us':>12}{'p50 us':>10}{'p95 us':>10}")
    for mode, m in r["medians"].items():
        print(
            f"{mode:14}{m['origin_us']:8.1f}{m['remote_us']:12.1f}"
            f"{m['lat_p50_us']:10.0f}{m['lat_p95_us']:10.0f}"
        )
    base = r["medians"].get("aioquic")
    if base:
        for mode, m in r["medians"].items():
            if mode != "aioquic":
                print(
                    f"{mode + ' / aioquic':24}{m['origin_us'] / base['origin_us']:6.2f}"
                    f"{m['remote_us'] / base['remote_us']:12.2f}"
                )
    for mode, values in r["runs"].items():
        for v in values:
            print(
                f"  {mode:12} origin {v['origin_us']:6.1f} remote {v['remote_us']:6.1f} "
                f"p50 {v['lat_p50_us']:7.0f} p95 {v['lat_p95_us']:7.0f} "
                f"delivered {v['delivered']} load {v['load_average']:.1f}"
            )
            o, q = v["origin_quic"], v["remote_quic"] or {}
            print(
                f"           origin: {o.get('fast_packets_sent', 0)} fast sent, "
                f"{o.get('general_sends', 0)} aioquic sends, "
                f"{o.get('fast_packets_received', 0)} fast received, "
                f"{o.get('general_receives', 0)} aioquic receives, "
                f"{o.get('packets_lost', 0)} lost, {o.get('timer_fires', 0)} timers; remote: "
                f"{q.get('fast_packets_received', 0)} fast received, "
                f"{q.get('general_receives', 0)} aioquic receives, "
                f"{q.get('fast_packets_sent', 0)} fast sent, "
                f"{q.get('general_sends', 0)} aioquic sends, {q.get('timer_fires', 0)} timers"
            )


def print_table(r: dict[str, Any]) -> None:
    lat = r["latency_us"]
    oc, rc = r["origin_cpu_us_per_packet"], r["remote_cpu_us_per_packet"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.1f}x" if b > 0 else "n/a"

    print(
        f"relay benchmark: {r['packets']} packets of {r['packet_bytes']} B "
        f"at {r['rate_pps']:.0f} pkt/s, {r['cpus']} CPUs, uvloop={r['uvloop']}"
    )
    print(f"{'':28}{'QUIC relay':>14}{'plain UDP':>14}{'ratio':>10}")
    print(
        f"{'origin CPU us/packet':28}{oc['quic']:14.1f}{oc['udp']:14.1f}"
        f"{ratio(oc['quic'], oc['udp']):>10}"
    )
    print(
        f"{'remote CPU us/packet':28}{rc['quic']:14.1f}{rc['udp']:14.1f}"
        f"{ratio(rc['quic'], rc['udp']):>10}"
    )
    print(f"{'one-way latency p50 us':28}{lat['quic_p50']:14.0f}{lat['udp_p50']:14.0f}")
    print(f"{'one-way latency p95 us':28}{lat['quic_p95']:14.0f}{lat['udp_p95']:14.0f}")
    print(f"{'added latency p50/p95 us':28}{lat['added_p50']:14.0f}{lat['added_p95']:14.0f}")
    print(f"{'delivered':28}{r['delivered']['quic']:14d}{r['delivered']['udp']:14d}")
    print(f"(generator cost subtracted on the origin: {r['generator_cpu_us_per_packet']:.1f} us)")
    print(
        f"{'remote listeners':28}{'link bytes':>14}{'flows':>8}{'ratio':>10}{'delivered':>11}"
        f"{'both ways':>12}{'rtx':>6}"
    )
    for k, v in r["link_bytes"].items():
        key = next(x for x in r["link_bytes_ratio"] if x.startswith(f"{k}:"))
        print(
            f"{k:>28}{v:14d}{r['link_flows'][k]:8d}{r['link_bytes_ratio'][key]:10.4f}"
            f"{r['delivered_per_listener_count'][k]:11d}{r['link_bytes_both_ways'][k]:12d}"
            f"{r['link_retransmits'][k] or 0:6d}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=2000.0, help="packets per second")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--size", type=int, default=1100, help="RTP packet size in bytes")
    ap.add_argument("--listeners", default="1,10,50", help="remote listener counts")
    ap.add_argument("--uvloop", action="store_true", help="run both nodes on uvloop")
    ap.add_argument(
        "--flush-batch",
        type=int,
        default=RelayConfig.datagram_flush_batch,
        help="origin: flush queued datagrams to the socket once this many wait",
    )
    ap.add_argument(
        "--max-datagram-size",
        type=int,
        default=RelayConfig.max_datagram_size,
        help="origin: UDP payload size of QUIC packets (above the path MTU only on loopback)",
    )
    ap.add_argument("--tick-ms", type=float, default=5.0, help="emission tick (burst spacing)")
    ap.add_argument(
        "--profile", default=None, help="directory for cProfile stats of both ends (slows them)"
    )
    ap.add_argument(
        "--no-fast-path",
        dest="fast_path",
        action="store_false",
        help="both ends use aioquic's general path only (RelayConfig.quic_fast_path=False)",
    )
    ap.add_argument(
        "--no-udp-offload",
        dest="udp_offload",
        action="store_false",
        help="no UDP segmentation offload on the relay sockets (RelayConfig.udp_offload=False)",
    )
    ap.add_argument(
        "--ack-every",
        type=int,
        default=AckSettings.every,
        help="remote: past the start, one ACK per this many packets (0: ACK every read "
        "of 2+ packets, else after 1 ms)",
    )
    ap.add_argument(
        "--ack-delay",
        type=float,
        default=AckSettings.delay,
        help="remote: past the start, how long an ACK may wait, seconds",
    )
    ap.add_argument(
        "--path-delay",
        type=float,
        default=0.0,
        help="--compare through the impairment proxy with this one-way delay, seconds "
        "(CPU figures then include the proxy's)",
    )
    ap.add_argument(
        "--path-loss", type=float, default=0.0, help="--compare: loss rate each way (0..1)"
    )
    ap.add_argument(
        "--compare",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only the QUIC hop (1 listener): each of --modes in turn, ROUNDS times",
    )
    ap.add_argument(
        "--modes",
        default="aioquic,fast,fast+gso,fast+gso+ack,fast+gso+thin+media",
        help="configurations for --compare (of: " + ", ".join(COMPARE_MODES) + ")",
    )
    args = ap.parse_args(argv)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    args.cpus = available_cpus()
    args.acks = AckSettings(every=args.ack_every, delay=args.ack_delay)
    args.congestion = RelayConfig.congestion_control
    args.listeners = [int(x) for x in args.listeners.split(",")]
    if args.compare:
        with asyncio.Runner(loop_factory=lambda: new_loop(args.uvloop)) as runner:
            result = runner.run(compare_async(args))
        print_compare(result)
        sys.stdout.flush()
        print(json.dumps(result))
        return
    with asyncio.Runner(loop_factory=lambda: new_loop(args.uvloop)) as runner:
        report = runner.run(main_async(args))
    print_table(report)
    sys.stdout.flush()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
