"""Run inside a private network namespace by test_access.py: `cascade node` (the real CLI,
with monitoring loaded as an extension) listening on a non-loopback address."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

HOST = "10.77.0.1"
TOKEN = "monitoring-token-0123456789"


def node(*args: str, token: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ, CASCADE_EXTENSIONS="monitor.extension:extension")
    env.pop("CASCADE_MONITOR_TOKEN", None)
    if token:
        env["CASCADE_MONITOR_TOKEN"] = token
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peer.cli",
            "node",
            "--dev",
            "--host",
            HOST,
            "--workers",
            "1",
            *args,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def get(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_ready(base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if get(f"{base}/healthz") == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("node did not start")


def main() -> int:
    result: dict[str, object] = {}
    refused = node("--port", "8081")
    _, err = refused.communicate(timeout=60)
    result["refused_exit"] = refused.returncode
    result["refused_message"] = err.strip().splitlines()[-1] if err.strip() else ""

    guarded = node("--port", "8082", token=TOKEN)
    public = node("--port", "8083", "--public-metrics")
    try:
        base = f"http://{HOST}:8082"
        wait_ready(base)
        codes = {}
        for path in ("/metrics", "/stats", "/stats/history", "/dashboard/", "/healthz"):
            codes[path] = {
                "none": get(base + path),
                "wrong": get(base + path, "Bearer nope"),
                "bearer": get(base + path, f"Bearer {TOKEN}"),
            }
        codes["/metrics?token"] = {"query": get(f"{base}/metrics?token={TOKEN}")}
        result["guarded"] = codes
        wait_ready(f"http://{HOST}:8083")
        result["public_metrics"] = get(f"http://{HOST}:8083/metrics")
    finally:
        for proc in (guarded, public):
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
