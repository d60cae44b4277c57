"""The load test's H.264 pattern reaches a subscriber through a node and decodes."""

from __future__ import annotations

from loadtests.media import H264PatternTrack, h264_test_pattern
from peer.media import ToneAudioTrack
from tests.conftest import ClientFactory


def test_h264_clip_has_a_keyframe_every_second():
    clip = h264_test_pattern(160, 120, 30, 200_000)
    assert clip.keyframes[:4] == (0, 30, 60, 90)
    assert len(clip.frames) == 120


async def test_h264_publisher_is_forwarded_and_decoded(clients: ClientFactory):
    publisher = await clients("h264", "alice")
    producers = await publisher.publish(
        [H264PatternTrack(160, 120, bitrate=200_000), ToneAudioTrack()], video_codec="video/H264"
    )
    assert producers[0]["codec"] == "video/H264"
    subscriber = await clients("h264", "bob")
    (track,) = await subscriber.wait_for_tracks(1, "video", timeout=30)
    assert (track.width, track.height) == (160, 120)
