"""Against real Node: a Node parent forking a Python child, and Python parents with Node children.
Unicode, raw newlines, U+2028, 1 MiB messages, handles both ways, NODE_HANDLE_ACK, exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

import procwire
import procwire.process as pp

from .conftest import HERE, NODE_DIR, SRC, Spawned, gone

VALUES = [
    {"text": "héllo wörld ☃ 日本語 😀"},
    "line1\nline2\r\n",
    "\u2028\u2029",
    ["nested", {"deep": [1, 2.5, None, True, False, -0.125]}],
    42,
    "",
    "x" * (1024 * 1024),
]
ECHO = str(NODE_DIR / "echo_child.js")


def run_node_parent(node: str, script: str) -> Any:
    """Run a Node script that fork()s tests/process/py_child.py; its one JSON line of output."""
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("NODE_CHANNEL_FD", None)
    proc = subprocess.Popen([node, str(NODE_DIR / script), sys.executable,
                             str(HERE / "py_child.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # Node and its Python child
            proc.wait()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


def test_node_parent_forks_python_child(node: str) -> None:
    # fork('py_child.py', [], {execPath: python}) in Node; the child uses procwire.parent().
    result = run_node_parent(node, "fork_python.js")
    assert result == {"ok": True, "echoed": 6, "nodeToPython": result["nodeToPython"],
                      "pythonToNode": "hello from node", "exitCode": 0}
    assert result["nodeToPython"].startswith("hello from python")


def test_node_server_passes_connections_to_python_child(node: str) -> None:
    # Node's socket list: getConnections() counts the child's sockets, close(cb) waits for them.
    result = run_node_parent(node, "socket_list_python.js")
    assert result == {"ok": True, "connections": 2, "closedWhileHeld": False,
                      "closedAfterDrop": True, "clients": ["bye", "bye"], "exitCode": 0}


def test_node_child_echo(node: str, spawned: Spawned) -> None:
    child = spawned([node, ECHO])
    assert child.recv(timeout=10) == {"ready": child.pid}
    for value in VALUES:
        child.send(value)
        assert child.recv(timeout=10) == value
    with pytest.raises(procwire.EncodeError):
        child.send({"bad": float("nan")})  # Node would crash on the line: never written
    child.send("alive")
    assert child.recv(timeout=10) == "alive"
    assert child.stop() == 0  # 'disconnect' leaves the Node child nothing to do: it exits


def test_node_child_exit_code_and_kill(node: str, spawned: Spawned) -> None:
    child = spawned([node, ECHO])
    assert "ready" in child.recv(timeout=10)
    child.send({"cmd": "exit", "code": 4})
    with pytest.raises(pp.ChildExited) as info:
        child.recv(timeout=10)
    assert info.value.returncode == 4 and gone(child.pid)

    child = spawned([node, ECHO])
    assert "ready" in child.recv(timeout=10)
    child.kill()
    with pytest.raises(pp.ChildExited) as info:
        child.recv(timeout=10)
    assert info.value.returncode == -signal.SIGKILL and gone(child.pid)


def test_handles_python_to_node(node: str, spawned: Spawned) -> None:
    child = spawned([node, ECHO])
    assert "ready" in child.recv(timeout=10)
    # A listening TCP socket arrives as net.Server, which then accepts a connection.
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        child.send({"take": "server"}, handle=srv)
    child.send("after the handle")
    assert child.recv(timeout=10) == {"gotHandle": "net.Server", "msg": {"take": "server"}}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.settimeout(10)
        assert conn.recv(100) == b"hello from node"
    assert child.recv(timeout=10) == "after the handle"
    # A connected socket arrives as net.Socket.
    with socket.create_server(("127.0.0.1", 0)) as lsn, \
            socket.create_connection(lsn.getsockname(), timeout=10) as client:
        conn, _ = lsn.accept()
        with conn:
            child.send({"take": "socket"}, handle=conn)
        assert child.recv(timeout=10) == {"gotHandle": "net.Socket", "msg": {"take": "socket"}}
        client.settimeout(10)
        assert client.recv(100) == b"via socket"


def test_handle_node_to_python_is_acked(node: str, spawned: Spawned) -> None:
    # Node sends a net.Server, then {after: true}, which Node holds back until our ACK.
    child = spawned([node, ECHO])
    assert "ready" in child.recv(timeout=10)
    for _ in range(3):  # the ACK of each handle lets the next one through
        child.send({"cmd": "give"})
        msg, handle = child.recv_with_handle(timeout=10)
        assert isinstance(handle, socket.socket)
        with handle:
            assert handle.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            assert handle.getsockname()[1] == msg["port"]
            handle.settimeout(10)
            with socket.create_connection(("127.0.0.1", msg["port"]), timeout=10) as c:
                conn, _ = handle.accept()
                with conn:
                    conn.sendall(b"ok")
                assert c.recv(10) == b"ok"
        assert child.recv(timeout=10) == {"after": True}
    child.send("end")
    assert child.recv(timeout=10) == "end"


def test_recv_drops_unexpected_handle(node: str, spawned: Spawned) -> None:
    child = spawned([node, ECHO])
    assert "ready" in child.recv(timeout=10)
    child.send({"cmd": "give"})
    assert "port" in child.recv(timeout=10)  # handle closed by recv(); still ACKed
    assert child.recv(timeout=10) == {"after": True}
