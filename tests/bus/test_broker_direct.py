"""The local broker's direct request path (``procwire/bus/_direct.py``): a requester whose
request name has exactly one handling bus gets that bus's socket from the broker and sends its
next requests there itself. Real processes, a private broker (the ``brokers`` fixture)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Any

import pytest

import procwire
from procwire.bus import AsyncBus, Bus, NoResponder, RemoteError

from .test_broker import readline, wait_for

RESPONDER = r"""
import os, sys, time
from procwire.bus import Bus
bus = Bus()
def echo(d):
    if d == "slow":
        print("handling", flush=True)
        time.sleep(30)
    return [os.getpid(), d]
bus.handle("echo", echo)
print("ready", bus._backend._direct.path, flush=True)
sys.stdin.read()
bus.close()
"""


def direct_files(brokers: Any) -> list[str]:
    folder = os.path.dirname(brokers.path)
    return sorted(f for f in os.listdir(folder) if f.startswith(".pw-rr-"))


def backend(bus: Bus) -> dict[str, Any]:
    st: dict[str, Any] = bus.stats()["backend"]
    return st


def test_requests_go_straight_to_the_one_handler(brokers: Any, children: Any) -> None:
    child = children.python(RESPONDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ready, path = readline(child).split()
    assert ready == "ready" and os.path.basename(path).startswith(".pw-rr-")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    with Bus() as bus:
        assert bus.request("echo", 0, timeout=5) == [child.pid, 0]  # via the broker
        for i in range(1, 20):
            assert bus.request("echo", i, timeout=5) == [child.pid, i]
        st = backend(bus)
        assert st["requests_direct"] == 1 and st["requests_peer"] == 19
        assert st["peer_fallbacks"] == 0
        totals = bus._backend.broker_stats()["totals"]  # type: ignore[attr-defined]
        assert totals["requests"] == 1 and totals["routes_given"] == 1
        # A handler that raises, or whose reply cannot be sent, on the direct path too.
        child2_code = RESPONDER.replace('bus.handle("echo", echo)', '''
bus.handle("echo", echo)
def bad(d):
    if d == "raise":
        raise KeyError("nope")
    return object() if d == "obj" else "x" * 3_000_000
bus.handle("bad", bad)''')
        child2 = children.python(child2_code, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert readline(child2).startswith("ready")
        with pytest.raises(RemoteError) as info:
            bus.request("bad", "raise", timeout=5)  # via the broker: the route comes back
        assert info.value.type == "KeyError"
        for what, kind in [("raise", "KeyError"), ("obj", "EncodeError"),
                           ("big", "MessageTooLarge")]:
            with pytest.raises(RemoteError) as info:
                bus.request("bad", what, timeout=5)
            assert info.value.type == kind
        assert backend(bus)["requests_peer"] == 22
    child.stdin.close()
    child2.stdin.close()
    assert child.wait(10) == 0 and child2.wait(10) == 0
    assert direct_files(brokers) == []  # each removed its socket when it closed


def test_a_second_handler_withdraws_the_route_and_turns_resume(brokers: Any,
                                                               children: Any) -> None:
    """Several handlers: every request goes through the broker, in turn; one left: direct
    again. A bus that stops handling a name answers "moved" and nothing runs twice."""
    a = children.python(RESPONDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert readline(a).startswith("ready")
    with Bus() as bus, Bus() as other:
        for i in range(5):
            bus.request("echo", i, timeout=5)
        assert backend(bus)["requests_peer"] == 4
        other.handle("echo", lambda d: ["other", d])
        answers = [bus.request("echo", i, timeout=5)[0] for i in range(8)]
        # (the withdrawal may come one request late: at most one went straight to a)
        assert answers.count("other") >= 3 and answers.count(a.pid) >= 3
        peer_before = backend(bus)["requests_peer"]
        assert peer_before <= 5
        other.unhandle("echo")
        other._backend.broker_stats()  # type: ignore[attr-defined]  # the broker has it now
        answers = [bus.request("echo", i, timeout=5)[0] for i in range(6)]
        assert answers == [a.pid] * 6
        assert backend(bus)["requests_peer"] >= peer_before + 4  # direct again

        # The only handler is this process's own bus: it unhandles; requests already routed
        # to it are answered "moved" and go through the broker (which says nobody handles it).
        a.stdin.close()
        assert a.wait(10) == 0
        other.handle("echo", lambda d: ["other", d])
        assert [bus.request("echo", i, timeout=5)[0] for i in range(4)] == ["other"] * 4
        direct = other._backend._direct  # type: ignore[attr-defined]
        served_before = direct.served
        assert served_before >= 2
        other._core.remove_responder("echo")  # the handler goes, the broker still routes
        with pytest.raises((NoResponder, procwire.Timeout)):
            bus.request("echo", 1, timeout=1)
        assert direct.moved >= 1 and direct.served == served_before
        assert backend(bus)["peer_fallbacks"] >= 1


def test_handler_killed_mid_request_is_reported_at_once(brokers: Any, children: Any) -> None:
    """The answering process dies while its handler runs: the requester gets
    ConnectionClosed right away (the handler may have run: no resend), not a timeout; the
    broker removes the dead bus's socket file; the next request finds no responder."""
    child = children.python(RESPONDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    _, path = readline(child).split()
    with Bus() as bus:
        bus.request("echo", 0, timeout=5)
        assert bus.request("echo", 1, timeout=5) == [child.pid, 1]  # direct now
        errors: list[BaseException] = []

        def call() -> None:
            try:
                bus.request("echo", "slow", timeout=30)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=call)
        t.start()
        assert readline(child) == "handling"
        t0 = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        t.join(10)
        assert not t.is_alive() and time.monotonic() - t0 < 5
        assert isinstance(errors[0], procwire.ConnectionClosed), errors
        assert "may have run" in str(errors[0])
        child.wait(10)
        wait_for(lambda: not os.path.exists(path), what="the broker removing the socket")
        with pytest.raises(NoResponder):
            bus.request("echo", 2, timeout=5)


def test_handlers_of_one_bus_never_run_at_once(brokers: Any) -> None:
    """Requests reach a bus's handlers straight (one thread per requester) and through the
    broker (the requests dispatcher); one handler runs at a time all the same."""
    active = [0]
    peak = [0]
    lock = threading.Lock()

    def handler(d: Any) -> Any:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.002)
        with lock:
            active[0] -= 1
        return d

    with Bus() as server:
        server.handle("h", handler)
        server.handle("h2", lambda d: handler(d))
        requesters = [Bus() for _ in range(3)]
        try:
            def work(bus: Bus, name: str) -> None:
                for i in range(25):
                    assert bus.request(name, i, timeout=10) == i

            threads = [threading.Thread(target=work, args=(b, n))
                       for b in requesters for n in ("h", "h2")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
        finally:
            for b in requesters:
                b.close()
        st = backend(server)
        assert peak[0] == 1
        assert st["direct_served"] > 0  # some came straight ...
        assert server.stats()["requests_served"] == 150  # ... all were answered once


def test_garbage_on_the_direct_socket_closes_only_that_connection(brokers: Any) -> None:
    with Bus() as server, Bus() as client:
        server.handle("echo", lambda d: d)
        path = server._backend._direct.path  # type: ignore[attr-defined]
        client.request("echo", 0, timeout=5)
        assert client.request("echo", 1, timeout=5) == 1  # direct
        for junk in (b"\x00\x00\x00\x05hello",  # not JSON
                     b"\x00\x00\x00\x0a[\"pub\",0,\"x\",1]"[:14],  # truncated, then closed
                     struct.pack(">I", 10) + b'["pub",0,"x",1]'[:10],  # not a request
                     struct.pack(">I", 1 << 30) + b"xx"):  # over the frame limit
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(path)
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b""  # closed without an answer
            s.close()
        assert client.request("echo", 2, timeout=5) == 2
        assert backend(client)["requests_peer"] == 2
        wait_for(lambda: backend(server)["direct_connections"] == 1, what="junk conns gone")


def test_the_broker_ignores_a_direct_path_outside_its_folder(brokers: Any) -> None:
    """A direct socket path elsewhere is not taken (no route to it; never removed), and the
    bus that named it keeps working through the broker."""
    from procwire.bus._local import connect_broker
    from procwire.bus._paths import BrokerFiles
    from procwire.bus._wire import VERSION, encode_frame

    elsewhere = os.path.join(os.path.dirname(brokers.path) + "-x", ".pw-rr-1-aa.sock")
    with Bus() as bus:  # starts the broker
        ch = connect_broker(BrokerFiles(brokers.path), timeout=5, autostart=False)
        try:
            ch.send(encode_frame("hello", 1, "odd", {
                "pid": os.getpid(), "channel": "procwire", "version": VERSION,
                "reply_to": "odd", "direct": elsewhere, "handles": ["odd"]}), timeout=5)
            assert ch.recv(timeout=5).kind == "welcome"
            with pytest.raises(procwire.Timeout):  # it got the request (and never answers)
                bus.request("odd", 1, timeout=0.5)
            f = ch.recv(timeout=5)
            assert f.kind == "req" and f.name == "odd"
        finally:
            ch.close(0)
        totals = bus._backend.broker_stats()["totals"]  # type: ignore[attr-defined]
        assert totals["bad_direct"] == 1 and totals["routes_given"] == 0
        assert totals["bad_clients"] == 0


def test_a_bus_reaching_the_broker_through_a_symlink(brokers: Any) -> None:
    folder = os.path.dirname(brokers.path)
    link = folder + "-ln"
    os.symlink(folder, link)
    try:
        with Bus() as bus, Bus("broker://" + os.path.join(link, "b.sock")) as other:
            other.handle("via", lambda d: d)
            assert [bus.request("via", i, timeout=5) for i in range(3)] == [0, 1, 2]
            assert backend(bus)["requests_peer"] == 2
            totals = bus._backend.broker_stats()["totals"]  # type: ignore[attr-defined]
            assert totals["bad_direct"] == 0
    finally:
        os.unlink(link)


def test_more_requesters_than_connections(brokers: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_CONNECTIONS requesters, the answering bus says "moved" (nothing ran) and the
    request goes through the broker: every request answered once, no error."""
    import procwire.bus._direct as direct_mod

    monkeypatch.setattr(direct_mod, "MAX_CONNECTIONS", 2)
    runs = []
    with Bus() as server:
        server.handle("n", lambda d: runs.append(d) or d)
        buses = [Bus() for _ in range(4)]
        try:
            for rnd in range(4):
                for k, b in enumerate(buses):
                    assert b.request("n", [rnd, k], timeout=5) == [rnd, k]
            assert sum(backend(b)["requests_peer"] for b in buses) >= 6
            assert backend(server)["direct_refused"] >= 1
            assert backend(server)["direct_connections"] <= 2
        finally:
            for b in buses:
                b.close()
    assert sorted(runs) == sorted([rnd, k] for rnd in range(4) for k in range(4))


def test_close_lets_a_direct_request_finish(brokers: Any) -> None:
    got: list[Any] = []
    started = threading.Event()

    def slow(d: Any) -> Any:
        started.set()
        time.sleep(0.4)
        return d

    server = Bus()
    server.handle("slow", slow)
    with Bus() as client:
        client.request("slow", 0, timeout=5)
        started.clear()
        t = threading.Thread(target=lambda: got.append(client.request("slow", 1, timeout=5)))
        t.start()
        assert started.wait(5)
        assert backend(client)["requests_peer"] == 1
        server.close()
        t.join(5)
        assert got == [1]
    assert direct_files(brokers) == []


def test_replies_as_large_as_through_the_broker(brokers: Any) -> None:
    """The direct path takes the frames a broker connection takes (a requester's own
    max_message_size limits what it sends, not what it gets)."""
    with Bus() as server, Bus(max_message_size=64 << 10) as client:
        server.handle("big", lambda n: "x" * n)
        for _ in range(3):
            assert len(client.request("big", 500_000, timeout=10)) == 500_000
        assert backend(client)["requests_peer"] == 2


def test_the_broker_removes_sockets_of_buses_that_died_while_it_was_down(brokers: Any) -> None:
    folder = os.path.dirname(brokers.path)
    stale = os.path.join(folder, ".pw-rr-1-dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.listen(1)
    s.close()  # the file stays, nothing listens
    plain = os.path.join(folder, ".pw-rr-not-a-socket")
    with open(plain, "w"):
        pass
    with Bus() as bus:  # starts a broker: it sweeps
        bus.handle("x", lambda d: d)
        wait_for(lambda: not os.path.exists(stale), what="the stale socket removed")
        assert os.path.exists(plain)  # not a socket: left alone
        assert len(direct_files(brokers)) == 2  # the plain file and bus's own socket


def test_no_direct_path_in_a_folder_others_may_write(children: Any) -> None:
    import tempfile

    folder = tempfile.mkdtemp(prefix="pwsh-")
    os.chmod(folder, 0o1777)  # like /tmp
    url = "broker://" + os.path.join(folder, "b.sock")
    try:
        with Bus(url) as server, Bus(url) as client:
            server.handle("e", lambda d: d)
            assert [client.request("e", i, timeout=5) for i in range(3)] == [0, 1, 2]
            assert server._backend._direct is None  # type: ignore[attr-defined]
            assert backend(client)["requests_peer"] == 0
            pid = client._backend.broker["broker_pid"]  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(os.path.join(folder, "b.sock")))
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_asyncio_buses_go_through_the_broker(brokers: Any) -> None:
    import asyncio

    async def main() -> None:
        async with AsyncBus() as abus:
            await abus.handle("a", lambda d: d * 2)
            with Bus() as bus:
                def ask() -> list[Any]:  # off the loop: the loop runs the handler
                    return [bus.request("a", i, timeout=5) for i in range(4)]

                assert await asyncio.to_thread(ask) == [0, 2, 4, 6]
                assert backend(bus)["requests_peer"] == 0  # an asyncio bus has no socket
                bus.handle("b", lambda d: d + 1)
                assert [await abus.request("b", i, timeout=5) for i in range(4)] == [1, 2, 3, 4]
            assert abus.stats()["backend"]["requests_peer"] == 0

    asyncio.run(main())


def test_broker_killed_while_requests_go_straight(brokers: Any, children: Any) -> None:
    """SIGKILL the broker: the requester's next request goes through the new broker (started
    by a bus reconnecting), which learns the handling bus's socket again from its hello and
    gives the route back; the new broker's sweep leaves that live socket alone."""
    child = children.python(RESPONDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    _, path = readline(child).split()
    with Bus() as bus:
        for i in range(3):
            assert bus.request("echo", i, timeout=5) == [child.pid, i]
        old = brokers.pid()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: brokers.pid() not in (None, old), timeout=20, what="a new broker")
        deadline = time.monotonic() + 20
        while True:  # until the responder has registered again with the new broker
            try:
                assert bus.request("echo", "x", timeout=2) == [child.pid, "x"]
                break
            except (NoResponder, procwire.Timeout, procwire.ConnectionClosed):
                assert time.monotonic() < deadline, "no answer through the new broker"
                time.sleep(0.05)
        before = backend(bus)["requests_peer"]
        for i in range(3):
            assert bus.request("echo", i, timeout=5) == [child.pid, i]
        assert backend(bus)["requests_peer"] >= before + 2  # straight again
        assert os.path.exists(path)
    child.stdin.close()
    assert child.wait(10) == 0
    assert not os.path.exists(path)


def test_accept_thread_failure_sends_requests_through_the_broker(brokers: Any) -> None:
    """The direct socket breaks for good (here: its listening socket closed under it): the
    socket file goes, and requests go through the broker, answered, not into a backlog."""
    with Bus() as server, Bus() as client:
        server.handle("e", lambda d: d)
        direct = server._backend._direct  # type: ignore[attr-defined]
        client.request("e", 0, timeout=5)
        assert client.request("e", 1, timeout=5) == 1
        client._backend._drop_peer(direct.path)  # type: ignore[attr-defined]
        direct._listener._backend._sock.close()  # accept() now fails with EBADF
        wait_for(lambda: not direct._thread.is_alive(), what="the accept thread ending")
        assert not os.path.exists(direct.path)
        t0 = time.monotonic()
        assert [client.request("e", i, timeout=5) for i in range(5)] == list(range(5))
        assert time.monotonic() - t0 < 4


def test_a_handler_that_closes_its_own_bus(brokers: Any) -> None:
    """A handler (on the direct path) closes its bus with timeout=None while a request that
    came through the broker waits for the handler lock: no deadlock; the handler's own
    requester gets its reply."""
    server = Bus()
    entered = threading.Event()

    def shutdown(d: Any) -> Any:
        if d == "warm":
            return "ok"
        entered.set()
        time.sleep(0.3)  # the other request arrives and waits for the handler lock
        server.close(timeout=None)
        return "bye"

    server.handle("shutdown", shutdown)
    server.handle("other", lambda d: d)
    results: dict[str, Any] = {}
    with Bus() as a, Bus(brokers.url(direct=0)) as b:
        assert a.request("shutdown", "warm", timeout=5) == "ok"  # a gets the route

        def ask_b() -> None:
            assert entered.wait(5)
            try:
                results["b"] = b.request("other", 2, timeout=3)
            except Exception as exc:
                results["b"] = exc

        tb = threading.Thread(target=ask_b)
        tb.start()
        t0 = time.monotonic()
        results["a"] = a.request("shutdown", None, timeout=10)
        assert results["a"] == "bye" and time.monotonic() - t0 < 8
        tb.join(15)
        assert not tb.is_alive()  # (b's request reached a closing bus: answered or not,
        assert "b" in results     # it ends within its timeout)
        assert backend(a)["requests_peer"] == 1 and backend(b)["requests_peer"] == 0
    assert server.closed


def test_closing_the_answering_bus_under_load(brokers: Any) -> None:
    """Requesters keep asking while the answering bus closes: every request is answered or
    gets NoResponder; none is reported lost (nothing that did not run is called
    ConnectionClosed) and none times out."""
    server = Bus()
    server.handle("w", lambda d: d)
    clients = [Bus() for _ in range(3)]
    errors: list[BaseException] = []
    answered = [0]
    stop = threading.Event()

    def work(bus: Bus) -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                bus.request("w", 1, timeout=3)
                answered[0] += 1
            except NoResponder:
                time.sleep(0.005)
            except Exception as exc:
                errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(b,)) for b in clients]
        for t in threads:
            t.start()
        wait_for(lambda: answered[0] > 100, what="requests flowing")
        server.close()
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(20)
        assert not errors, errors[:3]
        assert sum(backend(b)["requests_peer"] for b in clients) > 50
    finally:
        stop.set()
        for b in clients:
            b.close()


def test_direct_0_keeps_handlers_on_the_dispatcher_thread(brokers: Any) -> None:
    threads: set[str] = set()

    def h(d: Any) -> Any:
        threads.add(threading.current_thread().name)
        return d

    with Bus(brokers.url(direct=0)) as server, Bus() as c1, Bus() as c2:
        server.handle("h", h)
        assert server._backend._direct is None  # type: ignore[attr-defined]
        for i in range(4):
            assert c1.request("h", i, timeout=5) == i and c2.request("h", i, timeout=5) == i
        assert threads == {"procwire-bus-requests"}
        assert backend(c1)["requests_peer"] == 0


def test_after_a_failed_connect_requests_go_straight_again(brokers: Any) -> None:
    """A requester that could not reach the answering bus goes through the broker for a
    while, then straight again, even when it keeps requesting all along."""
    with Bus() as server, Bus() as client:
        server.handle("e", lambda d: d)
        client.request("e", 0, timeout=5)
        client.request("e", 1, timeout=5)
        be = client._backend  # type: ignore[attr-defined]
        path = server._backend._direct.path  # type: ignore[attr-defined]
        be._drop_peer(path)
        be._peer_retry[path] = time.monotonic() + 0.3  # as after a failed connect
        before = be.requests_peer
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            client.request("e", 2, timeout=5)
        assert be.requests_peer > before + 10
