"""``sendmmsg(2)`` for a shared socket: the C side of :class:`peer.egress.SendBatch`.

Python's socket module sends one datagram per call. A node's shared ICE port
(``peer/ice_port.py``) sends a packet's whole fan-out from one socket, so the batch's
datagrams leave in one system call: each has its own slot of C memory (protected in place
by libsrtp) and its own destination. Linux only; :func:`available` says whether it can run.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from cffi import FFI
from pylibsrtp import SRTP_MAX_TRAILER_LEN as SRTP_MAX_TRAILER_LEN

from peer.egress import BatchScope, SendBatch

_ffi = FFI()
_ffi.cdef(
    """
    struct iovec { void *iov_base; size_t iov_len; };
    struct msghdr {
        void *msg_name; unsigned int msg_namelen;
        struct iovec *msg_iov; size_t msg_iovlen;
        void *msg_control; size_t msg_controllen;
        int msg_flags;
    };
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
    int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
    """
)
_libc: Any = None
if sys.platform == "linux":
    try:
        _libc = _ffi.dlopen(None)
        _libc.sendmmsg  # noqa: B018 - resolve the symbol now
    except (OSError, AttributeError):
        _libc = None

MSG_DONTWAIT = 0x40
# Slots per batch: a fan-out to more subscribers goes out in several calls.
CAPACITY = 128
# RTP up to an Ethernet MTU plus libsrtp's largest trailer.
SLOT_SIZE = 1500 + SRTP_MAX_TRAILER_LEN


def available() -> bool:
    """Whether this platform has ``sendmmsg`` (Linux with glibc's layout of ``msghdr``)."""
    return _libc is not None and _ffi.sizeof("struct mmsghdr") == 64


def socket_address(address: tuple[str, int]) -> tuple[Any, int]:
    """The C ``sockaddr`` of an IPv4 or IPv6 ``(host, port)``, and its length."""
    host, port = address[0], address[1]
    if ":" in host:
        raw = (
            socket.AF_INET6.to_bytes(2, sys.byteorder)
            + port.to_bytes(2, "big")
            + bytes(4)
            + socket.inet_pton(socket.AF_INET6, host)
            + bytes(4)
        )
    else:
        raw = (
            socket.AF_INET.to_bytes(2, sys.byteorder)
            + port.to_bytes(2, "big")
            + socket.inet_pton(socket.AF_INET, host)
            + bytes(8)
        )
    return _ffi.new("char[]", raw), len(raw)


class _Memory:
    """The C memory of one batch (kept alive with it)."""

    def __init__(self, capacity: int, slot_size: int) -> None:
        self.slots = _ffi.new("char[]", capacity * slot_size)
        self.lengths = _ffi.new("int[]", capacity)
        self.iovecs = _ffi.new("struct iovec[]", capacity)
        self.messages = _ffi.new("struct mmsghdr[]", capacity)
        for i in range(capacity):
            self.iovecs[i].iov_base = self.slots + i * slot_size
            header = self.messages[i].msg_hdr
            header.msg_iov = _ffi.addressof(self.iovecs, i)
            header.msg_iovlen = 1


def send_batch(
    sock: socket.socket,
    scope: BatchScope,
    capacity: int = CAPACITY,
    slot_size: int = SLOT_SIZE,
) -> SendBatch:
    """A :class:`SendBatch` sending from ``sock`` (kept open by the caller)."""
    if not available():
        raise OSError("sendmmsg is not available here")
    memory = _Memory(capacity, slot_size)
    fd = sock.fileno()
    messages = [_ffi.addressof(memory.messages, i) for i in range(capacity)]
    sendmmsg = _libc.sendmmsg

    def send(start: int, count: int) -> int:
        sent: int = sendmmsg(fd, messages[start], count, MSG_DONTWAIT)
        if sent < 0:
            return -_ffi.errno
        return sent

    batch = SendBatch(
        scope,
        memoryview(_ffi.buffer(memory.slots)),
        slot_size,
        [memory.slots + i * slot_size for i in range(capacity)],
        memory.lengths,
        [memory.lengths + i for i in range(capacity)],
        [memory.messages[i].msg_hdr for i in range(capacity)],
        [memory.iovecs[i] for i in range(capacity)],
        send,
        SRTP_MAX_TRAILER_LEN,
        keep=(memory, messages),
    )
    return batch
