"""Monitoring mounted on a node: ``/metrics``, ``/stats/history``, extra ``/stats`` sections,
the access rule, and the node's own copy of the dashboard at ``/dashboard``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psutil
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from monitor import probe
from monitor.access import AccessRule
from monitor.history import HistoryRing
from monitor.ledger import CounterLedger

if TYPE_CHECKING:
    from dht import Directory
    from peer.server import NodeServer

log = logging.getLogger("cascade.monitor")

# Paths that reveal room names and identities.
GUARDED_PREFIXES = ("/metrics", "/stats", "/dashboard")

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
FIRST_PACKET_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)
LOOKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0)


def access_middleware(
    rule: AccessRule, *, guard_all: bool = False
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp middleware enforcing ``rule`` on the monitoring paths (or on every path)."""

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        guarded = guard_all or request.path.startswith(GUARDED_PREFIXES)
        if guarded and not rule.allows(
            request.headers.get("Authorization"), request.query.get("token")
        ):
            return web.json_response(
                {"error": "unauthorized", "message": "monitoring token required (Bearer)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="cascade-monitoring"'},
            )
        return await handler(request)

    return guard


class NodeMonitor:
    """Metrics, history and stats sections of one node.

    ``attach`` hooks it into a :class:`~peer.server.NodeServer` before it starts.
    """

    def __init__(
        self,
        server: NodeServer,
        directory: Directory | None = None,
        *,
        rule: AccessRule | None = None,
        history_seconds: int = 900,
        region: str | None = None,
    ) -> None:
        self.server = server
        self.directory = directory
        self.rule = rule or AccessRule.for_listener(server.config.host, None, False)
        if directory is not None:
            self.node_id = probe.short_id(directory.node_id)
            self.region = region or directory.region
        else:
            self.node_id = probe.peer_node_id(server.relay_public_key)
            self.region = region or "none"
        self.started = time.time()
        self.history = HistoryRing(history_seconds)
        self.stream_ledger: CounterLedger[tuple[str, str]] = CounterLedger(
            len(probe.STREAM_COUNTERS)
        )
        self.relay_in_ledger: CounterLedger[str] = CounterLedger(len(probe.RELAY_IN_COUNTERS))
        self.relay_out_ledger: CounterLedger[str] = CounterLedger(len(probe.RELAY_OUT_COUNTERS))
        self.process = psutil.Process()
        self.registry = CollectorRegistry(auto_describe=False)
        labels = {"node_id": self.node_id, "region": self.region}
        self.forward_latency = Histogram(
            "cascade_forward_latency_seconds",
            "Packet arrival to its last sendto, sampled 1 in N forwarded packets",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
            labelnames=list(labels),
        ).labels(**labels)
        self.first_packet = Histogram(
            "cascade_consumer_first_packet_seconds",
            "Consumer created (join or subscribe) to its first forwarded packet",
            registry=self.registry,
            buckets=FIRST_PACKET_BUCKETS,
            labelnames=list(labels),
        ).labels(**labels)
        self.dht_lookup = Histogram(
            "cascade_dht_lookup_seconds",
            "Duration of DHT record lookups",
            registry=self.registry,
            buckets=LOOKUP_BUCKETS,
            labelnames=list(labels),
        ).labels(**labels)
        from monitor.metrics import NodeCollector

        self.registry.register(NodeCollector(self))
        self.link_bitrates: dict[str, float] = {}
        self._link_bytes: dict[str, tuple[float, int]] = {}
        self._rates_prev: tuple[float, list[int], list[int]] | None = None
        self.rates = {"ingress_pps": 0.0, "egress_pps": 0.0, "ingress_bps": 0.0, "egress_bps": 0.0}
        self._sampler: asyncio.Task[None] | None = None
        self.dashboard: Any = None  # monitor.observer.DashboardApp, created on first visit

    # -- wiring --------------------------------------------------------------------

    def attach(self) -> None:
        """Install hooks on the server (call before ``server.start()``)."""
        self.server.node.timing = self._timing
        if self.directory is not None:
            self.directory.server.lookup_timing = self.dht_lookup.observe
        self.server.app_setup.append(self.setup_app)
        self.server.stats_sections["node"] = self.node_section
        self.server.stats_sections["relay"] = self.relay_section
        self.server.stats_sections["counters"] = self.counters_section

    def _timing(self, name: str, seconds: float) -> None:
        if name == "forward":
            self.forward_latency.observe(seconds)
        elif name == "first_packet":
            self.first_packet.observe(seconds)

    def setup_app(self, app: web.Application) -> None:
        """Routes, the access middleware and the 1 s sampler on the node's app."""
        app.middlewares.append(access_middleware(self.rule))
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/stats/history", self.history_handler)
        from monitor.observer import mount_dashboard

        mount_dashboard(app, "/dashboard", self)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        self._sampler = asyncio.ensure_future(self._sample_forever())

    async def _stop(self, app: web.Application) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.dashboard is not None:
            await self.dashboard.stop()

    # -- sampling --------------------------------------------------------------------

    async def _sample_forever(self) -> None:
        while True:
            try:
                self.sample(time.time())
            except Exception:
                log.exception("monitoring sample failed")
            await asyncio.sleep(1.0 - time.time() % 1.0)

    def stream_totals(self) -> dict[tuple[str, str], list[int]]:
        """Monotonic stream counters per (direction, kind)."""
        return self.stream_ledger.update(
            (row.id, (row.direction, row.kind), row.counters())
            for row in probe.streams(self.server)
        )

    def sample(self, now: float) -> None:
        """Take one history sample (called every second)."""
        totals = self.stream_totals()
        ins = [0, 0]
        outs = [0, 0]
        for (direction, _kind), values in totals.items():
            acc = ins if direction == "in" else outs
            acc[0] += values[0]
            acc[1] += values[1]
        prev = self._rates_prev
        if prev is not None and now > prev[0]:
            dt = now - prev[0]
            self.rates = {
                "ingress_pps": (ins[0] - prev[1][0]) / dt,
                "egress_pps": (outs[0] - prev[2][0]) / dt,
                "ingress_bps": (ins[1] - prev[1][1]) * 8 / dt,
                "egress_bps": (outs[1] - prev[2][1]) * 8 / dt,
            }
        self._rates_prev = (now, ins, outs)
        for link in probe.relay_links(self.server):
            link_bytes = sum(v[1] for v in link["producers"].values())
            before = self._link_bytes.get(link["peer"])
            if before is not None and now > before[0]:
                self.link_bitrates[link["peer"]] = max(
                    0.0, (link_bytes - before[1]) * 8 / (now - before[0])
                )
            self._link_bytes[link["peer"]] = (now, link_bytes)
        node_totals = self.server.node.totals()
        admission = self.server.node.admission
        r = self.rates
        self.history.append(
            (
                round(now, 3),
                round(admission.cpu, 3),
                round(admission.headroom(), 3),
                self.process.memory_info().rss,
                round(r["ingress_pps"], 1),
                round(r["egress_pps"], 1),
                round(r["ingress_bps"]),
                round(r["egress_bps"]),
                node_totals["rooms"],
                node_totals["participants"],
                node_totals["producers"],
                node_totals["consumers"],
            )
        )

    # -- /stats sections ---------------------------------------------------------------

    def draining(self) -> bool:
        """Whether the node announces itself as draining (its directory record says so)."""
        if getattr(self.server, "draining", False):
            return True
        record = self.directory.record if self.directory is not None else None
        return bool(getattr(record, "draining", False))

    def node_section(self) -> dict[str, object]:
        """Identity and state of this node."""
        return {
            "node_id": self.node_id,
            "region": self.region,
            "url": self.server.url,
            "started": self.started,
            "draining": self.draining(),
            "pid": os.getpid(),
            "rss": self.process.memory_info().rss,
            "rates": {k: round(v, 1) for k, v in self.rates.items()},
            "history": "/stats/history",
        }

    def relay_section(self) -> dict[str, object]:
        """Relay links this node pulls over (edges of the overlay graph) and flows it serves."""
        links = []
        for link in probe.relay_links(self.server):
            producers = link.pop("producers")
            link["bitrate"] = round(self.link_bitrates.get(link["peer"], 0.0))
            link["bytes"] = sum(v[1] for v in producers.values())
            link["producer_ids"] = sorted(producers)
            links.append(link)
        served: dict[str, int] = {}
        for peer, _pid, _fid, _counters in probe.origin_flows(self.server):
            served[peer] = served.get(peer, 0) + 1
        return {"links": links, "served_flows": served}

    def counters_section(self) -> dict[str, object]:
        """Node-wide event counters (admission refusals, joins by outcome, drops)."""
        totals = self.stream_totals()
        return {
            "consumers_refused": self.server.node.consumers_refused,
            "joins": dict(self.server.join_outcomes),
            "sink_drops": sum(v[6] for (d, _k), v in totals.items() if d == "out"),
            "bad_messages": self.server.bad_messages,
        }

    # -- handlers -----------------------------------------------------------------------

    async def metrics_handler(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def history_handler(self, request: web.Request) -> web.Response:
        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            return web.json_response(
                {"error": "bad_request", "message": "since must be a number"}, status=400
            )
        return web.json_response(
            {"node_id": self.node_id, "region": self.region, **self.history.as_json(since)}
        )
