"""H.264 forwarding, Sender Reports, admission control and keyframe-request limiting, end to end."""

from __future__ import annotations

import asyncio

import numpy as np
from aiortc import VideoStreamTrack
from av import VideoFrame

from peer.client import CascadeClient, CascadeError
from peer.engine import KEYFRAME_REPLAY_WINDOW
from peer.media import PatternVideoTrack
from tests.conftest import ClientFactory


class MovingFrames(VideoStreamTrack):
    """Raw frames for aiortc's own H.264 encoder (publisher side only)."""

    def __init__(self, width: int = 320, height: int = 240) -> None:
        super().__init__()
        self.size = (width, height)
        self.n = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        w, h = self.size
        img = np.zeros((h, w, 3), np.uint8)
        img[:, :, 0] = (np.arange(w)[None, :] + self.n * 4) % 256
        img[:, :, 1] = (np.arange(h)[:, None] + self.n * 2) % 256
        self.n += 1
        frame = VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


async def test_h264_forwarded_when_negotiated(node, clients: ClientFactory):
    pub = await clients("h264", "alice")
    producers = await pub.publish([MovingFrames()], video_codec="video/H264")
    assert producers[0]["codec"].lower() == "video/h264"
    sub = await clients("h264", "bob")
    (track,) = await sub.wait_for_tracks(1, "video", timeout=20)
    assert (track.width, track.height) == (320, 240)
    assert node.stats()["codec_instances"] == 0


async def test_sender_reports_carry_consumer_counts(node, clients: ClientFactory):
    pub = await clients("sr", "alice")
    await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    sub = await clients("sr", "bob")
    (track,) = await sub.wait_for_tracks(1, "video")
    await asyncio.sleep(3.0)  # SRs go out every 0.5-1.5 s
    report = await track.receiver.getStats()
    remote = [s for s in report.values() if s.type == "remote-outbound-rtp"]
    assert remote, "subscriber received no Sender Report"
    sent = remote[0].packetsSent
    received = track.stats()["packets_received"]
    # The SR counts what this consumer sent (not aiortc's idle sender counters = 0). The last
    # SR may be up to ~1.5 s old, so it can trail what has arrived since, never lead it.
    assert sent > 0
    assert 0.4 * received <= sent <= received + 5


async def test_admission_control_refuses_consumers_and_keeps_calls(node, clients: ClientFactory):
    pub = await clients("adm", "alice")
    await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    sub1 = await clients("adm", "bob")
    (track,) = await sub1.wait_for_tracks(1, "video")
    sub2 = await clients("adm", "carol", auto_subscribe=False)
    producer_id = pub.producers[0]["producer_id"]
    # The node is at its consumer limit: the next consumer is refused.
    node.node.admission.max_consumers = 1
    node.node.admission.update(0.0, 0.0, 1)
    try:
        await sub2.subscribe(producer_id)
        raise AssertionError("expected overloaded")
    except CascadeError as exc:
        assert exc.code == "overloaded"
    frames = track.frames_decoded
    await asyncio.sleep(0.5)
    assert track.frames_decoded > frames


async def test_keyframe_requests_are_rate_limited(node, clients: ClientFactory):
    pub = await clients("pli", "alice")
    video = PatternVideoTrack(160, 120, periodic_keyframes=False)
    await pub.publish([video])
    # Past the keyframe replay window of the first keyframe: subscribers need a new one.
    await asyncio.sleep(KEYFRAME_REPLAY_WINDOW + 0.2)
    subs: list[CascadeClient] = []
    for i in range(4):
        subs.append(await clients("pli", f"s{i}"))
    for s in subs:
        await s.wait_for_tracks(1, "video")
    room = node.stats()["rooms"]["pli"]
    plis = sum(p["plis"] for member in room.values() for p in member["producers"].values())
    # 4 subscribers joined within a couple of seconds: far fewer PLIs than joins x retries
    # (those starting just after a requested keyframe are started on it from the cache).
    assert 1 <= plis <= 6
    assert video.keyframes_sent >= 2
