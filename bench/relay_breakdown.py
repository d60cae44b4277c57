"""Where a relayed packet's CPU goes, measured in memory (no sockets, no event loop).

Two aioquic connections are joined in memory and driven the way ``relay/endpoint.py``
drives them, with the sans-I/O relay layer on top: an origin ``RelayConnection`` +
``OriginFlows`` serving a synthetic producer, a remote ``RelayConnection`` +
``RemoteFlows`` with one listener. Packets go in bursts (default 10, as the relay benchmark
emits them every 5 ms). Each stage is timed separately:

* origin relay layer: producer listener -> flow datagram queued (``relay/origin.py``,
  ``relay/connection.py``);
* origin QUIC: DATAGRAM frames queued, packets built and encrypted (``datagrams_to_send``);
* remote QUIC: packets decrypted and parsed, events read (``receive_datagram``) and the
  ACK built (one per burst);
* remote relay layer: flow datagram -> ``RemoteProducer`` -> listener;
* origin ACK handling.

Both QUIC ends go through ``relay.quic_adapter.DatagramFastPath`` (``--no-fast-path``:
aioquic's general path only, as before it). Sockets, the event loop and scheduling come
on top (see ``bench/relay.py``). The baseline in the same run is copying the packet bytes
once per packet. Times are CPU time of this thread.

    python -m bench.relay_breakdown [--packets 20000] [--burst 10] [--size 1100]
    python -m bench.relay_breakdown --stock-pacer      # aioquic's pacer, for comparison
    python -m bench.relay_breakdown --compare          # fast path on and off, alternating

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import struct
import time
from typing import Any

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay import RelayConfig, RelayCounters, make_certificate
from relay.connection import RelayConnection
from relay.origin import OriginFlows
from relay.protocol import ALPN
from relay.quic_adapter import DatagramFastPath, pending_datagrams, use_burst_pacer
from relay.remote import RemoteFlows, SubscribeResult

ADDR = ("127.0.0.1", 4433)


class _Source:
    kind = "video"

    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def codec_params(self) -> dict[str, object]:
        return {"mime_type": "video/VP8", "clock_rate": 90000, "payload_type": 96}

    def add_packet_listener(self, cb: Any) -> None:
        self.listeners.append(cb)

    def remove_packet_listener(self, cb: Any) -> None:
        self.listeners.remove(cb)

    def request_keyframe(self) -> None:
        pass

    def get_cached_packet(self, seq: int) -> bytes | None:
        return None

    def on_close(self, cb: Any) -> None:
        pass


def _quic_pair(now: float) -> tuple[QuicConnection, QuicConnection]:
    key = Ed25519PrivateKey.generate()
    common = {"alpn_protocols": [ALPN], "max_datagram_frame_size": 65535}
    server_cfg = QuicConfiguration(is_client=False, **common)  # type: ignore[arg-type]
    server_cfg.certificate = make_certificate(key)
    server_cfg.private_key = key
    client_cfg = QuicConfiguration(
        is_client=True,
        verify_mode=ssl.CERT_NONE,
        server_name="cascade-node",
        **common,  # type: ignore[arg-type]
    )
    client = QuicConnection(configuration=client_cfg)
    client.connect(ADDR, now=now)
    server = QuicConnection(
        configuration=server_cfg,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    for _ in range(10):
        now += 0.001
        for a, b in ((client, server), (server, client)):
            for data, _ in a.datagrams_to_send(now=now):
                b.receive_datagram(data, ADDR, now=now)
    while client.next_event() is not None:
        pass
    while server.next_event() is not None:
        pass
    return client, server


def run(
    packets: int, burst: int, size: int, stock_pacer: bool = False, fast_path: bool = True
) -> dict[str, Any]:
    """Time each stage for ``packets`` packets; returns µs per packet (CPU time)."""
    now = 1000.0
    client, server = _quic_pair(now)
    if not stock_pacer:  # as QuicRelayProtocol does
        use_burst_pacer(client)
        use_burst_pacer(server)
    fast_client = DatagramFastPath(client, fast_path)
    fast_server = DatagramFastPath(server, fast_path)
    cfg = RelayConfig()
    origin = RelayConnection(cfg, RelayCounters(), now)  # trusted, like a pipe
    source = _Source()
    origin.origin = OriginFlows(origin, {"cam": source}.get, cfg, RelayCounters())
    flows = RemoteFlows(cfg, RelayCounters(), lambda: now)
    remote = RelayConnection(cfg, RelayCounters(), now, remote=flows)
    got: list[SubscribeResult] = []
    flows.open("cam", got.append)
    origin.receive_control(remote.take_control(), False, now)
    remote.receive_control(origin.take_control(), False, now)
    rp = got[0]
    delivered = [0]

    def listener(pkt: bytes) -> None:
        delivered[0] += 1

    rp.add_packet_listener(listener)  # type: ignore[union-attr]
    header = struct.Struct("!BBHII")
    body = bytes(size - 12)
    pkts = [header.pack(0x80, 96, i & 0xFFFF, i * 3000, 0x5EED) + body for i in range(packets)]
    t = dict.fromkeys(("origin_relay", "origin_quic", "remote_quic", "remote_relay", "ack"), 0.0)
    emit = source.listeners[0]
    clock = time.thread_time  # CPU, so that a busy machine's preemptions do not count
    copy_t = 0.0
    for start in range(0, packets, burst):
        now += 0.005
        chunk = pkts[start : start + burst]
        t0 = clock()
        for pkt in chunk:
            emit(pkt)
        out, origin.datagrams_out = origin.datagrams_out, []
        t1 = clock()
        for data in out:
            server.send_datagram_frame(data)
        wire = fast_server.datagrams_to_send(now)
        pending = pending_datagrams(server)
        while pending:  # held back by the pacer: what its timer would send
            now += 0.00005
            fast_server.handle_timer(now)
            wire += fast_server.datagrams_to_send(now)
        t2 = clock()
        frames: list[bytes] = []
        for data, _ in wire:
            frames.extend(fast_client.receive_datagram(data, ADDR, now))
            event = client.next_event()
            while event is not None:
                if type(event) is events.DatagramFrameReceived:
                    frames.append(event.data)
                event = client.next_event()
        acks = fast_client.datagrams_to_send(now + 0.002)
        t3 = clock()
        for data in frames:
            remote.receive_datagram(data, now)
        t4 = clock()
        for data, _ in acks:
            fast_server.receive_datagram(data, ADDR, now + 0.003)
        while server.next_event() is not None:
            pass
        t5 = clock()
        for pkt in chunk:
            bytes(bytearray(pkt))
        t6 = clock()
        t["origin_relay"] += t1 - t0
        t["origin_quic"] += t2 - t1
        t["remote_quic"] += t3 - t2
        t["remote_relay"] += t4 - t3
        t["ack"] += t5 - t4
        copy_t += t6 - t5
    if delivered[0] != packets:
        raise RuntimeError(f"delivered {delivered[0]} of {packets}")
    us = {k: v / packets * 1e6 for k, v in t.items()}
    us["copy_baseline"] = copy_t / packets * 1e6
    return us


def _totals(us: dict[str, float]) -> tuple[float, float]:
    origin = us["origin_relay"] + us["origin_quic"] + us["ack"]
    remote = us["remote_quic"] + us["remote_relay"]
    return origin, remote


def compare(args: argparse.Namespace, rounds: int) -> None:
    """Fast path on and off, alternating, ``rounds`` times; prints medians and a JSON line."""
    results: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    for _ in range(rounds):
        for mode in ("on", "off"):
            us = run(args.packets, args.burst, args.size, args.stock_pacer, mode == "on")
            results[mode].append(_totals(us))
    med = {
        mode: (
            statistics.median(o for o, _ in values),
            statistics.median(r for _, r in values),
        )
        for mode, values in results.items()
    }
    print(f"fast path on/off, {rounds} alternating rounds, medians (µs/packet, CPU):")
    print(f"{'':10}{'origin':>10}{'remote':>10}")
    for mode, (o, r) in med.items():
        print(f"{mode:10}{o:10.2f}{r:10.2f}")
    on, off = med["on"], med["off"]
    print(f"{'ratio':10}{on[0] / off[0]:10.2f}{on[1] / off[1]:10.2f}")
    print(
        json.dumps(
            {
                "bench": "relay_breakdown_compare",
                "packets": args.packets,
                "burst": args.burst,
                "rounds": rounds,
                "origin_us": {"fast": on[0], "aioquic": off[0]},
                "remote_us": {"fast": on[1], "aioquic": off[1]},
                "runs": results,
            }
        )
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=20000)
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--size", type=int, default=1100)
    ap.add_argument(
        "--stock-pacer", action="store_true", help="aioquic's own pacer (before the fix)"
    )
    ap.add_argument("--no-fast-path", action="store_true", help="aioquic's general path only")
    ap.add_argument(
        "--compare", type=int, default=0, metavar="ROUNDS", help="fast path on/off, alternating"
    )
    args = ap.parse_args(argv)
    if args.compare:
        compare(args, args.compare)
        return
    us = run(args.packets, args.burst, args.size, args.stock_pacer, not args.no_fast_path)
    base = us["copy_baseline"] or 1e-9
    print(
        f"relay breakdown, in memory: {args.packets} packets of {args.size} B, "
        f"bursts of {args.burst}"
    )
    print(f"{'stage':34}{'us/packet':>10}{'x copy':>10}")
    for k, v in us.items():
        print(f"{k:34}{v:10.2f}{v / base:10.1f}")
    origin, remote = _totals(us)
    print(f"{'origin total (no sockets)':34}{origin:10.2f}")
    print(f"{'remote total (no sockets)':34}{remote:10.2f}")
    print(
        json.dumps(
            {
                "bench": "relay_breakdown",
                "packets": args.packets,
                "burst": args.burst,
                "packet_bytes": args.size,
                "stock_pacer": args.stock_pacer,
                "fast_path": not args.no_fast_path,
                "us_per_packet": us,
                "origin_total_us": origin,
                "remote_total_us": remote,
            }
        )
    )


if __name__ == "__main__":
    main()
