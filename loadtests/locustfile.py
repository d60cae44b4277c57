"""Cascade load test: locust users that are real WebRTC participants.

    locust -f loadtests/locustfile.py --headless -u 60 -r 5 -t 2m --host http://127.0.0.1:8080

Each user is one participant (the Python SDK: aiortc, pre-encoded VP8/H.264 + Opus,
subscribers that count or decode). Request events: ``join``, ``publish``,
``first_frame``, per-track ``track`` samples (fps, kbps, loss %), ``freeze`` lengths
(no frame for > 500 ms), and failures carrying
the node's error code (``overloaded`` ...). See loadtests/README.md.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import time
import urllib.request
from typing import Any

# locust puts this file's folder on sys.path; the SDK lives one level up.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import gevent  # noqa: E402
import psutil  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from loadtests.bridge import AsyncioBridge  # noqa: E402
from loadtests.media import h264_test_pattern  # noqa: E402
from loadtests.participant import Participant  # noqa: E402
from loadtests.scenario import (  # noqa: E402
    CpuSeries,
    ParticipantRecord,
    QualityWindow,
    Scenario,
    ServerSeries,
    build_report,
    format_report,
)
from peer import aiortc_adapter as rtc  # noqa: E402
from peer.client import CascadeError  # noqa: E402
from peer.media import opus_tone, vp8_test_pattern  # noqa: E402

log = logging.getLogger("cascade.loadtest")
BRIDGE = AsyncioBridge()
JOIN_TIMEOUT = 30.0
POLL_INTERVAL = 0.25  # seconds between a user's looks at its participant
SERVER_POLL_INTERVAL = 3.0


class Collector:
    """What this process gathered for the end report and the capacity search.

    Locust workers send it to the master with every stats report; the master (or a
    local run) merges it.
    """

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}  # session id -> latest record
        self._unsent: dict[str, dict[str, Any]] = {}
        self.quality = QualityWindow()
        self.server = ServerSeries()
        self.generator = CpuSeries()
        self.capacity: dict[str, Any] | None = None
        self.started = 0.0

    def record(self, session: str, record: ParticipantRecord) -> None:
        """Latest state of one participant session."""
        data = record.to_dict()
        self.records[session] = data
        self._unsent[session] = data

    def take_quality(self) -> dict[str, Any]:
        """Quality samples since the last call."""
        window, self.quality = self.quality, QualityWindow()
        return window.to_dict()

    def to_master(self) -> dict[str, Any]:
        """What a worker sends with a stats report (and forgets)."""
        unsent, self._unsent = self._unsent, {}
        return {"records": unsent, "quality": self.take_quality()}

    def merge(self, data: dict[str, Any]) -> None:
        """Merge a worker's :meth:`to_master`."""
        self.records.update(data.get("records", {}))
        self.quality.merge(data.get("quality", {}))

    def report(self) -> dict[str, Any]:
        """The end report."""
        records = [ParticipantRecord.from_dict(r) for r in self.records.values()]
        report = build_report(
            records,
            server=self.server.summary(self.started),
            generator=self.generator.summary(self.started),
        )
        if self.capacity is not None:
            report["capacity"] = self.capacity
        return report


COLLECTOR = Collector()
_SESSIONS = itertools.count()
_USER_INDEX = itertools.count()


# -- options ----------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    # parser.add_argument itself (not an argument group): locust shows these in the web UI.
    g = c = parser
    g.add_argument("--room-size", type=int, default=5, help="participants per room")
    g.add_argument(
        "--rooms", type=int, default=0, help="spread users round-robin over N rooms (0: fill)"
    )
    g.add_argument("--publisher-share", type=float, default=1.0, help="share that publishes")
    g.add_argument(
        "--audio-only-share", type=float, default=0.0, help="share of publishers with audio only"
    )
    g.add_argument("--video-width", type=int, default=640)
    g.add_argument("--video-height", type=int, default=480)
    g.add_argument("--video-fps", type=int, default=30)
    g.add_argument("--video-kbps", type=int, default=500)
    g.add_argument("--codec", choices=["vp8", "h264"], default="vp8")
    g.add_argument(
        "--nodes", default="", help="comma-separated node URLs to join through (default: --host)"
    )
    g.add_argument(
        "--spread",
        choices=["room", "participant"],
        default="room",
        help="room: each room on one node; participant: rooms span the nodes",
    )
    g.add_argument("--regions", default="", help="comma-separated region hints, one per node")
    g.add_argument(
        "--stay", type=float, default=0.0, help="seconds before leaving and re-joining (0: stay)"
    )
    g.add_argument(
        "--subscribers",
        choices=["count", "decode"],
        default="count",
        help="count packets and frames, or decode every frame",
    )
    g.add_argument("--room-prefix", default="load")
    g.add_argument("--stats-interval", type=float, default=5.0, help="seconds per track sample")
    g.add_argument(
        "--ice-ip",
        default="127.0.0.1",
        help="address ICE candidates are gathered on",
        include_in_web_ui=False,
    )
    g.add_argument(
        "--report-json",
        default="cascade-loadtest.json",
        help="end report as JSON ('' to skip)",
        include_in_web_ui=False,
    )
    c.add_argument("--step-users", type=int, default=5, help="participants added per step")
    c.add_argument("--step-seconds", type=float, default=30.0, help="seconds per step")
    c.add_argument("--step-max-users", type=int, default=200, help="stop after this step")
    c.add_argument(
        "--step-retries",
        type=int,
        default=0,
        help="re-run a broken step this often before stopping",
    )
    c.add_argument("--step-spawn-rate", type=float, default=5.0, help="joins per second")
    c.add_argument("--target-first-frame-ms", type=float, default=1000.0)
    c.add_argument("--target-loss", type=float, default=0.01)
    c.add_argument("--target-fps", type=float, default=25.0)


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def scenario_from(options: Any) -> Scenario:
    """The scenario of locust's parsed options."""
    return Scenario(
        room_size=options.room_size,
        rooms=options.rooms,
        publisher_share=options.publisher_share,
        audio_only_share=options.audio_only_share,
        width=options.video_width,
        height=options.video_height,
        fps=options.video_fps,
        video_kbps=options.video_kbps,
        codec=options.codec,
        nodes=_split(options.nodes),
        spread=options.spread,
        regions=_split(options.regions),
        stay=options.stay,
        subscribers=options.subscribers,
        room_prefix=options.room_prefix,
        stats_interval=options.stats_interval,
    )


def node_urls(environment: Environment) -> list[str]:
    """The nodes this run loads (their ``/stats`` go into the report)."""
    options = environment.parsed_options
    nodes = _split(options.nodes) if options is not None else ()
    host = environment.host or ""
    return [n.rstrip("/") for n in (nodes or ((host,) if host else ()))]


# -- process-wide wiring ----------------------------------------------------------------


def _fire(environment: Environment, kind: str, name: str, ms: float, **kw: Any) -> None:
    environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=ms,
        response_length=kw.pop("length", 0),
        exception=kw.pop("exception", None),
        context={},
    )


async def _encode_clips(options: Any) -> None:
    clip = h264_test_pattern if options.codec == "h264" else vp8_test_pattern
    if options.video_height > 0:
        clip(
            options.video_width,
            options.video_height,
            options.video_fps,
            options.video_kbps * 1000,
        )
    opus_tone()


def _poll_servers(environment: Environment) -> None:
    process = psutil.Process()
    process.cpu_percent(None)
    while True:
        gevent.sleep(SERVER_POLL_INTERVAL)
        now = time.time()
        COLLECTOR.generator.add("master", now, process.cpu_percent(None) / 100.0)
        for url in node_urls(environment):
            try:
                with urllib.request.urlopen(f"{url}/stats", timeout=5) as reply:
                    COLLECTOR.server.add(url, now, json.loads(reply.read()))
            except (OSError, ValueError) as exc:
                log.warning("GET %s/stats failed: %s", url, exc)


@events.init.add_listener
def _on_init(environment: Environment, **_kw: Any) -> None:
    runner = environment.runner
    options = environment.parsed_options
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not isinstance(runner, MasterRunner):
        if options is not None:
            rtc.set_ice_addresses(list(_split(options.ice_ip)) or ["127.0.0.1"])
        BRIDGE.start()  # from init, never lazily from a task
        if options is not None:
            # Encode the pattern clips before the test (a run would lose its first seconds).
            BRIDGE.run(_encode_clips(options), timeout=600)
    if isinstance(runner, WorkerRunner):
        process = psutil.Process()
        process.cpu_percent(None)

        def report(client_id: str, data: dict[str, Any]) -> None:
            data["cascade"] = {
                **COLLECTOR.to_master(),
                "cpu": process.cpu_percent(None) / 100.0,
                "process": client_id,
            }

        events.report_to_master.add_listener(report)
    elif isinstance(runner, MasterRunner):

        def worker_report(client_id: str, data: dict[str, Any]) -> None:
            cascade = data.get("cascade")
            if cascade:
                COLLECTOR.merge(cascade)
                COLLECTOR.generator.add(str(cascade["process"]), time.time(), cascade["cpu"])

        events.worker_report.add_listener(worker_report)


_poller: list[gevent.Greenlet] = []


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kw: Any) -> None:
    options = environment.parsed_options
    if options is not None and not isinstance(environment.runner, MasterRunner):
        # Clips must exist before joins (encoding on the loop would stall every join);
        # they do unless the web UI changed the video options. Encoding runs on the loop
        # thread, so this process's greenlets (a worker's heartbeats) keep running.
        BRIDGE.run(_encode_clips(options), timeout=600)
    if isinstance(environment.runner, WorkerRunner):
        return
    COLLECTOR.started = time.time()
    if not _poller:
        _poller.append(gevent.spawn(_poll_servers, environment))


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kw: Any) -> None:
    for greenlet in _poller:
        greenlet.kill(block=False)
    if not isinstance(environment.runner, WorkerRunner):
        report = COLLECTOR.report()
        print("\nCascade load test report\n" + format_report(report), flush=True)
        path = environment.parsed_options.report_json if environment.parsed_options else ""
        if path:
            with open(path, "w") as f:
                json.dump(report, f, indent=1)
            print(f"report written to {path}", flush=True)
    BRIDGE.stop()


# -- the user ---------------------------------------------------------------------------


class CascadeParticipant(User):
    """One Cascade participant per locust user: join, publish and/or subscribe, stay
    (``--stay`` seconds, then leave and join again), report what it receives."""

    wait_time = constant(0)

    def on_start(self) -> None:
        runner = self.environment.runner
        worker = max(0, getattr(runner, "worker_index", 0))
        self.scenario = scenario_from(self.environment.parsed_options)
        self.slot = self.scenario.slot(next(_USER_INDEX), self.host or "", worker)
        self.participant: Participant | None = None
        self.session = ""

    def _fail(self, kind: str, name: str, started: float, exc: BaseException) -> None:
        if not isinstance(exc, CascadeError):
            exc = CascadeError(type(exc).__name__.lower(), str(exc) or repr(exc))
        _fire(self.environment, kind, name, (time.monotonic() - started) * 1000, exception=exc)

    @task
    def run_session(self) -> None:
        """One participant session, from join to leave."""
        participant = self.participant = Participant(self.scenario, self.slot)
        self.session = f"{os.getpid()}-{next(_SESSIONS)}"
        started = time.monotonic()
        try:
            seconds = BRIDGE.run(participant.join(), JOIN_TIMEOUT)
        except Exception as exc:
            self._fail("join", "join", started, exc)
            self._close()
            gevent.sleep(1.0)  # don't hammer a node that refuses
            return
        _fire(self.environment, "join", "join", seconds * 1000)
        if participant.redirects:  # placement sent this participant to another node
            _fire(self.environment, "redirect", "join", participant.redirects)
        if self.slot.publishes:
            started = time.monotonic()
            try:
                seconds = BRIDGE.run(participant.publish(), JOIN_TIMEOUT)
                _fire(self.environment, "publish", "publish", seconds * 1000)
            except Exception as exc:
                self._fail("publish", "publish", started, exc)
        end = time.monotonic() + self.scenario.stay if self.scenario.stay > 0 else math.inf
        next_stats = time.monotonic() + self.scenario.stats_interval
        seen: set[str] = set()
        while time.monotonic() < end:
            gevent.sleep(POLL_INTERVAL)
            due = time.monotonic() >= next_stats
            if due:
                next_stats += self.scenario.stats_interval
            self._report(participant, seen, due)
        self._close()

    def _report(self, participant: Participant, seen: set[str], windows_due: bool) -> None:
        async def look() -> tuple[Any, Any, Any, Any]:
            firsts = participant.take_first_frames(seen)
            refusals = participant.take_refusals()
            # Snapshots reach a locust master with each worker report (every 3 s): the
            # master's end report must not depend on the workers' last words.
            changed = windows_due or firsts or refusals
            return (
                firsts,
                refusals,
                participant.take_windows() if windows_due else [],
                participant.record() if changed else None,
            )

        firsts, refusals, windows, record = BRIDGE.run(look(), 30)
        env = self.environment
        for kind, seconds in firsts:
            _fire(env, "first_frame", kind, seconds * 1000)
            COLLECTOR.quality.first_frame_ms.append(seconds * 1000)
        for refusal in refusals:
            _fire(env, "refused", refusal.code, 0, exception=CascadeError(*vars(refusal).values()))
            if refusal.code == "overloaded":
                COLLECTOR.quality.refusals += 1
        for w in windows:
            COLLECTOR.quality.add_track_window(w)
            _fire(
                env, "track", f"{w.kind} fps", w.fps, length=max(0, round(w.kbps * 125 * w.seconds))
            )
            if w.kbps >= 0:
                _fire(env, "track", f"{w.kind} kbps", w.kbps)
            _fire(env, "track", f"{w.kind} loss %", w.loss * 100)
            for gap in w.freeze_ms:  # a freeze is a quality sample (its length), not an error
                _fire(env, "freeze", w.kind, gap)
            if w.decode_errors:
                exc = CascadeError("decode_error", f"{w.decode_errors} frame(s) failed to decode")
                _fire(env, "track", f"{w.kind} decode", 0, exception=exc)
        if record is not None:
            COLLECTOR.record(self.session, record)

    def _close(self) -> None:
        participant, self.participant = self.participant, None
        if participant is None:
            return
        try:
            record = BRIDGE.run(participant.close(), 20)
            COLLECTOR.record(self.session, record)
        except Exception as exc:
            log.warning("closing a participant failed: %r", exc)

    def on_stop(self) -> None:
        self._close()
