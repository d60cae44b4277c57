"""The overlay as the dashboard sees it (sans-I/O): node records from the directory and the
``/stats`` each node answered, turned into nodes, relay edges, rooms, streams and alerts.

Everything a node sends is untrusted: :func:`parse_node_stats` keeps only fields of the
expected types and raises :class:`BadStats` for anything else, so a node that answers
garbage is shown as unreachable instead of breaking the view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from monitor.history import HISTORY_FIELDS, HistoryRing

SERIES_FIELDS = HISTORY_FIELDS
STREAM_SORT_KEYS = (
    "bitrate",
    "packets",
    "packet_rate",
    "fraction_lost",
    "jitter",
    "nacks",
    "plis",
    "retransmits",
    "room",
    "node",
    "kind",
    "direction",
    "name",
)
REFUSAL_ALERT_SECONDS = 60.0
MAX_STREAMS_PER_NODE = 20_000


class BadStats(ValueError):
    """A node's ``/stats`` answer does not have the expected shape."""


def _num(obj: Any, key: str, default: float = 0.0) -> float:
    value = obj.get(key, default) if isinstance(obj, dict) else default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return float(value)


def _str(obj: Any, key: str, default: str = "") -> str:
    value = obj.get(key, default) if isinstance(obj, dict) else default
    return value[:200] if isinstance(value, str) else default


def _dict(obj: Any, key: str) -> dict[str, Any]:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else {}


@dataclass
class NodeStats:
    """The parts of a node's ``/stats`` the dashboard uses."""

    time: float
    cpu: float
    headroom: float
    rss: float
    draining: bool
    totals: dict[str, float]
    rates: dict[str, float]
    rooms: dict[str, dict[str, int]]
    streams: list[dict[str, Any]]
    links: list[dict[str, Any]]
    consumers_refused: int


def parse_node_stats(raw: Any) -> NodeStats:
    """Validate and reduce one ``/stats`` answer; raises :class:`BadStats`."""
    if not isinstance(raw, dict) or not isinstance(raw.get("totals"), dict):
        raise BadStats("not a Cascade /stats document")
    totals_raw = raw["totals"]
    totals = {
        k: _num(totals_raw, k)
        for k in (
            "rooms",
            "participants",
            "producers",
            "consumers",
            "ingress_bitrate",
            "egress_bitrate",
            "egress_packet_rate",
        )
    }
    node = _dict(raw, "node")
    rates_raw = _dict(node, "rates")
    rates = {
        k: _num(rates_raw, k) for k in ("ingress_pps", "egress_pps", "ingress_bps", "egress_bps")
    }
    if not rates_raw:
        rates["ingress_bps"] = totals["ingress_bitrate"]
        rates["egress_bps"] = totals["egress_bitrate"]
        rates["egress_pps"] = totals["egress_packet_rate"]
    rooms: dict[str, dict[str, int]] = {}
    streams: list[dict[str, Any]] = []
    for room, members in _dict(raw, "rooms").items():
        if not isinstance(members, dict):
            raise BadStats("rooms must map participants")
        info = rooms[str(room)[:200]] = {"participants": 0, "producers": 0, "consumers": 0}
        for pid, member in members.items():
            if not isinstance(member, dict):
                raise BadStats("participant stats must be objects")
            info["participants"] += 1
            name = _str(member, "name") or str(pid)[:64]
            for direction, key in (("in", "producers"), ("out", "consumers")):
                for sid, s in _dict(member, key).items():
                    if not isinstance(s, dict):
                        continue
                    info[key] += 1
                    if len(streams) < MAX_STREAMS_PER_NODE:
                        streams.append(
                            {
                                "id": str(sid)[:64],
                                "direction": direction,
                                "kind": _str(s, "kind"),
                                "room": str(room)[:200],
                                "participant": str(pid)[:64],
                                "name": name,
                                "producer_id": _str(s, "producer_id") or str(sid)[:64],
                                **{
                                    k: _num(s, k)
                                    for k in (
                                        "bitrate",
                                        "packets",
                                        "packet_rate",
                                        "packets_lost",
                                        "fraction_lost",
                                        "jitter",
                                        "nacks",
                                        "plis",
                                        "retransmits",
                                    )
                                },
                            }
                        )
    links = []
    for link in _dict(raw, "relay").get("links", []) or []:
        if isinstance(link, dict) and _str(link, "peer"):
            links.append(
                {
                    "peer": _str(link, "peer"),
                    "state": _str(link, "state", "unknown"),
                    "rtt": _num(link, "rtt", -1.0),
                    "flows": int(_num(link, "flows")),
                    "bitrate": _num(link, "bitrate"),
                }
            )
    return NodeStats(
        time=_num(raw, "time"),
        cpu=_num(raw, "cpu"),
        headroom=_num(raw, "headroom", 1.0),
        rss=_num(node, "rss"),
        draining=node.get("draining") is True,
        totals=totals,
        rates=rates,
        rooms=rooms,
        streams=streams,
        links=links,
        consumers_refused=int(_num(_dict(raw, "counters"), "consumers_refused")),
    )


@dataclass
class NodeView:
    """Everything known about one node."""

    node_id: str
    region: str
    url: str
    first_seen: float
    record_seen: float = 0.0  # last time its record was live in the directory
    record_headroom: float | None = None
    record_draining: bool = False
    missing_since: float | None = None
    polled_at: float = 0.0
    poll_ok_at: float = 0.0
    poll_error: str | None = None
    stats: NodeStats | None = None
    refused_total: int = 0
    refused_changed_at: float = 0.0
    history: HistoryRing = field(default_factory=lambda: HistoryRing(900, SERIES_FIELDS))

    def status(self) -> str:
        if self.missing_since is not None:
            return "missing"
        if self.poll_error is not None:
            return "unreachable"
        if self.record_draining or (self.stats is not None and self.stats.draining):
            return "draining"
        return "up" if self.stats is not None else "pending"


class OverlayView:
    """Accumulates directory listings and poll results; renders snapshots for the page."""

    def __init__(self, *, forget_missing_after: float = 600.0) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.forget_missing_after = forget_missing_after
        self.scale_signals: dict[str, str] = {}
        self.region_capacity: dict[str, dict[str, Any]] = {}
        self.directory_error: str | None = None

    # -- inputs ---------------------------------------------------------------------

    def observe_directory(self, now: float, records: list[dict[str, Any]]) -> None:
        """The live node records (``node_id``, ``region``, ``url``, optional ``headroom``)."""
        self.directory_error = None
        live = set()
        for rec in records:
            node_id = rec["node_id"]
            live.add(node_id)
            view = self.nodes.get(node_id)
            if view is None:
                view = self.nodes[node_id] = NodeView(node_id, rec["region"], rec["url"], now)
            view.region, view.url = rec["region"], rec["url"]
            view.record_seen = now
            view.record_headroom = rec.get("headroom")
            view.record_draining = rec.get("draining") is True
            view.missing_since = None
        for node_id, view in list(self.nodes.items()):
            if node_id not in live and view.missing_since is None:
                view.missing_since = now
            if (
                view.missing_since is not None
                and now - view.missing_since > self.forget_missing_after
            ):
                del self.nodes[node_id]

    def observe_poll(self, node_id: str, now: float, raw: Any, error: str | None = None) -> None:
        """One ``/stats`` answer (parsed JSON) or the error that replaced it."""
        view = self.nodes.get(node_id)
        if view is None:
            return
        view.polled_at = now
        if error is None:
            try:
                stats = parse_node_stats(raw)
            except BadStats as exc:
                error = f"bad answer: {exc}"
        if error is not None:
            view.poll_error = error
            return
        view.poll_error = None
        view.poll_ok_at = now
        view.stats = stats
        if stats.consumers_refused > view.refused_total:
            view.refused_changed_at = now
        view.refused_total = stats.consumers_refused
        t = stats.totals
        r = stats.rates
        view.history.append(
            (
                round(now, 3),
                stats.cpu,
                stats.headroom,
                stats.rss,
                r["ingress_pps"],
                r["egress_pps"],
                r["ingress_bps"],
                r["egress_bps"],
                t["rooms"],
                t["participants"],
                t["producers"],
                t["consumers"],
            )
        )

    def backfill(self, node_id: str, raw: Any) -> None:
        """Seed a node's series from its ``/stats/history`` (ignored if malformed)."""
        view = self.nodes.get(node_id)
        if view is None or len(view.history) or not isinstance(raw, dict):
            return
        fields = raw.get("fields")
        samples = raw.get("samples")
        if not isinstance(fields, list) or not isinstance(samples, list):
            return
        index = {name: i for i, name in enumerate(fields) if isinstance(name, str)}
        if any(name not in index for name in SERIES_FIELDS):
            return
        for sample in samples[-900:]:
            if not isinstance(sample, list) or len(sample) != len(fields):
                continue
            values = [sample[index[name]] for name in SERIES_FIELDS]
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                view.history.append([float(v) for v in values])

    def observe_scale_signals(self, signals: dict[str, str]) -> None:
        """Per-region placement signals (``scale_out`` / ``scale_in`` / ``steady``), when known."""
        self.scale_signals = dict(signals)

    def observe_overlay(self, raw: Any) -> None:
        """A node's ``GET /overlay`` answer: region signals and capacity."""
        regions = regions_from_overlay(raw)
        self.region_capacity = regions
        self.scale_signals = {n: i["signal"] for n, i in regions.items() if i["signal"]}

    # -- outputs --------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """Nodes, regions, edges, rooms and alerts (no per-stream rows)."""
        nodes = []
        edges = []
        rooms: dict[str, dict[str, Any]] = {}
        regions: dict[str, dict[str, Any]] = {}
        for view in sorted(self.nodes.values(), key=lambda v: (v.region, v.node_id)):
            status = view.status()
            s = view.stats if status not in ("missing",) else None
            headroom = s.headroom if s is not None else view.record_headroom
            nodes.append(
                {
                    "id": view.node_id,
                    "region": view.region,
                    "url": view.url,
                    "status": status,
                    "error": view.poll_error,
                    "headroom": headroom,
                    "cpu": s.cpu if s else None,
                    "rss": s.rss if s else None,
                    "rates": s.rates if s else None,
                    "totals": s.totals if s else None,
                    "missing_since": view.missing_since,
                    "last_ok": view.poll_ok_at or None,
                }
            )
            region = regions.setdefault(
                view.region, {"name": view.region, "nodes": 0, "up": 0, "headroom": []}
            )
            region["nodes"] += 1
            if status in ("up", "draining"):
                region["up"] += 1
                if headroom is not None:
                    region["headroom"].append(headroom)
            if s is None:
                continue
            for link in s.links:
                edges.append(
                    {
                        "source": link["peer"],
                        "target": view.node_id,
                        "state": link["state"],
                        "bitrate": link["bitrate"],
                        "flows": link["flows"],
                        "rtt": link["rtt"] if link["rtt"] >= 0 else None,
                    }
                )
            for room, info in s.rooms.items():
                entry = rooms.setdefault(
                    room, {"room": room, "participants": 0, "producers": 0, "nodes": {}}
                )
                entry["participants"] += info["participants"]
                entry["producers"] += info["producers"]
                entry["nodes"][view.node_id] = info["participants"]
        for region in regions.values():
            hr = region.pop("headroom")
            region["headroom"] = round(sum(hr) / len(hr), 3) if hr else None
            region["signal"] = self.scale_signals.get(region["name"])
            capacity = self.region_capacity.get(region["name"], {})
            for key in ("capacity", "used", "free_fraction", "spilled"):
                region[key] = capacity.get(key)
        return {
            "time": now,
            "nodes": nodes,
            "regions": sorted(regions.values(), key=lambda r: r["name"]),
            "edges": edges,
            "rooms": sorted(rooms.values(), key=lambda r: r["room"]),
            "alerts": self.alerts(now),
            "streams": sum(len(v.stats.streams) for v in self.nodes.values() if v.stats),
            "directory_error": self.directory_error,
        }

    def alerts(self, now: float) -> list[dict[str, Any]]:
        """Current alerts, most severe first."""
        out: list[dict[str, Any]] = []
        names = {v.node_id: v for v in self.nodes.values()}
        for view in self.nodes.values():
            status = view.status()
            label = f"{view.node_id} ({view.region})"
            if status == "missing":
                out.append(
                    _alert("critical", "node_missing", view, f"{label}: record expired", now)
                )
            elif status == "unreachable":
                out.append(
                    _alert("warning", "node_unreachable", view, f"{label}: {view.poll_error}", now)
                )
            elif status == "draining":
                out.append(_alert("info", "node_draining", view, f"{label} is draining", now))
            if view.refused_changed_at and now - view.refused_changed_at < REFUSAL_ALERT_SECONDS:
                out.append(
                    _alert(
                        "warning",
                        "admission_refusals",
                        view,
                        f"{label} refused consumers ({view.refused_total} so far)",
                        now,
                    )
                )
            if view.stats is not None and status != "missing":
                for link in view.stats.links:
                    if link["state"] in ("interrupted", "connecting", "closed"):
                        peer = names.get(link["peer"])
                        where = f"{peer.node_id} ({peer.region})" if peer else link["peer"]
                        out.append(
                            _alert(
                                "warning",
                                "relay_interrupted",
                                view,
                                f"relay {where} → {label} {link['state']}",
                                now,
                            )
                        )
        for region, signal in sorted(self.scale_signals.items()):
            if signal in ("scale_out", "scale_in"):
                out.append(
                    {
                        "severity": "warning" if signal == "scale_out" else "info",
                        "kind": signal,
                        "node": None,
                        "region": region,
                        "message": f"region {region}: {signal.replace('_', '-')}",
                    }
                )
        rank = {"critical": 0, "warning": 1, "info": 2}
        return sorted(out, key=lambda a: (rank[a["severity"]], a["kind"], a["message"]))

    def history(self, node_id: str) -> dict[str, object] | None:
        """A node's series (the last 15 minutes)."""
        view = self.nodes.get(node_id)
        return None if view is None else view.history.as_json()

    def streams(
        self,
        *,
        room: str | None = None,
        node: str | None = None,
        kind: str | None = None,
        direction: str | None = None,
        search: str | None = None,
        sort: str = "bitrate",
        descending: bool = True,
        offset: int = 0,
        limit: int = 50,
    ) -> dict[str, Any]:
        """One page of the stream table, filtered and sorted."""
        if sort not in STREAM_SORT_KEYS:
            sort = "bitrate"
        limit = max(1, min(limit, 500))
        rows = []
        needle = search.lower() if search else None
        for view in self.nodes.values():
            if view.stats is None or (node and view.node_id != node):
                continue
            for row in view.stats.streams:
                if room and row["room"] != room:
                    continue
                if kind and row["kind"] != kind:
                    continue
                if direction and row["direction"] != direction:
                    continue
                if needle and needle not in f"{row['name']} {row['id']} {row['room']}".lower():
                    continue
                rows.append({**row, "node": view.node_id, "region": view.region})
        rows.sort(key=lambda r: (r[sort], r["id"]), reverse=descending)
        return {
            "total": len(rows),
            "offset": max(0, offset),
            "limit": limit,
            "rows": rows[max(0, offset) : max(0, offset) + limit],
        }


def _alert(severity: str, kind: str, view: NodeView, message: str, now: float) -> dict[str, Any]:
    return {
        "severity": severity,
        "kind": kind,
        "node": view.node_id,
        "region": view.region,
        "message": message,
    }


def regions_from_overlay(raw: Any) -> dict[str, dict[str, Any]]:
    """Per-region signal and capacity out of a node's ``GET /overlay`` answer.

    Reads ``{"regions": {name: {"signal": .., "capacity": .., "used": .., "free_fraction": ..,
    "spilled": ..}}}`` (or a list of such objects with ``region``/``name``); anything else
    yields nothing.
    """
    regions = raw.get("regions") if isinstance(raw, dict) else None
    items: list[tuple[Any, Any]] = []
    if isinstance(regions, dict):
        items = list(regions.items())
    elif isinstance(regions, list):
        items = [(r.get("region") or r.get("name"), r) for r in regions if isinstance(r, dict)]
    out: dict[str, dict[str, Any]] = {}
    for name, info in items:
        if not isinstance(name, str) or not isinstance(info, dict):
            continue
        signal = info.get("signal")
        entry: dict[str, Any] = {"signal": signal[:32] if isinstance(signal, str) else None}
        for key in ("capacity", "used", "free_fraction"):
            if key in info:
                entry[key] = _num(info, key)
        if "spilled" in info:
            entry["spilled"] = int(_num(info, "spilled"))
        out[name[:64]] = entry
    return out


def scale_signals_from_overlay(raw: Any) -> dict[str, str]:
    """Just the region signals of :func:`regions_from_overlay`."""
    return {
        name: info["signal"]
        for name, info in regions_from_overlay(raw).items()
        if info["signal"] is not None
    }
