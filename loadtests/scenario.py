"""Sans-I/O pieces of the load test: who joins where, per-track quality math, the
end report, and the capacity search. Plain data in, plain data out; time is passed in."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

FREEZE_AFTER = 0.5  # seconds without a new frame that count as a freeze


# -- who joins where ------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """What the load looks like (mapped from locust's custom arguments)."""

    room_size: int = 5
    rooms: int = 0  # 0: open a new room every room_size participants
    publisher_share: float = 1.0
    audio_only_share: float = 0.0
    width: int = 640
    height: int = 480
    fps: int = 30
    video_kbps: int = 500
    codec: str = "vp8"  # vp8 | h264
    nodes: tuple[str, ...] = ()  # signaling URLs; empty: locust's --host
    spread: str = "room"  # room: a room lives on one node; participant: rooms span nodes
    regions: tuple[str, ...] = ()  # region hints, one per node (or cycled per room)
    stay: float = 0.0  # seconds a participant stays before leaving and re-joining; 0: forever
    subscribers: str = "count"  # count: count packets/frames | decode: decode every frame
    room_prefix: str = "load"
    stats_interval: float = 5.0

    def __post_init__(self) -> None:
        if self.room_size < 1:
            raise ValueError("room size must be at least 1")
        if not 0.0 <= self.publisher_share <= 1.0 or not 0.0 <= self.audio_only_share <= 1.0:
            raise ValueError("shares are fractions between 0 and 1")
        if self.codec not in ("vp8", "h264"):
            raise ValueError(f"codec must be vp8 or h264, not {self.codec!r}")
        if self.spread not in ("room", "participant"):
            raise ValueError(f"spread must be room or participant, not {self.spread!r}")
        if self.subscribers not in ("count", "decode"):
            raise ValueError(f"subscribers must be count or decode, not {self.subscribers!r}")

    @property
    def publishers_per_room(self) -> int:
        """Publishers among the first positions of each room."""
        return round(self.publisher_share * self.room_size)

    def slot(self, index: int, host: str, worker: int = 0) -> Slot:
        """Where participant ``index`` (0, 1, ... within this load generator process) goes.

        Each worker fills its own rooms (``worker`` is part of the room name), so rooms
        are complete however locust spreads users over workers.
        """
        if self.rooms:
            room_no, position = index % self.rooms, index // self.rooms
        else:
            room_no, position = divmod(index, self.room_size)
        publishes = position < self.publishers_per_room
        audio_only = publishes and _spread_pick(position, self.audio_only_share)
        nodes = self.nodes or (host,)
        node_no = (room_no if self.spread == "room" else position) % len(nodes)
        region = self.regions[node_no % len(self.regions)] if self.regions else None
        room = f"{self.room_prefix}-w{worker}-r{room_no}"
        return Slot(
            room=room,
            position=position,
            identity=f"{room}-p{position}",
            publishes=publishes,
            audio_only=audio_only,
            node=nodes[node_no].rstrip("/"),
            region=region,
        )

    def tracks_per_publisher(self, audio_only: bool) -> int:
        """Tracks one publisher sends."""
        return 1 if audio_only else 2


def _spread_pick(position: int, share: float) -> bool:
    """True for about ``share`` of positions, spread evenly (0.5 -> every other one)."""
    return math.floor((position + 1) * share) > math.floor(position * share)


@dataclass(frozen=True)
class Slot:
    """One participant's place in the scenario."""

    room: str
    position: int
    identity: str
    publishes: bool
    audio_only: bool
    node: str
    region: str | None


# -- per-track quality ------------------------------------------------------------------


@dataclass(frozen=True)
class TrackWindow:
    """What one track delivered since the previous window."""

    kind: str
    seconds: float
    fps: float
    kbps: float
    packets: int
    lost: int
    freezes: int
    decode_errors: int
    freeze_ms: tuple[float, ...] = ()  # lengths of the freezes that ended in this window

    @property
    def loss(self) -> float:
        """Fraction of packets lost in this window."""
        total = self.packets + self.lost
        return self.lost / total if total else 0.0


@dataclass
class TrackMeter:
    """Turns cumulative counters of one received track, sampled now and then, into
    windows (fps, bitrate, loss, freezes) and totals. Bytes may be unknown (-1)."""

    kind: str
    started: float
    first_frame_at: float | None = None
    frames: int = 0
    packets: int = 0
    bytes: int = 0
    lost: int = 0
    decode_errors: int = 0
    freezes: int = 0
    last_sample: float = 0.0
    _last_frame_at: float = 0.0
    _frozen: bool = False
    _freeze_gaps: list[float] = field(default_factory=list)
    _window: tuple[float, int, int, int, int, int, int] | None = None

    def observe(
        self,
        now: float,
        frames: int,
        packets: int,
        bytes_: int,
        lost: int,
        decode_errors: int = 0,
    ) -> None:
        """Feed the track's cumulative counters as of ``now``."""
        if self._window is None:
            self._window = (self.started, 0, 0, 0, 0, 0, 0)
        if frames > self.frames:
            if self._frozen:
                self._freeze_gaps.append(now - self._last_frame_at)
            if self.first_frame_at is None:
                self.first_frame_at = now
                # Windows measure delivery once media flows, not the wait before it.
                self._window = (now, frames, packets, bytes_, lost, self.freezes, decode_errors)
            self._last_frame_at = now
            self._frozen = False
        elif (
            self.first_frame_at is not None
            and not self._frozen
            and now - self._last_frame_at > FREEZE_AFTER
        ):
            self._frozen = True
            self.freezes += 1
        self.frames, self.packets, self.bytes, self.lost = frames, packets, bytes_, lost
        self.decode_errors = decode_errors
        self.last_sample = now

    @property
    def first_frame_seconds(self) -> float | None:
        """Seconds from subscribing (or joining) to the first frame."""
        return None if self.first_frame_at is None else self.first_frame_at - self.started

    def window(self) -> TrackWindow:
        """Delivery since the previous call (or since the start)."""
        t0, f0, p0, b0, l0, z0, e0 = self._window or (self.started, 0, 0, 0, 0, 0, 0)
        now = self.last_sample
        seconds = max(now - t0, 1e-9)
        gaps, self._freeze_gaps = self._freeze_gaps, []
        self._window = (
            now,
            self.frames,
            self.packets,
            self.bytes,
            self.lost,
            self.freezes,
            self.decode_errors,
        )
        return TrackWindow(
            kind=self.kind,
            seconds=seconds,
            fps=(self.frames - f0) / seconds,
            kbps=max(0, self.bytes - b0) * 8 / seconds / 1000 if self.bytes >= 0 else -1.0,
            packets=self.packets - p0,
            lost=max(0, self.lost - l0),
            freezes=self.freezes - z0,
            decode_errors=self.decode_errors - e0,
            freeze_ms=tuple(round(g * 1000, 1) for g in gaps),
        )

    def record(self, room: str, participant: str) -> TrackRecord:
        """Totals for the end report."""
        first = self.first_frame_seconds
        return TrackRecord(
            room=room,
            participant=participant,
            kind=self.kind,
            frames=self.frames,
            packets=self.packets,
            bytes=self.bytes,
            lost=self.lost,
            seconds=max(0.0, self.last_sample - (self.first_frame_at or self.started)),
            first_frame_ms=None if first is None else round(first * 1000, 1),
            freezes=self.freezes,
            decode_errors=self.decode_errors,
        )


# -- the end report ---------------------------------------------------------------------


@dataclass
class TrackRecord:
    """One received track over a participant's whole session."""

    room: str
    participant: str
    kind: str
    frames: int
    packets: int
    bytes: int
    lost: int
    seconds: float
    first_frame_ms: float | None
    freezes: int
    decode_errors: int


@dataclass
class ParticipantRecord:
    """One participant session: what it published, received and which errors it got."""

    room: str
    identity: str
    published_tracks: int
    subscribes: bool = True
    errors: dict[str, int] = field(default_factory=dict)
    tracks: list[TrackRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (sent from locust workers to the master)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParticipantRecord:
        """Inverse of :meth:`to_dict`."""
        tracks = [TrackRecord(**t) for t in data.get("tracks", [])]
        return cls(
            room=str(data["room"]),
            identity=str(data["identity"]),
            published_tracks=int(data["published_tracks"]),
            subscribes=bool(data.get("subscribes", True)),
            errors={str(k): int(v) for k, v in dict(data.get("errors", {})).items()},
            tracks=tracks,
        )


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` (0..1) percentile, nearest-rank; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _summarize(records: list[ParticipantRecord]) -> dict[str, Any]:
    # A subscriber expects every track that the room's other participants published.
    published: dict[str, int] = {}
    for r in records:
        published[r.identity] = max(published.get(r.identity, 0), r.published_tracks)
    own = dict(published)
    room_published: dict[str, int] = {}
    for r in records:  # identities are per room; count each once
        room_published[r.room] = room_published.get(r.room, 0) + published.pop(r.identity, 0)
    expected = received = 0
    tracks: list[TrackRecord] = []
    errors: dict[str, int] = {}
    for r in records:
        if r.subscribes:
            wanted = room_published[r.room] - own[r.identity]
            expected += wanted
            # Each session counts what it received, once per producer it expected.
            received += min(sum(1 for t in r.tracks if t.frames > 0), wanted)
        tracks.extend(r.tracks)
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
    first = [t.first_frame_ms for t in tracks if t.first_frame_ms is not None]
    rates = [t.bytes * 8 / t.seconds / 1000 for t in tracks if t.seconds > 0 and t.bytes >= 0]
    packets = sum(t.packets for t in tracks)
    lost = sum(t.lost for t in tracks)
    video = [t for t in tracks if t.kind == "video" and t.seconds > 0]
    return {
        "participants": len({r.identity for r in records}),
        "tracks_received": received,
        "tracks_expected": expected,
        "mean_kbps": round(statistics.fmean(rates), 1) if rates else None,
        "video_fps": round(statistics.fmean(t.frames / t.seconds for t in video), 1)
        if video
        else None,
        "packet_loss": round(lost / (packets + lost), 5) if packets + lost else 0.0,
        "first_frame_p50_ms": percentile(first, 0.5),
        "first_frame_p95_ms": percentile(first, 0.95),
        "freezes": sum(t.freezes for t in tracks),
        "decode_errors": sum(t.decode_errors for t in tracks),
        "errors": errors,
    }


def build_report(
    records: list[ParticipantRecord],
    server: Mapping[str, Any] | None = None,
    generator: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-room and total summary (the ``lk perf load-test`` table), plus server and
    load-generator cost."""
    by_room: dict[str, list[ParticipantRecord]] = {}
    for r in records:
        by_room.setdefault(r.room, []).append(r)
    return {
        "rooms": {room: _summarize(rs) for room, rs in sorted(by_room.items())},
        "total": _summarize(records),
        "server": dict(server or {}),
        "generator": dict(generator or {}),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in sorted(value.items())) or "-"
    return str(value)


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a text table (one row per room, then the total)."""
    header = (
        "room",
        "tracks",
        "kbps",
        "video fps",
        "loss %",
        "first frame p50/p95 ms",
        "freezes",
        "errors",
    )
    rows: list[tuple[str, ...]] = []
    for name, s in [*report["rooms"].items(), ("TOTAL", report["total"])]:
        rows.append(
            (
                name,
                f"{s['tracks_received']}/{s['tracks_expected']}",
                _cell(s["mean_kbps"]),
                _cell(s["video_fps"]),
                f"{s['packet_loss'] * 100:.2f}",
                f"{_cell(s['first_frame_p50_ms'])}/{_cell(s['first_frame_p95_ms'])}",
                str(s["freezes"])
                + (f" (+{s['decode_errors']} decode errors)" if s["decode_errors"] else ""),
                _cell(s["errors"]),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header]]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    server = report.get("server") or {}
    for url, s in sorted(server.get("nodes", {}).items()):
        lines.append(
            f"node {url}: cpu mean {s['cpu_mean']:.0%} max {s['cpu_max']:.0%} of a core, "
            f"forwarded {s['egress_pps_mean']:.0f} packets/s (max {s['egress_pps_max']:.0f}), "
            f"consumers max {s['consumers_max']}"
        )
    generator = report.get("generator") or {}
    if generator:
        lines.append(
            f"load generator: {generator.get('processes', 1)} process(es), cpu mean "
            f"{generator.get('cpu_mean', 0.0):.0%} max {generator.get('cpu_max', 0.0):.0%} "
            "of a core (summed over processes)"
        )
    return "\n".join(lines)


# -- server and generator cost -----------------------------------------------------------


@dataclass
class ServerSeries:
    """Samples of nodes' ``GET /stats`` (CPU as a fraction of a core, forwarded packets/s)."""

    samples: dict[str, list[tuple[float, float, float, int]]] = field(default_factory=dict)

    def add(self, node: str, now: float, stats: Mapping[str, Any]) -> None:
        """Record one ``/stats`` reply of ``node``."""
        totals = stats.get("totals", {})
        self.samples.setdefault(node, []).append(
            (
                now,
                float(stats.get("cpu", 0.0)),
                float(totals.get("egress_packet_rate", 0.0)),
                int(totals.get("consumers", 0)),
            )
        )

    def summary(self, since: float = 0.0, until: float = math.inf) -> dict[str, Any]:
        """Per node and summed: mean/max CPU, mean/max forwarded packets/s, max consumers."""
        nodes: dict[str, dict[str, float]] = {}
        for node, samples in self.samples.items():
            window = [s for s in samples if since <= s[0] <= until]
            if not window:
                continue
            nodes[node] = {
                "cpu_mean": round(statistics.fmean(s[1] for s in window), 3),
                "cpu_max": round(max(s[1] for s in window), 3),
                "egress_pps_mean": round(statistics.fmean(s[2] for s in window), 1),
                "egress_pps_max": round(max(s[2] for s in window), 1),
                "consumers_max": max(s[3] for s in window),
            }
        return {
            "nodes": nodes,
            "cpu_mean": round(sum(n["cpu_mean"] for n in nodes.values()), 3),
            "egress_pps_mean": round(sum(n["egress_pps_mean"] for n in nodes.values()), 1),
        }


@dataclass
class CpuSeries:
    """The load generator's own CPU (fraction of one core), per process, summed."""

    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, process: str, now: float, cpu: float) -> None:
        """Record one reading of a generator process."""
        self.samples.setdefault(process, []).append((now, cpu))

    def summary(self, since: float = 0.0, until: float = math.inf) -> dict[str, Any]:
        """Mean and max of the summed CPU over the window."""
        per = {p: [c for t, c in s if since <= t <= until] for p, s in self.samples.items()}
        per = {p: c for p, c in per.items() if c}
        if not per:
            return {"processes": 0, "cpu_mean": 0.0, "cpu_max": 0.0}
        return {
            "processes": len(per),
            "cpu_mean": round(sum(statistics.fmean(c) for c in per.values()), 3),
            "cpu_max": round(sum(max(c) for c in per.values()), 3),
        }


# -- capacity search --------------------------------------------------------------------


@dataclass(frozen=True)
class QualityTarget:
    """When quality counts as broken (the capacity search's stop rule)."""

    first_frame_p95_ms: float = 1000.0
    max_loss: float = 0.01
    min_fps: float = 25.0
    max_refusals: int = 0


@dataclass
class QualityWindow:
    """Samples of one step: first-frame times, video fps, packets/lost, refusals."""

    first_frame_ms: list[float] = field(default_factory=list)
    video_fps: list[float] = field(default_factory=list)
    packets: int = 0
    lost: int = 0
    refusals: int = 0
    tracks: int = 0

    def add_track_window(self, w: TrackWindow) -> None:
        """Add one track's window (fps counts for video only)."""
        if w.kind == "video":
            self.video_fps.append(w.fps)
        self.packets += w.packets
        self.lost += w.lost

    def merge(self, data: Mapping[str, Any]) -> None:
        """Add another window's :meth:`to_dict` (from a locust worker)."""
        self.first_frame_ms += [float(v) for v in data.get("first_frame_ms", [])]
        self.video_fps += [float(v) for v in data.get("video_fps", [])]
        self.packets += int(data.get("packets", 0))
        self.lost += int(data.get("lost", 0))
        self.refusals += int(data.get("refusals", 0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @property
    def loss(self) -> float:
        """Fraction of packets lost."""
        total = self.packets + self.lost
        return self.lost / total if total else 0.0

    def breaches(self, target: QualityTarget) -> list[str]:
        """Which parts of ``target`` this window breaks (empty: quality held)."""
        out = []
        p95 = percentile(self.first_frame_ms, 0.95)
        if p95 is not None and p95 > target.first_frame_p95_ms:
            out.append(f"first frame p95 {p95:.0f} ms > {target.first_frame_p95_ms:.0f} ms")
        if self.loss > target.max_loss:
            out.append(f"loss {self.loss:.2%} > {target.max_loss:.2%}")
        if self.video_fps:
            fps = statistics.fmean(self.video_fps)
            if fps < target.min_fps:
                out.append(f"video fps {fps:.1f} < {target.min_fps:.0f}")
        if self.refusals > target.max_refusals:
            out.append(f"{self.refusals} refusals")
        if not self.packets and not self.video_fps and not self.first_frame_ms:
            out.append("no media received")  # never a held step: nothing was measured
        return out


@dataclass
class StepResult:
    """One step of the capacity search."""

    users: int
    held: bool
    breaches: list[str]
    video_fps: float | None
    loss: float
    first_frame_p95_ms: float | None
    server: dict[str, Any]
    generator: dict[str, Any]


@dataclass
class CapacitySearch:
    """Step load: ``step_users`` more participants every ``step_seconds`` until a step
    breaks the quality target (or ``max_users`` is reached). Time is passed in.

    A step that breaks the target is run ``retries`` more times before the search ends
    (a shared machine has stalls that are not the node's doing). Within a step,
    first-frame times and refusals count from the step's start; fps and loss only after
    ``settle`` seconds, once the step's new participants are flowing.
    """

    step_users: int
    step_seconds: float
    max_users: int
    target: QualityTarget = field(default_factory=QualityTarget)
    settle: float = 0.0
    retries: int = 0
    level: int = 1
    _retried: int = 0
    steps: list[StepResult] = field(default_factory=list)
    done: bool = False
    step_started: float | None = None
    window: QualityWindow = field(default_factory=QualityWindow)
    settled: QualityWindow = field(default_factory=QualityWindow)

    def __post_init__(self) -> None:
        if self.settle <= 0:
            self.settle = self.step_seconds / 2

    @property
    def users(self) -> int:
        """Participants the current step runs."""
        return min(self.max_users, self.level * self.step_users)

    def add(self, now: float, data: Mapping[str, Any]) -> None:
        """Samples from users (a :class:`QualityWindow` dict) arriving at ``now``."""
        self.window.merge(
            {"first_frame_ms": data.get("first_frame_ms", []), "refusals": data.get("refusals", 0)}
        )
        if self.step_started is not None and now - self.step_started >= self.settle:
            self.settled.merge(
                {
                    "video_fps": data.get("video_fps", []),
                    "packets": data.get("packets", 0),
                    "lost": data.get("lost", 0),
                }
            )

    def tick(self, now: float, server: dict[str, Any], generator: dict[str, Any]) -> int | None:
        """Users to run from ``now`` on, or None when the search is over.

        ``server`` and ``generator`` summarize the cost over the current step.
        """
        if self.done:
            return None
        if self.step_started is None:
            self.step_started = now
            return self.users
        if now - self.step_started < self.step_seconds:
            return self.users
        merged = QualityWindow(
            first_frame_ms=self.window.first_frame_ms,
            refusals=self.window.refusals,
            video_fps=self.settled.video_fps,
            packets=self.settled.packets,
            lost=self.settled.lost,
        )
        breaches = merged.breaches(self.target)
        self.steps.append(
            StepResult(
                users=self.users,
                held=not breaches,
                breaches=breaches,
                video_fps=round(statistics.fmean(merged.video_fps), 1)
                if merged.video_fps
                else None,
                loss=round(merged.loss, 5),
                first_frame_p95_ms=percentile(merged.first_frame_ms, 0.95),
                server=server,
                generator=generator,
            )
        )
        self.window, self.settled = QualityWindow(), QualityWindow()
        self.step_started = now
        if breaches and self._retried < self.retries:
            self._retried += 1  # a noisy machine: hold this load once more before judging
            return self.users
        if breaches or self.users >= self.max_users:
            self.done = True
            return None
        self._retried = 0
        self.level += 1
        return self.users

    def result(self) -> dict[str, Any]:
        """The last step that held, the step that broke, and every step."""
        held = [s for s in self.steps if s.held]
        broke = self.steps[-1] if self.steps and not self.steps[-1].held else None
        return {
            "last_held": asdict(held[-1]) if held else None,
            "broke": asdict(broke) if broke else None,
            "steps": [asdict(s) for s in self.steps],
        }
