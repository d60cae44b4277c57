"""SDK clients of the multi-host test, run in the clients' namespace: one publishes on the
first host, one subscriber per host decodes it; a token of another key is refused.
Prints one JSON line with what each subscriber received."""

from __future__ import annotations

import asyncio
import json
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer import aiortc_adapter as rtc
from peer.client import CascadeClient, CascadeError, mint_token
from peer.media import PatternVideoTrack, ToneAudioTrack
from peer.tokens import issue_token

ROOM = "world"


async def subscribe(url: str, key_file: str, index: int) -> dict[str, object]:
    async with CascadeClient(url) as client:
        await client.join(ROOM, mint_token(ROOM, f"viewer-{index}", key_file=key_file))
        video = await client.wait_for_tracks(1, "video", timeout=90)
        audio = await client.wait_for_tracks(1, "audio", timeout=30)
        await asyncio.sleep(1.0)
        return {
            "url": url,
            "producers": sorted(t.producer_id for t in video + audio),
            "video": video[0].stats(),
            "audio": audio[0].stats(),
        }


async def refused(url: str) -> str:
    async with CascadeClient(url) as client:
        try:
            await client.join(ROOM, issue_token(Ed25519PrivateKey.generate(), ROOM, "mallory"))
        except CascadeError as exc:
            return exc.code
    return "accepted"


async def main(spec: dict[str, object]) -> None:
    rtc.set_ice_addresses([str(spec["ice"])])
    key_file = str(spec["key"])
    subscribers = [str(u) for u in spec["subscribers"]]  # type: ignore[attr-defined]
    async with CascadeClient(str(spec["publisher"])) as pub:
        await pub.join(ROOM, mint_token(ROOM, "speaker", key_file=key_file))
        published = await pub.publish([PatternVideoTrack(320, 240), ToneAudioTrack()])
        results = await asyncio.gather(
            *(subscribe(url, key_file, i) for i, url in enumerate(subscribers))
        )
        codes = await asyncio.gather(*(refused(url) for url in subscribers))
    print(
        json.dumps(
            {
                "published": sorted(p["producer_id"] for p in published),
                "subscribers": results,
                "foreign_key": codes,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
