"""The adapter over aiortc private internals, tested directly against aiortc 1.16."""

from __future__ import annotations

import asyncio

import aioice
import aiortc
from aiortc import RTCPeerConnection

from peer import aiortc_adapter as rtc
from peer.media import PatternVideoTrack


def test_pinned_versions():
    assert aiortc.__version__ == "1.16.0"
    assert aioice.__version__ == "0.13.0"


async def test_ice_addresses_are_configurable():
    rtc.set_ice_addresses(["127.0.0.1"])
    pc = RTCPeerConnection(rtc.rtc_configuration())
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    candidates = [
        line for line in pc.localDescription.sdp.splitlines() if line.startswith("a=candidate")
    ]
    assert candidates and all(" 127.0.0.1 " in c for c in candidates)
    assert "srflx" not in pc.localDescription.sdp  # no STUN server contacted
    await pc.close()


async def test_tap_forwards_packets_without_decoding_and_sink_sends():
    """Publisher -> tapped receiver (no decoder) -> SenderSink on a second pc -> decoding viewer."""
    rtc.set_ice_addresses(["127.0.0.1"])
    got: list[tuple[int, bytes]] = []

    pub = RTCPeerConnection(rtc.rtc_configuration())
    track = PatternVideoTrack(160, 120)
    t = pub.addTransceiver(track, direction="sendonly")
    rtc.hook_keyframe_requests(t.sender, track.request_keyframe)
    node = RTCPeerConnection(rtc.rtc_configuration())
    tapped = []

    @node.on("track")
    def on_track(remote):
        for tr in node.getTransceivers():
            if tr.receiver.track is remote:
                rtc.tap_receiver(tr.receiver, lambda s, ts, m, p, lvl: got.append((s, p)))
                tapped.append(tr.receiver)

    await pub.setLocalDescription(await pub.createOffer())
    await node.setRemoteDescription(pub.localDescription)
    await node.setLocalDescription(await node.createAnswer())
    await pub.setRemoteDescription(node.localDescription)
    for _ in range(200):
        if len(got) > 20:
            break
        await asyncio.sleep(0.02)
    assert len(got) > 20
    assert not rtc.decoder_running(tapped[0])
    assert rtc.media_ssrc(tapped[0]) is not None
    # PLI reaches the publisher's keyframe hook.
    before = track.keyframes_sent
    rtc.send_pli(tapped[0], rtc.media_ssrc(tapped[0]))
    for _ in range(100):
        if track.keyframes_sent > before:
            break
        await asyncio.sleep(0.02)
    assert track.keyframes_sent > before
    _, lost, _ = rtc.receiver_loss(tapped[0])
    assert lost == 0
    await pub.close()
    await node.close()


async def test_no_datagram_ends_the_receive_loop():
    """Every hostile datagram class straight at a connected transport: media keeps arriving."""
    from bench.hostile import send_datagrams, send_hostile_burst

    rtc.set_ice_addresses(["127.0.0.1"])
    got: list[int] = []
    pub = RTCPeerConnection(rtc.rtc_configuration())
    pub.addTransceiver(PatternVideoTrack(160, 120), direction="sendonly")
    node = RTCPeerConnection(rtc.rtc_configuration())

    @node.on("track")
    def on_track(remote):
        for tr in node.getTransceivers():
            if tr.receiver.track is remote:
                rtc.tap_receiver(tr.receiver, lambda s, ts, m, p, lvl: got.append(s))

    await pub.setLocalDescription(await pub.createOffer())
    await node.setRemoteDescription(pub.localDescription)
    await node.setLocalDescription(await node.createAnswer())
    await pub.setRemoteDescription(node.localDescription)
    for _ in range(300):
        if len(got) > 10:
            break
        await asyncio.sleep(0.02)
    assert len(got) > 10
    targets = rtc.local_candidate_ports(node) + rtc.local_candidate_ports(pub)
    dropped = rtc.dropped_datagrams.count
    # The one datagram of issue 7 first, then the whole generator in small bursts.
    send_datagrams(targets, [b"\x80" + b"\x00" * 1500, b""])
    await send_hostile_burst(targets)
    await asyncio.sleep(0.3)
    before = len(got)
    for _ in range(300):
        if len(got) > before + 20:
            break
        await asyncio.sleep(0.02)
    assert len(got) > before + 20
    for pc in (pub, node):
        assert all(dtls.state == "connected" for _, dtls in rtc._ice_connections(pc))
    assert rtc.dropped_datagrams.count > dropped  # the guard did catch something
    await pub.close()
    await node.close()
