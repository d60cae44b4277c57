"""Overlay benchmark: six node processes in three regions, SDK participants joining rooms
through random nodes with random region hints.

    python -m bench.overlay [--rooms 10] [--participants 60] [--publish-share 0.34]
                            [--client-procs 4]

The participants run in ``--client-procs`` client processes (round robin), so that one
saturated decoding process does not stand in for the overlay's latency; and a subscriber
drops a track's RTP (before SRTP) once that track has decoded its first frame, unless
``--decode-all``: the nodes keep forwarding everything, but the clients, which share the
machine's cores with the six nodes, stop costing what separate participant machines would.

Reports join -> first decoded frame (p50/p95) for subscribers placed on the publisher's node,
after a redirect, and when the room had to be relayed to their node, each with a per-stage
breakdown (p50 and p95 of each, ms from the start of the join): ``joined`` (the join reply,
redirects included), ``offer`` (the subscribe offer carrying the track), ``connected`` (the
subscribe peer connection's ICE + DTLS), ``first_rtp`` (the track's first RTP packet at the
client: for video the first forwarded keyframe) and ``decoded``. Also the share of
participants placed in their own region; relay flows against the minimum the placement
needs; nodes per room against the minimum (the number of regions its participants come
from); directory (DHT) bytes per node per second; and the CPU time the six nodes used.
The baseline of the first-frame figures is the same run's same-node joins. Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
import urllib.request
from multiprocessing.connection import Connection
from typing import Any

import psutil

from peer import aiortc_adapter as rtc
from peer.client import CascadeClient, mint_token
from peer.demo import DemoNode, start_nodes, stop_nodes
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.tokens import new_secret

SITES = (
    ("eu", (48.86, 2.35)),
    ("eu", (50.11, 8.68)),
    ("us", (38.90, -77.04)),
    ("us", (37.77, -122.42)),
    ("ap", (35.68, 139.69)),
    ("ap", (1.35, 103.82)),
)
STAGES = ("joined", "offer", "connected", "first_rtp", "decoded")


class TimedClient(CascadeClient):
    """An SDK client that notes when each stage of its first frames happened."""

    def __init__(self, url: str, *, decode_all: bool = False) -> None:
        super().__init__(url, reconnect=False)
        # Unless decode_all, a track's RTP is dropped (before SRTP) once it has shown a
        # frame: what is measured is the first frame, and the clients share two cores
        # with the nodes where a real deployment has one machine per participant.
        self.decode_all = decode_all
        self.started = 0.0
        self.joined_at: float | None = None
        self.connected_at: float | None = None
        self.first_rtp: dict[int, float] = {}  # ssrc -> arrival of its first RTP packet
        self.ssrc_of_mid: dict[str, int] = {}
        self._filtered = False

    def _watch(self, pc: Any) -> None:
        super()._watch(pc)
        sub = self._subscribe_pc
        if sub is None or pc is not sub:
            return

        @sub.on("connectionstatechange")
        def on_state() -> None:
            if sub.connectionState == "connected" and self.connected_at is None:
                self.connected_at = time.monotonic()

    async def _handle_offer(self, message: dict[str, Any], ws: Any) -> None:
        mid = None
        for line in str(message.get("sdp", "")).splitlines():
            if line.startswith("a=mid:"):
                mid = line[6:].strip()
            elif line.startswith("a=ssrc:") and mid is not None and mid not in self.ssrc_of_mid:
                self.ssrc_of_mid[mid] = int(line[7:].split()[0])
        await super()._handle_offer(message, ws)
        pc = self._subscribe_pc
        if pc is not None and not self._filtered:
            self._filtered = True
            first = self.first_rtp
            mid_of_ssrc: dict[int, str] = {}
            by_mid = self._by_mid

            def note(data: bytes) -> bool:
                if len(data) >= 12 and 127 < data[0] < 192 and not 191 < data[1] < 224:
                    ssrc = int.from_bytes(data[8:12], "big")
                    if ssrc not in first:
                        first[ssrc] = time.monotonic()
                        return True
                    if self.decode_all:
                        return True
                    if len(mid_of_ssrc) != len(self.ssrc_of_mid):
                        mid_of_ssrc.update((v, k) for k, v in self.ssrc_of_mid.items())
                    sub = by_mid.get(mid_of_ssrc.get(ssrc, ""))
                    return sub is None or sub.first_frame_at is None
                return True

            rtc.set_receive_filter(pc, note)

    def timings(self) -> dict[str, dict[str, float | None]]:
        """producer id -> stage -> seconds since the join started (video tracks)."""

        def since(t: float | None) -> float | None:
            return None if t is None else t - self.started

        out: dict[str, dict[str, float | None]] = {}
        loop_to_mono = time.monotonic() - asyncio.get_running_loop().time()
        for t in self.tracks.values():
            if t.kind != "video":
                continue
            ssrc = self.ssrc_of_mid.get(str(t.mid))
            out[t.producer_id] = {
                "joined": since(self.joined_at),
                "offer": since(t.subscribed_at + loop_to_mono),
                "connected": since(self.connected_at),
                "first_rtp": since(self.first_rtp.get(ssrc)) if ssrc is not None else None,
                "decoded": since(t.first_frame_at + loop_to_mono) if t.first_frame_at else None,
            }
        return out


async def _client_process(conn: Connection) -> None:
    """Serve join/report/close commands from the benchmark's main process."""
    rtc.set_ice_addresses(["127.0.0.1"])
    loop = asyncio.get_running_loop()
    clients: dict[str, tuple[dict[str, Any], TimedClient]] = {}
    while True:
        command, arg = await loop.run_in_executor(None, conn.recv)
        if command == "join":
            client = TimedClient(arg["entry"], decode_all=arg["decode_all"])
            clients[arg["who"]] = (arg, client)
            try:
                client.started = time.monotonic()
                await client.connect()
                await client.join(
                    arg["room"],
                    arg["token"],
                    region=arg["hint"],
                    auto_subscribe=not arg["publisher"],
                    name=arg["who"],
                )
                client.joined_at = time.monotonic()
                if arg["publisher"]:
                    await client.publish(
                        [
                            PatternVideoTrack(320, 240, bitrate=250_000, periodic_keyframes=False),
                            ToneAudioTrack(),
                        ]
                    )
                conn.send(True)
            except Exception as exc:
                conn.send(repr(exc))
        elif command == "report":
            conn.send(
                [
                    {
                        **spec,
                        "url": c.url,
                        "redirects": len(c.redirects),
                        "producers": [str(p["producer_id"]) for p in c.producers],
                        "timings": c.timings(),
                    }
                    for spec, c in clients.values()
                ]
            )
        elif command == "close":
            await asyncio.gather(*(c.close() for _, c in clients.values()), return_exceptions=True)
            conn.send(True)
            return


def _client_main(conn: Connection) -> None:
    asyncio.run(_client_process(conn))


class ClientPool:
    """Client processes, each holding some of the participants."""

    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(theirs,), daemon=True)
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)
        self._next = 0
        self.locks = [asyncio.Lock() for _ in self.conns]

    async def call(self, index: int, command: str, arg: Any = None) -> Any:
        async with self.locks[index]:
            conn = self.conns[index]
            conn.send((command, arg))
            return await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    async def join(self, spec: dict[str, Any]) -> None:
        index = self._next % len(self.conns)
        self._next += 1
        result = await self.call(index, "join", spec)
        if result is not True:
            print(f"join of {spec['who']} failed: {result}", file=sys.stderr)

    async def report(self) -> list[dict[str, Any]]:
        parts = await asyncio.gather(*(self.call(i, "report") for i in range(len(self.conns))))
        return [r for part in parts for r in part]

    async def close(self) -> None:
        await asyncio.gather(
            *(self.call(i, "close") for i in range(len(self.conns))), return_exceptions=True
        )
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def _column(rows: list[dict[str, float | None]], stage: str) -> list[float]:
    return [v for r in rows if (v := r[stage]) is not None]


def _summary(rows: list[dict[str, float | None]]) -> dict[str, object]:
    decoded = _column(rows, "decoded")
    return {
        "p50": pct(decoded, 0.5),
        "p95": pct(decoded, 0.95),
        "n": len(decoded),
        "stages_p50": {stage: pct(_column(rows, stage), 0.5) for stage in STAGES},
        "stages_p95": {stage: pct(_column(rows, stage), 0.95) for stage in STAGES},
    }


async def run(
    rooms: int,
    participants: int,
    publish_share: float,
    seed: int,
    client_procs: int,
    decode_all: bool = False,
) -> dict:
    rng = random.Random(seed)
    base, dht = 18580, 14580
    plan = [
        DemoNode(
            f"{region}-{i}",
            region,
            loc,
            base + i,
            dht + i,
            None if i == 0 else f"127.0.0.1:{dht}",
            ("--max-cpu", "50", "--max-consumers", "400", "--dht-ttl", "6", "--ws-per-ip", "0"),
        )
        for i, (region, loc) in enumerate(SITES)
    ]
    secret = new_secret()
    env = {**os.environ, "CASCADE_API_SECRET": secret}
    pool = ClientPool(client_procs)
    procs = start_nodes(plan, env)
    region_of = {n.url: n.region for n in plan}
    try:
        await asyncio.sleep(3.0)  # every node sees every other in the directory
        dht_before = {n.url: _get(f"{n.url}/overlay")["dht"] for n in plan}
        node_procs = [psutil.Process(p.pid) for p in procs]

        def node_cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in node_procs)

        cpu_before = node_cpu()
        t_before = time.monotonic()
        names = [f"room{r}" for r in range(rooms)]
        per_room = max(2, participants // rooms)
        publishers_per_room = max(1, round(per_room * publish_share))
        regions = sorted({r for r, _ in SITES})

        def spec(room: str, who: str, publisher: bool) -> dict[str, Any]:
            return {
                "room": room,
                "who": who,
                "publisher": publisher,
                "entry": rng.choice(plan).url,
                "hint": rng.choice(regions),
                "token": mint_token(room, who, secret=secret),
                "decode_all": decode_all,
            }

        # Publishers first (their rooms get placed), then subscribers in random order.
        for room in names:
            for p in range(publishers_per_room):
                await pool.join(spec(room, f"{room}-pub{p}", True))
                await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        order = [(room, s) for room in names for s in range(per_room - publishers_per_room)]
        rng.shuffle(order)
        for room, s in order:
            await pool.join(spec(room, f"{room}-sub{s}", False))
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 30
        while True:
            report = await pool.report()
            subs = [r for r in report if not r["publisher"]]
            done = all(
                sum(1 for t in r["timings"].values() if t["decoded"] is not None)
                >= publishers_per_room
                for r in subs
            )
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - t_before
        cpu_used = node_cpu() - cpu_before
        for r in subs:
            got = [p for p, t in r["timings"].items() if t["decoded"] is not None]
            if len(got) < publishers_per_room:
                print(
                    f"missing: {r['room']} sub on {r['url']} (entry {r['entry']}, hint"
                    f" {r['hint']}, redirects {r['redirects']}): decoded {len(got)}",
                    file=sys.stderr,
                )
        views = {n.url: _get(f"{n.url}/overlay") for n in plan}

        # Where everyone ended up.
        publisher_node: dict[str, str] = {}
        room_of_producer: dict[str, str] = {}
        for r in report:
            for producer_id in r["producers"]:
                publisher_node[producer_id] = r["url"]
                room_of_producer[producer_id] = r["room"]
        same: list[dict[str, float | None]] = []
        redirected: list[dict[str, float | None]] = []
        relayed: list[dict[str, float | None]] = []
        for r in subs:
            for producer_id, timing in r["timings"].items():
                if publisher_node.get(producer_id) != r["url"]:
                    relayed.append(timing)
                elif r["redirects"]:
                    redirected.append(timing)
                else:
                    same.append(timing)
        in_region = sum(1 for r in report if region_of[r["url"]] == r["hint"])
        # Flows: relayed producers on each node; minimum: per room, each producer to every
        # other node hosting subscribers of that room.
        flows = sum(
            len(v["relayed_producers"].get(room, [])) for v in views.values() for room in names
        )
        minimum_flows = 0
        nodes_per_room, min_nodes_per_room = [], []
        for room in names:
            members = [r for r in report if r["room"] == room]
            hosts = {r["url"] for r in members}
            sub_hosts = {r["url"] for r in members if not r["publisher"]}
            for pid, host in publisher_node.items():
                if room_of_producer[pid] == room:
                    minimum_flows += len(sub_hosts - {host})
            nodes_per_room.append(len(hosts))
            min_nodes_per_room.append(len({r["hint"] for r in members}))
        dht_bytes = [
            (views[u]["dht"]["bytes_sent"] - dht_before[u]["bytes_sent"]) / elapsed for u in views
        ]
        expected = len(subs) * publishers_per_room
        decoded = sum(1 for r in subs for t in r["timings"].values() if t["decoded"] is not None)
        s_same, s_redir, s_relay = _summary(same), _summary(redirected), _summary(relayed)

        def ratio(a: dict[str, object], b: dict[str, object]) -> float | None:
            x, y = a["p50"], b["p50"]
            return round(x / y, 2) if isinstance(x, float) and isinstance(y, float) else None

        return {
            "nodes": len(plan),
            "client_processes": client_procs,
            "clients_decode_all": decode_all,
            "rooms": rooms,
            "participants": len(report),
            "publishers": sum(1 for r in report if r["publisher"]),
            "videos_decoded": f"{decoded}/{expected}",
            "first_frame_same_node_ms": s_same,
            "first_frame_after_redirect_ms": s_redir,
            "first_frame_relayed_ms": s_relay,
            "redirect_ratio_p50": ratio(s_redir, s_same),
            "relay_ratio_p50": ratio(s_relay, s_same),
            "in_region_share": round(in_region / len(report), 3),
            "relay_flows": flows,
            "relay_flows_minimum": minimum_flows,
            "nodes_per_room_mean": round(statistics.mean(nodes_per_room), 2),
            "nodes_per_room_minimum_mean": round(statistics.mean(min_nodes_per_room), 2),
            "dht_bytes_sent_per_node_per_s": round(statistics.mean(dht_bytes)),
            "node_cpu_seconds": round(cpu_used, 1),
            "load_average_1m": round(os.getloadavg()[0], 1),
        }
    finally:
        await pool.close()
        stop_nodes(procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--participants", type=int, default=60)
    parser.add_argument("--publish-share", type=float, default=0.34)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--decode-all",
        action="store_true",
        help="subscribers keep receiving and decoding every frame (default: a track's RTP "
        "is dropped at the client once it has shown its first frame)",
    )
    args = parser.parse_args()
    result = asyncio.run(
        run(
            args.rooms,
            args.participants,
            args.publish_share,
            args.seed,
            args.client_procs,
            args.decode_all,
        )
    )
    for key, value in result.items():
        print(f"{key:34} {value}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
