"""The monitoring token rule on a node listening on a non-loopback address (inside a
network namespace of the test's own, so nothing leaves the machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_token_rule_off_loopback():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if os.environ.get("CI"):
            pytest.fail("needs root and iproute2")
        pytest.skip("needs root and iproute2")
    ns = f"cascade-acc-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run = ["ip", "netns", "exec", ns]
        subprocess.run([*run, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run([*run, "ip", "addr", "add", "10.77.0.1/32", "dev", "lo"], check=True)
        proc = subprocess.run(
            [*run, sys.executable, "-m", "tests.monitor.access_scenario"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    # refuses to start without a token (or --public-metrics) off loopback
    assert result["refused_exit"] == 2
    assert "monitoring token" in result["refused_message"]
    guarded = result["guarded"]
    for path in ("/metrics", "/stats", "/stats/history", "/dashboard/"):
        assert guarded[path] == {"none": 401, "wrong": 401, "bearer": 200}, path
    assert guarded["/healthz"] == {"none": 200, "wrong": 200, "bearer": 200}
    assert guarded["/metrics?token"] == {"query": 200}
    assert result["public_metrics"] == 200


def test_cli_loads_monitoring_through_the_entry_point_group():
    import ast
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = project["entry-points"]["cascade.extensions"]["monitor"]
    module, attr = spec.split(":")
    assert hasattr(getattr(importlib.import_module(module), attr), "setup_node")
    # peer/ never imports monitor/
    for path in (ROOT / "peer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "monitor" or n.startswith("monitor.") for n in names), path
