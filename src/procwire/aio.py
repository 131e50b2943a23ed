"""The asyncio API: the same names as ``procwire``, as coroutines.

>>> import asyncio, procwire.aio as aio
>>> async def main():
...     a, b = await aio.pipe()
...     await a.send([1, 2])
...     print(await b.recv(timeout=5))
...     await a.close(); await b.close()
>>> asyncio.run(main())
[1, 2]
"""

from __future__ import annotations

from ._async.channel import AsyncChannel, AsyncListener, connect, listen, pipe
from .bus import AsyncBus
from .cluster.aio import Cluster, worker
from .process.aio import Child, IpcChannel, parent, spawn
from .queue import AsyncJob, AsyncQueue

Channel = AsyncChannel
Listener = AsyncListener
Queue = AsyncQueue
Job = AsyncJob
Bus = AsyncBus

__all__ = [
    "AsyncBus",
    "AsyncChannel",
    "AsyncJob",
    "AsyncListener",
    "AsyncQueue",
    "Bus",
    "Channel",
    "Child",
    "Cluster",
    "IpcChannel",
    "Job",
    "Listener",
    "Queue",
    "connect",
    "listen",
    "parent",
    "pipe",
    "spawn",
    "worker",
]
