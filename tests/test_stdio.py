"""``stdio://`` and ``open_pipes``: JSON lines with real child processes over their pipes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import textwrap
import threading
from typing import Any

import pytest

import procwire
import procwire.aio as aio
from procwire import AddressError, ConnectionClosed, DecodeError, EncodeError
from procwire.codecs import get_codec
from procwire.transports.stdio import aopen_pipes, open_pipes

Children = Any  # tests/conftest.py's fixture object (a module tests do not import)

ECHO = textwrap.dedent("""
    import procwire
    ch = procwire.connect("stdio://")
    print("a stray print")            # goes to stderr, not into the message stream
    for msg in ch:
        ch.send(msg)
    ch.close()
""")


def start(children: Children, code: str) -> subprocess.Popen[bytes]:
    return children.python(code, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)


def fds_of(proc: subprocess.Popen[bytes]) -> tuple[int, int]:
    """Our own copies of the child's stdout (to read) and stdin (to write) pipe ends."""
    assert proc.stdout is not None and proc.stdin is not None
    fds = os.dup(proc.stdout.fileno()), os.dup(proc.stdin.fileno())
    proc.stdout.close()
    proc.stdin.close()
    return fds


def channel_to(proc: subprocess.Popen[bytes], codec: str = "json") -> procwire.Channel:
    return procwire.Channel(open_pipes(*fds_of(proc)), get_codec(codec))


def stderr_of(proc: subprocess.Popen[bytes]) -> str:
    proc.wait(timeout=10)
    assert proc.stderr is not None
    return proc.stderr.read().decode()


def test_round_trip_unicode_big_and_burst(children: Children) -> None:
    proc = start(children, ECHO)
    ch = channel_to(proc)
    try:
        tricky = {"s": "line\nbreak \u2028 \u2029 \"q\" \\ \u00e9 \U0001f600", "n": [1, 2.5, None]}
        ch.send(tricky)
        assert ch.recv(timeout=10) == tricky
        big = {"data": "x" * (1 << 20)}
        ch.send(big)
        assert ch.recv(timeout=10) == big
        for i in range(10_000):
            ch.send(i)
        assert [ch.recv(timeout=10) for _ in range(10_000)] == list(range(10_000))
    finally:
        ch.close()
    assert proc.wait(timeout=10) == 0
    assert "a stray print" in stderr_of(proc)


def test_child_exit_is_connection_closed(children: Children) -> None:
    proc = start(children, textwrap.dedent("""
        import procwire
        ch = procwire.connect("stdio://")
        try:
            procwire.connect("stdio://")
        except procwire.AddressError:
            ch.send("one stdio channel per process")
        ch.send({"last": "words"})
        ch.close()
    """))
    ch = channel_to(proc)
    try:
        assert ch.recv(timeout=10) == "one stdio channel per process"
        assert ch.recv(timeout=10) == {"last": "words"}
        with pytest.raises(ConnectionClosed):
            ch.recv(timeout=10)
    finally:
        ch.close()


def test_print_in_child_does_not_corrupt_stream(children: Children) -> None:
    proc = start(children, textwrap.dedent("""
        import os, sys, subprocess
        import procwire
        ch = procwire.connect("stdio://")
        for i in range(100):
            print("noise", i)
            sys.stdout.write("more noise\\n")
            ch.send({"i": i})
        os.write(1, b"raw fd 1 noise\\n")
        subprocess.run([sys.executable, "-c", "print('grandchild noise')"], check=True)
        ch.send("done")
        ch.close()
    """))
    ch = channel_to(proc)
    try:
        assert [ch.recv(timeout=10) for _ in range(100)] == [{"i": i} for i in range(100)]
        assert ch.recv(timeout=10) == "done"
        with pytest.raises(ConnectionClosed):
            ch.recv(timeout=10)
    finally:
        ch.close()
    err = stderr_of(proc)
    for text in ("noise 99", "raw fd 1 noise", "grandchild noise"):
        assert text in err


NAIVE = textwrap.dedent("""
    import json, sys
    sys.stdout.write(json.dumps({"id": 1}))       # no newline, then wait for the reply
    sys.stdout.flush()
    reply = json.loads(sys.stdin.readline())
    sys.stdout.write('{"a":1}{"b":2}[3]"x" 4 ')    # back to back
    sys.stdout.write(json.dumps({"got": reply}))
    sys.stdout.flush()
    sys.stdin.read()                               # until the parent closes
""")


def test_naive_child_without_newlines(children: Children) -> None:
    proc = start(children, NAIVE)
    ch = channel_to(proc)
    try:
        assert ch.recv(timeout=10) == {"id": 1}   # delivered with no newline after it
        ch.send({"ok": True})
        got = [ch.recv(timeout=10) for _ in range(6)]
        assert got == [{"a": 1}, {"b": 2}, [3], "x", 4, {"got": {"ok": True}}]
    finally:
        ch.close()
    assert proc.wait(timeout=10) == 0


def test_garbage_line_is_decode_error_then_next_line(children: Children) -> None:
    proc = start(children, textwrap.dedent("""
        import sys
        sys.stdout.write('{"before":1}\\nTraceback (most recent call last): oops\\n'
                         '{"after":2}\\n')
        sys.stdout.flush()
    """))
    ch = channel_to(proc)
    try:
        assert ch.recv(timeout=10) == {"before": 1}
        with pytest.raises(DecodeError) as info:
            ch.recv(timeout=10)
        assert info.value.payload.startswith(b"Traceback")
        assert ch.recv(timeout=10) == {"after": 2}
        with pytest.raises(ConnectionClosed):
            ch.recv(timeout=10)
    finally:
        ch.close()


def test_local_close_wakes_blocked_receiver(children: Children) -> None:
    proc = start(children, ECHO)
    ch = channel_to(proc)
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            ch.recv(timeout=30)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    try:
        t.join(0.2)
    finally:
        ch.close()
        t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], procwire.ChannelClosed), errors
    assert proc.wait(timeout=10) == 0, stderr_of(proc)  # the child saw end of input


def test_raw_newline_is_refused_and_channel_goes_on(children: Children) -> None:
    proc = start(children, ECHO)
    ch = channel_to(proc, codec="raw")
    try:
        with pytest.raises(EncodeError):
            ch.send(b'"two\nlines"')
        ch.send(b'"one line"')
        assert ch.recv(timeout=10) == b'"one line"'
    finally:
        ch.close()


def test_addresses() -> None:
    with pytest.raises(AddressError):
        procwire.listen("stdio://")
    with pytest.raises(AddressError):
        procwire.connect("stdio://somewhere")


def test_pipes_in_one_process() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    a = procwire.Channel(open_pipes(r1, w2), get_codec("json"))
    b = procwire.Channel(open_pipes(r2, w1), get_codec("json"))
    try:
        a.send({"x": 1})
        assert b.recv(timeout=5) == {"x": 1}
        b.send([2])
        assert a.recv(timeout=5) == [2]
        with pytest.raises(procwire.Timeout):
            a.recv(timeout=0.05)
    finally:
        a.close()
        b.close()


def test_async_round_trip_and_eof(children: Children) -> None:
    async def main() -> None:
        proc = start(children, ECHO)
        ch = aio.Channel(await aopen_pipes(*fds_of(proc)), get_codec("json"))
        try:
            msg = {"s": "\u2028\n", "n": 1}
            await ch.send(msg)
            assert await ch.recv(timeout=10) == msg
            big = "y" * (1 << 20)
            await ch.send(big)
            assert await ch.recv(timeout=10) == big
            for i in range(10_000):
                await ch.send(i)
            assert [await ch.recv(timeout=10) for _ in range(10_000)] == list(range(10_000))
        finally:
            await ch.close()
        await asyncio.sleep(0)  # asyncio closes the pipe on the next loop iteration
        assert await asyncio.to_thread(proc.wait, 10) == 0

        proc = start(children, 'import procwire; procwire.connect("stdio://").send("bye")')
        ch = aio.Channel(await aopen_pipes(*fds_of(proc)), get_codec("json"))
        try:
            assert await ch.recv(timeout=10) == "bye"
            with pytest.raises(ConnectionClosed):
                await ch.recv(timeout=10)
        finally:
            await ch.close()

    asyncio.run(main())


def test_async_stdio_child(children: Children) -> None:
    proc = start(children, textwrap.dedent("""
        import asyncio, procwire.aio as aio
        async def main():
            ch = await aio.connect("stdio://")
            print("stray")
            async for msg in ch:
                await ch.send({"echo": msg})
            await ch.close()
        asyncio.run(main())
    """))
    ch = channel_to(proc)
    try:
        for i in range(100):
            ch.send(i)
        assert [ch.recv(timeout=10) for _ in range(100)] == [{"echo": i} for i in range(100)]
    finally:
        ch.close()
    assert proc.wait(timeout=10) == 0
    assert "stray" in stderr_of(proc)
