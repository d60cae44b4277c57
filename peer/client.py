"""Python SDK: a Cascade participant built on aiortc.

async with CascadeClient("http://127.0.0.1:8080") as client:
    await client.join("room", mint_token("room", "alice"))
    await client.publish([PatternVideoTrack(), ToneAudioTrack()])
    ...  # client.tracks fills as the node offers consumers
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.exceptions import InvalidStateError
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from peer import aiortc_adapter as rtc
from peer.failover import Backoff
from peer.media import TrackTee
from peer.tokens import issue_token, load_signing_key

log = logging.getLogger("cascade.client")


def mint_token(
    room: str,
    identity: str,
    *,
    secret: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
    ttl: float = 3600,
    publish: bool = True,
    subscribe: bool = True,
) -> str:
    """An access token for scripts and tests: signed with ``secret`` (HS256), the Ed25519
    application key in ``key_file`` (EdDSA), or else ``$CASCADE_API_SECRET``."""
    if key_file is not None:
        with open(key_file, "rb") as f:
            key: Any = load_signing_key(f.read())
    else:
        key = secret if secret is not None else os.environ.get("CASCADE_API_SECRET")
        if not key:
            raise ValueError("mint_token needs secret=, key_file= or $CASCADE_API_SECRET")
    return issue_token(key, room, identity, ttl=ttl, publish=publish, subscribe=subscribe)


class CascadeError(Exception):
    """An ``error`` reply from the node."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class SubscribedTrack:
    """A remote track this client receives, with what it decoded."""

    consumer_id: str
    producer_id: str
    participant_id: str
    kind: str
    mid: str | None
    track: MediaStreamTrack | None = None
    frames_decoded: int = 0
    width: int = 0
    height: int = 0
    first_frame_at: float | None = None
    subscribed_at: float = 0.0
    ended: bool = False
    decode_errors: Any = None  # rtc.DecodeErrorCounter, set when the track arrives
    receiver: Any = None
    first_frame: asyncio.Event = field(default_factory=asyncio.Event)
    source: str = ""
    """The published track this is (kept when its publisher or this client moves)."""
    held: bool = False
    """Its media stopped because a node moved or died; a replacement is on its way."""
    rebinds: int = 0
    """Times it continued on a new consumer (after a move)."""
    last_frame_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    """Seconds between the last frame before each move and the first one after."""
    _gap_open: bool = False
    # The media track of a new consumer of this track: it takes over at its first frame.
    _next: tuple[Any, Any, Any] | None = None

    def stats(self) -> dict[str, object]:
        """Frames decoded, resolution, packets and loss of this track."""
        received, lost, _ = rtc.receiver_loss(self.receiver) if self.receiver else (0, 0, 0.0)
        return {
            "kind": self.kind,
            "frames_decoded": self.frames_decoded,
            "width": self.width,
            "height": self.height,
            "packets_received": received,
            "packets_lost": lost,
            "decode_errors": self.decode_errors.count if self.decode_errors else 0,
            "ended": self.ended,
            "rebinds": self.rebinds,
            "gaps": [round(g, 3) for g in self.gaps],
        }


class CascadeClient:
    """One participant connected to a Cascade node over WebSocket signaling."""

    def __init__(
        self,
        url: str,
        *,
        ice_addresses: list[str] | None = None,
        decode: bool = True,
        count_only: bool = False,
        request_timeout: float = 15.0,
        reconnect: bool = True,
        hold: float = 15.0,
        backoff: Backoff | None = None,
        migrate_overlap: float = 2.0,
    ) -> None:
        self.url = url.rstrip("/")
        if ice_addresses is not None:
            rtc.set_ice_addresses(ice_addresses)
        self.decode = decode and not count_only
        # count_only: media is counted (packets, frames, gaps) but never parsed or decoded.
        self.counter: rtc.RtpCounter | None = rtc.RtpCounter() if count_only else None
        self.request_timeout = request_timeout
        self.participant_id: str | None = None
        self.room_state: dict[str, Any] = {}
        # The redirect replies followed by the last join (placement's choices).
        self.redirects: list[dict[str, Any]] = []
        self.tracks: dict[str, SubscribedTrack] = {}
        self.events: list[dict[str, Any]] = []
        self._event_added = asyncio.Event()
        self.producers: list[dict[str, Any]] = []
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._publish_pc: RTCPeerConnection | None = None
        self._subscribe_pc: RTCPeerConnection | None = None
        self._by_mid: dict[str, SubscribedTrack] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sub_lock = asyncio.Lock()
        self._closing = False
        # Moving between nodes: follow ``migrate`` and fail over when the node dies.
        self.reconnect = reconnect
        self.hold = hold
        self.backoff = backoff or Backoff()
        # After a migrate, the old node keeps getting our media this long once the new
        # node has it, so that subscribers on other nodes switch without a gap.
        self.migrate_overlap = migrate_overlap
        self.fallbacks: list[dict[str, Any]] = []
        self.moves: list[dict[str, Any]] = []
        self._join_message: dict[str, Any] | None = None
        self._published: list[tuple[MediaStreamTrack, str | None, str]] = []
        self._tees: dict[MediaStreamTrack, TrackTee] = {}
        self._moving = False
        self._left = False
        self._rng = random.Random()

    async def __aenter__(self) -> CascadeClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection -------------------------------------------------------------

    async def connect(self) -> None:
        """Open the signaling WebSocket."""
        ws_url = self.url.replace("http://", "ws://").replace("https://", "wss://") + "/ws"
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(ws_url, heartbeat=20.0)
        self._reader = asyncio.ensure_future(self._read())

    async def send_raw(self, data: str) -> None:
        """Send raw text on the signaling socket (tests use it for malformed input)."""
        assert self._ws is not None
        await self._ws.send_str(data)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request and wait for its reply; raise :class:`CascadeError` on error."""
        assert self._ws is not None, "connect() first"
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        await self._ws.send_str(json.dumps({**message, "id": request_id}))
        try:
            reply = await asyncio.wait_for(future, self.request_timeout)
        finally:
            self._pending.pop(request_id, None)
        if reply.get("type") == "error":
            raise CascadeError(str(reply.get("code")), str(reply.get("message")))
        return reply

    def on_event(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener`` with every server event (messages without a request id)."""
        self._listeners.append(listener)

    async def _read(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                if ws is not self._ws:
                    continue  # a node this client is moving away from
                message = json.loads(msg.data)
                request_id = message.get("id")
                future = self._pending.get(request_id) if isinstance(request_id, int) else None
                if future is not None and not future.done():
                    future.set_result(message)
                    continue
                await self._on_event(message)
        except Exception as exc:
            log.debug("signaling reader stopped: %r", exc)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("signaling closed"))
            if self._reader is asyncio.current_task():
                self._connection_lost("signaling closed")

    async def _on_event(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if self._closing:
            return
        if kind == "offer":
            self._spawn(self._handle_offer(message, self._ws))
        elif kind == "consumer_closed":
            track = self.tracks.get(str(message.get("consumer_id")))
            if track is not None:
                if message.get("reason") in ("migrating", "origin_lost"):
                    self._hold(track)
                else:
                    track.ended = True
        elif kind == "consumer_switched":
            track = self.tracks.get(str(message.get("consumer_id")))
            if track is not None:  # same stream, now fed by the track's new incarnation
                track.producer_id = str(message.get("producer_id"))
                track.rebinds += 1
                track._gap_open = True
        elif kind == "migrate" and self.reconnect:
            self._spawn(self._move(str(message.get("url", "")), "migrate"))
        elif kind == "reconnect" and self.reconnect:  # the node's worker died: rejoin
            self._spawn(self._move(str(message.get("url", "")), "reconnect"))
        self.events.append(message)
        self._event_added.set()
        for listener in self._listeners:
            listener(message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None or self._closing:
            return
        exc = task.exception()
        pc = self._subscribe_pc
        if isinstance(exc, InvalidStateError) and (pc is None or pc.signalingState == "closed"):
            # an offer the node sent as our connection closed (the node went away)
            log.debug("client task ended with its connection: %r", exc)
            return
        log.warning("client task failed: %r", exc)

    # -- room -------------------------------------------------------------------

    async def join(
        self,
        room: str,
        token: str,
        *,
        name: str | None = None,
        auto_subscribe: bool = True,
        region: str | None = None,
        follow_placement: bool = True,
    ) -> dict[str, Any]:
        """Join a room; returns the room state (participants and producers).

        When the node answers with a ``redirect`` (placement chose another node), the
        client reconnects there and joins with the same token, at most twice; a
        redirect back to a node already tried raises ``CascadeError("redirect_loop")``.
        ``follow_placement=False`` joins this very node (the application placed itself,
        e.g. with ``GET /place``); a draining node still redirects.

        Later, the client follows the node's ``migrate`` events and fails over to the
        ``fallbacks`` of the ``joined`` reply when its node dies (``reconnect=True``).
        """
        message: dict[str, Any] = {
            "type": "join",
            "room": room,
            "token": token,
            "auto_subscribe": auto_subscribe,
        }
        if name:
            message["name"] = name
        if region:
            message["region"] = region
        self._join_message = dict(message)
        self._left = False
        return await self._join(message, hops=0 if follow_placement else 2)

    async def _join(self, message: dict[str, Any], hops: int) -> dict[str, Any]:
        tried = {self.url}
        self.redirects = []
        while True:
            reply = await self.request({**message, "hops": hops + len(self.redirects)})
            if reply.get("type") != "redirect":
                break
            url = str(reply.get("url", "")).rstrip("/")
            if url in tried or len(self.redirects) >= 2:
                raise CascadeError("redirect_loop", f"redirected again to {url}")
            tried.add(url)
            self.redirects.append(reply)
            await self._reconnect(url)
        self.participant_id = reply["participant_id"]
        self.room_state = reply
        self.fallbacks = list(reply.get("fallbacks") or [])
        return reply

    async def _reconnect(self, url: str) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader  # nothing of the old connection keeps running
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        self.url = url
        await self.connect()

    async def publish(
        self, tracks: list[MediaStreamTrack], *, video_codec: str | None = None
    ) -> list[dict[str, Any]]:
        """Publish tracks (one publish negotiation); returns the new producers.

        ``video_codec`` (e.g. ``"video/H264"``) restricts what video is offered with.
        """
        if self._publish_pc is None:
            self._publish_pc = RTCPeerConnection(rtc.rtc_configuration())
            self._watch(self._publish_pc)
        pc = self._publish_pc
        sent_for: dict[int, MediaStreamTrack] = {}
        for track in tracks:
            transceiver = self._add_sender(pc, track, video_codec)
            sent_for[id(transceiver.sender.track)] = track
        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        reply = await self.request({"type": "publish", "sdp": pc.localDescription.sdp})
        await pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type="answer"))
        self.producers.extend(reply["producers"])
        by_mid = {str(p.get("mid")): p for p in reply["producers"]}
        for transceiver in pc.getTransceivers():
            original = sent_for.get(id(transceiver.sender.track))
            if original is not None and str(transceiver.mid) in by_mid:
                source = str(by_mid[str(transceiver.mid)].get("source", ""))
                self._published.append((original, video_codec, source))
        return list(reply["producers"])

    def _add_sender(
        self, pc: RTCPeerConnection, track: MediaStreamTrack, video_codec: str | None
    ) -> Any:
        """A sendonly transceiver for ``track``: keyframe requests reach the track, and the
        sender gets a branch of it (aiortc stops a sender's track when its connection dies,
        and the application's track must outlive a failover)."""
        sent = self._tee(track).branch() if self.reconnect else track
        transceiver = pc.addTransceiver(sent, direction="sendonly")
        if video_codec is not None and track.kind == "video":
            transceiver.setCodecPreferences(
                [
                    c
                    for c in RTCRtpSender.getCapabilities("video").codecs
                    if c.mimeType.lower() in (video_codec.lower(), "video/rtx")
                ]
            )
        request_keyframe = getattr(track, "request_keyframe", None)
        if request_keyframe is not None:
            rtc.hook_keyframe_requests(transceiver.sender, request_keyframe)
        return transceiver

    async def subscribe(self, producer_id: str, paused: bool = False) -> str:
        """Consume a producer explicitly (when joined with auto_subscribe=False)."""
        reply = await self.request(
            {"type": "subscribe", "producer_id": producer_id, "paused": paused}
        )
        return str(reply["consumer_id"])

    async def unsubscribe(self, consumer_id: str) -> None:
        """Close one of my consumers."""
        await self.request({"type": "unsubscribe", "consumer_id": consumer_id})

    async def pause(self, consumer_id: str) -> None:
        """Pause one of my consumers."""
        await self.request({"type": "pause", "consumer_id": consumer_id})

    async def resume(self, consumer_id: str) -> None:
        """Resume one of my consumers."""
        await self.request({"type": "resume", "consumer_id": consumer_id})

    async def unpublish(self, producer_id: str) -> None:
        """Close one of my producers."""
        await self.request({"type": "unpublish", "producer_id": producer_id})

    async def server_stats(self) -> dict[str, Any]:
        """My producers' and consumers' stats as the node sees them."""
        return await self.request({"type": "stats"})

    async def ping(self) -> dict[str, Any]:
        """Keepalive round trip."""
        return await self.request({"type": "ping"})

    async def leave(self) -> None:
        """Leave the room (the node closes the socket)."""
        self._left = True
        with contextlib.suppress(Exception):
            await self.request({"type": "leave"})

    async def wait_for_tracks(
        self, count: int, kind: str | None = None, timeout: float = 20
    ) -> list[SubscribedTrack]:
        """Wait until ``count`` tracks (of ``kind``) decoded their first frame."""

        async def ready() -> list[SubscribedTrack]:
            while True:
                done = [
                    t
                    for t in self.tracks.values()
                    if (kind is None or t.kind == kind) and t.frames_decoded > 0
                ]
                if len(done) >= count:
                    return done
                await asyncio.sleep(0.05)

        return await asyncio.wait_for(ready(), timeout)

    async def wait_event(self, kind: str, timeout: float = 10, **match: Any) -> dict[str, Any]:
        """Wait for a server event of ``kind`` (received so far or later) matching ``match``."""

        async def find() -> dict[str, Any]:
            while True:
                for event in self.events:
                    if event.get("type") == kind and all(
                        event.get(k) == v for k, v in match.items()
                    ):
                        return event
                self._event_added.clear()
                await self._event_added.wait()

        return await asyncio.wait_for(find(), timeout)

    # -- subscribe side -----------------------------------------------------------

    async def _handle_offer(
        self, message: dict[str, Any], ws: aiohttp.ClientWebSocketResponse | None
    ) -> None:
        async with self._sub_lock:
            if ws is None or ws is not self._ws:
                return  # from a node this client moved away from
            if self._subscribe_pc is None:
                self._subscribe_pc = RTCPeerConnection(rtc.rtc_configuration())
                self._subscribe_pc.on("track", self._on_track)
                self._watch(self._subscribe_pc)
            pc = self._subscribe_pc
            loop = asyncio.get_running_loop()
            for c in message.get("consumers", []):
                source = str(c.get("source") or c["producer_id"])
                sub = self._continued(source)
                if sub is not None:  # the same track, back after a move
                    self.tracks.pop(sub.consumer_id, None)
                    sub.consumer_id = c["consumer_id"]
                    sub.producer_id = c["producer_id"]
                    sub.participant_id = c["participant_id"]
                    sub.mid = c.get("mid")
                    sub.rebinds += 1
                else:
                    sub = SubscribedTrack(
                        consumer_id=c["consumer_id"],
                        producer_id=c["producer_id"],
                        participant_id=c["participant_id"],
                        kind=c["kind"],
                        mid=c.get("mid"),
                        subscribed_at=loop.time(),
                        source=source,
                    )
                self.tracks[sub.consumer_id] = sub
                if sub.mid is not None:
                    self._by_mid[sub.mid] = sub
            await pc.setRemoteDescription(RTCSessionDescription(sdp=message["sdp"], type="offer"))
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
            if self.counter is not None:
                self.counter.install(pc)
            if ws is self._ws and pc is self._subscribe_pc:
                await ws.send_str(json.dumps({"type": "answer", "sdp": pc.localDescription.sdp}))

    def _on_track(self, track: MediaStreamTrack) -> None:
        pc = self._subscribe_pc
        assert pc is not None
        for transceiver in pc.getTransceivers():
            if transceiver.receiver.track is track:
                sub = self._by_mid.get(str(transceiver.mid))
                if sub is None:
                    return
                binding = (
                    track,
                    transceiver.receiver,
                    rtc.count_decode_errors(transceiver.receiver),
                )
                if sub.track is None or not self.decode:
                    sub.track, sub.receiver, sub.decode_errors = binding
                else:  # continued after a move: the old media plays until this one has a frame
                    sub._next = binding
                if self.decode:
                    self._spawn(self._consume(sub, track))
                return

    async def _consume(self, sub: SubscribedTrack, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        bound = sub.consumer_id
        try:
            while not sub.ended:
                frame = await track.recv()
                if sub.track is not track:
                    if sub._next is None or sub._next[0] is not track:
                        break  # another binding took over
                    sub.track, sub.receiver, sub.decode_errors = sub._next
                    sub._next = None
                    sub._gap_open = True
                now = loop.time()
                sub.frames_decoded += 1
                if sub.first_frame_at is None:
                    sub.first_frame_at = now
                    sub.first_frame.set()
                if sub._gap_open and sub.last_frame_at is not None:
                    sub.gaps.append(now - sub.last_frame_at)
                sub._gap_open = False
                sub.held = False
                sub.last_frame_at = now
                if isinstance(frame, VideoFrame):
                    sub.width, sub.height = frame.width, frame.height
        except MediaStreamError:
            pass
        if sub.track is track and sub.consumer_id == bound and not sub.held:
            sub.ended = True  # not continued on another consumer

    # -- moving between nodes -------------------------------------------------------

    def _continued(self, source: str) -> SubscribedTrack | None:
        """The live or held track of ``source``, if this client already had one."""
        for sub in self.tracks.values():
            if sub.source == source and not sub.ended:
                return sub
        return None

    def _hold(self, sub: SubscribedTrack, stopped: bool = True) -> None:
        """Keep ``sub`` open for a replacement for up to ``hold`` seconds (``stopped``:
        its media stopped now, rather than playing on until the replacement)."""
        if sub.ended or sub.held:
            return
        sub.held = True
        sub._gap_open = sub._gap_open or stopped
        held_track = sub.track

        async def expire() -> None:
            await asyncio.sleep(self.hold)
            if sub.held and sub.track is held_track:
                sub.ended = True

        self._spawn(expire())

    def _connection_lost(self, why: str) -> None:
        if (
            self._closing
            or self._moving
            or self._left
            or not self.reconnect
            or self.participant_id is None
        ):
            return
        log.info("connection to %s lost (%s): failing over", self.url, why)
        self._spawn(self._move("", "failover"))

    def _watch(self, pc: RTCPeerConnection) -> None:
        @pc.on("connectionstatechange")
        def on_state() -> None:
            lost = pc.connectionState in ("failed", "closed")
            if lost and pc in (self._publish_pc, self._subscribe_pc) and not self._closing:
                self._connection_lost(f"media connection {pc.connectionState}")

    async def _move(self, url: str, reason: str) -> None:
        """Rejoin elsewhere with the same token: at ``url`` (``migrate``), else on the
        fallback nodes (failover), then republish and let the subscriptions continue."""
        if self._moving or self._closing or self._join_message is None:
            return
        self._moving = True
        started = time.monotonic()
        old = self._detach(keep_sending=reason == "migrate")
        attempt = 0
        try:
            while not self._closing:
                targets = [url] if url else [str(f["url"]) for f in self.fallbacks]
                if not targets:
                    targets = [old["url"]]
                target = targets[attempt % len(targets)].rstrip("/")
                if reason == "failover" or attempt:
                    await asyncio.sleep(self.backoff.delay(attempt, self._rng.random()))
                try:
                    await self._rejoin(target, old["participant_id"])
                    if reason == "migrate":
                        await self._settle(old)
                    break
                except Exception as exc:
                    log.info("rejoining through %s failed: %r", target, exc)
                    await self._drop_connection()
                    attempt += 1
                    if url and attempt >= 3:
                        url = ""  # the migrate target is gone: use the fallbacks
            self.moves.append(
                {
                    "reason": reason,
                    "from": old["url"],
                    "to": self.url,
                    "attempts": attempt + 1,
                    "seconds": round(time.monotonic() - started, 3),
                }
            )
        finally:
            self._moving = False
            await self._release(old)

    async def _settle(self, old: dict[str, Any], timeout: float = 5.0) -> None:
        """Wait until the new node has our media and we have the room's media from it
        (or ``timeout``), so that leaving the old node leaves no gap."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        moved = [(sub, sub.track) for sub in self.tracks.values() if not sub.ended]

        def ready() -> bool:
            pc = self._publish_pc
            if self._published and (pc is None or pc.connectionState != "connected"):
                return False
            return all(
                sub.ended or (sub.track is not was and sub.last_frame_at is not None)
                for sub, was in moved
            )

        while not ready() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._published:
            await asyncio.sleep(max(0.0, min(self.migrate_overlap, deadline - loop.time())))

    def _detach(self, keep_sending: bool) -> dict[str, Any]:
        """Take the current connection aside (it is released after the move)."""
        for sub in list(self.tracks.values()):
            self._hold(sub, stopped=not keep_sending)
        old = {
            "url": self.url,
            "participant_id": self.participant_id,
            "ws": self._ws,
            "session": self._session,
            "reader": self._reader,
            "pcs": [pc for pc in (self._publish_pc, self._subscribe_pc) if pc is not None],
        }
        if self._publish_pc is not None:
            for transceiver in self._publish_pc.getTransceivers():
                sent = transceiver.sender.track
                if sent is None:
                    continue
                source = self._source_track(sent)
                branch = source is not None and sent is not source
                if keep_sending and source is not None:
                    # keep feeding the old node until the new one has the media
                    if not branch:
                        transceiver.sender.replaceTrack(self._tee(source).branch())
                else:
                    # never let the old sender stop the application's track
                    transceiver.sender.replaceTrack(None)
                    if branch:
                        sent.stop()
        self._ws = self._session = self._reader = None
        self._publish_pc = self._subscribe_pc = None
        self._by_mid = {}
        return old

    def _source_track(self, sent: MediaStreamTrack) -> MediaStreamTrack | None:
        for track, _codec, _source in self._published:
            if track is sent:
                return track
        for track, tee in self._tees.items():
            if sent.kind == track.kind and getattr(sent, "_tee", None) is tee:
                return track
        return None

    def _tee(self, track: MediaStreamTrack) -> TrackTee:
        tee = self._tees.get(track)
        if tee is None:
            tee = self._tees[track] = TrackTee(track)
        return tee

    async def _rejoin(self, url: str, previous: str | None) -> None:
        assert self._join_message is not None
        self.url = url
        await self.connect()
        message = dict(self._join_message)
        if previous:
            message["resumes"] = previous
        # Placement already chose this node (migrate) or the fallback list did (failover).
        await self._join(message, hops=2)
        published, self._published = self._published, []
        if published:
            await self._republish(published)
        if not self._join_message.get("auto_subscribe", True):
            for sub in [t for t in self.tracks.values() if t.held]:
                with contextlib.suppress(Exception):
                    await self.subscribe(sub.producer_id)

    async def _republish(self, published: list[tuple[MediaStreamTrack, str | None, str]]) -> None:
        self._publish_pc = pc = RTCPeerConnection(rtc.rtc_configuration())
        self._watch(pc)
        wanted: dict[int, str] = {}
        for track, video_codec, source in published:
            transceiver = self._add_sender(pc, track, video_codec)
            wanted[id(transceiver)] = source
        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        sources = {
            str(t.mid): wanted[id(t)] for t in pc.getTransceivers() if id(t) in wanted and t.mid
        }
        reply = await self.request(
            {"type": "publish", "sdp": pc.localDescription.sdp, "sources": sources}
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type="answer"))
        self.producers = list(reply["producers"])
        self._published = [(t, c, src) for t, c, src in published]

    async def _drop_connection(self) -> None:
        """Forget a half-made connection after a failed attempt."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        for pc in (self._publish_pc, self._subscribe_pc):
            if pc is not None:
                await rtc.close_peer_connection(pc)
        self._publish_pc = self._subscribe_pc = None
        self._by_mid = {}
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._session is not None:
            await self._session.close()
        self._ws = self._session = None

    async def _release(self, old: dict[str, Any]) -> None:
        """Leave the old node and close what this client had there."""
        ws = old["ws"]
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.send_str(json.dumps({"type": "leave"})), 2)
        reader = old["reader"]
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        for pc in old["pcs"]:
            await rtc.close_peer_connection(pc)
        if old["session"] is not None:
            await old["session"].close()

    async def close(self) -> None:
        """Leave and release every connection; returns once nothing of this client runs."""
        if self._closing:
            return
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.leave(), self.request_timeout)
        self._closing = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        tasks = list(self._tasks)
        if self._reader is not None:
            tasks.append(self._reader)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pc in (self._publish_pc, self._subscribe_pc):
            if pc is not None:
                await rtc.close_peer_connection(pc)
        for tee in self._tees.values():
            tee.close()
        if self._session is not None:
            await self._session.close()
