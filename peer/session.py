"""One participant's signaling session: the asyncio edge between a WebSocket,
two aiortc peer connections (publish: client offers; subscribe: server offers,
so renegotiation never glares) and the SFU engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiortc import RTCPeerConnection, RTCRtpSender, RTCRtpTransceiver, RTCSessionDescription
from aiortc.exceptions import InvalidStateError
from aiortc.rtcrtpparameters import RTCRtpCodecCapability

from peer import aiortc_adapter as rtc
from peer.engine import CodecInfo, Consumer, Producer, Router, SfuError
from peer.placement import Placement, Reason
from peer.room import Room, Rooms
from peer.signaling import (
    Answer,
    ClientMessage,
    GetStats,
    Join,
    Leave,
    PauseConsumer,
    Ping,
    ProtocolError,
    Publish,
    ResumeConsumer,
    Subscribe,
    Unpublish,
    Unsubscribe,
)
from peer.tokens import Grant, TokenError, TokenVerifier

log = logging.getLogger("cascade.session")

MAX_REDIRECTS = 2
# Seconds the producers of a participant that moved to another node stay after it left.
MIGRATED_LINGER = 5.0
SendFn = Callable[[dict[str, object]], Awaitable[None]]


class SessionHost(Protocol):
    """What a session needs of its node (``peer.server.NodeServer`` provides it)."""

    tokens: TokenVerifier
    rooms: Rooms
    node_key: str
    keyframe_request_delay: float
    answer_timeout: float
    join_outcomes: Counter[str]
    # A room's participants and not-yet-relayed producers on other nodes (overlay).
    remote_participants: Callable[[str], Awaitable[list[dict[str, object]]]]
    remote_producers: Callable[[str], list[dict[str, object]]]
    pull_producer: Callable[[str, str], Awaitable[bool]] | None
    # Other nodes a participant of a room may fail over to (overlay), and whether this
    # node is draining (it takes nobody new).
    fallbacks: Callable[[str], list[dict[str, object]]]
    draining: bool
    # The node's shared ICE ports (None: a socket per transport).
    ice_ports: rtc.SharedIcePorts | None

    async def place(self, room: str, region: str | None) -> Placement | None:
        """Where a new participant of ``room`` should go (None outside an overlay)."""


@dataclass
class _Subscription:
    consumer: Consumer
    transceiver: RTCRtpTransceiver
    track: rtc.SilentTrack
    attached: bool = False


@dataclass
class _Negotiation:
    busy: bool = False
    again: bool = False
    pending: list[_Subscription] = field(default_factory=list)
    answered: asyncio.Event = field(default_factory=asyncio.Event)


def _fits_here(placement: Placement | None, node_id: str) -> bool:
    """Whether this node is a candidate with headroom. A join another node redirected here
    stays here while that holds: the two nodes' views of each other's load differ by up to
    a directory refresh, and a second hop would often lead straight back."""
    return placement is not None and any(
        c.node_id == node_id and c.reason is not Reason.LAST_RESORT for c in placement.candidates
    )


async def join_redirect(server: SessionHost, message: Join) -> dict[str, object] | None:
    """The ``redirect`` reply when placement sends this join to another node, else None
    (the join stays here). Raises ``draining`` when this node takes nobody new."""
    if message.hops >= MAX_REDIRECTS and not server.draining:
        return None
    placement = await server.place(message.room, message.region)
    best = placement.best if placement is not None else None
    if server.draining and (best is None or best.node_id == server.node_key):
        server.join_outcomes["draining"] += 1
        raise ProtocolError("draining", "this node is draining and takes nobody new")
    if (
        best is None
        or best.node_id == server.node_key
        or (message.hops > 0 and _fits_here(placement, server.node_key))
    ):
        return None
    server.join_outcomes["redirected"] += 1
    return {
        "type": "redirect",
        "id": message.id,
        "url": best.signaling_url,
        "node_id": best.node_id,
        "region": best.region,
        "reason": best.reason.value,
    }


class ParticipantSession:
    """Signaling state of one connected participant."""

    def __init__(
        self,
        server: SessionHost,
        send: SendFn,
        disconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.server = server
        self._send = send
        # Closes the signaling socket: a session that ends on its own (media failed) tells
        # its client so, which then rejoins.
        self._disconnect = disconnect
        self.participant_id = f"pa-{uuid.uuid4().hex[:12]}"
        self.name: str | None = None
        self.grant: Grant | None = None
        self.router: Router | None = None
        self.room: Room | None = None
        self.auto_subscribe = True
        # The participant id this client had before it moved here, and the sources it
        # publishes: never offered back to it.
        self.resumes: str | None = None
        self.region: str | None = None
        self._sources: set[str] = set()
        # Told to move (drain): its producers close as "migrating", not "closed".
        self.moving = False
        self.publish_pc: RTCPeerConnection | None = None
        self.subscribe_pc: RTCPeerConnection | None = None
        self.producers: dict[str, Producer] = {}
        self._ptx: dict[str, RTCRtpTransceiver] = {}
        self.subscriptions: dict[str, _Subscription] = {}
        self._negotiation = _Negotiation()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._outbox: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    # -- plumbing -------------------------------------------------------------

    def post(self, message: dict[str, object]) -> None:
        """Queue a message to this participant; messages leave in posting order."""
        if self._closed:
            return
        if self.resumes is not None and self._about_former_self(message):
            return
        self._outbox.put_nowait(message)
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write())

    async def send(self, message: dict[str, object]) -> None:
        """Queue a message (async form of :meth:`post`)."""
        self.post(message)

    async def _write(self) -> None:
        while True:
            message = await self._outbox.get()
            try:
                await self._send(message)
            except Exception:
                log.debug("dropping message to closed socket")

    async def flush(self) -> None:
        """Wait until queued messages were written."""
        while not self._outbox.empty() and self._writer is not None and not self._writer.done():
            await asyncio.sleep(0.005)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        pc = self.subscribe_pc
        if isinstance(exc, InvalidStateError) and (
            self._closed or pc is None or pc.connectionState == "closed"
        ):
            # A renegotiation the closing of the participant's connection overtook.
            log.debug("session task ended with its connection: %r", exc)
            return
        log.warning("session task failed: %r", exc)

    async def handle(self, message: ClientMessage) -> None:
        """Dispatch one validated client message; errors become ``error`` replies."""
        request_id = message.id
        try:
            if isinstance(message, Ping):
                await self.send({"type": "pong", "id": request_id, "time": time.time()})
            elif isinstance(message, Join):
                await self._join(message)
            else:
                if self.router is None or self.grant is None:
                    raise ProtocolError("not_joined", "join a room first")
                if isinstance(message, Publish):
                    await self._publish(message)
                elif isinstance(message, Answer):
                    await self._answer(message)
                elif isinstance(message, Subscribe):
                    await self._subscribe_request(message)
                elif isinstance(message, Unsubscribe):
                    sub = self._own_subscription(message.consumer_id)
                    sub.consumer.close()
                    await self.send({"type": "unsubscribed", "id": request_id})
                elif isinstance(message, PauseConsumer):
                    self._own_subscription(message.consumer_id).consumer.pause()
                    await self.send({"type": "paused", "id": request_id})
                elif isinstance(message, ResumeConsumer):
                    self._own_subscription(message.consumer_id).consumer.resume()
                    await self.send({"type": "resumed", "id": request_id})
                elif isinstance(message, Unpublish):
                    producer = self.producers.get(message.producer_id)
                    if producer is None:
                        raise ProtocolError(
                            "unknown_producer", f"you have no producer {message.producer_id!r}"
                        )
                    producer.close()
                    await self.send({"type": "unpublished", "id": request_id})
                elif isinstance(message, GetStats):
                    await self.send({"type": "stats", "id": request_id, **self.stats()})
                elif isinstance(message, Leave):
                    await self.send({"type": "left", "id": request_id})
                    await self.close()
        except (ProtocolError, SfuError, TokenError) as exc:
            await self.send(
                {"type": "error", "code": exc.code, "message": exc.message, "id": request_id}
            )
        except Exception as exc:
            log.exception("internal error handling %s", type(message).__name__)
            await self.send(
                {"type": "error", "code": "internal", "message": str(exc), "id": request_id}
            )

    def _own_subscription(self, consumer_id: str) -> _Subscription:
        sub = self.subscriptions.get(consumer_id)
        if sub is None:
            raise ProtocolError("unknown_consumer", f"you have no consumer {consumer_id!r}")
        return sub

    # -- join / leave -----------------------------------------------------------

    async def _join(self, message: Join) -> None:
        if self.router is not None:
            raise ProtocolError("already_joined", "this connection already joined a room")
        try:
            grant = self.server.tokens.verify(message.token, message.room)
        except TokenError as exc:
            self.server.join_outcomes[exc.code] += 1
            raise
        redirect = await join_redirect(self.server, message)
        if redirect is not None:
            await self.send(redirect)
            return
        self.server.join_outcomes["ok"] += 1
        self.grant = grant
        self.name = message.name or self.grant.identity
        self.auto_subscribe = message.auto_subscribe
        self.resumes = message.resumes
        self.region = message.region
        remote = await self.server.remote_participants(message.room)
        room, others = self.server.rooms.join(message.room, self)
        self.room = room
        self.router = router = room.router
        await self.send(
            {
                "type": "joined",
                "id": message.id,
                "room": message.room,
                "participant_id": self.participant_id,
                "identity": self.grant.identity,
                "can_publish": self.grant.can_publish,
                "can_subscribe": self.grant.can_subscribe,
                "participants": [
                    p
                    for p in [s.describe() for s in others] + remote
                    if p.get("participant_id") != self.resumes
                ],
                "producers": [
                    p.describe() for p in router.producers.values() if not self._is_mine(p)
                ]
                + self.server.remote_producers(message.room),
                "fallbacks": self.server.fallbacks(message.room),
            }
        )
        if self.auto_subscribe and self.grant.can_subscribe:
            for producer in list(router.producers.values()):
                self.auto_subscribe_to(producer)

    @property
    def subscribes_automatically(self) -> bool:
        """Whether this participant consumes every producer of its room as it appears."""
        return self.auto_subscribe and self.grant is not None and self.grant.can_subscribe

    def describe(self) -> dict[str, object]:
        """Public description of this participant."""
        described: dict[str, object] = {"participant_id": self.participant_id, "name": self.name}
        if self.resumes:
            described["resumes"] = self.resumes
        return described

    def _about_former_self(self, message: dict[str, object]) -> bool:
        """A join or leave of this participant's own incarnation before it moved."""
        if message.get("type") == "participant_left":
            return message.get("participant_id") == self.resumes
        if message.get("type") == "participant_joined":
            joined = message.get("participant")
            return isinstance(joined, dict) and joined.get("participant_id") == self.resumes
        return False

    def _is_mine(self, producer: Producer) -> bool:
        """A producer of this participant, here or from before it moved."""
        return (
            producer.participant_id in (self.participant_id, self.resumes)
            or producer.source in self._sources
        )

    def migrate(self, target: Mapping[str, object], reason: str = "drain") -> None:
        """Tell the participant to move to ``target`` (``url``, ``node_id``, ``region``)."""
        self.moving = True
        self.post({"type": "migrate", "reason": reason, **target})
        if self.room is not None:  # stop listing its producers in the directory now
            self.server.rooms.changed(self.room.name)

    async def close(self) -> None:
        """Leave the room: close producers, consumers and peer connections."""
        if self._closed:
            return
        for producer in list(self.producers.values()):
            if self.moving:
                # Kept (without media) a while after a move: relays on other nodes switch
                # their consumers to the republished track instead of seeing it end.
                producer.close_reason = "migrating"
                asyncio.get_running_loop().call_later(MIGRATED_LINGER, producer.close)
            else:
                producer.close()
        for sub in list(self.subscriptions.values()):
            sub.consumer.close()
        await self.flush()
        self._closed = True
        if self.room is not None:
            self.server.rooms.leave(self.room.name, self, "migrated" if self.moving else "left")
        for task in list(self._tasks):
            task.cancel()
        if self._writer is not None:
            self._writer.cancel()
        for pc in (self.publish_pc, self.subscribe_pc):
            if pc is not None:
                await rtc.close_peer_connection(pc)

    # -- publishing -------------------------------------------------------------

    async def _publish(self, message: Publish) -> None:
        assert self.router is not None and self.grant is not None
        if not self.grant.can_publish:
            raise ProtocolError("forbidden", "token does not grant publish")
        claimed = dict(message.sources or {})
        prefix = f"{self.grant.identity}/"
        for source in claimed.values():
            if not source.startswith(prefix):
                raise ProtocolError(
                    "bad_request", f"a source must start with your identity and '/' ({prefix})"
                )
        fresh = self.publish_pc is None
        if self.publish_pc is None:
            self.publish_pc = RTCPeerConnection(rtc.rtc_configuration())
            self._watch_connection(self.publish_pc, "publish")
        pc = self.publish_pc
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=message.sdp, type="offer"))
            answer = await pc.createAnswer()
            await rtc.set_local_description(pc, answer, self.server.ice_ports)
        except Exception as exc:
            if fresh:
                await self._drop_publish_pc(pc)
            raise ProtocolError("bad_sdp", f"offer rejected: {exc}") from None
        known = {t.mid for t in self._ptx.values()}
        created = []
        for transceiver in pc.getTransceivers():
            if transceiver.mid in known or transceiver.currentDirection not in (
                "recvonly",
                "sendrecv",
            ):
                continue
            codec = rtc.negotiated_codec(transceiver)
            if codec is None:
                continue
            producer = self._create_producer(transceiver, codec, claimed.get(str(transceiver.mid)))
            created.append({**producer.describe(), "mid": transceiver.mid})
        if not created and fresh:
            # A first offer with nothing we can receive (garbage, or no sendonly media)
            # is refused rather than answered with zero producers.
            await self._drop_publish_pc(pc)
            raise ProtocolError("bad_sdp", "offer has no media section the node can receive")
        await self.send(
            {
                "type": "published",
                "id": message.id,
                "sdp": pc.localDescription.sdp,
                "producers": created,
            }
        )
        assert self.room is not None
        for desc in created:
            producer = self.router.producers[str(desc["producer_id"])]
            self.room.announce_producer(producer)

    async def _drop_publish_pc(self, pc: RTCPeerConnection) -> None:
        if self.publish_pc is pc:
            self.publish_pc = None
        await rtc.close_peer_connection(pc)

    def _create_producer(
        self, transceiver: RTCRtpTransceiver, codec: Any, source: str | None
    ) -> Producer:
        assert self.router is not None and self.grant is not None
        producer_id = f"pr-{uuid.uuid4().hex[:12]}"
        info = CodecInfo(
            mime_type=codec.mimeType,
            clock_rate=codec.clockRate,
            channels=codec.channels,
            parameters=dict(codec.parameters),
        )
        producer = Producer(
            self.router,
            self.participant_id,
            transceiver.kind,
            info,
            producer_id=producer_id,
            source=source or f"{self.grant.identity}/{producer_id}",
            keyframe_request_delay=self.server.keyframe_request_delay,
        )
        self._sources.add(producer.source)
        receiver = transceiver.receiver
        rtc.tap_receiver(receiver, producer.receive)

        def send_pli() -> None:
            ssrc = rtc.media_ssrc(receiver)
            if ssrc is not None:
                rtc.send_pli(receiver, ssrc)

        producer.send_keyframe_request = send_pli
        producer.receiver = receiver
        self.router.add_producer(producer)
        self.producers[producer.id] = producer
        self._ptx[producer.id] = transceiver

        def closed(p: Producer) -> None:
            self.producers.pop(p.id, None)
            self._ptx.pop(p.id, None)

        producer.on_close(closed)
        return producer

    # -- subscribing ------------------------------------------------------------

    def auto_subscribe_to(self, producer: Producer) -> None:
        """Consume ``producer`` if this participant auto-subscribes and may subscribe."""
        if not self.auto_subscribe or self.grant is None or not self.grant.can_subscribe:
            return
        if self._is_mine(producer) or self._closed:
            return
        if any(
            sub.consumer.producer.source == producer.source for sub in self.subscriptions.values()
        ):
            return  # already consumed, or about to be (a consumer switches over to it)
        try:
            self._subscribe(producer.id, paused=False)
        except SfuError as exc:
            self.post(
                {
                    "type": "error",
                    "code": exc.code,
                    "message": exc.message,
                    "producer_id": producer.id,
                }
            )

    async def _subscribe_request(self, message: Subscribe) -> None:
        assert self.grant is not None
        if not self.grant.can_subscribe:
            raise ProtocolError("forbidden", "token does not grant subscribe")
        for sub in self.subscriptions.values():
            if sub.consumer.producer.id == message.producer_id:
                raise ProtocolError("already_subscribed", "already consuming this producer")
        assert self.router is not None
        pull = self.server.pull_producer
        if message.producer_id not in self.router.producers and pull is not None:
            # A producer of another node not relayed here yet: relay it now.
            try:
                await pull(self.router.room, message.producer_id)
            except Exception as exc:
                raise SfuError(
                    "unknown_producer", f"cannot relay {message.producer_id!r}: {exc}"
                ) from None
        consumer = self._subscribe(message.producer_id, paused=message.paused)
        await self.send({"type": "subscribed", "id": message.id, "consumer_id": consumer.id})

    def _subscribe(self, producer_id: str, paused: bool) -> Consumer:
        assert self.router is not None
        producer = self.router.producers.get(producer_id)
        if producer is not None and self._is_mine(producer):
            raise ProtocolError("bad_request", "cannot consume your own producer")
        if self.subscribe_pc is not None and self.subscribe_pc.connectionState == "closed":
            raise SfuError("media_closed", "your media connection is closed: join again")
        consumer = self.router.create_consumer(producer_id, self.participant_id, paused=paused)
        if self.subscribe_pc is None:
            self.subscribe_pc = RTCPeerConnection(rtc.rtc_configuration())
            self._watch_connection(self.subscribe_pc, "subscribe")
        track = rtc.SilentTrack(consumer.kind)
        try:
            transceiver = self.subscribe_pc.addTransceiver(track, direction="sendonly")
        except InvalidStateError:  # its transport closed a moment ago (the client closed it)
            consumer.close()
            raise SfuError("media_closed", "your media connection is closed: join again") from None
        transceiver.setCodecPreferences(_codec_preferences(consumer.producer.codec))
        sub = _Subscription(consumer, transceiver, track)
        rtc.hook_sender(
            transceiver.sender,
            on_nack=consumer.handle_nack,
            on_keyframe_request=consumer.handle_keyframe_request,
            on_receiver_report=consumer.handle_receiver_report,
            sender_report=consumer.sender_report,
        )
        self.subscriptions[consumer.id] = sub
        consumer.on_close(self._consumer_closed)
        self._negotiation.pending.append(sub)
        self._spawn(self._renegotiate())
        return consumer

    def _consumer_closed(self, consumer: Consumer) -> None:
        sub = self.subscriptions.pop(consumer.id, None)
        if sub is None or self._closed:
            return
        sub.track.stop()
        if sub in self._negotiation.pending:
            self._negotiation.pending.remove(sub)
        sub.transceiver.direction = "inactive"
        self.post(
            {
                "type": "consumer_closed",
                "consumer_id": consumer.id,
                "producer_id": consumer.producer.id,
                "mid": sub.transceiver.mid,
                "reason": consumer.producer.close_reason
                if consumer.producer.closed
                else "unsubscribed",
            }
        )
        self._spawn(self._renegotiate())

    async def _renegotiate(self) -> None:
        neg = self._negotiation
        if neg.busy:
            neg.again = True
            return
        pc = self.subscribe_pc
        if pc is None or self._closed:
            return
        neg.busy = True
        try:
            while True:
                neg.again = False
                batch = list(neg.pending)
                neg.pending.clear()
                neg.answered.clear()
                offer = await pc.createOffer()
                await rtc.set_local_description(pc, offer, self.server.ice_ports)
                await self.send(
                    {
                        "type": "offer",
                        "sdp": pc.localDescription.sdp,
                        "consumers": [
                            {**s.consumer.describe(), "mid": s.transceiver.mid}
                            for s in batch
                            if not s.consumer.closed
                        ],
                    }
                )
                try:
                    await asyncio.wait_for(neg.answered.wait(), self.server.answer_timeout)
                except TimeoutError:
                    log.warning("%s did not answer the subscribe offer", self.participant_id)
                    await self.send(
                        {"type": "error", "code": "answer_timeout", "message": "no answer"}
                    )
                    for s in batch:
                        s.consumer.close()
                    return
                for s in batch:
                    if not s.consumer.closed:
                        self._spawn(self._attach(s))
                if not neg.again and not neg.pending:
                    return
        finally:
            neg.busy = False

    async def _attach(self, sub: _Subscription) -> None:
        sender = sub.transceiver.sender
        dtls = sender.transport
        if not await _dtls_connected(dtls, 15.0):
            sub.consumer.close()
            return
        if sub.consumer.closed:
            return
        params = rtc.outbound_params(sub.transceiver)
        sub.consumer.attach(params, rtc.sender_sink(sender))
        sub.attached = True

    async def _answer(self, message: Answer) -> None:
        pc = self.subscribe_pc
        if pc is None or pc.signalingState != "have-local-offer":
            raise ProtocolError("unexpected_answer", "no subscribe offer is outstanding")
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=message.sdp, type="answer"))
        except Exception as exc:
            raise ProtocolError("bad_sdp", f"answer rejected: {exc}") from None
        self._negotiation.answered.set()

    # -- connection state and stats --------------------------------------------

    def _watch_connection(self, pc: RTCPeerConnection, role: str) -> None:
        # A connection that fails, or that the client closes (aiortc closes it once the
        # client's DTLS close arrives) while the session goes on, ends the session: it can
        # carry no more media, and the client rejoins (or is leaving anyway).
        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            mine = pc in (self.publish_pc, self.subscribe_pc)
            closed_by_client = state == "closed" and not self._closed and mine
            if state == "failed" or closed_by_client:
                log.info("%s %s connection %s", self.participant_id, role, state)
                await self.close()
                if self._disconnect is not None:
                    with contextlib.suppress(Exception):
                        await self._disconnect()

    def stats(self) -> dict[str, object]:
        """This participant's producer and consumer stats."""
        producers: dict[str, object] = {}
        for pid, producer in self.producers.items():
            receiver = getattr(producer, "receiver", None)
            if receiver is not None:
                _, lost, jitter = rtc.receiver_loss(receiver)
                producer.stats.packets_lost = lost
                producer.stats.jitter = jitter / producer.codec.clock_rate
            producers[pid] = {"kind": producer.kind, **producer.stats.as_dict()}
        consumers = {
            cid: {
                "kind": s.consumer.kind,
                "producer_id": s.consumer.producer.id,
                **s.consumer.stats.as_dict(),
            }
            for cid, s in self.subscriptions.items()
        }
        return {"producers": producers, "consumers": consumers}

    def codec_instances(self) -> int:
        """Decoders and encoders aiortc created on this node for this participant (always 0)."""
        count = sum(rtc.decoder_running(t.receiver) for t in self._ptx.values())
        if self.subscribe_pc is not None:
            count += sum(rtc.encoder_created(t.sender) for t in self.subscribe_pc.getTransceivers())
        return count


async def _dtls_connected(dtls: Any, timeout: float) -> bool:
    """Wait (on its state changes, not by polling) until ``dtls`` is connected; False if it
    fails, closes or takes longer than ``timeout`` seconds."""
    if dtls.state == "connected":
        return True
    changed = asyncio.Event()
    dtls.on("statechange", changed.set)
    try:
        deadline = time.monotonic() + timeout
        while dtls.state != "connected":
            remaining = deadline - time.monotonic()
            if dtls.state in ("failed", "closed") or remaining <= 0:
                return False
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return True
    finally:
        dtls.remove_listener("statechange", changed.set)


def _codec_preferences(codec: CodecInfo) -> list[RTCRtpCodecCapability]:
    caps = RTCRtpSender.getCapabilities(codec.kind).codecs
    chosen = [c for c in caps if c.mimeType.lower() == codec.mime_type.lower()]
    if codec.name.upper() == "H264":
        plid = str(codec.parameters.get("profile-level-id", ""))[:2]
        pm = str(codec.parameters.get("packetization-mode", "0"))
        same = [
            c
            for c in chosen
            if str(c.parameters.get("packetization-mode", "0")) == pm
            and str(c.parameters.get("profile-level-id", ""))[:2] == plid
        ]
        chosen = same or chosen
    if not chosen:
        raise SfuError("unsupported_codec", f"cannot forward {codec.mime_type}")
    if codec.kind == "video":
        chosen += [c for c in caps if c.mimeType.lower() == "video/rtx"][:1]
    return chosen
