"""The relay pipe between worker processes: the state machine in memory, then real sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from relay import ErrorCode, RelayConfig, RelayPipe, SubscribeError, pipe_socketpair
from relay import protocol as p
from relay.pipe import CONTROL_TAG
from tests.relay.helpers import VP8, Collector, FakeSource, seq_of, wait_until
from tests.relay.memory import pipe_pair, pull

# -- the state machine in memory -------------------------------------------------------


def test_pipe_both_ways_with_nack_repair_keyframes_linger_and_close() -> None:
    a, b, wire = pipe_pair(RelayConfig(linger=0.5))
    assert a.conn.authed and b.conn.authed  # trusted from the start: no handshake
    src = a.sources["cam"] = FakeSource()
    mic = b.sources["mic"] = FakeSource(kind="audio")
    rp = pull(b, wire, "cam")
    back = pull(a, wire, "mic")  # the same pipe carries flows the other way too
    assert rp.codec_params() == VP8 and back.kind == "audio"
    col, col_back = Collector(), Collector()
    rp.add_packet_listener(col)
    back.add_packet_listener(col_back)
    lost: set[int] = set()

    def lossy(direction: str, data: bytes) -> bool:
        seq = seq_of(data[4:])
        if direction == "a>b" and seq % 10 == 4 and seq < 90 and seq not in lost:
            lost.add(seq)
            return True
        return False

    wire.drop = lossy
    sent = []
    for _ in range(100):
        sent.append(seq_of(src.emit_next()))
        mic.emit_next(size=100)
        wire.run(0.005)
    wire.run(0.5)
    assert sorted(col.seqs) == sent and len(col_back.seqs) == 100
    assert rp.stats.repaired == len(lost) == 9
    (served,) = a.conn.origin.flows.values()  # type: ignore[union-attr]
    assert served.stats.retransmits == 9
    # keyframe requests go upstream, rate-limited
    rp.request_keyframe()
    rp.request_keyframe()
    wire.flush()
    assert src.keyframe_requests == 1
    # linger: the flow outlives its last listener briefly, then is released at the origin
    rp.remove_packet_listener(col)
    wire.run(0.3)
    assert src.listeners and not rp.closed
    wire.run(0.5)
    assert rp.closed and not src.listeners
    # the origin producer closes: the piped producer closes
    closed: list[bool] = []
    back.on_close(lambda: closed.append(True))
    mic.close()
    wire.flush()
    assert closed == [True] and not a.remote.producers  # type: ignore[union-attr]


def test_pipe_goodbye_closes_the_other_end() -> None:
    a, b, wire = pipe_pair()
    src = a.sources["cam"] = FakeSource()
    rp = pull(b, wire, "cam")
    rp.add_packet_listener(Collector())
    a.conn.abort(ErrorCode.SHUTDOWN, "pipe closed")
    # what RelayPipe sends when its connection closes
    assert a.conn.close_out is not None
    b.conn.receive_control(p.encode_message(p.ErrorMsg(0, *a.conn.close_out)), False, 0.0)
    assert b.conn.dead and b.conn.close_code == ErrorCode.SHUTDOWN
    assert rp.state == "interrupted" and not src.listeners


# -- real sockets -------------------------------------------------------------------------


def udp_pair() -> tuple[socket.socket, socket.socket]:
    """Two loopback UDP sockets connected to each other."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    return a, b


@pytest.fixture(params=["unix", "udp"])
async def pipes(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[RelayPipe, RelayPipe, dict[str, FakeSource], dict[str, FakeSource]]]:
    sa, sb = pipe_socketpair() if request.param == "unix" else udp_pair()
    sources_a: dict[str, FakeSource] = {}
    sources_b: dict[str, FakeSource] = {}
    cfg = RelayConfig(linger=0.5)
    a = await RelayPipe.open(sa, sources_a.get, cfg, name="worker-a")
    b = await RelayPipe.open(sb, sources_b.get, cfg, name="worker-b")
    yield a, b, sources_a, sources_b
    await a.close()
    await b.close()


async def test_piped_producer_over_real_sockets(
    pipes: tuple[RelayPipe, RelayPipe, dict[str, FakeSource], dict[str, FakeSource]],
) -> None:
    a, b, sources_a, sources_b = pipes
    src = sources_a["cam"] = FakeSource()
    rps = await asyncio.gather(*(b.subscribe("cam") for _ in range(5)))
    rp = rps[0]
    assert all(x is rp for x in rps) and rp.codec_params() == VP8
    listeners = [Collector() for _ in range(3)]
    for c in listeners:
        rp.add_packet_listener(c)
    sent = []
    for _ in range(300):
        sent.append(src.emit_next())
        if len(sent) % 20 == 0:
            await asyncio.sleep(0.002)
    assert await wait_until(lambda: all(c.packets == sent for c in listeners))
    assert len(src.listeners) == 1 and len(a.origin_flows()) == 1  # one flow, 3 listeners
    # a local NACK the pipe-side cache cannot answer is repaired from the origin's cache
    rp._cache[7 & rp._mask] = None
    rp.nack([7])
    assert await wait_until(lambda: listeners[0].seqs.count(7) == 2)
    assert a.origin_flows()[0][2].retransmits == 1
    # keyframe requests reach the origin producer
    rp.request_keyframe()
    assert await wait_until(lambda: src.keyframe_requests == 1)
    # unknown producers are a clean error
    with pytest.raises(SubscribeError):
        await b.subscribe("nope")
    # linger, then the origin lets go
    for c in listeners:
        rp.remove_packet_listener(c)
    assert await wait_until(lambda: rp.closed and not src.listeners, 5)
    # the origin producer closing closes the piped one
    sources_b["mic"] = mic = FakeSource(kind="audio")
    back = await a.subscribe("mic")
    back.add_packet_listener(Collector())
    mic.close()
    assert await wait_until(lambda: back.closed)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_burst_larger_than_the_socket_buffer_arrives_whole(loop: str) -> None:
    """The sender waits for a full receiver (worker processes run uvloop, whose loop, like
    asyncio's, refuses a writer on a socket that a transport owns)."""
    factory = asyncio.new_event_loop
    if loop == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop

    async def burst() -> None:
        sa, sb = pipe_socketpair()
        for sock in (sa, sb):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sources: dict[str, FakeSource] = {}
        a = await RelayPipe.open(sa, sources.get, name="worker-a")
        b = await RelayPipe.open(sb, {}.get, name="worker-b")
        try:
            src = sources["cam"] = FakeSource()
            rp = await b.subscribe("cam")
            got = Collector()
            rp.add_packet_listener(got)
            # 400 packets of 1,200 bytes in one go, without yielding: far more than the
            # socket holds, so most wait until the receiver has read.
            sent = [src.emit_next(size=1200) for _ in range(400)]
            assert await wait_until(lambda: got.packets == sent, 10)
            rp.request_keyframe()  # control still flows after the backlog
            assert await wait_until(lambda: src.keyframe_requests == 1)
            assert a.state == b.state == "live"
        finally:
            await a.close()
            await b.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(burst())


async def test_closing_one_end_closes_the_other(
    pipes: tuple[RelayPipe, RelayPipe, dict[str, FakeSource], dict[str, FakeSource]],
) -> None:
    a, b, sources_a, _ = pipes
    src = sources_a["cam"] = FakeSource()
    rp = await b.subscribe("cam")
    rp.add_packet_listener(Collector())
    closed: list[str] = []
    b.on_close(lambda: closed.append("b"))
    await a.close()
    assert await wait_until(lambda: closed == ["b"] and rp.closed)
    assert b.state == "closed" and not src.listeners


async def test_junk_datagrams_are_counted_not_fatal() -> None:
    sa, sb = pipe_socketpair()
    raw_peer = sb
    sources: dict[str, FakeSource] = {"cam": FakeSource()}
    pipe = await RelayPipe.open(sa, sources.get, RelayConfig())
    try:
        malformed = CONTROL_TAG + struct.pack("!BI", 1, 2) + b"\xc1\xc1"
        for junk in (b"", b"x", b"\x00" * 3, malformed, b"\x00\x00\x00\x09" + b"z" * 30):
            raw_peer.send(junk)
        raw_peer.send(CONTROL_TAG + p.encode_message(p.Subscribe(5, "cam")))
        assert await wait_until(lambda: len(sources["cam"].listeners) == 1)
        counters = pipe.counters
        assert counters.control_malformed == 1
        assert counters.datagrams_malformed + counters.datagrams_unknown_flow >= 3
        assert pipe.state == "live"
        # a control frame of an unknown version cannot be resynchronised: the pipe closes
        raw_peer.send(CONTROL_TAG + b"\x07" + bytes(8))
        assert await wait_until(lambda: pipe.state == "closed")
        assert pipe.connection.close_code == ErrorCode.UNSUPPORTED_VERSION
        assert not sources["cam"].listeners
    finally:
        await pipe.close()
        raw_peer.close()
