"""The shared-key handshake: the sans-IO state machine, then ``auth=`` over real sockets."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import procwire
import procwire.aio as aio
from procwire._errors import AuthenticationError, ProtocolError
from procwire.protocol import handshake as hs
from procwire.protocol.framing import encode_frame

KEY = b"correct horse battery staple"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- sans-IO --------------------------------------------------------------------------------

def run_pair(client: hs.Handshake, server: hs.Handshake) -> tuple[Any, Any]:
    """Shuttle frames between two state machines; returns the final event of each side."""
    to_client = server.initial()
    to_server: list[bytes] = client.initial()
    events: dict[str, Any] = {"client": None, "server": None}
    for _ in range(10):  # the exchange is 3 flights; bounded whatever goes wrong
        for frame in to_client:
            if events["client"] is None:
                step = client.receive(frame)
                to_server += step.send
                events["client"] = step.event
        to_client = []
        for frame in to_server:
            if events["server"] is None:
                step = server.receive(frame)
                to_client += step.send
                events["server"] = step.event
        to_server = []
        if not to_client:
            break
    return events["client"], events["server"]


def machines(client_key: bytes = KEY, server_key: bytes = KEY
             ) -> tuple[hs.Handshake, hs.Handshake]:
    return (hs.Handshake("client", client_key, os.urandom(32)),
            hs.Handshake("server", server_key, os.urandom(32)))


def test_same_key_both_done() -> None:
    c, s = machines()
    ce, se = run_pair(c, s)
    assert isinstance(ce, hs.Done) and isinstance(se, hs.Done)
    assert c.done and s.done


def test_wrong_key_fails_both_sides() -> None:
    c, s = machines(client_key=b"other")
    ce, se = run_pair(c, s)
    assert isinstance(se, hs.Failed) and isinstance(se.error, AuthenticationError)
    assert isinstance(ce, hs.Failed) and isinstance(ce.error, AuthenticationError)
    assert c.state is hs.State.FAILED and s.state is hs.State.FAILED


def test_server_never_answers_an_unproven_client() -> None:
    c, s = machines(client_key=b"other")
    challenge = s.initial()[0]
    step = c.receive(challenge)
    answer, client_challenge = step.send
    out = s.receive(answer)
    assert out.send == [hs.FAILURE]
    # The client's challenge is never answered: the server has already failed.
    with pytest.raises(RuntimeError):
        s.receive(client_challenge)


def test_answers_are_bound_to_the_role() -> None:
    nonce = os.urandom(32)
    assert hs.digest(KEY, "client", nonce) != hs.digest(KEY, "server", nonce)

    def client_waiting_for_answer() -> hs.Handshake:
        c, s = machines()
        c.receive(s.initial()[0])
        assert c.receive(hs.WELCOME).event is None
        return c

    # What a client would answer to this client's own challenge (a reflection) is refused...
    c = client_waiting_for_answer()
    step = c.receive(hs.ANSWER + hs.digest(KEY, "client", c._nonce))
    assert isinstance(step.event, hs.Failed)
    assert isinstance(step.event.error, AuthenticationError)
    assert step.send == [hs.FAILURE]
    # ...while the server's answer is accepted.
    c = client_waiting_for_answer()
    step = c.receive(hs.ANSWER + hs.digest(KEY, "server", c._nonce))
    assert isinstance(step.event, hs.Done) and step.send == [hs.WELCOME]


@pytest.mark.parametrize("frame", [
    b"x" * (hs.MAX_FRAME + 1),
    b'{"type": "hello"}',
    hs.CHALLENGE + b"short",
    hs.ANSWER + b"\0" * 31,
    hs.WELCOME + b"extra",
    b"",
])
def test_bad_frames_are_protocol_errors(frame: bytes) -> None:
    c, s = machines()
    for side in (c, s):
        step = side.receive(frame)
        assert isinstance(step.event, hs.Failed)
        assert isinstance(step.event.error, ProtocolError)


def test_frames_out_of_turn() -> None:
    c, s = machines()
    step = c.receive(hs.WELCOME)  # a verdict before any challenge
    assert isinstance(step.event, hs.Failed) and isinstance(step.event.error, ProtocolError)
    step = s.receive(hs.CHALLENGE + os.urandom(32))  # a challenge before the answer
    assert isinstance(step.event, hs.Failed) and isinstance(step.event.error, ProtocolError)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        hs.Handshake("client", b"", os.urandom(32))
    with pytest.raises(ValueError):
        hs.Handshake("client", KEY, b"short")
    with pytest.raises(ValueError):
        hs.Handshake("peer", KEY, os.urandom(32))  # type: ignore[arg-type]


def test_frames_are_small() -> None:
    _, s = machines()
    frames = s.initial()
    assert all(len(f) <= hs.MAX_FRAME for f in frames)
    assert frames[0].startswith(hs.CHALLENGE) and len(frames[0]) == len(hs.CHALLENGE) + 32


# -- over sockets ---------------------------------------------------------------------------

@pytest.fixture(params=["unix", "tcp"])
def url(request: pytest.FixtureRequest, sock_dir: str) -> str:
    if request.param == "unix":
        return f"unix://{sock_dir}/auth.sock"
    return "tcp://127.0.0.1:0"


@contextmanager
def in_thread(fn: Callable[[], Any]) -> Iterator[dict[str, Any]]:
    """Run fn in a thread; its result or exception lands in the yielded dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield out
    finally:
        t.join(15)
        assert not t.is_alive(), "server thread did not finish"


def echo_one(listener: procwire.Listener, count: int = 1) -> Callable[[], list[Any]]:
    def serve() -> list[Any]:
        with listener.accept(timeout=10) as ch:
            got = [ch.recv(timeout=10) for _ in range(count)]
            for m in got:
                ch.send(m)
            ch.flush(timeout=10)
            return got
    return serve


def test_right_key_round_trip(url: str) -> None:
    with procwire.listen(url, auth=KEY) as server:
        with in_thread(echo_one(server, 3)) as out:
            with procwire.connect(server.address, auth=KEY, timeout=10) as ch:
                # Sent right behind the last handshake frame: must not be lost.
                for i in range(3):
                    ch.send({"n": i})
                assert [ch.recv(timeout=10) for _ in range(3)] == [{"n": i} for i in range(3)]
        assert out.get("result") == [{"n": i} for i in range(3)]


def test_string_key_and_server_speaks_first(url: str) -> None:
    def serve() -> None:
        with server.accept(timeout=10) as ch:
            ch.send("hello")
            ch.send("world")
            assert ch.recv(timeout=10) == "bye"

    with procwire.listen(url, auth="sesame") as server:
        with in_thread(serve) as out:
            with procwire.connect(server.address, auth="sesame", timeout=10) as ch:
                assert ch.recv(timeout=10) == "hello"
                assert ch.recv(timeout=10) == "world"
                ch.send("bye")
                ch.flush(timeout=10)
        assert "error" not in out, out.get("error")


@pytest.mark.anyio
async def test_right_key_round_trip_async(url: str) -> None:
    import anyio

    async with await aio.listen(url, auth=KEY) as server:
        result: list[Any] = []

        async def serve() -> None:
            async with await server.accept(timeout=10) as ch:
                for _ in range(3):
                    result.append(await ch.recv(timeout=10))
                await ch.send("done")
                await ch.flush(timeout=10)

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            async with await aio.connect(server.address, auth=KEY, timeout=10) as ch:
                for i in range(3):
                    await ch.send(i)
                assert await ch.recv(timeout=10) == "done"
        assert result == [0, 1, 2]


def test_async_client_sync_server_interop(url: str) -> None:
    import asyncio

    async def client(address: str) -> Any:
        async with await aio.connect(address, auth=KEY, timeout=10) as ch:
            await ch.send({"x": 1})
            return await ch.recv(timeout=10)

    with procwire.listen(url, auth=KEY) as server:
        with in_thread(echo_one(server)):
            assert asyncio.run(client(server.address)) == {"x": 1}


def test_wrong_key_rejected_and_listener_goes_on(url: str) -> None:
    with procwire.listen(url, auth=KEY) as server:
        with in_thread(echo_one(server)) as out:
            with pytest.raises(AuthenticationError):
                procwire.connect(server.address, auth=b"wrong key", timeout=10)
            with procwire.connect(server.address, auth=KEY, timeout=10) as ch:
                ch.send("good")
                assert ch.recv(timeout=10) == "good"
        assert out.get("result") == ["good"]


@pytest.mark.anyio
async def test_wrong_key_rejected_async(url: str) -> None:
    import anyio

    async with await aio.listen(url, auth=KEY) as server:
        async def serve() -> None:
            async with await server.accept(timeout=10) as ch:
                await ch.send(await ch.recv(timeout=10))
                await ch.flush(timeout=10)

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            with pytest.raises(AuthenticationError):
                await aio.connect(server.address, auth=b"wrong", timeout=10)
            async with await aio.connect(server.address, auth=KEY, timeout=10) as ch:
                await ch.send("ok")
                assert await ch.recv(timeout=10) == "ok"


def test_silent_client_dropped_after_handshake_timeout() -> None:
    with procwire.listen("tcp://127.0.0.1:0", auth=KEY, handshake_timeout=0.5) as server:
        host, port = server.address.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as silent:
            with in_thread(echo_one(server)) as out:
                with procwire.connect(server.address, auth=KEY, timeout=10) as ch:
                    ch.send("after the silent one")
                    assert ch.recv(timeout=10) == "after the silent one"
            assert out.get("result") == ["after the silent one"]
            # The listener closed the silent connection: we read its challenge, then EOF.
            silent.settimeout(5)
            data = b""
            for _ in range(10):
                chunk = silent.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert hs.CHALLENGE in data


def test_oversized_handshake_frame_dropped() -> None:
    with procwire.listen("tcp://127.0.0.1:0", auth=KEY, handshake_timeout=5) as server:
        host, port = server.address.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(encode_frame(b"A" * 1000))
            with in_thread(echo_one(server)) as out:
                with procwire.connect(server.address, auth=KEY, timeout=10) as ch:
                    ch.send(1)
                    assert ch.recv(timeout=10) == 1
            assert out.get("result") == [1]


def test_client_without_auth_fails_cleanly(url: str) -> None:
    with procwire.listen(url, auth=KEY, handshake_timeout=5) as server:
        with in_thread(echo_one(server)) as out:
            with procwire.connect(server.address, timeout=10) as plain:
                plain.send({"hello": 1})
                # The server's challenge is not JSON, then the server hangs up.
                with pytest.raises(procwire.ProcwireError):
                    for _ in range(5):
                        plain.recv(timeout=10)
            with procwire.connect(server.address, auth=KEY, timeout=10) as ch:
                ch.send("good")
                assert ch.recv(timeout=10) == "good"
        assert out.get("result") == ["good"]


def test_auth_client_to_server_without_auth_times_out(url: str) -> None:
    with procwire.listen(url) as server:
        def serve() -> None:
            with server.accept(timeout=10) as ch:
                with pytest.raises(procwire.ProcwireError):
                    ch.recv(timeout=5)

        with in_thread(serve) as out:
            with pytest.raises(procwire.Timeout) as info:
                procwire.connect(server.address, auth=KEY, timeout=10, handshake_timeout=0.3)
            assert isinstance(info.value, TimeoutError)
        assert "error" not in out, out.get("error")


def test_handshake_timeout_is_bounded_by_connect_timeout() -> None:
    finished = threading.Event()

    def hold() -> None:
        with server.accept(timeout=10):
            finished.wait(10)  # keep the connection open and silent

    with procwire.listen("tcp://127.0.0.1:0") as server:
        with in_thread(hold):
            try:
                with pytest.raises(procwire.Timeout):
                    procwire.connect(server.address, auth=KEY, timeout=0.3)
            finally:
                finished.set()


def test_pickle_needs_auth_on_tcp() -> None:
    with pytest.raises(procwire.InsecureError):
        procwire.listen("tcp://127.0.0.1:0", codec="pickle")
    with pytest.raises(procwire.InsecureError):
        procwire.connect("tcp://127.0.0.1:9", codec="pickle", timeout=1)
    with procwire.listen("tcp://127.0.0.1:0", codec="pickle", auth=KEY) as server:
        with in_thread(echo_one(server)) as out:
            with procwire.connect(server.address, codec="pickle", auth=KEY, timeout=10) as ch:
                ch.send({1, 2, 3})
                assert ch.recv(timeout=10) == {1, 2, 3}
        assert out.get("result") == [{1, 2, 3}]


@pytest.mark.anyio
async def test_pickle_needs_auth_on_tcp_async() -> None:
    with pytest.raises(procwire.InsecureError):
        await aio.listen("tcp://127.0.0.1:0", codec="pickle")
    with pytest.raises(procwire.InsecureError):
        await aio.connect("tcp://127.0.0.1:9", codec="pickle", timeout=1)


def test_pickle_allowed_on_unix_without_auth(sock_dir: str) -> None:
    with procwire.listen(f"unix://{sock_dir}/p.sock", codec="pickle"):
        pass


def test_non_loopback_listen_needs_auth() -> None:
    # Only listen: no traffic is ever sent to this address.
    with pytest.raises(procwire.InsecureError):
        procwire.listen("tcp://0.0.0.0:0")
    with procwire.listen("tcp://0.0.0.0:0", auth=KEY) as server:
        assert server.address.startswith("tcp://0.0.0.0:")


def test_empty_key_refused() -> None:
    with pytest.raises(ValueError):
        procwire.listen("tcp://127.0.0.1:0", auth=b"")


def test_unauthenticated_client_cannot_send_a_large_frame(tmp_path: Any) -> None:
    import socket as _socket
    import struct

    url = f"unix://{tmp_path}/big.sock"
    with procwire.listen(url, auth="k", handshake_timeout=30) as srv:
        bad = _socket.socket(_socket.AF_UNIX)
        bad.connect(str(tmp_path / "big.sock"))
        try:
            # A 1 MiB frame instead of the 32-byte answer: refused on its header alone.
            bad.sendall(struct.pack(">I", 1 << 20) + b"x" * 4096)
            accepted: list[Any] = []
            t = threading.Thread(target=lambda: accepted.append(srv.accept(timeout=10)))
            t.start()  # the bad client is dropped, then the good one is served
            with procwire.connect(url, auth="k", timeout=10) as good:
                t.join(10)
                with accepted[0] as ch:
                    good.send("hi")
                    assert ch.recv(timeout=5) == "hi"
                    ch.send("x" * 100_000)  # the limit is lifted after the handshake
                    assert len(good.recv(timeout=5)) == 100_000
        finally:
            bad.close()
