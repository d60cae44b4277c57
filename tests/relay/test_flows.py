"""Unit tests of the sans-I/O flow logic (no event loop)."""

from __future__ import annotations

from relay import KeyframeLimiter, NackTracker, RemoteProducer
from tests.relay.helpers import VP8, Collector, make_rtp


def test_nack_tracker_in_order_no_nacks() -> None:
    t = NackTracker()
    for s in range(100):
        assert t.on_packet(s, s * 0.01) == 0
    assert t.poll(10.0) == []
    assert t.deadline() is None


def test_nack_tracker_gap_waits_for_reorder_then_nacks() -> None:
    t = NackTracker(reorder_wait=0.02, retry_interval=0.1, max_retries=3)
    t.on_packet(10, 0.0)
    t.on_packet(13, 0.001)
    assert t.deadline() == 0.021
    assert t.poll(0.01) == []  # still inside the reorder window
    assert sorted(t.poll(0.03)) == [11, 12]
    assert t.poll(0.05) == []  # retry not due yet
    assert t.on_packet(11, 0.06) == 1  # repaired
    assert t.poll(0.2) == [12]
    assert t.repaired == 1


def test_nack_tracker_reorder_within_wait_never_nacked() -> None:
    t = NackTracker(reorder_wait=0.02)
    t.on_packet(1, 0.0)
    t.on_packet(3, 0.001)
    assert t.on_packet(2, 0.005) == 1
    assert t.poll(1.0) == []
    assert not t.missing
    assert t.reordered == 1 and t.repaired == 0


def test_nack_tracker_gives_up_after_retries() -> None:
    t = NackTracker(reorder_wait=0.0, retry_interval=0.1, max_retries=3)
    t.on_packet(1, 0.0)
    t.on_packet(3, 0.0)
    sent = 0
    now = 0.0
    for _ in range(10):
        sent += len(t.poll(now))
        now += 0.11
    assert sent == 3
    assert t.lost == 1
    assert not t.missing


def test_nack_tracker_wraparound() -> None:
    t = NackTracker(reorder_wait=0.0)
    t.on_packet(65534, 0.0)
    t.on_packet(1, 0.0)  # 65535 and 0 missing across the wrap
    assert sorted(t.poll(0.0)) == [0, 65535]
    assert t.on_packet(65535, 0.01) == 1


def test_nack_tracker_duplicates_and_resets() -> None:
    t = NackTracker(max_gap=100)
    t.on_packet(5, 0.0)
    assert t.on_packet(5, 0.0) == 2
    assert t.on_packet(4, 0.0) == 2  # old, never missing
    assert t.on_packet(5000, 0.0) == 0  # huge jump: reset, no NACK storm
    assert not t.missing and t.resets == 1
    assert t.on_packet(100, 0.0) == 0  # far behind: stream restart
    assert t.resets == 2


def test_keyframe_limiter_leading_and_trailing() -> None:
    k = KeyframeLimiter(0.5)
    assert k.request(0.0)
    assert not k.request(0.1)
    assert not k.request(0.2)  # coalesced with the previous pending one
    assert k.dropped == 1
    assert k.deadline() == 0.5
    assert not k.poll(0.4)
    assert k.poll(0.5)
    assert not k.poll(0.6)
    assert k.deadline() is None
    assert k.allow(1.5) and not k.allow(1.6)


class FakeUpstream:
    def __init__(self) -> None:
        self.now = 0.0
        self.keyframes = 0
        self.nacks: list[list[int]] = []
        self.wakes: list[float] = []
        self.changes = 0

    def clock(self) -> float:
        return self.now

    def send_keyframe_request(self, producer: RemoteProducer) -> None:
        self.keyframes += 1

    def send_nack(self, producer: RemoteProducer, seqs: list[int]) -> None:
        self.nacks.append(seqs)

    def wake_at(self, when: float) -> None:
        self.wakes.append(when)

    def listeners_changed(self, producer: RemoteProducer) -> None:
        self.changes += 1


def make_rp(**kw: object) -> tuple[RemoteProducer, FakeUpstream]:
    up = FakeUpstream()
    rp = RemoteProducer("p", "video", VP8, up, **kw)  # type: ignore[arg-type]
    rp.set_live(1, VP8)
    return rp, up


def test_remote_producer_fans_out_and_caches() -> None:
    rp, up = make_rp()
    cols = [Collector() for _ in range(3)]
    for c in cols:
        rp.add_packet_listener(c)
    rp.add_packet_listener(cols[0])  # idempotent
    assert rp.listener_count == 3 and up.changes == 3
    for s in range(10):
        rp.on_rtp(make_rtp(s), 0.0)
    assert all(c.seqs == list(range(10)) for c in cols)
    assert rp.get_cached_packet(5) == make_rtp(5)
    assert rp.get_cached_packet(5 + 1024) is None  # same slot, different seq
    assert rp.stats.packets == 10
    assert rp.codec_params() == VP8 and rp.kind == "video"


def test_remote_producer_listener_error_isolated() -> None:
    rp, _ = make_rp()

    def bad(pkt: bytes) -> None:
        raise RuntimeError("boom")

    good = Collector()
    rp.add_packet_listener(bad)
    rp.add_packet_listener(good)
    rp.on_rtp(make_rtp(1), 0.0)
    assert good.seqs == [1]
    assert rp.stats.listener_errors == 1


def test_remote_producer_loss_repair_and_dedup() -> None:
    rp, up = make_rp(tracker=NackTracker(reorder_wait=0.01, retry_interval=0.1))
    c = Collector()
    rp.add_packet_listener(c)
    for s in (0, 1, 3, 4):
        rp.on_rtp(make_rtp(s), 0.0)
    assert up.wakes and up.wakes[-1] == 0.01
    rp.poll(0.02)
    assert up.nacks == [[2]]
    rp.on_rtp(make_rtp(2), 0.05)
    rp.on_rtp(make_rtp(2), 0.06)  # duplicate retransmission dropped
    assert c.seqs == [0, 1, 3, 4, 2]
    assert rp.stats.repaired == 1 and rp.stats.duplicates == 1


def test_remote_producer_local_nack_answered_from_cache_first() -> None:
    rp, up = make_rp()
    for s in range(5):
        rp.on_rtp(make_rtp(s), 0.0)
    rp.nack([1, 2, 900])
    assert up.nacks == [[900]]


def test_remote_producer_keyframe_rate_limit() -> None:
    rp, up = make_rp(keyframe_interval=0.5)
    for i in range(10):
        up.now = i * 0.01
        rp.request_keyframe()
    assert up.keyframes == 1
    rp.poll(0.5)
    assert up.keyframes == 2  # the trailing coalesced request
    rp.poll(2.0)
    assert up.keyframes == 2


def test_remote_producer_states_and_close() -> None:
    rp, _ = make_rp()
    states: list[str] = []
    closed: list[int] = []
    rp.on_state(states.append)
    rp.on_close(lambda: closed.append(1))
    rp.set_interrupted()
    rp.request_keyframe()  # deferred until live again
    rp.set_live(7, VP8)
    rp.close()
    rp.close()
    assert states == ["interrupted", "live", "closed"]
    assert closed == [1]
    rp.on_close(lambda: closed.append(2))  # already closed: immediate
    assert closed == [1, 2]


def test_nack_tracker_expect_accepts_foreign_retransmissions() -> None:
    t = NackTracker(retry_interval=0.1, max_retries=3)
    for s in range(10):
        t.on_packet(s, 0.0)
    assert t.on_packet(4, 0.01) == 2  # stale duplicate is dropped...
    t.expect([4, 5], 0.01)
    assert t.on_packet(4, 0.02) == 1  # ...unless someone asked for it
    assert t.poll(0.05) == []  # never NACKed by the tracker itself
    t.poll(1.0)
    assert not t.missing and t.lost == 0  # expiry of an expectation is not a loss
