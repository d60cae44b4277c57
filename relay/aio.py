"""Small asyncio helpers shared by the relay's transports (timers, subscriptions)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .config import RelayError
from .flows import RemoteProducer
from .remote import RemoteFlows, SubscribeResult

__all__ = ["Timer", "open_remote_producer"]


class Timer:
    """One re-armable ``call_at``: :meth:`arm` with a sans-I/O object's ``deadline()``."""

    __slots__ = ("_at", "_cb", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, cb: Callable[[], None]) -> None:
        self._loop = loop
        self._cb = cb
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def arm(self, when: float | None) -> None:
        """Fire at ``when`` (None: never); a no-op if already armed for that time."""
        if when == self._at and self._handle is not None:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._at = when
        if when is not None:
            self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._at = None
        self._cb()

    def cancel(self) -> None:
        """Disarm."""
        self.arm(None)


async def open_remote_producer(
    flows: RemoteFlows, producer_id: str, timeout: float
) -> RemoteProducer:
    """SUBSCRIBE through ``flows`` (which must be live) and wait for the answer."""
    reply: asyncio.Future[SubscribeResult] = asyncio.get_running_loop().create_future()

    def on_result(result: SubscribeResult) -> None:
        if not reply.done():
            reply.set_result(result)

    if not flows.open(producer_id, on_result):
        raise RelayError("link not live")
    result = await asyncio.wait_for(reply, timeout)
    if isinstance(result, RelayError):
        raise result
    return result
