"""Small API checks that need no network."""

from __future__ import annotations

import socket

import pytest

import dht
from dht import Directory, NodeIdentity
from dht.protocol import _parse_nodes, map_address


def test_public_api_is_exported() -> None:
    for name in dht.__all__:
        assert hasattr(dht, name), name
    assert dht.__doc__


def test_directory_validates_region_and_ttl() -> None:
    identity = NodeIdentity.generate()
    with pytest.raises(ValueError):
        Directory(identity, "no spaces allowed")
    with pytest.raises(ValueError):
        Directory(identity, "eu", ttl=3600)
    with pytest.raises(ValueError):
        Directory(identity, "eu", ttl=0)
    directory = Directory(identity, "eu")
    assert directory.ttl <= 15
    assert directory.refresh_interval <= directory.ttl / 2
    assert directory.record.relay_key == identity.public_key
    assert directory.node_id == identity.node_id
    with pytest.raises(ValueError):
        directory.update_node(signaling_url="x" * 1000)
    assert directory.record.signaling_url == ""


def test_bootstrap_addresses_are_mapped_to_the_listening_family() -> None:
    assert map_address("127.0.0.1", socket.AF_INET) == "127.0.0.1"
    assert map_address("::1", socket.AF_INET) is None
    assert map_address("::ffff:10.0.0.1", socket.AF_INET) == "10.0.0.1"
    assert map_address("10.0.0.1", socket.AF_INET6) == "::ffff:10.0.0.1"
    assert map_address("fe80::1%eth0", socket.AF_INET6) == "fe80::1%eth0"


def test_contacts_from_answers_are_checked_and_mapped() -> None:
    node_id = bytes(20)
    raw = [
        [node_id, "127.0.0.1", 4000],
        [node_id, "::ffff:127.0.0.1", 4001],
        [node_id, "::1", 4002],
        [node_id, "not-an-ip", 4003],
        [b"short", "127.0.0.1", 4004],
        [node_id, "127.0.0.1", 70000],
        "garbage",
    ]
    v4 = _parse_nodes(raw, socket.AF_INET)
    assert [(n.ip, n.port) for n in v4] == [("127.0.0.1", 4000), ("127.0.0.1", 4001)]
    v6 = _parse_nodes(raw, socket.AF_INET6)
    assert [n.port for n in v6] == [4000, 4001, 4002]
    assert v6[0].ip == "::ffff:127.0.0.1"
