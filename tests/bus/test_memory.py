"""The Bus API on the memory:// backend: events, glob routing, handlers, flow-control policies,
request/reply, errors; blocking and asyncio."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

import procwire
from procwire.bus import AsyncBus, Bus, Event, NoResponder, RemoteError


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_emit_reaches_every_bus_and_glob_routing(pair: Any) -> None:
    a, b = pair
    users = b.subscribe("user.*", timeout=2)
    everything = b.subscribe("*", timeout=2)
    exact = a.subscribe("order.paid", timeout=2)
    assert a.emit("user.created", {"id": 1}) == 2
    a.emit("order.paid", [1, 2])
    a.emit("users", "no match for user.*")
    assert users.get(2) == Event("user.created", {"id": 1})
    assert users.get_nowait() is None
    assert [everything.get(2).name for _ in range(3)] == ["user.created", "order.paid", "users"]
    assert exact.get(2) == ("order.paid", [1, 2])
    assert exact.get_nowait() is None


def test_question_mark_and_brackets(pair: Any) -> None:
    a, b = pair
    sub = b.subscribe("job.[ab]?", timeout=2)
    for name in ("job.a1", "job.c1", "job.b22", "job.bz"):
        a.emit(name)
    assert [sub.get(2).name for _ in range(2)] == ["job.a1", "job.bz"]
    assert sub.get_nowait() is None


def test_handlers_on_once_off_decorator(pair: Any) -> None:
    a, b = pair
    seen: list[Any] = []
    lock = threading.Lock()

    @b.on("task")
    def on_task(data: Any) -> None:
        with lock:
            seen.append(("on", data))

    b.once("task", lambda data: seen.append(("once", data)))
    b.on("task.*", lambda name, data: seen.append((name, data)), with_event=True)
    a.emit("task", 1)
    a.emit("task", 2)
    a.emit("task.x", 3)
    wait_for(lambda: len(seen) == 4)
    assert sorted(seen, key=str) == sorted(
        [("on", 1), ("on", 2), ("once", 1), ("task.x", 3)], key=str)
    assert b.off("task", on_task) == 1
    assert b.off("task", on_task) == 0
    a.emit("task", 4)
    a.emit("task.y", 5)
    wait_for(lambda: ("task.y", 5) in seen)
    assert ("on", 4) not in seen and ("once", 4) not in seen


def test_handlers_never_block_emit(pair: Any) -> None:
    a, b = pair
    release = threading.Event()
    calls: list[int] = []

    def slow(data: int) -> None:
        release.wait(5)
        calls.append(data)

    b.on("slow", slow)
    t0 = time.monotonic()
    for i in range(50):
        a.emit("slow", i)
    emitted_in = time.monotonic() - t0
    release.set()
    wait_for(lambda: len(calls) == 50)
    assert calls == list(range(50))  # in order, on the dispatcher thread
    assert emitted_in < 4  # not waiting for the handler (which waits up to 5 s)


def test_raising_handler_is_logged_and_stays_subscribed(
        pair: Any, caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair
    got: list[int] = []

    def flaky(data: int) -> None:
        if data == 1:
            raise RuntimeError("boom")
        got.append(data)

    b.on("n", flaky)
    with caplog.at_level(logging.ERROR, logger="procwire.bus"):
        for i in range(3):
            a.emit("n", i)
        wait_for(lambda: got == [0, 2])
    assert "boom" in caplog.text
    assert b.stats()["handler_errors"] == 1


def test_subscription_timeout_and_close(pair: Any) -> None:
    a, b = pair
    sub = b.subscribe("x", timeout=0.05)
    with pytest.raises(procwire.Timeout):
        next(iter(sub))
    with pytest.raises(procwire.Timeout):
        sub.get(timeout=0.01)
    a.emit("x", 1)
    sub.close()
    assert sub.closed
    assert list(sub) == []  # iteration ends on a closed subscription
    a.emit("x", 2)
    with pytest.raises(procwire.ChannelClosed):
        sub.get(0.01)


def test_drop_oldest_counts_drops(pair: Any) -> None:
    a, b = pair
    sub = b.subscribe("e", maxsize=3, policy="drop_oldest")
    for i in range(10):
        a.emit("e", i)
    assert [sub.get(1).data for _ in range(3)] == [7, 8, 9]
    st = sub.stats()
    assert (st["dropped"], st["received"], st["queued"]) == (7, 10, 0)
    assert b.stats()["dropped"] == 7


def test_disconnect_policy_closes_after_draining(pair: Any) -> None:
    a, b = pair
    sub = b.subscribe("e", maxsize=2, policy="disconnect")
    for i in range(4):
        a.emit("e", i)
    assert [sub.get(1).data, sub.get(1).data] == [0, 1]
    with pytest.raises(procwire.ConnectionClosed) as info:
        sub.get(1)
    assert info.value.reason == "overflow"
    assert b.stats()["overflow_disconnects"] == 1
    assert sub not in b.subscriptions()


def test_block_policy_holds_the_emitter_until_room(pair: Any) -> None:
    a, b = pair
    sub = b.subscribe("e", maxsize=2, policy="block")
    done = threading.Event()

    def producer() -> None:
        for i in range(5):
            a.emit("e", i)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    try:
        assert not done.wait(0.2)  # stuck on the third event
        assert sub.stats()["queued"] == 2
        assert [sub.get(2).data for _ in range(5)] == [0, 1, 2, 3, 4]
        assert done.wait(5)
        assert sub.stats()["blocked"] >= 1 and sub.stats()["dropped"] == 0
    finally:
        sub.close()  # wakes the producer if an assertion failed
        t.join(5)


def test_close_wakes_a_blocked_delivery(url: str) -> None:
    a, b = Bus(url), Bus(url)
    b.subscribe("e", maxsize=1, policy="block")
    t = threading.Thread(target=lambda: [a.emit("e", i) for i in range(3)])
    t.start()
    time.sleep(0.05)
    b.close(timeout=5)
    t.join(5)
    assert not t.is_alive()
    a.close()


def test_request_reply_and_errors(pair: Any) -> None:
    a, b = pair
    b.handle("add", lambda d: d["x"] + d["y"])

    @b.handle("fail")
    def fail(data: Any) -> None:
        raise ValueError(f"bad {data}")

    b.handle("slow", lambda d: time.sleep(0.5))
    assert a.request("add", {"x": 1, "y": 2}, timeout=2) == 3
    assert b.request("add", {"x": 2, "y": 2}, timeout=2) == 4  # a bus can ask itself
    with pytest.raises(RemoteError) as info:
        a.request("fail", 7, timeout=2)
    assert (info.value.type, info.value.message) == ("ValueError", "bad 7")
    assert isinstance(info.value, procwire.ProcwireError)
    with pytest.raises(NoResponder):
        a.request("nobody", timeout=2)
    with pytest.raises(procwire.Timeout):
        a.request("slow", timeout=0.05)
    with pytest.raises(ValueError):
        b.handle("add", lambda d: d)
    b.unhandle("add")
    with pytest.raises(NoResponder):
        a.request("add", {"x": 1, "y": 2}, timeout=2)


def test_each_request_is_handled_by_exactly_one_of_several_handlers(url: str) -> None:
    """Like the broker: one handler runs each request, in turn; none left: NoResponder."""
    client, h1, h2 = Bus(url), Bus(url), Bus(url)
    try:
        calls: list[tuple[str, int]] = []
        lock = threading.Lock()

        def handler(who: str) -> Any:
            def work(i: int) -> str:
                with lock:
                    calls.append((who, i))
                return who
            return work

        h1.handle("work", handler("h1"))
        h2.handle("work", handler("h2"))
        n = 100
        replies = [client.request("work", i, timeout=5) for i in range(n)]
        assert sorted(i for _, i in calls) == list(range(n))  # each exactly once
        assert [who for who, _ in sorted(calls, key=lambda c: c[1])] == replies
        assert replies.count("h1") == replies.count("h2") == n // 2  # round robin
        wait_for(lambda: h1.stats()["requests_served"] + h2.stats()["requests_served"] == n)
        h1.close()
        assert {client.request("work", i, timeout=5) for i in range(10)} == {"h2"}
        h2.unhandle("work")
        with pytest.raises(NoResponder):
            client.request("work", 0, timeout=5)
    finally:
        for bus in (client, h1, h2):
            bus.close()


def test_reply_that_cannot_be_encoded_becomes_remote_error(pair: Any) -> None:
    a, b = pair
    b.handle("obj", lambda d: object())
    with pytest.raises(RemoteError) as info:
        a.request("obj", timeout=2)
    assert info.value.type == "EncodeError"


def test_bad_input_gets_typed_errors(pair: Any, url: str) -> None:
    a, _ = pair
    with pytest.raises(procwire.EncodeError):
        a.emit("x", object())
    with pytest.raises(procwire.EncodeError):
        a.emit("x", float("nan"))
    with pytest.raises(TypeError):
        a.emit(3, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        a.emit("", 1)
    with pytest.raises(ValueError):
        a.emit("procwire.gap", 1)
    with pytest.raises(ValueError):
        a.subscribe("x", policy="sometimes")
    with pytest.raises(ValueError):
        a.subscribe("x", maxsize=0)
    with pytest.raises(TypeError):
        a.on("x", "not callable")  # type: ignore[arg-type]

    async def coro(data: Any) -> None: ...

    with pytest.raises(TypeError):
        a.on("x", coro)
    small = Bus(url, max_message_size=100)
    try:
        with pytest.raises(procwire.MessageTooLarge):
            small.emit("x", "y" * 200)
        small.emit("x", "fine")  # still usable
    finally:
        small.close()
    with pytest.raises(procwire.AddressError):
        Bus("broker://relative/path.sock")  # the local broker wants an absolute path
    with pytest.raises(procwire.AddressError):
        Bus("carrier-pigeon://x")


def test_notices_are_not_matched_by_star(pair: Any) -> None:
    _, b = pair
    star = b.subscribe("*")
    notices = b.subscribe("procwire.*")
    b._core.on_notice("procwire.gap", {"reason": "test"})
    assert star.get_nowait() is None
    assert notices.get(1) == Event("procwire.gap", {"reason": "test"})


def test_closed_bus_refuses_work(url: str) -> None:
    bus = Bus(url)
    bus.close()
    bus.close()  # idempotent
    with pytest.raises(procwire.ChannelClosed):
        bus.emit("x")
    with pytest.raises(procwire.ChannelClosed):
        bus.subscribe("x")


def test_data_is_copied_between_buses(pair: Any) -> None:
    a, b = pair
    sub = b.subscribe("x")
    payload = {"list": [1]}
    a.emit("x", payload)
    payload["list"].append(2)
    assert sub.get(1).data == {"list": [1]}


# -- asyncio -----------------------------------------------------------------------------


def test_async_bus_handlers_iterators_requests(url: str) -> None:
    async def main() -> None:
        async with AsyncBus(url) as a, AsyncBus(url) as b:
            got: list[Any] = []
            loop_thread: list[int] = []

            @b.on("user.*")
            async def on_user(data: Any) -> None:
                loop_thread.append(threading.get_ident())
                await asyncio.sleep(0)
                got.append(data)

            b.on("plain", lambda d: got.append(("plain", d)))
            sub = b.subscribe("user.*", timeout=2)
            await a.emit("user.a", 1)
            await a.emit("plain", 2)
            assert await sub.get(2) == Event("user.a", 1)
            with pytest.raises(procwire.Timeout):
                await sub.get(0.05)
            for _ in range(200):
                if len(got) == 2:
                    break
                await asyncio.sleep(0.01)
            assert sorted(got, key=str) == sorted([1, ("plain", 2)], key=str)
            assert loop_thread == [threading.get_ident()]

            async def add(d: Any) -> int:
                await asyncio.sleep(0)
                return int(d["x"] + d["y"])

            await b.handle("add", add)
            await b.handle("fail", lambda d: 1 / 0)
            assert await a.request("add", {"x": 2, "y": 3}, timeout=2) == 5
            with pytest.raises(RemoteError) as info:
                await a.request("fail", timeout=2)
            assert info.value.type == "ZeroDivisionError"
            with pytest.raises(NoResponder):
                await a.request("none", timeout=2)

            async def slow(d: Any) -> None:
                await asyncio.sleep(1)

            await b.handle("slow", slow)
            with pytest.raises(procwire.Timeout):
                await a.request("slow", timeout=0.05)

            n = 0
            await a.emit("user.b", 2)
            await sub.close()
            async for _ev in sub:
                n += 1
            assert n == 0
        assert a.closed and b.closed

    asyncio.run(asyncio.wait_for(main(), 20))


def test_async_and_blocking_buses_share_a_memory_bus(url: str) -> None:
    blocking = Bus(url)
    sub = blocking.subscribe("from.async", timeout=2)
    blocking.handle("echo", lambda d: d)

    async def main() -> Any:
        async with AsyncBus(url) as bus:
            await bus.emit("from.async", "hi")
            return await bus.request("echo", [1, "x"], timeout=2)

    try:
        assert asyncio.run(main()) == [1, "x"]
        assert sub.get(2) == Event("from.async", "hi")
    finally:
        blocking.close()


def test_emit_many_in_order_and_checked_first(pair: Any) -> None:
    a, b = pair
    sub = b.subscribe("m.*")
    a.emit_many([("m.1", 1), ("m.2", 2)])
    assert [sub.get(1).data for _ in range(2)] == [1, 2]
    with pytest.raises(ValueError):
        a.emit_many([("m.3", 3), ("procwire.gap", 0)])
    assert sub.get_nowait() is None  # nothing of the bad batch was sent


def test_a_bus_used_in_a_forked_child_says_so(url: str) -> None:
    """emit checks the process (a pid kept by a fork hook): the child gets a clear error."""
    import os

    bus = Bus(url)
    try:
        assert bus.emit("x", 1) == 1  # memory:// counts the buses on the name: this one
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 3
            try:
                bus.emit("x", 2)
            except procwire.ProcwireError as exc:
                code = 0 if "another process" in str(exc) else 4
            except BaseException:
                code = 5
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert bus.emit("x", 3) == 1  # the parent's bus goes on
    finally:
        bus.close()
