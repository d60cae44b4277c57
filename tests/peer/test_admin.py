"""Admin credentials: token and node-key signatures, refused with a reason."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.admin import AdminRefusal, check_admin, node_authorization
from peer.server import NodeConfig, NodeServer

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
TOKEN = "admin-token-0123456789abcdef"


def check(header: str | None, token: str | None = TOKEN, now: float = 1000.0):
    return check_admin(
        header, action="drain", now=now, node_key=KEY.public_key(), admin_token=token
    )


def test_the_admin_token_is_accepted() -> None:
    assert check(f"Bearer {TOKEN}") is None


def test_the_node_key_is_accepted_within_the_skew() -> None:
    assert check(node_authorization(KEY, "drain", 1000)) is None
    assert check(node_authorization(KEY, "drain", 950), now=1000) is None
    assert check(node_authorization(KEY, "drain", 900), now=1000) is AdminRefusal.STALE


@pytest.mark.parametrize(
    ("header", "token", "reason"),
    [
        (None, TOKEN, AdminRefusal.MISSING),
        ("", TOKEN, AdminRefusal.MISSING),
        ("Bearer wrong", TOKEN, AdminRefusal.BAD_TOKEN),
        (f"Bearer {TOKEN}", None, AdminRefusal.NO_TOKEN_CONFIGURED),
        ("Basic YWRtaW46YWRtaW4=", TOKEN, AdminRefusal.MALFORMED),
        ("CascadeNode 1000", TOKEN, AdminRefusal.MALFORMED),
        ("CascadeNode abc.def", TOKEN, AdminRefusal.MALFORMED),
        ("CascadeNode 1000.!!!!", TOKEN, AdminRefusal.MALFORMED),
        ("CascadeNode 1000." + "A" * 86, TOKEN, AdminRefusal.BAD_SIGNATURE),
        (node_authorization(OTHER, "drain", 1000), TOKEN, AdminRefusal.BAD_SIGNATURE),
        (node_authorization(KEY, "stop", 1000), TOKEN, AdminRefusal.BAD_SIGNATURE),
    ],
)
def test_other_credentials_are_refused(
    header: str | None, token: str | None, reason: AdminRefusal
) -> None:
    assert check(header, token) is reason


async def test_the_task_census_needs_credentials_and_counts_the_nodes_tasks() -> None:
    server = NodeServer(NodeConfig(port=0, api_secret="s" * 32, admin_token=TOKEN))
    await server.start()
    try:
        parked = [asyncio.ensure_future(asyncio.Event().wait()) for _ in range(3)]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/admin/tasks") as r:
                assert r.status == 401
                assert (await r.json())["code"] == "missing_credentials"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(f"{server.url}/admin/tasks", headers=auth) as r:
                census = await r.json()
        for task in parked:
            task.cancel()
        assert census["by_coroutine"]["Event.wait"] == 3
        assert census["count"] == sum(census["by_coroutine"].values())
    finally:
        await server.stop()
