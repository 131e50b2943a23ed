"""Pipelined emit on the local broker: ``emit`` queues the event and a flusher thread writes
what is queued as one ``pubs`` frame, confirmed by the broker; order, the ordering against
requests, flush/close/exit, a broker killed mid-stream, an unreachable broker, a full
outbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Any

import pytest

import procwire
from procwire.bus import AsyncBus, Bus, Event
from procwire.bus._paths import try_lock


def _ids(sub: Any, want: set[int], timeout: float = 20.0) -> list[int]:
    """Event data (ints) from ``sub`` until every id in ``want`` came, or ``timeout``."""
    got: list[int] = []
    missing = set(want)
    deadline = time.monotonic() + timeout
    while missing and time.monotonic() < deadline:
        try:
            ev = sub.get(max(0.01, deadline - time.monotonic()))
        except procwire.Timeout:
            break
        got.append(ev.data)
        missing.discard(ev.data)
    return got


def test_emits_arrive_in_order_and_flush_confirms_them(brokers: Any) -> None:
    n = 5000
    with Bus() as sub_bus, Bus() as pub:
        sub = sub_bus.subscribe("n", timeout=10, maxsize=n)
        for i in range(n):
            assert pub.emit("n", i) == -1  # queued: the count is not known yet
        pub.flush(timeout=10)
        st = pub.stats()["backend"]
        assert st["outbox"] == 0 and st["emit_failed"] == 0
        assert [sub.get(10).data for _ in range(n)] == list(range(n))
        # the flusher wrote them as batches: far fewer frames than events reached the broker
        me = [c for c in pub._backend.broker_stats()["clients"]  # type: ignore[attr-defined]
              if c["events_in"]]
        assert [c["events_in"] for c in me] == [n]


def test_a_request_and_a_confirmed_emit_come_after_the_emits_before_them(brokers: Any) -> None:
    with Bus() as responder, Bus() as pub:
        seen = responder.subscribe("tick", maxsize=10_000)
        # the handler answers how many ticks had reached its bus when the request came
        responder.handle("count", lambda _: seen.stats()["received"])
        for round_ in range(1, 4):
            for i in range(500):
                pub.emit("tick", i)
            assert pub.request("count", None, timeout=10) == 500 * round_
        for i in range(100):
            pub.emit("tick", i)
        assert pub.emit("tick", -1, confirm=True) == 1  # routed to the responder's bus
        assert pub.request("count", None, timeout=10) == 1500 + 100 + 1


def test_close_and_interpreter_exit_publish_what_is_queued(brokers: Any, children: Any) -> None:
    with Bus() as sub_bus:
        sub = sub_bus.subscribe("x.*", timeout=20, maxsize=10_000)
        code = ("import sys\nfrom procwire.bus import Bus\n"
                "bus = Bus()\n"
                "for i in range(3000):\n"
                "    bus.emit(sys.argv[1], i)\n"
                "if sys.argv[1] == 'x.closed':\n"
                "    bus.close()\n"
                "print('done', flush=True)\n")  # else: exits with the bus open
        for name in ("x.closed", "x.open"):
            p = children.python(code, name, stdout=subprocess.PIPE)
            out, _ = p.communicate(timeout=30)
            assert p.returncode == 0 and out.strip() == b"done"
            got = [sub.get(20) for _ in range(3000)]
            assert got == [Event(name, i) for i in range(3000)]


def test_events_a_killed_broker_never_confirmed_are_written_again(brokers: Any) -> None:
    """Events written to a broker that dies before confirming them are written again on the
    new connection. The bus's own subscription is registered again before that (hello), so
    they reach it, in order. (A broker that confirmed events and died before they left it
    loses them: subscribers get a gap notice.)"""
    with Bus(brokers.url(idle=30)) as bus:
        sub = bus.subscribe("n", timeout=20, maxsize=100_000)
        gaps = bus.subscribe("procwire.gap", timeout=20)
        for i in range(1000):
            bus.emit("n", i)
        bus.flush(timeout=10)
        assert [sub.get(10).data for _ in range(1000)] == list(range(1000))
        pid = brokers.pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it reads nothing more, confirms nothing more
        try:
            for i in range(1000, 2000):
                bus.emit("n", i)
            # the flusher wrote them into the stopped broker's socket: unconfirmed
            wait_until = time.monotonic() + 5
            while time.monotonic() < wait_until and bus._backend._out:  # type: ignore
                time.sleep(0.01)
            assert bus.stats()["backend"]["outbox"] == 1000
        finally:
            brokers.kill(pid)
        for i in range(2000, 3000):
            bus.emit("n", i, timeout=20)
        bus.flush(timeout=20)
        got = _ids(sub, set(range(1000, 3000)))
        assert sorted(set(got)) == list(range(1000, 3000))
        assert got == sorted(got)  # in order
        assert gaps.get(20).data["reason"] == "restarted"
        st = bus.stats()["backend"]
        assert st["emit_failed"] == 0 and st["outbox"] == 0 and st["emit_resent"] >= 1000


def test_unreachable_broker_full_outbox_and_close_report_what_was_not_published(
        brokers: Any) -> None:
    with Bus(brokers.url(idle=30, outbox=10)) as bus:
        pid = brokers.pid()
        assert pid is not None
        fd = try_lock(brokers.path + ".spawn")  # nobody can start another broker
        assert fd is not None
        try:
            brokers.kill(pid)
            for i in range(10):
                assert bus.emit("x", i, timeout=30) == -1
            t0 = time.monotonic()
            with pytest.raises(procwire.Timeout, match=r"outbox to the broker .* stayed full"):
                bus.emit("x", 10, timeout=0.3)
            assert 0.25 <= time.monotonic() - t0 < 5
            assert bus.stats()["backend"]["outbox_full"] == 1
            with pytest.raises(procwire.Timeout,
                               match=r"10 emitted event\(s\) were not published: the bus was "
                                     "closed before the broker confirmed them"):
                bus.close(timeout=0.5)
            assert bus.stats()["backend"]["emit_failed"] == 10
        finally:
            os.close(fd)


def test_emits_from_many_threads_each_keep_their_order(brokers: Any) -> None:
    with Bus() as sub_bus, Bus() as pub:
        sub = sub_bus.subscribe("t", timeout=10, maxsize=100_000)

        def emit(k: int) -> None:
            for i in range(1000):
                pub.emit("t", [k, i])

        threads = [threading.Thread(target=emit, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        pub.flush(timeout=10)
        got = [sub.get(10).data for _ in range(4000)]
        for k in range(4):
            assert [i for kk, i in got if kk == k] == list(range(1000))


def test_asyncio_emit_is_pipelined_too(brokers: Any) -> None:
    async def main() -> None:
        async with AsyncBus() as a, AsyncBus() as b:
            got = b.subscribe("a.*", timeout=10)
            assert await a.emit("a.first", 0, confirm=True) == 1
            for i in range(1, 500):
                assert await a.emit("a.x", i) == -1
            await a.flush()
            assert [(await got.get(10)).data for _ in range(500)] == list(range(500))

    asyncio.run(main())


def test_an_event_over_a_restarted_brokers_frame_limit_fails_alone(brokers: Any,
                                                                    children: Any) -> None:
    """An event queued under one broker's frame limit, written after the bus reconnected to
    a broker with a smaller one, is reported as not published (the broker would disconnect
    the bus for it after every reconnection); the events around it go through."""
    code = ("import sys\nfrom procwire.bus._broker import main\n"
            "sys.exit(main(['--socket', sys.argv[1], '--idle', '0', *sys.argv[2:]]))\n")

    def start(*extra: str) -> subprocess.Popen[bytes]:
        p = children.python(code, brokers.path, *extra)
        deadline = time.monotonic() + 20
        while brokers.pid() is None or not brokers.alive(brokers.pid()):
            assert time.monotonic() < deadline and p.poll() is None, "no broker"
            time.sleep(0.02)
        return p

    first = start()
    with Bus(brokers.url(autostart=0)) as bus:
        sub = bus.subscribe("x", timeout=20)
        brokers.kill(first.pid)
        bus.emit("x", "before", timeout=30)
        bus.emit("x", "a" * 200_000, timeout=30)  # fits the first broker's 1 MiB frames
        bus.emit("x", "after", timeout=30)
        start("--max-frame", "100000")
        with pytest.raises(procwire.Timeout, match=r"1 emitted event\(s\) were not published: "
                                                   r"larger than the broker's frame limit"):
            bus.flush(timeout=20)
        assert [sub.get(20).data for _ in range(2)] == ["before", "after"]
        assert bus.stats()["backend"]["reconnects"] == 1


def test_many_reconnections_with_senders_busy_leave_the_bus_working(brokers: Any) -> None:
    """The broker says bye (a bad frame) again and again while eight threads send: the
    reader must survive closing a channel with unsent bytes (it died), and a send that
    failed on the old channel must not mark the new one down (the bus wedged)."""
    from procwire.bus._wire import encode_frame

    with Bus(brokers.url(idle=30), emit_timeout=2.0) as bus:
        backend: Any = bus._backend
        assert bus.emit("warm", 1, confirm=True) == 0
        stop = time.monotonic() + 3.0

        def send() -> None:
            while time.monotonic() < stop:
                with contextlib.suppress(procwire.ProcwireError):
                    bus.emit("c", "y" * 2000, confirm=True, timeout=2)

        threads = [threading.Thread(target=send, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        byes = 0
        while time.monotonic() < stop:
            ch = backend._ch
            if ch is not None:
                with contextlib.suppress(procwire.ProcwireError):
                    ch.send(encode_frame("bogus", 0, "x", None), timeout=0)  # -> bye
                    byes += 1
            time.sleep(0.03)
        for t in threads:
            t.join(10)
        assert byes > 10 and backend.reconnects > 10
        assert backend._thread.is_alive()
        assert bus.emit("after", 1, confirm=True, timeout=10) == 0
        bus.emit("after", 2)
        bus.flush(timeout=10)


def test_close_returns_in_time_while_the_broker_reads_nothing(brokers: Any) -> None:
    """Large batch frames to a stopped broker: close(timeout=2) returns (raising what was not
    confirmed) instead of waiting forever on the socket's write lock."""
    bus = Bus(brokers.url(idle=30))
    assert bus.emit("warm", 1, confirm=True) == 0
    pid = brokers.pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(40):
            bus.emit("big", "x" * 60_000)
        time.sleep(0.3)
        t0 = time.monotonic()
        with pytest.raises(procwire.Timeout, match="were not published"):
            bus.close(timeout=2)
        assert time.monotonic() - t0 < 6
    finally:
        brokers.kill(pid)


def test_the_largest_event_emit_accepts_is_published(brokers: Any) -> None:
    with Bus() as bus:
        sub = bus.subscribe("e", timeout=10)
        limit = bus._backend._limit  # type: ignore[attr-defined]
        for size in (limit - 64, limit - 100):
            text = "x" * (size - len('["e",""]'))
            bus.emit("e", text)
            bus.flush(timeout=10)
            assert sub.get(10).data == text
        with pytest.raises(procwire.MessageTooLarge):
            bus.emit("e", "x" * limit)
        assert bus.stats()["backend"]["emit_failed"] == 0


def test_a_late_answer_to_a_call_that_gave_up_confirms_no_batch(brokers: Any,
                                                                 monkeypatch: Any) -> None:
    """The flusher takes a batch (seq T) and is held up before writing it; meanwhile a call
    (seq S > T) gives up at once and its ok arrives: that ok must not confirm batch T, which
    the broker never saw (after the broker died it was not written again: lost silently)."""
    from procwire.bus import _local

    with Bus(emit_timeout=5.0) as bus:
        sub = bus.subscribe("e", timeout=10)  # registered again before batches are rewritten
        assert bus.emit("warm", 1, confirm=True) == 0
        backend: Any = bus._backend
        take = _local.LocalBackend._take_batch
        held = threading.Event()

        def slow_take(self: Any) -> Any:
            got = take(self)
            if got[1] and not held.is_set():
                held.set()
                time.sleep(1.5)  # the flusher preempted between taking and writing
            return got

        monkeypatch.setattr(_local.LocalBackend, "_take_batch", slow_take)
        pid = brokers.pid()
        assert pid is not None
        bus.emit("e", "important")
        assert held.wait(5)
        os.kill(pid, signal.SIGSTOP)  # the call below gets no answer in its time
        try:
            with pytest.raises(procwire.Timeout):
                backend.add_pattern("zz", 0.1)
        finally:
            os.kill(pid, signal.SIGCONT)  # now its ok comes, late
        time.sleep(0.3)
        assert len(backend._inflight) == 1  # still in flight, not confirmed by that ok
        brokers.kill(pid)  # before the flusher writes the batch: no broker ever saw it
        bus.flush(timeout=10)
        assert sub.get(10) == Event("e", "important")


def test_failures_counted_but_not_raised_are_reported_at_exit(brokers: Any,
                                                              children: Any) -> None:
    code = ("import os, signal, sys, time\nfrom procwire.bus import Bus\n"
            "bus = Bus(sys.argv[1], emit_timeout=0.5)\n"
            "bus.emit('warm', 1, confirm=True)\n"
            "os.kill(int(sys.argv[2]), signal.SIGKILL)\n"
            "for i in range(10):\n"
            "    bus.emit('e', i)\n"
            "time.sleep(1.5)\n"  # past their timeout: counted, not raised (no call since)
            "print('exiting', flush=True)\n")
    with Bus(brokers.url(idle=30)):
        pid = brokers.pid()
    assert pid is not None
    p = children.python(code, brokers.url(autostart=0), str(pid), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=30)
    brokers.wait_gone(pid)
    assert out.strip() == b"exiting"
    assert b"at exit, 10 emitted event(s) were not published" in err, err.decode()


def test_emit_many_reads_its_own_confirmation_on_the_requests_connection(
        brokers: Any, children: Any) -> None:
    """A blocking emit_many goes on the requests connection and the calling thread reads its
    confirmation itself; while another thread holds that connection (a request waiting for a
    slow handler) it takes the main connection. Either way: in order, each once."""
    handler = children.python(
        "import sys, time\nfrom procwire.bus import Bus\n"
        "with Bus() as bus:\n"
        "    bus.handle('slow', lambda d: time.sleep(d) or 'done')\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.read()\n", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert handler.stdout.readline().strip() == b"ready"
    with Bus() as sub_bus, Bus() as pub:
        sub = sub_bus.subscribe("m", timeout=10, maxsize=10_000)
        backend: Any = pub._backend
        pub.emit_many([("m", i) for i in range(100)])
        assert backend.batches_direct == 1
        t = threading.Thread(target=lambda: pub.request("slow", 1.0, timeout=10))
        t.start()
        time.sleep(0.3)  # the request holds the requests connection now
        pub.emit_many([("m", i) for i in range(100, 200)])
        assert backend.batches_direct == 1  # that one took the main connection
        t.join(10)
        pub.emit_many([("m", i) for i in range(200, 300)])
        assert backend.batches_direct == 2
        assert [sub.get(10).data for _ in range(300)] == list(range(300))
    handler.stdin.close()
    assert handler.wait(10) == 0


def test_emit_many_after_the_broker_died_goes_through_the_new_one(brokers: Any) -> None:
    with Bus(brokers.url(idle=30)) as bus:
        sub = bus.subscribe("m", timeout=20, maxsize=10_000)
        bus.emit_many([("m", i) for i in range(10)])  # opens the requests connection
        assert [sub.get(10).data for _ in range(10)] == list(range(10))
        pid = brokers.pid()
        assert pid is not None
        brokers.kill(pid)
        bus.emit_many([("m", i) for i in range(10, 20)], timeout=20)
        got = _ids(sub, set(range(10, 20)))
        assert sorted(set(got)) == list(range(10, 20)) and got == sorted(got)
