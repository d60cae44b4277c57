"""Protect and send one subscriber's RTP: the per-consumer end of the packet path.

A :class:`ProtectedSender` is a consumer's sink. The transport adapter
(``peer/aiortc_adapter.py``, the only module that knows aiortc and pylibsrtp) resolves the
handles once the subscriber's transport is connected — libsrtp's protect function with the
session's context and buffer, the socket's ``sendto`` and the peer's address — and binds them
here. Each packet is then copied into the session buffer, protected in place and sent from it:
no allocation but the view sent. Compiled with the forwarding core (``peer/native.py``).

On a node's shared ICE port (``peer/ice_port.py``) every subscriber's transport has the same
socket: the sink then protects into a slot of that port's :class:`SendBatch`, and what one
received packet fans out to leaves in one ``sendmmsg`` (``peer/datagrams.py`` holds the
C structures and the call).
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
        self._batch: SendBatch | None = None
        self._name: Any = None
        self._namelen = 0
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
        self._batch = None

    def bind_batch(
        self, protect: Any, ctx: Any, batch: SendBatch, name: Any, namelen: int, keep: Any
    ) -> None:
        """Send through ``batch`` (a shared socket) to the C socket address ``name``;
        ``protect(ctx, ...)`` as in :meth:`bind`."""
        self._protect = protect
        self._ctx = ctx
        self._batch = batch
        self._name = name
        self._namelen = namelen
        self._limit = batch.limit
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
        batch = self._batch
        if batch is not None:
            batch.add(data, self._protect, self._ctx, self._name, self._namelen)
            return
        length = self._length
        length[0] = n
        self._buffer[0:n] = data
        if self._protect(self._ctx, self._cdata, length):
            raise ValueError("srtp_protect failed")
        self._sendto(self._view[: length[0]], self._addr)


class BatchScope:
    """When batches are sent: at :meth:`exit` of the outermost scope (a received datagram
    handled), or, for packets added outside any scope, once the event loop next runs."""

    def __init__(self, call_soon: Callable[[Callable[[], None]], Any]) -> None:
        self._call_soon = call_soon
        self._depth = 0
        self._pending: list[SendBatch] = []
        self._scheduled = False

    def enter(self) -> None:
        self._depth += 1

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._pending:
            self.flush()

    def pending(self, batch: SendBatch) -> None:
        """``batch`` has its first datagram."""
        self._pending.append(batch)
        if self._depth == 0 and not self._scheduled:
            self._scheduled = True
            self._call_soon(self.flush)

    def flush(self) -> None:
        """Send every pending batch now."""
        self._scheduled = False
        pending = self._pending
        self._pending = []
        for batch in pending:
            batch.flush()


class SendBatch:
    """Protected datagrams to many addresses waiting for one ``sendmmsg`` on one socket.

    The slots, their lengths and the ``mmsghdr`` array are C memory made by
    ``peer/datagrams.py``: ``view`` covers the ``slots`` of ``slot_size`` bytes each,
    ``pointers[i]`` / ``lengths[i]`` / ``length_pointers[i]`` / ``headers[i]`` /
    ``iovecs[i]`` are slot ``i``'s data, length, length pointer, ``msghdr`` and ``iovec``;
    ``send(start, count)`` sends slots ``start..start+count-1`` and returns how many were
    sent (``-errno`` if none).
    """

    def __init__(
        self,
        scope: BatchScope,
        view: Any,
        slot_size: int,
        pointers: list[Any],
        lengths: Any,
        length_pointers: list[Any],
        headers: list[Any],
        iovecs: list[Any],
        send: Callable[[int, int], int],
        trailer: int,
        keep: Any = None,
    ) -> None:
        self._scope = scope
        self._view = view
        self._slot_size = slot_size
        self._pointers = pointers
        self._lengths = lengths
        self._length_pointers = length_pointers
        self._headers = headers
        self._iovecs = iovecs
        self._send = send
        self._keep = keep  # owns the C memory
        self.capacity = len(pointers)
        self.limit = slot_size - trailer
        self.count = 0
        self.sent = 0
        self.calls = 0
        self.dropped = 0

    def add(self, data: bytes, protect: Any, ctx: Any, name: Any, namelen: int) -> None:
        """Copy ``data`` into the next slot, protect it there with ``protect(ctx, ...)``
        and address it to ``name`` (a C ``sockaddr`` the caller keeps alive). Raises
        ValueError if it is too long or protection fails (the slot is not used)."""
        n = len(data)
        if n > self.limit:
            raise ValueError("packet too long for the SRTP buffer")
        i = self.count
        if i == self.capacity:
            self.flush()
            i = 0
        offset = i * self._slot_size
        self._view[offset : offset + n] = data
        self._lengths[i] = n
        if protect(ctx, self._pointers[i], self._length_pointers[i]):
            raise ValueError("srtp_protect failed")
        header = self._headers[i]
        header.msg_name = name
        header.msg_namelen = namelen
        self._iovecs[i].iov_len = self._lengths[i]
        self.count = i + 1
        if i == 0:
            self._scope.pending(self)

    def flush(self) -> None:
        """Send every slot now. A datagram the kernel refuses is dropped alone; a full
        socket buffer drops the rest (as a router queue would)."""
        count = self.count
        self.count = 0
        start = 0
        while start < count:
            self.calls += 1
            result = self._send(start, count - start)
            if result > 0:
                start += result
                self.sent += result
            elif result in (-11, -105):  # EAGAIN, ENOBUFS
                self.dropped += count - start
                return
            else:
                self.dropped += 1
                start += 1
