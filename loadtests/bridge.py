"""Run asyncio coroutines from gevent greenlets (locust users).

Locust runs users as gevent greenlets in a monkey-patched process and never awaits
``async def`` tasks, while the SDK (aiortc, aiohttp) is asyncio. The bridge runs one
asyncio event loop per process in a *native* thread (``start_new_thread`` taken from
before monkey-patching) and lets a greenlet wait for a coroutine on a gevent
``AsyncResult`` that the loop thread fills, so the greenlet blocks only itself while
the rest of locust keeps running.

    bridge = AsyncioBridge()
    bridge.start()                      # from locust's events.init
    value = bridge.run(coro(), timeout=30)   # from a greenlet
    bridge.stop()                       # from events.quitting

Locust's ``events.request`` must be fired from the greenlet, never from the loop
thread: ``run`` returns there, so fire after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any, TypeVar

import gevent
import gevent.event
from gevent import monkey

T = TypeVar("T")
PUMP_INTERVAL = 0.005  # seconds between runs of the loop thread's gevent hub


class BridgeError(RuntimeError):
    """The bridge is not running (start() not called, or already stopped)."""


class AsyncioBridge:
    """One asyncio event loop in a native thread, fed from greenlets."""

    def __init__(self, *, use_uvloop: bool = False) -> None:
        self.use_uvloop = use_uvloop
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stopped = False
        self._thread_id: int | None = None
        self._done: Any = None

    @property
    def running(self) -> bool:
        """Whether the loop thread is up and not stopped."""
        return self._started and not self._stopped and self.loop is not None

    def start(self) -> None:
        """Start the loop thread (idempotent). Returns once the loop runs."""
        if self._started:
            return
        self._started = True
        loop = self._new_loop()
        self.loop = loop
        # A native thread even when threading is monkey-patched: the loop must not be
        # scheduled by gevent's hub, or every block in the loop would freeze locust.
        start_new_thread = monkey.get_original("_thread", "start_new_thread")
        allocate_lock = monkey.get_original("_thread", "allocate_lock")
        up = allocate_lock()
        up.acquire()
        self._done = done = allocate_lock()
        done.acquire()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(up.release)
            if monkey.is_module_patched("threading"):
                loop.call_soon(self._pump_gevent)
            try:
                loop.run_forever()
            finally:
                loop.close()
                done.release()

        self._thread_id = start_new_thread(serve, ())
        up.acquire()  # an original lock: blocks this OS thread briefly, not a greenlet

    def _pump_gevent(self) -> None:
        # With threading patched, code on the loop that starts a "thread" (aiortc's
        # decoder per received track) gets a greenlet of this OS thread's own gevent hub.
        # Nothing else runs that hub, so let it run its ready greenlets now and then.
        gevent.sleep(0)
        if self.loop is not None and not self._stopped:
            self.loop.call_later(PUMP_INTERVAL, self._pump_gevent)

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.use_uvloop:
            import uvloop

            return uvloop.new_event_loop()
        # The stdlib selector, not gevent's (which would wait on the gevent hub).
        selector_class = monkey.get_original("selectors", "DefaultSelector")
        return asyncio.SelectorEventLoop(selector_class())

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        if not self.running:
            coro.close()
            raise BridgeError("the asyncio bridge is not running")
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it, blocking only the calling greenlet.

        Raises what the coroutine raised, or ``TimeoutError`` (the coroutine is
        cancelled) after ``timeout`` seconds.
        """
        future = self.submit(coro)
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()

        def done(f: concurrent.futures.Future[T]) -> None:
            # Runs in the loop thread; AsyncResult wakes the waiting greenlet's hub.
            if f.cancelled():
                result.set_exception(asyncio.CancelledError())
            elif (exc := f.exception()) is not None:
                result.set_exception(exc)
            else:
                result.set(f.result())

        future.add_done_callback(done)
        try:
            return result.get(timeout=timeout)
        except gevent.Timeout:
            future.cancel()
            raise TimeoutError(f"coroutine did not finish within {timeout} s") from None
        except BaseException:
            # The greenlet was killed (user stopped): don't leave the coroutine running.
            future.cancel()
            raise

    def call(self, fn: Any, *args: Any) -> None:
        """Call a plain function on the loop thread (fire and forget)."""
        if self.running:
            assert self.loop is not None
            self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left on the loop, shut its executor down and stop it."""
        if not self.running:
            self._stopped = True
            return
        assert self.loop is not None
        loop = self.loop

        async def shutdown() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.shutdown_default_executor()

        try:
            self.run(shutdown(), timeout)
        except Exception:
            pass
        finally:
            self._stopped = True
            loop.call_soon_threadsafe(loop.stop)
            # Let the loop thread finish before the interpreter tears things down.
            self._done.acquire(timeout=timeout)
