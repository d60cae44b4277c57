"""How the ``cascade`` CLI loads monitoring (entry point ``cascade.extensions``):
node flags (``--monitor-token-file``, ``--public-metrics``), mounting on every node, and the
``cascade monitor`` command (the standalone dashboard)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from monitor.access import TOKEN_ENV, AccessRule, startup_refusal
from monitor.node import access_middleware

if TYPE_CHECKING:
    from dht import Directory
    from peer.server import NodeServer


def _add_access_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--monitor-token-file",
        help=f"file with the bearer token for /metrics, /stats, /dashboard (else ${TOKEN_ENV})",
    )
    p.add_argument(
        "--public-metrics",
        action="store_true",
        help="serve /metrics, /stats and the dashboard without a token on any address",
    )


def read_token(args: argparse.Namespace) -> str | None:
    """The monitoring token from ``--monitor-token-file`` or the environment."""
    path = getattr(args, "monitor_token_file", None)
    if path:
        return Path(path).read_text().strip() or None
    return os.environ.get(TOKEN_ENV) or None


class MonitorExtension:
    """The object registered under the ``cascade.extensions`` entry-point group."""

    def add_node_arguments(self, parser: argparse.ArgumentParser) -> None:
        _add_access_arguments(parser)

    def setup_node(
        self, args: argparse.Namespace, server: NodeServer, directory: Directory | None
    ) -> str | None:
        from monitor.node import NodeMonitor

        token = read_token(args)
        refusal = startup_refusal(server.config.host, token, args.public_metrics)
        if refusal:
            return refusal
        rule = AccessRule.for_listener(server.config.host, token, args.public_metrics)
        NodeMonitor(server, directory, rule=rule).attach()
        return None

    def add_commands(self, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        p = sub.add_parser("monitor", help="run the overlay dashboard (a DHT observer)")
        p.add_argument(
            "--bootstrap",
            action="append",
            default=[],
            required=True,
            help="host:port of a DHT node (repeatable, comma-separated)",
        )
        p.add_argument("--host", default="127.0.0.1", help="dashboard listen address")
        p.add_argument("--port", type=int, default=9090)
        p.add_argument("--dht-host", default="127.0.0.1")
        p.add_argument("--dht-port", type=int, default=0)
        p.add_argument("--interval", type=float, default=1.0, help="poll interval, seconds")
        p.add_argument("--log-level", default="INFO")
        _add_access_arguments(p)
        p.set_defaults(run=run_monitor)


extension = MonitorExtension()


def run_monitor(args: argparse.Namespace) -> int:
    """``cascade monitor``: serve the dashboard until SIGINT/SIGTERM."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    for noisy in ("kademlia", "rpcudp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    token = read_token(args)
    refusal = startup_refusal(args.host, token, args.public_metrics)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    return asyncio.run(serve_monitor(args, token))


async def start_monitor(
    bootstrap: list[tuple[str, int]],
    *,
    host: str = "127.0.0.1",
    port: int = 9090,
    dht_host: str = "127.0.0.1",
    dht_port: int = 0,
    token: str | None = None,
    public: bool = False,
    interval: float = 1.0,
) -> tuple[web.AppRunner, Any, Any]:
    """Start the standalone dashboard; returns ``(runner, directory, dashboard)``."""
    from dht import Directory, NodeIdentity
    from monitor.observer import DashboardApp, Observer, directory_lister

    directory = Directory(
        NodeIdentity.generate(), "observer", host=dht_host, port=dht_port, bootstrap=bootstrap
    )
    await directory.start(announce=False)
    dashboard = DashboardApp(
        lambda: Observer(directory_lister(directory), token=token, interval=interval)
    )
    app = web.Application(
        middlewares=[
            access_middleware(AccessRule.for_listener(host, token, public), guard_all=True)
        ]
    )
    dashboard.mount(app, "")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    await dashboard.ensure_started()
    return runner, directory, dashboard


async def serve_monitor(args: argparse.Namespace, token: str | None) -> int:
    from dht import parse_bootstrap

    bootstrap = parse_bootstrap([b for spec in args.bootstrap for b in spec.split(",")])
    runner, directory, dashboard = await start_monitor(
        bootstrap,
        host=args.host,
        port=args.port,
        dht_host=args.dht_host,
        dht_port=args.dht_port,
        token=token,
        public=args.public_metrics,
        interval=args.interval,
    )
    print(f"cascade monitor: dashboard on http://{args.host}:{args.port}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await dashboard.stop()
    await runner.cleanup()
    await directory.stop(withdraw=False)
    return 0
