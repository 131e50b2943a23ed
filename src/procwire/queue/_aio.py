"""The asyncio twin: ``AsyncQueue`` / ``AsyncJob``, the same calls as coroutines.

The store calls are blocking (SQLite takes a file lock), so they run on a small thread pool
owned by the queue (at most ``threads`` at once; more calls wait their turn in the pool's
queue). Waiting for work does NOT hold a thread: the wake-up thread sets an asyncio event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .._errors import Timeout
from ..codecs import Codec
from ._errors import LeaseLost
from ._queue import (
    SAFETY_POLL,
    DeadLetter,
    Job,
    ProcessResult,
    Queue,
    QueueStats,
    _check_delay,
    _check_lease,
    _Renewer,
)

__all__ = ["AsyncJob", "AsyncQueue"]

T = TypeVar("T")


class AsyncJob:
    """A leased job (see ``procwire.queue.Job``); its methods are coroutines."""

    __slots__ = ("_aq", "job")

    def __init__(self, aq: AsyncQueue, job: Job) -> None:
        self._aq = aq
        self.job = job

    id = property(lambda self: self.job.id)
    data = property(lambda self: self.job.data)
    attempts = property(lambda self: self.job.attempts)
    enqueued_at = property(lambda self: self.job.enqueued_at)
    priority = property(lambda self: self.job.priority)
    key = property(lambda self: self.job.key)
    group = property(lambda self: self.job.group)
    lease_until = property(lambda self: self.job.lease_until)

    def __repr__(self) -> str:
        return f"<AsyncJob {self.job.id} attempts={self.job.attempts}>"

    async def ack(self, timeout: float | None = None) -> None:
        """Done: the job is deleted."""
        await self._aq._call(self.job.ack, timeout)

    async def nack(self, delay: float | None = None, *, error: str | None = None,
                   timeout: float | None = None) -> None:
        """Retry after ``delay`` (None: the backoff), or dead after the last attempt."""
        await self._aq._call(functools.partial(self.job.nack, delay, error=error,
                                               timeout=timeout))

    async def extend(self, seconds: float | None = None, timeout: float | None = None) -> None:
        """Hold the lease until ``seconds`` from now."""
        await self._aq._call(self.job.extend, seconds, timeout)

    async def fail(self, reason: str, timeout: float | None = None) -> None:
        """Straight to the dead letters."""
        await self._aq._call(self.job.fail, reason, timeout)

    async def release(self, timeout: float | None = None) -> None:
        """Give the job back without counting the attempt."""
        await self._aq._call(self.job.release, timeout)


class AsyncQueue:
    """``procwire.queue.Queue`` for asyncio: same arguments, same semantics.

    Example::

        q = AsyncQueue("emails", url=f"sqlite:///{tmp}/q.db")
        await q.put({"to": "a@example.com"})
        job = await q.get(timeout=5)
        await job.ack()
        await q.close()
    """

    def __init__(self, name: str, url: str | None = None, *, lease: float = 30.0,
                 max_attempts: int = 5, backoff: float | Callable[[int], float] = 1.0,
                 codec: str | Codec = "json", timeout: float = 30.0, threads: int = 4) -> None:
        self.sync = Queue(name, url, lease=lease, max_attempts=max_attempts, backoff=backoff,
                          codec=codec, timeout=timeout)
        self.name = name
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():
            with self._lock:
                if self._pool is None or self._pool_pid != os.getpid():
                    self._pool = ThreadPoolExecutor(self.threads,
                                                    thread_name_prefix="procwire-queue")
                    self._pool_pid = os.getpid()
        return self._pool

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(), fn, *args)

    async def put(self, data: Any, *, delay: float = 0, priority: int = 0,
                  key: str | None = None, group: str | None = None,
                  timeout: float | None = None) -> int:
        """See ``Queue.put``."""
        q = self.sync
        # Encode here, so a bad payload raises before anything is scheduled.
        from ._queue import Item

        item = q._encode(Item(data, delay, priority, key, group))
        ids = await self._call(q._backend.put_many, [item], q._t(timeout))
        return ids[0]

    async def put_many(self, items: Iterable[Any], *, timeout: float | None = None
                       ) -> list[int]:
        """See ``Queue.put_many`` (all or none)."""
        encoded = [self.sync._encode(it) for it in items]
        if not encoded:
            return []
        return await self._call(self.sync._backend.put_many, encoded, self.sync._t(timeout))

    async def get(self, timeout: float | None = None, lease: float | None = None
                  ) -> AsyncJob | None:
        """See ``Queue.get``: the next job, or None after ``timeout`` seconds."""
        jobs = await self._get(1, timeout, lease)
        return jobs[0] if jobs else None

    async def get_many(self, n: int, timeout: float | None = None,
                       lease: float | None = None) -> list[AsyncJob]:
        """See ``Queue.get_many``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("n must be an int >= 1")
        return await self._get(n, timeout, lease)

    async def _get(self, n: int, timeout: float | None, lease: float | None) -> list[AsyncJob]:
        q = self.sync
        lease_s = q.lease if lease is None else _check_lease(lease)
        if timeout is not None:
            _check_delay(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        backend = q._backend
        loop = asyncio.get_running_loop()
        while True:
            gen = backend.wake_generation() if timeout != 0 else 0
            remaining = None if deadline is None else deadline - time.monotonic()
            lock_timeout = q.timeout if remaining is None else max(remaining, 0.05)
            fut = loop.run_in_executor(self._executor(), q._claim_once, n, lease_s,
                                       lock_timeout)
            try:
                jobs, next_due, _ = await asyncio.shield(fut)
            except asyncio.CancelledError:
                # The claim may still commit in its thread: give back what it leased.
                fut.add_done_callback(self._release_later)
                raise
            except Timeout:
                if remaining is None:
                    raise
                return []
            if jobs:
                return [AsyncJob(self, j) for j in jobs]
            if next_due == 0.0:
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            wait = SAFETY_POLL if next_due is None else min(SAFETY_POLL, next_due + 0.001)
            if remaining is not None:
                wait = min(wait, remaining)
            await backend.await_wake(gen, wait)

    def _release_later(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        jobs: list[Job] = fut.result()[0]

        def release() -> None:
            for j in jobs:
                with contextlib.suppress(Exception):
                    j.release()

        with contextlib.suppress(RuntimeError):
            self._executor().submit(release)

    async def ack_many(self, jobs: Iterable[AsyncJob], timeout: float | None = None) -> None:
        """See ``Queue.ack_many``."""
        await self._call(self.sync.ack_many, [j.job for j in jobs], timeout)

    async def stats(self, timeout: float | None = None) -> QueueStats:
        """See ``Queue.stats``."""
        return await self._call(self.sync.stats, timeout)

    async def dead_letters(self, limit: int = 100, timeout: float | None = None
                           ) -> list[DeadLetter]:
        """See ``Queue.dead_letters``."""
        return await self._call(self.sync.dead_letters, limit, timeout)

    async def requeue_dead(self, ids: Iterable[int] | None = None,
                           timeout: float | None = None) -> int:
        """See ``Queue.requeue_dead``."""
        return await self._call(self.sync.requeue_dead, None if ids is None else list(ids),
                                timeout)

    async def purge(self, dead_only: bool = False, timeout: float | None = None) -> int:
        """See ``Queue.purge``."""
        return await self._call(self.sync.purge, dead_only, timeout)

    async def process(self, fn: Callable[[Any], Any], *, concurrency: int = 1,
                      lease: float | None = None, max_jobs: int | None = None,
                      idle_timeout: float | None = None, stop: asyncio.Event | None = None,
                      with_job: bool = False) -> ProcessResult:
        """See ``Queue.process``: ``fn`` may be a coroutine function (run on this loop) or a
        plain function (run on the queue's threads). Leases are renewed from a thread, so a
        coroutine that blocks the loop does not lose its job."""
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) \
                or concurrency < 1:
            raise ValueError("concurrency must be an int >= 1")
        lease_s = self.sync.lease if lease is None else _check_lease(lease)
        stop = stop or asyncio.Event()
        renewer = _Renewer(self.sync, lease_s)
        renewer.thread.start()
        result = ProcessResult()
        state = {"taken": 0}
        is_async = inspect.iscoroutinefunction(fn)

        loop = asyncio.get_running_loop()

        async def settle(fut: asyncio.Future[Any]) -> Any:
            # Wait for work on a thread to end, through cancellations (a thread cannot be
            # stopped); then its result, or its exception.
            while not fut.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([fut])
            return fut.result()

        async def run_fn(arg: Any, cancels: list[asyncio.CancelledError]) -> None:
            """Run fn. A cancellation that comes while a plain fn runs is put in ``cancels``
            and the call is let finish; a cancelled coroutine fn raises CancelledError."""
            if is_async:
                await fn(arg)
                return
            fut = loop.run_in_executor(self._executor(), fn, arg)
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError as exc:
                cancels.append(exc)
                await settle(fut)

        halt = asyncio.Event()  # one worker failed: the others finish their job and stop

        async def worker() -> None:
            idle_since = time.monotonic()
            while not stop.is_set() and not halt.is_set():
                if max_jobs is not None and state["taken"] >= max_jobs:
                    return
                state["taken"] += 1
                wait = 0.5
                if idle_timeout is not None:
                    wait = max(0.0, min(wait, idle_timeout - (time.monotonic() - idle_since)))
                job = await self.get(timeout=wait, lease=lease_s)
                if job is None:
                    state["taken"] -= 1
                    if idle_timeout is not None and time.monotonic() - idle_since >= \
                            idle_timeout:
                        return
                    continue
                idle_since = time.monotonic()
                renewer.add(job.job)
                cancels: list[asyncio.CancelledError] = []
                try:
                    await run_fn(job if with_job else job.data, cancels)
                except asyncio.CancelledError:
                    # A cancelled coroutine: give its job back now rather than hold it
                    # until the lease runs out (the attempt is not counted).
                    renewer.remove(job.job)
                    with contextlib.suppress(Exception):
                        await settle(loop.run_in_executor(self._executor(), job.job.release))
                    raise
                except Exception as exc:
                    renewer.remove(job.job)
                    err = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    nack = functools.partial(job.job.nack, error=err[:2000])
                    cancel = cancels[0] if cancels else None
                    try:
                        if cancel is None:
                            await self._call(nack)
                        else:
                            await settle(loop.run_in_executor(self._executor(), nack))
                        result.failed += 1
                    except LeaseLost:
                        result.lost += 1
                    if cancel is not None:
                        raise cancel from None
                    continue
                renewer.remove(job.job)
                cancel = cancels[0] if cancels else None
                try:
                    if cancel is None:
                        await job.ack()
                    else:  # the plain fn ended after a cancel: finish its job, then stop
                        await settle(loop.run_in_executor(self._executor(), job.job.ack))
                    result.acked += 1
                except LeaseLost:
                    result.lost += 1
                if cancel is not None:
                    raise cancel

        async def guarded() -> None:
            try:
                await worker()
            except BaseException:
                halt.set()
                raise

        tasks = [asyncio.ensure_future(guarded()) for _ in range(concurrency)]
        try:
            # Every worker ends before process() does: after a failure the others finish
            # their current job (as Queue.process's threads do); when process() itself is
            # cancelled they are cancelled too (a coroutine fn's job is released; a plain fn
            # on a thread cannot be stopped, so its call is awaited and its job finished).
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            for out in outcomes:
                if isinstance(out, BaseException):
                    raise out
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            renewer.stop.set()
            await asyncio.get_running_loop().run_in_executor(None, renewer.thread.join, 5)
        return result

    async def close(self) -> None:
        """Close the store and the thread pool."""
        pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
        self.sync.close()

    async def __aenter__(self) -> AsyncQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncQueue {self.name!r} url={self.sync.url!r}>"



