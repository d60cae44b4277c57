"""Headless locust runs of loadtests/locustfile.py against a dev node started here."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def dev_node(*extra: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peer.cli",
            "node",
            "--dev",
            "--port",
            str(port),
            "--workers",
            "1",
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the dev node did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_locust(
    tmp: Path, url: str, seconds: int, spawn_rate: float = 6, *extra: str
) -> tuple[dict[tuple[str, str], dict], list, dict]:
    """Run 6 users (2 publishers, 4 subscribers in one room); return locust's stats rows
    by (type, name), its failure rows and our end report."""
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
        "--headless", "-u", "6", "-r", str(spawn_rate), "-t", f"{seconds}s", "--host", url,
        "--room-size", "6", "--publisher-share", "0.34",
        "--video-width", "320", "--video-height", "240", "--video-kbps", "300",
        "--stats-interval", "3", "--csv", str(tmp / "run"),
        "--report-json", str(tmp / "report.json"),
        "--only-summary", "--loglevel", "WARNING", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=seconds + 120
    )
    assert (tmp / "report.json").exists(), done.stderr[-3000:]
    with open(tmp / "run_stats.csv") as f:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    with open(tmp / "run_failures.csv") as f:
        failures = list(csv.DictReader(f))
    return stats, failures, json.loads((tmp / "report.json").read_text())


def count(stats: dict, kind: str, name: str | None = None, field: str = "Request Count") -> int:
    return sum(int(r[field]) for (t, n), r in stats.items() if t == kind and name in (None, n))


def test_six_participants_one_room(tmp_path: Path):
    with dev_node("--max-cpu", "100") as url:
        stats, failures, report = run_locust(tmp_path, url, 20)
    assert count(stats, "join") == 6
    assert count(stats, "publish") == 2
    assert failures == [], failures
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
    # Each subscriber gets both publishers' 2 tracks; each publisher the other's 2.
    assert report["total"]["tracks_expected"] == 4 * 4 + 2 * 2
    assert report["total"]["tracks_received"] == 20
    assert count(stats, "first_frame") == 20
    assert float(stats[("first_frame", "video")]["Average Response Time"]) > 0
    assert count(stats, "track", "video fps") > 0
    # The server side of the run was read from the node's /stats.
    assert report["server"]["nodes"][url]["consumers_max"] == 20


def test_refusals_are_overloaded_failures_while_admitted_calls_flow(tmp_path: Path):
    # The node admits against its consumer count of the last second, so a burst may
    # overshoot the limit: users join every 2 s, and the later ones find the publishers'
    # 4 consumers counted.
    with dev_node("--max-cpu", "100", "--max-consumers", "4") as url:
        stats, failures, report = run_locust(tmp_path, url, 20, spawn_rate=0.5)
    refused = [f for f in failures if f["Method"] == "refused"]
    assert refused and all(f["Name"] == "overloaded" for f in refused), failures
    assert all("overloaded" in f["Error"] for f in refused)
    assert report["total"]["errors"]["overloaded"] == count(stats, "refused", "overloaded") > 0
    assert not [f for f in failures if f["Method"] != "refused"], failures
    # Joins succeed; the admitted consumers (at least the publishers' 4) keep delivering.
    assert count(stats, "join") == 6 and count(stats, "join", field="Failure Count") == 0
    received = report["total"]["tracks_received"]
    assert 4 <= received < 20
    assert count(stats, "first_frame") == received
    assert float(stats[("track", "video fps")]["Max Response Time"]) > 0
