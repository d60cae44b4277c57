"""Dead nodes: records vanish once their signed expiry passes; lookups stay correct with 20%
of the nodes killed."""

from __future__ import annotations

import asyncio
import random

from dht import Directory
from tests.dht.cluster import eventually, start_cluster, stop_cluster

TTL = 5.0
ROOM = "churn"


async def lookup_everywhere(observers: list[Directory], room: str) -> list[set[bytes]]:
    results = await asyncio.gather(*(d.room_hosts(room) for d in observers))
    return [{e.node_id for e in entries} for entries in results]


async def test_killed_host_vanishes_within_ttl_and_lookups_survive_20_percent_dead() -> None:
    nodes = await start_cluster(30, ttl=TTL)
    try:
        hosts = nodes[2:7]
        await asyncio.gather(*(d.announce_room(ROOM, participants=1) for d in hosts))
        assert all(
            found == {d.node_id for d in hosts} for found in await lookup_everywhere(nodes, ROOM)
        )

        dead_host = hosts[0]
        others = [d for d in nodes if d not in hosts]
        killed = [dead_host, *random.sample(others, 5)]  # 6 of 30 = 20%
        live = [d for d in nodes if d not in killed]
        live_hosts = {d.node_id for d in hosts[1:]}
        all_hosts = live_hosts | {dead_host.node_id}
        loop = asyncio.get_running_loop()
        for d in killed:
            await d.stop(withdraw=False)  # crash: no tombstones
        killed_at = dead_host.clock()
        expires_by = killed_at + TTL

        # right after the crash: every live host is found; nothing but hosts is returned
        for found in await lookup_everywhere(live, ROOM):
            assert live_hosts <= found <= all_hosts

        async def dead_host_gone() -> bool:
            return all(f == live_hosts for f in await lookup_everywhere(live, ROOM))

        assert await eventually(dead_host_gone, timeout=TTL + 20)
        # a lookup started after the dead host's last record expired never returns it
        await asyncio.sleep(max(0.0, expires_by - dead_host.clock()))
        for _ in range(2):
            for found in await lookup_everywhere(live, ROOM):
                assert found == live_hosts
            nodes_seen = await live[0].nodes()
            assert {n.node_id for n in nodes_seen} == {d.node_id for d in live}
        assert loop.is_running()
    finally:
        await stop_cluster(nodes)


async def test_withdrawn_records_stay_hidden_from_holders_that_missed_the_tombstone() -> None:
    nodes = await start_cluster(12, ttl=TTL)
    try:
        host, observer = nodes[4], nodes[9]
        await host.announce_room("solo")
        assert [e.node_id for e in await observer.room_hosts("solo")] == [host.node_id]
        await host.withdraw_room("solo")
        assert await observer.room_hosts("solo") == []
        assert host.hosted_rooms == []
        await host.announce_room("solo", participants=4)
        entries = await observer.room_hosts("solo")
        assert [(e.node_id, e.participants) for e in entries] == [(host.node_id, 4)]
    finally:
        await stop_cluster(nodes)


async def test_node_that_lost_its_routing_table_rejoins_on_refresh() -> None:
    nodes = await start_cluster(10, ttl=TTL)
    try:
        lonely = nodes[7]
        assert lonely.server.protocol is not None
        lonely.server.protocol.router.flush()  # every contact lost (e.g. mass timeouts)
        assert lonely.server.contacts == 0
        await lonely.refresh()  # re-joins from its bootstrap contacts, then republishes
        assert lonely.server.contacts > 0
        await lonely.announce_room("after-rejoin")
        entries = await nodes[2].room_hosts("after-rejoin")
        assert [e.node_id for e in entries] == [lonely.node_id]
        assert [e.node_id for e in await lonely.room_hosts("after-rejoin")] == [lonely.node_id]
    finally:
        await stop_cluster(nodes)
