"""Shared fixtures: a real Cascade node on 127.0.0.1 and SDK clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from peer import aiortc_adapter as rtc
from peer.client import CascadeClient
from peer.server import NodeConfig, NodeServer
from peer.tokens import issue_token

SECRET = "test-secret-0123456789abcdef-0123456789"

rtc.set_ice_addresses(["127.0.0.1"])


@pytest.fixture
async def node() -> AsyncIterator[NodeServer]:
    # The clients run in this same process, so the node's CPU reading includes their work
    # (pattern encoding, decoding): admission by CPU is exercised in its own test instead.
    server = NodeServer(NodeConfig(port=0, api_secret=SECRET, dev=True, max_cpu=100.0))
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
