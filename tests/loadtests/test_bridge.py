"""The asyncio bridge: greenlets run coroutines on one loop in a native thread."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import gevent
import pytest

from loadtests.bridge import AsyncioBridge, BridgeError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bridge():
    b = AsyncioBridge()
    b.start()
    yield b
    b.stop()


def test_run_returns_the_value_from_the_loop_thread(bridge: AsyncioBridge):
    async def where() -> int:
        await asyncio.sleep(0.01)
        return threading.get_ident()

    assert bridge.run(where(), timeout=10) != threading.get_ident()


def test_errors_of_the_coroutine_reach_the_greenlet(bridge: AsyncioBridge):
    async def fail() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        bridge.run(fail(), timeout=10)


def test_other_greenlets_run_while_one_waits(bridge: AsyncioBridge):
    ticks = []

    def ticker() -> None:
        for i in range(5):
            ticks.append(i)
            gevent.sleep(0.01)

    g = gevent.spawn(ticker)
    bridge.run(asyncio.sleep(0.3), timeout=10)
    g.join()
    assert ticks == [0, 1, 2, 3, 4]


def test_timeout_cancels_the_coroutine(bridge: AsyncioBridge):
    cancelled = []

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(TimeoutError):
        bridge.run(slow(), timeout=0.2)
    bridge.run(asyncio.sleep(0.1), timeout=10)
    assert cancelled == [True]


def test_stop_cancels_what_is_left_and_refuses_new_work():
    bridge = AsyncioBridge()
    bridge.start()
    future = bridge.submit(asyncio.sleep(30))
    bridge.stop()
    assert future.cancelled()
    with pytest.raises(BridgeError):
        bridge.run(asyncio.sleep(0), timeout=1)


PATCHED = """
from gevent import monkey; monkey.patch_all()
import asyncio, threading, queue, gevent
from loadtests.bridge import AsyncioBridge

bridge = AsyncioBridge()
bridge.start()

async def decode_like_aiortc() -> str:
    # aiortc starts a decoder "thread" per received track; patched, it is a greenlet
    # of the loop thread's hub, which the bridge must let run.
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[str] = asyncio.Queue()
    inbox = queue.Queue()
    def worker() -> None:
        item = inbox.get()
        asyncio.run_coroutine_threadsafe(out.put(item.upper()), loop)
    t = threading.Thread(target=worker)
    t.start()
    inbox.put("frame")
    return await asyncio.wait_for(out.get(), 10)

print(bridge.run(decode_like_aiortc(), timeout=20))
bridge.stop()
"""


def test_threads_started_on_the_loop_run_when_locust_patched_threading():
    done = subprocess.run(
        [sys.executable, "-c", PATCHED], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "FRAME", done.stderr[-2000:]
