"""Placement policy, table-driven: plain data in, ranked candidates with reasons out."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from peer.placement import (
    Exclusion,
    NodeView,
    PlacementPolicy,
    Reason,
    RoomHost,
    haversine_km,
    place,
)

PARIS = (48.86, 2.35)
FRANKFURT = (50.11, 8.68)
VIRGINIA = (38.9, -77.0)
TOKYO = (35.68, 139.69)
SINGAPORE = (1.35, 103.82)


def node(
    node_id: str,
    region: str,
    headroom: float,
    location: tuple[float, float] | None = None,
    **kw: object,
) -> NodeView:
    return NodeView(
        node_id=node_id,
        region=region,
        signaling_url=f"http://{node_id}",
        headroom=headroom,
        location=location,
        **kw,  # type: ignore[arg-type]
    )


FLEET = [
    node("eu1", "eu", 0.9, PARIS),
    node("eu2", "eu", 0.8, FRANKFURT),
    node("us1", "us", 0.9, VIRGINIA),
    node("ap1", "ap", 0.9, TOKYO),
    node("ap2", "ap", 0.9, SINGAPORE),
]


def choose(nodes, room, region, now=0.0, **kw):
    return place(nodes, room, region, now, rng=random.Random(1), **kw)


@pytest.mark.parametrize(
    ("name", "nodes", "room", "region", "best", "reason", "left"),
    [
        (
            "new room opens in the client's region",
            FLEET,
            [],
            "us",
            "us1",
            Reason.OPEN_IN_REGION,
            False,
        ),
        (
            "room hosted in region is filled first",
            FLEET,
            [RoomHost("eu2", 4)],
            "eu",
            "eu2",
            Reason.ROOM_IN_REGION,
            False,
        ),
        (
            "room hosted only elsewhere opens in the client's region",
            FLEET,
            [RoomHost("eu1", 6)],
            "us",
            "us1",
            Reason.OPEN_IN_REGION,
            False,
        ),
        (
            "host below the watermark: second node of the same region",
            [node("eu1", "eu", 0.25, PARIS), node("eu2", "eu", 0.8, FRANKFURT)],
            [RoomHost("eu1", 20)],
            "eu",
            "eu2",
            Reason.OPEN_IN_REGION,
            False,
        ),
        (
            "the host holding most of the room comes first",
            [node("eu1", "eu", 0.9), node("eu2", "eu", 0.5)],
            [RoomHost("eu1", 2), RoomHost("eu2", 9)],
            "eu",
            "eu2",
            Reason.ROOM_IN_REGION,
            False,
        ),
        (
            "full region: nearest region with headroom",
            [node("ap1", "ap", 0.1, TOKYO), *FLEET[:3], node("ap2", "ap", 0.2, SINGAPORE)],
            [],
            "ap",
            "eu1",  # Europe is nearer to Tokyo/Singapore than Virginia is
            Reason.OPEN_NEAREST_REGION,
            True,
        ),
        (
            "full region: nearest region that hosts the room first",
            [node("us1", "us", 0.05, VIRGINIA), *FLEET[:2], *FLEET[3:]],
            [RoomHost("eu1", 3), RoomHost("us1", 30)],
            "us",
            "eu1",
            Reason.ROOM_NEAREST_REGION,
            True,
        ),
        (
            "draining node never chosen",
            [node("eu1", "eu", 0.99, draining=True), node("eu2", "eu", 0.4)],
            [RoomHost("eu1", 5)],
            "eu",
            "eu2",
            Reason.OPEN_IN_REGION,
            False,
        ),
        (
            "stale record never chosen",
            [node("eu1", "eu", 0.99, expires_at=5.0), node("eu2", "eu", 0.4)],
            [],
            "eu",
            "eu2",
            Reason.OPEN_IN_REGION,
            False,
        ),
        (
            "nothing has headroom: best headroom, last resort",
            [node("eu1", "eu", 0.1), node("us1", "us", 0.2)],
            [],
            "eu",
            "us1",
            Reason.LAST_RESORT,
            True,
        ),
        (
            "unknown region: any region with headroom",
            FLEET,
            [RoomHost("us1", 2)],
            "sa",
            "us1",
            Reason.ROOM_NEAREST_REGION,
            True,
        ),
    ],
)
def test_placement_table(name, nodes, room, region, best, reason, left):
    result = choose(nodes, room, region, now=10.0)
    assert result.best is not None, name
    assert (result.best.node_id, result.best.reason, result.left_region) == (best, reason, left), (
        name,
        result.candidates,
    )


def test_excluded_nodes_are_reported_with_their_reason():
    nodes = [
        node("a", "eu", 0.9, draining=True),
        node("b", "eu", 0.9, expires_at=1.0),
        node("c", "eu", 0.9, version="2"),
        node("d", "eu", 0.9, version="1"),
    ]
    result = choose(nodes, [], "eu", now=2.0, policy=PlacementPolicy(version="1"))
    assert [c.node_id for c in result.candidates] == ["d"]
    assert dict(result.excluded) == {
        "a": Exclusion.DRAINING,
        "b": Exclusion.STALE,
        "c": Exclusion.VERSION,
    }


def test_every_eligible_node_is_ranked_once():
    result = choose(FLEET, [RoomHost("eu1", 3)], "eu")
    ids = [c.node_id for c in result.candidates]
    assert sorted(ids) == sorted(n.node_id for n in FLEET)
    assert ids[:2] == ["eu1", "eu2"]


def test_two_choices_spreads_simultaneous_joins_over_equal_nodes():
    # Ten equally loaded nodes, 1000 joins on the same (stale) view: nobody gets a herd.
    nodes = [node(f"n{i}", "eu", 0.8) for i in range(10)]
    rng = random.Random(3)
    counts = Counter(place(nodes, [], "eu", 0.0, rng=rng).best.node_id for _ in range(1000))
    assert len(counts) == 10
    assert max(counts.values()) < 250


def test_two_choices_prefers_headroom():
    nodes = [node("busy", "eu", 0.35), node("idle", "eu", 0.95), node("mid", "eu", 0.6)]
    rng = random.Random(5)
    counts = Counter(place(nodes, [], "eu", 0.0, rng=rng).best.node_id for _ in range(300))
    assert counts["idle"] > counts["mid"] > counts["busy"]


def test_haversine():
    assert haversine_km(PARIS, PARIS) == 0
    assert 5800 < haversine_km(PARIS, VIRGINIA) < 6400
    assert 9500 < haversine_km(PARIS, TOKYO) < 9900


def test_a_new_room_opens_on_the_node_reached_when_it_fits():
    nodes = [node("eu1", "eu", 0.5), node("eu2", "eu", 0.9)]
    assert choose(nodes, [], "eu", reached="eu1").best.node_id == "eu1"
    # ...but not when the room already lives on another node of the region,
    assert choose(nodes, [RoomHost("eu2", 3)], "eu", reached="eu1").best.node_id == "eu2"
    # nor when the reached node is in another region or short of headroom.
    assert choose(nodes, [], "eu", reached="us1").best.node_id == "eu2"
    low = [node("eu1", "eu", 0.2), node("eu2", "eu", 0.9)]
    assert choose(low, [], "eu", reached="eu1").best.node_id == "eu2"
