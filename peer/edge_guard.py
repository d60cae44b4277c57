"""Guards of the node's HTTP/WebSocket edge: a request head must arrive within a deadline;
WebSocket client frames must be masked (RFC 6455 5.1); a message over the limit is refused
from its frame header, before its payload is buffered; a partly received message can be
timed out.

aiohttp 3.14 internals used here (the only place in Cascade that touches them):

- ``WebSocketResponse._post_start`` and ``RequestHandler._payload_parser`` /
  ``_message_tail``: the frame parser aiohttp installs is wrapped so that every byte
  the client sends passes :class:`ClientFrameCheck` first. aiohttp's server accepts
  unmasked frames.
- ``WebSocketResponse._reader`` (its message queue): an unmasked frame is reported
  as a ``WebSocketError`` there, which closes the socket with 1002.
- aiohttp's reader refuses a frame whose declared length reaches ``max_msg_size``
  (so ``max_msg_size`` is our limit + 1, letting a message of exactly the limit
  through) and closes with 1009; :class:`SignalingSocket` sends the ``too_large``
  error just before that close.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSCloseCode, web
from aiohttp.http_websocket import WebSocketError


class ClientFrameCheck:
    """Follows frame boundaries in the client-to-server byte stream (sans-I/O): reports the
    first unmasked frame and since when a message has been partly received. Headers are
    read byte by byte, payloads skipped."""

    __slots__ = (
        "_data_frame",
        "_fin",
        "_header",
        "_in_message",
        "_skip",
        "partial_since",
        "unmasked",
    )

    def __init__(self) -> None:
        self._header = bytearray()
        self._skip = 0
        self._fin = True
        self._data_frame = False
        self._in_message = False  # after a non-final data frame
        self.partial_since: float | None = None
        self.unmasked = False

    def feed(self, data: bytes, now: float) -> bool:
        """Account for ``data`` received at ``now``; False once an unmasked frame was seen."""
        if self.unmasked:
            return False
        pos, n = 0, len(data)
        header = self._header
        if n and self.partial_since is None:
            self.partial_since = now
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                if not self._skip:
                    self._frame_done()
                continue
            header.append(data[pos])
            pos += 1
            if len(header) < 2:
                continue
            if not header[1] & 0x80:
                self.unmasked = True
                return False
            len7 = header[1] & 0x7F
            extended = 2 if len7 == 126 else 8 if len7 == 127 else 0
            if len(header) < 2 + extended + 4:  # + the 4-byte masking key
                continue
            self._fin = bool(header[0] & 0x80)
            self._data_frame = (header[0] & 0x0F) < 8
            self._skip = int.from_bytes(header[2 : 2 + extended], "big") if extended else len7
            header.clear()
            if not self._skip:
                self._frame_done()
        if not header and not self._skip and not self._in_message:
            self.partial_since = None
        return True

    def _frame_done(self) -> None:
        if self._data_frame:
            self._in_message = not self._fin

    def stalled(self, now: float, timeout: float) -> bool:
        """Whether a message has been partly received for longer than ``timeout``."""
        return self.partial_since is not None and now - self.partial_since > timeout


class _MaskedFramesOnly:
    """Stands in for aiohttp's frame parser: checks masking, then delegates."""

    def __init__(self, parser: Any, check: ClientFrameCheck, refuse: Callable[[], None]) -> None:
        self._parser = parser
        self._check = check
        self._refuse = refuse

    def feed_data(self, data: Any) -> tuple[bool, bytes]:
        if self._check.unmasked:
            return False, b""
        if not self._check.feed(bytes(data), time.monotonic()):
            self._refuse()
            return False, b""
        result: tuple[bool, bytes] = self._parser.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self._parser.feed_eof()


class SignalingSocket(web.WebSocketResponse):
    """A server WebSocket that refuses unmasked frames (1002) and oversized messages
    (a ``too_large`` error, then 1009) without buffering more than ``max_message_bytes``."""

    def __init__(
        self,
        *,
        max_message_bytes: int,
        too_large: Callable[[], str],
        on_refused: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_msg_size=max_message_bytes + 1, **kwargs)
        self._too_large = too_large
        self.frame_check = ClientFrameCheck()
        self._on_refused = on_refused or (lambda reason: None)

    def _post_start(self, request: Any, protocol: str | None, writer: Any) -> None:
        handler = request.protocol
        check = self.frame_check
        # Bytes that arrived with the upgrade request are fed to the parser inside
        # _post_start: check them first so the frame check stays in step.
        tail = bytes(getattr(handler, "_message_tail", b""))
        check.feed(tail, time.monotonic())
        super()._post_start(request, protocol, writer)
        handler._payload_parser = _MaskedFramesOnly(
            handler._payload_parser, check, self._refuse_unmasked
        )
        if check.unmasked:
            self._refuse_unmasked()

    def _refuse_unmasked(self) -> None:
        self._on_refused("unmasked")
        reader = self._reader
        if reader is not None:
            reader.set_exception(
                WebSocketError(WSCloseCode.PROTOCOL_ERROR, "unmasked client frame")
            )

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.closed:
            self._on_refused("too_large")
            with contextlib.suppress(Exception):  # the peer is gone: nothing to tell it
                await self.send_str(self._too_large())
            message = message or b"too_large"
        return await super().close(code=code, message=message, drain=drain)


class HeadDeadline(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol: the request head (up to the blank line)
    must arrive within ``timeout`` seconds of the connection, or the connection is closed.
    (aiohttp times nothing before a request head is complete.)"""

    def __init__(
        self, inner: asyncio.Protocol, timeout: float, on_timeout: Callable[[], None]
    ) -> None:
        self._inner = inner
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._last = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            if b"\r\n\r\n" in self._last + data:
                self._timer.cancel()
                self._timer = None
            else:
                self._last = (self._last + data)[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _expire(self) -> None:
        self._timer = None
        self._on_timeout()
        if self._transport is not None:
            self._transport.close()
