"""Janus (Debian package, VideoRoom plugin) as the independent SFU baseline for bench/fanout.py:
its configuration, process and a minimal HTTP API client driving aiortc peers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

from peer import aiortc_adapter as rtc

JANUS_BIN = "/usr/bin/janus"
LIB = "/usr/lib/x86_64-linux-gnu/janus"


def janus_available() -> bool:
    """Whether the Debian janus package is installed."""
    return Path(JANUS_BIN).exists() and Path(LIB, "plugins", "libjanus_videoroom.so").exists()


def write_config(
    folder: Path, http_port: int, ip: str, event_loops: int = 1, debug_level: int = 2
) -> None:
    """A Janus config: HTTP API and ICE on ``ip`` only, VideoRoom only, `event_loops` loops."""
    folder.mkdir(parents=True, exist_ok=True)
    plugins = [p.name for p in Path(LIB, "plugins").glob("*.so") if "videoroom" not in p.name]
    transports = [p.name for p in Path(LIB, "transports").glob("*.so") if "http" not in p.name]
    events = [p.name for p in Path(LIB, "events").glob("*.so")]
    loggers = (
        [p.name for p in Path(LIB, "loggers").glob("*.so")] if Path(LIB, "loggers").exists() else []
    )
    (folder / "janus.jcfg").write_text(
        f"""general: {{
    configs_folder = "{folder}"
    plugins_folder = "{LIB}/plugins"
    transports_folder = "{LIB}/transports"
    events_folder = "{LIB}/events"
    loggers_folder = "{LIB}/loggers"
    debug_level = {debug_level}
    event_loops = {event_loops}
}}
media: {{
    rtp_port_range = "40000-49999"
}}
nat: {{
    nice_debug = false
    ice_enforce_list = "{ip}"
}}
plugins: {{ disable = "{",".join(plugins)}" }}
transports: {{ disable = "{",".join(transports)}" }}
events: {{ disable = "{",".join(events)}" }}
loggers: {{ disable = "{",".join(loggers)}" }}
"""
    )
    (folder / "janus.transport.http.jcfg").write_text(
        f"""general: {{
    json = "plain"
    base_path = "/janus"
    http = true
    port = {http_port}
    ip = "{ip}"
    https = false
}}
admin: {{ admin_http = false }}
"""
    )
    (folder / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n")


def start_janus(folder: Path, cpu: int | None, prefix: list[str]) -> subprocess.Popen[bytes]:
    """Start Janus with the config in ``folder``, pinned to ``cpu``."""
    cmd = [
        JANUS_BIN,
        "-F",
        str(folder),
        "-C",
        str(folder / "janus.jcfg"),
        "-L",
        os.environ.get("CASCADE_JANUS_LOG", "/dev/null"),
    ]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    cmd = [*prefix, *cmd]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=os.setpgrp
    )


class JanusSession:
    """A Janus API session with one VideoRoom handle, over the HTTP transport."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base
        self.session_id: int | None = None
        self.handle_id: int | None = None
        self._tx = itertools.count(1)
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._poller: asyncio.Task[None] | None = None

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "transaction": f"t{next(self._tx)}{random.random()}"}
        async with self.http.post(url, json=body) as resp:
            reply: dict[str, Any] = await resp.json(content_type=None)
        if reply.get("janus") == "error":
            raise RuntimeError(f"janus error: {reply}")
        return reply

    async def open(self) -> None:
        """Create the session, attach VideoRoom, start long-polling events."""
        reply = await self._post(self.base, {"janus": "create"})
        self.session_id = reply["data"]["id"]
        reply = await self._post(
            f"{self.base}/{self.session_id}",
            {"janus": "attach", "plugin": "janus.plugin.videoroom"},
        )
        self.handle_id = reply["data"]["id"]
        self._poller = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                async with self.http.get(
                    f"{self.base}/{self.session_id}?maxev=10",
                    timeout=aiohttp.ClientTimeout(total=40),
                ) as resp:
                    data = await resp.json(content_type=None)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.1)
                continue
            for event in data if isinstance(data, list) else [data]:
                if event.get("janus") == "event":
                    self._events.put_nowait(event)

    async def message(
        self, body: dict[str, Any], jsep: dict[str, Any] | None = None, wait_event: bool = True
    ) -> dict[str, Any]:
        """Send a plugin message; return the synchronous reply or the async event."""
        payload: dict[str, Any] = {"janus": "message", "body": body}
        if jsep is not None:
            payload["jsep"] = jsep
        reply = await self._post(f"{self.base}/{self.session_id}/{self.handle_id}", payload)
        if reply.get("janus") == "success" or not wait_event:
            return reply
        return await asyncio.wait_for(self._events.get(), 20)

    async def close(self) -> None:
        """Destroy the session."""
        if self._poller is not None:
            self._poller.cancel()
        if self.session_id is not None:
            with contextlib.suppress(Exception):
                await self._post(f"{self.base}/{self.session_id}", {"janus": "destroy"})


async def create_room(
    http: aiohttp.ClientSession, base: str, room: int, publishers: int = 1
) -> None:
    """Create a VideoRoom room for ``publishers`` VP8+Opus publishers, no bitrate cap."""
    s = JanusSession(http, base)
    await s.open()
    await s.message(
        {
            "request": "create",
            "room": room,
            "publishers": publishers,
            "bitrate": 0,
            "videocodec": "vp8",
            "audiocodec": "opus",
            "fir_freq": 0,
            "notify_joining": False,
        }
    )
    await s.close()


class JanusPublisher:
    """An aiortc publisher in a Janus VideoRoom."""

    def __init__(self, http: aiohttp.ClientSession, base: str, room: int) -> None:
        self.session = JanusSession(http, base)
        self.room = room
        self.pc = RTCPeerConnection(rtc.rtc_configuration())
        self.feed_id: int | None = None

    async def publish(self, tracks: list[MediaStreamTrack]) -> None:
        """Join as publisher and send the tracks."""
        await self.session.open()
        event = await self.session.message(
            {"request": "join", "ptype": "publisher", "room": self.room}
        )
        self.feed_id = event["plugindata"]["data"]["id"]
        for track in tracks:
            t = self.pc.addTransceiver(track, direction="sendonly")
            request_keyframe = getattr(track, "request_keyframe", None)
            if request_keyframe is not None:
                rtc.hook_keyframe_requests(t.sender, request_keyframe)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        event = await self.session.message(
            {"request": "publish", "audio": True, "video": True},
            {"type": "offer", "sdp": self.pc.localDescription.sdp},
        )
        if "jsep" not in event:
            raise RuntimeError(f"janus did not answer the publish offer: {event}")
        jsep = event["jsep"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=jsep["sdp"], type="answer"))

    async def close(self) -> None:
        """Leave and close the peer connection."""
        await self.pc.close()
        await self.session.close()


class JanusSubscriber:
    """A receive-only aiortc subscriber of Janus feeds (one peer connection for all of
    them): counts packets, or decodes."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base: str,
        room: int,
        feed: int | list[int],
        count_only: bool = True,
    ) -> None:
        self.session = JanusSession(http, base)
        self.room = room
        self.feeds = feed if isinstance(feed, list) else [feed]
        self.pc = RTCPeerConnection(rtc.rtc_configuration())
        self.counter = rtc.RtpCounter() if count_only else None

    async def start(self) -> None:
        """Subscribe: Janus offers, we answer and start."""
        await self.session.open()
        event = await self.session.message(
            {
                "request": "join",
                "ptype": "subscriber",
                "room": self.room,
                "streams": [{"feed": feed} for feed in self.feeds],
            }
        )
        jsep = event["jsep"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=jsep["sdp"], type="offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        if self.counter is not None:
            self.counter.install(self.pc)
        await self.session.message(
            {"request": "start", "room": self.room},
            {"type": "answer", "sdp": self.pc.localDescription.sdp},
            wait_event=False,
        )

    async def close(self) -> None:
        """Close the peer connection and the session."""
        await self.pc.close()
        await self.session.close()
