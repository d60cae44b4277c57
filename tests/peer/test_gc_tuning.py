"""A node process's collector settings (peer/gc_tuning.py), in a child process: they are
process-wide, and the test process keeps CPython's defaults."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import asyncio, gc
from peer import gc_tuning

class Cycle:
    def __init__(self):
        self.me = self

gc_tuning.tune()
assert gc.get_threshold() == gc_tuning.THRESHOLDS, gc.get_threshold()
assert gc.get_freeze_count() > 1000
import weakref
probe = Cycle()
ref = weakref.ref(probe)
del probe

async def main():
    task = asyncio.ensure_future(gc_tuning.collect_periodically(0.05))
    for _ in range(100):
        if ref() is None:
            break
        await asyncio.sleep(0.02)
    task.cancel()

asyncio.run(main())
assert ref() is None, "the periodic full collection freed the cycle"
assert gc_tuning.stats.full_collections >= 1
print("ok")
"""


def test_node_gc_settings_and_periodic_full_collection():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
