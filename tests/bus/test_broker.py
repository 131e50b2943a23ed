"""The local broker (the default ``Bus()``) with real processes: a private broker socket per
test (the ``brokers`` fixture sets ``PROCWIRE_BROKER``), brokers started by the clients
themselves, killed with SIGKILL, left to exit when idle, fed garbage."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import procwire
from procwire.bus import AsyncBus, Bus, Event, NoResponder, RemoteError

ROOT = Path(__file__).resolve().parent.parent.parent


def wait_for(pred: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.02)


def readline(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> str:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), "the child printed nothing in time"
    return proc.stdout.readline().decode().strip()


def drain_until(sub: Any, pred: Any, timeout: float = 10.0) -> list[Event]:
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no matching event in {timeout} s; saw {seen[-5:]}"
        ev = sub.get(timeout=left)
        seen.append(ev)
        if pred(ev):
            return seen


SUBSCRIBER = r"""
import json, sys
from procwire.bus import Bus
with Bus() as bus:                       # PROCWIRE_BROKER names the private socket
    events = bus.subscribe("job.*", timeout=20)
    print("ready", flush=True)
    for ev in events:
        print(json.dumps([ev.name, ev.data]), flush=True)
        if ev.name == "job.stop":
            break
"""

PUBLISHER = r"""
import sys
from procwire.bus import Bus
with Bus() as bus:
    for i in range(20):
        bus.emit("job.run", {"i": i})
    bus.emit("other.thing", 1)           # matches no pattern of the subscriber
    print(bus.emit("job.stop", confirm=True), flush=True)  # after the others, with the count
"""


def test_two_unrelated_processes_exchange_events(brokers: Any, children: Any) -> None:
    assert not os.path.exists(brokers.path)  # nothing started by hand
    sub = children.python(SUBSCRIBER, stdout=subprocess.PIPE)
    assert readline(sub) == "ready"
    pub = children.python(PUBLISHER, stdout=subprocess.PIPE)
    assert readline(pub) == "1"  # job.stop reached one bus: the subscriber
    got = [json.loads(readline(sub)) for _ in range(21)]
    assert got == [["job.run", {"i": i}] for i in range(20)] + [["job.stop", None]]
    assert sub.wait(timeout=10) == 0 and pub.wait(timeout=10) == 0
    assert brokers.pid() is not None and brokers.running() == [brokers.pid()]


RACER = r"""
import os, sys, time
from procwire.bus import Bus
go = sys.argv[1]
deadline = time.monotonic() + 20
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.002)
with Bus(timeout=20) as bus:
    print(bus.stats()["backend"]["broker_pid"], flush=True)
    sys.stdin.read()                     # stay connected until the test is done
"""


def test_ten_processes_racing_start_exactly_one_broker(brokers: Any, children: Any,
                                                       tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [children.python(RACER, str(go), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for _ in range(10)]
    time.sleep(0.3)  # let them import procwire, then release them together
    go.touch()
    pids = {int(readline(p, 30)) for p in procs}
    assert len(pids) == 1, f"clients reached several brokers: {pids}"
    (pid,) = pids
    assert brokers.pid() == pid
    assert brokers.running() == [pid]
    for p in procs:
        p.stdin.close()
        assert p.wait(timeout=10) == 0


def test_glob_routing_reaches_only_matching_buses(brokers: Any) -> None:
    with Bus() as pub, Bus() as users, Bus() as everything, Bus() as orders:
        u = users.subscribe("user.*", timeout=5)
        a = everything.subscribe("*", timeout=5)
        o = orders.subscribe("order.created", timeout=5)
        assert pub.emit("user.created", {"id": 1}) == -1  # pipelined: not counted yet
        assert pub.emit("order.created", {"id": 2}, confirm=True) == 2
        assert pub.emit("order.paid", {"id": 3}, confirm=True) == 1
        assert pub.emit("nobody.cares", confirm=True) == 1
        assert u.get(5) == Event("user.created", {"id": 1})
        assert [a.get(5).name for _ in range(4)] == ["user.created", "order.created",
                                                     "order.paid", "nobody.cares"]
        assert o.get(5) == Event("order.created", {"id": 2})
        pub.emit_many([("user.a", 1), ("user.b", 2), ("x", 3)])
        assert [u.get(5).name for _ in range(2)] == ["user.a", "user.b"]
        assert [a.get(5) for _ in range(3)] == [Event("user.a", 1), Event("user.b", 2),
                                                Event("x", 3)]
        time.sleep(0.1)
        assert u.get_nowait() is None and o.get_nowait() is None
        # the broker filtered: what a bus never asked for never crossed its socket
        assert users.stats()["backend"]["events_received"] == 3
        assert orders.stats()["backend"]["events_received"] == 1
        assert pub.stats()["backend"]["events_received"] == 0
        # unsubscribing stops the traffic at the broker too
        o.close()
        assert pub.emit("order.created", {"id": 4}, confirm=True) == 1
        # channels are separate buses on one broker
        with Bus(channel="other") as other:
            s = other.subscribe("*", timeout=5)
            assert other.emit("user.created", 9, confirm=True) == 1
            assert s.get(5) == Event("user.created", 9)
            assert u.get_nowait() is None


def test_emit_many_one_frame_or_split_and_checked_first(brokers: Any) -> None:
    with Bus() as pub, Bus() as sub:
        got = sub.subscribe("b.*", timeout=10)
        pub.emit_many([(f"b.{i}", {"i": i}) for i in range(100)])  # one frame
        assert [got.get(10).data["i"] for _ in range(100)] == list(range(100))
        # 3 MB in 10 kB events: more than one frame may carry (1 MiB): split, in order
        blob = "x" * 10_000
        pub.emit_many([("b.big", [i, blob]) for i in range(300)])
        assert [got.get(10).data[0] for _ in range(300)] == list(range(300))
        # a bad event anywhere: an error, and nothing of that batch is sent
        deep: list[Any] = []
        for _ in range(100_000):  # nested past the encoder's recursion limit
            deep = [deep]
        for bad in (float("nan"), object(), deep):
            with pytest.raises(procwire.EncodeError):
                pub.emit_many([("b.ok", 1), ("b.bad", bad)])
        with pytest.raises(procwire.EncodeError, match="nested"):
            pub.emit("b.bad", deep)
        pub.emit("b.end")
        assert got.get(10).name == "b.end"
        assert sub.stats()["backend"]["events_received"] == 401


def test_a_batch_is_delivered_in_order_to_each_subscription_with_its_policy(
        brokers: Any) -> None:
    # One emit_many frame reaches the subscriber as one batch: each subscription gets its share
    # in order, with one wake-up, and its overflow policy still applies when the batch does not
    # fit (block: nothing lost; drop_oldest: the newest kept; disconnect: closed after what fit).
    with Bus() as pub, Bus() as sub:
        seen: list[int] = []
        done = threading.Event()

        def handler(data: Any) -> None:
            seen.append(data)
            if data == 199:
                done.set()

        sub.on("n.*", handler)
        every = sub.subscribe("n.*", timeout=10, maxsize=50, policy="block")
        odd = sub.subscribe("n.odd", timeout=10)
        newest = sub.subscribe("n.*", timeout=10, maxsize=10, policy="drop_oldest")
        cut = sub.subscribe("n.*", timeout=10, maxsize=30, policy="disconnect")
        pub.emit("n.even", -1)  # confirmed: every subscription is registered at the broker
        assert every.get(10).data == -1 and newest.get(10).data == -1 and cut.get(10).data == -1
        pub.emit_many([(f"n.{'odd' if i % 2 else 'even'}", i) for i in range(200)])
        assert [every.get(10).data for _ in range(200)] == list(range(200))
        assert [odd.get(10).data for _ in range(100)] == list(range(1, 200, 2))
        assert done.wait(10) and seen == [-1, *range(200)]
        assert [newest.get(10).data for _ in range(10)] == list(range(190, 200))
        assert newest.stats()["dropped"] == 190
        got = []
        with pytest.raises(procwire.ConnectionClosed):
            for _ in range(201):
                got.append(cut.get(10).data)
        assert got == list(range(30))


RESPONDER = r"""
import sys, time
from procwire.bus import Bus
with Bus() as bus:
    bus.handle("add", lambda d: d["x"] + d["y"])
    bus.handle("slow", lambda d: time.sleep(d) or "late")
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_request_reply_with_timeouts_and_remote_errors(brokers: Any, children: Any) -> None:
    child = children.python(RESPONDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert readline(child) == "ready"
    with Bus() as bus:
        assert bus.request("add", {"x": 1, "y": 2}, timeout=5) == 3
        assert [bus.request("add", {"x": i, "y": i}, timeout=5) for i in range(50)] == \
            [2 * i for i in range(50)]
        with pytest.raises(RemoteError) as info:
            bus.request("add", {"x": 1}, timeout=5)
        assert info.value.type == "KeyError" and "y" in info.value.message
        t0 = time.monotonic()
        with pytest.raises(procwire.Timeout):
            bus.request("slow", 1.0, timeout=0.2)
        assert time.monotonic() - t0 < 0.9
        with pytest.raises(NoResponder):
            bus.request("mul", {}, timeout=5)
        # a local handler and the remote one: the broker sends each request to one of them
        bus.handle("add", lambda d: "local")
        answers = {bus.request("add", {"x": 1, "y": 1}, timeout=5) for _ in range(6)}
        assert answers == {2, "local"}
        bus.unhandle("add")
        child.stdin.close()
        assert child.wait(timeout=10) == 0
        with pytest.raises(NoResponder):  # the responder's process is gone
            bus.request("add", {"x": 1, "y": 2}, timeout=5)


def test_requests_from_many_threads_and_close_while_waiting(brokers: Any,
                                                            children: Any) -> None:
    """A calling thread reads its reply itself on the bus's requests connection; threads that
    find it busy go through the main connection. Both give the right answers; closing the bus
    wakes a thread waiting on either."""
    child = children.python(RESPONDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert readline(child) == "ready"
    with Bus() as bus:
        assert bus.request("add", {"x": 1, "y": 2}, timeout=5) == 3
        assert bus.stats()["backend"]["requests_direct"] == 1  # the fast path was taken
        results: dict[int, list[Any]] = {}

        def worker(k: int) -> None:
            results[k] = [bus.request("add", {"x": k, "y": i}, timeout=10) for i in range(40)]

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {k: [k + i for i in range(40)] for k in range(6)}
        st = bus.stats()
        assert st["requests_sent"] == 241 and st["replies_late"] == 0
        fast = st["backend"]["requests_direct"] + st["backend"]["requests_peer"]
        assert 1 < fast <= 241
        # the broker lists the requests connection as a client of its own
        names = [c["name"] for c in bus._backend.broker_stats()["clients"]]  # type: ignore
        assert any(n.endswith(" requests") for n in names)

    for direct in (True, False):
        bus = Bus()
        errors: list[BaseException] = []

        def waiting(bus: Bus = bus, errors: list[BaseException] = errors) -> None:
            try:
                bus.request("slow", 5.0, timeout=20)
            except BaseException as exc:
                errors.append(exc)

        if not direct:  # hold the requests connection: the request takes the main one
            assert bus._backend._rr_lock.acquire(timeout=5)  # type: ignore[attr-defined]
        t = threading.Thread(target=waiting)
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        bus.close()
        t.join(10)
        assert not t.is_alive() and time.monotonic() - t0 < 3
        assert len(errors) == 1 and isinstance(errors[0], procwire.ChannelClosed), errors
        assert bus.stats()["backend"]["requests_direct"] == (1 if direct else 0)
    child.stdin.close()
    assert child.wait(timeout=30) == 0  # its handler sleeps through two slow requests


def test_asyncio_bus_on_the_broker(brokers: Any) -> None:
    async def main() -> None:
        async with AsyncBus() as a, AsyncBus() as b:
            got = b.subscribe("tick.*", timeout=5)
            await b.handle("echo", lambda d: d)
            assert await a.emit("tick.1", [1], confirm=True) == 1  # b's pattern is registered
            assert (await got.get(5)) == Event("tick.1", [1])
            assert await a.request("echo", {"x": 1}, timeout=5) == {"x": 1}
            with pytest.raises(NoResponder):
                await a.request("nobody", None, timeout=5)
            # a bus answering its own requests: the reply goes out through the same I/O
            # thread the request went through, so that thread must not wait for the reply
            await a.handle("self", lambda d: d + 1)
            assert await a.request("self", 1, timeout=5) == 2
            assert await asyncio.gather(*(a.request("self", i, timeout=5)
                                          for i in range(5))) == [1, 2, 3, 4, 5]

    asyncio.run(main())


def test_broker_killed_with_sigkill_clients_reconnect(brokers: Any, children: Any) -> None:
    child = children.python(RESPONDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert readline(child) == "ready"
    with Bus() as sub, Bus() as pub:
        events = sub.subscribe("e", timeout=10)
        gaps = sub.subscribe("procwire.gap", timeout=15)
        pub.emit("e", 1)
        assert events.get(5).data == 1
        first = brokers.pid()
        assert first is not None
        brokers.kill(first)

        gap = gaps.get(15)  # the next client that needs a broker started a new one
        assert gap.data["reason"] == "restarted"
        assert gap.data["down_for"] >= 0 and gap.data["backend"].startswith("broker://")
        second = wait_for(lambda: brokers.pid() if brokers.pid() != first else None,
                          what="a new broker")
        assert second != first and brokers.alive(second)
        assert pub.emit("e", 2, confirm=True) >= 1  # waits for its reconnection, delivers
        assert drain_until(events, lambda ev: ev.data == 2)[-1].data == 2
        # the child's responder registered itself again on the new broker
        assert wait_for(lambda: _try_request(pub), what="the responder back") == 7
        assert sub.stats()["backend"]["reconnects"] >= 1
        assert sub.stats()["notices"]["procwire.gap"] >= 1
        assert brokers.running() == [second]
    child.stdin.close()
    assert child.wait(timeout=10) == 0


def _try_request(bus: Bus) -> Any:
    try:
        return bus.request("add", {"x": 3, "y": 4}, timeout=2)
    except NoResponder:
        return None


def test_emit_while_no_broker_can_start_times_out(brokers: Any) -> None:
    url = brokers.url(autostart=0)
    with pytest.raises(procwire.ConnectionRefused):
        Bus(url, timeout=1)
    with Bus(brokers.url(idle=30)) as bus:
        pid = brokers.pid()
        assert pid is not None
        # the spawn lock held elsewhere: nobody can start a broker; emit gives up in time
        from procwire.bus._paths import try_lock

        fd = try_lock(brokers.path + ".spawn")
        assert fd is not None
        try:
            brokers.kill(pid)
            t0 = time.monotonic()
            with pytest.raises(procwire.Timeout, match=r"unreachable|did not answer"):
                bus.emit("x", 1, timeout=0.5, confirm=True)
            assert time.monotonic() - t0 < 3
            # a pipelined emit is queued; not published within its timeout, it is reported
            # by the next flush (or emit, or close), never dropped silently
            t0 = time.monotonic()
            assert bus.emit("x", 1.5, timeout=0.5) == -1
            with pytest.raises(procwire.Timeout, match=r"1 emitted event\(s\) were not "
                                                       r"published: .*unreachable"):
                bus.flush(timeout=5)
            assert time.monotonic() - t0 < 3
            assert bus.stats()["backend"]["emit_failed"] == 1
        finally:
            os.close(fd)
        assert bus.emit("x", 2, timeout=10, confirm=True) == 0  # a broker again (lock free)


def test_idle_broker_exits_and_cleans_up(brokers: Any) -> None:
    with Bus(brokers.url(idle=0.5)) as bus:
        bus.emit("x")
        pid = brokers.pid()
        assert pid is not None
        time.sleep(1.0)
        assert brokers.alive(pid)  # a connected client keeps it
    assert brokers.wait_gone(pid, 10), "the idle broker did not exit"
    assert not os.path.exists(brokers.path)
    assert not os.path.exists(brokers.path + ".pid")


def _raw_client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _frame(obj: Any) -> bytes:
    payload = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return struct.pack(">I", len(payload)) + payload


def _read_frame(s: socket.socket) -> Any:
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        assert chunk
        body += chunk
    return json.loads(body)


def _until_bye(s: socket.socket) -> Any:
    for _ in range(100_000):  # events (the victim's noise) may come first
        f = _read_frame(s)
        assert f is not None, "closed without a bye"
        if f[0] == "bye":
            return f
    raise AssertionError("no bye")


HELLO = ["hello", 1, "raw", {"pid": 0, "reply_to": "raw", "patterns": ["*"]}]

VICTIM = r"""
import time
from procwire.bus import Bus
with Bus() as bus:
    bus.subscribe("*", maxsize=10, policy="drop_oldest")
    print("ready", flush=True)
    while True:
        bus.emit("noise", "x" * 100)
"""


def test_bad_clients_do_not_disturb_the_others(brokers: Any, children: Any) -> None:
    with Bus() as good_pub, Bus() as good_sub:
        seq = good_sub.subscribe("seq", timeout=10)
        path = brokers.path
        victim = children.python(VICTIM, stdout=subprocess.PIPE)
        assert readline(victim) == "ready"
        n = 0

        def burst(k: int = 50) -> None:
            nonlocal n
            good_pub.emit_many([("seq", n + i) for i in range(k)])
            n += k

        burst()
        # 1. garbage that is not a frame at all (the length field is 'GARB')
        with _raw_client(path) as s:
            s.sendall(b"GARBAGE, not a frame" * 10)
            burst()
        # 2. a valid frame that is not JSON, after a good hello
        with _raw_client(path) as s:
            s.sendall(_frame(HELLO))
            assert _read_frame(s)[0] == "welcome"
            s.sendall(_frame(b"\xff\xfe not json"))
            assert _until_bye(s)[2].startswith("protocol error: not a broker frame")
            burst()
        # 2b. a JSON frame nested deeper than any decoder's recursion limit
        with _raw_client(path) as s:
            s.sendall(_frame(HELLO))
            assert _read_frame(s)[0] == "welcome"
            s.sendall(_frame(b'["pub",1,"x",' + b"[" * 100_000 + b"]" * 100_000 + b"]"))
            assert "nested too deeply" in _until_bye(s)[2]
            burst()
        # 3. an oversized frame (announces 1 GiB)
        with _raw_client(path) as s:
            s.sendall(struct.pack(">I", 1 << 30) + b"x" * 1000)
            assert _read_frame(s) is None  # disconnected
            burst()
        # 4. the first frame is not hello; then a forbidden (reserved) event name
        with _raw_client(path) as s:
            s.sendall(_frame(["pub", 0, "x", 1]))
            assert _read_frame(s)[0] == "bye"
        with _raw_client(path) as s:
            s.sendall(_frame(HELLO))
            assert _read_frame(s)[0] == "welcome"
            s.sendall(_frame(["pub", 1, "procwire.gap", {}]))
            assert "not allowed" in _until_bye(s)[2]
            burst()
        # 5. a hello with a pattern the broker refuses (empty)
        with _raw_client(path) as s:
            s.sendall(_frame(["hello", 1, "raw", {"patterns": [""]}]))
            assert "bad hello" in _until_bye(s)[2]
        # 6. a client killed with SIGKILL in the middle of publishing
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        burst()
        got = [seq.get(10).data for _ in range(n)]
        assert got == list(range(n))  # nothing lost, nothing out of order
        stats = good_pub._backend.broker_stats()  # type: ignore[attr-defined]
        assert stats["totals"]["bad_clients"] >= 6
        buses = [c for c in stats["clients"] if not c["name"].endswith(" requests")]
        assert len(buses) == 2  # only the good ones are left (emit_many's own connection aside)
        with pytest.raises(NoResponder):
            good_pub.request("nobody", timeout=5)


def test_hello_timeout_and_client_limit_in_process(brokers: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker run in this process (its loop on a thread): a client that never says hello is
    told so and dropped; past ``max_clients`` a connection is closed at once; the others are
    served throughout."""
    from procwire.bus import _broker

    monkeypatch.setattr(_broker, "HELLO_TIMEOUT", 0.3)
    broker = _broker.Broker(brokers.path, max_clients=2)
    thread = threading.Thread(target=asyncio.run, args=(broker.run(),), daemon=True)
    thread.start()
    try:
        wait_for(lambda: os.path.exists(brokers.path + ".pid"), what="the broker")
        with _raw_client(brokers.path) as mute:
            t0 = time.monotonic()
            bye = _read_frame(mute)
            assert bye[0] == "bye" and "no hello within 0.3 s" in bye[2]
            assert time.monotonic() - t0 < 3
            assert _read_frame(mute) is None
        with _raw_client(brokers.path) as a, _raw_client(brokers.path) as b:
            for s in (a, b):
                s.sendall(_frame(HELLO))
                assert _read_frame(s)[0] == "welcome"
            with _raw_client(brokers.path) as third:
                assert _read_frame(third) is None  # refused: closed without a word
            a.sendall(_frame(["pub", 7, "x", {"k": 1}]))
            assert _read_frame(a) == ["pub", 7, "x", {"k": 1}]  # a subscribes to "*" too
            assert _read_frame(a) == ["ok", 7, "", 2]
            assert _read_frame(b) == ["pub", 7, "x", {"k": 1}]
        assert broker.refused == 1 and broker.bad_clients == 1
    finally:
        loop = broker._loop
        if loop is not None:
            loop.call_soon_threadsafe(broker.stop)
        thread.join(10)
    assert not thread.is_alive() and not os.path.exists(brokers.path)


def test_slow_subscriber_drop_oldest_then_gap_notice(brokers: Any) -> None:
    with Bus(brokers.url(queue=50)) as slow, Bus() as pub:
        # a full 'block' buffer stops slow's reader thread: the broker's queue for it fills
        stuck = slow.subscribe("big", maxsize=1, policy="block", timeout=10)
        gaps = slow.subscribe("procwire.gap", timeout=10)
        blob = "x" * 4096
        t0 = time.monotonic()
        for _ in range(1000):  # one frame each (pipelined emits would share frames)
            pub.emit("big", blob, confirm=True)
        assert time.monotonic() - t0 < 10  # the publisher was never held up
        st = pub._backend.broker_stats()  # type: ignore[attr-defined]
        (me,) = [c for c in st["clients"] if c["n_patterns"]]
        assert me["dropped"] > 0 and st["totals"]["dropped"] == me["dropped"]
        got = 0
        while True:  # unblock: read everything there is
            try:
                stuck.get(timeout=1)
                got += 1
            except procwire.Timeout:
                break
        assert 0 < got < 1000
        gap = gaps.get(10)
        assert gap.data["reason"] == "slow_consumer" and gap.data["dropped"] > 0


def test_slow_subscriber_disconnect_policy_reconnects(brokers: Any) -> None:
    with Bus(brokers.url(queue=50, policy="disconnect")) as slow, Bus() as pub:
        stuck = slow.subscribe("big", maxsize=1, policy="block", timeout=10)
        gaps = slow.subscribe("procwire.gap", timeout=10)
        for _ in range(1000):  # one frame each
            pub.emit("big", "x" * 4096, confirm=True)
        while True:
            try:
                stuck.get(timeout=1)
            except procwire.Timeout:
                break
        gap = gaps.get(10)
        assert gap.data["reason"] == "dropped_by_server" and "slow" in gap.data["detail"]
        # (more than once when the bus reconnected while the burst was still going on)
        assert slow.stats()["backend"]["server_disconnects"] >= 1
        pub.emit("big", "after")
        assert drain_until(stuck, lambda ev: ev.data == "after")[-1].data == "after"


def _cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "procwire.bus.cli", *args], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_cli_broker_foreground_and_status(brokers: Any) -> None:
    fg = _cli("broker", "--socket", brokers.path)
    try:
        wait_for(lambda: os.path.exists(brokers.path), what="the socket")
        pid = wait_for(brokers.pid, what="the pid file")
        assert pid == fg.pid
        with Bus() as bus:
            bus.subscribe("a.*")
            bus.handle("ping", lambda d: "pong")
            for i in range(10):
                bus.emit("a.b", i)
            bus.flush()
            second = _cli("broker", "--socket", brokers.path)
            out, err = second.communicate(timeout=20)
            assert second.returncode == 3 and "already runs" in err
            st = _cli("broker", "--status", "--json", "--socket", brokers.path)
            out, err = st.communicate(timeout=20)
            assert st.returncode == 0, err
            info = json.loads(out)
            assert info["pid"] == pid and info["totals"]["events_in"] == 10
            (c,) = info["clients"]
            assert c["patterns"] == ["a.*"] and c["handles"] == ["ping"]
            assert c["events_in"] == 10 and c["delivered"] >= 1  # frames (emits share them)
            st = _cli("broker", "--status", "--socket", brokers.path)
            out, err = st.communicate(timeout=20)
            assert st.returncode == 0 and "1 client(s)" in out and "events/s" in out
        fg.send_signal(signal.SIGTERM)
        assert fg.wait(timeout=10) == 0
        assert not os.path.exists(brokers.path)
    finally:
        if fg.poll() is None:
            fg.kill()
        fg.communicate(timeout=10)
    st = _cli("broker", "--status", "--socket", brokers.path)
    out, err = st.communicate(timeout=20)
    assert st.returncode == 1 and "no broker" in err


def _doc_block(first_line: str) -> str:
    text = (ROOT / "docs" / "bus.md").read_text()
    for block in re.findall(r"^```py\n(.*?)^```", text, re.S | re.M):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"docs/bus.md has no block starting with {first_line!r}")


def _sse_client(port: int) -> Any:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    f = s.makefile("rb")
    s.close()  # the file keeps the connection
    head = [f.readline() for _ in range(4)]
    assert head[0].startswith(b"HTTP/1.1 200 OK") and b"text/event-stream" in head[1], head
    assert f.readline() == b": connected\n" and f.readline() == b"\n"
    return f


def _sse_event(f: Any) -> tuple[str, Any]:
    fields = {}
    for _ in range(10):
        line = f.readline()
        assert line, "the SSE server closed the stream"
        if line == b"\n":
            break
        key, _, value = line.decode().rstrip("\n").partition(": ")
        fields[key] = value
    return fields["event"], json.loads(fields["data"])


def test_sse_broadcast_across_workers(children: Any, tmp_path: Path) -> None:
    """The docs' SSE seed scenario, run as written: two worker processes, an SSE client on
    each, one emit from a third process reaches both."""
    script = tmp_path / "sse_server.py"
    script.write_text(_doc_block("# sse_server.py"))
    workers = [children.python(script.read_text(), stdout=subprocess.PIPE) for _ in range(2)]
    ports = []
    for w in workers:
        line = readline(w, 20)
        assert line.startswith("port "), line
        ports.append(int(line.split()[1]))
    conns = [_sse_client(p) for p in ports]
    try:
        emitter = children.python(
            "from procwire.bus import Bus\n"
            "with Bus() as bus:\n"
            "    print(bus.emit('chat.message', {'from': 'ada', 'text': 'hello everyone'},\n"
            "                   confirm=True))\n"
            "    bus.emit('other.topic', 1)\n"
            "    print(bus.emit('chat.bye', None, confirm=True))\n", stdout=subprocess.PIPE)
        assert readline(emitter) == "2" and readline(emitter) == "2"  # both workers
        for s in conns:
            assert _sse_event(s) == ("chat.message", {"from": "ada", "text": "hello everyone"})
            assert _sse_event(s) == ("chat.bye", None)  # other.topic never reached a worker
    finally:
        for s in conns:
            s.close()


def test_batches_in_either_spelling_reach_iterating_subscribers_in_order(brokers: Any) -> None:
    # procwire's own pubs frames are decoded straight into Event tuples, shared by every
    # subscription they go to; a pubs frame spelled otherwise (a raw client's JSON, with
    # spaces) takes the general decoder; both deliver the same events, in order, also to a
    # full 'block' subscription drained by iteration (the reader waits for room, loses none).
    with Bus() as pub, Bus() as sub:
        part = sub.subscribe("t.*", timeout=10)
        every = sub.subscribe("*", timeout=10, maxsize=20, policy="block")
        pub.emit("t.x", -1)  # confirmed: both subscriptions are registered at the broker
        pub.emit_many([("t.x", i) for i in range(100)])  # one name: the shared-list path
        pub.emit_many([("t.y" if i % 3 else "u", i) for i in range(60)])  # mixed names
        s = _raw_client(brokers.path)
        try:
            s.sendall(_frame(HELLO))
            assert _read_frame(s)[0] == "welcome"
            s.sendall(_frame(["pubs", 7, "", [["t.z", i] for i in range(5)]]))
            for _ in range(1000):
                f = _read_frame(s)
                if f[0] != "pubs" and f[0] != "pub":
                    break
            assert f[:2] == ["ok", 7]
        finally:
            s.close()
        pub.emit("t.end", None)

        def drain(it: Any) -> list[tuple[str, Any]]:
            out = []
            for ev in it:
                assert type(ev) is Event
                if ev.name == "t.end":
                    return out
                out.append((ev.name, ev.data))
            raise AssertionError("the subscription ended early")

        mixed = [("t.y" if i % 3 else "u", i) for i in range(60)]
        raw = [("t.z", i) for i in range(5)]
        head = [("t.x", -1), *[("t.x", i) for i in range(100)]]
        assert drain(every) == head + mixed + raw
        assert drain(part) == head + [e for e in mixed if e[0] != "u"] + raw
        assert every.stats()["blocked"] > 0
        assert sub.stats()["backend"]["bad_frames"] == 0
