"""AsyncQueue.process: no worker outlives the call (both backends)."""

from __future__ import annotations

import asyncio

import pytest

from procwire.queue import AsyncQueue


class Boom(BaseException):
    """Not an Exception: fn raising it is not a job failure but the worker's end."""


def test_failed_worker_stops_the_others(queue_url: str) -> None:
    async def main() -> None:
        async with AsyncQueue("aio-stop", queue_url, backoff=0) as q:
            for i in range(40):
                await q.put(i)
            seen: list[int] = []

            async def fn(n: int) -> None:
                if not seen:
                    seen.append(n)
                    await asyncio.sleep(0.05)  # the other workers are busy too by now
                    raise Boom()
                seen.append(n)
                await asyncio.sleep(0.1)

            with pytest.raises(Boom):
                await q.process(fn, concurrency=3, idle_timeout=5)
            after = len(seen)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert others == []  # no worker left running
            await asyncio.sleep(0.5)
            assert len(seen) == after  # and nobody takes jobs any more
            assert after < 10

    asyncio.run(main())


def test_cancelled_process_cancels_its_workers(queue_url: str) -> None:
    async def main() -> None:
        async with AsyncQueue("aio-cancel", queue_url, backoff=0, lease=1) as q:
            for i in range(20):
                await q.put(i)
            started = asyncio.Event()
            seen: list[int] = []

            async def fn(n: int) -> None:
                seen.append(n)
                started.set()
                await asyncio.sleep(0.2)

            task = asyncio.ensure_future(q.process(fn, concurrency=2))
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert others == []
            after = len(seen)
            await asyncio.sleep(0.5)
            assert len(seen) == after
            # The cut-off jobs come back when their lease runs out: nothing is lost.
            got = set()
            for _ in range(40):
                job = await q.get(timeout=3)
                if job is None:
                    break
                got.add(job.data)
                await job.ack()
            assert got | set(seen) == set(range(20))  # done before the cancel, or now

    asyncio.run(main())


def test_cancelled_process_waits_for_a_plain_fn_and_releases_a_coroutine_job(
        queue_url: str) -> None:
    """A plain fn runs on a thread, which cannot be interrupted: a cancelled process() waits
    for the call to end and acks its job (nothing of it runs after process() raises, and the
    job is not done twice). A cancelled coroutine fn's job is given back at once (not held
    until its lease runs out, and without counting the attempt)."""
    import threading

    async def main() -> None:
        async with AsyncQueue("aio-cancel-sync", queue_url, lease=60) as q:
            await q.put("slow")
            entered = threading.Event()
            ended: list[str] = []

            def slow(data: str) -> None:
                entered.set()
                threading.Event().wait(0.5)
                ended.append(data)

            task = asyncio.ensure_future(q.process(slow))
            assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert ended == ["slow"]  # it had ended when process() raised
            stats = await q.stats()
            assert (stats.acked, stats.leased, stats.ready) == (1, 0, 0)

            await q.put("cut")
            started = asyncio.Event()

            async def stuck(data: str) -> None:
                started.set()
                await asyncio.sleep(30)

            task = asyncio.ensure_future(q.process(stuck))
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            job = await q.get(timeout=0)  # back now, not after the 60 s lease
            assert job is not None and job.data == "cut" and job.attempts == 1
            await job.ack()

    asyncio.run(main())


def test_cancelled_process_nacks_a_plain_fn_that_fails_after_the_cancel(
        queue_url: str) -> None:
    import threading

    async def main() -> None:
        async with AsyncQueue("aio-cancel-fail", queue_url, lease=60, backoff=0) as q:
            await q.put_many(["bad", "next"])
            entered = threading.Event()
            calls: list[str] = []

            def bad(data: str) -> None:
                calls.append(data)
                entered.set()
                threading.Event().wait(0.3)
                raise ValueError("no good")

            task = asyncio.ensure_future(q.process(bad))
            assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.3)
            assert calls == ["bad"]  # it stopped: "next" was not taken
            stats = await q.stats()
            assert (stats.retried, stats.leased, stats.ready) == (1, 0, 2)

    asyncio.run(main())
