"""Unauthenticated QUIC connections are bounded: per source, in total, in rate and in time."""

from __future__ import annotations

import asyncio
import os
import socket

from relay.admission import AdmissionLimits, PendingAdmission
from tests.relay.helpers import Collector, FakeSource, Node, fast_config, wait_until
from tests.relay.test_link import LOCAL, live_link, pump


def test_pending_limits_per_source_total_and_rate() -> None:
    adm = PendingAdmission(
        AdmissionLimits(max_pending_total=5, max_pending_per_source=2, new_rate=1.0, new_burst=3)
    )
    assert adm.admit("a", 0.0) and adm.admit("a", 0.0)
    assert not adm.admit("a", 0.0)  # per source
    assert adm.counters.refused_pending_per_source == 1
    adm.settle("a")
    assert adm.admit("a", 0.0)  # third token of the burst
    adm.settle("a")
    assert not adm.admit("a", 0.0)  # rate: bucket empty
    assert adm.counters.refused_rate == 1
    assert adm.admit("a", 1.0)  # refilled
    for source in ("b", "c"):
        assert adm.admit(source, 1.0)
    assert adm.admit("d", 1.0)
    assert adm.pending == 5
    assert not adm.admit("e", 1.0)  # total
    assert adm.counters.refused_pending_total == 1


def test_pending_deadlines() -> None:
    adm = PendingAdmission(AdmissionLimits(handshake_timeout=2.0, auth_timeout=4.0))
    assert adm.expired(10.0, False, 11.9) is None
    assert adm.expired(10.0, False, 12.1) == "handshake"
    assert adm.expired(10.0, True, 13.9) is None
    assert adm.expired(10.0, True, 14.1) == "auth"
    assert adm.deadline(10.0, False) == 12.0 and adm.deadline(10.0, True) == 14.0
    assert adm.counters.handshake_timeouts == 1 and adm.counters.auth_timeouts == 1


def fake_initial() -> bytes:
    """A QUIC v1 Initial long header with random connection ids and garbage payload."""
    dcid, scid = os.urandom(8), os.urandom(8)
    head = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([8]) + dcid + bytes([8]) + scid
    head += b"\x00"  # token length
    body_len = 1200 - len(head) - 2
    return head + (0x4000 | body_len).to_bytes(2, "big") + os.urandom(body_len)


async def test_initial_flood_is_bounded_and_a_real_peer_keeps_flowing() -> None:
    """Issue 7.4: fake Initials from one source during a live relay flow."""
    a = await Node(fast_config()).start()
    b = await Node(fast_config()).start()
    a.allow(b)
    src = a.sources["cam"] = FakeSource()
    try:
        link = await live_link(b, a)
        rp = await link.subscribe("cam")
        col = Collector()
        rp.add_packet_listener(col)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.2", 0))  # the attacker's own source address
        limits = a.endpoint.config.admission
        for _ in range(300):
            sock.sendto(fake_initial(), (LOCAL, a.port))
            assert a.endpoint.admission.pending <= limits.max_pending_per_source
            await asyncio.sleep(0.001)
        counters = a.endpoint.admission.counters
        assert counters.refused_pending_per_source + counters.refused_rate > 250
        # The real peer's flow keeps flowing during and after the flood.
        sent = await pump(src, 200)
        assert await wait_until(lambda: set(sent) <= set(col.seqs))
        # Pending strangers are gone after the handshake deadline.
        assert await wait_until(lambda: a.endpoint.admission.pending == 0, timeout=15)
        assert counters.handshake_timeouts > 0
        sock.close()
    finally:
        await b.endpoint.close()
        await a.endpoint.close()
