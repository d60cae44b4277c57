"""H.264 publishing for the load test: the SDK's VP8 test pattern, decoded once and
re-encoded with libx264 (Annex B, constrained baseline, keyframe every second)."""

from __future__ import annotations

import fractions
import functools

import av

from peer.media import EncodedClip, PatternVideoTrack, vp8_test_pattern


@functools.lru_cache(maxsize=4)
def h264_test_pattern(width: int, height: int, fps: int, bitrate: int) -> EncodedClip:
    """The VP8 test pattern as H.264 (what a browser's baseline encoder would send)."""
    vp8 = vp8_test_pattern(width, height, fps, bitrate)
    decoder = av.CodecContext.create("libvpx", "r")
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height = width, height
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = fractions.Fraction(1, fps)
    encoder.framerate = fractions.Fraction(fps, 1)
    encoder.bit_rate = bitrate
    encoder.profile = "baseline"
    encoder.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "x264-params": f"keyint={fps}:min-keyint={fps}:scenecut=0:repeat-headers=1",
    }
    frames: list[bytes] = []
    keyframes: list[int] = []
    for i, data in enumerate(vp8.frames):
        for image in decoder.decode(av.Packet(data)):
            image.pts = i
            image.pict_type = av.video.frame.PictureType.I if i % fps == 0 else 0
            for packet in encoder.encode(image):
                if packet.is_keyframe:
                    keyframes.append(len(frames))
                frames.append(bytes(packet))
    for packet in encoder.encode(None):
        frames.append(bytes(packet))
    return EncodedClip(tuple(frames), tuple(keyframes or [0]), width, height, fps)


class H264PatternTrack(PatternVideoTrack):
    """:class:`PatternVideoTrack` sending the H.264 clip."""

    def __init__(
        self, width: int = 640, height: int = 480, fps: int = 30, bitrate: int = 1_000_000
    ) -> None:
        super().__init__(width, height, fps, bitrate)
        self.clip = h264_test_pattern(width, height, fps, bitrate)
