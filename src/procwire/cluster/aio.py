"""The asyncio twin of ``procwire.cluster``: ``Cluster`` and ``worker()`` as coroutines.

The primary is the blocking ``Cluster`` (its supervisor and readers are threads, which never
touch the event loop); each of its blocking calls runs in the loop's default executor.
A worker's side is native asyncio, on ``procwire.process.aio.parent()``.

>>> async def main():                                            # doctest: +SKIP
...     async with Cluster("myapp.worker:main", workers=4) as cluster:
...         await cluster.broadcast("hi"); print(await cluster.recv(timeout=5))
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from .._errors import ChannelClosed, ConnectionClosed, Timeout
from ..process import aio as process_aio
from . import _cluster, _wire
from ._errors import CrashLoop
from ._wire import KEY, Message
from ._worker import check_hello, decode, watch_parent, worker_env

__all__ = ["Cluster", "CrashLoop", "Message", "Worker", "worker"]


class Cluster:
    """asyncio face of ``procwire.cluster.Cluster`` (same arguments, same behaviour)."""

    def __init__(self, target: Any, *args: Any, **kwargs: Any) -> None:
        self.sync = _cluster.Cluster(target, *args, **kwargs)

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args,
                                                                                 **kwargs))

    async def start(self, *, timeout: float | None = 30.0) -> Cluster:
        """Start every worker and wait until each runs (see the blocking ``start``)."""
        await self._run(self.sync.start, timeout=timeout)
        return self

    async def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, grace period, SIGKILL; every worker reaped."""
        await self._run(self.sync.stop, timeout)

    async def wait(self, timeout: float | None = None) -> None:
        await self._run(self.sync.wait, timeout)

    async def reload(self, *, timeout: float = 30.0) -> None:
        await self._run(self.sync.reload, timeout=timeout)

    async def send(self, worker_id: int, msg: Any, *, timeout: float | None = None) -> None:
        await self._run(self.sync.send, worker_id, msg, timeout=timeout)

    async def broadcast(self, msg: Any, *, timeout: float | None = None) -> None:
        await self._run(self.sync.broadcast, msg, timeout=timeout)

    async def recv(self, timeout: float | None = None) -> Message:
        """The next worker message. Cancelling the caller loses nothing: a message taken
        meanwhile goes back to the front of the inbox."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self.sync.recv, timeout)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(self._put_back)
            raise

    def _put_back(self, fut: asyncio.Future[Message] | Future[Message]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        inbox = self.sync._inbox
        with inbox.cond:
            inbox.items.appendleft(fut.result())
            inbox.cond.notify_all()

    async def messages(self, timeout: float | None = None) -> AsyncIterator[Message]:
        """Worker messages until none comes within ``timeout`` (or the cluster stops)."""
        while True:
            try:
                yield await self.recv(timeout)
            except (Timeout, ChannelClosed):
                return

    def __aiter__(self) -> AsyncIterator[Message]:
        return self.messages()

    def on_message(self, callback: Callable[[Message], Any]) -> Callable[[Message], Any]:
        """See the blocking ``on_message`` (called from a reader thread, not the loop)."""
        return self.sync.on_message(callback)

    @property
    def workers(self) -> list[_cluster.WorkerInfo]:
        return self.sync.workers

    @property
    def address(self) -> tuple[str, int] | None:
        return self.sync.address

    @property
    def pids(self) -> list[int]:
        return self.sync.pids

    def stats(self) -> dict[str, int]:
        return self.sync.stats()

    async def __aenter__(self) -> Cluster:
        if not self.sync._started:
            await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


class Worker:
    """asyncio face of a cluster worker (see ``procwire.cluster.Worker``)."""

    def __init__(self, channel: process_aio.IpcChannel, worker_id: int, workers: int,
                 listener: socket.socket | None) -> None:
        self.channel = channel
        self.id = worker_id
        self.workers = workers
        self.listener = listener

    async def send(self, msg: Any, *, timeout: float | None = None) -> None:
        await self.channel.send({KEY: _wire.MSG, "data": msg}, timeout=timeout)

    async def send_to(self, worker_id: int, msg: Any, *, timeout: float | None = None) -> None:
        _wire.check_worker_id(worker_id, self.workers)
        await self.channel.send({KEY: _wire.TO, "to": worker_id, "data": msg}, timeout=timeout)

    async def broadcast(self, msg: Any, *, timeout: float | None = None) -> None:
        await self.channel.send({KEY: _wire.ALL, "data": msg}, timeout=timeout)

    async def ready(self, *, timeout: float | None = None) -> None:
        await self.channel.send({KEY: _wire.READY}, timeout=timeout)

    async def recv(self, timeout: float | None = None) -> Message:
        while True:
            msg = decode(await self.channel.recv(timeout))
            if msg is not None:
                return msg

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except (ConnectionClosed, ChannelClosed):
                return

    async def close(self, timeout: float | None = 10.0) -> None:
        """Flush what was sent and close the channel (do it before the event loop ends)."""
        await self.channel.close(timeout)


_worker: Worker | None = None
_worker_pid = 0


async def worker(*, timeout: float = 10.0) -> Worker:
    """This process's place in its cluster, for asyncio (see ``procwire.cluster.worker``)."""
    global _worker, _worker_pid
    if _worker is not None and _worker_pid == os.getpid():
        return _worker
    raw = worker_env()
    ch = await process_aio.parent()
    obj, handle = await ch.recv_with_handle(timeout)
    worker_id, workers = check_hello(obj, handle, raw)
    w = Worker(ch, worker_id, workers, handle)
    await ch.send({KEY: _wire.ONLINE})
    watch_parent()
    _worker, _worker_pid = w, os.getpid()
    return w
