"""Overlay nodes started the way users start them (``cascade node``, one process each), on
127.0.0.1, that a benchmark or test can drain, kill and restart with the same identity."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from dht import NodeIdentity
from peer.tokens import issue_token

ROOT = Path(__file__).resolve().parents[1]


async def until(pred: Any, timeout: float, step: float = 0.05) -> bool:
    """Poll ``pred()`` until it is true or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return bool(pred())


def free_port(kind: int) -> int:
    """A port free on 127.0.0.1 right now (TCP or UDP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ClusterNode:
    """One ``cascade node`` process; its ports and key stay the same across restarts."""

    def __init__(
        self,
        name: str,
        region: str,
        secret: str,
        workdir: Path,
        *,
        bootstrap: list[str] | None = None,
        location: tuple[float, float] | None = None,
        ttl: float = 6.0,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.region = region
        self.secret = secret
        self.port = free_port(socket.SOCK_STREAM)
        self.dht_port = free_port(socket.SOCK_DGRAM)
        self.relay_port = free_port(socket.SOCK_DGRAM)
        self.url = f"http://127.0.0.1:{self.port}"
        # DHT addresses to join through (a restarted node uses every other node's).
        self.bootstrap = list(bootstrap or [])
        self.location = location
        self.ttl = ttl
        self.extra = extra
        self.key_file = workdir / f"{name}.key"
        self.identity = NodeIdentity.generate()
        self.identity.save(self.key_file, overwrite=True)
        self.log_file = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def node_id(self) -> str:
        """The node id (hex) in the directory."""
        return self.identity.node_id.hex()

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "peer.cli", "node", "--port", str(self.port),
            "--region", self.region, "--dht-port", str(self.dht_port),
            "--relay-port", str(self.relay_port), "--key", str(self.key_file),
            "--dht-ttl", str(self.ttl), "--max-cpu", "100", "--ws-per-ip", "0",
            "--join-rate", "0", "--log-level", "INFO",
            # Several nodes share this machine: one process each unless a test asks.
            "--workers", "1", *self.extra,
        ]  # fmt: skip
        if self.bootstrap:
            cmd += ["--bootstrap", ",".join(self.bootstrap)]
        if self.location:
            cmd += ["--location", f"{self.location[0]},{self.location[1]}"]
        return cmd

    async def start(self, timeout: float = 30.0) -> None:
        """Start the process and wait until it answers ``/healthz``."""
        env = {**os.environ, "CASCADE_API_SECRET": self.secret, "PYTHONUNBUFFERED": "1"}
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            self.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as http:
            while loop.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at start: {self.tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(self.url + "/healthz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start: {self.tail()}")

    def kill(self) -> None:
        """SIGKILL: the node dies without a word."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> None:
        """SIGTERM: the node drains."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM twice (drain, then stop at once), then SIGKILL if still running."""
        if self.proc is None:
            return None
        for _ in range(2):
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout / 2)
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The end of the node's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def get(self, path: str) -> Any:
        """GET a JSON endpoint of the node."""
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as r:
            return await r.json()


class Cluster:
    """Nodes of one overlay sharing an HS256 token secret; the first bootstraps the rest."""

    def __init__(self, workdir: Path | None = None) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="cascade-cluster-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.secret = secrets.token_urlsafe(32)
        self.nodes: list[ClusterNode] = []

    def add(self, name: str, region: str, **kw: Any) -> ClusterNode:
        bootstrap = [f"127.0.0.1:{n.dht_port}" for n in self.nodes[:1]]
        node = ClusterNode(name, region, self.secret, self.workdir, bootstrap=bootstrap, **kw)
        self.nodes.append(node)
        return node

    async def restart(self, node: ClusterNode) -> None:
        """Start ``node`` again (same key and ports), joining through every other node."""
        node.bootstrap = [f"127.0.0.1:{n.dht_port}" for n in self.nodes if n is not node]
        await node.start()

    async def start(self) -> None:
        for node in self.nodes:
            await node.start()

    def token(self, room: str, identity: str) -> str:
        return issue_token(self.secret, room, identity, ttl=7200)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
