"""Run by test_sdk.py in its own interpreter (warnings as errors): SDK clients publish,
subscribe and close, some mid-negotiation; anything asyncio or aiohttp would print about
unretrieved task exceptions, pending tasks or unclosed sessions makes this fail."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import warnings

from peer import aiortc_adapter as rtc
from peer.client import CascadeClient, mint_token
from peer.media import PatternVideoTrack, ToneAudioTrack

problems: list[str] = []


class Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        problems.append(record.getMessage())


async def round_trip(url: str, secret: str, i: int, early: bool) -> None:
    room = f"close-{i}"
    async with CascadeClient(url) as pub, CascadeClient(url) as sub:
        await sub.join(room, mint_token(room, "sub", secret=secret))
        await pub.join(room, mint_token(room, "pub", secret=secret))
        await pub.publish([PatternVideoTrack(160, 120), ToneAudioTrack()])
        if early:
            return  # close while the subscriber's offer is still being negotiated
        await sub.wait_for_tracks(1, "video")


async def main(url: str, secret: str, rounds: int) -> int:
    loop = asyncio.get_running_loop()
    loop.slow_callback_duration = 60.0  # -X dev: only real problems, not a busy machine
    loop.set_exception_handler(lambda _loop, ctx: problems.append(str(ctx.get("message"))))
    for i in range(rounds):
        await round_trip(url, secret, i, early=i % 2 == 1)
    gc.collect()
    await asyncio.sleep(0.2)
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    problems.extend(f"pending task {t!r}" for t in pending)
    return 0


if __name__ == "__main__":
    warnings.simplefilter("error")
    logging.getLogger("asyncio").addHandler(Collect())
    rtc.set_ice_addresses(["127.0.0.1"])
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    gc.collect()
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)
