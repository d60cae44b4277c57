"""The dashboard in headless Chromium (network namespace) over a real 3-region overlay."""

from __future__ import annotations

import pytest

from tests.peer.test_browser import run_in_namespace

pytestmark = pytest.mark.browser

TTL = 4.0


def test_dashboard_shows_overlay_rooms_links_and_missing_node(tmp_path):
    result = run_in_namespace(
        "tests.monitor.overlay_scenario",
        timeout=170,
        env={"CASCADE_SCREENSHOT": str(tmp_path / "dashboard.png")},
    )
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
