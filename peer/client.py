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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from peer import aiortc_adapter as rtc
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
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
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

    async def _on_event(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if self._closing:
            return
        if kind == "offer":
            self._spawn(self._handle_offer(message))
        elif kind == "consumer_closed":
            track = self.tracks.get(str(message.get("consumer_id")))
            if track is not None:
                track.ended = True
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
        if not task.cancelled() and task.exception() is not None and not self._closing:
            log.warning("client task failed: %r", task.exception())

    # -- room -------------------------------------------------------------------

    async def join(
        self,
        room: str,
        token: str,
        *,
        name: str | None = None,
        auto_subscribe: bool = True,
        region: str | None = None,
    ) -> dict[str, Any]:
        """Join a room; returns the room state (participants and producers).

        When the node answers with a ``redirect`` (placement chose another node), the
        client reconnects there and joins with the same token, at most twice; a
        redirect back to a node already tried raises ``CascadeError("redirect_loop")``.
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
        tried = {self.url}
        self.redirects = []
        while True:
            reply = await self.request({**message, "hops": len(self.redirects)})
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
        pc = self._publish_pc
        for track in tracks:
            transceiver = pc.addTransceiver(track, direction="sendonly")
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
        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        reply = await self.request({"type": "publish", "sdp": pc.localDescription.sdp})
        await pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type="answer"))
        self.producers.extend(reply["producers"])
        return list(reply["producers"])

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

    async def _handle_offer(self, message: dict[str, Any]) -> None:
        async with self._sub_lock:
            if self._subscribe_pc is None:
                self._subscribe_pc = RTCPeerConnection(rtc.rtc_configuration())
                self._subscribe_pc.on("track", self._on_track)
            pc = self._subscribe_pc
            loop = asyncio.get_running_loop()
            for c in message.get("consumers", []):
                sub = SubscribedTrack(
                    consumer_id=c["consumer_id"],
                    producer_id=c["producer_id"],
                    participant_id=c["participant_id"],
                    kind=c["kind"],
                    mid=c.get("mid"),
                    subscribed_at=loop.time(),
                )
                self.tracks[sub.consumer_id] = sub
                if sub.mid is not None:
                    self._by_mid[sub.mid] = sub
            await pc.setRemoteDescription(RTCSessionDescription(sdp=message["sdp"], type="offer"))
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
            if self.counter is not None:
                self.counter.install(pc)
            assert self._ws is not None
            await self._ws.send_str(json.dumps({"type": "answer", "sdp": pc.localDescription.sdp}))

    def _on_track(self, track: MediaStreamTrack) -> None:
        pc = self._subscribe_pc
        assert pc is not None
        for transceiver in pc.getTransceivers():
            if transceiver.receiver.track is track:
                sub = self._by_mid.get(str(transceiver.mid))
                if sub is None:
                    return
                sub.track = track
                sub.receiver = transceiver.receiver
                sub.decode_errors = rtc.count_decode_errors(transceiver.receiver)
                if self.decode:
                    self._spawn(self._consume(sub, track))
                return

    async def _consume(self, sub: SubscribedTrack, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not sub.ended:
                frame = await track.recv()
                sub.frames_decoded += 1
                if sub.first_frame_at is None:
                    sub.first_frame_at = loop.time()
                    sub.first_frame.set()
                if isinstance(frame, VideoFrame):
                    sub.width, sub.height = frame.width, frame.height
        except MediaStreamError:
            pass
        sub.ended = True

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
        if self._session is not None:
            await self._session.close()
