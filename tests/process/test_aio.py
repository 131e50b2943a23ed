"""The asyncio twin: procwire.process.aio (spawn, Child, parent), with Python and Node children."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

import procwire
import procwire.process as pp

from . import _targets
from .conftest import NODE_DIR, Spawned, gone

VALUES: list[Any] = [{"t": "héllo ☃ 😀"}, "a\nb", "\u2028", [1, 2.5, None], "x" * (1024 * 1024)]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_async_python_child(spawned: Spawned) -> None:
    async def main() -> None:
        child = await spawned.aspawn(_targets.aecho)  # the child uses pa.parent()
        for value in VALUES:
            await child.send(value)
            assert await child.recv(timeout=10) == value
        with pytest.raises(procwire.EncodeError):
            await child.send(float("nan"))
        with pytest.raises(procwire.Timeout):
            await child.recv(timeout=0.05)
        assert await child.stop() == 0

    run(main())


def test_async_exit_and_kill(spawned: Spawned) -> None:
    async def main() -> None:
        child = await spawned.aspawn(_targets.exit_with, 6)
        got = [m async for m in child]
        assert got == [{"bye": 6}] and child.returncode == 6
        child = await spawned.aspawn(_targets.echo)
        child.kill()
        with pytest.raises(pp.ChildExited) as info:
            await child.recv(timeout=10)
        assert info.value.returncode == -signal.SIGKILL and gone(child.pid)
        slow = await spawned.aspawn([sys.executable, "-c", "import time; time.sleep(60)"])
        with pytest.raises(procwire.Timeout):
            await slow.wait(timeout=0.05)
        slow.terminate()
        assert await slow.wait(timeout=10) == -signal.SIGTERM

    run(main())


def test_async_node_child_handles(node: str, spawned: Spawned) -> None:
    async def main() -> None:
        async with await spawned.aspawn([node, str(NODE_DIR / "echo_child.js")]) as child:
            assert "ready" in await child.recv(timeout=10)
            for value in VALUES:
                await child.send(value)
                assert await child.recv(timeout=10) == value
            with socket.create_server(("127.0.0.1", 0)) as srv:
                port = srv.getsockname()[1]
                await child.send({"take": 1}, handle=srv)
            await child.send("after")
            assert (await child.recv(timeout=10))["gotHandle"] == "net.Server"
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.read() == b"hello from node"
            writer.close()
            assert await child.recv(timeout=10) == "after"
            await child.send({"cmd": "give"})
            _msg, handle = await child.recv_with_handle(timeout=10)
            assert isinstance(handle, socket.socket)
            handle.close()
            assert await child.recv(timeout=10) == {"after": True}
        assert child.returncode == 0

    run(main())


def test_async_stdio_channel(spawned: Spawned) -> None:
    async def main() -> None:
        child = await spawned.aspawn(_targets.aecho, channel="stdio")
        for value in VALUES:
            await child.send(value)
            assert await child.recv(timeout=10) == value
        with socket.create_server(("127.0.0.1", 0)) as srv, pytest.raises(procwire.EncodeError):
            await child.send("x", handle=srv)
        assert await child.stop() == 0

    run(main())


def test_async_handle_to_python_child(spawned: Spawned) -> None:
    async def main() -> None:
        child = await spawned.aspawn(_targets.serve_handle)
        with socket.create_server(("127.0.0.1", 0)) as srv:
            port = srv.getsockname()[1]
            await child.send({"p": port}, handle=srv)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.read()).startswith(b"hello from ")
        writer.close()
        assert await child.recv(timeout=10) == {"served": {"p": port}}

    run(main())


def test_async_start_failed(spawned: Spawned) -> None:
    async def main() -> None:
        child = await spawned.aspawn("procwire_no_such_module:main",
                                     stderr=subprocess.DEVNULL)
        with pytest.raises(pp.StartFailed) as info:
            await child.recv(timeout=30)
        assert info.value.target == "procwire_no_such_module:main"
        assert "ModuleNotFoundError" in info.value.error and info.value.returncode == 122

    run(main())
