"""End-to-end forwarding with real aiortc peers on loopback."""

from __future__ import annotations

import asyncio
import random

from peer import aiortc_adapter as rtc
from peer.media import PatternVideoTrack, ToneAudioTrack
from tests.conftest import ClientFactory


async def test_one_publisher_three_subscribers_decode_video_and_audio(node, clients: ClientFactory):
    pub = await clients("room1", "alice")
    producers = await pub.publish(
        [PatternVideoTrack(320, 240, periodic_keyframes=False), ToneAudioTrack()]
    )
    assert {p["kind"] for p in producers} == {"video", "audio"}
    subs = [await clients("room1", f"bob{i}") for i in range(3)]
    for sub in subs:
        video = await sub.wait_for_tracks(1, "video", timeout=20)
        audio = await sub.wait_for_tracks(1, "audio", timeout=20)
        assert (video[0].width, video[0].height) == (320, 240)
        assert audio[0].frames_decoded > 0
    await asyncio.sleep(1.0)
    for sub in subs:
        for t in sub.tracks.values():
            assert t.stats()["decode_errors"] == 0
            assert t.frames_decoded > 5
    # Forwarding created no decoder or encoder on the node.
    assert node.stats()["codec_instances"] == 0
    totals = node.stats()["totals"]
    assert totals["producers"] == 2 and totals["consumers"] == 6


async def test_two_rooms_stay_isolated(node, clients: ClientFactory):
    a = await clients("roomA", "a")
    b = await clients("roomB", "b")
    await a.publish([PatternVideoTrack(320, 240, periodic_keyframes=False)])
    await b.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    sa = await clients("roomA", "sa")
    sb = await clients("roomB", "sb")
    (ta,) = await sa.wait_for_tracks(1, "video")
    (tb,) = await sb.wait_for_tracks(1, "video")
    assert (ta.width, ta.height) == (320, 240)
    assert (tb.width, tb.height) == (160, 120)
    await asyncio.sleep(0.5)
    assert len(sa.tracks) == 1 and len(sb.tracks) == 1
    assert ta.producer_id != tb.producer_id
    assert {p["participant_id"] for p in sa.room_state["participants"]} == {a.participant_id}


async def test_late_joiner_decodes_within_one_second(node, clients: ClientFactory):
    pub = await clients("late", "alice")
    await pub.publish([PatternVideoTrack(320, 240, periodic_keyframes=False)])
    early = await clients("late", "early")
    await early.wait_for_tracks(1, "video")
    # Wait past the keyframe-request window so the late joiner's PLI is not held back.
    await asyncio.sleep(1.5)
    late = await clients("late", "late")
    (track,) = await late.wait_for_tracks(1, "video", timeout=10)
    assert track.first_frame_at is not None
    assert track.first_frame_at - track.subscribed_at < 1.0
    assert track.stats()["decode_errors"] == 0


async def test_publisher_leaves_subscribers_told_and_room_keeps_working(
    node, clients: ClientFactory
):
    pub = await clients("leave", "alice")
    (video,) = await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    sub = await clients("leave", "bob")
    (track,) = await sub.wait_for_tracks(1, "video")
    await pub.close()
    removed = await sub.wait_event("producer_removed", producer_id=video["producer_id"])
    assert removed
    await sub.wait_event("participant_left", participant_id=pub.participant_id)
    for _ in range(50):
        if track.ended:
            break
        await asyncio.sleep(0.05)
    assert track.ended
    # The room still works: a new publisher reaches the remaining subscriber.
    pub2 = await clients("leave", "carol")
    await pub2.publish([PatternVideoTrack(320, 240, periodic_keyframes=False)])
    fresh = [t for t in (await sub.wait_for_tracks(2, "video")) if not t.ended]
    assert fresh and (fresh[0].width, fresh[0].height) == (320, 240)


async def test_nack_repairs_three_percent_loss(node, clients: ClientFactory):
    pub = await clients("lossy", "alice")
    await pub.publish([PatternVideoTrack(320, 240, bitrate=600_000, periodic_keyframes=False)])
    sub = await clients("lossy", "bob")
    (track,) = await sub.wait_for_tracks(1, "video")
    rng = random.Random(42)
    dropped = 0

    def keep(data: bytes) -> bool:
        nonlocal dropped
        # Drop 3% of SRTP media (not RTCP, DTLS or STUN).
        if 127 < data[0] < 192 and not 192 <= data[1] <= 223 and rng.random() < 0.03:
            dropped += 1
            return False
        return True

    rtc.set_receive_filter(sub._subscribe_pc, keep)
    before = track.frames_decoded
    # About 5 s of video; longer on a loaded machine, whose publisher sends less.
    for _ in range(300):
        await asyncio.sleep(0.1)
        if dropped > 20 and track.frames_decoded - before > 45:
            break
    assert dropped > 20
    stats = await sub.server_stats()
    (consumer,) = stats["consumers"].values()
    assert consumer["nacks"] > 0 and consumer["retransmits"] > 0
    assert track.stats()["decode_errors"] == 0
    # Video keeps flowing. (aiortc's receiver re-NACKs a lost retransmission only when the
    # next gap appears and its jitter buffer waits in order, so short stalls happen.)
    assert track.frames_decoded - before > 45


async def test_pause_resume_keeps_sequence_continuous(node, clients: ClientFactory):
    pub = await clients("pause", "alice")
    await pub.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    sub = await clients("pause", "bob")
    (track,) = await sub.wait_for_tracks(1, "video")
    await sub.pause(track.consumer_id)
    await asyncio.sleep(0.5)
    paused_frames = track.frames_decoded
    await asyncio.sleep(0.5)
    assert track.frames_decoded <= paused_frames + 2
    await sub.resume(track.consumer_id)
    await asyncio.sleep(1.5)
    assert track.frames_decoded > paused_frames + 10
    assert track.stats()["decode_errors"] == 0
    # Continuity: the subscriber saw no sequence gap across the pause.
    assert track.stats()["packets_lost"] == 0


async def test_every_late_joiner_decodes_every_publisher(node, clients: ClientFactory):
    # Browser-like publishers (keyframes only on request) joining one after another: each
    # newcomer subscribes to several video producers in one negotiation and must get a
    # keyframe from each of them.
    members = []
    for i in range(4):
        client = await clients("many", f"p{i}")
        await client.publish(
            [PatternVideoTrack(160, 120, periodic_keyframes=False), ToneAudioTrack()]
        )
        members.append(client)
        await asyncio.sleep(0.3)
    for client in members:
        tracks = await client.wait_for_tracks(3, "video", timeout=20)
        for _ in range(100):
            if all(t.frames_decoded > 5 for t in tracks):
                break
            await asyncio.sleep(0.1)
        decoded = {t.participant_id: t.frames_decoded for t in tracks}
        others = {m.participant_id for m in members} - {client.participant_id}
        assert set(decoded) == others
        assert all(n > 5 for n in decoded.values()), decoded
        assert all(t.stats()["decode_errors"] == 0 for t in tracks)
        audio = await client.wait_for_tracks(3, "audio", timeout=20)
        assert {t.participant_id for t in audio} == others


async def test_a_member_whose_media_connection_closed_does_not_cost_the_others_a_producer(
    node, clients: ClientFactory
):
    # "gone" closed its subscribe connection (a client moving to another node or leaving
    # does that) but its signaling socket is still open: the node still lists it until the
    # socket closes. A producer published meanwhile reaches every other member, and both
    # of the publisher's producers are announced.
    first = await clients("closed", "first")
    gone = await clients("closed", "gone")
    gone.reconnect = False  # it stays as it is: no failover
    last = await clients("closed", "last")
    seed = await clients("closed", "seed")
    await seed.publish([PatternVideoTrack(160, 120, periodic_keyframes=False)])
    for member in (first, gone, last):
        await member.wait_for_tracks(1, "video")
    session = next(
        m for m in node.rooms.members("closed") if m.participant_id == gone.participant_id
    )
    await rtc.close_peer_connection(gone._subscribe_pc)

    async def transport_closed() -> None:
        pc = session.subscribe_pc
        while pc.connectionState != "closed":
            await asyncio.sleep(0.05)

    await asyncio.wait_for(transport_closed(), 10)
    pub = await clients("closed", "pub")
    produced = await pub.publish(
        [PatternVideoTrack(160, 120, periodic_keyframes=False), ToneAudioTrack()]
    )
    for member in (first, last):
        video = await member.wait_for_tracks(2, "video", timeout=20)
        audio = await member.wait_for_tracks(1, "audio", timeout=20)
        assert {t.producer_id for t in video + audio} >= {p["producer_id"] for p in produced}
    # The member whose media connection closed is let go (its client rejoins if it wants).
    assert gone.participant_id not in node.rooms.get("closed")
