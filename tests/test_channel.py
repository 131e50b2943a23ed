"""The channel API over the socket transports: addresses, security defaults, retry, close."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import procwire
import procwire.aio as aio


def test_public_names_are_exported() -> None:
    for name in procwire.__all__:
        assert hasattr(procwire, name), name
    for name in ("listen", "connect", "pipe", "Channel", "Listener", "Timeout", "ProcwireError"):
        assert name in procwire.__all__
    assert issubclass(procwire.Timeout, TimeoutError)
    for name in procwire.__all__:
        obj = getattr(procwire, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, procwire.ProcwireError), name


def test_tcp_port_zero_reports_real_address() -> None:
    with procwire.listen("tcp://127.0.0.1:0") as srv:
        host, port = srv.address.rsplit(":", 1)
        assert host == "tcp://127.0.0.1" and int(port) > 0
        with procwire.connect(srv.address, timeout=5) as c, srv.accept(timeout=5) as s:
            c.send({"a": 1})
            assert s.recv(timeout=5) == {"a": 1}
            assert c.remote_address == srv.address


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        srv = procwire.listen("tcp://[::1]:0")
    except procwire.AddressError as exc:
        pytest.skip(f"::1 not configured: {exc}")
    with srv, procwire.connect(srv.address, timeout=5) as c, srv.accept(timeout=5) as s:
        assert srv.address.startswith("tcp://[::1]:")
        c.send("v6")
        assert s.recv(timeout=5) == "v6"


def test_unix_socket_is_0600_in_a_new_0700_folder(sock_dir: str) -> None:
    path = f"{sock_dir}/new/app.sock"
    with procwire.listen(f"unix://{path}"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert not os.path.exists(path)  # removed on close


def test_unix_stale_socket_replaced_live_one_refused(sock_dir: str) -> None:
    path = f"{sock_dir}/app.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: stale
    with procwire.listen(f"unix://{path}"):
        with pytest.raises(procwire.AddressInUse):
            procwire.listen(f"unix://{path}")
    with open(f"{sock_dir}/file", "w"):
        pass
    with pytest.raises(procwire.AddressInUse, match="not a socket"):
        procwire.listen(f"unix://{sock_dir}/file")


def test_unix_abstract_name() -> None:
    name = f"procwire-test-{os.getpid()}"
    with procwire.listen(f"unix://@{name}") as srv:
        assert srv.address == f"unix://@{name}"
        with procwire.connect(srv.address, timeout=5) as c, srv.accept(timeout=5) as s:
            s.send("abstract")
            assert c.recv(timeout=5) == "abstract"


def test_connect_refused_and_retry(sock_dir: str) -> None:
    url = f"unix://{sock_dir}/later.sock"
    with pytest.raises(procwire.ConnectionRefused):
        procwire.connect(url, timeout=1)
    t0 = time.monotonic()
    with pytest.raises(procwire.ConnectionRefused, match="gave up"):
        procwire.connect(url, timeout=0.3, retry=True)
    assert time.monotonic() - t0 < 5
    holder: dict[str, Any] = {}

    def start_later() -> None:
        time.sleep(0.3)
        holder["srv"] = procwire.listen(url)

    t = threading.Thread(target=start_later)
    t.start()
    try:
        with procwire.connect(url, timeout=10, retry=True) as c:
            t.join()
            with holder["srv"].accept(timeout=5) as s:
                c.send("made it")
                assert s.recv(timeout=5) == "made it"
    finally:
        t.join()
        if "srv" in holder:
            holder["srv"].close()


def test_security_defaults() -> None:
    with pytest.raises(procwire.InsecureError, match="pickle"):
        procwire.listen("tcp://127.0.0.1:0", codec="pickle")
    with pytest.raises(procwire.InsecureError, match="pickle"):
        procwire.connect("tcp://127.0.0.1:9", codec="pickle")
    # Only the decision is tested: nothing is ever sent to a non-loopback address.
    with pytest.raises(procwire.InsecureError, match="non-loopback"):
        procwire.listen("tcp://0.0.0.0:0")
    a, b = procwire.pipe(codec="pickle")  # local: allowed
    with a, b:
        a.send({1, 2})
        assert b.recv(timeout=5) == {1, 2}


def test_recv_timeout_keeps_channel_usable() -> None:
    a, b = procwire.pipe()
    with a, b:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            b.recv(timeout=0.1)
        assert time.monotonic() - t0 < 5
        a.send("after")
        assert b.recv(timeout=5) == "after"


def test_bad_urls() -> None:
    for url in ("nope://x", "tcp://127.0.0.1", "tcp://:5", "unix://", "127.0.0.1:80"):
        with pytest.raises(procwire.AddressError):
            procwire.connect(url, timeout=1)


def test_unencodable_message_sends_nothing() -> None:
    a, b = procwire.pipe()
    with a, b:
        with pytest.raises(procwire.EncodeError):
            a.send(object())
        a.send("next")
        assert b.recv(timeout=5) == "next"


SLOW_READER = """
import sys, time, procwire
srv = procwire.listen(sys.argv[1])
print("listening", flush=True)
ch = srv.accept(timeout=20)
time.sleep(0.5)  # let the sender's buffers fill up and its close() start
n = 0
for msg in ch:
    assert msg == n, (msg, n)
    n += 1
print(n, flush=True)
"""


def test_close_never_loses_buffered_messages(sock_dir: str, children: Any) -> None:
    import subprocess

    url = f"unix://{sock_dir}/slow.sock"
    proc = children.python(SLOW_READER, url, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"listening\n"
    ch = procwire.connect(url, timeout=10)
    total = 200_000
    for i in range(total):
        ch.send(i)  # far more than the kernel buffers hold: most are queued in user space
    ch.close(timeout=30)
    assert proc.stdout.readline() == f"{total}\n".encode()
    assert proc.wait(timeout=20) == 0


def test_write_buffer_is_bounded_and_send_times_out() -> None:
    a, b = procwire.pipe(codec="raw", write_buffer=64 * 1024)
    with a, b:
        with pytest.raises(procwire.Timeout, match="not reading"):
            for _ in range(100_000):  # b never reads
                a.send(b"x" * 1024, timeout=0.2)


def test_async_api_round_trip_and_iteration(sock_dir: str) -> None:
    async def main() -> None:
        srv = await aio.listen(f"unix://{sock_dir}/a.sock")
        async with srv:
            c = await aio.connect(srv.address, timeout=5)
            s = await srv.accept(timeout=5)
            for i in range(1000):
                await c.send(i)
            await c.close()
            got = [m async for m in s]
            assert got == list(range(1000))
            x, y = await aio.pipe()
            with pytest.raises(procwire.Timeout):
                await x.recv(timeout=0.05)
            await x.close()
            await y.close()
            await s.close()

    asyncio.run(main())


def test_channel_after_fork_is_refused_in_child_and_intact_in_parent() -> None:
    a, b = procwire.pipe()
    with a, b:
        a.send("before")
        pid = os.fork()
        if pid == 0:  # child: the inherited channel must refuse, and closing it is harmless
            code = 1
            try:
                try:
                    b.recv(timeout=1)
                except procwire.ProcwireError as exc:
                    code = 0 if "fork" in str(exc) else 2
                b.close()
                a.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert b.recv(timeout=5) == "before"  # the parent's channel still works
        a.send("after")
        assert b.recv(timeout=5) == "after"


def test_refused_second_listener_does_not_disturb_the_first(sock_dir: str) -> None:
    url = f"unix://{sock_dir}/busy.sock"
    with procwire.listen(url) as srv:
        with pytest.raises(procwire.AddressInUse):
            procwire.listen(url)
        with pytest.raises(procwire.Timeout):  # no phantom client was left in the queue
            srv.accept(timeout=0.2)


def test_close_reports_undeliverable_messages() -> None:
    a, b = procwire.pipe(codec="raw")
    with b:
        for _ in range(2000):  # b never reads: most of this stays queued in user space
            a.send(b"x" * 1024)
        with pytest.raises(procwire.Timeout, match="not delivered"):
            a.close(timeout=0.2)
        assert a.closed
        with pytest.raises(procwire.ChannelClosed):
            a.send(b"more")


def test_a_send_loop_is_coalesced_and_a_request_reply_is_not() -> None:
    a, b = procwire.pipe()
    with a, b:
        for i in range(20_000):  # a plain loop of send() calls
            a.send({"i": i})
        got = 0
        while got < 20_000:
            b.recv(timeout=10)
            got += 1
        a.flush(timeout=10)
        burst = a.stats()
        assert burst["messages"] == 20_000
        assert burst["writes"] < 20_000 / 10, burst  # many messages per write
        for i in range(200):  # request/reply: each message written at once, alone
            a.send(i)
            assert b.recv(timeout=5) == i
            b.send(i)
            assert a.recv(timeout=5) == i
        after = a.stats()
        assert after["writes"] - burst["writes"] == 200


def test_import_procwire_loads_the_patterns_only_when_used() -> None:
    code = ("import sys, procwire\n"
            "heavy = ('procwire.bus', 'procwire.queue', 'procwire.cluster', 'procwire.process')\n"
            "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
            "procwire.Queue\n"
            "print('procwire.queue' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout.splitlines()
    assert out == ["[]", "True"]
