"""The Prometheus collector of a node: every series is read at scrape time from counters the
engine, relay and DHT keep (no instrumentation on the packet path besides the sampled
histograms kept by :class:`~monitor.node.NodeMonitor`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitor import probe

if TYPE_CHECKING:
    from monitor.node import NodeMonitor

BASE = ["node_id", "region"]


class NodeCollector(Collector):
    """Yields the ``cascade_*`` families of one node."""

    def __init__(self, monitor: NodeMonitor) -> None:
        self.monitor = monitor
        self.base = [monitor.node_id, monitor.region]

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=BASE + list(labels))

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=BASE + list(labels))

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        base = self.base
        server = m.server
        yield from self._streams()
        totals = server.node.totals()
        for name in ("rooms", "participants", "producers", "consumers"):
            g = self._gauge(f"cascade_{name}", f"{name.capitalize()} on this node")
            g.add_metric(base, totals[name])
            yield g
        joins = self._counter("cascade_joins", "Room joins by outcome", ("outcome",))
        for outcome, n in sorted(server.join_outcomes.items()):
            joins.add_metric([*base, outcome], n)
        yield joins
        refused = self._counter(
            "cascade_consumers_refused", "Consumers refused by admission control (overloaded)"
        )
        refused.add_metric(base, server.node.consumers_refused)
        yield refused
        bad = self._counter("cascade_bad_messages", "Signaling messages refused as malformed")
        bad.add_metric(base, server.bad_messages)
        yield bad
        admission = server.node.admission
        headroom = self._gauge("cascade_headroom_ratio", "Capacity left, 0..1 (smallest limit)")
        headroom.add_metric(base, admission.headroom())
        yield headroom
        yield from self._system()
        yield from self._relay()
        yield from self._dht()
        yield from self._regions()

    def _regions(self) -> Iterator[Metric]:
        """Region capacity and scale signal as this node's overlay sees them."""
        describe = getattr(self.monitor.server, "overlay_view", None)
        if describe is None:
            return
        try:
            regions = describe().get("regions", {})
        except Exception:
            return
        base = self.base
        capacity = self._gauge(
            "cascade_region_capacity_consumers", "Consumers a region can take", ("of_region",)
        )
        used = self._gauge(
            "cascade_region_used_consumers", "Consumers a region carries", ("of_region",)
        )
        spilled = self._gauge(
            "cascade_region_spilled",
            "Recent placements of the region's clients that left the region",
            ("of_region",),
        )
        signal = self._gauge(
            "cascade_region_scale_signal",
            "1 for the region's current signal (steady, scale_out, scale_in)",
            ("of_region", "signal"),
        )
        for name, info in sorted(regions.items()):
            if not isinstance(info, dict):
                continue
            capacity.add_metric([*base, name], float(info.get("capacity", 0)))
            used.add_metric([*base, name], float(info.get("used", 0)))
            spilled.add_metric([*base, name], float(info.get("spilled", 0)))
            for s in ("steady", "scale_out", "scale_in"):
                signal.add_metric([*base, name, s], 1.0 if info.get("signal") == s else 0.0)
        yield from (capacity, used, spilled, signal)

    def _streams(self) -> Iterator[Metric]:
        base = self.base
        rows = list(probe.streams(self.monitor.server))
        totals = self.monitor.stream_ledger.update(
            (row.id, (row.direction, row.kind), row.counters()) for row in rows
        )
        packets = self._counter(
            "cascade_packets",
            "RTP packets",
            (
                "direction",
                "kind",
            ),
        )
        octets = self._counter(
            "cascade_bytes",
            "RTP payload bytes",
            (
                "direction",
                "kind",
            ),
        )
        nacks = self._counter(
            "cascade_nack", "NACKs received from subscribers (direction=in)", ("direction",)
        )
        plis = self._counter(
            "cascade_keyframe_requests",
            "PLI/FIR received from subscribers (in) and sent to publishers (out)",
            ("direction",),
        )
        rtx = self._counter("cascade_rtx_packets", "Retransmissions sent to subscribers")
        dropped = self._counter("cascade_packets_dropped", "Packets dropped", ("reason",))
        nack_in = pli_in = pli_out = rtx_out = drops = 0
        for (direction, kind), v in sorted(totals.items()):
            packets.add_metric([*base, direction, kind], v[0])
            octets.add_metric([*base, direction, kind], v[1])
            if direction == "out":
                nack_in += v[2]
                pli_in += v[3]
                rtx_out += v[4]
                drops += v[6]
            else:
                pli_out += v[3]
        nacks.add_metric([*base, "in"], nack_in)
        plis.add_metric([*base, "in"], pli_in)
        plis.add_metric([*base, "out"], pli_out)
        rtx.add_metric(base, rtx_out)
        relay_counters = self.monitor.server.relay.counters if self.monitor.server.relay else None
        dropped.add_metric([*base, "sink"], drops)
        if relay_counters is not None:
            dropped.add_metric(
                [*base, "relay_queue"],
                relay_counters.datagrams_queue_full + relay_counters.datagrams_too_large,
            )
            dropped.add_metric(
                [*base, "relay_malformed"],
                relay_counters.datagrams_malformed + relay_counters.datagrams_unknown_flow,
            )
        yield from (packets, octets, nacks, plis, rtx, dropped)
        loss = self._gauge(
            "cascade_producer_loss_ratio",
            "Fraction of a producer's packets lost (publisher to node)",
            (
                "room",
                "producer_id",
                "kind",
            ),
        )
        lost = self._gauge(
            "cascade_producer_packets_lost",
            "Cumulative packets lost",
            (
                "room",
                "producer_id",
                "kind",
            ),
        )
        jitter = self._gauge(
            "cascade_producer_jitter_seconds",
            "Interarrival jitter",
            (
                "room",
                "producer_id",
                "kind",
            ),
        )
        for row in rows:
            if row.direction != "in" or row.origin != "local":
                continue
            labels = [*base, row.room, row.id, row.kind]
            received = row.stats.packets
            total = received + max(0, row.stats.packets_lost)
            loss.add_metric(labels, row.stats.packets_lost / total if total else 0.0)
            lost.add_metric(labels, row.stats.packets_lost)
            jitter.add_metric(labels, row.stats.jitter)
        yield from (loss, lost, jitter)

    def _system(self) -> Iterator[Metric]:
        base = self.base
        m = self.monitor
        cpu_times = m.process.cpu_times()
        cpu = self._counter("cascade_process_cpu_seconds", "CPU time of the node (all threads)")
        cpu.add_metric(base, cpu_times.user + cpu_times.system)
        yield cpu
        ratio = self._gauge(
            "cascade_process_cpu_ratio", "CPU of the node as a fraction of one core (last second)"
        )
        ratio.add_metric(base, m.server.node.admission.cpu)
        yield ratio
        rss = self._gauge("cascade_process_resident_memory_bytes", "Resident set size")
        rss.add_metric(base, m.process.memory_info().rss)
        yield rss
        per_core = self._gauge(
            "cascade_system_cpu_ratio", "System CPU use per core since last scrape", ("cpu",)
        )
        for i, pct in enumerate(psutil.cpu_percent(percpu=True)):
            per_core.add_metric([*base, str(i)], pct / 100)
        yield per_core
        load = self._gauge("cascade_system_load_average", "Load average", ("period",))
        for period, value in zip(("1m", "5m", "15m"), os.getloadavg(), strict=True):
            load.add_metric([*base, period], value)
        yield load
        net = psutil.net_io_counters()
        netb = self._counter(
            "cascade_system_network_bytes", "Bytes through all interfaces", ("direction",)
        )
        netb.add_metric([*base, "in"], net.bytes_recv)
        netb.add_metric([*base, "out"], net.bytes_sent)
        yield netb

    def _relay(self) -> Iterator[Metric]:
        base = self.base
        m = self.monitor
        relay = m.server.relay
        if relay is None:
            return
        state = self._gauge(
            "cascade_relay_link_state", "1 for the link's current state", ("peer", "state")
        )
        rtt = self._gauge("cascade_relay_link_rtt_seconds", "Relay link round-trip time", ("peer",))
        flows = self._gauge(
            "cascade_relay_link_flows", "Producers relayed in over the link", ("peer",)
        )
        links = probe.relay_links(m.server)
        live: list[tuple[tuple[str, str], str, tuple[int, ...]]] = []
        for link in links:
            for s in ("connecting", "live", "interrupted", "closed"):
                state.add_metric([*base, link["peer"], s], 1.0 if link["state"] == s else 0.0)
            if link["rtt"] is not None:
                rtt.add_metric([*base, link["peer"]], link["rtt"])
            flows.add_metric([*base, link["peer"]], link["flows"])
            live.extend(
                ((link["peer"], pid), link["peer"], v) for pid, v in link["producers"].items()
            )
        yield from (state, rtt, flows)
        rin = m.relay_in_ledger.update(live)
        names: tuple[str, ...] = probe.RELAY_IN_COUNTERS
        fams = {
            n: self._counter(f"cascade_relay_in_{n}", f"Relay flows in: {n}", ("peer",))
            for n in names
        }
        for peer, values in sorted(rin.items()):
            for n, v in zip(names, values, strict=True):
                fams[n].add_metric([*base, str(peer)], v)
        yield from fams.values()
        rout = m.relay_out_ledger.update(
            ((peer, pid, fid), peer, v) for peer, pid, fid, v in probe.origin_flows(m.server)
        )
        names = probe.RELAY_OUT_COUNTERS
        fams = {
            n: self._counter(f"cascade_relay_out_{n}", f"Relay flows served: {n}", ("peer",))
            for n in names
        }
        for peer, values in sorted(rout.items()):
            for n, v in zip(names, values, strict=True):
                fams[n].add_metric([*base, str(peer)], v)
        yield from fams.values()
        events = self._counter("cascade_relay_events", "Relay endpoint events", ("event",))
        for name, value in vars(relay.counters).items():
            events.add_metric([*base, name], value)
        yield events

    def _dht(self) -> Iterator[Metric]:
        base = self.base
        counters = probe.dht_counters(self.monitor.directory)
        if counters is None:
            return
        lookups = self._counter("cascade_dht_lookups", "DHT record lookups")
        lookups.add_metric(base, counters["lookups"])
        records = self._gauge("cascade_dht_records_stored", "Records this node holds")
        records.add_metric(base, counters["records"])
        contacts = self._gauge("cascade_dht_contacts", "Peers in the routing table")
        contacts.add_metric(base, counters["contacts"])
        refused = self._counter("cascade_dht_records_refused", "Records refused", ("reason",))
        for reason, n in sorted(counters["refused"].items()):
            refused.add_metric([*base, reason], n)
        traffic = self._counter("cascade_dht_bytes", "DHT UDP bytes", ("direction",))
        traffic.add_metric([*base, "in"], counters["bytes_received"])
        traffic.add_metric([*base, "out"], counters["bytes_sent"])
        yield from (lookups, records, contacts, refused, traffic)
