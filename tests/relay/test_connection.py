"""The sans-I/O relay connection in memory: no sockets, no event loop, time passed in."""

from __future__ import annotations

import struct

from relay import ErrorCode, PendingSource, RelayConfig, SubscribeError
from relay import protocol as p
from tests.relay.helpers import VP8, Collector, FakeSource, seq_of
from tests.relay.memory import handshake, live_producer, node_pair, pull


def test_handshake_subscribe_and_packets_byte_for_byte() -> None:
    a, b, wire = node_pair()
    handshake(b, wire)
    assert a.conn.authed and b.conn.authed
    assert a.conn.peer_key == b.key  # type: ignore[attr-defined]
    assert b.conn.rtt is not None
    src = a.sources["cam"] = FakeSource()
    results = b.subscribe("cam")
    wire.flush()
    rp = live_producer(results)
    assert rp.kind == "video" and rp.codec_params() == VP8
    col = Collector()
    rp.add_packet_listener(col)
    sent = [src.emit_next() for _ in range(50)]
    wire.flush()
    assert col.packets == sent
    assert rp.stats.packets == 50 and rp.stats.lost == 0
    (flow,) = a.conn.origin.flows.values()  # type: ignore[union-attr]
    assert flow.stats.packets == 50


def test_unknown_producer_is_a_subscribe_error() -> None:
    _a, b, wire = node_pair()
    handshake(b, wire)
    results = b.subscribe("nope")
    wire.flush()
    (err,) = results
    assert isinstance(err, SubscribeError) and err.code == ErrorCode.NOT_FOUND


def test_wrong_certificate_key_refused_before_any_message() -> None:
    _a, b, wire = node_pair(cert_key=b"x" * 32)
    handshake(b, wire)
    assert b.conn.dead and b.conn.close_out is not None
    assert b.conn.close_out[0] == ErrorCode.WRONG_PEER
    assert "certificate" in b.conn.close_out[1]
    assert b.counters.auth_refused == 1
    assert wire.control_bytes["b>a"] == 0


def test_unauthorized_client_refused_by_listener() -> None:
    a, b, wire = node_pair(authorize=False)
    handshake(b, wire)
    assert a.conn.close_out == (ErrorCode.UNAUTHORIZED, "node key not authorized")
    assert a.counters.auth_refused == 1 and not b.conn.authed


def test_message_before_authentication_closes() -> None:
    a, b, wire = node_pair()
    b.conn.control_out.append(p.encode_message(p.Subscribe(1, "cam")))
    wire.flush()
    assert a.conn.close_out is not None
    assert a.conn.close_out[0] == ErrorCode.PROTOCOL_VIOLATION


def test_loss_repaired_by_nack_from_origin_cache() -> None:
    a, b, wire = node_pair()
    handshake(b, wire)
    src = a.sources["cam"] = FakeSource()
    rp = pull(b, wire, "cam")
    col = Collector()
    rp.add_packet_listener(col)
    first_pass: set[int] = set()

    def lossy(direction: str, data: bytes) -> bool:
        if direction != "a>b":
            return False
        seq = seq_of(data[4:])
        if seq % 7 == 3 and seq < 190 and seq not in first_pass:
            first_pass.add(seq)
            return True
        return False

    wire.drop = lossy
    sent = []
    for _ in range(200):
        sent.append(seq_of(src.emit_next()))
        wire.run(0.005)
    wire.run(1.0)
    assert sorted(col.seqs) == sent
    assert rp.stats.repaired == len(first_pass) > 20
    (flow,) = a.conn.origin.flows.values()  # type: ignore[union-attr]
    assert flow.stats.retransmits == len(first_pass)


def test_keyframe_requests_limited_at_both_ends() -> None:
    a, b, wire = node_pair(RelayConfig(keyframe_interval=0.5, linger=5))
    handshake(b, wire)
    src = a.sources["cam"] = FakeSource()
    rp = pull(b, wire, "cam")
    rp.add_packet_listener(Collector())
    for _ in range(20):
        rp.request_keyframe()
        wire.run(0.005)
    assert src.keyframe_requests == 1
    wire.run(0.6)
    assert src.keyframe_requests == 2  # the trailing, coalesced one
    wire.run(0.6)
    assert src.keyframe_requests == 2
    # a peer bypassing its own limiter is policed by the origin
    assert rp.flow_id is not None
    for _ in range(20):
        b.conn.send_msg(p.KeyframeRequest(rp.flow_id))
    wire.flush()
    assert src.keyframe_requests == 3
    (flow,) = a.conn.origin.flows.values()  # type: ignore[union-attr]
    assert flow.stats.keyframes_dropped == 19


def test_linger_then_unsubscribe_releases_origin_listener() -> None:
    a, b, wire = node_pair(RelayConfig(linger=0.5))
    handshake(b, wire)
    src = a.sources["cam"] = FakeSource()
    rp = pull(b, wire, "cam")
    col = Collector()
    rp.add_packet_listener(col)
    rp.remove_packet_listener(col)
    wire.run(0.3)
    rp.add_packet_listener(col)  # back within the linger: the flow stays
    wire.run(1.0)
    assert not rp.closed and len(src.listeners) == 1
    rp.remove_packet_listener(col)
    wire.run(0.6)
    assert rp.closed and not src.listeners and not a.conn.origin.flows  # type: ignore[union-attr]


def test_producer_close_propagates() -> None:
    a, b, wire = node_pair()
    handshake(b, wire)
    src = a.sources["cam"] = FakeSource()
    rp = pull(b, wire, "cam")
    rp.add_packet_listener(Collector())
    closed: list[bool] = []
    rp.on_close(lambda: closed.append(True))
    src.close()
    wire.flush()
    assert closed == [True] and "cam" not in b.remote.producers  # type: ignore[union-attr]
    assert not rp.lost


def test_a_lost_producer_is_closed_as_lost_on_the_other_end() -> None:
    """A relayed producer whose own origin went away (a dead worker behind a pipe) is
    closed as lost, not ended: subscribers keep their tracks for a republished one."""
    a, b, wire = node_pair()
    handshake(b, wire)
    src = a.sources["cam"] = FakeSource()
    rp = pull(b, wire, "cam")
    rp.add_packet_listener(Collector())
    src.lost = True  # type: ignore[attr-defined]
    src.close()
    wire.flush()
    assert rp.closed and rp.lost


def test_garbage_is_counted_and_other_flows_keep_flowing() -> None:
    a, b, wire = node_pair()
    handshake(b, wire)
    s1, s2 = a.sources["one"], a.sources["two"] = FakeSource(), FakeSource()
    r1 = pull(b, wire, "one")
    r2 = pull(b, wire, "two")
    c1, c2 = Collector(), Collector()
    r1.add_packet_listener(c1)
    r2.add_packet_listener(c2)
    assert r1.flow_id is not None
    for _ in range(50):
        a.conn.datagrams_out += [
            b"junk",
            p.datagram_prefix(999) + bytes([0x80]) * 20,
            p.datagram_prefix(r1.flow_id) + bytes(20),
        ]
        b.conn.datagrams_out.append(b"\x00" * 40)
        b.conn.control_out.append(struct.pack("!BI", 1, 2) + b"\xc1\xc1")  # malformed body
        b.conn.send_msg(p.KeyframeRequest(12345))
        b.conn.send_msg(p.Nack(12345, [1, 2]))
        s1.emit_next()
        s2.emit_next()
        wire.run(0.005)
    assert len(c1.seqs) == 50 and len(c2.seqs) == 50
    assert b.counters.datagrams_malformed >= 100 and b.counters.datagrams_unknown_flow >= 50
    assert a.counters.datagrams_unexpected >= 50
    assert a.counters.control_malformed >= 50 and a.counters.unknown_flow_requests >= 100
    assert a.conn.authed and b.conn.authed


def test_oversized_control_frame_closes_the_connection() -> None:
    a, b, wire = node_pair()
    handshake(b, wire)
    a.sources["cam"] = FakeSource()
    rp = pull(b, wire, "cam")
    b.conn.control_out.append(struct.pack("!BI", 1, 10_000_000) + b"x" * 100)
    wire.flush()
    assert a.conn.close_out is not None and a.conn.close_out[0] == ErrorCode.MESSAGE_TOO_LARGE
    assert a.counters.control_fatal == 1
    assert not a.sources["cam"].listeners  # the origin released the producer
    # the peer learns it from the transport; its producer is interrupted, not closed
    b.conn.connection_lost(*a.conn.close_out)
    assert rp.state == "interrupted"


def test_silent_peer_detected_by_heartbeat_timeout() -> None:
    a, b, wire = node_pair(RelayConfig(heartbeat_interval=0.5, dead_after=2.5))
    handshake(b, wire)
    wire.run(5.0)
    assert a.conn.authed and b.conn.authed  # heartbeats keep both alive
    assert b.conn.rtt is not None
    wire.cut = True
    wire.run(4.0)
    assert b.conn.dead and b.conn.close_code == ErrorCode.HEARTBEAT_TIMEOUT
    assert a.conn.dead and a.counters.heartbeat_timeouts == 1


def test_unauthenticated_connection_times_out() -> None:
    a, _b, wire = node_pair(RelayConfig(heartbeat_interval=0.5))
    wire.run(10.0)  # the dialler never finishes TLS
    assert a.conn.close_out is not None and a.conn.close_out[0] == ErrorCode.TIMEOUT


def test_reconnect_resubscribes_and_asks_for_a_keyframe() -> None:
    a, b, wire = node_pair()
    handshake(b, wire)
    src = a.sources["cam"] = FakeSource()
    rp = pull(b, wire, "cam")
    col = Collector()
    rp.add_packet_listener(col)
    states: list[str] = []
    rp.on_state(states.append)
    b.conn.connection_lost(ErrorCode.HEARTBEAT_TIMEOUT, "test")
    a.conn.connection_lost(ErrorCode.HEARTBEAT_TIMEOUT, "test")
    assert rp.state == "interrupted" and not src.listeners
    # a new connection over the same remote flows (what RelayLink does on reconnect)
    a2, b2, wire2 = node_pair(clock=wire.clock)
    a2.sources["cam"] = src
    flows = b.remote
    assert flows is not None
    b2.conn.remote = flows
    b2.remote = flows
    b2.conn.handshake.peer_key = a2.key  # type: ignore[union-attr, attr-defined]
    b2.conn.peer_key = a2.key  # type: ignore[attr-defined]
    handshake(b2, wire2)
    wire2.flush()
    assert rp.state == "live" and states == ["interrupted", "live"]
    assert src.keyframe_requests == 1  # a decoder that missed packets needs one
    src.emit_next()
    wire2.flush()
    assert len(col.seqs) == 1


def test_room_states_reach_the_other_end_in_both_directions_and_bad_ones_are_skipped() -> None:
    a, b, wire = node_pair()
    handshake(b, wire)
    got: dict[str, list[p.RoomState]] = {"a": [], "b": []}
    a.conn.on_room_state = lambda conn, msg: got["a"].append(msg)
    b.conn.on_room_state = lambda conn, msg: got["b"].append(msg)
    state = p.RoomState(
        room="lobby",
        participants=2,
        producers=[p.RoomProducer("pr-1", "video")],
        members=[p.RoomMember("pa-1", "Ann"), p.RoomMember("pa-2")],
    )
    b.conn.send_msg(state)  # dialler to listener
    a.conn.send_msg(p.RoomState(room="lobby", participants=0))  # and back
    # Recoverable: a state with an unknown media kind, or too many producers, is skipped
    # and counted; the connection and the next message go on.
    bad_kind = p.encode_message(state).replace(b"video", b"vide0")
    b.conn.control_out.append(bad_kind)
    too_many = p.RoomState(room="x", participants=1)
    too_many.producers.extend(p.RoomProducer(f"p{i}", "audio") for i in range(300))
    b.conn.control_out.append(p.encode_message(too_many))
    b.conn.send_msg(p.RoomState(room="after", participants=1))
    wire.flush()
    assert got["a"] == [state, p.RoomState(room="after", participants=1)]
    assert got["b"] == [p.RoomState(room="lobby", participants=0)]
    assert a.counters.control_malformed == 2 and a.conn.authed and b.conn.authed


def test_room_state_before_authentication_closes() -> None:
    a, b, wire = node_pair()
    b.conn.control_out.append(p.encode_message(p.RoomState(room="lobby", participants=1)))
    wire.flush()
    assert a.conn.close_out is not None
    assert a.conn.close_out[0] == ErrorCode.PROTOCOL_VIOLATION


def test_a_lookup_answered_later_opens_the_flow_then() -> None:
    """A producer being fetched (from a worker process, or another node) is answered once
    it arrives; one that never does is NOT_FOUND."""
    a, b, wire = node_pair()
    handshake(b, wire)
    pending = PendingSource()
    a.sources["cam"] = pending  # type: ignore[assignment]
    results = b.subscribe("cam")
    wire.flush()
    assert results == []  # no answer yet
    src = FakeSource()
    pending.resolve(src)
    wire.flush()
    rp = live_producer(results)
    col = Collector()
    rp.add_packet_listener(col)
    sent = [src.emit_next() for _ in range(5)]
    wire.flush()
    assert col.packets == sent

    missing = PendingSource()
    a.sources["gone"] = missing  # type: ignore[assignment]
    results = b.subscribe("gone")
    wire.flush()
    missing.resolve(None)
    wire.flush()
    (err,) = results
    assert isinstance(err, SubscribeError) and err.code == ErrorCode.NOT_FOUND
