"""Python parent, Python children: spawn(fn), commands, stdio, exit codes, handles, cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import procwire
import procwire.process as pp
from procwire.process._launch import adopt_parent_fd

from . import _targets
from .conftest import SRC, Spawned, gone

VALUES = [
    {"text": "héllo wörld ☃ 日本語 😀"},
    "line1\nline2\r\n",
    "\u2028\u2029",
    ["nested", {"deep": [1, 2.5, None, True, False, -0.125]}],
    42,
    "",
    "x" * (1024 * 1024),
]


def test_spawn_function_with_args(spawned: Spawned) -> None:
    child = spawned(_targets.add, 2, 3)
    assert child.recv(timeout=10) == {"sum": 5, "pid": child.pid}
    with pytest.raises(pp.ChildExited) as info:
        child.recv(timeout=10)
    assert info.value.returncode == 0 and info.value.pid == child.pid
    assert isinstance(info.value, procwire.ConnectionClosed)
    assert child.returncode == 0


def test_spawn_by_name(spawned: Spawned) -> None:
    child = spawned(f"{_targets.__name__}:add", 40, 2)
    assert child.recv(timeout=10)["sum"] == 42


def test_echo_values(spawned: Spawned) -> None:
    child = spawned(_targets.echo)
    for value in VALUES:
        child.send(value)
        assert child.recv(timeout=10) == value
    assert child.stop() == 0  # closing the channel ends the child's loop


def test_burst_then_exit_loses_nothing(spawned: Spawned) -> None:
    # The child exits right after queuing its sends: the exit hook flushes them first.
    child = spawned(_targets.burst, 20000)
    got = [m["i"] for m in child]
    assert got == list(range(20000))
    assert child.returncode == 0


def test_exit_code_and_reaped(spawned: Spawned) -> None:
    child = spawned(_targets.exit_with, 3)
    assert child.recv(timeout=10) == {"bye": 3}
    with pytest.raises(pp.ChildExited) as info:
        child.recv(timeout=10)
    assert info.value.returncode == 3
    assert "exited with code 3" in str(info.value)
    assert gone(child.pid)  # no zombie


def test_killed_child(spawned: Spawned) -> None:
    child = spawned(_targets.echo)
    child.send("ping")
    assert child.recv(timeout=10) == "ping"
    child.kill()
    with pytest.raises(pp.ChildExited) as info:
        child.recv(timeout=10)
    assert info.value.returncode == -signal.SIGKILL
    assert "SIGKILL" in str(info.value)
    assert gone(child.pid)
    with pytest.raises(procwire.ConnectionClosed):
        for _ in range(100):  # the first sends may still fit in the socket buffer
            child.send("more")


def test_terminated_child(spawned: Spawned) -> None:
    child = spawned(_targets.echo)
    child.send("ping")
    assert child.recv(timeout=10) == "ping"
    assert child.returncode is None
    child.terminate()
    with pytest.raises(pp.ChildExited) as info:
        child.recv(timeout=10)
    assert info.value.returncode == -signal.SIGTERM and "SIGTERM" in str(info.value)
    assert child.wait(timeout=10) == -signal.SIGTERM == child.returncode
    assert gone(child.pid)
    child.terminate()  # an ended child: nothing happens
    child.kill()


def test_exception_in_child(spawned: Spawned) -> None:
    child = spawned(_targets.fail, stderr=subprocess.PIPE)
    with pytest.raises(pp.ChildExited) as info:
        child.recv(timeout=10)
    assert info.value.returncode == 1
    assert b"boom from the child" in child._proc.stderr.read()  # type: ignore[union-attr]


def test_stderr_passes_through(tmp_path: Path) -> None:
    code = ("import procwire.process as pp, sys\n"
            f"sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
            "from process import _targets\n"
            "c = pp.spawn(_targets.stderr_then_exit)\n"
            "print(c.wait(timeout=10))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, PYTHONPATH=SRC))
    assert proc.returncode == 0, proc.stderr
    assert "child-stderr-line" in proc.stderr
    assert proc.stdout.strip() == "0"


def test_stderr_passes_through_stdio_channel() -> None:
    # channel="stdio": stdout carries the messages, stderr is still the parent's.
    child_code = ("import sys\n"
                  "sys.stderr.write('stdio-child-stderr\\n'); sys.stderr.flush()\n"
                  "sys.stdout.write('{\"ok\":1}\\n'); sys.stdout.flush()\n")
    code = ("import sys, procwire.process as pp\n"
            f"c = pp.spawn([sys.executable, '-c', {child_code!r}], channel='stdio')\n"
            "print(c.recv(timeout=10), c.wait(timeout=10))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, PYTHONPATH=SRC))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "stdio-child-stderr\n"
    assert proc.stdout.strip() == "{'ok': 1} 0"


def test_nan_refused_channel_intact(spawned: Spawned) -> None:
    child = spawned(_targets.echo)
    for bad in (float("nan"), {"x": float("inf")}, [float("-inf")]):
        with pytest.raises(procwire.EncodeError):
            child.send(bad)
    with pytest.raises(procwire.EncodeError):
        child.send(object())
    child.send("still fine")
    assert child.recv(timeout=10) == "still fine"


def test_recv_timeout(spawned: Spawned) -> None:
    child = spawned(_targets.echo)
    with pytest.raises(procwire.Timeout):
        child.recv(timeout=0.05)
    child.send(1)
    assert child.recv(timeout=10) == 1


def test_recv_timeout_follows_each_call(spawned: Spawned) -> None:
    # The socket's receive timeout is only reset when the asked one moves by over 1%: a
    # caller counting down a deadline must still get its own timeout, not a stale one.
    child = spawned(_targets.echo)
    t = 20.0
    for i in range(300):
        child.send(i)
        assert child.recv(timeout=t) == i
        t *= 0.995  # within 1% of the previous one each time, 20 s down to 4.4 s
    start = time.monotonic()
    with pytest.raises(procwire.Timeout):
        child.recv(timeout=0.2)
    assert time.monotonic() - start < 3.0  # not the 20 s or 4.4 s set earlier
    child.send("on")
    assert child.recv(timeout=t) == "on"


def test_internal_messages_not_delivered(spawned: Spawned) -> None:
    child = spawned(_targets.echo)
    child.send({"cmd": "NODE_CLUSTER", "act": "online"})
    child.send({"cmd": "NODE_HANDLE", "type": "net.Server", "msg": 1})  # no fd: NACKed
    child.send({"cmd": "NODE_"})  # not internal: too short
    assert child.recv(timeout=10) == {"cmd": "NODE_"}
    child.send("after")
    assert child.recv(timeout=10) == "after"
    assert pp.is_internal({"cmd": "NODE_X"}) and not pp.is_internal(["NODE_X"])


def test_handle_to_python_child(spawned: Spawned) -> None:
    child = spawned(_targets.serve_handle)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        child.send({"port": port}, handle=srv)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.settimeout(10)
        assert conn.recv(100) == b"hello from " + str(child.pid).encode()
    assert child.recv(timeout=10) == {"served": {"port": port}}


def test_handle_errors(spawned: Spawned) -> None:
    child = spawned(_targets.echo)
    with pytest.raises(procwire.EncodeError):
        child.send("x", handle="not a socket")
    with socket.create_server(("127.0.0.1", 0)) as srv, pytest.raises(procwire.MessageTooLarge):
        child.send("y" * (pp.MAX_HANDLE_MESSAGE + 1), handle=srv)
    closed = socket.socket()
    closed.close()
    with pytest.raises(procwire.EncodeError):
        child.send("z", handle=closed)
    child.send("ok")
    assert child.recv(timeout=10) == "ok"


def test_stdio_channel_python_function(spawned: Spawned) -> None:
    child = spawned(_targets.echo, channel="stdio")
    for value in VALUES:
        child.send(value)
        assert child.recv(timeout=10) == value
    assert not child.channel.passes_handles
    with socket.create_server(("127.0.0.1", 0)) as srv, pytest.raises(procwire.EncodeError):
        child.send("x", handle=srv)
    assert child.stop() == 0


def test_stdio_channel_any_program(spawned: Spawned) -> None:
    # One write per line: with PYTHONUNBUFFERED, print() writes the text and its newline in
    # two writes, and the parent (which has the complete value after the first) may close
    # before the second.
    code = ("import sys, json\n"
            "for line in sys.stdin:\n"
            "    sys.stdout.write(json.dumps({'got': json.loads(line)}) + '\\n')\n"
            "    sys.stdout.flush()\n")
    child = spawned([sys.executable, "-c", code], channel="stdio")
    child.send({"a": [1, "é"]})
    assert child.recv(timeout=10) == {"got": {"a": [1, "é"]}}
    child.close()
    assert child.wait(timeout=10) == 0


def test_stop_escalates_to_kill(spawned: Spawned) -> None:
    code = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('armed', flush=True)\n"
            "time.sleep(60)\n")
    child = spawned([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert child._proc.stdout.readline() == b"armed\n"  # type: ignore[union-attr]
    t0 = time.monotonic()
    assert child.stop(timeout=0.3) == -signal.SIGKILL
    assert time.monotonic() - t0 < 20
    assert gone(child.pid)
    with pytest.raises(procwire.Timeout):
        spawned([sys.executable, "-c", "import time; time.sleep(60)"]).wait(timeout=0.05)


def test_with_block_reaps(spawned: Spawned) -> None:
    with spawned(_targets.echo) as child:
        child.send(1)
        assert child.recv(timeout=10) == 1
    assert child.returncode == 0 and gone(child.pid)


def test_spawn_refuses_bad_targets() -> None:
    with pytest.raises(TypeError):
        pp.spawn(lambda: None)

    def local() -> None:
        pass

    with pytest.raises(TypeError):
        pp.spawn(local)
    with pytest.raises(procwire.EncodeError):
        pp.spawn(_targets.add, object(), 1)
    with pytest.raises(ValueError):
        pp.spawn("no-colon")
    with pytest.raises(TypeError):
        pp.spawn([sys.executable], "extra")
    with pytest.raises(ValueError):
        pp.spawn([sys.executable], channel="carrier-pigeon")
    with pytest.raises(FileNotFoundError):
        pp.spawn(["/nonexistent/program"])


def test_parent_without_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_CHANNEL_FD", raising=False)
    monkeypatch.delenv("PROCWIRE_CHANNEL", raising=False)
    with pytest.raises(pp.NoParentChannel, match="no parent channel"):
        adopt_parent_fd()
    monkeypatch.setenv("NODE_CHANNEL_FD", "987")
    with pytest.raises(pp.NoParentChannel, match="does not name an open descriptor"):
        adopt_parent_fd()
    monkeypatch.setenv("NODE_CHANNEL_SERIALIZATION_MODE", "advanced")
    with pytest.raises(pp.NoParentChannel, match="advanced"):
        adopt_parent_fd()
    # And in a real process, with its message and a ProcwireError.
    proc = subprocess.run(
        [sys.executable, "-c",
         "import procwire, procwire.process as pp\n"
         "try:\n    pp.parent()\n"
         "except procwire.ProcwireError as e:\n    print(type(e).__name__, e)\n"],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if k != "NODE_CHANNEL_FD"} | {
            "PYTHONPATH": SRC})
    assert proc.stdout.startswith("NoParentChannel this process has no parent channel"), proc


def test_parent_death_ends_child(spawned: Spawned, tmp_path: Path) -> None:
    # parent (this test) -> middle child -> grandchild watching its parent (the middle one).
    pid_file = tmp_path / "grandchild.pid"
    middle = spawned(_targets.spawn_grandchild_and_wait, str(pid_file))
    gc_pid = middle.recv(timeout=20)["grandchild"]
    spawned.pids.append(gc_pid)
    middle.kill()
    middle.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not gone(gc_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(gc_pid), "the grandchild did not exit when its parent died"
    assert (tmp_path / "grandchild.pid.gone").read_text() == "ConnectionClosed"


@pytest.mark.parametrize("target, error", [
    ("procwire_no_such_module:main", "ModuleNotFoundError: No module named "
                                     "'procwire_no_such_module'"),
    (f"{_targets.__name__}:no_such_function", "AttributeError"),
    (f"{_targets.__name__}:VALUE", "TypeError"),
])
def test_unimportable_target_is_start_failed(spawned: Spawned, target: str, error: str) -> None:
    child = spawned(target, stderr=subprocess.DEVNULL)
    with pytest.raises(pp.StartFailed) as info:
        child.recv(timeout=30)
    err = info.value
    assert isinstance(err, pp.ChildExited)  # still "the child exited", for older handlers
    assert err.target == target and err.error.startswith(error)
    assert err.returncode == 122 and err.pid == child.pid and err.worker_id is None
    assert target in str(err) and error in str(err)
    # an ordinary failure of the function itself is not a start failure
    child = spawned(_targets.fail, stderr=subprocess.DEVNULL)
    with pytest.raises(pp.ChildExited) as info2:
        child.recv(timeout=30)
    assert not isinstance(info2.value, pp.StartFailed) and info2.value.returncode != 122
