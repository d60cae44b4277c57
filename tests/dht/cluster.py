"""Helpers to run many real kademlia nodes on 127.0.0.1 in one event loop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from dht import DhtConfig, Directory, NodeIdentity

HOST = "127.0.0.1"
# generous against CPU contention (other suites share 2 cores); behaviour, not speed, is tested
TEST_CONFIG = DhtConfig(rpc_timeout=1.5, round_timeout=0.5, lookup_timeout=6.0)
REGIONS = ("eu-west", "us-east", "ap-south")


async def start_cluster(
    count: int,
    *,
    ttl: float = 10.0,
    config: DhtConfig = TEST_CONFIG,
    operator_key: bytes | None = None,
    certify: Callable[[NodeIdentity], bytes] | None = None,
) -> list[Directory]:
    """Start ``count`` directories on ephemeral 127.0.0.1 ports, each bootstrapping from
    up to three earlier ones."""
    nodes: list[Directory] = []
    for i in range(count):
        identity = NodeIdentity.generate()
        seeds = random.sample(nodes, min(3, len(nodes)))
        directory = Directory(
            identity,
            REGIONS[i % len(REGIONS)],
            host=HOST,
            port=0,
            bootstrap=[d.address for d in seeds],
            ttl=ttl,
            signaling_url=f"https://node{i}.test/ws",
            relay_address=f"{HOST}:{20000 + i}",
            config=config,
            operator_key=operator_key,
            certificate=certify(identity) if certify else b"",
        )
        await directory.start()
        nodes.append(directory)
    return nodes


async def stop_cluster(nodes: list[Directory]) -> None:
    """Stop every node that is still running, without withdrawing (fast teardown)."""
    for node in nodes:
        if node.server.protocol is not None:
            await node.stop(withdraw=False)


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 20.0, interval: float = 0.2
) -> bool:
    """Poll ``check`` until it returns True or ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await check():
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)
