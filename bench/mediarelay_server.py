"""Baseline for bench/fanout.py: aiortc's own way to fan out, MediaRelay (decode once,
re-encode per subscriber). POST /publish and /subscribe take an SDP offer, return the answer."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay

from peer import aiortc_adapter as rtc


class RelayServer:
    def __init__(self) -> None:
        self.relay = MediaRelay()
        self.tracks: dict[str, MediaStreamTrack] = {}
        self.pcs: list[RTCPeerConnection] = []

    async def publish(self, request: web.Request) -> web.Response:
        body = await request.json()
        pc = RTCPeerConnection(rtc.rtc_configuration())
        self.pcs.append(pc)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.tracks[track.kind] = track

        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp})

    async def subscribe(self, request: web.Request) -> web.Response:
        body = await request.json()
        pc = RTCPeerConnection(rtc.rtc_configuration())
        self.pcs.append(pc)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
        for transceiver in pc.getTransceivers():
            source = self.tracks.get(transceiver.kind)
            if source is not None:
                transceiver.sender.replaceTrack(self.relay.subscribe(source))
                transceiver.direction = "sendonly"
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp})


async def main(host: str, port: int) -> None:
    rtc.set_ice_addresses([host])
    server = RelayServer()
    app = web.Application()
    app.router.add_post("/publish", server.publish)
    app.router.add_post("/subscribe", server.subscribe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    for pc in server.pcs:
        with contextlib.suppress(Exception):
            await pc.close()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18090)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
