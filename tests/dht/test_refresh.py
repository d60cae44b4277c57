"""Directory refresh on a slow network: records are re-signed and stored on time."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from dht import Load
from tests.dht.cluster import eventually, start_cluster, stop_cluster


async def test_refresh_stores_fresh_records_while_the_routing_table_heals() -> None:
    # With fewer peers than a full bucket every refresh also heals the routing table
    # (pings and a crawl, each waiting out peers that do not answer). A loaded machine
    # makes that slow; the records must not wait for it, or they expire on their holders
    # and other nodes take this node for dead.
    node, peer = await start_cluster(2, ttl=6.0)
    healing = asyncio.Event()
    healed = asyncio.Event()

    async def slow_heal(addrs: Sequence[tuple[str, int]]) -> None:
        healing.set()
        await healed.wait()  # peers that time out, for as long as this test needs

    try:
        node.server.heal = slow_heal  # type: ignore[method-assign]
        load = Load(cpu=0.5, rooms=1, producers=2, consumers=3, headroom=0.5)
        node.update_load(load)
        refresh = asyncio.ensure_future(node.refresh())
        await asyncio.wait_for(healing.wait(), 10)

        async def published() -> bool:
            record = await peer.node(node.node_id)
            return record is not None and record.load == load

        assert await eventually(published, timeout=20)
        assert not refresh.done()  # the heal still runs: the records did not wait for it
        healed.set()
        await asyncio.wait_for(refresh, 10)
    finally:
        healed.set()
        await stop_cluster([node, peer])
