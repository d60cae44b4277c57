"""The ``cascade`` command line as a user runs it: one-line errors, config files, tokens."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dht import NodeIdentity, issue_certificate
from peer.tokens import TokenVerifier, load_public_key

ROOT = Path(__file__).resolve().parents[2]
SECRET = "cli-test-secret-0123456789abcdef-0123456789"


def cascade(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """Run ``cascade ARGS`` from this checkout; returns the completed process."""
    full_env = {k: v for k, v in os.environ.items() if k != "CASCADE_API_SECRET"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "peer.cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli")
    node = NodeIdentity.generate()
    node.save(d / "node.key")
    other = NodeIdentity.generate()
    other.save(d / "other.key")
    operator = NodeIdentity.generate()
    operator.save(d / "operator.key")
    (d / "node.key.cert").write_bytes(issue_certificate(operator, node.public_key))
    (d / "other.cert").write_bytes(issue_certificate(operator, other.public_key))
    (d / "operator.pub").write_text(cascade("pubkey", "--key", str(d / "operator.key")).stdout)
    NodeIdentity.generate().save(d / "open.key")
    os.chmod(d / "open.key", 0o644)
    (d / "corrupt.key").write_text("not a key\n")
    os.chmod(d / "corrupt.key", 0o600)
    (d / "short.secret").write_text("tooshort\n")
    (d / "good.secret").write_text(SECRET + "\n")
    (d / "bad.toml").write_text("port = 8080\nwhat = 1\n")
    (d / "badtype.toml").write_text('port = "eighty"\n')
    (d / "broken.toml").write_text("port = [\n")
    return {p.name: str(p) for p in d.iterdir()}


@pytest.fixture
def busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield str(sock.getsockname()[1])
    sock.close()


GOOD = {"CASCADE_API_SECRET": SECRET}

# (arguments, environment, exit status, text the one-line error must contain)
CASES = [
    (["token", "--room", "r", "--identity", "a"], {}, 2, "no signing key"),
    (["token", "--room", "r", "--identity", "a"], {"CASCADE_API_SECRET": "x"}, 2, "at least 32"),
    (
        ["token", "--room", "r", "--identity", "a", "--secret-file", "{short.secret}"],
        {},
        2,
        "at least 32",
    ),
    (
        ["token", "--room", "r", "--identity", "a", "--secret-file", "{missing}"],
        {},
        2,
        "cannot read secret file",
    ),
    (["token", "--room", "bad room", "--identity", "a"], GOOD, 2, "invalid room name"),
    (["token", "--room", "r", "--identity", "a", "--ttl", "-5"], GOOD, 2, "ttl"),
    (["token", "--room", "r", "--identity", "a", "--ttl", "soon"], GOOD, 2, "invalid float"),
    (
        ["token", "--room", "r", "--identity", "a", "--signing-key", "{good.secret}"],
        {},
        2,
        "not a PEM private key",
    ),
    (["token", "--identity", "a"], GOOD, 2, "--room"),
    (["node"], {}, 2, "no token secret or key"),
    (["node"], {"CASCADE_API_SECRET": "short"}, 2, "at least 32"),
    (["node", "--secret-file", "{short.secret}"], {}, 2, "at least 32"),
    (["node", "--token-key", "{node.key}"], {}, 2, "private key"),
    (["node", "--token-key", "{missing}"], {}, 2, "cannot read token key"),
    (["node", "--key", "{missing}"], GOOD, 2, "cannot read key file"),
    (["node", "--key", "{open.key}"], GOOD, 2, "chmod 600"),
    (["node", "--key", "{corrupt.key}"], GOOD, 2, "not a PEM private key"),
    (["node", "--port", "{busy}"], GOOD, 1, "cannot listen"),
    (["node", "--port", "70000"], GOOD, 2, "not a port number"),
    (["node", "--port", "http"], GOOD, 2, "invalid int"),
    (
        ["node", "--region", "eu", "--dht-port", "0", "--bootstrap", "nohost"],
        GOOD,
        2,
        "--bootstrap",
    ),
    (
        ["node", "--region", "eu", "--dht-port", "0", "--bootstrap", "10.0.0.1:99999"],
        GOOD,
        2,
        "port out of range",
    ),
    (["node", "--region", "bad region!", "--dht-port", "0"], GOOD, 2, "invalid region"),
    (["node", "--dht-port", "0"], GOOD, 2, "needs --region"),
    (
        ["node", "--region", "eu", "--dht-port", "0", "--bootstrap", "10.0.0.1:4000"],
        GOOD,
        2,
        "set --public-url",
    ),
    (
        ["node", "--host", "0.0.0.0", "--region", "eu", "--dht-port", "0"],
        GOOD,
        2,
        "0.0.0.0, which no other host can reach; set --public-url",
    ),
    (
        ["node", "--ice-ip", "0.0.0.0"],
        GOOD,
        2,
        "ICE binds an unspecified address; set --announce-ip",
    ),
    (
        [
            "node",
            "--region",
            "eu",
            "--dht-port",
            "0",
            "--announce-ip",
            "10.0.0.2",
            "--bootstrap",
            "10.0.0.1:4000",
        ],
        GOOD,
        2,
        "set --dht-host",
    ),
    (["node", "--announce-ip", "somewhere"], GOOD, 2, "not an IP address"),
    (["node", "--fleet-cert", "{node.key.cert}"], GOOD, 2, "--fleet-operator"),
    (
        ["node", "--fleet-cert", "{node.key.cert}", "--fleet-operator", "{operator.pub}"],
        GOOD,
        2,
        "needs --key",
    ),
    (
        [
            "node",
            "--key",
            "{node.key}",
            "--fleet-cert",
            "{missing}",
            "--fleet-operator",
            "{operator.pub}",
        ],
        GOOD,
        2,
        "cannot read fleet certificate",
    ),
    (
        [
            "node",
            "--key",
            "{node.key}",
            "--fleet-cert",
            "{other.cert}",
            "--fleet-operator",
            "{operator.pub}",
        ],
        GOOD,
        2,
        "not a valid, unexpired certificate",
    ),
    (["node", "--config", "{missing}"], GOOD, 2, "cannot read config file"),
    (["node", "--config", "{bad.toml}"], GOOD, 2, "unknown option 'what'"),
    (["node", "--config", "{badtype.toml}"], GOOD, 2, "bad value 'eighty' for port"),
    (["node", "--config", "{broken.toml}"], GOOD, 2, "not valid TOML"),
    (["node", "--log-level", "LOUD"], GOOD, 2, "--log-level"),
    (["node", "--workers", "-1"], GOOD, 2, "use 1 or more"),
    (["node", "--worker-watermark", "0"], GOOD, 2, "use a share in (0, 1]"),
    (["bench", "nosuch"], {}, 2, "unknown benchmark"),
    (["nosuch"], {}, 2, "invalid choice"),
]


@pytest.mark.parametrize(("args", "env", "status", "message"), CASES)
def test_cli_errors_are_one_line(files, busy_port, args, env, status, message):
    mapping = {**files, "missing": "/nonexistent/cascade-file", "busy": busy_port}
    argv = [mapping[a[1:-1]] if a.startswith("{") else a for a in args]
    result = cascade(*argv, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cascade"), lines[0]
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_token_with_secret_and_with_application_key(files, tmp_path):
    hs = cascade("token", "--room", "standup", "--identity", "alice", env=GOOD)
    assert hs.returncode == 0, hs.stderr
    grant = TokenVerifier(secret=SECRET).verify(hs.stdout.strip(), "standup")
    assert grant.identity == "alice" and grant.can_publish

    app_pub = cascade("pubkey", "--key", files["node.key"])
    assert app_pub.returncode == 0 and "BEGIN PUBLIC KEY" in app_pub.stdout
    ed = cascade(
        "token", "--room", "standup", "--identity", "bob", "--no-publish",
        "--signing-key", files["node.key"],
    )  # fmt: skip
    assert ed.returncode == 0, ed.stderr
    verifier = TokenVerifier(public_key=load_public_key(app_pub.stdout.encode()))
    grant = verifier.verify(ed.stdout.strip(), "standup")
    assert grant.identity == "bob" and not grant.can_publish


def test_config_file_with_flag_override(files, tmp_path):
    """A node started from node.toml (secret from a file), one value overridden by a flag."""
    config = tmp_path / "node.toml"
    config.write_text(
        f'host = "127.0.0.1"\nport = 1\npublic-url = "http://cascade.example:8443"\n'
        f'secret-file = "{files["good.secret"]}"\nlog-level = "WARNING"\nuvloop = false\n'
        f'ice-ip = ["127.0.0.1"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer.cli", "node", "--config", str(config), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "cascade node listening on http://cascade.example:8443"
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


def test_benchmarks_are_packaged_and_self_contained():
    """``cascade bench`` runs from an installed package: bench/ is packaged and never imports
    the (unpackaged) tests/."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "bench*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    for path in (ROOT / "bench").glob("*.py"):
        text = path.read_text()
        assert "from tests" not in text and "import tests" not in text, path
    listing = cascade("bench", "--help")
    assert listing.returncode == 0 and "fanout" in listing.stdout
    assert cascade("bench", "dht", "--help").returncode == 0
