"""Bind and announce addresses, and the refusal to advertise what no other host can reach."""

from __future__ import annotations

import pytest

from peer.addresses import AddressError, plan_addresses
from peer.overlay import announced_relay_address

REMOTE = [("10.1.0.1", 4000)]
LOCAL = [("127.0.0.1", 4000)]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # single node on loopback: everything as before
        (
            {"host": "127.0.0.1", "port": 8080},
            ("http://127.0.0.1:8080", ["127.0.0.1"], None, "127.0.0.1", "127.0.0.1"),
        ),
        # bind everything, announce the host address
        (
            {"host": "0.0.0.0", "port": 8080, "ice_ip": ["0.0.0.0"], "announce_ip": "10.1.0.2",
             "dht_port": 4000, "relay_port": 4433, "bootstrap": REMOTE},
            ("http://10.1.0.2:8080", ["0.0.0.0"], "10.1.0.2", "10.1.0.2:4000", "10.1.0.2:4433"),
        ),
        # explicit announce addresses win over --announce-ip
        (
            {"host": "0.0.0.0", "port": 8080, "announce_ip": "10.1.0.2",
             "public_url": "https://eu1.example.com/", "dht_port": 4000,
             "dht_announce": "198.51.100.7:14000", "relay_announce": "198.51.100.7",
             "relay_port": 4433, "bootstrap": REMOTE},
            ("https://eu1.example.com", ["127.0.0.1"], "10.1.0.2", "198.51.100.7:14000",
             "198.51.100.7:4433"),
        ),
        # IPv6
        (
            {"host": "::", "port": 8080, "announce_ip": "fd00::2", "ice_ip": ["::"],
             "dht_port": 4000, "bootstrap": [("fd00::1", 4000)]},
            ("http://[fd00::2]:8080", ["::"], "fd00::2", "[fd00::2]:4000", "[fd00::2]"),
        ),
        # a loopback overlay may announce loopback addresses
        (
            {"host": "127.0.0.1", "port": 0, "dht_port": 0, "bootstrap": LOCAL},
            ("http://127.0.0.1:0", ["127.0.0.1"], None, "127.0.0.1", "127.0.0.1"),
        ),
    ],
)  # fmt: skip
def test_plan(kwargs, expected):
    plan = plan_addresses(**kwargs)
    got = (plan.public_url, plan.ice_bind, plan.ice_announce, plan.dht_announce,
           plan.relay_announce)  # fmt: skip
    assert got == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": "127.0.0.1", "port": 1, "ice_ip": ["0.0.0.0"]}, "set --announce-ip"),
        ({"host": "127.0.0.1", "port": 1, "announce_ip": "eu.example"}, "not an IP address"),
        ({"host": "127.0.0.1", "port": 1, "ice_ip": ["eu.example"]}, "not an IP address"),
        ({"host": "127.0.0.1", "port": 1, "public_url": "ws:/x"}, "http(s) URL"),
        ({"host": "0.0.0.0", "port": 1, "dht_port": 0}, "set --public-url"),
        ({"host": "127.0.0.1", "port": 1, "dht_port": 0, "bootstrap": REMOTE},
         "bootstrap peer 10.1.0.1:4000 is on another host; set --public-url"),
        ({"host": "0.0.0.0", "port": 1, "public_url": "http://10.1.0.2:1", "dht_port": 0,
          "relay_announce": "127.0.0.1", "bootstrap": REMOTE}, "set --relay-announce"),
        ({"host": "0.0.0.0", "port": 1, "public_url": "http://10.1.0.2:1", "dht_port": 0,
          "relay_announce": "10.1.0.2", "dht_announce": "0.0.0.0:4000"}, "set --dht-announce"),
        ({"host": "0.0.0.0", "port": 1, "public_url": "http://10.1.0.2:1", "dht_port": 0,
          "relay_announce": "10.1.0.2", "dht_announce": "10.1.0.2", "bootstrap": REMOTE},
         "ICE candidates would be 127.0.0.1"),
        ({"host": "127.0.0.1", "port": 1, "announce_ip": "10.1.0.2", "dht_port": 0,
          "bootstrap": REMOTE}, "set --dht-host"),
    ],
)  # fmt: skip
def test_refused(kwargs, message):
    with pytest.raises(AddressError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_addresses(**kwargs)


@pytest.mark.parametrize(
    ("announce", "expected"),
    [
        ("", "0.0.0.0:4433"),
        ("10.1.0.2", "10.1.0.2:4433"),
        ("10.1.0.2:5000", "10.1.0.2:5000"),
        ("[fd00::2]", "[fd00::2]:4433"),
        ("[fd00::2]:5000", "[fd00::2]:5000"),
    ],
)
def test_relay_announce(announce, expected):
    assert announced_relay_address(announce, "0.0.0.0", 4433) == expected
