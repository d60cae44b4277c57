"""Fleet mode: only keys certified by the operator key may publish."""

from __future__ import annotations

import asyncio

from dht import Directory, NodeIdentity, RejectReason, issue_certificate
from tests.dht.cluster import HOST, TEST_CONFIG, start_cluster, stop_cluster


async def test_fleet_mode_refuses_validly_signed_records_from_uncertified_keys() -> None:
    operator = NodeIdentity.generate()
    nodes = await start_cluster(
        10,
        operator_key=operator.public_key,
        certify=lambda identity: issue_certificate(operator, identity.public_key),
    )
    # a rogue node in open mode: valid signatures, no certificate
    rogue = Directory(
        NodeIdentity.generate(),
        "eu-west",
        host=HOST,
        bootstrap=[nodes[0].address],
        config=TEST_CONFIG,
    )
    # a node whose certificate was issued by a different "operator"
    impostor_id = NodeIdentity.generate()
    impostor = Directory(
        impostor_id,
        "eu-west",
        host=HOST,
        bootstrap=[nodes[1].address],
        config=TEST_CONFIG,
        certificate=issue_certificate(impostor_id, impostor_id.public_key),
    )
    await rogue.start()
    await impostor.start()
    try:
        await asyncio.gather(
            nodes[3].announce_room("fleet-room"),
            rogue.announce_room("fleet-room"),
            impostor.announce_room("fleet-room"),
        )
        certified = {d.node_id for d in nodes}
        results = await asyncio.gather(*(d.room_hosts("fleet-room") for d in nodes))
        for entries in results:
            assert [e.node_id for e in entries] == [nodes[3].node_id]
        for listing in await asyncio.gather(*(d.nodes() for d in nodes[:3])):
            assert {n.node_id for n in listing} == certified
        assert sum(d.server.storage.rejected.get(RejectReason.UNCERTIFIED, 0) for d in nodes) > 0
        for d in nodes:
            held = {
                r.publisher
                for k in d.server.storage.stored_keys()
                for r in d.server.storage.records(k)
            }
            assert rogue.identity.public_key not in held
            assert impostor_id.public_key not in held
    finally:
        await rogue.stop(withdraw=False)
        await impostor.stop(withdraw=False)
        await stop_cluster(nodes)
