"""Capacity of one node and of a local 3-region overlay, found by the locust step load
(loadtests/capacity.py) with real WebRTC participants.

    python -m bench.capacity a      # one node: video rooms of 5, everyone publishing
    python -m bench.capacity b      # one node: one room, 2 publishers, many subscribers
    python -m bench.capacity c      # cascade demo's overlay (eu, eu, us, ap), rooms spanning it

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
from dataclasses import replace
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
        "--room-size", "6", "--spread", "participant",
        "--step-users", "6", "--step-max-users", "120", *VIDEO,
    ],
}  # fmt: skip


def start_node(secret: str, cpu: str) -> tuple[subprocess.Popen[bytes], str]:
    """One ``cascade node`` pinned to ``cpu``, admission by CPU off."""
    port = 18580
    cmd = ["taskset", "-c", cpu, sys.executable, "-m", "peer.cli", "node", "--port", str(port)]
    cmd += ["--max-cpu", "100", "--ws-per-ip", "0", "--join-rate", "0", "--log-level", "WARNING"]
    env = {**os.environ, "CASCADE_API_SECRET": secret}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        time.sleep(0.3)
        if proc.poll() is not None:  # e.g. its port is taken by another process
            raise RuntimeError(f"the node for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"{url} did not start") from None


def start_demo(secret: str, cpu: str) -> tuple[list[subprocess.Popen[bytes]], list[str], list[str]]:
    """``cascade demo``'s overlay (eu, eu, us, ap), admission by CPU off, pinned to ``cpu``."""
    from peer.demo import demo_plan, start_nodes

    plan = [
        replace(n, extra=("--max-cpu", "100", "--ws-per-ip", "0", "--join-rate", "0"))
        for n in demo_plan(18580, 18680)
    ]
    procs = start_nodes(plan, {**os.environ, "CASCADE_API_SECRET": secret})
    for proc in procs:
        os.sched_setaffinity(proc.pid, {int(cpu)})
    time.sleep(5)  # the nodes find each other in the DHT
    return procs, [n.url for n in plan], [n.region for n in plan]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--step-seconds", type=float, default=20.0)
    parser.add_argument("--step-retries", type=int, default=1)
    parser.add_argument("--node-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    args, extra = parser.parse_known_args(argv)  # the rest goes to locust
    secret = secrets.token_urlsafe(32)
    if args.scenario == "c":
        procs, urls, regions = start_demo(secret, args.node_cpu)
        extra += ["--regions", ",".join(regions)]
    else:
        proc, url = start_node(secret, args.node_cpu)
        procs, urls = [proc], [url]
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
