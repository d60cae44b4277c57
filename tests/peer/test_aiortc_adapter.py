"""The adapter over aiortc private internals, tested directly against aiortc 1.16."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aioice
import aiortc
import pytest
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


def consent_tasks(conn: aioice.Connection) -> list[asyncio.Task[None]]:
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") == "Connection.query_consent"
        and t.get_coro().cr_frame.f_locals.get("self") is conn  # type: ignore[union-attr]
    ]


async def test_an_ice_connection_closed_as_its_checks_complete_leaves_no_task_running():
    """Issue 7 soak: closed while connect() was about to return, a connection used to start
    consent checks over no pair, a task that never ended."""
    rtc.set_ice_addresses(["127.0.0.1"])
    a = aioice.Connection(ice_controlling=True, components=1)
    b = aioice.Connection(ice_controlling=False, components=1)
    await asyncio.gather(a.gather_candidates(), b.gather_candidates())
    for local, remote in ((a, b), (b, a)):
        for candidate in remote.local_candidates:
            await local.add_remote_candidate(candidate)
        await local.add_remote_candidate(None)
        local.remote_username, local.remote_password = remote.local_username, remote.local_password

    # Close `a` in the loop iteration right after its check list completes, before its
    # connect() resumes (the close's task is scheduled ahead of connect()'s wake-up).
    queue = a._check_list_state
    put = queue.put_nowait

    def put_and_close(state: int) -> None:
        closing.append(asyncio.ensure_future(a.close()))
        put(state)

    closing: list[asyncio.Future[None]] = []
    queue.put_nowait = put_and_close  # type: ignore[method-assign]
    results = await asyncio.gather(a.connect(), b.connect(), return_exceptions=True)
    await asyncio.gather(*closing)
    assert closing, "the checks never completed"
    assert not isinstance(results[0], BaseException) or isinstance(results[0], ConnectionError)
    await asyncio.sleep(0)
    assert consent_tasks(a) == []
    await b.close()
    assert consent_tasks(b) == []


async def tapped_call(
    track: PatternVideoTrack, on_packet: Callable[..., None]
) -> tuple[RTCPeerConnection, RTCPeerConnection, list[Any], Any]:
    """A publisher sending ``track`` to a node whose receiver is tapped (``on_packet``):
    (publisher pc, node pc, tapped receivers, the publisher's transceiver)."""
    rtc.set_ice_addresses(["127.0.0.1"])
    pub = RTCPeerConnection(rtc.rtc_configuration())
    sent = pub.addTransceiver(track, direction="sendonly")
    node = RTCPeerConnection(rtc.rtc_configuration())
    tapped: list[Any] = []

    @node.on("track")
    def on_track(remote: Any) -> None:
        for tr in node.getTransceivers():
            if tr.receiver.track is remote:
                rtc.tap_receiver(tr.receiver, on_packet)
                tapped.append(tr.receiver)

    await pub.setLocalDescription(await pub.createOffer())
    await node.setRemoteDescription(pub.localDescription)
    await node.setLocalDescription(await node.createAnswer())
    await pub.setRemoteDescription(node.localDescription)
    return pub, node, tapped, sent


async def test_tap_forwards_packets_without_decoding_and_sink_sends():
    """Publisher -> tapped receiver (no decoder) -> sender_sink on a second pc -> viewer."""
    got: list[tuple[int, bytes]] = []
    track = PatternVideoTrack(160, 120)
    pub, node, tapped, t = await tapped_call(track, lambda s, ts, m, p, lvl: got.append((s, p)))
    rtc.hook_keyframe_requests(t.sender, track.request_keyframe)
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


async def test_no_datagram_ends_the_receive_loop(monkeypatch):
    """Every hostile datagram class straight at a connected transport: media keeps arriving."""
    from bench.hostile import send_datagrams, send_hostile_burst

    monkeypatch.setenv("CASCADE_FAST_INGRESS", "1")
    got: list[int] = []
    pub, node, tapped, _ = await tapped_call(
        PatternVideoTrack(160, 120), lambda s, ts, m, p, lvl: got.append(s)
    )
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
    # Forged media for the real SSRC and payload type: the fast path's SRTP check drops it.
    stream = rtc.ingress_stream(tapped[0])
    assert stream is not None and stream.media_ssrc is not None
    pt = min(stream.config.payload_types)
    srtp_errors = rtc.ingress_counters.srtp_errors
    forged = [
        bytes([0x80, pt])
        + i.to_bytes(2, "big")
        + b"\x00" * 4
        + stream.media_ssrc.to_bytes(4, "big")
        + b"\xab" * size
        for i, size in enumerate([0, 1, 10, 100, 1200, 1480, 1500, 3000])
    ]
    send_datagrams(targets, forged)
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
    assert rtc.ingress_counters.srtp_errors > srtp_errors
    await pub.close()
    await node.close()


async def test_fast_ingress_repairs_loss_and_reports_to_the_publisher(monkeypatch):
    """Publisher media takes the fast path (never aiortc's receive path); with 5 % of its
    datagrams dropped before the node sees them, NACKs bring every packet back as RTX, and
    the publisher gets receiver reports."""
    import random

    from aiortc.rtp import is_rtcp

    monkeypatch.setenv("CASCADE_FAST_INGRESS", "1")
    got: list[int] = []
    pub, node, tapped, _ = await tapped_call(
        PatternVideoTrack(160, 120), lambda s, ts, m, p, lvl: got.append(s)
    )
    for _ in range(300):
        if len(got) > 20:
            break
        await asyncio.sleep(0.02)
    fast_before = rtc.ingress_counters.packets
    rng = random.Random(3)
    # drop 5 % of the publisher's RTP (not RTCP, DTLS or STUN) before the node sees it
    rtc.set_receive_filter(
        node, lambda d: not (d and 127 < d[0] < 192 and not is_rtcp(d)) or rng.random() > 0.05
    )
    start = len(got)
    for _ in range(500):
        if len(got) > start + 200:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.0)  # the last repairs
    stream = rtc.ingress_stream(tapped[0])
    assert stream is not None
    assert rtc.ingress_counters.packets - fast_before >= 200
    # aiortc's receive path saw none of it: no stream statistics of its own
    assert tapped[0]._RTCRtpReceiver__remote_streams == {}
    assert stream.nacks_sent > 0 and stream.rtx_received > 0
    window = got[start:]
    lo, hi = window[0], max(window)
    missing = set(range(lo, hi - 50)) - set(window)  # the newest may still be on their way
    assert not missing
    received, lost, _ = rtc.receiver_loss(tapped[0])
    assert received == stream.stats.received and lost == 0
    # the publisher's sender got our receiver reports
    for _ in range(150):
        stats = await pub.getTransceivers()[0].sender.getStats()
        if any(s.type == "remote-inbound-rtp" for s in stats.values()):
            break
        await asyncio.sleep(0.02)
    assert any(s.type == "remote-inbound-rtp" for s in stats.values())
    assert stream.reports_sent > 0 and stream.rembs_sent > 0
    await pub.close()
    await node.close()


@pytest.mark.parametrize("fast_rtcp", ["1", "0"])
async def test_subscriber_rtcp_reaches_the_consumer_hooks(monkeypatch, fast_rtcp):
    """A consumer's sender towards a real aiortc subscriber: the subscriber's NACKs (for
    the sequence numbers we skip), its PLI and its receiver reports reach the hooks, and
    it gets Sender Reports with the consumer's counts; on the fast RTCP path (aiortc's
    RTCP parser never sees the datagrams) and, with CASCADE_FAST_RTCP=0, on aiortc's."""
    from peer.rtp import HeaderWriter, ntp_time, shared_extensions

    monkeypatch.setenv("CASCADE_FAST_RTCP", fast_rtcp)
    rtc.set_ice_addresses(["127.0.0.1"])
    node = RTCPeerConnection(rtc.rtc_configuration())
    transceiver = node.addTransceiver(rtc.SilentTrack("video"), direction="sendonly")
    nacks: list[int] = []
    plis: list[int] = []
    reports: list[tuple[int, int, int]] = []
    rtc.hook_sender(
        transceiver.sender,
        on_nack=nacks.extend,
        on_keyframe_request=lambda: plis.append(1),
        on_receiver_report=lambda fraction, lost, jitter: reports.append((fraction, lost, jitter)),
        sender_report=lambda now: (ntp_time(now), 1000, 42, 4200),
    )
    sub = RTCPeerConnection(rtc.rtc_configuration())
    await node.setLocalDescription(await node.createOffer())
    await sub.setRemoteDescription(node.localDescription)
    await sub.setLocalDescription(await sub.createAnswer())
    await node.setRemoteDescription(sub.localDescription)
    dtls = transceiver.sender.transport
    for _ in range(300):
        if dtls.state == "connected":
            break
        await asyncio.sleep(0.02)
    assert dtls.state == "connected"
    fast_before = rtc.ingress_counters.rtcp_received
    handed_before = rtc.ingress_counters.rtcp_handed_to_aiortc
    params = rtc.outbound_params(transceiver)
    sink = rtc.sender_sink(transceiver.sender)
    writer = HeaderWriter(params)
    ext = shared_extensions(writer.shared_layout, 0, None)
    skipped = set(range(30, 200, 10))
    for seq in range(200):
        if seq not in skipped:  # one VP8 frame per packet, every tenth never sent
            sink(writer.packet(1, seq, seq * 3000, ext, b"\x10\x00\x9d\x01\x2a" + b"\0" * 100))
        await asyncio.sleep(0.003)
    receiver = sub.getTransceivers()[0].receiver
    await receiver._send_rtcp_pli(params.ssrc)
    stats: dict = {}
    for _ in range(250):
        stats = await receiver.getStats()
        outbound = [s for s in stats.values() if s.type == "remote-outbound-rtp"]
        if reports and plis and outbound:
            break
        await asyncio.sleep(0.02)
    assert skipped & set(nacks)
    assert plis
    assert reports
    assert [s.packetsSent for s in stats.values() if s.type == "remote-outbound-rtp"] == [42]
    fast = rtc.ingress_counters.rtcp_received - fast_before
    assert (fast > 0) if fast_rtcp == "1" else (fast == 0)
    assert rtc.ingress_counters.rtcp_handed_to_aiortc == handed_before
    await rtc.close_peer_connection(node)
    await rtc.close_peer_connection(sub)


async def test_a_close_cancelled_half_way_does_not_hang_the_next_close():
    """A client closed while one of its tasks was closing the same connection hung for
    ever: aiortc's close() interrupted leaves its closing future pending."""
    pub, node, _, _ = await tapped_call(PatternVideoTrack(160, 120, 10, 100_000), lambda *a: None)
    for _ in range(300):
        if pub.connectionState == "connected" and node.connectionState == "connected":
            break
        await asyncio.sleep(0.02)
    assert pub.connectionState == "connected"
    first = asyncio.ensure_future(rtc.close_peer_connection(pub))
    await asyncio.sleep(0)  # the close has started and waits on its senders
    first.cancel()
    await asyncio.wait_for(rtc.close_peer_connection(pub), 15)
    assert pub.connectionState == "closed"
    await rtc.close_peer_connection(node)
    assert node.connectionState == "closed"


async def test_a_plain_close_cancelled_half_way_hangs_the_next_one():
    """What the test above guards against, on aiortc's own close() (aiortc 1.16)."""
    pub, node, _, _ = await tapped_call(PatternVideoTrack(160, 120, 10, 100_000), lambda *a: None)
    for _ in range(300):
        if pub.connectionState == "connected":
            break
        await asyncio.sleep(0.02)
    first = asyncio.ensure_future(pub.close())
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(pub.close())), 2)
    closing = pub._RTCPeerConnection__isClosed  # type: ignore[attr-defined]
    closing.set_result(True)  # release the waiter; the connection is left to the node's close
    await rtc.close_peer_connection(node)
