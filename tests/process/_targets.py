"""Functions run in child interpreters by spawn(fn, *args) in the tests."""

from __future__ import annotations

import os
import socket
import sys
import time

import procwire.process as pp

#: Not a function: spawn("..._targets:VALUE") is a start failure.
VALUE = 42


def echo() -> None:
    """Echo every message back until the parent closes the channel."""
    ch = pp.parent()
    for msg in ch:
        ch.send(msg)


def add(a: int, b: int) -> None:
    pp.parent().send({"sum": a + b, "pid": os.getpid()})


def exit_with(code: int) -> None:
    pp.parent().send({"bye": code})
    sys.exit(code)


def fail() -> None:
    raise RuntimeError("boom from the child")


def stderr_then_exit() -> None:
    sys.stderr.write("child-stderr-line\n")
    sys.stderr.flush()


def burst(n: int) -> None:
    ch = pp.parent()
    for i in range(n):
        ch.send({"i": i})


def serve_handle() -> None:
    """Receive a listening socket, accept one connection on it, answer and report."""
    ch = pp.parent()
    msg, handle = ch.recv_with_handle(timeout=10)
    assert isinstance(handle, socket.socket)
    handle.settimeout(10)
    conn, _ = handle.accept()
    with conn:
        conn.sendall(b"hello from " + str(os.getpid()).encode())
    handle.close()
    ch.send({"served": msg})


def watch_parent(report: str = "") -> None:
    """Report the parent's death: recv raises ConnectionClosed; write ``report``, exit 7."""
    ch = pp.parent()
    ch.send("ready")
    try:
        ch.recv()
    except pp.ChildExited:
        raise
    except Exception as exc:  # ConnectionClosed
        if report:
            with open(report, "w") as f:
                f.write(type(exc).__name__)
        sys.exit(7)


def spawn_grandchild_and_wait(path: str) -> None:
    """Start a grandchild (a watch_parent child), tell the test its pid, then sleep."""
    ch = pp.parent()
    gc = pp.spawn(watch_parent, path + ".gone")
    assert gc.recv(timeout=10) == "ready"
    with open(path, "w") as f:
        f.write(str(gc.pid))
    ch.send({"grandchild": gc.pid})
    time.sleep(60)


def no_channel_probe() -> None:
    pass


def aecho() -> None:
    """Echo with the asyncio API, until the parent closes the channel."""
    import asyncio

    import procwire.process.aio as pa

    async def main() -> None:
        async with await pa.parent() as ch:
            async for msg in ch:
                await ch.send(msg)

    asyncio.run(main())


def report_lines(count: int) -> None:
    """Receive ``count`` times and send back what came: each message, or the error's name."""
    ch = pp.parent()
    got: list[object] = []
    for _ in range(count):
        try:
            got.append(ch.recv(timeout=10))
        except Exception as exc:
            got.append(type(exc).__name__)
    ch.send(got)
    ch.recv(timeout=10)  # until the parent is done


async def report_lines_async(count: int) -> None:
    """``report_lines`` with the asyncio API."""
    import procwire.process.aio as pa

    ch = await pa.parent()
    got: list[object] = []
    for _ in range(count):
        try:
            got.append(await ch.recv(timeout=10))
        except Exception as exc:
            got.append(type(exc).__name__)
    await ch.send(got)
    await ch.recv(timeout=10)
