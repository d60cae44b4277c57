"""Where a participant of a room should go: a pure policy over the directory's view.

No I/O and no clock: the caller passes the live node records (as :class:`NodeView`), the
room's entries (:class:`RoomHost`), the client's region and ``now``, and gets ranked
:class:`Candidate` nodes, each with the :class:`Reason` it was chosen for. See
docs/placement.md for the policy and how it compares with LiveKit's and Jitsi's.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EARTH_RADIUS_KM = 6371.0


class Reason(enum.Enum):
    """Why a node is a candidate (in order of preference)."""

    ROOM_IN_REGION = "room_in_region"
    """Already hosts the room, in the client's region, with headroom above the watermark."""
    OPEN_IN_REGION = "open_in_region"
    """In the client's region: opens the room (or a second node of it) there."""
    ROOM_NEAREST_REGION = "room_nearest_region"
    """The client's region is full: a node of the nearest region that already hosts the room."""
    OPEN_NEAREST_REGION = "open_nearest_region"
    """The client's region is full: the nearest region with headroom."""
    LAST_RESORT = "last_resort"
    """No node has headroom above the watermark; ranked by headroom, admission decides."""


class Exclusion(enum.Enum):
    """Why a node is never a candidate."""

    DRAINING = "draining"
    STALE = "stale"
    VERSION = "version"


@dataclass(frozen=True, slots=True)
class NodeView:
    """What placement needs to know of one node (from its signed directory record)."""

    node_id: str
    region: str
    signaling_url: str
    headroom: float
    """Spare capacity, 0..1 (1 = idle)."""
    capacity: int = 0
    """Consumers the node admits at most (0 = unknown)."""
    location: tuple[float, float] | None = None
    """(latitude, longitude) in degrees, as declared by the operator."""
    draining: bool = False
    version: str = ""
    expires_at: float = math.inf


@dataclass(frozen=True, slots=True)
class RoomHost:
    """One node's entry for the room: it hosts ``participants`` of it."""

    node_id: str
    participants: int


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    """Tunables of :func:`place`."""

    watermark: float = 0.30
    """A node is filled while its headroom stays above this fraction."""
    version: str = ""
    """Only nodes announcing this protocol version are chosen ("" accepts any)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A ranked choice."""

    node_id: str
    signaling_url: str
    region: str
    reason: Reason
    headroom: float


@dataclass(frozen=True, slots=True)
class Placement:
    """The ranked candidates, and whether the choice had to leave the client's region."""

    candidates: tuple[Candidate, ...]
    client_region: str
    left_region: bool
    excluded: tuple[tuple[str, Exclusion], ...] = ()

    @property
    def best(self) -> Candidate | None:
        """The first choice, or None when no node can take anyone."""
        return self.candidates[0] if self.candidates else None


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (latitude, longitude) points in kilometres."""
    lat1, lon1 = map(math.radians, a)
    lat2, lon2 = map(math.radians, b)
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def region_locations(nodes: Iterable[NodeView]) -> dict[str, tuple[float, float]]:
    """Each region's location: the mean of its nodes' declared locations."""
    sums: dict[str, list[float]] = {}
    for node in nodes:
        if node.location is not None:
            s = sums.setdefault(node.region, [0.0, 0.0, 0.0])
            s[0] += node.location[0]
            s[1] += node.location[1]
            s[2] += 1
    return {r: (s[0] / s[2], s[1] / s[2]) for r, s in sums.items()}


def exclusion(node: NodeView, now: float, policy: PlacementPolicy) -> Exclusion | None:
    """Why ``node`` may not be chosen, or None."""
    if node.draining:
        return Exclusion.DRAINING
    if node.expires_at <= now:
        return Exclusion.STALE
    if policy.version and node.version != policy.version:
        return Exclusion.VERSION
    return None


def two_choices(nodes: Sequence[NodeView], rng: random.Random) -> list[NodeView]:
    """Order ``nodes`` by "power of two choices": the first is the roomier of two picked at
    random (so joins made on the same seconds-old load do not all land on one node), the
    rest follow by headroom."""
    if len(nodes) <= 1:
        return list(nodes)
    a, b = rng.sample(list(nodes), 2)
    first = b if b.headroom > a.headroom else a
    rest = sorted((n for n in nodes if n is not first), key=lambda n: (-n.headroom, n.node_id))
    return [first, *rest]


def _room_order(hosts: Sequence[NodeView], participants: dict[str, int]) -> list[NodeView]:
    # Fill the node holding most of the room first (the room stays on few nodes), then
    # the busiest one still above the watermark (keeps the others' headroom for new rooms).
    return sorted(hosts, key=lambda n: (-participants.get(n.node_id, 0), n.headroom, n.node_id))


def place(
    nodes: Iterable[NodeView],
    room: Iterable[RoomHost],
    client_region: str,
    now: float,
    *,
    policy: PlacementPolicy | None = None,
    rng: random.Random | None = None,
    reached: str | None = None,
) -> Placement:
    """Rank the nodes a new participant of a room should join.

    1. A node of the client's region already hosting the room, while its headroom stays
       above the watermark (a room spans as few nodes as possible).
    2. Otherwise a node of the client's region with headroom: the node the client reached
       (``reached``) if it is one, saving a redirect, else by power of two choices.
    3. Otherwise the nearest region with headroom (haversine between region locations),
       a node hosting the room first; the placement then ``left_region``.
    4. Never a draining, stale or other-version node. With no headroom anywhere, every
       eligible node by headroom (admission control has the last word).
    """
    policy = policy or PlacementPolicy()
    rng = rng or random.Random()
    all_nodes = list(nodes)
    participants = {h.node_id: h.participants for h in room if h.participants > 0}
    eligible: list[NodeView] = []
    excluded: list[tuple[str, Exclusion]] = []
    for node in all_nodes:
        why = exclusion(node, now, policy)
        if why is None:
            eligible.append(node)
        else:
            excluded.append((node.node_id, why))
    fits = [n for n in eligible if n.headroom > policy.watermark]

    ranked: list[tuple[NodeView, Reason]] = []
    local = [n for n in fits if n.region == client_region]
    hosts = [n for n in local if n.node_id in participants]
    ranked += [(n, Reason.ROOM_IN_REGION) for n in _room_order(hosts, participants)]
    others = [n for n in local if n.node_id not in participants]
    here = [n for n in others if n.node_id == reached]
    others = here + two_choices([n for n in others if n.node_id != reached], rng)
    ranked += [(n, Reason.OPEN_IN_REGION) for n in others]
    left_region = not ranked

    locations = region_locations(all_nodes)
    home = locations.get(client_region)
    by_region: dict[str, list[NodeView]] = {}
    for n in fits:
        if n.region != client_region:
            by_region.setdefault(n.region, []).append(n)

    hosting = {n.region for n in fits if n.node_id in participants}

    def distance(region: str) -> tuple[float, bool, str]:
        # Nearest first; where distance is unknown, regions already hosting the room first.
        there = locations.get(region)
        km = math.inf if home is None or there is None else haversine_km(home, there)
        return (km, region not in hosting, region)

    for region in sorted(by_region, key=distance):
        in_region = by_region[region]
        hosts = [n for n in in_region if n.node_id in participants]
        ranked += [(n, Reason.ROOM_NEAREST_REGION) for n in _room_order(hosts, participants)]
        others = [n for n in in_region if n.node_id not in participants]
        ranked += [(n, Reason.OPEN_NEAREST_REGION) for n in two_choices(others, rng)]

    chosen = {n.node_id for n, _ in ranked}
    rest = sorted(
        (n for n in eligible if n.node_id not in chosen), key=lambda n: (-n.headroom, n.node_id)
    )
    ranked += [(n, Reason.LAST_RESORT) for n in rest]
    return Placement(
        candidates=tuple(
            Candidate(n.node_id, n.signaling_url, n.region, reason, n.headroom)
            for n, reason in ranked
        ),
        client_region=client_region,
        left_region=left_region,
        excluded=tuple(excluded),
    )
