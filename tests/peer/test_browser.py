"""Real browsers (Debian chromium, headless) on the demo page, each run in a network
namespace of its own: a publisher and a viewer, and rooms where every page publishes and
must decode every other page's video whatever the order and spacing of joins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]


def _can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if not Path("/usr/bin/chromium").exists():
        return "Debian chromium not installed"
    if shutil.which("ip") is None:
        return "iproute2 not installed"
    return None


def run_in_namespace(
    module: str, *args: str, timeout: float = 150, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python -m module args`` in a fresh network namespace; its last JSON line."""
    reason = _can_run()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    ns = f"cascade-br-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        try:
            proc = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-m", module, *args],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
                # The scenario prints its pending asyncio tasks shortly before it is killed.
                env={**os.environ, "CASCADE_TASK_DUMP_AFTER": str(timeout - 8), **(env or {})},
            )
        except subprocess.TimeoutExpired as exc:
            # Fail with what the scenario printed (pytest-timeout would show nothing of it).
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            pytest.fail(f"{module} still running after {timeout} s; its stderr:\n{err[-4000:]}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        result["stderr"] = proc.stderr[-2000:]
        return result
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def test_browser_publishes_and_another_page_decodes():
    result = run_in_namespace("tests.peer.browser_scenario")
    assert result["frames_decoded"] > 30, result
    assert result["video_tiles"] >= 1
    assert result["video_width"] > 0
    assert result["server_codec_instances"] == 0


def test_four_pages_half_a_second_apart_all_decode_each_other_then_one_rejoins():
    result = run_in_namespace(
        "tests.peer.browser_pages", "--pages", "4", "--gap", "0.5", "--rejoin"
    )
    assert result["missing"] == [], result
    assert result["missing_after_rejoin"] == [], result
    assert set(result["live_after_rejoin"].values()) == {3}, result
    # Tiles are labelled with the participants' names.
    for name, captions in result["captions"].items():
        assert sorted(captions) == sorted(
            [f"{name} (you)", *(other for other in result["expect"][name])]
        )


def test_four_pages_two_seconds_apart_all_decode_each_other():
    result = run_in_namespace("tests.peer.browser_pages", "--pages", "4", "--gap", "2", timeout=160)
    assert result["missing"] == [], result


def four_pages_on_two_nodes(*extra: str) -> dict:
    """The browser scenario with four pages joining half a second apart, alternately on two
    overlay nodes."""
    return run_in_namespace(
        "tests.peer.browser_pages", "--pages", "4", "--gap", "0.5", "--nodes", "2", *extra,
        timeout=160,
    )  # fmt: skip


def test_two_nodes_two_pages_each_all_decode_each_other():
    result = four_pages_on_two_nodes("--rejoin")
    # Every page decodes three other videos (two of them relayed from the other node),
    # before and after one page leaves and joins again.
    assert result["missing"] == [], result
    assert result["missing_after_rejoin"] == [], result
    assert set(result["live"].values()) == {3}, result
    assert set(result["live_after_rejoin"].values()) == {3}, result


def test_pages_on_two_workers_of_one_node_and_on_a_second_node_all_decode_each_other():
    # The first node runs two media workers (its pages spread over them): pages on it
    # decode each other through the pipe between the workers, and the other node's pages
    # through the supervisor, the node's relay end.
    result = four_pages_on_two_nodes("--workers", "2")
    assert result["missing"] == [], result
    assert set(result["live"].values()) == {3}, result
    assert result["worker_pages"] == [1, 1], result


def test_page_on_one_node_is_redirected_to_the_rooms_node_and_decodes(tmp_path):
    # Both pages ask for region r0; the second page is opened on the r1 node's demo page.
    result = run_in_namespace(
        "tests.peer.browser_pages",
        "--pages",
        "2",
        "--gap",
        "0.5",
        "--nodes",
        "2",
        "--region-hint",
        "r0",
        "--screenshot",
        str(tmp_path / "demo-page.png"),
        timeout=200,
    )
    assert result["nodes_used"] == {
        "page1": "http://127.0.0.1:8080",
        "page2": "http://127.0.0.1:8080",
    }, result
    assert result["missing"] == [], result


def test_pages_on_a_drained_node_move_and_keep_their_tiles(tmp_path):
    shot = tmp_path / "after-drain.png"
    result = run_in_namespace(
        "tests.peer.browser_pages",
        "--pages", "3", "--gap", "0.5", "--nodes", "2", "--drain", "--screenshot", str(shot),
        timeout=160,
    )  # fmt: skip
    assert result["missing"] == [], result
    assert result["drain"]["participants"] == 0 and result["drain"]["disconnected"] == 0
    assert result["moves"] == {"page2": [result["moves"]["page2"][0]]}, result
    assert result["moves"]["page2"][0]["reason"] == "migrate"
    # Every page still decodes both others, in the tiles it had before.
    assert result["missing_after_drain"] == [], result
    assert set(result["live_after_drain"].values()) == {2}, result
    assert all(result["tiles_kept"].values()), result
    assert all(a == b for a, b in result["tile_counts"].values()), result
    assert shot.exists()
