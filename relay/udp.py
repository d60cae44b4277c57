"""A UDP datagram transport that drains its socket on each readiness event.

asyncio's own datagram transport reads one datagram per event-loop iteration, so a burst
of N packets costs N loop iterations, N epoll calls and — with aioquic — N transmits and
N ACKs. This one reads every datagram waiting (up to ``max_batch``) in one callback; the
QUIC protocol above it then sends one ACK for the whole burst. Used for the relay's QUIC
sockets on both roles; works on the default loop and on uvloop (``add_reader``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["SOCKET_BUFFER", "DrainingDatagramTransport", "open_udp"]

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
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._max_batch = max_batch
        self._closing = False
        #: datagrams dropped because the socket's send buffer was full
        self.send_dropped = 0
        self._extra = {"socket": sock, "sockname": sock.getsockname()}
        loop.add_reader(sock.fileno(), self._read_ready)
        loop.call_soon(protocol.connection_made, self)

    def _read_ready(self) -> None:
        recv = self._sock.recvfrom
        received = self._protocol.datagram_received
        for _ in range(self._max_batch):
            try:
                data, addr = recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            received(data, addr)
            if self._closing:
                return

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
    factory: Callable[[], asyncio.DatagramProtocol], local_addr: tuple[str, int]
) -> tuple[DrainingDatagramTransport, asyncio.DatagramProtocol]:
    """Bind a UDP socket on ``local_addr`` and serve it with a draining transport."""
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
    transport = DrainingDatagramTransport(loop, sock, protocol)
    await asyncio.sleep(0)  # connection_made has run
    return transport, protocol
