"""``memory://``: the conformance suite, plus what only the in-memory transport promises."""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
from pathlib import Path

import pytest

import procwire
import procwire.aio as aio
from procwire.testing import AsyncConformance, SyncConformance, amemory_pair, memory_pair


class MemoryHooks:
    def url(self, tmp_path: Path) -> str:
        return f"memory://conformance-{uuid.uuid4().hex[:12]}"


class TestMemory(MemoryHooks, SyncConformance):
    pass


class TestMemoryAsync(MemoryHooks, AsyncConformance):
    pass


class TestMemoryPair(SyncConformance):
    supports_listener = False
    supports_reconnect = False

    def make_pair(self, tmp_path, codec, **options):
        return memory_pair(codec, **options)


class TestMemoryPairAsync(AsyncConformance):
    supports_listener = False
    supports_reconnect = False

    async def amake_pair(self, tmp_path, codec, **options):
        return await amemory_pair(codec, **options)


def _name() -> str:
    return f"memory://unit-{uuid.uuid4().hex[:12]}"


def test_receiver_gets_a_copy() -> None:
    a, b = memory_pair()
    try:
        obj = {"items": [1, 2]}
        a.send(obj, timeout=5)
        obj["items"].append(3)
        got = b.recv(timeout=5)
        assert got == {"items": [1, 2]}
        assert got is not obj
    finally:
        a.close()
        b.close()


def test_codec_errors_travel_like_on_a_socket() -> None:
    a, b = memory_pair()
    try:
        with pytest.raises(procwire.EncodeError):
            a.send(object(), timeout=5)
        a.send("fine", timeout=5)
        assert b.recv(timeout=5) == "fine"
    finally:
        a.close()
        b.close()


def test_name_freed_on_close_and_taken_while_open() -> None:
    url = _name()
    with procwire.listen(url) as listener:
        assert listener.address == url
        with pytest.raises(procwire.AddressInUse):
            procwire.listen(url)
    with pytest.raises(procwire.ConnectionRefused):
        procwire.connect(url, timeout=1)
    with procwire.listen(url):
        pass


def test_name_freed_when_listener_is_dropped() -> None:
    url = _name()
    listener = procwire.listen(url)
    with pytest.warns(ResourceWarning):
        del listener
        gc.collect()
    with procwire.listen(url):
        pass


def test_closing_listener_ends_unaccepted_connections() -> None:
    url = _name()
    listener = procwire.listen(url)
    client = procwire.connect(url, timeout=5)
    try:
        listener.close()
        with pytest.raises(procwire.ConnectionClosed):
            client.recv(timeout=5)
    finally:
        client.close()
        listener.close()


def test_backlog_full_times_out() -> None:
    url = _name()
    with procwire.listen(url, backlog=1) as listener:
        first = procwire.connect(url, timeout=5)
        try:
            with pytest.raises(procwire.Timeout):
                procwire.connect(url, timeout=0.2)
            server = listener.accept(timeout=5)
            server.close()
        finally:
            first.close()


def test_receiver_limit_breaks_the_connection() -> None:
    url = _name()
    with procwire.listen(url, codec="raw", max_frame_size=100) as listener:
        client = procwire.connect(url, codec="raw", timeout=5)
        server = listener.accept(timeout=5)
        try:
            with pytest.raises(procwire.ConnectionClosed):
                client.send(bytes(200), timeout=5)
            with pytest.raises(procwire.ConnectionClosed):
                server.recv(timeout=5)
        finally:
            client.close()
            server.close()


def test_blocking_and_asyncio_ends_do_not_mix() -> None:
    url = _name()

    async def main() -> None:
        listener = await aio.listen(url)
        try:
            with pytest.raises(procwire.AddressError):
                procwire.connect(url, timeout=1)
        finally:
            await listener.close()

    asyncio.run(main())
    with procwire.listen(url):
        with pytest.raises(procwire.AddressError):
            asyncio.run(aio.connect(url, timeout=1))


def test_stale_asyncio_listener_is_replaced() -> None:
    url = _name()

    async def forget() -> None:
        app.append(await aio.listen(url))

    app: list[aio.Listener] = []
    asyncio.run(forget())
    with procwire.listen(url):  # the loop that owned the old listener is gone
        pass
    with pytest.warns(ResourceWarning):
        app.clear()
        gc.collect()


def test_unknown_option_refused() -> None:
    with pytest.raises(procwire.AddressError):
        procwire.listen(_name(), colour="blue")


def test_amemory_pair_roundtrip() -> None:
    async def main() -> None:
        a, b = await amemory_pair(codec="msgpack")
        try:
            await a.send({"x": b"\x00"}, timeout=5)
            assert await b.recv(timeout=5) == {"x": b"\x00"}
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_refuses_inherited_channels() -> None:
    url = _name()
    a, b = memory_pair()
    listener = procwire.listen(url)
    try:
        pid = os.fork()
        if pid == 0:  # child: report through the exit status only
            code = 0
            try:
                try:
                    a.send("from child", timeout=1)
                    code |= 1
                except procwire.ProcwireError:
                    pass
                try:
                    procwire.listen(url).close()  # the child's registry starts empty
                except Exception:
                    code |= 2
                a.close()
                listener.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        a.send("parent still works", timeout=5)
        assert b.recv(timeout=5) == "parent still works"
        with pytest.raises(procwire.AddressInUse):
            procwire.listen(url)
    finally:
        a.close()
        b.close()
        listener.close()
