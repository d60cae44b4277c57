"""Bind and announce addresses of a node's listeners (pure; no sockets).

Every listener has an address it binds (``--host``, ``--ice-ip``, ``--dht-host``,
``--relay-host``) and one it announces to clients and other nodes (``--public-url``,
``--announce-ip``, ``--dht-announce``, ``--relay-announce``), like mediasoup's
listen/announced pairs. ``--announce-ip`` is the default announce host of all of them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


class AddressError(ValueError):
    """The addresses would not work; the message names the option to set."""


@dataclass(frozen=True)
class AddressPlan:
    """What a node binds and what it announces. Ports of 0 are filled in once bound."""

    http_bind: str
    public_url: str
    ice_bind: list[str]
    ice_announce: str | None
    dht_bind: str
    dht_announce: str
    relay_bind: str
    relay_announce: str


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None  # a host name


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or ::"""
    ip = _ip(host)
    return ip is not None and ip.is_unspecified


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost"""
    ip = _ip(host)
    return host == "localhost" if ip is None else ip.is_loopback


def _join(host: str, port: int | None) -> str:
    """``host:port``, ``[v6]:port``; just the host when the port is not known yet."""
    bracketed = f"[{host}]" if ":" in host else host
    return f"{bracketed}:{port}" if port else bracketed


def _split(spec: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if spec.count(":") == 1:
        host, _, port = spec.partition(":")
        return host, int(port)
    return spec, None


def plan_addresses(
    *,
    host: str,
    port: int,
    public_url: str | None = None,
    ice_ip: Sequence[str] = (),
    announce_ip: str | None = None,
    dht_host: str | None = None,
    dht_port: int | None = None,
    dht_announce: str | None = None,
    relay_host: str | None = None,
    relay_port: int | None = None,
    relay_announce: str | None = None,
    bootstrap: Sequence[tuple[str, int]] = (),
) -> AddressPlan:
    """Work out bind and announce addresses; raise :class:`AddressError` for ones that
    cannot work: an unspecified address announced anywhere, or a loopback address
    announced to an overlay whose bootstrap peers are on other hosts."""
    if announce_ip is not None and _ip(announce_ip) is None:
        raise AddressError(f"--announce-ip {announce_ip!r} is not an IP address")
    ice_bind = list(ice_ip) or ["127.0.0.1" if is_unspecified(host) else host]
    for address in ice_bind:
        if _ip(address) is None:
            raise AddressError(f"--ice-ip {address!r} is not an IP address")
    ice_announce = announce_ip
    if ice_announce is None and any(is_unspecified(a) for a in ice_bind):
        raise AddressError(
            "ICE binds an unspecified address; set --announce-ip to the address clients reach"
        )
    default_host = announce_ip or host
    if public_url is None:
        public_url = f"http://{_join(default_host, None)}:{port}"
    parts = urlsplit(public_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AddressError(f"--public-url {public_url!r} must be an http(s) URL with a host")
    dht_bind = dht_host or host
    relay_bind = relay_host or host
    try:
        dht_host_out, dht_port_out = _split(dht_announce or (announce_ip or dht_bind))
        relay_host_out, relay_port_out = _split(relay_announce or (announce_ip or relay_bind))
    except ValueError:
        raise AddressError("--dht-announce / --relay-announce must be HOST or HOST:PORT") from None
    dht_out = _join(dht_host_out, dht_port_out or dht_port)
    relay_out = _join(relay_host_out, relay_port_out or relay_port)
    plan = AddressPlan(
        http_bind=host,
        public_url=public_url.rstrip("/"),
        ice_bind=ice_bind,
        ice_announce=ice_announce,
        dht_bind=dht_bind,
        dht_announce=dht_out,
        relay_bind=relay_bind,
        relay_announce=relay_out,
    )
    if dht_port is not None:
        _check_overlay(plan, parts.hostname, dht_host_out, relay_host_out, bootstrap)
    return plan


def _check_overlay(
    plan: AddressPlan,
    url_host: str,
    dht_host: str,
    relay_host: str,
    bootstrap: Sequence[tuple[str, int]],
) -> None:
    remote = [b for b in bootstrap if not is_loopback(b[0])]
    announced = [
        (url_host, "the signaling URL", "--public-url"),
        (relay_host, "the relay address", "--relay-announce"),
        (dht_host, "the DHT address", "--dht-announce"),
    ]
    announced += [(a, "ICE candidates", "--announce-ip") for a in plan.ice_bind]
    if plan.ice_announce is not None:
        announced = [*announced[:3], (plan.ice_announce, "ICE candidates", "--announce-ip")]
    for address, what, option in announced:
        if is_unspecified(address):
            raise AddressError(
                f"{what} would be {address}, which no other host can reach; "
                f"set {option} (or --announce-ip)"
            )
        if remote and is_loopback(address):
            peer = _join(*remote[0])
            raise AddressError(
                f"{what} would be {address}, but the overlay's bootstrap peer {peer} is on "
                f"another host; set {option} (or --announce-ip)"
            )
    if remote and is_loopback(plan.dht_bind):
        raise AddressError(
            f"the DHT binds {plan.dht_bind} and cannot reach bootstrap peer "
            f"{_join(*remote[0])}; set --dht-host (e.g. 0.0.0.0)"
        )
