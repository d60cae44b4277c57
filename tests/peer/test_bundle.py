"""Several tracks of one kind in one subscribe offer all flow (one BUNDLE transport)."""

from __future__ import annotations

from peer.media import PatternVideoTrack, ToneAudioTrack
from tests.conftest import ClientFactory


async def test_late_joiner_receives_two_publishers_audio_and_video(clients: ClientFactory):
    # The late joiner's first offer has video, audio, video, audio: with aiortc's default
    # bundle policy the second audio m-line was tied to a transport BUNDLE discards.
    for name in ("alice", "bob"):
        publisher = await clients("bundle", name)
        await publisher.publish([PatternVideoTrack(160, 120), ToneAudioTrack()])
    late = await clients("bundle", "carol")
    tracks = await late.wait_for_tracks(4, timeout=30)
    assert sorted(t.kind for t in tracks) == ["audio", "audio", "video", "video"]
    assert all(t.frames_decoded > 0 for t in tracks)
