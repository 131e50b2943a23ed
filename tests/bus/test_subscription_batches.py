"""A subscription hands out a burst with one lock (the rest of the burst waits, already taken,
in the subscription); the counters, policies and closing stay exact. And the broker client's
frame decoder (sans-IO): a ``pubs`` frame becomes Events, a bad one keeps its raw items."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from typing import Any

import msgspec
import pytest

import procwire
from procwire.bus import Bus, Event
from procwire.bus._core import PREFETCH
from procwire.bus._wire import decode_client_frame


def test_counters_stay_exact_while_part_of_a_burst_is_taken(pair: Any) -> None:
    pub, sub_bus = pair
    sub = sub_bus.subscribe("n", maxsize=10_000, timeout=5)
    n = 3 * PREFETCH + 7
    pub.emit_many([("n", i) for i in range(n)])
    assert sub.get(5).data == 0
    s = sub.stats()
    assert (s["received"], s["taken"], s["queued"]) == (n, 1, n - 1)
    assert sub.get_nowait().data == 1  # from what the first get set aside
    got = [sub.get(5).data for _ in range(PREFETCH)]
    assert got == list(range(2, PREFETCH + 2))
    rest = [ev.data for ev in itertools.islice(sub, n - PREFETCH - 2)]
    assert rest == list(range(PREFETCH + 2, n))
    s = sub.stats()
    assert (s["received"], s["taken"], s["queued"]) == (n, n, 0)
    with pytest.raises(procwire.Timeout):
        sub.get(0.05)


def test_close_drops_what_was_set_aside(pair: Any) -> None:
    pub, sub_bus = pair
    sub = sub_bus.subscribe("n", timeout=5)
    pub.emit_many([("n", i) for i in range(50)])
    assert sub.get(5).data == 0
    sub.close()
    with pytest.raises(procwire.ChannelClosed):
        sub.get(0.1)
    assert sub.stats()["taken"] == 1


def test_disconnect_policy_still_delivers_what_was_buffered(pair: Any) -> None:
    pub, sub_bus = pair
    sub = sub_bus.subscribe("n", maxsize=20, policy="disconnect", timeout=5)
    pub.emit_many([("n", i) for i in range(20)])
    assert sub.get(5).data == 0  # 19 set aside, the buffer is empty again
    pub.emit_many([("n", i) for i in range(20, 41)])  # 21 > maxsize: disconnected
    got = []
    with pytest.raises(procwire.ConnectionClosed) as err:
        for _ in range(100):
            got.append(sub.get(5).data)
    assert err.value.reason == "overflow"
    # what was set aside (1-19) and what the buffer held (20-39) are read first
    assert got == list(range(1, 40))


def test_a_loop_left_early_leaves_the_rest_of_its_batch(pair: Any) -> None:
    """Iteration walks whole batches in C; a ``break`` mid-batch loses nothing: the next
    get, loop or aget goes on from the next event, in order."""
    pub, sub_bus = pair
    sub = sub_bus.subscribe("n", maxsize=10_000, timeout=5)
    n = 2 * PREFETCH + 10
    pub.emit_many([("n", i) for i in range(n)])
    for ev in sub:
        if ev.data == 5:
            break
    assert sub.get(5).data == 6
    assert sub.stats()["taken"] == 7
    got = []
    for ev in sub:
        got.append(ev.data)
        if ev.data == PREFETCH + 3:  # past the first batch
            break
    assert got == list(range(7, PREFETCH + 4))
    assert next(sub).data == PREFETCH + 4
    assert asyncio.run(sub.aget(5)).data == PREFETCH + 5
    rest = [ev.data for ev in itertools.islice(sub, n - PREFETCH - 6)]
    assert rest == list(range(PREFETCH + 6, n))
    s = sub.stats()
    assert (s["taken"], s["queued"]) == (n, 0)


def test_a_loop_ends_when_the_subscription_closes_mid_batch(pair: Any) -> None:
    pub, sub_bus = pair
    sub = sub_bus.subscribe("n", timeout=5)
    pub.emit_many([("n", i) for i in range(50)])
    got = []
    for ev in sub:
        got.append(ev.data)
        if ev.data == 3:
            sub.close()  # 46 events of this batch are in hand: dropped, the loop ends
    assert got == [0, 1, 2, 3]
    assert sub.stats()["taken"] == 4


def test_iteration_timeout_raises_and_iteration_goes_on_afterwards(pair: Any) -> None:
    pub, sub_bus = pair
    sub = sub_bus.subscribe("n", timeout=0.1)
    pub.emit_many([("n", i) for i in range(3)])
    got = []
    with pytest.raises(procwire.Timeout):
        for ev in sub:
            got.append(ev.data)
    assert got == [0, 1, 2]
    pub.emit("n", 3)
    assert next(iter(sub)).data == 3


@pytest.mark.parametrize("how", ["get", "iterate"])
def test_several_threads_share_one_subscription_exactly_once(pair: Any, how: str) -> None:
    """Threads calling get, or loops in several threads sharing the batches: each event goes
    to one of them, and each sees its own events in order."""
    pub, sub_bus = pair
    sub = sub_bus.subscribe("n", maxsize=100_000, timeout=0.5)
    n = 20_000
    seen: list[list[int]] = [[], [], []]

    def take(out: list[int]) -> None:
        with contextlib.suppress(procwire.Timeout):  # 0.5 s without an event: done
            if how == "get":
                while True:
                    out.append(sub.get(0.5).data)
            for ev in sub:
                out.append(ev.data)

    threads = [threading.Thread(target=take, args=(s,)) for s in seen]
    for t in threads:
        t.start()
    try:
        for k in range(0, n, 500):
            pub.emit_many([("n", i) for i in range(k, k + 500)])
    finally:
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    everything = sorted(x for s in seen for x in s)
    assert everything == list(range(n))  # each exactly once
    for s in seen:
        assert s == sorted(s)


def test_aget_after_a_blocking_get(pair: Any) -> None:
    pub, sub_bus = pair
    sub = sub_bus.subscribe("n", timeout=5)
    pub.emit_many([("n", i) for i in range(10)])
    assert sub.get(5).data == 0

    async def rest() -> list[int]:
        return [(await sub.aget(5)).data for _ in range(9)]

    assert asyncio.run(rest()) == list(range(1, 10))


def test_decode_pubs_frames() -> None:
    frame = msgspec.json.encode(["pubs", 3, "", [["a", {"x": 1}], ["b", [2]]]])
    f = decode_client_frame(frame)
    assert (f.kind, f.seq) == ("pubs", 3)
    assert f.body == [Event("a", {"x": 1}), Event("b", [2])]
    assert all(type(e) is Event for e in f.body)
    assert decode_client_frame(memoryview(frame)).body == f.body
    # an item that is not a [str, data] pair: decoded as plain lists (the reader filters)
    bad = msgspec.json.encode(["pubs", 4, "", [["a", 1], [5, 6], ["b", 2, 3]]])
    f = decode_client_frame(bad)
    assert f.kind == "pubs" and f.body == [["a", 1], [5, 6], ["b", 2, 3]]
    other = decode_client_frame(msgspec.json.encode(["pub", 1, "a", {"y": 2}]))
    assert (other.kind, other.name, other.body) == ("pub", "a", {"y": 2})


def test_a_mixed_batch_through_the_broker_is_split_by_route(brokers: Any) -> None:
    """One emit_many frame whose events go to different subscriptions of one bus: each gets
    exactly its share, in order (and a batch that all goes one way is handed over whole)."""
    with Bus() as pub, Bus() as sub_bus:
        a = sub_bus.subscribe("a.*", timeout=10)
        every = sub_bus.subscribe("*", timeout=10)
        only_b = sub_bus.subscribe("b.x", timeout=10)
        batch = [("a.x" if i % 3 == 0 else "b.x" if i % 3 == 1 else "c", i) for i in range(300)]
        pub.emit_many(batch)
        pub.emit_many([("b.x", i) for i in range(300, 400)])  # all one way
        assert [a.get(10).data for _ in range(100)] == list(range(0, 300, 3))
        assert [every.get(10).data for _ in range(400)] == list(range(400))
        assert [only_b.get(10).data for _ in range(200)] == \
            list(range(1, 300, 3)) + list(range(300, 400))
        for s in (a, every, only_b):
            with pytest.raises(procwire.Timeout):
                s.get(0.1)
