"""A raw WebSocket client over asyncio streams, for frames a real client never sends."""

from __future__ import annotations

import asyncio
import base64
import os
import struct


class RawWebSocket:
    """Hand-built frames (optionally unmasked, optionally lying about their length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, host: str, port: int, path: str = "/ws", source: str | None = None
    ) -> RawWebSocket:
        ws, status = await cls.try_connect(host, port, path, source)
        assert ws is not None, f"upgrade refused with HTTP {status}"
        return ws

    @classmethod
    async def try_connect(
        cls, host: str, port: int, path: str = "/ws", source: str | None = None
    ) -> tuple[RawWebSocket | None, int]:
        """(socket, 101) or (None, the HTTP status that refused the upgrade)."""
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            writer.close()
            return None, status
        return cls(reader, writer), status

    @staticmethod
    def frame(
        payload: bytes, *, opcode: int = 1, masked: bool = True, length: int | None = None
    ) -> bytes:
        n = len(payload) if length is None else length
        first = 0x80 | opcode
        mask_bit = 0x80 if masked else 0
        if n < 126:
            head = struct.pack("!BB", first, mask_bit | n)
        elif n < 65536:
            head = struct.pack("!BBH", first, mask_bit | 126, n)
        else:
            head = struct.pack("!BBQ", first, mask_bit | 127, n)
        if not masked:
            return head + payload
        key = os.urandom(4)
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    async def send_text(self, text: str, **kw: object) -> None:
        self.writer.write(self.frame(text.encode(), **kw))  # type: ignore[arg-type]
        await self.writer.drain()

    async def receive(self, timeout: float = 10) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame; (-1, b"") at EOF."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        except asyncio.IncompleteReadError:
            return -1, b""
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return head[0] & 0x0F, await self.reader.readexactly(n)

    async def close_code(self, timeout: float = 10) -> int | None:
        """Read until the server's close frame; its code (None at EOF without one)."""
        while True:
            opcode, payload = await self.receive(timeout)
            if opcode == -1:
                return None
            if opcode == 8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None

    def close(self) -> None:
        self.writer.close()
