"""``cascade demo`` starts a 4-node, 3-region overlay on 127.0.0.1 and stops it on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from peer.demo import demo_plan

ROOT = Path(__file__).resolve().parents[2]


def test_demo_plan_is_four_nodes_in_three_regions_bootstrapped_through_the_first():
    plan = demo_plan(9000, 5000)
    assert [(n.name, n.region, n.port, n.dht_port) for n in plan] == [
        ("eu-1", "eu", 9000, 5000),
        ("eu-2", "eu", 9001, 5001),
        ("us-1", "us", 9002, 5002),
        ("ap-1", "ap", 9003, 5003),
    ]
    assert plan[0].bootstrap is None
    assert {n.bootstrap for n in plan[1:]} == {"127.0.0.1:5000"}
    assert "--location" in plan[3].command() and "--dev" in plan[3].command()


def _overlay(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/overlay", timeout=2) as reply:
        return json.loads(reply.read())


def test_cascade_demo_runs_an_overlay_and_stops_cleanly_on_ctrl_c():
    base, dht = 18480, 14480
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peer.cli",
            "demo",
            "--base-port",
            str(base),
            "--dht-base-port",
            str(dht),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip() == "READY":
                break
        assert lines and lines[-1].strip() == "READY", (
            lines,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        text = "".join(lines)
        for port in range(base, base + 4):
            assert f"http://127.0.0.1:{port}/" in text
        view: dict = {}
        for _ in range(100):
            view = _overlay(f"http://127.0.0.1:{base}")
            if len(view["nodes"]) == 4:
                break
            time.sleep(0.2)
        assert sorted(n["region"] for n in view["nodes"]) == ["ap", "eu", "eu", "us"]
        assert all(n["location"] for n in view["nodes"])
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
