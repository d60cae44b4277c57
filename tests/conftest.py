"""Shared fixtures: a real Cascade node on 127.0.0.1 and SDK clients."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from peer import aiortc_adapter as rtc
from peer.client import CascadeClient
from peer.server import NodeConfig, NodeServer
from peer.tokens import issue_token

SECRET = "test-secret-0123456789abcdef-0123456789"

rtc.set_ice_addresses(["127.0.0.1"])


def _print_pending_tasks(name: str) -> None:
    """Write every unfinished asyncio task's stack to stderr: where a hung test waits.
    (pytest-timeout shows only the threads, and a hung test is one task awaiting.)"""
    tasks = [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]
    print(f"\n--- {name}: {len(tasks)} pending asyncio tasks ---", file=sys.stderr)
    for task in tasks:
        try:
            task.print_stack(limit=8, file=sys.stderr)
        except Exception as exc:  # the loop thread keeps running meanwhile
            print(f"{task!r}: {exc!r}", file=sys.stderr)


@pytest.fixture(autouse=True)
def hung_test_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Shortly before pytest-timeout ends a test, print where its tasks are waiting."""
    marker = request.node.get_closest_marker("timeout")
    limit = (
        float(marker.args[0])
        if marker and marker.args
        else float(request.config.getini("timeout") or 0)
    )
    if limit <= 15:
        yield
        return
    timer = threading.Timer(limit - 10, _print_pending_tasks, args=(request.node.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture
async def node(request: pytest.FixtureRequest) -> AsyncIterator[NodeServer]:
    # The clients run in this same process, so the node's CPU reading includes their work
    # (pattern encoding, decoding): admission by CPU is exercised in its own test instead.
    # Indirect parameter: the node's ICE port (default 0, one free port; None: per transport).
    ice_port = getattr(request, "param", 0)
    server = NodeServer(
        NodeConfig(port=0, api_secret=SECRET, dev=True, max_cpu=100.0, ice_port=ice_port)
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def token(room: str, identity: str, **kw: object) -> str:
    return issue_token(SECRET, room, identity, **kw)  # type: ignore[arg-type]


ClientFactory = Callable[..., Awaitable[CascadeClient]]


@pytest.fixture
async def clients(node: NodeServer) -> AsyncIterator[ClientFactory]:
    made: list[CascadeClient] = []

    async def make(
        room: str | None = None, identity: str = "user", **join: object
    ) -> CascadeClient:
        client = CascadeClient(node.url)
        await client.connect()
        made.append(client)
        if room is not None:
            await client.join(room, token(room, identity), **join)  # type: ignore[arg-type]
        return client

    yield make
    await asyncio.gather(*(c.close() for c in made), return_exceptions=True)
