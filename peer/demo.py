"""``cascade demo``: a local overlay on 127.0.0.1 in one command.

Four node processes (two in eu, one in us, one in ap) with one DHT, one dev token secret,
each with its demo page; Ctrl-C stops them all. The plan is plain data
(:func:`demo_plan`); :func:`run` starts and watches the processes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from peer.tokens import new_secret

SECRET_ENV = "CASCADE_API_SECRET"


@dataclass(frozen=True, slots=True)
class DemoNode:
    """One node of the demo overlay."""

    name: str
    region: str
    location: tuple[float, float]
    port: int
    dht_port: int
    bootstrap: str | None
    extra: tuple[str, ...] = ()
    """More ``cascade node`` flags."""

    @property
    def url(self) -> str:
        """Its demo page and signaling URL."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The ``cascade node`` command line of this node."""
        cmd = [
            sys.executable,
            "-m",
            "peer.cli",
            "node",
            "--dev",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--region",
            self.region,
            "--location",
            f"{self.location[0]},{self.location[1]}",
            "--dht-port",
            str(self.dht_port),
            "--log-level",
            "WARNING",
            # Every demo node shares this one machine: one process each.
            "--workers",
            "1",
        ]
        if self.bootstrap:
            cmd += ["--bootstrap", self.bootstrap]
        return cmd + list(self.extra)


SITES: tuple[tuple[str, str, tuple[float, float]], ...] = (
    ("eu-1", "eu", (48.86, 2.35)),  # Paris
    ("eu-2", "eu", (50.11, 8.68)),  # Frankfurt
    ("us-1", "us", (38.90, -77.04)),  # Virginia
    ("ap-1", "ap", (35.68, 139.69)),  # Tokyo
)


def demo_plan(base_port: int = 8080, dht_base_port: int = 4000) -> list[DemoNode]:
    """The demo's nodes: ports counted up from the bases, all bootstrapped via the first."""
    seed = f"127.0.0.1:{dht_base_port}"
    return [
        DemoNode(name, region, loc, base_port + i, dht_base_port + i, None if i == 0 else seed)
        for i, (name, region, loc) in enumerate(SITES)
    ]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _has(url: str, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=2) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _stop(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_nodes(
    plan: Sequence[DemoNode], env: dict[str, str], *, timeout: float = 60.0
) -> list[subprocess.Popen[bytes]]:
    """Start ``plan``'s nodes and wait until each answers; raises RuntimeError otherwise."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for node in plan:
            procs.append(subprocess.Popen(node.command(), env=env))
            if node.bootstrap is None:
                time.sleep(0.5)
        deadline = time.monotonic() + timeout
        pending = list(plan)
        while pending:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a node exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("nodes did not start in time")
            pending = [n for n in pending if not _healthy(n.url)]
            time.sleep(0.2)
    except BaseException:
        stop_nodes(procs)
        raise
    return procs


def stop_nodes(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every node, SIGKILL those still running after ``timeout``."""
    _stop(procs, timeout)


def run(plan: Sequence[DemoNode], *, start_timeout: float = 60.0) -> int:
    """Start every node, print their URLs, wait for Ctrl-C (or a node dying), stop all."""
    env = dict(os.environ)
    env.setdefault(SECRET_ENV, new_secret())
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for node in plan:
            procs.append(subprocess.Popen(node.command(), env=env))
            if node.bootstrap is None:
                time.sleep(0.5)  # let the seed's DHT port open first
        deadline = time.monotonic() + start_timeout
        pending = list(plan)
        while pending and not stopping:
            if any(p.poll() is not None for p in procs):
                print("cascade demo: a node exited during start-up", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("cascade demo: nodes did not start in time", file=sys.stderr)
                return 1
            pending = [n for n in pending if not _healthy(n.url)]
            time.sleep(0.2)
        if stopping:
            return 0
        print("Cascade demo overlay (all on 127.0.0.1; Ctrl-C stops it):", flush=True)
        for node in plan:
            print(f"  {node.name:5} region {node.region:3} demo page {node.url}/", flush=True)
        first = plan[0].url
        print(f"  overlay as JSON: {first}/overlay", flush=True)
        if _has(first, "/dashboard/"):
            print(f"  dashboard: {first}/dashboard/", flush=True)
        print("READY", flush=True)
        while not stopping:
            if any(p.poll() is not None for p in procs):
                print("cascade demo: a node exited; stopping the others", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """``cascade demo [--base-port P] [--dht-base-port D]``."""
    parser = argparse.ArgumentParser(prog="cascade demo", description=__doc__)
    parser.add_argument("--base-port", type=int, default=8080, help="first node's HTTP port")
    parser.add_argument("--dht-base-port", type=int, default=4000, help="first node's DHT port")
    args = parser.parse_args(argv)
    return run(demo_plan(args.base_port, args.dht_base_port))


if __name__ == "__main__":
    sys.exit(main())
