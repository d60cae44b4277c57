"""Protect and send one subscriber's RTP: the per-consumer end of the packet path.

A :class:`ProtectedSender` is a consumer's sink. The transport adapter
(``peer/aiortc_adapter.py``, the only module that knows aiortc and pylibsrtp) resolves the
handles once the subscriber's transport is connected — libsrtp's protect function with the
session's context and buffer, the socket's ``sendto`` and the peer's address — and binds them
here. Each packet is then copied into the session buffer, protected in place and sent from it:
no allocation but the view sent. Compiled with the forwarding core (``peer/native.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ProtectedSender:
    """Synchronous SRTP protect + ``sendto`` for one subscriber transport.

    Until :meth:`bind` (transport not connected yet) packets are dropped and counted; a
    failed send asks ``resolve`` to bind again (new SRTP session, new ICE pair) and retries
    that packet once.
    """

    def __init__(self, resolve: Callable[[ProtectedSender], bool]) -> None:
        self._resolve = resolve
        self.dropped = 0
        self._limit = 0
        self._protect: Any = None
        self._ctx: Any = None
        self._cdata: Any = None
        self._buffer: Any = None
        self._view: Any = None
        self._length: Any = None
        self._sendto: Any = None
        self._addr: Any = None
        self._keep: Any = None

    def bind(
        self,
        protect: Any,
        ctx: Any,
        cdata: Any,
        buffer: Any,
        length: Any,
        limit: int,
        sendto: Any,
        addr: Any,
        keep: Any = None,
    ) -> None:
        """Send with these handles: ``protect(ctx, cdata, length)`` protects the ``length[0]``
        bytes in ``buffer`` (which ``cdata`` points to) in place, returning non-zero on
        failure; packets longer than ``limit`` are refused. ``keep`` is held while bound
        (the object that owns ``ctx``)."""
        self._protect = protect
        self._ctx = ctx
        self._cdata = cdata
        self._buffer = buffer
        self._view = memoryview(buffer)
        self._length = length
        self._limit = limit
        self._sendto = sendto
        self._addr = addr
        self._keep = keep

    def __call__(self, data: bytes) -> None:
        try:
            self._send(data)
        except BlockingIOError:  # socket buffer full: drop, as a router queue would
            self.dropped += 1
        except Exception:  # not connected yet, or the transport broke
            self.dropped += 1
            self._limit = 0
            if data and self._resolve(self):
                try:
                    self._send(data)
                    self.dropped -= 1
                except Exception:
                    return

    def _send(self, data: bytes) -> None:
        n = len(data)
        if n > self._limit:
            raise ValueError("packet too long for the SRTP buffer, or not bound")
        length = self._length
        length[0] = n
        self._buffer[0:n] = data
        if self._protect(self._ctx, self._cdata, length):
            raise ValueError("srtp_protect failed")
        self._sendto(self._view[: length[0]], self._addr)
