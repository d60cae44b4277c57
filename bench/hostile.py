"""Hostile input for robustness tests and the soak benchmark: datagrams of every size
class and first-byte class (RFC 7983 demultiplexing ranges), sent to a node's ports."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable, Iterator

MAX_UDP_PAYLOAD = 65507

# One representative first byte (or more) per RFC 7983 range, plus the gaps between them.
FIRST_BYTES = (
    0x00, 0x01, 0x03,  # STUN
    0x04, 0x0F,  # unassigned
    0x10, 0x13,  # ZRTP
    0x14, 0x16, 0x17, 0x3F,  # DTLS (alert, handshake, application data)
    0x40, 0x4F,  # TURN channel
    0x50, 0x7F,  # unassigned
    0x80, 0x90, 0xA0, 0xBF,  # RTP / RTCP (version 2)
    0xC0, 0xFF,  # unassigned
)  # fmt: skip
SIZES = (0, 1, 2, 4, 8, 12, 13, 20, 28, 100, 1199, 1200, 1472, 1500, 1501, 2048, 9000, 65507)
# Second bytes that make an RTP-range datagram look like RTCP (SR, RR, RTPFB, PSFB) or RTP.
SECOND_BYTES = (0x00, 0x60, 0xC8, 0xC9, 0xCD, 0xCE, 0xFF)


def hostile_datagrams(seed: int = 7) -> Iterator[bytes]:
    """Every first-byte class at every size class, with zero, 0xff and random bodies;
    RTP-range datagrams also with each RTCP/RTP-like second byte; plus STUN-looking
    headers whose length fields lie. Finite (about 2,000 datagrams)."""
    rng = random.Random(seed)
    for first in FIRST_BYTES:
        for size in SIZES:
            if size == 0:
                if first == FIRST_BYTES[0]:
                    yield b""
                continue
            seconds = SECOND_BYTES if 0x80 <= first <= 0xBF and size > 1 else (None,)
            for second in seconds:
                for fill in (b"\x00", b"\xff", None):
                    body = rng.randbytes(size - 1) if fill is None else fill * (size - 1)
                    data = bytes([first]) + body
                    if second is not None:
                        data = data[:1] + bytes([second]) + data[2:]
                    yield data
    yield from _lying_stun(rng)


def _lying_stun(rng: random.Random) -> Iterator[bytes]:
    cookie = b"\x21\x12\xa4\x42"
    for msg_type in (b"\x00\x01", b"\x01\x01", b"\x01\x11", b"\x00\x11"):
        for attr_type in (b"\x00\x06", b"\x00\x08", b"\x00\x20", b"\x80\x28", b"\x00\x24"):
            for attr_len in (0, 1, 3, 200):
                attr = attr_type + attr_len.to_bytes(2, "big") + rng.randbytes(min(attr_len, 4))
                yield msg_type + len(attr).to_bytes(2, "big") + cookie + rng.randbytes(12) + attr


def send_datagrams(
    targets: Iterable[tuple[str, int]],
    datagrams: Iterable[bytes],
    sock: socket.socket | None = None,
) -> int:
    """Send each datagram to each target (loopback only); returns how many were sent."""
    own = sock is None
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(True)
    sent = 0
    try:
        targets = list(targets)
        for data in datagrams:
            for target in targets:
                assert target[0].startswith("127."), "hostile traffic stays on loopback"
                try:
                    s.sendto(data, target)
                    sent += 1
                except OSError:
                    pass
    finally:
        if own:
            s.close()
    return sent


async def send_hostile_burst(
    targets: Iterable[tuple[str, int]],
    batch: int = 40,
    pause: float = 0.005,
    sock: socket.socket | None = None,
) -> None:
    """Send the whole :func:`hostile_datagrams` generator to ``targets`` in small paced
    batches, so a call under attack keeps getting CPU between them (from ``sock`` if
    given, else from a new socket per batch)."""
    import asyncio

    targets = list(targets)
    pending: list[bytes] = []
    for data in hostile_datagrams():
        pending.append(data)
        if len(pending) == batch:
            send_datagrams(targets, pending, sock)
            pending.clear()
            await asyncio.sleep(pause)
    send_datagrams(targets, pending, sock)
