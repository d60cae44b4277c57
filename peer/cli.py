"""``cascade`` command line: ``node``, ``drain``, ``token``, ``keygen``, ``pubkey`` and
``bench``, plus the commands of extensions (see :func:`load_extensions`).

Every error is one line on stderr (``cascade <command>: <what to do>``) and a non-zero exit
status: 2 for bad usage or configuration, 1 when something failed at run time (a port in use).
Node options are declared once, in :data:`peer.config.NODE_OPTIONS`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dht import Directory, NodeIdentity, check_certificate, parse_bootstrap
from dht.identity import IdentityError
from peer import gc_tuning, logs
from peer.addresses import AddressError, AddressPlan, plan_addresses
from peer.admin import ADMIN_TOKEN_ENV
from peer.config import NODE_OPTIONS, ConfigError, add_options, resolve
from peer.drain import DrainPolicy
from peer.tokens import (
    KeyMaterialError,
    check_secret,
    issue_token,
    load_public_key,
    load_signing_key,
    new_secret,
    public_pem,
)

SECRET_ENV = "CASCADE_API_SECRET"
USAGE_ERROR = 2
RUNTIME_ERROR = 1
BENCHMARKS = {
    "fanout": "Cascade vs Janus vs aiortc MediaRelay fan-out (root: network namespaces)",
    "rooms": "many 5-participant rooms on Cascade and Janus (root: network namespaces)",
    "relay": "QUIC relay between two nodes",
    "dht": "directory lookups and churn on a local DHT",
    "failover": "drain (SIGTERM) and kill (SIGKILL) of node processes: media gaps",
}
NEEDS_ROOT = {"fanout", "rooms"}
EXTENSIONS_GROUP = "cascade.extensions"
EXTENSIONS_ENV = "CASCADE_EXTENSIONS"


class CliError(Exception):
    """A one-line error for the user; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)")


# -- extensions ------------------------------------------------------------------------


def load_extensions() -> list[Any]:
    """Extensions of the ``cascade.extensions`` entry-point group (and ``module:attr`` names
    in ``$CASCADE_EXTENSIONS``, comma-separated; ``none`` loads none). Each may define any of
    ``add_commands(subparsers)`` (subcommands set ``run=callable(args) -> int``),
    ``add_node_arguments(parser)`` and ``setup_node(args, server, directory) -> str | None``
    (called before the node starts; a string refuses to start with that message)."""
    spec_env = os.environ.get(EXTENSIONS_ENV, "").strip()
    if spec_env == "none":
        return []
    found: dict[str, Any] = {ep.value: ep for ep in entry_points(group=EXTENSIONS_GROUP)}
    for spec in filter(None, (s.strip() for s in spec_env.split(","))):
        found.setdefault(spec, None)
    loaded = []
    for value, ep in found.items():
        try:
            if ep is not None:
                loaded.append(ep.load())
            else:
                module, _, attr = value.partition(":")
                loaded.append(getattr(importlib.import_module(module), attr or "extension"))
        except Exception as exc:
            print(f"cascade: extension {value} not loaded: {exc!r}", file=sys.stderr)
    return loaded


def _hooks(extensions: list[Any], name: str) -> list[Any]:
    return [getattr(e, name) for e in extensions if hasattr(e, name)]


# -- secrets and keys ------------------------------------------------------------------


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_secret(secret_file: str | None) -> str | None:
    """The HS256 secret from ``secret_file`` or ``$CASCADE_API_SECRET``, checked; or None."""
    if secret_file:
        where = f"secret file {secret_file}"
        secret = _read_file(secret_file, "secret file").decode(errors="replace").strip()
    else:
        where = f"${SECRET_ENV}"
        secret = os.environ.get(SECRET_ENV, "").strip()
        if not secret:
            return None
    try:
        return check_secret(secret)
    except ValueError as exc:
        raise CliError(f"{where}: {exc}") from None


def read_public_key(path: str, what: str) -> Ed25519PublicKey:
    """A PEM Ed25519 public key file (``cascade pubkey`` output)."""
    try:
        return load_public_key(_read_file(path, what))
    except KeyMaterialError as exc:
        raise CliError(f"{what} {path}: {exc}") from None


def read_identity(path: str) -> NodeIdentity:
    """A node key file (``cascade keygen``): mode 0600, PEM Ed25519."""
    try:
        return NodeIdentity.load(path)
    except IdentityError as exc:
        raise CliError(str(exc).split(": [Errno")[0]) from None


# -- logging ---------------------------------------------------------------------------


def configure_logging(level: str, as_json: bool = False) -> None:
    """Root logging at ``level`` on stderr (see :mod:`peer.logs`)."""
    try:
        logs.configure_logging(level, as_json)
    except ValueError as exc:
        raise CliError(str(exc)) from None


# -- commands --------------------------------------------------------------------------


def _admin_token(path: str | None) -> str:
    if path:
        token = _read_file(path, "admin token").decode().strip()
    else:
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if token and len(token) < 16:
        raise CliError("the admin token must be at least 16 characters")
    return token


def drain_main(args: argparse.Namespace) -> int:
    """``cascade drain URL``: ask a node to drain (admin token or the node's key)."""
    import urllib.error
    import urllib.request

    from peer.admin import node_authorization

    url = args.url.rstrip("/") + "/admin/drain"
    if args.key:
        header = node_authorization(read_identity(args.key).private_key, "drain", time.time())
    else:
        token = _admin_token(args.admin_token_file)
        if not token:
            raise CliError(f"give --key, --admin-token-file or ${ADMIN_TOKEN_ENV}")
        header = f"Bearer {token}"
    request = urllib.request.Request(
        url, method="GET" if args.status else "POST", headers={"Authorization": header}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise CliError(f"{url}: HTTP {exc.code} {detail}", RUNTIME_ERROR) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"{url}: {exc}", RUNTIME_ERROR) from None
    print(json.dumps(body, sort_keys=True))
    return 0


def _token_parser(sub: Any) -> None:
    p = sub.add_parser("token", help="issue an access token")
    p.add_argument("--room", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--ttl", type=float, default=3600, help="seconds (default 3600)")
    p.add_argument("--no-publish", action="store_true")
    p.add_argument("--no-subscribe", action="store_true")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--secret-file", help=f"HS256 secret file (else ${SECRET_ENV})")
    keys.add_argument("--signing-key", help="Ed25519 application key file (EdDSA tokens)")


def token_main(args: argparse.Namespace) -> int:
    """``cascade token``: print a JWT."""
    key: str | Ed25519PrivateKey | None
    if args.signing_key:
        try:
            key = load_signing_key(_read_file(args.signing_key, "signing key"))
        except KeyMaterialError as exc:
            raise CliError(f"signing key {args.signing_key}: {exc}") from None
    else:
        key = read_secret(args.secret_file)
        if key is None:
            raise CliError(f"no signing key: set ${SECRET_ENV}, --secret-file or --signing-key")
    try:
        token = issue_token(
            key,
            args.room,
            args.identity,
            ttl=args.ttl,
            publish=not args.no_publish,
            subscribe=not args.no_subscribe,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(token)
    return 0


def pubkey_main(args: argparse.Namespace) -> int:
    """``cascade pubkey``: print the PEM public key of a key file (for --token-key and
    --fleet-operator)."""
    print(public_pem(read_identity(args.key).private_key), end="")
    return 0


def bench_main(name: str, rest: list[str]) -> int:
    """``cascade bench NAME ...``: run a packaged benchmark."""
    if not name or name.startswith("-"):
        listing = "\n".join(f"  {k:8} {v}" for k, v in BENCHMARKS.items())
        print(f"usage: cascade bench NAME [ARGS]  (cascade bench NAME --help)\n{listing}")
        return 0 if name in ("-h", "--help") or "--help" in rest else USAGE_ERROR
    if name not in BENCHMARKS:
        raise CliError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if name in NEEDS_ROOT and os.geteuid() != 0:
        raise CliError(
            f"benchmark {name} needs root: it runs servers and clients in network namespaces"
        )
    module = importlib.import_module(f"bench.{name}")
    sys.argv[0] = f"cascade bench {name}"  # the benchmark's own --help and errors
    return int(module.main(rest) or 0)


def _parser(extensions: list[Any]) -> _Parser:
    parser = _Parser(prog="cascade", description="Cascade: a decentralized SFU overlay")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    node = sub.add_parser("node", help="run a Cascade node")
    add_options(node, NODE_OPTIONS)
    for add_arguments in _hooks(extensions, "add_node_arguments"):
        add_arguments(node)
    for add_commands in _hooks(extensions, "add_commands"):
        add_commands(sub)
    _token_parser(sub)
    drain = sub.add_parser(
        "drain",
        help="move a node's participants to other nodes, then stop it",
        description="Ask the node at URL to drain: it takes nobody new, sends each participant "
        "to another node (migrate) and exits when empty or after its --drain-timeout.",
    )
    drain.add_argument("url", help="the node's URL, e.g. http://10.0.0.5:8080")
    drain.add_argument("--key", help="the node's identity key file (proves you own the node)")
    drain.add_argument("--admin-token-file", help=f"admin token file (else ${ADMIN_TOKEN_ENV})")
    drain.add_argument("--status", action="store_true", help="only show the drain's progress")
    sub.add_parser("keygen", help="create a key file (cascade keygen --help)", add_help=False)
    pub = sub.add_parser("pubkey", help="print the public key of a key file")
    pub.add_argument("--key", required=True, help="key file (cascade keygen)")
    bench = sub.add_parser(
        "bench",
        help="run a benchmark",
        description="\n".join(f"{k}: {v}" for k, v in BENCHMARKS.items()),
        add_help=False,
    )
    bench.add_argument("benchmark", nargs="?", default="")
    sub.add_parser(
        "demo",
        help="a local overlay: 4 nodes in eu, us and ap on 127.0.0.1 (cascade demo --help)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None, extensions: list[Any] | None = None) -> int:
    """Entry point of the ``cascade`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if extensions is None:
        extensions = load_extensions()
    try:
        args, rest = _parser(extensions).parse_known_args(argv)
        if args.command == "keygen":
            from dht.cli import keygen_main

            return keygen_main(rest)
        if args.command == "bench":
            return bench_main(args.benchmark, rest)
        if args.command == "demo":
            from peer.demo import main as demo_main

            return demo_main(rest)
        if rest:
            raise CliError(f"unrecognized arguments: {' '.join(rest)}")
        if getattr(args, "run", None) is not None:  # an extension's command
            return int(args.run(args))
        if args.command == "token":
            return token_main(args)
        if args.command == "pubkey":
            return pubkey_main(args)
        if args.command == "drain":
            return drain_main(args)
        return run_node(resolve(args), extensions)
    except CliError as exc:
        known = command in ("node", "token", "pubkey", "bench", "drain")
        print(f"cascade {command}: {exc}" if known else f"cascade: {exc}", file=sys.stderr)
        return exc.status
    except ConfigError as exc:
        print(f"cascade {command}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130


# -- cascade node ----------------------------------------------------------------------


def _bootstrap(specs: list[str]) -> list[tuple[str, int]]:
    try:
        return parse_bootstrap([b for spec in specs for b in spec.split(",") if b.strip()])
    except ValueError as exc:
        raise CliError(f"--bootstrap: {exc}") from None


def _fleet(args: argparse.Namespace, identity: NodeIdentity) -> tuple[bytes, bytes | None]:
    """The node's fleet certificate and the operator's raw public key (fleet mode), checked."""
    if not args.fleet_cert and not args.fleet_operator:
        return b"", None
    if not (args.fleet_cert and args.fleet_operator):
        raise CliError("fleet mode needs both --fleet-cert and --fleet-operator")
    if not args.key:
        raise CliError("--fleet-cert needs --key, the key file the certificate was issued for")
    certificate = _read_file(args.fleet_cert, "fleet certificate")
    operator = read_public_key(args.fleet_operator, "fleet operator key").public_bytes_raw()
    if not check_certificate(
        certificate,
        operator_public_key=operator,
        node_public_key=identity.public_key,
        now=time.time(),
    ):
        raise CliError(
            f"fleet certificate {args.fleet_cert} is not a valid, unexpired certificate of "
            f"{args.key} by that operator"
        )
    return certificate, operator


def run_node(args: argparse.Namespace, extensions: list[Any] | None = None) -> int:
    """Check every setting, then run a node until SIGINT/SIGTERM."""
    from peer.limits import EdgeLimits
    from peer.server import NodeConfig

    configure_logging(args.log_level, args.log_json)
    for name in ("port", "dht_port", "relay_port"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 65536:
            raise CliError(f"--{name.replace('_', '-')} {value} is not a port number")
    overlay = args.dht_port is not None
    if overlay and not args.region:
        raise CliError("--dht-port needs --region")
    if args.region and not overlay:
        raise CliError("--region needs --dht-port (the overlay's DHT port)")
    secret = read_secret(args.secret_file)
    token_key = read_public_key(args.token_key, "token key") if args.token_key else None
    if secret is None and token_key is None and not args.dev:
        raise CliError(
            f"no token secret or key: set ${SECRET_ENV}, --secret-file or --token-key (or --dev)"
        )
    if args.dev and secret is None:
        secret = new_secret()
        print(f"dev mode: API secret {secret}", flush=True)
    identity = read_identity(args.key) if args.key else NodeIdentity.generate()
    certificate, operator = _fleet(args, identity)
    admin_token = _admin_token(args.admin_token_file)
    try:
        drain = DrainPolicy.from_rate(args.drain_rate, args.drain_timeout)
    except ValueError as exc:
        raise CliError(f"--drain-rate / --drain-timeout: {exc}") from None
    bootstrap = _bootstrap(args.bootstrap)
    relay_port = args.relay_port if args.relay_port is not None or not overlay else 0
    try:
        plan = plan_addresses(
            host=args.host,
            port=args.port,
            public_url=args.public_url,
            ice_ip=args.ice_ip,
            announce_ip=args.announce_ip,
            dht_host=args.dht_host,
            dht_port=args.dht_port,
            dht_announce=args.dht_announce,
            relay_host=args.relay_host,
            relay_port=relay_port or None,
            relay_announce=args.relay_announce,
            bootstrap=bootstrap,
        )
    except AddressError as exc:
        raise CliError(str(exc)) from None
    config = NodeConfig(
        host=plan.http_bind,
        port=args.port,
        public_url=plan.public_url if (args.public_url or args.announce_ip) else "",
        api_secret=secret or "",
        token_public_key=token_key,
        dev=args.dev,
        ice_addresses=plan.ice_bind,
        ice_announce=plan.ice_announce,
        ice_port=args.ice_port,
        max_consumers=args.max_consumers,
        max_cpu=args.max_cpu,
        max_egress_pps=args.max_egress_pps,
        limits=EdgeLimits(max_ws_connections_per_ip=args.ws_per_ip, join_rate=args.join_rate),
        identity=identity.private_key,
        relay_host=plan.relay_bind,
        relay_port=relay_port,
        relay_announce=plan.relay_announce if (args.relay_announce or args.announce_ip) else "",
        admin_token=admin_token,
        drain=drain,
    )
    directory = None
    if overlay:
        try:
            directory = Directory(
                identity,
                args.region,
                host=plan.dht_bind,
                port=args.dht_port,
                bootstrap=bootstrap,
                ttl=args.dht_ttl,
                certificate=certificate,
                operator_key=operator,
            )
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if (args.location or args.scale_webhook) and not overlay:
        raise CliError("--location and --scale-webhook need the overlay (--dht-port)")
    if args.scale_webhook and not args.scale_webhook.startswith(("http://", "https://")):
        raise CliError(f"--scale-webhook must be an http(s) URL, not {args.scale_webhook!r}")
    workers = _workers(args, overlay)
    setup = [(hook, args) for hook in _hooks(extensions or [], "setup_node")]
    return asyncio.run(
        _serve(
            config,
            directory,
            plan,
            location=args.location,
            webhook=args.scale_webhook,
            setup=setup,
            workers=workers,
            watermark=args.worker_watermark,
            log_level=args.log_level,
            log_json=args.log_json,
            uvloop=args.uvloop,
        )
    )


def _workers(args: argparse.Namespace, overlay: bool) -> int:
    """How many media worker processes ``--workers`` asks for (checked)."""
    from peer.supervisor import usable_cores

    if args.workers < 0:
        raise CliError(f"--workers {args.workers}: use 1 or more (0: one per usable core)")
    if not 0.0 < args.worker_watermark <= 1.0:
        raise CliError(f"--worker-watermark {args.worker_watermark}: use a share in (0, 1]")
    return args.workers or usable_cores()


async def _serve(
    config: Any,
    directory: Directory | None,
    plan: AddressPlan,
    *,
    location: tuple[float, float] | None = None,
    webhook: str | None = None,
    setup: list[tuple[Any, argparse.Namespace]] | None = None,
    workers: int = 1,
    watermark: float = 0.6,
    log_level: str = "WARNING",
    log_json: bool = False,
    uvloop: bool = False,
) -> int:
    from peer.overlay import Overlay
    from peer.server import NodeServer
    from peer.supervisor import Supervisor

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    server = (
        Supervisor(
            config,
            workers,
            watermark=watermark,
            log_level=log_level,
            log_json=log_json,
            uvloop=uvloop,
        )
        if workers > 1
        else NodeServer(config)
    )

    def terminate() -> None:
        # The first SIGTERM drains (participants move to other nodes, then the node exits);
        # a second one, or SIGINT, stops at once.
        if server.draining or directory is None:
            stop.set()
        else:
            print("SIGTERM: draining (send it again to stop now)", flush=True)
            server.start_drain()

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, terminate)
    for setup_node, args in setup or []:  # extensions mount themselves before the start
        refusal = setup_node(args, server, directory)
        if refusal:
            raise CliError(refusal)
    try:
        await server.start()
    except OSError as exc:
        await server.stop()
        raise CliError(f"cannot listen: {exc.strerror or exc}", RUNTIME_ERROR) from None
    if server.config.public_url.endswith(":0"):  # --port 0 with --announce-ip
        server.config.public_url = f"{server.config.public_url[:-2]}:{server.config.port}"
    overlay = None
    if directory is not None:
        overlay = Overlay(server, directory, location=location, scale_webhook=webhook)
        try:
            await overlay.start()
        except OSError as exc:
            await server.stop()
            raise CliError(
                f"cannot start the DHT on {plan.dht_bind}: {exc.strerror or exc}", RUNTIME_ERROR
            ) from None
        host, port = directory.address
        announce = plan.dht_announce
        if announce.endswith("]") or ":" not in announce:
            announce = f"{announce}:{port}"
        print(
            f"overlay: node {directory.node_id.hex()[:16]} in {directory.region}, "
            f"DHT on {host}:{port} (bootstrap others through {announce})",
            flush=True,
        )
    print(f"cascade node listening on {server.url}", flush=True)
    gc_tuning.tune()
    collector = asyncio.ensure_future(gc_tuning.collect_periodically())
    if workers > 1:
        print(f"media workers: {workers} processes", flush=True)
    stopped = asyncio.ensure_future(stop.wait())
    drained = asyncio.ensure_future(server.drained.wait())
    await asyncio.wait([stopped, drained], return_when=asyncio.FIRST_COMPLETED)
    for waiter in (stopped, drained):
        waiter.cancel()
    if server.drained.is_set():
        print(f"drained: {server.drain_status()}", flush=True)
    collector.cancel()
    if overlay is not None:
        await overlay.stop()
    await server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
