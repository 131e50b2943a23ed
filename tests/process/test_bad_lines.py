"""Bad input on Node's IPC channel from a peer that is not procwire (raw bytes on the socket,
as a broken or hostile program could write them): a line that is not exactly one JSON value is
a ``DecodeError`` for that message only; blank lines are skipped; a line over
``max_frame_size`` is ``FrameTooLarge`` and ends the channel. Both directions, both APIs."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

import procwire

from .conftest import HERE, SRC, Spawned, gone

BAD = b'{"a":1}{"b":2}\n1 2\nnot json\n\n \t\r\n{"a":\n[1] \r\n'
# A raw Node-protocol peer: writes BAD, then echoes one line back followed by a 200-byte
# line (the echo must still arrive before FrameTooLarge).
RAW_CHILD = (
    "import os, socket\n"
    "s = socket.socket(fileno=int(os.environ['NODE_CHANNEL_FD']))\n"
    f"s.sendall({BAD!r})\n"
    "data = b''\n"
    "while not data.endswith(b'\\n'):\n"
    "    chunk = s.recv(100)\n"
    "    if not chunk:\n"
    "        raise SystemExit(3)\n"
    "    data += chunk\n"
    "s.sendall(data + b'\"' + b'x' * 200 + b'\"\\n')  # one write: most likely one read\n"
    "s.recv(1)\n"
)


def test_bad_lines_from_a_child(spawned: Spawned) -> None:
    child = spawned([sys.executable, "-c", RAW_CHILD], max_frame_size=100)
    for _ in range(4):  # two values, two numbers, not JSON, unterminated: one error each
        with pytest.raises(procwire.DecodeError):
            child.recv(timeout=10)
    assert child.recv(timeout=10) == [1]  # after blank lines, padded: the channel goes on
    child.send({"still": "alive"})
    assert child.recv(timeout=10) == {"still": "alive"}
    with pytest.raises(procwire.FrameTooLarge):
        child.recv(timeout=10)
    with pytest.raises(procwire.ProtocolError):
        child.recv(timeout=10)  # the channel is closed for good after that
    child.stop()
    assert gone(child.pid)


# The same lines one at a time, each when the parent asks for it: each is then one read.
STEP_CHILD = (
    "import os, socket\n"
    "s = socket.socket(fileno=int(os.environ['NODE_CHANNEL_FD']))\n"
    f"for line in {BAD!r}.splitlines(keepends=True) + [b'\"' + b'x' * 200 + b'\"\\n']:\n"
    "    if not s.recv(100):\n"
    "        raise SystemExit(3)\n"
    "    s.sendall(line)\n"
    "s.recv(1)\n"
)


@pytest.mark.parametrize("api", ["blocking", "asyncio"])
def test_bad_lines_one_per_read(spawned: Spawned, api: str) -> None:
    async def main() -> list[object]:
        child = await spawned.aspawn([sys.executable, "-c", STEP_CHILD], max_frame_size=100)
        got: list[object] = []
        for _ in range(8):
            await child.send("next")
            try:
                got.append(await child.recv(timeout=0.5))
            except procwire.Timeout:
                got.append("nothing")
            except procwire.ProtocolError as exc:
                got.append(type(exc).__name__)
        with pytest.raises(procwire.ProtocolError):
            await child.recv(timeout=0.5)  # for good
        await child.stop()
        return got

    if api == "asyncio":
        got = asyncio.run(main())
    else:
        child = spawned([sys.executable, "-c", STEP_CHILD], max_frame_size=100)
        got = []
        for _ in range(8):
            child.send("next")
            try:
                got.append(child.recv(timeout=0.5))
            except procwire.Timeout:
                got.append("nothing")  # a blank line: nothing to deliver
            except procwire.ProtocolError as exc:
                got.append(type(exc).__name__)
        with pytest.raises(procwire.ProtocolError):
            child.recv(timeout=0.5)  # for good
    assert got == ["DecodeError", "DecodeError", "DecodeError", "nothing", "nothing",
                   "DecodeError", [1], "FrameTooLarge"]


def test_bad_lines_from_a_child_asyncio(spawned: Spawned) -> None:
    async def main() -> None:
        child = await spawned.aspawn([sys.executable, "-c", RAW_CHILD], max_frame_size=100)
        for _ in range(4):
            with pytest.raises(procwire.DecodeError):
                await child.recv(timeout=10)
        assert await child.recv(timeout=10) == [1]
        await child.send({"still": "alive"})
        assert await child.recv(timeout=10) == {"still": "alive"}
        with pytest.raises(procwire.FrameTooLarge):
            await child.recv(timeout=10)
        await child.stop()

    asyncio.run(main())


@pytest.mark.parametrize("api", ["blocking", "asyncio"])
def test_bad_lines_from_a_parent(api: str) -> None:
    # This test is the raw parent: a socketpair and NODE_CHANNEL_FD, as Node's fork() does.
    ours, theirs = socket.socketpair()
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from process import _targets\n")
    if api == "blocking":
        code += "_targets.report_lines(6)\n"
    else:
        code += "import asyncio; asyncio.run(_targets.report_lines_async(6))\n"
    env = dict(os.environ, PYTHONPATH=SRC, NODE_CHANNEL_FD=str(theirs.fileno()),
               NODE_CHANNEL_SERIALIZATION_MODE="json")
    proc = subprocess.Popen([sys.executable, "-c", code, str(HERE.parent)], env=env,
                            pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        ours.settimeout(20)
        ours.sendall(BAD + b'"\\u2028 fine"\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = ours.recv(65536)
            assert chunk, "the child closed the channel"
            data += chunk
        import json
        assert json.loads(data) == ["DecodeError"] * 4 + [[1], "\u2028 fine"]
        ours.sendall(b"{}\n")
        assert proc.wait(timeout=20) == 0
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
