"""``cascade`` command line: ``node``, ``token`` and ``keygen``, plus the commands of
extensions (see :func:`load_extensions`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from dht import Directory, NodeIdentity, parse_bootstrap
from peer.overlay import Overlay
from peer.server import NodeConfig, NodeServer
from peer.tokens import issue_token, new_secret

SECRET_ENV = "CASCADE_API_SECRET"
EXTENSIONS_GROUP = "cascade.extensions"
EXTENSIONS_ENV = "CASCADE_EXTENSIONS"


def load_extensions() -> list[Any]:
    """Extensions of the ``cascade.extensions`` entry-point group (and ``module:attr`` names
    in ``$CASCADE_EXTENSIONS``, comma-separated; ``none`` loads none). Each may define any of
    ``add_commands(subparsers)`` (subcommands set ``run=callable(args) -> int``),
    ``add_node_arguments(parser)`` and ``setup_node(args, server, directory) -> str | None``
    (called before the node starts; a string refuses to start with that message)."""
    found: dict[str, Any] = {}
    if os.environ.get(EXTENSIONS_ENV, "").strip() == "none":
        return []
    for ep in entry_points(group=EXTENSIONS_GROUP):
        found[ep.value] = ep
    for spec in filter(None, os.environ.get(EXTENSIONS_ENV, "").split(",")):
        found.setdefault(spec.strip(), None)
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


def _read_secret(args: argparse.Namespace) -> str | None:
    if getattr(args, "secret_file", None):
        return Path(args.secret_file).read_text().strip()
    return os.environ.get(SECRET_ENV)


def _node_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    p = sub.add_parser("node", help="run a Cascade node")
    p.add_argument("--host", default="127.0.0.1", help="HTTP/WebSocket listen address")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--dev", action="store_true", help="dev mode: printed dev secret, dev tokens")
    p.add_argument(
        "--ice-ip",
        action="append",
        default=None,
        help="address to gather ICE host candidates on (repeatable; default 127.0.0.1)",
    )
    p.add_argument("--secret-file", help=f"file with the API secret (else ${SECRET_ENV})")
    p.add_argument("--max-consumers", type=int, default=2000)
    p.add_argument("--max-cpu", type=float, default=0.85, help="refuse consumers above this")
    p.add_argument("--max-egress-pps", type=float, default=60_000.0)
    p.add_argument("--key", help="node identity key file (cascade keygen); default: a fresh key")
    p.add_argument("--region", help="join the overlay DHT in this region")
    p.add_argument("--dht-host", default="127.0.0.1", help="DHT UDP listen address")
    p.add_argument("--dht-port", type=int, help="DHT UDP port (enables the overlay)")
    p.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        help="host:port of a DHT node to join through (repeatable, comma-separated)",
    )
    p.add_argument("--dht-ttl", type=float, default=10.0, help="record lifetime, seconds")
    p.add_argument("--relay-host", default="127.0.0.1", help="QUIC relay listen address")
    p.add_argument("--relay-port", type=int, help="QUIC relay UDP port (default: with the DHT)")
    p.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log-level", default="INFO")
    return p


def _token_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("token", help="issue an access token")
    p.add_argument("--room", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--ttl", type=float, default=3600, help="seconds")
    p.add_argument("--no-publish", action="store_true")
    p.add_argument("--no-subscribe", action="store_true")
    p.add_argument("--secret-file", help=f"file with the API secret (else ${SECRET_ENV})")


def main(argv: list[str] | None = None, extensions: list[Any] | None = None) -> int:
    """Entry point of the ``cascade`` console script."""
    if extensions is None:
        extensions = load_extensions()
    parser = argparse.ArgumentParser(prog="cascade", description="Cascade SFU node")
    sub = parser.add_subparsers(dest="command", required=True)
    node_parser = _node_parser(sub)
    _token_parser(sub)
    for add_arguments in _hooks(extensions, "add_node_arguments"):
        add_arguments(node_parser)
    for add_commands in _hooks(extensions, "add_commands"):
        add_commands(sub)
    sub.add_parser("keygen", help="create a node identity key", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "keygen":
        from dht.cli import keygen_main

        return keygen_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "run", None) is not None:
        return int(args.run(args))
    if args.command == "token":
        secret = _read_secret(args)
        if not secret:
            print(f"no API secret: set ${SECRET_ENV} or pass --secret-file", file=sys.stderr)
            return 2
        print(
            issue_token(
                secret,
                args.room,
                args.identity,
                ttl=args.ttl,
                publish=not args.no_publish,
                subscribe=not args.no_subscribe,
            )
        )
        return 0
    return run_node(args, extensions)


def run_node(args: argparse.Namespace, extensions: list[Any] | None = None) -> int:
    """Run a node until SIGINT/SIGTERM."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    for noisy in ("kademlia", "rpcudp", "aioquic", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    secret = _read_secret(args)
    if not secret:
        if not args.dev:
            print(
                f"no API secret: set ${SECRET_ENV}, pass --secret-file, or use --dev",
                file=sys.stderr,
            )
            return 2
        secret = new_secret()
        print(f"dev mode: API secret {secret}", flush=True)
    identity = NodeIdentity.load(args.key) if args.key else NodeIdentity.generate()
    overlay = args.dht_port is not None
    if overlay and not args.region:
        print("--dht-port needs --region", file=sys.stderr)
        return 2
    relay_port = args.relay_port
    if relay_port is None and overlay:
        relay_port = 0
    config = NodeConfig(
        host=args.host,
        port=args.port,
        api_secret=secret,
        dev=args.dev,
        ice_addresses=args.ice_ip or ["127.0.0.1"],
        max_consumers=args.max_consumers,
        max_cpu=args.max_cpu,
        max_egress_pps=args.max_egress_pps,
        identity=identity.private_key,
        relay_host=args.relay_host,
        relay_port=relay_port,
    )
    if args.uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    directory = None
    if overlay:
        directory = Directory(
            identity,
            args.region,
            host=args.dht_host,
            port=args.dht_port,
            bootstrap=parse_bootstrap([b for spec in args.bootstrap for b in spec.split(",")]),
            ttl=args.dht_ttl,
        )
    return asyncio.run(_serve(config, directory, args, extensions or []))


async def _serve(
    config: NodeConfig, directory: Directory | None, args: argparse.Namespace, extensions: list[Any]
) -> int:
    server = NodeServer(config)
    for setup_node in _hooks(extensions, "setup_node"):
        refusal = setup_node(args, server, directory)
        if refusal:
            print(refusal, file=sys.stderr)
            return 2
    await server.start()
    overlay = None
    if directory is not None:
        overlay = Overlay(server, directory)
        await overlay.start()
        host, port = directory.address
        print(
            f"overlay: node {directory.node_id.hex()[:16]} in {directory.region}, "
            f"DHT on {host}:{port}",
            flush=True,
        )
    print(f"cascade node listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if overlay is not None:
        await overlay.stop()
    await server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
