"""The dashboard in headless Chromium (network namespace) over a real 3-region overlay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.peer.test_browser import _can_run

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
TTL = 4.0


def test_dashboard_shows_overlay_rooms_links_and_missing_node(tmp_path):
    reason = _can_run()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    ns = f"cascade-mon-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.monitor.overlay_scenario"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=170,
            env={**os.environ, "CASCADE_SCREENSHOT": str(tmp_path / "dashboard.png")},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        ids = result["ids"]
        regions = result["node_regions"]
        for region, node_id in ids.items():
            assert regions[node_id] == region
        assert result["rooms"] == {"standup": 3, "design": 2}
        assert sorted(result["room_nodes"]) == sorted([ids["eu"], ids["us"]])
        assert result["edge_state"] == "live"
        assert result["design_streams"] >= 2
        # Marked missing within the record TTL + 2 s of the crash (the bound).
        assert result["missing_after"] <= TTL + 2, result
        assert result["missing_alert"]
        assert result["others_up"] == 2
        assert result["page_errors"] == []
        assert (tmp_path / "dashboard.png").exists()
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
