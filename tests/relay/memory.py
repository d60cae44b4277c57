"""In-memory harness for the sans-I/O relay layer: two connections joined by a wire.

Nothing here opens a socket or runs an event loop. Time is a number the test advances;
:meth:`Wire.run` delivers control bytes and datagrams in both directions and runs every
timer that is due, the way a transport adapter would.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay import RelayConfig, RelayCounters, RemoteProducer, public_key_bytes
from relay.connection import RelayConnection
from relay.handshake import ClientHandshake, ServerHandshake
from relay.origin import OriginFlows
from relay.protocol import ALPN
from relay.remote import RemoteFlows, SubscribeResult
from tests.relay.helpers import FakeSource


class Clock:
    """The test's notion of now."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class End:
    """One side: a connection, its origin table over ``sources``, its remote flows."""

    def __init__(
        self,
        clock: Clock,
        config: RelayConfig,
        conn: RelayConnection,
        sources: dict[str, FakeSource],
        remote: RemoteFlows | None,
    ) -> None:
        self.clock = clock
        self.config = config
        self.conn = conn
        self.sources = sources
        self.remote = remote
        self.counters = conn.counters

    def subscribe(self, producer_id: str) -> list[SubscribeResult]:
        """Send SUBSCRIBE; the list gets the result once the wire delivered the answer."""
        assert self.remote is not None
        results: list[SubscribeResult] = []
        assert self.remote.open(producer_id, results.append)
        return results


class Wire:
    """Joins two :class:`End` objects; ``drop(direction, datagram)`` may lose datagrams."""

    def __init__(self, a: End, b: End, clock: Clock) -> None:
        self.a, self.b, self.clock = a, b, clock
        self.drop: Callable[[str, bytes], bool] = lambda direction, data: False
        self.datagrams = {"a>b": 0, "b>a": 0}
        self.dropped = {"a>b": 0, "b>a": 0}
        self.control_bytes = {"a>b": 0, "b>a": 0}
        self.cut = False

    def _move(self, src: End, dst: End, direction: str) -> bool:
        moved = False
        now = self.clock.t
        if src.conn.control_out:
            data = src.conn.take_control()
            moved = True
            if not self.cut:
                self.control_bytes[direction] += len(data)
                dst.conn.receive_control(data, False, now)
        if src.conn.datagrams_out:
            out, src.conn.datagrams_out = src.conn.datagrams_out, []
            moved = True
            for d in out:
                if self.cut or self.drop(direction, d):
                    self.dropped[direction] += 1
                    continue
                self.datagrams[direction] += 1
                dst.conn.receive_datagram(d, now)
        return moved

    def flush(self) -> None:
        """Deliver until both directions are quiet (no time passes)."""
        for _ in range(1000):
            if not (self._move(self.a, self.b, "a>b") | self._move(self.b, self.a, "b>a")):
                return
        raise AssertionError("wire never went quiet")

    def _deadlines(self) -> list[float]:
        out = []
        for end in (self.a, self.b):
            for d in (end.conn.deadline(), end.remote.deadline() if end.remote else None):
                if d is not None:
                    out.append(d)
        return out

    def run(self, seconds: float) -> None:
        """Advance time by ``seconds``, running due timers and delivering on the way."""
        end_t = self.clock.t + seconds
        self.flush()
        for _ in range(100_000):
            due = [d for d in self._deadlines() if d <= end_t]
            self.clock.t = max(self.clock.t, min(due)) if due else end_t
            for end in (self.a, self.b):
                end.conn.poll(self.clock.t)
                if end.remote is not None:
                    end.remote.poll(self.clock.t)
            self.flush()
            if not due:
                return
        raise AssertionError("timers never settled")


def node_pair(
    config: RelayConfig | None = None,
    *,
    authorize: bool = True,
    cert_key: bytes | None = None,
    clock: Clock | None = None,
) -> tuple[End, End, Wire]:
    """A dialler ``b`` (remote flows) authenticating to a listener ``a`` (origin flows),
    as over QUIC; call ``b.conn.handshake_completed`` via :func:`handshake`."""
    cfg = config or RelayConfig(linger=0.5)
    clock = clock or Clock()
    akey, bkey = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    apub, bpub = public_key_bytes(akey), public_key_bytes(bkey)
    sources: dict[str, FakeSource] = {}
    counters_a = RelayCounters()
    server = RelayConnection(
        cfg,
        counters_a,
        clock.t,
        handshake=ServerHandshake(akey, lambda key: authorize and key == bpub),
    )
    server.origin = OriginFlows(server, sources.get, cfg, counters_a)
    counters_b = RelayCounters()
    flows = RemoteFlows(cfg, counters_b, clock)
    client = RelayConnection(
        cfg, counters_b, clock.t, handshake=ClientHandshake(bkey, apub), remote=flows
    )
    a = End(clock, cfg, server, sources, None)
    b = End(clock, cfg, client, {}, flows)
    a.key, b.key = apub, bpub  # type: ignore[attr-defined]
    wire = Wire(a, b, clock)
    wire.cert_key = apub if cert_key is None else cert_key  # type: ignore[attr-defined]
    return a, b, wire


def handshake(b: End, wire: Wire) -> None:
    """TLS done on the dialler, then the control-stream authentication runs."""
    b.conn.handshake_completed(ALPN, wire.cert_key, wire.clock.t)  # type: ignore[attr-defined]
    wire.flush()


def pipe_pair(
    config: RelayConfig | None = None, clock: Clock | None = None
) -> tuple[End, End, Wire]:
    """Two ends of a worker pipe: trusted, both serve and pull."""
    cfg = config or RelayConfig(linger=0.5)
    clock = clock or Clock()
    ends = []
    for _ in range(2):
        counters = RelayCounters()
        sources: dict[str, FakeSource] = {}
        flows = RemoteFlows(cfg, counters, clock)
        conn = RelayConnection(cfg, counters, clock.t, remote=flows, max_payload=65000)
        conn.origin = OriginFlows(conn, sources.get, cfg, counters)
        ends.append(End(clock, cfg, conn, sources, flows))
    wire = Wire(ends[0], ends[1], clock)
    return ends[0], ends[1], wire


def live_producer(results: list[SubscribeResult]) -> RemoteProducer:
    """The remote producer a subscription produced (fails the test otherwise)."""
    assert len(results) == 1, results
    rp = results[0]
    assert isinstance(rp, RemoteProducer), rp
    return rp


def pull(end: End, wire: Wire, producer_id: str) -> RemoteProducer:
    """Subscribe ``end`` to ``producer_id`` across ``wire`` and return the producer."""
    results = end.subscribe(producer_id)
    wire.flush()
    return live_producer(results)
