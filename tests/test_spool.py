"""spool:// — messages as files in a watched folder (real files, real child processes)."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import threading
from pathlib import Path

import pytest

import procwire
import procwire.aio
from procwire.transports import spool

MSG_NAME = "{:020d}.msg"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def url(path: Path, **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"spool://{path}" + (f"?{q}" if q else "")


def readline(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> str:
    # needs bufsize=0: select() cannot see lines a buffered reader already holds
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child said nothing in time"
    return proc.stdout.readline().decode().strip()


def client_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def messages_in(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


# -- basics -----------------------------------------------------------------------------------

def test_listen_creates_private_folder(tmp_path: Path) -> None:
    root = tmp_path / "a" / "spool"
    with procwire.listen(url(root)) as srv:
        assert srv.address == f"spool://{root}"
        assert root.stat().st_mode & 0o777 == 0o700


def test_round_trip_both_directions(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with procwire.listen(url(root)) as srv:
        with procwire.connect(url(root), timeout=5) as c:
            c.send({"type": "start", "payload": 123})
            with srv.accept(timeout=5) as s:
                assert s.reliable and c.reliable
                assert s.recv(timeout=5) == {"type": "start", "payload": 123}
                s.send(["reply", 1.5, None])
                assert c.recv(timeout=5) == ["reply", 1.5, None]
                assert c.remote_address == srv.address == s.local_address
                assert s.remote_address == c.local_address
                assert "?client=" in c.local_address


def test_messages_before_accept_and_second_client(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with procwire.listen(url(root)) as srv:
        c1 = procwire.connect(url(root))
        c2 = procwire.connect(url(root))
        try:
            c1.send("one")
            c2.send("two")
            with srv.accept(timeout=5) as s1, srv.accept(timeout=5) as s2:
                assert {s1.recv(timeout=5), s2.recv(timeout=5)} == {"one", "two"}
                with pytest.raises(procwire.Timeout):
                    srv.accept(timeout=0.2)
        finally:
            c1.close()
            c2.close()


def test_order_of_2000_messages_sent_while_receiving(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    n = 2000
    # fsync off only to keep the test quick on slow disks; ordering does not depend on it.
    with procwire.listen(url(root, fsync="0")) as srv, \
            procwire.connect(url(root, fsync="0")) as c:
        c.send(-1)
        s = srv.accept(timeout=5)
        assert s.recv(timeout=5) == -1
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                for i in range(n):
                    c.send(i)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=produce)
        t.start()
        try:
            got = [s.recv(timeout=10) for _ in range(n)]
        finally:
            t.join(30)
            s.close()
        assert not errors
        assert got == list(range(n))


def test_close_is_seen_after_earlier_messages_both_ways(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with procwire.listen(url(root)) as srv:
        c = procwire.connect(url(root))
        for i in range(3):
            c.send(i)
        c.close()
        s = srv.accept(timeout=5)
        assert list(s) == [0, 1, 2]
        with pytest.raises(procwire.ConnectionClosed):
            s.recv(timeout=1)
        with pytest.raises(procwire.ConnectionClosed):
            s.send("anyone?")
        s.close()
        assert client_dirs(root) == []  # the last side to close removes the folder

        c = procwire.connect(url(root))
        s = srv.accept(timeout=5)
        s.send("bye")
        s.close()
        assert c.recv(timeout=5) == "bye"
        with pytest.raises(procwire.ConnectionClosed):
            c.recv(timeout=1)
        c.close()
        assert client_dirs(root) == []


def test_files_are_deleted_only_after_handover(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with procwire.listen(url(root)) as srv, procwire.connect(url(root)) as c:
        for i in range(3):
            c.send(i)
        s = srv.accept(timeout=5)
        inbox = client_dirs(root)[0] / spool.TO_SERVER
        assert messages_in(inbox) == [MSG_NAME.format(i) for i in range(3)]
        assert s.recv(timeout=5) == 0
        # handed to the application but not yet acknowledged by asking for the next one
        assert messages_in(inbox) == [MSG_NAME.format(i) for i in range(3)]
        assert s.recv(timeout=5) == 1
        assert messages_in(inbox) == [MSG_NAME.format(i) for i in (1, 2)]
        assert s.recv(timeout=5) == 2
        s.close()  # closing after a recv() is the handover of that last message
        assert messages_in(inbox) == []


def test_1mib_message_and_size_limit(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    big = os.urandom(1024 * 1024)
    with procwire.listen(url(root), codec="raw", max_frame_size=2 * 1024 * 1024) as srv, \
            procwire.connect(url(root), codec="raw", max_frame_size=4 * 1024 * 1024,
                             write_buffer=16 * 1024 * 1024) as c:
        c.send(big, timeout=5)
        s = srv.accept(timeout=5)
        assert s.recv(timeout=5) == big
        s.send(big)
        assert c.recv(timeout=5) == big
        # over the receiver's limit: that one message fails, the channel goes on
        c.send(b"x" * (3 * 1024 * 1024), timeout=5)
        c.send(b"after", timeout=5)
        with pytest.raises(procwire.FrameTooLarge):
            s.recv(timeout=5)
        assert s.recv(timeout=5) == b"after"
        with pytest.raises(procwire.FrameTooLarge):
            s.send(b"x" * (2 * 1024 * 1024 + 1))
        s.close()


def test_send_waits_while_the_reader_is_write_buffer_behind(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    chunk = b"x" * 10_000
    with procwire.listen(url(root), codec="raw") as srv, \
            procwire.connect(url(root), codec="raw", write_buffer=50_000) as c:
        sent = 0
        with pytest.raises(procwire.Timeout):
            for _ in range(20):
                c.send(chunk, timeout=0.2)
                sent += 1
        assert sent == 5
        s = srv.accept(timeout=5)
        result: list[BaseException] = []

        def blocked_send() -> None:
            try:
                c.send(b"last", timeout=10)
            except BaseException as exc:
                result.append(exc)

        t = threading.Thread(target=blocked_send)
        t.start()
        try:
            # reading (and so deleting) frees room: the waiting send goes through
            got = [s.recv(timeout=5) for _ in range(sent + 1)]
        finally:
            t.join(15)
        assert not result
        assert got == [chunk] * sent + [b"last"]
        s.close()


def test_invalid_json_file_is_a_decode_error_and_the_next_arrives(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with procwire.listen(url(root)) as srv:
        with procwire.connect(url(root), codec="raw") as c:
            c.send(b'{"n": 1}')
            c.send(b"{not json")
            c.send(b'{"n": 2}')
        with srv.accept(timeout=5) as s:
            assert s.recv(timeout=5) == {"n": 1}
            with pytest.raises(procwire.DecodeError) as info:
                s.recv(timeout=5)
            assert info.value.payload == b"{not json"
            assert s.recv(timeout=5) == {"n": 2}
            with pytest.raises(procwire.ConnectionClosed):
                s.recv(timeout=5)


def test_timeouts_and_refusal(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with pytest.raises(procwire.ConnectionRefused):
        procwire.connect(url(root), timeout=1)
    with pytest.raises(procwire.ConnectionRefused):
        procwire.connect(url(root), timeout=0.2, retry=True)
    with procwire.listen(url(root)) as srv:
        with pytest.raises(procwire.Timeout):
            srv.accept(timeout=0.1)
        with procwire.connect(url(root)) as c, srv.accept(timeout=5) as s:
            with pytest.raises(procwire.Timeout):
                s.recv(timeout=0.1)
            with pytest.raises(procwire.Timeout):
                c.recv(timeout=0)
            c.send("still fine")
            assert s.recv(timeout=5) == "still fine"


def test_bad_options(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with pytest.raises(procwire.AddressError):
        procwire.listen(url(root, colour="blue"))
    with procwire.listen(url(root)):
        with pytest.raises(procwire.AddressError):
            procwire.connect(url(root, client="../escape"))
        with pytest.raises(procwire.AddressError):
            procwire.connect(url(root, watcher="guess"))
        with pytest.raises(procwire.AddressInUse):
            procwire.listen(url(root))  # one listener per folder


def test_close_from_another_thread_wakes_a_blocked_recv(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with procwire.listen(url(root)) as srv, procwire.connect(url(root)) as c:
        s = srv.accept(timeout=5)
        result: list[BaseException] = []

        def wait() -> None:
            try:
                s.recv(timeout=10)
            except BaseException as exc:
                result.append(exc)

        before = threading.active_count()
        t = threading.Thread(target=wait)
        t.start()
        try:
            threading.Event().wait(0.2)
            if spool._inotify() is not None:
                # inotify: the receiving thread waits on the fd itself, no watcher thread
                assert threading.active_count() == before + 1
            s.close()
        finally:
            t.join(10)
        assert not t.is_alive()
        assert isinstance(result[0], procwire.ChannelClosed | procwire.ConnectionClosed)
        assert c.closed is False


def test_watchfiles_watcher(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with procwire.listen(url(root, watcher="watchfiles")) as srv, \
            procwire.connect(url(root, watcher="watchfiles")) as c:
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(srv.accept(timeout=10)))
        t.start()
        try:
            threading.Event().wait(0.1)
            c.send("hello")  # arrives while accept() waits on the watcher
        finally:
            t.join(15)
        s = result[0]
        assert isinstance(s, procwire.Channel)
        with s:
            assert s.recv(timeout=5) == "hello"
            threading.Timer(0.1, s.send, args=("later",)).start()
            assert c.recv(timeout=5) == "later"


# -- crashes and other processes --------------------------------------------------------------

SENDER = """
import sys, procwire
with procwire.connect(sys.argv[1], timeout=5) as c:
    for i in range(3):
        c.send({"from": "child", "i": i})
"""


def test_message_written_by_another_process(tmp_path: Path, children) -> None:
    root = tmp_path / "spool"
    with procwire.listen(url(root)) as srv:
        child = children.python(SENDER, url(root))
        assert child.wait(timeout=30) == 0
        with srv.accept(timeout=5) as s:
            assert list(s) == [{"from": "child", "i": i} for i in range(3)]


RECEIVER = """
import sys, procwire
srv = procwire.listen(sys.argv[1])
s = srv.accept(timeout=10)
for _ in range(int(sys.argv[2])):
    print(s.recv(timeout=10), flush=True)
print("holding", flush=True)
import time
time.sleep(60)
"""


def test_receiver_killed_loses_nothing(tmp_path: Path, children) -> None:
    root = tmp_path / "spool"
    procwire.listen(url(root)).close()  # create the folder
    with procwire.connect(url(root)) as c:
        for i in range(20):
            c.send(i)
        # a receiver that dies before receiving anything
        child = children.python(RECEIVER, url(root), "0", stdout=subprocess.PIPE, bufsize=0)
        assert readline(child) == "holding"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        # a receiver that dies after receiving 5
        child = children.python(RECEIVER, url(root), "5", stdout=subprocess.PIPE, bufsize=0)
        got = [int(readline(child)) for _ in range(5)]
        assert got == [0, 1, 2, 3, 4]
        assert readline(child) == "holding"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        inbox = client_dirs(root)[0] / spool.TO_SERVER
        # 0..3 were acknowledged by the next recv(); 4 was handed over but never acknowledged
        assert messages_in(inbox)[0] == MSG_NAME.format(4)
        with procwire.listen(url(root)) as srv, srv.accept(timeout=5) as s:
            again = [s.recv(timeout=5) for _ in range(16)]
            assert again == list(range(4, 20))  # at-least-once: 4 comes again
            with pytest.raises(procwire.Timeout):
                s.recv(timeout=0.1)


CLIENT_RECEIVER = """
import sys, procwire
c = procwire.connect(sys.argv[1])
for _ in range(3):
    print(c.recv(timeout=10), flush=True)
print("holding", flush=True)
import time
time.sleep(60)
"""


def test_client_with_stable_id_resumes_after_a_crash(tmp_path: Path, children) -> None:
    root = tmp_path / "spool"
    with procwire.listen(url(root)) as srv:
        child = children.python(CLIENT_RECEIVER, url(root, client="worker-1"),
                                stdout=subprocess.PIPE, bufsize=0)
        with srv.accept(timeout=10) as s:
            for i in range(10):
                s.send(i)
            assert [readline(child) for _ in range(4)] == ["0", "1", "2", "holding"]
            with pytest.raises(procwire.AddressInUse):
                procwire.connect(url(root, client="worker-1"))  # still held by the child
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            with procwire.connect(url(root, client="worker-1")) as c:
                assert [c.recv(timeout=5) for _ in range(8)] == list(range(2, 10))
                c.send("resumed")
                assert s.recv(timeout=5) == "resumed"
            with pytest.raises(procwire.ConnectionClosed):
                s.recv(timeout=5)
        assert client_dirs(root) == []
        # the name is free again, and a new channel under it is accepted
        with procwire.connect(url(root, client="worker-1")) as c:
            c.send("again")
            with srv.accept(timeout=5) as s:
                assert s.recv(timeout=5) == "again"


CRASHING_SENDER = """
import os, sys, procwire
c = procwire.connect(sys.argv[1])
c.send("kept")
os._exit(0)
"""


def test_stale_temp_files_are_ignored_and_cleaned(tmp_path: Path, children) -> None:
    root = tmp_path / "spool"
    procwire.listen(url(root)).close()
    child = children.python(CRASHING_SENDER, url(root, client="w1"))
    assert child.wait(timeout=30) == 0
    dead = child.pid  # reaped: no such process any more
    inbox = root / "w1" / spool.TO_SERVER
    stale = inbox / f".tmp-{dead}-abcdef"
    stale.write_bytes(b"half a mess")
    stale_dir = root / f".tmp-{dead}-0123"
    (stale_dir / spool.TO_SERVER).mkdir(parents=True)
    live = inbox / f".tmp-{os.getpid()}-live"  # a writer still alive: left alone
    live.write_bytes(b"being written")
    with procwire.listen(url(root)) as srv:
        assert not stale.exists() and not stale_dir.exists()
        assert live.exists()
        with srv.accept(timeout=5) as s:
            assert s.recv(timeout=5) == "kept"
            with pytest.raises(procwire.Timeout):
                s.recv(timeout=0.1)
            with pytest.raises(procwire.Timeout):
                srv.accept(timeout=0.1)  # the temp folder was never a client


def test_restarted_listener_accepts_existing_clients(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with procwire.listen(url(root)):
        c = procwire.connect(url(root))
    try:
        c.send("while nobody listens")
        with procwire.listen(url(root)) as srv, srv.accept(timeout=5) as s:
            assert s.recv(timeout=5) == "while nobody listens"
            s.send("hello")
        assert c.recv(timeout=5) == "hello"
    finally:
        c.close()


# -- asyncio ----------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_async_round_trip_and_order(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    async with await procwire.aio.listen(url(root)) as srv:
        async with await procwire.aio.connect(url(root), timeout=5) as c:
            await c.send({"hello": "async"})
            async with await srv.accept(timeout=5) as s:
                assert await s.recv(timeout=5) == {"hello": "async"}

                async def later() -> None:
                    await asyncio.sleep(0.05)
                    await s.send("reply")

                task = asyncio.create_task(later())
                assert await c.recv(timeout=5) == "reply"  # woken by the watcher
                await task

                async def produce() -> None:
                    for i in range(300):
                        await c.send(i)

                task = asyncio.create_task(produce())
                got = [await s.recv(timeout=10) for _ in range(300)]
                await task
                assert got == list(range(300))
    assert client_dirs(root) == []


@pytest.mark.anyio
async def test_async_timeouts_close_and_end(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    with pytest.raises(procwire.ConnectionRefused):
        await procwire.aio.connect(url(root))
    async with await procwire.aio.listen(url(root)) as srv:
        with pytest.raises(procwire.Timeout):
            await srv.accept(timeout=0.1)
        c = await procwire.aio.connect(url(root))
        s = await srv.accept(timeout=5)
        with pytest.raises(procwire.Timeout):
            await s.recv(timeout=0.1)
        waiter = asyncio.create_task(s.recv(timeout=10))
        await asyncio.sleep(0.05)
        await s.close()
        with pytest.raises((procwire.ChannelClosed, procwire.ConnectionClosed)):
            await asyncio.wait_for(waiter, 5)
        with pytest.raises(procwire.ConnectionClosed):
            await c.recv(timeout=5)
        await c.close()
    assert client_dirs(root) == []


@pytest.mark.anyio
async def test_async_with_blocking_peer_in_a_thread(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    async with await procwire.aio.listen(url(root, watcher="watchfiles")) as srv:

        def blocking_client() -> list[int]:
            with procwire.connect(url(root)) as c:
                for i in range(5):
                    c.send(i)
                return [c.recv(timeout=10) for _ in range(5)]

        fut = asyncio.get_running_loop().run_in_executor(None, blocking_client)
        async with await srv.accept(timeout=10) as s:
            for _ in range(5):
                await s.send(await s.recv(timeout=10) * 10)
            assert await asyncio.wait_for(fut, 20) == [0, 10, 20, 30, 40]
