"""Three hosts, one overlay: network namespaces on a bridge the test creates, one node per
host binding 0.0.0.0 and announcing its host address, relays behind delaying hops (40 ms
each way, so the hosts look like regions); SDK clients in a fourth namespace publish on one
host and decode on every host."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht import NodeIdentity
from peer.tokens import public_pem

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.77.0"  # only inside the namespaces this test creates
REGIONS = ["eu", "us", "ap"]
HOP_DELAY = 0.04


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True)


@contextlib.contextmanager
def lan(count: int):
    """``count`` namespaces on one bridge (in a namespace of its own); yields their names,
    host i has address SUBNET.(i+1)."""
    tag = uuid.uuid4().hex[:6]
    bridge_ns = f"casbr-{tag}"
    hosts = [f"cash{i}-{tag}" for i in range(count)]
    try:
        for ns in [bridge_ns, *hosts]:
            sh("ip", "netns", "add", ns)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", bridge_ns, "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", bridge_ns, "ip", "link", "set", "br0", "up")
        for i, ns in enumerate(hosts):
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth",
               "peer", "name", f"p{i}", "netns", bridge_ns)  # fmt: skip
            sh("ip", "netns", "exec", bridge_ns, "ip", "link", "set", f"p{i}", "master", "br0")
            sh("ip", "netns", "exec", bridge_ns, "ip", "link", "set", f"p{i}", "up")
            sh(
                "ip",
                "netns",
                "exec",
                ns,
                "ip",
                "addr",
                "add",
                f"{SUBNET}.{i + 1}/24",
                "dev",
                "eth0",
            )
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        yield hosts
    finally:
        for ns in [*hosts, bridge_ns]:
            subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)


async def start(ns: str, *argv: str, ready: str, log: Path) -> asyncio.subprocess.Process:
    """Run ``python ARGV`` in namespace ``ns`` from this checkout; wait for ``ready``."""
    # nodes bind 0.0.0.0: monitoring (when loaded) wants a token for /metrics and /stats
    env = {"CASCADE_MONITOR_TOKEN": "multihost-monitoring-token", **os.environ}
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, *argv,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=log.open("w"),
    )  # fmt: skip
    assert proc.stdout is not None

    async def wait_ready() -> None:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"{argv} exited: {log.read_text()[-2000:]}")
            if ready in line:
                return

    await asyncio.wait_for(wait_ready(), 60)
    return proc


async def test_three_hosts_one_overlay(tmp_path: Path):
    app_key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "app.key"
    key_file.write_bytes(
        app_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "app.pub").write_text(public_pem(app_key))
    procs: list[asyncio.subprocess.Process] = []
    with lan(4) as namespaces:
        *hosts, clients_ns = namespaces
        try:
            for i, ns in enumerate(hosts):
                ip = f"{SUBNET}.{i + 1}"
                NodeIdentity.generate().save(tmp_path / f"node{i}.key")
                bootstrap = "" if i == 0 else f'bootstrap = ["{SUBNET}.1:4000"]\n'
                config = tmp_path / f"node{i}.toml"
                config.write_text(
                    f'host = "0.0.0.0"\nport = 8080\nannounce-ip = "{ip}"\n'
                    f'ice-ip = ["0.0.0.0"]\ntoken-key = "{tmp_path / "app.pub"}"\n'
                    f'key = "{tmp_path / f"node{i}.key"}"\nregion = "{REGIONS[i]}"\n'
                    f"dht-port = 4000\nrelay-port = 4433\n"
                    f'relay-announce = "{ip}:5433"\n{bootstrap}dht-ttl = 6.0\n'
                    f'log-level = "INFO"\nlog-json = {"true" if i == 2 else "false"}\n'
                )
                procs.append(
                    await start(
                        ns, "-m", "tests.deploy.delay_hop", "0.0.0.0:5433", "4433",
                        str(HOP_DELAY), ready="hop ready", log=tmp_path / f"hop{i}.log",
                    )
                )  # fmt: skip
                procs.append(
                    await start(
                        ns, "-m", "peer.cli", "node", "--config", str(config),
                        ready=f"listening on http://{ip}:8080", log=tmp_path / f"node{i}.log",
                    )
                )  # fmt: skip
            spec = {
                "publisher": f"http://{SUBNET}.1:8080",
                "subscribers": [f"http://{SUBNET}.{i + 1}:8080" for i in range(3)],
                "key": str(key_file),
                "ice": f"{SUBNET}.4",
            }
            run = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", clients_ns, sys.executable,
                "-m", "tests.deploy.multihost_clients", json.dumps(spec),
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(run.communicate(), 170)
            logs = "\n".join(
                f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log"))
            )
            assert run.returncode == 0, err.decode()[-3000:] + logs
            report = json.loads(out.decode().strip().splitlines()[-1])
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            for proc in procs:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(proc.wait(), 30)
    assert [s["url"] for s in report["subscribers"]] == spec["subscribers"]
    for sub in report["subscribers"]:
        # every host decodes the publisher's video and audio (hosts 2 and 3 over the relay)
        assert sub["producers"] == report["published"], sub
        assert sub["video"]["frames_decoded"] > 5 and sub["video"]["width"] == 320, sub
        assert sub["audio"]["frames_decoded"] > 5, sub
        assert sub["video"]["decode_errors"] == 0, sub
    assert report["foreign_key"] == ["untrusted_token"] * 3
    for proc in procs:
        assert proc.returncode == 0  # nodes and hops stopped cleanly on SIGTERM
    # hosts 2 and 3 pulled the producers through host 1's delaying hop
    forwarded = (tmp_path / "hop0.log").read_text().split()
    assert int(forwarded[forwarded.index("forwarded") + 1]) > 100_000
    for line in (tmp_path / "node2.log").read_text().splitlines():
        assert {"time", "level", "logger", "message"} <= json.loads(line).keys()
    assert "relay" in (tmp_path / "node2.log").read_text()
