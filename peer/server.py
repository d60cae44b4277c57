"""The node's HTTP/WebSocket edge (aiohttp): signaling at ``/ws``, the demo page at
``/``, node stats at ``/stats`` and, in dev mode, dev tokens at ``/dev/token``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiohttp import WSCloseCode, WSMsgType, web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from peer import aiortc_adapter as rtc
from peer.admin import check_admin
from peer.drain import DrainPlan, DrainPolicy
from peer.edge_guard import HeadDeadline, SignalingSocket
from peer.engine import Node, Producer
from peer.limits import ConnectionCounts, EdgeCounters, EdgeLimits, TokenBuckets
from peer.placement import Placement
from peer.relay_bridge import ProducerRelaySource, bridge_remote_producer
from peer.room import Rooms
from peer.session import MIGRATED_LINGER, ParticipantSession, SendFn
from peer.signaling import Join, ProtocolError, decode_client_message, encode, error_message
from peer.stats import AdmissionPolicy
from peer.tokens import TokenError, TokenVerifier, issue_token
from relay import PendingSource, RelayConfig, RelayEndpoint, RelaySource

log = logging.getLogger("cascade.server")
STATIC = Path(__file__).parent / "static"


@dataclass
class NodeConfig:
    """Settings of one node (CLI flags map onto these)."""

    host: str = "127.0.0.1"
    port: int = 8080
    # HS256 shared secret and/or Ed25519 application public key (EdDSA) for access tokens.
    api_secret: str = ""
    token_public_key: Ed25519PublicKey | None = None
    dev: bool = False
    ice_addresses: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    # Address put in ICE host candidates instead of the bound one (e.g. bound to 0.0.0.0).
    ice_announce: str | None = None
    # One UDP port for every participant's ICE transport (0: any free port); None: a port
    # per transport.
    ice_port: int | None = 0
    # Signaling URL announced to clients and other nodes (default: http://host:port).
    public_url: str = ""
    max_consumers: int = 2000
    max_cpu: float = 0.85
    max_egress_pps: float = 60_000.0
    keyframe_request_delay: float = 0.5
    answer_timeout: float = 15.0
    # Node identity (Ed25519): authenticates relay links; generated if not given.
    identity: Ed25519PrivateKey | None = None
    # QUIC relay endpoint; None disables relaying.
    relay_host: str = "127.0.0.1"
    relay_port: int | None = None
    # Relay address published to other nodes, HOST or HOST:PORT (default: the bound one).
    relay_announce: str = ""
    # Raw Ed25519 public keys of peer nodes allowed to pull producers from this one.
    relay_peers: set[bytes] = field(default_factory=set)
    # Connection, message, timeout and rate limits of the HTTP/WebSocket edge (docs/limits.md).
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    # Bearer token for admin actions (POST /admin/drain); the node key is always accepted.
    admin_token: str = ""
    # How a drain moves participants out (rate, timeout, grace).
    drain: DrainPolicy = field(default_factory=DrainPolicy)


def task_census(tasks: Iterable[asyncio.Task[Any]]) -> dict[str, int]:
    """How many tasks run each coroutine (by qualified name), most frequent first."""
    counts: Counter[str] = Counter()
    for task in tasks:
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", None) or type(coro).__name__
        counts[name] += 1
    return dict(counts.most_common())


class NodeServer:
    """A running node: the SFU engine plus its signaling sessions."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.api_secret = config.api_secret
        self.tokens = TokenVerifier(
            secret=config.api_secret or None, public_key=config.token_public_key
        )
        self.keyframe_request_delay = config.keyframe_request_delay
        self.answer_timeout = config.answer_timeout
        self.node = Node(
            AdmissionPolicy(
                max_consumers=config.max_consumers,
                max_cpu=config.max_cpu,
                max_egress_pps=config.max_egress_pps,
            )
        )
        self.rooms = Rooms(self.node)
        self.limits = config.limits
        self.counters = EdgeCounters()
        self._ws_counts = ConnectionCounts(
            self.limits.max_ws_connections, self.limits.max_ws_connections_per_ip
        )
        self._join_buckets = TokenBuckets(
            self.limits.join_rate,
            self.limits.join_burst,
            self.limits.bucket_idle,
            self.limits.max_buckets,
        )
        self._sockets: set[SignalingSocket] = set()
        self._background: set[asyncio.Future[Any]] = set()
        self._http_server: asyncio.AbstractServer | None = None
        self.join_outcomes: Counter[str] = Counter()
        # Extension points (e.g. monitoring): called with the app before it starts, and
        # extra top-level sections of stats().
        self.app_setup: list[Callable[[web.Application], None]] = []
        self.stats_sections: dict[str, Callable[[], object]] = {}
        self._process = psutil.Process()
        self._ticker: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.identity = config.identity or Ed25519PrivateKey.generate()
        self.relay: RelayEndpoint | None = None
        self._relay_sources: dict[str, ProducerRelaySource] = {}
        # Relayed producers found older than a republished track of the same source.
        self.superseded: set[str] = set()
        self.relay_authorizer: Callable[[bytes], bool] = lambda key: key in config.relay_peers
        # (peer key, room) -> may that peer pull the room's producers (the overlay sets it).
        self.relay_room_policy: Callable[[bytes, str], bool] = lambda key, room: True
        # Set by the overlay: ranks the nodes a room's new participant should join.
        self.placer: Callable[[str, str | None], Awaitable[Placement]] | None = None
        self.node_key = ""
        # Set by the overlay: regions, nodes, capacity and scale signals (GET /overlay).
        self.overlay_view: Callable[[], dict[str, object]] | None = None
        # Set by the overlay: a room's participants on other nodes (``rooms.changed`` is the
        # overlay's hook for membership changes here).
        self.remote_participants: Callable[[str], Awaitable[list[dict[str, object]]]] = (
            _no_remote_participants
        )
        # Set by the overlay: a room's producers on other nodes not relayed here yet, and
        # relaying one of them now.
        self.remote_producers: Callable[[str], list[dict[str, object]]] = lambda room: []
        self.pull_producer: Callable[[str, str], Awaitable[bool]] | None = None
        # Set by the overlay: other nodes a room's participants may fail over to; and what
        # to do the moment a drain starts (say so in the directory).
        self.fallbacks: Callable[[str], list[dict[str, object]]] = lambda room: []
        self.drain_started: Callable[[], Awaitable[None]] = _nothing
        self.draining = False
        # Set once a drain has moved everyone out (or timed out): the CLI then exits.
        self.drained = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self.drain_log: list[dict[str, object]] = []
        rtc.set_ice_addresses(config.ice_addresses, config.ice_announce)
        # The shared ICE ports (``ice_port``), open while the node serves.
        self.ice_ports: rtc.SharedIcePorts | None = None

    # -- relaying ----------------------------------------------------------------

    def relay_source(self, producer_id: str) -> ProducerRelaySource | None:
        """A local producer (never a relayed one) as a relay source, for relay endpoints and
        the pipes between worker processes."""
        return self._relay_lookup(producer_id)

    def relay_lookup(self, producer_id: str) -> RelaySource | PendingSource | None:
        """What another node's relay link may pull: a local producer."""
        return self._relay_lookup(producer_id)

    def _relay_lookup(self, producer_id: str) -> ProducerRelaySource | None:
        """Local producers (never relayed ones) that peers may pull."""
        source = self._relay_sources.get(producer_id)
        if source is not None and not source.producer.closed:
            return source
        for router in self.node.routers.values():
            producer = router.producers.get(producer_id)
            if producer is not None and producer.origin == "local":
                source = self._relay_sources[producer_id] = ProducerRelaySource(producer)
                producer.on_close(self._forget_relay_source)
                return source
        return None

    def _relay_may_subscribe(self, peer_key: bytes, producer_id: str) -> bool:
        room = self.producer_room(producer_id)
        if room is None:
            return True  # unknown: the lookup answers NOT_FOUND
        return self.relay_room_policy(peer_key, room)

    def producer_room(self, producer_id: str) -> str | None:
        """The room of a producer on this node, if any."""
        for room, router in self.node.routers.items():
            if producer_id in router.producers:
                return room
        return None

    def local_producers(self, room: str) -> list[tuple[str, str]]:
        """This node's share of ``room``'s producers, as (id, kind), sorted: producers
        published here by members not moving away (what the directory and peer nodes
        are told)."""
        hosted = self.rooms.get(room)
        if hosted is None:
            return []
        staying = {m.participant_id for m in hosted.members if not m.moving}
        return sorted(
            (p.id, p.kind)
            for p in hosted.router.producers.values()
            if p.origin == "local" and p.participant_id in staying and not p.closed
        )

    def _forget_relay_source(self, producer: Producer) -> None:
        self._relay_sources.pop(producer.id, None)

    @property
    def relay_public_key(self) -> bytes:
        """This node's raw Ed25519 public key (its relay and DHT identity)."""
        return self.identity.public_key().public_bytes_raw()

    async def pull_remote_producer(
        self, room: str, peer_key: bytes, host: str, port: int, producer_id: str
    ) -> Producer:
        """Relay a producer of another node into ``room`` here (one flow per producer
        per node, shared by every local consumer)."""
        if self.relay is None:
            raise RuntimeError("relay is disabled on this node")
        router = self.node.router(room)
        existing = router.producers.get(producer_id)
        if existing is not None:
            return existing
        remote = await self.relay.link(peer_key, host, port).subscribe(producer_id)
        existing = router.producers.get(producer_id)
        if existing is not None:
            return existing
        producer = bridge_remote_producer(router, remote)
        hosted = self.rooms.get(room)
        if hosted is not None and not hosted.announce_producer(producer):
            # an older incarnation of a track already republished here: never pull it again
            self.superseded.add(producer_id)
            return producer
        # Ask for a keyframe as the flow opens: it is here (and replayed to each consumer
        # that starts within the replay window) by the time the subscribers can receive.
        producer.request_keyframe()

        def state_changed(state: str) -> None:
            # A relay link that dies or comes back is reported to the room's subscribers.
            # Closed while interrupted (its node died or restarted without it), the producer
            # is lost rather than ended: subscribers keep its tracks for a republished one.
            producer.close_reason = "origin_lost" if state == "interrupted" else "closed"
            if state in ("live", "interrupted"):
                current = self.rooms.get(room)
                if current is not None:
                    current.broadcast(
                        {"type": "producer_state", "producer_id": producer.id, "state": state}
                    )
                if state == "live":
                    producer.request_keyframe()

        remote.on_state(state_changed)
        return producer

    # -- HTTP handlers ----------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application of this node."""
        app = web.Application()
        app.on_response_prepare.append(_one_request_per_connection)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/stats", self.stats_handler)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/place", self.place_handler)
        app.router.add_get("/overlay", self.overlay_handler)
        app.router.add_post("/admin/drain", self.drain_handler)
        app.router.add_get("/admin/drain", self.drain_status_handler)
        app.router.add_get("/admin/tasks", self.tasks_handler)
        app.router.add_get("/", self.index)
        if self.config.dev and self.api_secret:
            app.router.add_get("/dev/token", self.dev_token)
        app.router.add_static("/static", STATIC)
        for setup in self.app_setup:
            setup(app)
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

    async def place(self, room: str, region: str | None) -> Placement | None:
        """Where a new participant of ``room`` should go (None outside an overlay)."""
        if self.placer is None:
            return None
        return await self.placer(room, region)

    async def place_handler(self, request: web.Request) -> web.Response:
        room = request.query.get("room", "")
        region = request.query.get("region") or None
        if not room or len(room) > 128:
            return web.json_response(
                {"error": "bad_request", "message": "room is required"}, status=400
            )
        placement = await self.place(room, region)
        if placement is None:
            candidates = [{"node_id": self.node_key, "url": self.url, "reason": "single_node"}]
            return web.json_response({"room": room, "candidates": candidates})
        return web.json_response(
            {
                "room": room,
                "client_region": placement.client_region,
                "left_region": placement.left_region,
                "candidates": [
                    {
                        "node_id": c.node_id,
                        "url": c.signaling_url,
                        "region": c.region,
                        "reason": c.reason.value,
                        "headroom": round(c.headroom, 3),
                    }
                    for c in placement.candidates
                ],
            }
        )

    async def overlay_handler(self, request: web.Request) -> web.Response:
        if self.overlay_view is None:
            return web.json_response(
                {"error": "not_in_overlay", "message": "this node runs without a directory"},
                status=404,
            )
        return web.json_response(self.overlay_view())

    # -- drain --------------------------------------------------------------------

    def _admin_refusal(self, request: web.Request, action: str) -> web.Response | None:
        refusal = check_admin(
            request.headers.get("Authorization"),
            action=action,
            now=time.time(),
            node_key=self.identity.public_key(),
            admin_token=self.config.admin_token or None,
        )
        if refusal is None:
            return None
        log.warning("admin %s refused from %s: %s", action, request.remote, refusal.value)
        return web.json_response(
            error_message(refusal.value, "admin token or node key required"), status=401
        )

    async def drain_handler(self, request: web.Request) -> web.Response:
        refused = self._admin_refusal(request, "drain")
        if refused is not None:
            return refused
        started = self.start_drain()
        return web.json_response({"draining": True, "started": started, **self.drain_status()})

    async def drain_status_handler(self, request: web.Request) -> web.Response:
        refused = self._admin_refusal(request, "drain")
        if refused is not None:
            return refused
        return web.json_response({"draining": self.draining, **self.drain_status()})

    async def tasks_handler(self, request: web.Request) -> web.Response:
        """The node's asyncio tasks counted by coroutine: what to read when they grow."""
        refused = self._admin_refusal(request, "tasks")
        if refused is not None:
            return refused
        census = task_census(asyncio.all_tasks())
        return web.json_response({"count": sum(census.values()), "by_coroutine": census})

    def drain_status(self) -> dict[str, object]:
        """Participants left and moves made so far."""
        return {
            "participants": self.rooms.participant_count(),
            "migrated": sum(1 for e in self.drain_log if e["action"] == "migrate"),
            "disconnected": sum(1 for e in self.drain_log if e["action"] == "disconnect"),
            "done": self.drained.is_set(),
        }

    def start_drain(self) -> bool:
        """Stop taking participants and move the present ones to other nodes; ``drained``
        is set when the node is empty or the drain timed out. False if already draining."""
        if self.draining:
            return False
        self.draining = True
        log.info("draining: %d participants to move", self.rooms.participant_count())
        self._drain_task = asyncio.ensure_future(self._drain())
        return True

    async def _drain(self) -> None:
        try:
            await self.drain_started()
        except Exception:
            log.exception("announcing the drain failed")
        plan = DrainPlan(self.config.drain, time.monotonic())
        try:
            while True:
                sessions = {
                    m.participant_id: (room.name, m) for room in self.rooms for m in room.members
                }
                now = time.monotonic()
                step = plan.poll(now, sessions)
                for pid in step.migrate:
                    room, member = sessions[pid]
                    await self._migrate(room, member)
                for pid in step.disconnect:
                    room, member = sessions[pid]
                    self.drain_log.append({"action": "disconnect", "participant_id": pid})
                    await member.close()
                if step.finished:
                    log.info("drain %s", "timed out" if step.timed_out else "complete")
                    if not step.timed_out:
                        await self._wait_lingering_producers()
                    break
                wake = plan.deadline(sessions)
                await asyncio.sleep(min(0.1, max(0.01, wake - time.monotonic())))
        finally:
            self.drained.set()

    async def _wait_lingering_producers(self) -> None:
        """Producers of participants that moved stay a few seconds so that other nodes switch
        to the republished tracks: a drained node exits after them."""
        deadline = time.monotonic() + MIGRATED_LINGER + 1.0
        while time.monotonic() < deadline and any(
            p.origin == "local" and not p.closed
            for router in self.node.routers.values()
            for p in router.producers.values()
        ):
            await asyncio.sleep(0.1)

    async def _migrate(self, room: str, member: object) -> None:
        session = member if isinstance(member, ParticipantSession) else None
        if session is None:
            return
        target = await self.migration_target(room, session.region, session.participant_id)
        if target is not None:
            session.migrate(target)

    async def migration_target(
        self, room: str, region: str | None, participant_id: str
    ) -> dict[str, str] | None:
        """Where a draining node sends a participant (logged in ``drain_log``), or None."""
        try:
            placement = await self.place(room, region)
        except Exception:
            log.exception("placing a migrating participant failed")
            placement = None
        best = None
        if placement is not None:
            best = next((c for c in placement.candidates if c.node_id != self.node_key), None)
        if best is None:
            log.warning("drain: no other node for %s in %s", participant_id, room)
            return None
        self.drain_log.append(
            {"action": "migrate", "participant_id": participant_id, "to": best.node_id}
        )
        return {"url": best.signaling_url, "node_id": best.node_id, "region": best.region}

    async def stats_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def stats(self) -> dict[str, object]:
        """Node totals and per-room, per-stream stats."""
        rooms: dict[str, object] = {}
        sessions = [m for room in self.rooms for m in room.members]
        for room in self.rooms:
            rooms[room.name] = {
                m.participant_id: {"name": m.name, **m.stats()} for m in room.members
            }
        return {
            "time": time.time(),
            "totals": self.node.totals(),
            "cpu": round(self.node.admission.cpu, 3),
            "headroom": round(self.node.admission.headroom(), 3),
            "codec_instances": sum(s.codec_instances() for s in sessions),
            "bad_messages": self.counters.bad_messages,
            "datagrams_dropped": rtc.dropped_datagrams.count,
            "ice_port": self.ice_ports.stats() if self.ice_ports is not None else None,
            "limits": self.limit_counters(),
            "process": self.process_stats(),
            "rooms": rooms,
            **{name: section() for name, section in self.stats_sections.items()},
        }

    def process_stats(self) -> dict[str, int]:
        """Resident memory, open file descriptors and asyncio tasks of the node process."""
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            fds = self._process.num_fds()
        return {"rss_bytes": rss, "fds": fds, "asyncio_tasks": len(asyncio.all_tasks())}

    @property
    def bad_messages(self) -> int:
        """Client messages refused as malformed (any error code of the decoder)."""
        return self.counters.bad_messages

    def limit_counters(self) -> dict[str, int]:
        """What each limit of docs/limits.md refused so far."""
        self.counters.datagrams_dropped = rtc.dropped_datagrams.count
        counters = self.counters.as_dict()
        if self.relay is not None:
            relay = self.relay.admission.counters.as_dict()
            counters.update({f"relay_{k}": v for k, v in relay.items()})
            counters["relay_pending"] = self.relay.admission.pending
        return counters

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        source = request.remote or "?"
        refused = self._ws_counts.admit(source)
        if refused == "total":
            self.counters.ws_refused_total_limit += 1
            return web.json_response(
                error_message("overloaded", "too many connections"), status=503
            )
        if refused == "per_source":
            self.counters.ws_refused_per_ip_limit += 1
            return web.json_response(
                error_message("too_many_connections", "too many connections from your address"),
                status=429,
            )
        try:
            return await self._signaling(request, source)
        finally:
            self._ws_counts.release(source)

    def _count_refused(self, reason: str) -> None:
        if reason == "too_large":
            self.counters.messages_too_large += 1
            self.counters.bad_messages += 1
        elif reason == "unmasked":
            self.counters.unmasked_frames += 1
            self.counters.bad_messages += 1

    async def _signaling(self, request: web.Request, source: str) -> web.StreamResponse:
        limit = self.limits.max_message_bytes
        ws = SignalingSocket(
            heartbeat=20.0,
            max_message_bytes=limit,
            too_large=lambda: encode(
                error_message("too_large", f"message over the {limit}-byte limit")
            ),
            on_refused=self._count_refused,
        )
        try:
            await ws.prepare(request)
        except ConnectionResetError:  # the client left during the upgrade
            return ws
        self._sockets.add(ws)

        async def send(message: dict[str, object]) -> None:
            if not ws.closed:
                await ws.send_str(encode(message))

        session = self.open_session(send, ws)
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    try:
                        message = decode_client_message(msg.data)
                    except ProtocolError as exc:
                        self.counters.bad_messages += 1
                        await send(error_message(exc.code, exc.message, exc.request_id))
                        continue
                    except Exception as exc:  # a decoder bug must not drop the participant
                        log.exception("decoding a client message failed")
                        self.counters.bad_messages += 1
                        await send(error_message("bad_message", f"unreadable message: {exc}"))
                        continue
                    if (
                        isinstance(message, Join)
                        and self.limits.join_rate > 0
                        and not self._join_buckets.allow(source, time.monotonic())
                    ):
                        self.counters.joins_rate_limited += 1
                        await send(
                            error_message("rate_limited", "too many joins; retry later", message.id)
                        )
                        continue
                    await session.handle(message)
                    if session._closed:
                        break
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._sockets.discard(ws)
            await session.close()
            with contextlib.suppress(Exception):
                await ws.close()
        return ws

    def open_session(self, send: SendFn, ws: web.WebSocketResponse) -> Any:
        """The session behind one signaling connection (a worker-process node forwards it)."""

        async def disconnect() -> None:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"media connection failed")

        return ParticipantSession(self, send, disconnect)

    def _close_stalled_messages(self, now: float) -> None:
        timeout = self.limits.ws_message_timeout
        for ws in list(self._sockets):
            if ws.frame_check.stalled(now, timeout) and not ws.closed:
                self.counters.ws_message_timeouts += 1
                self._sockets.discard(ws)
                task = asyncio.ensure_future(
                    ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"message_timeout")
                )
                self._background.add(task)
                task.add_done_callback(self._background.discard)

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
                self._close_stalled_messages(last_cpu)
                self._join_buckets.expire(last_cpu)
                totals = self.node.totals()
                self.node.admission.update(
                    self._process.cpu_percent(None) / 100.0,
                    float(totals["egress_packet_rate"]),
                    int(totals["consumers"]),
                )

    async def start(self) -> None:
        """Start serving on the configured host and port."""
        # Bodies are never read by our routes; an unread one is discarded for at most
        # lingering_time before the connection closes.
        self._runner = web.AppRunner(
            self.app(), access_log=None, lingering_time=self.limits.http_header_timeout
        )
        await self._runner.setup()
        http = self._runner.server
        assert http is not None

        def head_timed_out() -> None:
            self.counters.http_header_timeouts += 1

        timeout = self.limits.http_header_timeout
        self._http_server = await asyncio.get_running_loop().create_server(
            lambda: HeadDeadline(http(), timeout, head_timed_out),
            self.config.host,
            self.config.port,
            reuse_address=True,
        )
        await self.open_ice_ports()
        self._ticker = asyncio.ensure_future(self._tick())
        if self.config.relay_port is not None:
            self.relay = RelayEndpoint(
                self.identity,
                self.relay_lookup,
                authorize=lambda key: self.relay_authorizer(key),
                config=RelayConfig(host=self.config.relay_host, port=self.config.relay_port),
            )
            self.relay.may_subscribe = self._relay_may_subscribe
            await self.relay.start()
        if self.config.port == 0:
            self.config.port = self._http_server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close every session and stop serving."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self._drain_task is not None:
            self._drain_task.cancel()
        for room in self.rooms:
            for member in room.members:
                await member.close()
        for ws in list(self._sockets):  # clients learn at once that this node is gone
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"node stopping")
        if self.relay is not None:
            await self.relay.close()
        if self._http_server is not None:
            self._http_server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.close_ice_ports()

    async def open_ice_ports(self) -> None:
        """Bind the node's shared ICE ports (``ice_port``; nothing if it is None).
        Raises OSError if the port is taken."""
        if self.config.ice_port is not None and self.ice_ports is None:
            self.ice_ports = await rtc.open_shared_ice_ports(
                self.config.ice_addresses, self.config.ice_port
            )

    def close_ice_ports(self) -> None:
        """Close the shared ICE ports (after the sessions on them)."""
        if self.ice_ports is not None:
            self.ice_ports.close()
            self.ice_ports = None

    @property
    def url(self) -> str:
        """Base HTTP URL of this node, as announced to clients and other nodes."""
        if self.config.public_url:
            return self.config.public_url
        return f"http://{self.config.host}:{self.config.port}"


async def _one_request_per_connection(request: web.Request, response: web.StreamResponse) -> None:
    # One request per HTTP connection: the head deadline then covers every request.
    if not isinstance(response, web.WebSocketResponse):
        response.force_close()


async def _no_remote_participants(room: str) -> list[dict[str, object]]:
    return []


async def _nothing() -> None:
    return None


__all__ = ["NodeConfig", "NodeServer", "TokenError"]
