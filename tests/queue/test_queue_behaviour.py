"""The behaviour suite every queue backend passes (parametrized over ``BACKENDS``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import procwire
from procwire.queue import AsyncQueue, Item, LeaseLost, Queue

MakeQueue = Callable[..., Queue]


def drain(q: Queue) -> list[Any]:
    out = []
    for _ in range(1000):
        job = q.get(timeout=0)
        if job is None:
            return out
        out.append(job.data)
        job.ack()
    raise AssertionError("queue did not drain")


def test_fifo(make_queue: MakeQueue) -> None:
    q = make_queue()
    ids = [q.put({"n": i}) for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert drain(q) == [{"n": i} for i in range(5)]


def test_priority_then_fifo(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.put("low")
    q.put("high-1", priority=5)
    q.put("mid", priority=1)
    q.put("high-2", priority=5)
    q.put("negative", priority=-3)
    assert drain(q) == ["high-1", "high-2", "mid", "low", "negative"]


def test_delay(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.put("later", delay=0.5)
    q.put("now")
    assert drain(q) == ["now"]
    s = q.stats()
    assert (s.ready, s.delayed) == (0, 1)
    t0 = time.monotonic()
    job = q.get(timeout=5)
    assert job is not None and job.data == "later"
    assert time.monotonic() - t0 >= 0.3  # it waited for its time (a lower bound, not speed)
    job.ack()


def test_dedup_key_until_acked(make_queue: MakeQueue) -> None:
    q = make_queue()
    a = q.put({"v": 1}, key="order-7")
    assert q.put({"v": 2}, key="order-7") == a
    assert q.put_many([Item("x", key="order-7"), Item("y", key="other")])[0] == a
    assert q.stats().ready == 2
    job = q.get(timeout=0)
    assert job is not None and job.data == {"v": 1} and job.key == "order-7"
    assert q.put({"v": 3}, key="order-7") == a  # leased, not acked: still held
    job.ack()
    b = q.put({"v": 4}, key="order-7")
    assert b != a
    assert sorted(map(str, drain(q))) == ["y", "{'v': 4}"]


def test_group_one_at_a_time_in_order(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.put("a1", group="a")
    q.put("a2", group="a")
    q.put("b1", group="b")
    q.put("free")
    j1 = q.get(timeout=0)
    j2 = q.get(timeout=0)
    j3 = q.get(timeout=0)
    assert j1 and j2 and j3
    assert [j1.data, j2.data, j3.data] == ["a1", "b1", "free"]
    assert q.get(timeout=0) is None  # a2 waits for a1
    j1.nack(delay=0.5)  # a retried job keeps its place at the head of its group
    assert q.get(timeout=0) is None
    again = q.get(timeout=5)
    assert again is not None and again.data == "a1" and again.attempts == 2
    again.ack()
    nxt = q.get(timeout=5)
    assert nxt is not None and nxt.data == "a2"
    for j in (nxt, j2, j3):
        j.ack()


def test_get_many_one_per_group(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.put_many([Item(i, group="g") for i in range(5)] + [Item("x"), Item("y")])
    jobs = q.get_many(10, timeout=0)
    assert [j.data for j in jobs] == [0, "x", "y"]
    q.ack_many(jobs)
    assert drain(q) == [1, 2, 3, 4]


def test_lease_expiry_redelivers_and_refuses_stale_ack(make_queue: MakeQueue) -> None:
    q = make_queue(lease=0.5)
    q.put("work")
    first = q.get(timeout=0)
    assert first is not None and first.attempts == 1
    assert q.get(timeout=0) is None  # invisible while leased
    second = q.get(timeout=5)  # comes back when the lease ends
    assert second is not None and second.id == first.id and second.attempts == 2
    for call in (first.ack, first.nack, first.extend, lambda: first.fail("x")):
        with pytest.raises(LeaseLost) as info:
            call()
        assert info.value.ids == [first.id]
    assert q.stats().leased == 1  # the stale calls changed nothing
    second.ack()
    assert q.stats().total == 0
    assert q.stats().expired == 1


def test_late_ack_accepted_while_nobody_else_holds_it(make_queue: MakeQueue) -> None:
    q = make_queue(lease=0.1)
    q.put("slow")
    job = q.get(timeout=0)
    assert job is not None
    time.sleep(0.2)
    job.ack()  # expired, but not granted to anyone since: the work is done, accept it
    assert q.stats().total == 0


def test_extend_keeps_the_job(make_queue: MakeQueue) -> None:
    q = make_queue(lease=0.2)
    q.put("long")
    job = q.get(timeout=0)
    assert job is not None
    job.extend(5)
    time.sleep(0.3)
    assert q.get(timeout=0) is None
    job.ack()


def test_max_attempts_dead_letters_and_requeue(make_queue: MakeQueue) -> None:
    q = make_queue(max_attempts=2)
    q.put({"n": 1})
    for _ in range(2):
        job = q.get(timeout=5)
        assert job is not None
        job.nack(error="boom")
    assert q.get(timeout=0) is None
    s = q.stats()
    assert (s.dead, s.failed, s.retried) == (1, 1, 1)
    [dead] = q.dead_letters()
    assert dead.data == {"n": 1} and dead.error == "boom" and dead.attempts == 2
    assert q.requeue_dead() == 1
    job = q.get(timeout=0)
    assert job is not None and job.attempts == 1 and job.data == {"n": 1}
    job.ack()


def test_lease_expiry_on_last_attempt_goes_dead(make_queue: MakeQueue) -> None:
    q = make_queue(max_attempts=1, lease=0.1)
    q.put("x")
    assert q.get(timeout=0) is not None
    time.sleep(0.2)
    assert q.get(timeout=0) is None
    [dead] = q.dead_letters()
    assert "lease expired" in (dead.error or "")


def test_fail_and_release(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.put("bad")
    q.put("later")
    job = q.get(timeout=0)
    assert job is not None
    job.fail("invalid input")
    assert q.dead_letters()[0].error == "invalid input"
    job2 = q.get(timeout=0)
    assert job2 is not None and job2.attempts == 1
    job2.release()
    job3 = q.get(timeout=0)
    assert job3 is not None and job3.id == job2.id and job3.attempts == 1
    with pytest.raises(LeaseLost):
        job2.ack()
    job3.ack()
    assert q.requeue_dead([12345]) == 0
    assert q.purge(dead_only=True) == 1
    assert q.stats().total == 0


def test_put_many_get_many_atomic(make_queue: MakeQueue) -> None:
    q = make_queue()
    ids = q.put_many(range(10))
    assert len(ids) == 10 and ids == sorted(ids)
    with pytest.raises(procwire.EncodeError):
        q.put_many([1, 2, object(), 4])
    with pytest.raises(ValueError):
        q.put_many([Item(1), Item(2, priority="high")])  # type: ignore[arg-type]
    assert q.stats().ready == 10  # neither bad batch stored anything
    jobs = q.get_many(4, timeout=0)
    assert [j.data for j in jobs] == [0, 1, 2, 3]
    q.ack_many(jobs)
    assert q.stats().ready == 6
    assert q.put_many([]) == []


def test_ack_many_reports_stale(make_queue: MakeQueue) -> None:
    q = make_queue(lease=0.1)
    q.put_many(["a", "b"])
    stale = q.get(timeout=0)
    assert stale is not None
    time.sleep(0.2)
    jobs = q.get_many(2, timeout=0)  # "a" regranted, and "b"
    assert {j.data for j in jobs} == {"a", "b"}
    with pytest.raises(LeaseLost) as info:
        q.ack_many([stale, *[j for j in jobs if j.data == "b"]])
    assert info.value.ids == [stale.id]
    assert q.stats().leased == 1  # b acked, a still held by its new holder


def test_bad_input_refused(make_queue: MakeQueue) -> None:
    q = make_queue()
    for bad in (object(), float("nan"), {"f": print}, [1, {"deep": float("inf")}]):
        with pytest.raises(procwire.EncodeError):
            q.put(bad)
    for kwargs in ({"delay": -1}, {"delay": float("inf")}, {"priority": 1.5},
                   {"priority": 2**63}, {"key": 5}, {"group": ["g"]}):
        with pytest.raises(ValueError):
            q.put("x", **kwargs)
    with pytest.raises(ValueError):
        q.get(lease=0)
    with pytest.raises(ValueError):
        q.get_many(0)
    with pytest.raises(ValueError):
        Queue("")
    with pytest.raises(ValueError):
        Queue("x", codec="pickle")
    assert q.stats().put == 0
    q.put("fine")
    assert drain(q) == ["fine"]


def test_purge(make_queue: MakeQueue) -> None:
    q = make_queue()
    other = make_queue("other")
    q.put_many(range(3))
    other.put("keep")
    held = q.get(timeout=0)
    assert held is not None
    assert q.purge() == 3
    with pytest.raises(LeaseLost):
        held.ack()
    assert other.stats().ready == 1  # queues in one store are separate


def test_blocking_get_wakes_on_put(make_queue: MakeQueue) -> None:
    q = make_queue()
    producer = make_queue()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=20)))
    t.start()
    time.sleep(0.1)
    producer.put("wake")
    t.join(25)
    assert got and got[0] is not None and got[0].data == "wake"
    got[0].ack()
    assert q.get(timeout=0.05) is None  # a timeout returns None


def test_each_job_to_one_consumer(make_queue: MakeQueue) -> None:
    q = make_queue()
    n = 300
    q.put_many(range(n))
    seen: list[int] = []
    lock = threading.Lock()

    def consume() -> None:
        while True:
            job = q.get(timeout=0.2)
            if job is None:
                return
            with lock:
                seen.append(job.data)
            job.ack()

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(seen) == list(range(n))


def test_process_acks_nacks_and_dead_letters(make_queue: MakeQueue) -> None:
    q = make_queue(max_attempts=2)
    q.put_many([{"n": i} for i in range(20)])
    calls: list[int] = []
    lock = threading.Lock()

    def fn(data: dict[str, int]) -> None:
        with lock:
            calls.append(data["n"])
        if data["n"] % 5 == 0:
            raise RuntimeError(f"bad {data['n']}")

    result = q.process(fn, concurrency=3, idle_timeout=0.3)
    assert result.acked == 16
    assert result.failed == 8  # 4 bad jobs x 2 attempts
    dead = q.dead_letters()
    assert sorted(d.data["n"] for d in dead) == [0, 5, 10, 15]
    assert all("RuntimeError: bad" in (d.error or "") for d in dead)
    assert q.stats().ready == 0


def test_process_renews_lease_of_long_job(make_queue: MakeQueue) -> None:
    q = make_queue(lease=0.6)
    spy = make_queue()
    q.put("long")
    seen_by_spy: list[Any] = []

    def fn(job: Any) -> None:
        for _ in range(4):  # 1.2 s = 2 leases: renewals keep it
            time.sleep(0.3)
            j = spy.get(timeout=0)
            if j is not None:
                seen_by_spy.append(j)

    result = q.process(fn, max_jobs=1, with_job=True)
    assert result.acked == 1 and result.lost == 0
    assert not seen_by_spy
    assert q.stats().total == 0


def test_process_stop_event(make_queue: MakeQueue) -> None:
    q = make_queue()
    stop = threading.Event()
    done: list[Any] = []

    def fn(data: Any) -> None:
        done.append(data)
        if len(done) == 3:
            stop.set()

    q.put_many(range(10))
    result = q.process(fn, stop=stop)
    assert result.acked == 3
    assert q.stats().ready == 7


# -- asyncio twin ------------------------------------------------------------------------------

def test_async_roundtrip(queue_url: str) -> None:
    async def main() -> None:
        async with AsyncQueue("aio", queue_url, backoff=0, max_attempts=2) as q:
            assert await q.get(timeout=0) is None
            waiter = asyncio.ensure_future(q.get(timeout=20))
            await asyncio.sleep(0.05)
            ids = await q.put_many([{"n": 1}, {"n": 2}])
            job = await waiter
            assert job is not None and job.id == ids[0] and job.data == {"n": 1}
            await job.ack()
            jobs = await q.get_many(5, timeout=1)
            assert [j.data for j in jobs] == [{"n": 2}]
            await jobs[0].nack(error="again")
            j = await q.get(timeout=5)
            assert j is not None and j.attempts == 2
            await j.fail("give up")
            assert (await q.dead_letters())[0].error == "give up"
            assert await q.requeue_dead() == 1
            s = await q.stats()
            assert s.ready == 1
            with pytest.raises(procwire.EncodeError):
                await q.put(object())
            assert await q.purge() == 1

    asyncio.run(main())


def test_async_cancelled_get_leaves_no_job_behind(queue_url: str) -> None:
    async def main() -> None:
        async with AsyncQueue("aio", queue_url) as q:
            task = asyncio.ensure_future(q.get(timeout=20))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await q.put("x")
            job = await q.get(timeout=5)
            assert job is not None and job.attempts == 1
            await job.ack()

    asyncio.run(main())


def test_async_process(queue_url: str) -> None:
    async def main() -> None:
        async with AsyncQueue("aio", queue_url, backoff=0, max_attempts=1, lease=0.3) as q:
            await q.put_many(range(10))
            seen: list[int] = []

            async def fn(n: int) -> None:
                if n == 0:
                    await asyncio.sleep(0.8)  # longer than the lease: renewed from a thread
                seen.append(n)
                if n == 9:
                    raise ValueError("nine")

            result = await q.process(fn, concurrency=3, idle_timeout=0.3)
            assert result.acked == 9 and result.failed == 1 and result.lost == 0
            assert sorted(seen) == list(range(10))
            assert [d.data for d in await q.dead_letters()] == [9]

    asyncio.run(main())
