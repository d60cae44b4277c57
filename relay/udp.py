"""A UDP datagram transport that drains its socket on each readiness event.

asyncio's own datagram transport reads one datagram per event-loop iteration, so a burst
of N packets costs N loop iterations, N epoll calls and — with aioquic — N transmits and
N ACKs. This one reads every datagram waiting (up to ``max_batch``) in one callback; the
QUIC protocol above it then sends one ACK for the whole burst. Used for the relay's QUIC
sockets on both roles; works on the default loop and on uvloop (``add_reader``).

With ``offload`` (Linux), a run of equal-sized datagrams to one address leaves in one
``sendmsg`` (UDP generic segmentation offload, ``UDP_SEGMENT``) and the socket accepts
coalesced datagrams (``UDP_GRO``), split here again: on loopback a burst then costs one
system call and one wake-up at each end. On the wire they are ordinary datagrams (the
kernel segments them for any receiver that did not ask for coalescing), so peers need
nothing. If the kernel refuses segmentation the transport falls back to one send each.

A protocol with a ``datagrams_drained()`` method is called at the end of each read (the
socket is empty, or ``max_batch`` datagrams were read): the QUIC protocol ACKs the burst
it just read then, and arms its timers once per read instead of once per datagram.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["SOCKET_BUFFER", "DrainingDatagramTransport", "open_udp"]

_SOL_UDP = 17
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_UDP_GRO = getattr(socket, "UDP_GRO", 104)
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_LITTLE = struct.pack("=H", 1) == b"\x01\x00"
#: Most segments the kernel takes in one send (UDP_MAX_SEGMENTS is 64 on older kernels).
MAX_SEGMENTS = 64
#: Largest UDP payload of one segmented send.
_MAX_SEGMENTED_BYTES = 65000

#: Send and receive buffer asked for (the kernel caps it at net.core.[rw]mem_max): a
#: burst that arrives while the process is busy waits in the socket instead of being lost.
SOCKET_BUFFER = 1 << 20


class DrainingDatagramTransport(asyncio.DatagramTransport):
    """Non-blocking UDP socket + ``add_reader``; sends directly (a full socket drops)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
        max_batch: int = 64,
        offload: bool = False,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._max_batch = max_batch
        self._closing = False
        #: datagrams dropped because the socket's send buffer was full
        self.send_dropped = 0
        #: segmentation offload on sends / coalesced receives in use
        self.gso = offload
        self.gro = False
        #: segmented sends made, and datagrams they carried
        self.segmented_sends = 0
        self.segmented_datagrams = 0
        if offload:
            try:
                sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
                self.gro = True
            except OSError:
                self.gro = False
        self._extra = {"socket": sock, "sockname": sock.getsockname()}
        #: the protocol's ``datagrams_drained()``, called at the end of each read
        self._drained: Callable[[], None] | None = getattr(protocol, "datagrams_drained", None)
        loop.add_reader(sock.fileno(), self._read_ready_gro if self.gro else self._read_ready)
        loop.call_soon(protocol.connection_made, self)

    def _read_ready_gro(self) -> None:
        recv = self._sock.recvmsg
        received = self._protocol.datagram_received
        for _ in range(self._max_batch):
            try:
                data, ancillary, _flags, addr = recv(65535, _GRO_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._protocol.error_received(exc)
                break
            size = 0
            for level, kind, value in ancillary:
                if level == _SOL_UDP and kind == _UDP_GRO and len(value) >= 4:
                    size = int.from_bytes(value[:4], "little" if _LITTLE else "big")
            if 0 < size < len(data):
                for start in range(0, len(data), size):
                    received(data[start : start + size], addr)
                    if self._closing:
                        return
            else:
                received(data, addr)
            if self._closing:
                return
        if self._drained is not None:
            self._drained()

    def _read_ready(self) -> None:
        recv = self._sock.recvfrom
        received = self._protocol.datagram_received
        for _ in range(self._max_batch):
            try:
                data, addr = recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._protocol.error_received(exc)
                break
            received(data, addr)
            if self._closing:
                return
        if self._drained is not None:
            self._drained()

    def sendto(self, data: Any, addr: Any = None) -> None:
        """Send one datagram now (dropped, and counted, if the socket buffer is full)."""
        if self._closing:
            return
        try:
            if addr is None:
                self._sock.send(data)
            else:
                self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.send_dropped += 1
        except OSError as exc:
            self._protocol.error_received(exc)

    def sendto_many(self, datagrams: Sequence[bytes], addr: Any = None) -> None:
        """Send datagrams in order; runs of equal size (the last may be shorter) go in one
        segmented send when offload is on."""
        if not self.gso or len(datagrams) < 2:
            for data in datagrams:
                self.sendto(data, addr)
            return
        i, n = 0, len(datagrams)
        while i < n:
            size = len(datagrams[i])
            limit = min(MAX_SEGMENTS, _MAX_SEGMENTED_BYTES // max(1, size))
            j = i + 1
            while j < n and j - i < limit and len(datagrams[j]) == size:
                j += 1
            if j < n and j - i < limit and len(datagrams[j]) < size:
                j += 1  # a shorter last segment
            if j - i == 1:
                self.sendto(datagrams[i], addr)
            else:
                self._send_segments(datagrams[i:j], size, addr)
            i = j

    def _send_segments(self, run: Sequence[bytes], size: int, addr: Any) -> None:
        if self._closing:
            return
        cmsg = [(_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", size))]
        try:
            if addr is None:
                self._sock.sendmsg([b"".join(run)], cmsg)
            else:
                self._sock.sendmsg([b"".join(run)], cmsg, 0, addr)
            self.segmented_sends += 1
            self.segmented_datagrams += len(run)
        except (BlockingIOError, InterruptedError):
            self.send_dropped += len(run)
        except OSError:
            # the kernel or the route refuses segmentation: send one by one from now on
            self.gso = False
            for data in run:
                self.sendto(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``"socket"`` and ``"sockname"``."""
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closing

    def close(self) -> None:
        """Stop reading, close the socket, tell the protocol."""
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        """Same as :meth:`close`."""
        self.close()

    def get_write_buffer_size(self) -> int:
        """Always 0: nothing is buffered."""
        return 0


async def open_udp(
    factory: Callable[[], asyncio.DatagramProtocol],
    local_addr: tuple[str, int],
    offload: bool = False,
) -> tuple[DrainingDatagramTransport, asyncio.DatagramProtocol]:
    """Bind a UDP socket on ``local_addr`` and serve it with a draining transport
    (segmentation offload if ``offload``, see the module docstring)."""
    loop = asyncio.get_running_loop()
    host = local_addr[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        sock.bind(local_addr)
    except OSError:
        sock.close()
        raise
    protocol = factory()
    transport = DrainingDatagramTransport(loop, sock, protocol, offload=offload)
    await asyncio.sleep(0)  # connection_made has run
    return transport, protocol
