"""A real browser (Debian chromium, headless) publishes its fake camera through the
demo page and a second page decodes it. Runs in a network namespace of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

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


def test_browser_publishes_and_another_page_decodes():
    reason = _can_run()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    ns = f"cascade-br-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.peer.browser_scenario"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["frames_decoded"] > 30, (result, proc.stderr[-3000:])
        assert result["video_tiles"] >= 1
        assert result["video_width"] > 0
        assert result["server_codec_instances"] == 0
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
