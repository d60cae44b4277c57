"""The dashboard's I/O: lists live nodes from the directory, polls each node's ``/stats``
with the monitoring token, feeds :class:`~monitor.overview.OverlayView` and serves the page,
its JSON API and a Server-Sent Events stream of snapshots.

Used twice: by ``cascade monitor`` (its own DHT node, an observer that publishes nothing) and
by every node at ``/dashboard`` (the node's own directory, started on the first visit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from monitor.overview import OverlayView
from monitor.probe import short_id

if TYPE_CHECKING:
    from dht import Directory
    from monitor.node import NodeMonitor

log = logging.getLogger("cascade.monitor.observer")
STATIC = Path(__file__).parent / "static"
MAX_STATS_BYTES = 32 * 1024 * 1024

NodeLister = Callable[[], Awaitable[list[dict[str, Any]]]]


def directory_lister(directory: Directory) -> NodeLister:
    """Lists live nodes from a :class:`dht.Directory`."""

    async def nodes() -> list[dict[str, Any]]:
        return [
            {
                "node_id": short_id(r.node_id),
                "region": r.region,
                "url": r.signaling_url,
                "headroom": r.load.headroom if r.load is not None else None,
                "draining": bool(getattr(r, "draining", False)),
            }
            for r in await directory.nodes()
        ]

    return nodes


class Observer:
    """Polls the overlay every ``interval`` seconds and pushes snapshots to listeners."""

    def __init__(
        self,
        list_nodes: NodeLister,
        *,
        token: str | None = None,
        interval: float = 1.0,
        poll_timeout: float = 2.5,
        overlay_interval: float = 5.0,
    ) -> None:
        self.list_nodes = list_nodes
        self.token = token
        self.interval = interval
        self.poll_timeout = poll_timeout
        self.overlay_interval = overlay_interval
        self.view = OverlayView()
        self.listeners: set[asyncio.Queue[str | None]] = set()
        self._polls: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._overlay_due = 0.0
        self.last_snapshot: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.poll_timeout),
            headers={"Authorization": f"Bearer {self.token}"} if self.token else None,
        )
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._polls.values()):
            task.cancel()
        if self._polls:
            await asyncio.gather(*self._polls.values(), return_exceptions=True)
        self._polls.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("observer tick failed")
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    async def tick(self) -> None:
        """One round: list nodes, poll them (a slow node does not hold up the others)."""
        try:
            records = await asyncio.wait_for(self.list_nodes(), self.interval * 3)
            self.view.observe_directory(time.time(), records)
        except (Exception, TimeoutError) as exc:
            self.view.directory_error = repr(exc)
            log.info("directory listing failed: %r", exc)
        for node_id, view in self.view.nodes.items():
            if view.missing_since is not None or not view.url:
                continue
            task = self._polls.get(node_id)
            if task is None or task.done():
                first = view.stats is None and view.polled_at == 0
                self._polls[node_id] = asyncio.ensure_future(
                    self._poll(node_id, view.url, backfill=first)
                )
        # wait for answers up to half an interval, then publish what is known
        pending = [t for t in self._polls.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.interval / 2)
        for node_id in [n for n, t in self._polls.items() if t.done()]:
            if node_id not in self.view.nodes:
                del self._polls[node_id]
        now = time.time()
        if now >= self._overlay_due:
            self._overlay_due = now + self.overlay_interval
            await self._poll_overlay()
        self.publish(now)

    async def _get_json(self, url: str) -> Any:
        assert self._session is not None
        async with self._session.get(url) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            body = await resp.content.read(MAX_STATS_BYTES + 1)
            if len(body) > MAX_STATS_BYTES:
                raise RuntimeError("answer too large")
            return json.loads(body)

    async def _poll(self, node_id: str, url: str, *, backfill: bool) -> None:
        base = url.rstrip("/")
        try:
            if backfill:
                with contextlib.suppress(Exception):
                    self.view.backfill(node_id, await self._get_json(f"{base}/stats/history"))
            raw = await self._get_json(f"{base}/stats")
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self.view.observe_poll(node_id, time.time(), None, "no answer (timeout)")
        except Exception as exc:
            self.view.observe_poll(node_id, time.time(), None, _describe(exc))
        else:
            self.view.observe_poll(node_id, time.time(), raw)

    async def _poll_overlay(self) -> None:
        """Region scale signals from ``GET /overlay`` of one reachable node, if it serves it."""
        for view in self.view.nodes.values():
            if view.status() in ("up", "draining"):
                try:
                    raw = await self._get_json(view.url.rstrip("/") + "/overlay")
                except Exception:
                    return
                self.view.observe_overlay(raw)
                return

    def publish(self, now: float) -> None:
        """Send the current snapshot to every SSE listener."""
        self.last_snapshot = self.view.snapshot(now)
        data = json.dumps(self.last_snapshot, separators=(",", ":"))
        for queue in list(self.listeners):
            if queue.qsize() > 5:  # a stalled browser: drop its backlog
                while not queue.empty():
                    queue.get_nowait()
            queue.put_nowait(data)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return "bad answer: not JSON"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection refused"
    text = str(exc) or type(exc).__name__
    return text[:200]


class DashboardApp:
    """The dashboard's HTTP routes around an :class:`Observer` (started on first use)."""

    def __init__(self, make_observer: Callable[[], Observer]) -> None:
        self._make_observer = make_observer
        self.observer: Observer | None = None
        self._streams: set[asyncio.Queue[str | None]] = set()

    async def ensure_started(self) -> Observer:
        if self.observer is None:
            self.observer = self._make_observer()
        await self.observer.start()
        return self.observer

    async def stop(self) -> None:
        self.close_streams()
        if self.observer is not None:
            await self.observer.stop()

    def close_streams(self) -> None:
        """End every open event stream (the server is shutting down)."""
        for queue in list(self._streams):
            queue.put_nowait(None)

    async def _on_shutdown(self, app: web.Application) -> None:
        self.close_streams()

    def mount(self, app: web.Application, prefix: str) -> None:
        """Add the routes under ``prefix`` ("" for the root)."""
        if prefix:
            app.router.add_get(prefix, self.redirect)
        app.router.add_get(prefix + "/", self.index)
        app.router.add_get(prefix + "/api/snapshot", self.snapshot)
        app.router.add_get(prefix + "/api/events", self.events)
        app.router.add_get(prefix + "/api/history", self.history)
        app.router.add_get(prefix + "/api/streams", self.streams)
        app.router.add_static(prefix + "/static", STATIC)
        app.on_shutdown.append(self._on_shutdown)

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        query = f"?{request.query_string}" if request.query_string else ""
        raise web.HTTPFound(request.path + "/" + query)

    async def index(self, request: web.Request) -> web.StreamResponse:
        await self.ensure_started()
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def snapshot(self, request: web.Request) -> web.Response:
        observer = await self.ensure_started()
        snap = observer.last_snapshot or observer.view.snapshot(time.time())
        return web.json_response(snap)

    async def history(self, request: web.Request) -> web.Response:
        observer = await self.ensure_started()
        series = observer.view.history(request.query.get("node", ""))
        if series is None:
            return web.json_response({"error": "unknown_node"}, status=404)
        return web.json_response(series)

    async def streams(self, request: web.Request) -> web.Response:
        observer = await self.ensure_started()
        q = request.query
        try:
            offset = int(q.get("offset", "0"))
            limit = int(q.get("limit", "50"))
        except ValueError:
            return web.json_response({"error": "bad_request"}, status=400)
        page = observer.view.streams(
            room=q.get("room") or None,
            node=q.get("node") or None,
            kind=q.get("kind") or None,
            direction=q.get("direction") or None,
            search=q.get("q") or None,
            sort=q.get("sort", "bitrate"),
            descending=q.get("order", "desc") != "asc",
            offset=offset,
            limit=limit,
        )
        return web.json_response(page)

    async def events(self, request: web.Request) -> web.StreamResponse:
        observer = await self.ensure_started()
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        observer.listeners.add(queue)
        self._streams.add(queue)
        try:
            if observer.last_snapshot is not None:
                queue.put_nowait(json.dumps(observer.last_snapshot, separators=(",", ":")))
            while True:
                try:
                    data = await asyncio.wait_for(queue.get(), 15.0)
                    if data is None:
                        break
                    await resp.write(f"event: snapshot\ndata: {data}\n\n".encode())
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            observer.listeners.discard(queue)
            self._streams.discard(queue)
        return resp


def mount_dashboard(app: web.Application, prefix: str, monitor: NodeMonitor) -> None:
    """Serve the dashboard on a node: it observes through the node's own directory (or
    only the node itself when it runs without the overlay)."""

    def make() -> Observer:
        directory = monitor.directory
        if directory is not None:
            lister = directory_lister(directory)
        else:

            async def lister() -> list[dict[str, Any]]:
                return [
                    {
                        "node_id": monitor.node_id,
                        "region": monitor.region,
                        "url": monitor.server.url,
                    }
                ]

        return Observer(lister, token=monitor.rule.token)

    dashboard = DashboardApp(make)
    monitor.dashboard = dashboard
    dashboard.mount(app, prefix)
