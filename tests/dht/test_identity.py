"""Node identity key files, keygen CLI and bootstrap address parsing."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from dht import IdentityError, NodeIdentity, keygen_main, node_id_from_public_key, parse_bootstrap
from dht.cli import split_host_port
from dht.identity import check_certificate


def test_node_id_derives_from_public_key(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    assert len(identity.public_key) == 32
    assert len(identity.node_id) == 20
    assert identity.node_id == node_id_from_public_key(identity.public_key)
    assert NodeIdentity.generate().node_id != identity.node_id
    with pytest.raises(ValueError):
        node_id_from_public_key(b"short")


def test_key_file_round_trip_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    identity = NodeIdentity.generate()
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = NodeIdentity.load(path)
    assert loaded.node_id == identity.node_id
    assert loaded.public_key == identity.public_key
    with pytest.raises(IdentityError):
        identity.save(path)  # never silently overwrites
    assert NodeIdentity.load_or_create(path).node_id == identity.node_id
    fresh = NodeIdentity.load_or_create(tmp_path / "new.key")
    assert stat.S_IMODE((tmp_path / "new.key").stat().st_mode) == 0o600
    assert fresh.node_id != identity.node_id


def test_refuses_world_readable_or_bogus_key_file(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    NodeIdentity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError):
        NodeIdentity.load(path)
    bogus = tmp_path / "bogus.key"
    bogus.write_bytes(b"not a key")
    os.chmod(bogus, 0o600)
    with pytest.raises(IdentityError):
        NodeIdentity.load(bogus)
    with pytest.raises(IdentityError):
        NodeIdentity.load(tmp_path / "missing.key")


def test_keygen_writes_key_and_prints_node_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.key"
    assert keygen_main(["--key", str(path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert printed == NodeIdentity.load(path).node_id_hex
    assert keygen_main(["--key", str(path)]) == 1  # exists
    assert keygen_main(["--key", str(path), "--force"]) == 0
    assert capsys.readouterr().out.strip() != printed


def test_keygen_certifies_with_operator_key(tmp_path: Path) -> None:
    operator_path = tmp_path / "operator.key"
    operator = NodeIdentity.generate()
    operator.save(operator_path)
    node_path = tmp_path / "node.key"
    assert keygen_main(["--key", str(node_path), "--certify", str(operator_path)]) == 0
    cert = (tmp_path / "node.key.cert").read_bytes()
    node = NodeIdentity.load(node_path)
    assert check_certificate(
        cert,
        operator_public_key=operator.public_key,
        node_public_key=node.public_key,
        now=0,
    )


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:4000") == ("127.0.0.1", 4000)
    assert split_host_port("[::1]:4000") == ("::1", 4000)
    assert split_host_port("node.example:1") == ("node.example", 1)
    for bad in ("nope", ":4000", "host:", "host:0", "host:70000", "[::1]4000", "h:x"):
        with pytest.raises(ValueError):
            split_host_port(bad)


def test_parse_bootstrap_resolves_names_ipv4_and_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_bootstrap("127.0.0.1:4000") == [("127.0.0.1", 4000)]
    assert parse_bootstrap("[::1]:4001") == [("::1", 4001)]
    resolved = parse_bootstrap("localhost:4000")
    assert ("127.0.0.1", 4000) in resolved
    assert all(port == 4000 for _, port in resolved)
    both = parse_bootstrap("127.0.0.1:1, 127.0.0.1:1,[::1]:2")
    assert both == [("127.0.0.1", 1), ("::1", 2)]
    assert parse_bootstrap(["127.0.0.1:5"]) == [("127.0.0.1", 5)]

    def unresolvable(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "unknown")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)  # no DNS traffic in tests
    with pytest.raises(ValueError):
        parse_bootstrap("no-such-host.invalid:4000")
