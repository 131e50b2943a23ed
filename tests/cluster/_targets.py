"""Worker functions run by the cluster tests (each in a fresh interpreter)."""

from __future__ import annotations

import os
import sys
import time

import procwire.cluster as pc


def echo() -> None:
    """Report in, then answer every message: to the primary, or relay on request."""
    w = pc.worker()
    w.send({"hello": w.id, "pid": os.getpid()})
    for sender, data in w:
        if isinstance(data, dict) and "relay_to" in data:
            w.send_to(data["relay_to"], {"relayed": data["payload"], "via": w.id})
        elif isinstance(data, dict) and "broadcast" in data:
            w.broadcast({"from_worker": w.id, "payload": data["broadcast"]})
        elif isinstance(data, dict) and data.get("exit") is not None:
            sys.exit(data["exit"])
        else:
            w.send({"worker": w.id, "sender": sender, "got": data, "pid": os.getpid()})


def crash() -> None:
    """Come online, then fail at once: a crash loop."""
    pc.worker()
    sys.exit(3)


def slow_ready(delay: float) -> None:
    w = pc.worker()
    time.sleep(delay)
    w.ready()
    for _ in w:
        pass


def stubborn() -> None:
    """Ignores SIGTERM: only SIGKILL ends it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    w = pc.worker()
    w.send({"pid": os.getpid()})
    while True:
        time.sleep(0.05)


def once() -> None:
    """Says hello and exits 0."""
    w = pc.worker()
    w.send({"env": os.environ.get("PROCWIRE_WORKER_ID"), "id": w.id, "pid": os.getpid()})


def async_echo() -> None:
    """The asyncio worker API: hello, then echo with the sender, relay on request."""
    import asyncio

    import procwire.cluster.aio as pca

    async def main() -> None:
        w = await pca.worker()
        await w.send({"hello": w.id})
        async for sender, data in w:
            if isinstance(data, dict) and "relay_to" in data:
                await w.send_to(data["relay_to"], data["payload"])
            else:
                await w.send({"sender": sender, "got": data})
        await w.close()

    asyncio.run(main())
