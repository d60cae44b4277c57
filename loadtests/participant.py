"""One load-test participant on asyncio: joins through the SDK, publishes pattern tracks,
meters what it receives. Runs on the bridge's loop; the locust user only calls it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiortc import MediaStreamTrack

from loadtests.media import H264PatternTrack
from loadtests.scenario import ParticipantRecord, Scenario, Slot, TrackMeter, TrackWindow
from peer import aiortc_adapter as rtc
from peer.client import CascadeClient, CascadeError
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.tokens import issue_token

SECRET_ENV = "CASCADE_API_SECRET"
SAMPLE_INTERVAL = 0.1  # seconds between counter samples (freeze detection resolution)
CODECS = {"vp8": "video/VP8", "h264": "video/H264"}


def ssrcs_by_mid(sdp: str) -> dict[str, int]:
    """The media SSRC of each m-section (by mid) of an SDP; RTX SSRCs are left out."""
    out: dict[str, int] = {}
    mid: str | None = None
    first: int | None = None
    fid: int | None = None

    def close() -> None:
        ssrc = fid if fid is not None else first
        if mid is not None and ssrc is not None:
            out[mid] = ssrc

    for line in sdp.splitlines():
        if line.startswith("m="):
            close()
            mid, first, fid = None, None, None
        elif line.startswith("a=mid:"):
            mid = line[6:].strip()
        elif line.startswith("a=ssrc-group:FID "):
            fid = int(line.split()[1])
        elif line.startswith("a=ssrc:") and first is None:
            first = int(line[7:].split()[0])
    close()
    return out


async def fetch_token(node: str, room: str, identity: str, publish: bool) -> str:
    """A token from ``$CASCADE_API_SECRET`` if set, else from a dev node's ``/dev/token``."""
    secret = os.environ.get(SECRET_ENV)
    if secret:
        return issue_token(secret, room, identity, ttl=6 * 3600, publish=publish)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{node}/dev/token", params={"room": room, "identity": identity}) as reply,
    ):
        if reply.status != 200:
            raise CascadeError(
                "no_token",
                f"{node}/dev/token answered {reply.status}: set ${SECRET_ENV} "
                "or run the node with --dev",
            )
        return str((await reply.json())["token"])


@dataclass
class Refusal:
    """An error event from the node (e.g. an automatic subscription refused)."""

    code: str
    message: str


@dataclass
class Participant:
    """A joined participant and the meters of the tracks it receives."""

    scenario: Scenario
    slot: Slot
    client: CascadeClient | None = None
    meters: dict[str, TrackMeter] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    joined_at: float = 0.0
    published_tracks: int = 0
    redirects: int = 0
    _ssrcs: dict[str, int] = field(default_factory=dict)
    _sampler: asyncio.Task[None] | None = None

    async def join(self) -> float:
        """WebSocket open → joined; returns seconds. Raises :class:`CascadeError`."""
        s = self.slot
        token = await fetch_token(s.node, s.room, s.identity, publish=s.publishes)
        start = time.monotonic()
        client = CascadeClient(s.node, count_only=self.scenario.subscribers == "count")
        self.client = client
        client.on_event(self._on_event)
        await client.connect()
        # The SDK follows placement redirects; the region is the placement hint.
        await client.join(s.room, token, name=s.identity, region=s.region)
        self.redirects = len(client.redirects)
        elapsed = time.monotonic() - start
        self.joined_at = asyncio.get_running_loop().time()
        self._sampler = asyncio.ensure_future(self._sample())
        return elapsed

    def _tracks(self) -> list[MediaStreamTrack]:
        sc = self.scenario
        if self.slot.audio_only:
            return [ToneAudioTrack()]
        video = H264PatternTrack if sc.codec == "h264" else PatternVideoTrack
        return [video(sc.width, sc.height, sc.fps, sc.video_kbps * 1000), ToneAudioTrack()]

    async def publish(self, timeout: float = 15.0) -> float:
        """Offer → media flowing (the node counts packets on every producer); seconds."""
        assert self.client is not None
        tracks = self._tracks()
        start = time.monotonic()
        producers = await self.client.publish(tracks, video_codec=CODECS[self.scenario.codec])
        self.published_tracks = len(producers)
        ids = {str(p["producer_id"]) for p in producers}
        deadline = start + timeout
        while True:
            stats = await self.client.server_stats()
            counters = stats.get("producers", {})
            if all(int(counters.get(i, {}).get("packets", 0)) > 0 for i in ids):
                return time.monotonic() - start
            if time.monotonic() > deadline:
                raise CascadeError("no_media", f"no packets reached the node in {timeout:.0f} s")
            await asyncio.sleep(0.05)

    def _on_event(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "offer":
            self._ssrcs.update(ssrcs_by_mid(str(message.get("sdp", ""))))
        elif kind == "error":
            code = str(message.get("code"))
            self.errors[code] = self.errors.get(code, 0) + 1
            self.refusals.append(Refusal(code, str(message.get("message"))))

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            self.sample(loop.time())

    def sample(self, now: float) -> None:
        """Feed every received track's counters to its meter."""
        client = self.client
        if client is None:
            return
        counter = client.counter
        for consumer_id, track in list(client.tracks.items()):
            if track.ended:
                continue
            meter = self.meters.get(consumer_id)
            if meter is None:
                # First frame counts from joining, or from the offer for later tracks.
                started = max(self.joined_at, track.subscribed_at)
                meter = self.meters[consumer_id] = TrackMeter(track.kind, started)
            if counter is not None:
                ssrc = self._ssrcs.get(track.mid or "")
                s = counter.streams.get(ssrc) if ssrc is not None else None
                if s is None:
                    meter.observe(now, 0, 0, 0, 0)
                    continue
                packets, markers, high, first, size = s
                frames = markers if track.kind == "video" else packets
                meter.observe(now, frames, packets, size, max(0, high - first + 1 - packets))
            else:
                received, lost = 0, 0
                if track.receiver is not None:
                    received, lost, _ = rtc.receiver_loss(track.receiver)
                errors = track.decode_errors.count if track.decode_errors else 0
                meter.observe(now, track.frames_decoded, received, -1, lost, errors)

    def take_refusals(self) -> list[Refusal]:
        """Error events since the last call."""
        out, self.refusals = self.refusals, []
        return out

    def take_windows(self) -> list[TrackWindow]:
        """Each live track's delivery since the last call."""
        return [m.window() for m in self.meters.values() if m.last_sample]

    def take_first_frames(self, seen: set[str]) -> list[tuple[str, float]]:
        """(kind, seconds) of tracks whose first frame arrived and is not in ``seen`` yet."""
        out = []
        for consumer_id, m in self.meters.items():
            first = m.first_frame_seconds
            if first is not None and consumer_id not in seen:
                seen.add(consumer_id)
                out.append((m.kind, first))
        return out

    def record(self) -> ParticipantRecord:
        """This session for the end report."""
        return ParticipantRecord(
            room=self.slot.room,
            identity=self.slot.identity,
            published_tracks=self.published_tracks,
            subscribes=True,
            errors=dict(self.errors),
            tracks=[m.record(self.slot.room, self.slot.identity) for m in self.meters.values()],
        )

    async def close(self) -> ParticipantRecord:
        """Leave and release everything; returns the session's record."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sampler
        self.sample(asyncio.get_running_loop().time())
        record = self.record()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 10)
        return record
