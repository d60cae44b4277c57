"""Malformed, unauthorised and hostile input gets a clear error while a call keeps flowing."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time

import aiohttp
import pytest

from peer.client import CascadeClient, CascadeError
from peer.media import PatternVideoTrack
from peer.signaling import MAX_MESSAGE_BYTES
from peer.tokens import issue_token
from tests.conftest import SECRET, ClientFactory, token
from tests.peer.raw_ws import RawWebSocket

VALID_OFFER_LIKE = (
    "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
)


@pytest.fixture
async def call_in_progress(node, clients: ClientFactory):
    pub = await clients("call", "alice")
    producers = await pub.publish([PatternVideoTrack(160, 120)])
    sub = await clients("call", "bob")
    (track,) = await sub.wait_for_tracks(1, "video")
    return pub, sub, track, producers[0]["producer_id"]


async def raw_reply(client: CascadeClient, text: str) -> dict:
    before = len(client.events)
    await client.send_raw(text)
    for _ in range(200):
        for event in client.events[before:]:
            if event.get("type") == "error":
                return event
        await asyncio.sleep(0.01)
    raise AssertionError(f"no error reply to {text[:60]!r}")


RAW_CASES = [
    ("not json at all", "bad_json"),
    ('{"type": "join", ', "bad_json"),
    ("[1, 2, 3]", "bad_message"),
    ('{"room": "x"}', "bad_message"),
    ('{"type": "teleport"}', "unknown_type"),
    ('{"type": "join", "room": 123, "token": "t"}', "bad_message"),
    ('{"type": "join", "room": "x", "token": "t", "evil": 1}', "bad_message"),
    ('{"type": "join", "room": "../etc", "token": "t"}', "bad_message"),
    ('{"type": "subscribe"}', "bad_message"),
    ('{"type": "publish", "sdp": 5}', "bad_message"),
    ('{"type": ["join"]}', "bad_message"),
    ('{"type": {"join": 1}}', "bad_message"),
    ('{"type": "ping", "id": ' + "[" * 1000 + "]" * 1000 + "}", "bad_message"),
    ('{"type": ' + "[" * 1000 + "]" * 1000 + "}", "bad_message"),
    ("[" * 1000 + "]" * 1000, "bad_message"),
    ('{"type": "join", "room": "call\\n", "token": "t"}', "bad_message"),
    ('{"type": "publish", "sdp": "' + "v=0 " * 10 + '"}', "not_joined"),
    ('{"type": "join", "room": "call", "token": "t", "region": "../eu"}', "bad_message"),
    ('{"type": "join", "room": "call", "token": "t", "region": "' + "e" * 65 + '"}', "bad_message"),
    ('{"type": "join", "room": "call", "token": "t", "hops": 99}', "bad_message"),
    ('{"type": "join", "room": "call", "token": "t", "hops": -1}', "bad_message"),
    ('{"type": "join", "room": "call", "token": "t", "hops": "2"}', "bad_message"),
]


@pytest.mark.parametrize(("text", "code"), RAW_CASES)
async def test_malformed_messages_get_error_codes(call_in_progress, clients, text, code):
    _, _, track, _ = call_in_progress
    frames = track.frames_decoded
    attacker = await clients()
    reply = await raw_reply(attacker, text)
    assert reply["code"] == code
    # The attacker's socket still works and the call keeps flowing.
    assert (await attacker.ping())["type"] == "pong"
    await asyncio.sleep(0.3)
    assert track.frames_decoded > frames


async def expect_error(coro, code: str) -> None:
    with pytest.raises(CascadeError) as info:
        await coro
    assert info.value.code == code


async def test_token_and_grant_errors(call_in_progress, clients):
    _, _, track, producer_id = call_in_progress
    frames = track.frames_decoded
    c = await clients()
    await expect_error(c.join("call", "garbage.token.value"), "bad_token")
    expired = issue_token(SECRET, "call", "eve", ttl=10, now=time.time() - 60)
    await expect_error(c.join("call", expired), "token_expired")
    await expect_error(c.join("call", token("other-room", "eve")), "forbidden")
    forged = issue_token("another-secret-of-enough-length-0123456789", "call", "eve")
    await expect_error(c.join("call", forged), "untrusted_token")
    await expect_error(c.request({"type": "subscribe", "producer_id": producer_id}), "not_joined")

    viewer = await clients("call", "viewer", auto_subscribe=False)
    viewer_only = await clients()
    await viewer_only.join("call", token("call", "v2", publish=False), auto_subscribe=False)
    await expect_error(viewer_only.publish([PatternVideoTrack(160, 120)]), "forbidden")
    no_sub = await clients()
    await no_sub.join("call", token("call", "v3", subscribe=False), auto_subscribe=False)
    await expect_error(no_sub.subscribe(producer_id), "forbidden")
    await expect_error(viewer.join("call", token("call", "viewer")), "already_joined")
    await asyncio.sleep(0.3)
    assert track.frames_decoded > frames


async def test_unknown_ids_and_bad_sdp(call_in_progress, clients):
    pub, _, track, producer_id = call_in_progress
    frames = track.frames_decoded
    c = await clients("call", "mallory", auto_subscribe=False)
    await expect_error(c.subscribe("pr-doesnotexist"), "unknown_producer")
    await expect_error(c.unsubscribe("co-doesnotexist"), "unknown_consumer")
    await expect_error(c.pause("co-doesnotexist"), "unknown_consumer")
    await expect_error(c.resume("co-doesnotexist"), "unknown_consumer")
    await expect_error(c.unpublish(producer_id), "unknown_producer")  # not mine
    await expect_error(pub.subscribe(producer_id), "bad_request")  # my own
    await expect_error(c.request({"type": "publish", "sdp": VALID_OFFER_LIKE}), "bad_sdp")
    garbage = await clients("call", "mallory2", auto_subscribe=False)
    await expect_error(garbage.request({"type": "publish", "sdp": "garbage " * 8}), "bad_sdp")
    # ... and the same participant can still publish for real afterwards.
    assert len(await garbage.publish([PatternVideoTrack(160, 120)])) == 1
    await expect_error(c.request({"type": "answer", "sdp": VALID_OFFER_LIKE}), "unexpected_answer")
    await c.subscribe(producer_id)
    await expect_error(c.subscribe(producer_id), "already_subscribed")
    await asyncio.sleep(0.3)
    assert track.frames_decoded > frames
    assert track.stats()["decode_errors"] == 0


async def test_binary_and_oversized_frames(node, call_in_progress):
    _, _, track, _ = call_in_progress
    frames = track.frames_decoded
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(node.url.replace("http", "ws") + "/ws") as ws:
            await ws.send_bytes(b"\xff\xfe\x00garbage")
            reply = json.loads((await ws.receive(timeout=5)).data)
            assert reply["code"] == "bad_json"
        for size in (MAX_MESSAGE_BYTES + 1, 2 * 1024 * 1024):
            async with http.ws_connect(node.url.replace("http", "ws") + "/ws") as ws:
                await ws.send_str(json.dumps({"type": "ping", "pad": "x" * size}))
                reply = json.loads((await ws.receive(timeout=5)).data)
                assert reply["code"] == "too_large"
                msg = await ws.receive(timeout=5)
                # Then the node closes that socket with 1009 (message too big).
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == 1009
    await asyncio.sleep(0.3)
    assert track.frames_decoded > frames
    assert node.stats()["limits"]["messages_too_large"] == 2


async def test_message_of_exactly_the_limit_is_accepted(call_in_progress):
    pub, _, track, _ = call_in_progress
    text = '{"type": "ping", "id": 7' + " " * MAX_MESSAGE_BYTES
    text = text[: MAX_MESSAGE_BYTES - 1] + "}"
    assert len(text.encode()) == MAX_MESSAGE_BYTES
    before = len(pub.events)
    await pub.send_raw(text)
    for _ in range(200):
        if any(e.get("type") == "pong" and e.get("id") == 7 for e in pub.events[before:]):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("no pong to a message of exactly the limit")
    frames = track.frames_decoded
    await asyncio.sleep(0.3)
    assert track.frames_decoded > frames


async def test_oversized_frame_refused_from_its_header(node, call_in_progress):
    """A frame declaring 100 MB is refused before its payload arrives (nothing buffered)."""
    _, _, track, _ = call_in_progress
    raw = await RawWebSocket.connect(node.config.host, node.config.port)
    header = RawWebSocket.frame(b"", length=100_000_000)
    raw.writer.write(header + b"{" * 1000)
    opcode, payload = await raw.receive()
    assert opcode == 1 and json.loads(payload)["code"] == "too_large"
    assert await raw.close_code() == 1009
    raw.close()
    frames = track.frames_decoded
    await asyncio.sleep(0.3)
    assert track.frames_decoded > frames


async def test_unmasked_client_frames_are_refused(node, call_in_progress):
    _, _, track, _ = call_in_progress
    raw = await RawWebSocket.connect(node.config.host, node.config.port)
    await raw.send_text('{"type": "ping", "id": 1}')  # masked: answered
    _, payload = await raw.receive()
    assert json.loads(payload)["type"] == "pong"
    await raw.send_text('{"type": "ping", "id": 2}', masked=False)
    assert await raw.close_code() == 1002  # protocol error
    raw.close()
    assert node.stats()["limits"]["unmasked_frames"] == 1
    frames = track.frames_decoded
    await asyncio.sleep(0.3)
    assert track.frames_decoded > frames


CRASH_SHAPES = [
    '{"type": ["join"]}',
    '{"type": {"join": "call"}}',
    '{"type": "ping", "id": ' + "[" * 1000 + "]" * 1000 + "}",
    "[" * 1200 + "]" * 1200,
]


async def test_crash_shapes_from_a_joined_participant(node, call_in_progress):
    """Issue 7.2: a joined participant sending these stays in the room, its media flowing."""
    _, sub, track, _ = call_in_progress
    before = node.stats()["bad_messages"]
    for text in CRASH_SHAPES:
        reply = await raw_reply(sub, text)
        assert reply["code"] == "bad_message"
    assert node.stats()["bad_messages"] == before + len(CRASH_SHAPES)
    assert sub.participant_id in {s.participant_id for s in node.rooms.members("call")}
    assert (await sub.ping())["type"] == "pong"
    frames = track.frames_decoded
    await asyncio.sleep(0.3)
    assert track.frames_decoded > frames


async def test_room_name_with_trailing_newline_is_refused(call_in_progress, clients):
    _, _, track, _ = call_in_progress
    c = await clients()
    reply = await raw_reply(
        c, json.dumps({"type": "join", "room": "call\n", "token": token("call", "eve")})
    )
    assert reply["code"] == "bad_message"
    frames = track.frames_decoded
    await asyncio.sleep(0.3)
    assert track.frames_decoded > frames


async def test_garbage_udp_on_media_ports(node, call_in_progress):
    pub, _sub, track, _ = call_in_progress
    from peer import aiortc_adapter as rtc

    ports = set()
    for session in node.rooms.members("call"):
        for pc in (session.publish_pc, session.subscribe_pc):
            if pc is not None:
                ports.update(rtc.local_candidate_ports(pc))
    assert ports
    frames = track.frames_decoded
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    garbage = [
        b"",
        b"\x00",
        b"\x80" * 12,
        b"\x90\x60" + b"\xab" * 200,
        b"\x16\xfe\xfd" + b"\x00" * 50,
        b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + b"\x00" * 12,
        bytes(range(256)) * 4,
    ]
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for host, port in ports:
            for g in garbage:
                sock.sendto(g, (host, port))
        await asyncio.sleep(0.01)
    sock.close()
    await asyncio.sleep(0.5)
    assert track.frames_decoded > frames + 10
    assert track.stats()["decode_errors"] == 0
    assert (await pub.ping())["type"] == "pong"


def _session_of(node, room: str, participant_id: str):
    return next(s for s in node.rooms.members(room) if s.participant_id == participant_id)


async def _grows(read, by: int = 1, timeout: float = 15.0) -> bool:
    start = read()
    for _ in range(int(timeout / 0.05)):
        if read() >= start + by:
            return True
        await asyncio.sleep(0.05)
    return False


def _stun_check(ufrag: str) -> bytes:
    """A connectivity check naming our side's ``ufrag`` (no integrity: a forger's)."""
    value = f"{ufrag}:attacker".encode()
    attr = struct.pack("!HH", 0x0006, len(value)) + value + b"\0" * (-len(value) % 4)
    return struct.pack("!HHI", 1, len(attr), 0x2112A442) + os.urandom(12) + attr


def _ufrag(pc) -> str:
    return pc.localDescription.sdp.split("a=ice-ufrag:")[1].split()[0]


@pytest.mark.parametrize("node", [0, None], indirect=True, ids=["one-port", "port-per-transport"])
async def test_hostile_datagrams_on_ice_ports_never_stop_the_call(node, clients: ClientFactory):
    """Issue 7.1: every datagram class at the publisher's and a subscriber's ICE ports on
    the node; both subscribers keep decoding and the attacked subscriber's RTCP (NACK,
    PLI) still reaches the node. On the node's one ICE port, strangers' datagrams reach no
    transport; the attacker here knows each transport's ufrag, so that its datagrams do."""
    from bench.hostile import send_datagrams, send_hostile_burst
    from peer import aiortc_adapter as rtc

    pub = await clients("call", "alice")
    await pub.publish([PatternVideoTrack(160, 120)])
    subs = [await clients("call", f"viewer{i}") for i in range(2)]
    tracks = [(await s.wait_for_tracks(1, "video"))[0] for s in subs]
    publisher_pc = _session_of(node, "call", pub.participant_id).publish_pc
    victim = _session_of(node, "call", subs[0].participant_id)
    targets = rtc.local_candidate_ports(publisher_pc) + rtc.local_candidate_ports(
        victim.subscribe_pc
    )
    assert len(targets) >= 2

    if node.ice_ports is None:
        send_datagrams(targets, [b"\x80" + b"\x00" * 1500])  # the reproduction of issue 7.1
        await send_hostile_burst(targets)
    else:
        (port,) = set(targets)
        for pc in (publisher_pc, victim.subscribe_pc):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
                attacker.bind(("127.0.0.1", 0))
                send_datagrams([port], [_stun_check(_ufrag(pc))], attacker)  # routes it
                send_datagrams([port], [b"\x80" + b"\x00" * 1500], attacker)
                await send_hostile_burst([port], sock=attacker)

    for track in tracks:
        assert await _grows(lambda t=track: t.frames_decoded, by=20)
        assert track.stats()["decode_errors"] == 0
    (consumer,) = [s.consumer for s in victim.subscriptions.values()]
    # PLI from the attacked subscriber reaches its consumer on the node.
    receiver = tracks[0].receiver
    ssrc = rtc.remote_media_ssrcs(receiver)[0]
    rtc.send_pli(receiver, ssrc)
    assert await _grows(lambda: consumer.stats.plis)
    # So do NACKs: drop one RTP packet in 20 at the subscriber for a moment.
    count = 0

    def keep(data: bytes) -> bool:
        nonlocal count
        if len(data) > 12 and 127 < data[0] < 192 and not 191 < data[1] < 224:
            count += 1
            return count % 20 != 0
        return True

    rtc.set_receive_filter(subs[0]._subscribe_pc, keep)
    assert await _grows(lambda: consumer.stats.nacks)
    assert (await pub.ping())["type"] == "pong"
    assert node.stats()["datagrams_dropped"] > 0


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/place", 400),
        ("/place?room=", 400),
        ("/place?room=" + "r" * 200, 400),
        ("/place?room=call&region=%00%ff", 200),  # an unknown region is only a hint
        ("/overlay", 404),  # this node runs without a directory
    ],
)
async def test_placement_routes_answer_bad_queries_with_an_error(
    node, call_in_progress, path, status
):
    _, _, track, _ = call_in_progress
    frames = track.frames_decoded
    async with aiohttp.ClientSession() as http, http.get(node.url + path) as reply:
        assert reply.status == status
        body = await reply.json()
    assert ("error" in body) == (status != 200)
    await asyncio.sleep(0.3)
    assert track.frames_decoded > frames


async def test_move_fields_and_admin_drain_refuse_bad_input_during_a_call(
    node, call_in_progress, clients
):
    _, _, track, producer_id = call_in_progress
    # A republish may only continue the sender's own tracks (sources bound to the identity).
    mallory = await clients("call", "mallory")
    offer = VALID_OFFER_LIKE + "a=mid:0\r\na=sendonly\r\n"
    with pytest.raises(CascadeError) as info:
        await mallory.request({"type": "publish", "sdp": offer, "sources": {"0": "alice/cam"}})
    assert info.value.code == "bad_request"
    for text in (
        '{"type": "publish", "sdp": "v=0 xxxxxxxxx", "sources": ["alice/x"]}',
        '{"type": "publish", "sdp": "v=0 xxxxxxxxx", "sources": {"0": ""}}',
        '{"type": "join", "room": "call", "token": "t", "resumes": 5}',
        '{"type": "join", "room": "call", "token": "t", "resumes": "' + "p" * 65 + '"}',
    ):
        assert (await raw_reply(mallory, text))["code"] == "bad_message"
    # A forged `resumes` (someone else's participant id) only hides that participant's
    # producers from the one who claims it: nobody else is affected.
    alice_id = next(iter(node.rooms.members("call"))).participant_id
    eve = CascadeClient(node.url)
    await eve.connect()
    try:
        joined = await eve.request(
            {"type": "join", "room": "call", "token": token("call", "eve"), "resumes": alice_id}
        )
        assert producer_id not in {p["producer_id"] for p in joined["producers"]}
        assert alice_id not in {p["participant_id"] for p in joined["participants"]}
    finally:
        await eve.close()
    # The admin route refuses anything but the admin token or the node key.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for header in ("", "Bearer x", "CascadeNode 1.AAAA", "CascadeNode " + "9" * 40, "Basic"):
            async with http.post(
                f"{node.url}/admin/drain", headers={"Authorization": header} if header else {}
            ) as reply:
                assert reply.status == 401
                assert (await reply.json())["type"] == "error"
    assert not node.draining
    frames = track.frames_decoded
    await asyncio.sleep(0.5)
    assert track.frames_decoded > frames
