"""Synthetic media for the SDK, tests and benchmarks: a VP8 test pattern and an Opus
tone, encoded once and then replayed as packets, so publishing costs almost no CPU."""

from __future__ import annotations

import asyncio
import fractions
import functools
import math
import time
from dataclasses import dataclass

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

VIDEO_TIME_BASE = fractions.Fraction(1, 90000)
AUDIO_TIME_BASE = fractions.Fraction(1, 48000)


@dataclass(frozen=True)
class EncodedClip:
    """A looped sequence of encoded frames; index 0 is a keyframe."""

    frames: tuple[bytes, ...]
    keyframes: tuple[int, ...]
    width: int
    height: int
    fps: int


@functools.lru_cache(maxsize=8)
def vp8_test_pattern(
    width: int = 640,
    height: int = 480,
    fps: int = 30,
    bitrate: int = 1_000_000,
    seconds: int = 4,
    periodic_keyframes: bool = True,
) -> EncodedClip:
    """Encode a moving test pattern with libvpx: a keyframe every second, or only the
    first frame when ``periodic_keyframes`` is false (as browsers encode)."""
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height = width, height
    codec.pix_fmt = "yuv420p"
    codec.time_base = fractions.Fraction(1, fps)
    codec.framerate = fractions.Fraction(fps, 1)
    codec.bit_rate = bitrate
    codec.gop_size = fps if periodic_keyframes else fps * seconds + 1
    codec.options = {
        "deadline": "realtime",
        "cpu-used": "8",
        "lag-in-frames": "0",
        "minrate": str(bitrate),
        "maxrate": str(bitrate),
        "bufsize": str(bitrate),
        "undershoot-pct": "95",
        "overshoot-pct": "15",
    }
    ys, xs = np.mgrid[0:height, 0:width]
    frames: list[bytes] = []
    keyframes: list[int] = []
    total = fps * seconds
    rng = np.random.default_rng(7)
    for i in range(total):
        y = ((xs + ys + i * 4) % 256).astype(np.uint8)
        box = (
            slice((i * 3) % (height - 60), (i * 3) % (height - 60) + 60),
            slice((i * 7) % (width - 60), (i * 7) % (width - 60) + 60),
        )
        y[box] = 255 - y[box]
        # Noise keeps the encoder near its target bitrate, like a camera would.
        y ^= rng.integers(0, 24, size=y.shape, dtype=np.uint8)
        u = np.full((height // 2, width // 2), (i * 2) % 256, np.uint8)
        v = np.full((height // 2, width // 2), 128, np.uint8)
        frame = av.VideoFrame(width, height, "yuv420p")
        frame.planes[0].update(
            y.tobytes()
            if frame.planes[0].line_size == width
            else _pad(y, frame.planes[0].line_size)
        )
        frame.planes[1].update(_pad(u, frame.planes[1].line_size))
        frame.planes[2].update(_pad(v, frame.planes[2].line_size))
        frame.pts = i
        key = i == 0 or (periodic_keyframes and i % fps == 0)
        frame.pict_type = av.video.frame.PictureType.I if key else av.video.frame.PictureType.NONE
        data = b"".join(bytes(p) for p in codec.encode(frame))
        if key:
            keyframes.append(len(frames))
        frames.append(data)
    return EncodedClip(tuple(frames), tuple(keyframes), width, height, fps)


def _pad(plane: np.ndarray, line_size: int) -> bytes:
    h, w = plane.shape
    if line_size == w:
        return plane.tobytes()
    out = np.zeros((h, line_size), np.uint8)
    out[:, :w] = plane
    return out.tobytes()


@functools.lru_cache(maxsize=4)
def opus_tone(frequency: float = 440.0, seconds: int = 2) -> tuple[bytes, ...]:
    """Encode a sine tone as 20 ms Opus packets (48 kHz stereo)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = 48000
    codec.layout = "stereo"
    codec.format = "s16"
    codec.bit_rate = 64000
    codec.time_base = AUDIO_TIME_BASE
    samples = 960
    packets: list[bytes] = []
    for i in range(seconds * 50):
        t = (np.arange(samples) + i * samples) / 48000
        mono = (np.sin(2 * math.pi * frequency * t) * 8000).astype(np.int16)
        stereo = np.repeat(mono, 2).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.pts = i * samples
        packets.extend(bytes(p) for p in codec.encode(frame))
    return tuple(packets)


class _PacedTrack(MediaStreamTrack):
    """Yields pre-encoded av.Packet objects in real time."""

    def __init__(self, interval: float) -> None:
        super().__init__()
        self._interval = interval
        self._start: float | None = None
        self._count = 0

    async def _pace(self) -> None:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._count * self._interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._count += 1


class PatternVideoTrack(_PacedTrack):
    """Pre-encoded VP8 test pattern; jumps to a keyframe when one is requested.

    ``periodic_keyframes=False`` publishes like a browser: one keyframe at the start,
    then keyframes only when the receiving side asks (PLI/FIR), so a missed keyframe
    request shows up as a subscriber that never decodes.
    """

    kind = "video"

    def __init__(
        self,
        width: int = 640,
        height: int = 480,
        fps: int = 30,
        bitrate: int = 1_000_000,
        *,
        periodic_keyframes: bool = True,
    ) -> None:
        super().__init__(1.0 / fps)
        self.clip = vp8_test_pattern(
            width, height, fps, bitrate, periodic_keyframes=periodic_keyframes
        )
        self.periodic_keyframes = periodic_keyframes
        self._index = 0
        self._keyframe_requested = False
        self.keyframes_sent = 0
        self.keyframe_requests = 0

    def request_keyframe(self) -> None:
        """Make the next frame a keyframe (wired to the sender's PLI handling)."""
        self.keyframe_requests += 1
        self._keyframe_requested = True

    async def recv(self) -> av.Packet:
        await self._pace()
        clip = self.clip
        if self._keyframe_requested:
            self._keyframe_requested = False
            self._index = clip.keyframes[0]
        i = self._index % len(clip.frames)
        if i == 0 and self._index and not self.periodic_keyframes:
            i = 1  # loop the clip without its leading keyframe
        if i in clip.keyframes:
            self.keyframes_sent += 1
        packet = av.Packet(clip.frames[i])
        packet.pts = (self._count - 1) * (90000 // clip.fps)
        packet.time_base = VIDEO_TIME_BASE
        self._index = i + 1
        return packet


class ToneAudioTrack(_PacedTrack):
    """Pre-encoded Opus tone, 20 ms per packet."""

    kind = "audio"

    def __init__(self, frequency: float = 440.0) -> None:
        super().__init__(0.02)
        self.packets = opus_tone(frequency)

    async def recv(self) -> av.Packet:
        await self._pace()
        data = self.packets[(self._count - 1) % len(self.packets)]
        packet = av.Packet(data)
        packet.pts = (self._count - 1) * 960
        packet.time_base = AUDIO_TIME_BASE
        return packet


class TrackTee:
    """Feeds every frame (or packet) of one track to several branches: a publisher that
    moves to another node sends the same media on both connections while it switches."""

    def __init__(self, source: MediaStreamTrack) -> None:
        self.source = source
        self.kind = source.kind
        self._branches: set[_TeeBranch] = set()
        self._task: asyncio.Task[None] | None = None

    def branch(self) -> MediaStreamTrack:
        """A new track receiving every frame from now on."""
        branch = _TeeBranch(self)
        self._branches.add(branch)
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        return branch

    def request_keyframe(self) -> None:
        """Pass a keyframe request on to the source, if it takes them."""
        request = getattr(self.source, "request_keyframe", None)
        if request is not None:
            request()

    async def _run(self) -> None:
        while True:
            try:
                frame = await self.source.recv()
            except MediaStreamError:
                frame = None
            for branch in list(self._branches):
                branch.put(frame)
            if frame is None:
                return

    def _drop(self, branch: _TeeBranch) -> None:
        self._branches.discard(branch)

    def close(self) -> None:
        """Stop reading the source (its branches end)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for branch in list(self._branches):
            branch.queue.put_nowait(None)
        self._branches.clear()


class _TeeBranch(MediaStreamTrack):
    # Frames a branch holds for a sender that does not read yet (its transport is still
    # connecting): past this, the backlog is dropped and video restarts at a keyframe.
    BACKLOG = 30

    def __init__(self, tee: TrackTee) -> None:
        super().__init__()
        self.kind = tee.kind
        self._tee: TrackTee | None = tee
        self.queue: asyncio.Queue[object] = asyncio.Queue()

    def put(self, frame: object) -> None:
        if frame is not None and self.queue.qsize() >= self.BACKLOG:
            while not self.queue.empty():
                self.queue.get_nowait()
            if self.kind == "video" and self._tee is not None:
                self._tee.request_keyframe()
        self.queue.put_nowait(frame)

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.queue.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        return frame  # type: ignore[return-value]

    def stop(self) -> None:
        super().stop()
        if self._tee is not None:
            self._tee._drop(self)
            self._tee = None
