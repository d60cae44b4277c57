"""A delaying hop in front of a node's QUIC relay, run inside a test's network namespace:
``python -m tests.deploy.delay_hop LISTEN_IP:PORT TARGET_PORT DELAY_SECONDS`` forwards
LISTEN to 127.0.0.1:TARGET_PORT of the same namespace, each direction delayed."""

from __future__ import annotations

import asyncio
import signal
import sys

from bench.impairment import Impairment, ImpairmentProxy


async def main(listen: str, target_port: int, delay: float) -> None:
    host, _, port = listen.rpartition(":")
    proxy = ImpairmentProxy(
        ("127.0.0.1", target_port), up=Impairment(delay=delay), down=Impairment(delay=delay)
    )
    await proxy.start(int(port), host=host)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("hop ready", flush=True)
    await stop.wait()
    proxy.close()
    print(f"forwarded {proxy.bytes_total} bytes", file=sys.stderr, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
