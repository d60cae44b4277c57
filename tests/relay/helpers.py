"""Shared helpers for relay tests: synthetic RTP, a fake RelaySource, polling."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay import RelayConfig, RelayEndpoint, public_key_bytes

VP8 = {
    "mime_type": "video/VP8",
    "clock_rate": 90000,
    "channels": None,
    "payload_type": 96,
    "rtx_payload_type": 97,
    "sdp_fmtp": {"x-google-start-bitrate": 800},
    "rtcp_feedback": [["nack", None], ["nack", "pli"], ["goog-remb", None]],
    "ssrc": 0x11223344,
}


def make_rtp(seq: int, ts: int = 0, ssrc: int = 0x11223344, pt: int = 96, size: int = 200) -> bytes:
    """A real RTP packet (V=2, marker clear) with a deterministic payload."""
    header = struct.pack("!BBHII", 0x80, pt & 0x7F, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
    body = bytes((seq + i) & 0xFF for i in range(max(0, size - 12)))
    return header + body


def seq_of(pkt: bytes) -> int:
    return struct.unpack_from("!H", pkt, 2)[0]


class FakeSource:
    """A RelaySource: emits given packets, caches the last ``cache`` of them."""

    def __init__(self, kind: str = "video", codec: dict | None = None, cache: int = 1024) -> None:
        self.kind = kind
        self._codec = dict(codec or VP8)
        self.listeners: list[Callable[[bytes], None]] = []
        self.cache: dict[int, bytes] = {}
        self.cache_limit = cache
        self.keyframe_requests = 0
        self.nack_lookups = 0
        self.close_cbs: list[Callable[[], None]] = []
        self.rtcp_listeners: list[Callable[[bytes], None]] = []
        self.seq = 0

    def codec_params(self) -> dict[str, object]:
        return dict(self._codec)

    def add_packet_listener(self, cb: Callable[[bytes], None]) -> None:
        self.listeners.append(cb)

    def remove_packet_listener(self, cb: Callable[[bytes], None]) -> None:
        if cb in self.listeners:
            self.listeners.remove(cb)

    def add_rtcp_listener(self, cb: Callable[[bytes], None]) -> None:
        self.rtcp_listeners.append(cb)

    def remove_rtcp_listener(self, cb: Callable[[bytes], None]) -> None:
        if cb in self.rtcp_listeners:
            self.rtcp_listeners.remove(cb)

    def emit_rtcp(self, pkt: bytes) -> None:
        for cb in list(self.rtcp_listeners):
            cb(pkt)

    def request_keyframe(self) -> None:
        self.keyframe_requests += 1

    def get_cached_packet(self, seq: int) -> bytes | None:
        self.nack_lookups += 1
        return self.cache.get(seq)

    def on_close(self, cb: Callable[[], None]) -> None:
        self.close_cbs.append(cb)

    def emit(self, pkt: bytes) -> None:
        seq = seq_of(pkt)
        self.cache[seq] = pkt
        if len(self.cache) > self.cache_limit:
            self.cache.pop(next(iter(self.cache)))
        for cb in list(self.listeners):
            cb(pkt)

    def emit_next(self, size: int = 200) -> bytes:
        pkt = make_rtp(self.seq, ts=self.seq * 3000, size=size)
        self.seq = (self.seq + 1) & 0xFFFF
        self.emit(pkt)
        return pkt

    def close(self) -> None:
        for cb in self.close_cbs:
            cb()


class Node:
    """One relay endpoint plus its local fake producers."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.pub = public_key_bytes(self.key)
        self.sources: dict[str, FakeSource] = {}
        self.allowed: set[bytes] = set()
        self.endpoint = RelayEndpoint(
            self.key, self.sources.get, lambda k: k in self.allowed, config or fast_config()
        )

    async def start(self) -> Node:
        await self.endpoint.start()
        return self

    @property
    def port(self) -> int:
        return self.endpoint.address[1]

    def allow(self, other: Node) -> None:
        self.allowed.add(other.pub)


def fast_config(**kw: object) -> RelayConfig:
    cfg = RelayConfig(linger=0.5, reconnect_min=0.1, reconnect_max=1.0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll ``pred`` until true; returns its final value (tests assert on it)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return pred()
        await asyncio.sleep(step)


class Collector:
    """A packet listener that records sequence numbers and bytes."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.packets: list[bytes] = []

    def __call__(self, pkt: bytes) -> None:
        self.seqs.append(seq_of(pkt))
        self.packets.append(pkt)
