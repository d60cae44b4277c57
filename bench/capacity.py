"""Capacity of one node and of a local 3-region overlay, found by the locust step load
(loadtests/capacity.py) with real WebRTC participants.

    python -m bench.capacity a      # one node: video rooms of 5, everyone publishing
    python -m bench.capacity b      # one node: one room, 2 publishers, many subscribers
    python -m bench.capacity c      # three nodes (eu, us, ap) on the DHT, rooms spanning them

Further arguments go to locust (e.g. ``--step-max-users 30 --video-width 320``).

The node(s) run on CPU 0 and the load generator on CPU 1 (taskset); both CPUs' other
tenants are not controlled. Prints the capacity steps and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ["--video-width", "640", "--video-height", "480", "--video-kbps", "500"]
SCENARIOS: dict[str, list[str]] = {
    "a": ["--room-size", "5", "--step-users", "5", "--step-max-users", "100", *VIDEO],
    "b": [
        "--rooms", "1", "--room-size", "200", "--publisher-share", "0.01",
        "--step-users", "10", "--step-max-users", "200", *VIDEO,
    ],
    "c": [
        "--room-size", "6", "--spread", "participant", "--regions", "eu,us,ap",
        "--step-users", "6", "--step-max-users", "120", *VIDEO,
    ],
}  # fmt: skip


def start_nodes(
    count: int, secret: str, cpu: str
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, urls = [], []
    regions = ["eu", "us", "ap"]
    base = 18580
    for i in range(count):
        cmd = ["taskset", "-c", cpu, sys.executable, "-m", "peer.cli", "node"]
        cmd += ["--port", str(base + i), "--max-cpu", "100", "--log-level", "WARNING"]
        if count > 1:
            cmd += ["--region", regions[i], "--dht-port", str(base + 100 + i)]
            if i:
                cmd += ["--bootstrap", f"127.0.0.1:{base + 100}"]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "CASCADE_API_SECRET": secret})
        )
        urls.append(f"http://127.0.0.1:{base + i}")
    for proc, url in zip(procs, urls, strict=True):
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:  # e.g. its port is taken by another process
                raise RuntimeError(f"the node for {url} exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not start") from None
                time.sleep(0.3)
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"the node for {url} exited with {proc.returncode}")
    if count > 1:
        time.sleep(5)  # the nodes find each other in the DHT
    return procs, urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--step-seconds", type=float, default=20.0)
    parser.add_argument("--step-retries", type=int, default=1)
    parser.add_argument("--node-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    args, extra = parser.parse_known_args(argv)  # the rest goes to locust
    secret = secrets.token_urlsafe(32)
    procs, urls = start_nodes(3 if args.scenario == "c" else 1, secret, args.node_cpu)
    out = Path(tempfile.mkdtemp(prefix="cascade-capacity-"))
    cmd = ["taskset", "-c", args.load_cpu, sys.executable, "-m", "locust"]
    cmd += ["-f", str(ROOT / "loadtests" / "capacity.py"), "--headless", "--host", urls[0]]
    cmd += ["--nodes", ",".join(urls), "--step-seconds", str(args.step_seconds)]
    cmd += ["--step-retries", str(args.step_retries), "--step-spawn-rate", "5"]
    cmd += ["--report-json", str(out / "report.json"), "--only-summary", "--loglevel", "WARNING"]
    cmd += SCENARIOS[args.scenario] + [a for a in extra if a != "--"]
    print("#", " ".join(cmd), file=sys.stderr, flush=True)
    try:
        subprocess.run(cmd, cwd=out, env={**os.environ, "CASCADE_API_SECRET": secret}, check=False)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
    report = json.loads((out / "report.json").read_text())
    capacity = report.get("capacity") or {}
    print(
        f"\nscenario {args.scenario}: steps (users, held, breaches, node cpu, fwd pkt/s, gen cpu)"
    )
    for s in capacity.get("steps", []):
        print(
            f"  {s['users']:4d}  {'held' if s['held'] else 'BROKE':5s}  "
            f"{'; '.join(s['breaches']) or '-':50s}  "
            f"{s['server'].get('cpu_mean', 0):.2f}  {s['server'].get('egress_pps_mean', 0):8.0f}  "
            f"{s['generator'].get('cpu_mean', 0):.2f}"
        )
    last = capacity.get("last_held") or {}
    result = {
        "scenario": args.scenario,
        "participants": last.get("users", 0),
        "node_cpu": last.get("server", {}).get("cpu_mean"),
        "forwarded_pps": last.get("server", {}).get("egress_pps_mean"),
        "consumers": sum(
            n.get("consumers_max", 0) for n in last.get("server", {}).get("nodes", {}).values()
        ),
        "generator_cpu": last.get("generator", {}).get("cpu_mean"),
        "broke_at": (capacity.get("broke") or {}).get("users"),
        "broke_by": (capacity.get("broke") or {}).get("breaches"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
