"""Relay access follows the directory (issue 7.5) and open mode limits who pulls what (7.6)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from peer.client import CascadeClient
from peer.media import PatternVideoTrack
from peer.overlay import Overlay, exposure_warning
from peer.relay_access import RelayAccess
from peer.server import NodeServer
from relay import ErrorCode, RelayError, RelayRefused
from tests.conftest import token
from tests.peer.test_overlay import start_node


def test_access_follows_records_and_rooms() -> None:
    access = RelayAccess({b"static"}, open_mode=True)
    access.seen(b"k1", b"n1", expires_at=100.0)
    access.seen(b"k2", b"n2", expires_at=100.0)
    assert access.allowed(b"k1", 50.0) and access.allowed(b"static", 1e9)
    assert not access.allowed(b"stranger", 50.0)
    # Open mode: only rooms the node announces participants in.
    access.room_hosts("world", [b"n1"], now=50.0)
    assert access.may_pull(b"k1", "world", 50.0)
    assert not access.may_pull(b"k2", "world", 50.0)
    assert not access.may_pull(b"k1", "other", 50.0)
    assert access.may_pull(b"static", "other", 50.0)
    # A later lookup that misses n1 does not undo what an earlier one found, for a while.
    access.room_hosts("world", [], now=55.0)
    assert access.may_pull(b"k1", "world", 55.0)
    assert not access.may_pull(b"k1", "world", 50.0 + access.host_lifetime + 1)
    # Withdrawn: revoked at once; expired: revoked at expiry; each reported once.
    access.missing(b"k2")
    assert access.revoke_due(50.0) == [b"k2"]
    assert access.revoke_due(50.0) == []
    assert access.revoke_due(100.5) == [b"k1"]
    assert not access.allowed(b"k1", 100.5)
    # Fleet mode: any live (certified) node may pull any room.
    fleet = RelayAccess(open_mode=False)
    fleet.seen(b"k3", b"n3", expires_at=100.0)
    assert fleet.may_pull(b"k3", "anything", 50.0)


def test_open_mode_warns_beyond_loopback() -> None:
    assert exposure_warning(True, ["127.0.0.1", "::1", "localhost"]) is None
    assert exposure_warning(False, ["0.0.0.0"]) is None  # fleet mode
    warning = exposure_warning(True, ["127.0.0.1", "0.0.0.0", "192.0.2.10"])
    assert warning is not None and "0.0.0.0" in warning and "192.0.2.10" in warning
    assert "fleet mode" in warning and "docs/security.md" in warning


async def wait_for(pred, timeout: float = 20.0) -> bool:
    for _ in range(int(timeout / 0.1)):
        if pred():
            return True
        await asyncio.sleep(0.1)
    return pred()


async def decoding(track) -> bool:
    frames = track.frames_decoded
    return await wait_for(lambda: track.frames_decoded > frames + 5, 10)


@contextlib.asynccontextmanager
async def three_node_call():
    """A (publisher + local viewer), B and C (a subscriber each), found via the DHT."""
    nodes: list[tuple[NodeServer, Overlay]] = []
    clients: list[CascadeClient] = []

    async def client(node: NodeServer, identity: str) -> CascadeClient:
        cl = CascadeClient(node.url)
        await cl.connect()
        await cl.join("world", token("world", identity))
        clients.append(cl)
        return cl

    try:
        nodes.append(await start_node("eu", []))
        seed = nodes[0][1].directory.address
        nodes.append(await start_node("us", [seed]))
        nodes.append(await start_node("ap", [seed]))
        pub = await client(nodes[0][0], "alice")
        (producer,) = await pub.publish([PatternVideoTrack(160, 120)])
        tracks = []
        for (node, _), name in zip(nodes, ("local", "bob", "carol"), strict=True):
            (track,) = await (await client(node, name)).wait_for_tracks(1, "video", timeout=30)
            tracks.append(track)
        yield nodes, tracks, producer["producer_id"], client, clients
    finally:
        await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)
        for server, overlay in reversed(nodes):
            with contextlib.suppress(Exception):
                await overlay.stop()
            await server.stop()


def pulls_from(origin: NodeServer, puller: NodeServer) -> bool:
    assert origin.relay is not None
    return any(key == puller.relay_public_key for key, *_ in origin.relay.origin_flows())


@pytest.mark.parametrize("how", ["withdrawn", "expired"])
async def test_relay_access_ends_with_the_directory_record(how: str) -> None:
    async with three_node_call() as (nodes, tracks, producer_id, _, clients):
        (a, _overlay_a), (b, overlay_b), (c, _) = nodes
        bob = clients[2]
        assert pulls_from(a, b) and pulls_from(a, c)
        # B's record leaves the directory while B keeps running and connected.
        if how == "withdrawn":
            await overlay_b.stop()  # tombstones
        else:
            assert overlay_b._task is not None
            overlay_b._task.cancel()
            await overlay_b.directory.stop(withdraw=False)  # expires within the 6 s TTL
        # A closes B's link and ends its flows; B's subscriber is told and gets no media.
        assert await wait_for(lambda: not pulls_from(a, b), timeout=20)
        await bob.wait_event("producer_state", producer_id=producer_id, state="interrupted")
        assert a.stats()["limits"]["relay_revoked"] >= 1
        # B cannot come back: its link's reconnects are refused.
        assert b.relay is not None
        link = b.relay.links[a.relay_public_key]
        assert await wait_for(
            lambda: (
                isinstance(link.last_error, RelayRefused)
                and link.last_error.code == ErrorCode.UNAUTHORIZED
            )
        )
        await asyncio.sleep(1.0)
        frames = tracks[1].frames_decoded
        await asyncio.sleep(1.0)
        assert tracks[1].frames_decoded <= frames + 1  # nothing flows to B any more
        assert not pulls_from(a, b) and link.state != "live"
        # The call goes on for everyone else.
        assert pulls_from(a, c)
        assert await decoding(tracks[0]) and await decoding(tracks[2])


async def test_open_mode_pull_needs_own_participants_in_the_room() -> None:
    """Issue 7.6: a node in the directory with no participants in the room cannot pull."""
    async with three_node_call() as (nodes, tracks, producer_id, client, _):
        (a, overlay_a), *_ = nodes
        seed = overlay_a.directory.address
        mallory, _ = await start_node("xx", [seed])
        nodes.append((mallory, _))
        assert await wait_for(lambda: overlay_a.authorize(mallory.relay_public_key))
        assert a.relay is not None
        host, port = a.relay.address
        with pytest.raises(RelayError) as info:
            await mallory.pull_remote_producer("world", a.relay_public_key, host, port, producer_id)
        assert "not allowed" in str(info.value)
        assert not pulls_from(a, mallory)
        assert await decoding(tracks[0]) and await decoding(tracks[1])
        # Once mallory hosts a participant of the room (announced in the DHT), it may pull.
        viewer = await client(mallory, "mallory-viewer")
        (track,) = await viewer.wait_for_tracks(1, "video", timeout=30)
        assert await decoding(track)
