"""Batched sends from one socket (``sendmmsg``): what reaches whom, and what is dropped."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from peer import datagrams
from peer.egress import BatchScope, SendBatch

pytestmark = pytest.mark.skipif(not datagrams.available(), reason="needs Linux sendmmsg")
ffi = datagrams._ffi


def trailer(ctx: Any, pointer: Any, length: Any) -> int:
    """Stands in for SRTP protection: appends ``ctx`` in place, as libsrtp's tag."""
    n = length[0]
    ffi.memmove(pointer + n, ctx, len(ctx))
    length[0] = n + len(ctx)
    return 0


def refuse(ctx: Any, pointer: Any, length: Any) -> int:
    return 1


@pytest.fixture
def receivers() -> Iterator[list[socket.socket]]:
    socks = []
    for _ in range(3):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    yield s
    s.close()


class Scope:
    """A batch scope whose "next loop turn" the test runs by hand (``later``)."""

    def __init__(self) -> None:
        self.later: list[Any] = []
        self.scope = BatchScope(self.later.append)
        self.enter = self.scope.enter
        self.exit = self.scope.exit


def address(sock: socket.socket) -> tuple[Any, int]:
    return datagrams.socket_address(sock.getsockname())


def test_each_subscriber_gets_its_own_protected_datagram(sender, receivers):
    scope = Scope()
    batch = datagrams.send_batch(sender, scope.scope)
    names = [address(r) for r in receivers]
    scope.enter()
    for i, (name, size) in enumerate(names):
        batch.add(b"packet-%d" % i, trailer, b"+tag", name, size)
    assert batch.count == 3
    scope.exit()  # the handled datagram's fan-out leaves now
    assert [r.recv(2000) for r in receivers] == [b"packet-0+tag", b"packet-1+tag", b"packet-2+tag"]
    assert (batch.sent, batch.calls, batch.dropped) == (3, 1, 0)
    assert scope.later == []


def test_outside_a_scope_the_batch_leaves_on_the_next_loop_turn(sender, receivers):
    scope = Scope()
    batch = datagrams.send_batch(sender, scope.scope)
    name, size = address(receivers[0])
    batch.add(b"a", trailer, b"", name, size)
    batch.add(b"b", trailer, b"", name, size)
    assert len(scope.later) == 1  # one call scheduled for the batch
    scope.later.pop()()
    assert [receivers[0].recv(10), receivers[0].recv(10)] == [b"a", b"b"]
    assert batch.calls == 1


def test_a_full_batch_is_sent_before_the_next_slot(sender, receivers):
    scope = Scope()
    batch = datagrams.send_batch(sender, scope.scope, capacity=2)
    name, size = address(receivers[0])
    scope.enter()
    for data in (b"1", b"2", b"3"):
        batch.add(data, trailer, b"", name, size)
    scope.exit()
    assert [receivers[0].recv(10) for _ in range(3)] == [b"1", b"2", b"3"]
    assert (batch.sent, batch.calls) == (3, 2)


def test_a_refused_destination_loses_only_its_own_datagram(sender, receivers):
    scope = Scope()
    batch = datagrams.send_batch(sender, scope.scope)
    ipv6, ipv6_size = datagrams.socket_address(("::1", 9))  # not on an IPv4 socket
    first, third = address(receivers[0]), address(receivers[2])  # alive until sent
    scope.enter()
    batch.add(b"first", trailer, b"", *first)
    batch.add(b"lost", trailer, b"", ipv6, ipv6_size)
    batch.add(b"third", trailer, b"", *third)
    scope.exit()
    assert receivers[0].recv(10) == b"first"
    assert receivers[2].recv(10) == b"third"
    assert (batch.sent, batch.dropped) == (2, 1)


def test_too_long_or_unprotectable_packets_are_refused(sender, receivers):
    scope = Scope()
    batch = datagrams.send_batch(sender, scope.scope, slot_size=200)
    name, size = address(receivers[0])
    with pytest.raises(ValueError, match="too long"):
        batch.add(bytes(200 - datagrams.SRTP_MAX_TRAILER_LEN + 1), trailer, b"", name, size)
    with pytest.raises(ValueError, match="srtp_protect"):
        batch.add(b"x", refuse, b"", name, size)
    assert batch.count == 0 and scope.later == []
    batch.add(bytes(200 - datagrams.SRTP_MAX_TRAILER_LEN), trailer, b"", name, size)
    batch.flush()
    assert len(receivers[0].recv(2000)) == 200 - datagrams.SRTP_MAX_TRAILER_LEN


def test_a_full_socket_buffer_drops_the_rest_of_the_batch(receivers):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tight:
        tight.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        tight.setblocking(False)
        # a peer that never reads, on another address: the datagrams pile up in our buffer
        scope = Scope()
        batch: SendBatch = datagrams.send_batch(tight, scope.scope, capacity=128)
        name, size = address(receivers[0])
        scope.enter()
        for _ in range(128):
            batch.add(bytes(1400), trailer, b"", name, size)
        scope.exit()
        assert batch.sent + batch.dropped == 128
        assert batch.calls >= 1


def test_ipv6_addresses(receivers):
    try:
        six = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        six.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with six, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as out:
        six.settimeout(2)
        out.bind(("::1", 0))
        batch = datagrams.send_batch(out, Scope().scope)
        name = datagrams.socket_address(six.getsockname()[:2])
        batch.add(b"v6", trailer, b"", *name)
        batch.flush()
        assert six.recv(10) == b"v6"


async def test_the_adapter_scope_flushes_on_the_running_loop(sender, receivers):
    scope = BatchScope(asyncio.get_running_loop().call_soon)
    batch = datagrams.send_batch(sender, scope)
    name = address(receivers[0])
    batch.add(b"soon", trailer, b"", *name)
    await asyncio.sleep(0)
    receivers[0].setblocking(False)
    assert receivers[0].recv(10) == b"soon"
