"""Command-line helpers: ``cascade keygen`` and bootstrap address parsing."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

from dht.identity import IdentityError, NodeIdentity, issue_certificate

DEFAULT_KEY_FILE = "cascade-node.key"


def split_host_port(spec: str) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or ``v6-literal:port`` (no resolution)."""
    spec = spec.strip()
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {spec!r}: expected [host]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = spec.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {spec!r}: expected host:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in {spec!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {spec!r}")
    return host, port


def parse_bootstrap(specs: str | Iterable[str]) -> list[tuple[str, int]]:
    """Resolve ``host:port`` bootstrap addresses (comma-separated or a list) to (ip, port).

    Host names resolve to all their IPv4 and IPv6 addresses; duplicates are dropped.
    Raises ValueError for malformed or unresolvable entries.
    """
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    out: list[tuple[str, int]] = []
    for spec in specs:
        host, port = split_host_port(spec)
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            ips = [host]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except socket.gaierror as exc:
                raise ValueError(f"cannot resolve {host!r}: {exc}") from None
            ips = [str(info[4][0]) for info in infos]
        for ip in ips:
            if (ip, port) not in out:
                out.append((ip, port))
    return out


def keygen_main(argv: list[str] | None = None) -> int:
    """``cascade keygen``: write a new Ed25519 key file (mode 0600) and print the node id."""
    parser = argparse.ArgumentParser(
        prog="cascade keygen", description="Create a node identity key file."
    )
    parser.add_argument("--key", default=DEFAULT_KEY_FILE, help="key file to create")
    parser.add_argument("--force", action="store_true", help="overwrite an existing key file")
    parser.add_argument(
        "--certify",
        metavar="OPERATOR_KEY",
        help="fleet mode: also write KEY.cert signed by this operator key file",
    )
    parser.add_argument(
        "--cert-days", type=float, default=365.0, help="certificate validity in days"
    )
    args = parser.parse_args(argv)
    try:
        identity = NodeIdentity.generate()
        identity.save(args.key, overwrite=args.force)
        if args.certify:
            operator = NodeIdentity.load(args.certify)
            cert = issue_certificate(
                operator, identity.public_key, valid_for=args.cert_days * 86400
            )
            Path(args.key + ".cert").write_bytes(cert)
    except (IdentityError, OSError) as exc:
        print(f"cascade keygen: {exc}", file=sys.stderr)
        return 1
    print(identity.node_id_hex)
    return 0
