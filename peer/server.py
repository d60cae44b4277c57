"""The node's HTTP/WebSocket edge (aiohttp): signaling at ``/ws``, the demo page at
``/``, node stats at ``/stats`` and, in dev mode, dev tokens at ``/dev/token``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiohttp import WSMsgType, web

from peer import aiortc_adapter as rtc
from peer.engine import Node, Producer
from peer.session import ParticipantSession
from peer.signaling import ProtocolError, decode_client_message, encode
from peer.stats import AdmissionPolicy
from peer.tokens import TokenError, issue_token

log = logging.getLogger("cascade.server")
STATIC = Path(__file__).parent / "static"
# aiohttp's own hard limit; messages between our limit and this get a `too_large` reply.
WS_HARD_LIMIT = 1024 * 1024


@dataclass
class NodeConfig:
    """Settings of one node (CLI flags map onto these)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_secret: str = ""
    dev: bool = False
    ice_addresses: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    max_consumers: int = 2000
    max_cpu: float = 0.85
    max_egress_pps: float = 60_000.0
    keyframe_request_delay: float = 0.5
    answer_timeout: float = 15.0


class NodeServer:
    """A running node: the SFU engine plus its signaling sessions."""

    def __init__(self, config: NodeConfig) -> None:
        if not config.api_secret:
            raise ValueError("an API secret is required")
        self.config = config
        self.api_secret = config.api_secret
        self.keyframe_request_delay = config.keyframe_request_delay
        self.answer_timeout = config.answer_timeout
        self.node = Node(
            AdmissionPolicy(
                max_consumers=config.max_consumers,
                max_cpu=config.max_cpu,
                max_egress_pps=config.max_egress_pps,
            )
        )
        self.sessions: dict[str, list[ParticipantSession]] = {}
        self.bad_messages = 0
        self._process = psutil.Process()
        self._ticker: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        rtc.set_ice_addresses(config.ice_addresses)

    # -- room membership --------------------------------------------------------

    def room_sessions(self, room: str) -> list[ParticipantSession]:
        """Sessions currently joined to ``room``."""
        return list(self.sessions.get(room, ()))

    def add_session(self, room: str, session: ParticipantSession) -> None:
        """Record that ``session`` joined ``room``."""
        self.sessions.setdefault(room, []).append(session)

    def announce_producer(self, room: str, producer: Producer) -> None:
        """Tell the room about a new producer (local or relayed) and auto-subscribe to it."""
        for session in self.room_sessions(room):
            if session.participant_id != producer.participant_id:
                session.post({"type": "producer_added", "producer": producer.describe()})
                session._try_auto_subscribe(producer)

        def removed(p: Producer) -> None:
            for session in self.room_sessions(room):
                if session.participant_id != p.participant_id:
                    session.post({"type": "producer_removed", "producer_id": p.id})

        producer.on_close(removed)

    def remove_session(self, room: str, session: ParticipantSession) -> None:
        """Record that ``session`` left ``room``."""
        members = self.sessions.get(room, [])
        if session in members:
            members.remove(session)
        if not members:
            self.sessions.pop(room, None)

    # -- HTTP handlers ----------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application of this node."""
        app = web.Application()
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/stats", self.stats_handler)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/", self.index)
        if self.config.dev:
            app.router.add_get("/dev/token", self.dev_token)
        app.router.add_static("/static", STATIC)
        return app

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def dev_token(self, request: web.Request) -> web.Response:
        room = request.query.get("room", "demo")
        identity = request.query.get("identity", f"guest-{int(time.time() * 1000) % 100000}")
        token = issue_token(self.api_secret, room, identity, ttl=6 * 3600)
        return web.json_response({"token": token, "room": room, "identity": identity})

    async def stats_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def stats(self) -> dict[str, object]:
        """Node totals and per-room, per-stream stats."""
        rooms: dict[str, object] = {}
        for room, members in self.sessions.items():
            rooms[room] = {s.participant_id: {"name": s.name, **s.stats()} for s in members}
        return {
            "time": time.time(),
            "totals": self.node.totals(),
            "cpu": round(self.node.admission.cpu, 3),
            "headroom": round(self.node.admission.headroom(), 3),
            "codec_instances": sum(
                s.codec_instances() for members in self.sessions.values() for s in members
            ),
            "bad_messages": self.bad_messages,
            "rooms": rooms,
        }

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=WS_HARD_LIMIT)
        await ws.prepare(request)

        async def send(message: dict[str, object]) -> None:
            if not ws.closed:
                await ws.send_str(encode(message))

        session = ParticipantSession(self, send)
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    try:
                        message = decode_client_message(msg.data)
                    except ProtocolError as exc:
                        self.bad_messages += 1
                        reply: dict[str, object] = {
                            "type": "error",
                            "code": exc.code,
                            "message": exc.message,
                        }
                        if exc.request_id is not None:
                            reply["id"] = exc.request_id
                        await send(reply)
                        continue
                    await session.handle(message)
                    if session._closed:
                        break
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            await session.close()
            with contextlib.suppress(Exception):
                await ws.close()
        return ws

    # -- lifecycle --------------------------------------------------------------

    async def _tick(self) -> None:
        self._process.cpu_percent(None)
        last_cpu = time.monotonic()
        while True:
            await asyncio.sleep(0.1)
            now = time.time()
            self.node.tick(now)
            if time.monotonic() - last_cpu >= 1.0:
                last_cpu = time.monotonic()
                totals = self.node.totals()
                self.node.admission.update(
                    self._process.cpu_percent(None) / 100.0,
                    float(totals["egress_packet_rate"]),
                    int(totals["consumers"]),
                )

    async def start(self) -> None:
        """Start serving on the configured host and port."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self._ticker = asyncio.ensure_future(self._tick())
        if self.config.port == 0:
            server: Any = site._server
            self.config.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close every session and stop serving."""
        if self._ticker is not None:
            self._ticker.cancel()
        for members in list(self.sessions.values()):
            for session in list(members):
                await session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        """Base HTTP URL of this node."""
        return f"http://{self.config.host}:{self.config.port}"


__all__ = ["NodeConfig", "NodeServer", "TokenError"]
