"""Node's socket-list answers, sans-IO: HandleProtocol against real descriptors (no Node here;
tests/process/test_node.py has the real Node parent)."""

from __future__ import annotations

import gc
import socket
import threading
from typing import Any

from procwire.process._node import HandleProtocol

KEY = "6:127.0.0.1:0"


class Sent:
    def __init__(self) -> None:
        self.msgs: list[dict[str, Any]] = []
        self.cond = threading.Condition()

    def __call__(self, msg: dict[str, Any]) -> None:
        with self.cond:
            self.msgs.append(msg)
            self.cond.notify_all()

    def wait_for(self, n: int) -> list[dict[str, Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.msgs) >= n, timeout=10), self.msgs
            return list(self.msgs)


def receive_socket(proto: HandleProtocol, key: Any = KEY) -> tuple[socket.socket, socket.socket]:
    """A connected pair; one end arrives through ``proto`` as Node would send it."""
    a, b = socket.socketpair()
    fd = b.detach()
    action = proto.receive({"cmd": "NODE_HANDLE", "type": "net.Socket", "key": key,
                            "msg": {"n": 1}}, lambda: fd)
    assert action.deliver and action.reply == {"cmd": "NODE_HANDLE_ACK"}
    assert action.handle is not None
    return action.handle, a


def count(proto: HandleProtocol, key: Any = KEY) -> Any:
    action = proto.receive({"cmd": "NODE_SOCKET_GET_COUNT", "key": key}, lambda: None)
    assert not action.deliver
    return action.reply


def test_count_follows_close_and_detach() -> None:
    proto = HandleProtocol(Sent())
    s1, p1 = receive_socket(proto)
    s2, p2 = receive_socket(proto)
    assert count(proto) == {"cmd": "NODE_SOCKET_COUNT", "key": KEY, "count": 2}
    assert count(proto, "other") == {"cmd": "NODE_SOCKET_COUNT", "key": "other", "count": 0}
    s1.close()
    s1.close()  # twice: counted once
    assert count(proto)["count"] == 1
    fd = s2.detach()  # out of our sight: no longer counted
    socket.socket(fileno=fd).close()
    assert count(proto)["count"] == 0
    p1.close()
    p2.close()


def test_notify_close_answered_at_once_when_none_open() -> None:
    proto = HandleProtocol(Sent())
    action = proto.receive({"cmd": "NODE_SOCKET_NOTIFY_CLOSE", "key": KEY}, lambda: None)
    assert action.reply == {"cmd": "NODE_SOCKET_ALL_CLOSED", "key": KEY}


def test_notify_close_answered_when_the_last_socket_closes() -> None:
    sent = Sent()
    proto = HandleProtocol(sent)
    s1, p1 = receive_socket(proto)
    s2, p2 = receive_socket(proto)
    for _ in range(2):  # two close() calls in the parent: each gets its answer
        action = proto.receive({"cmd": "NODE_SOCKET_NOTIFY_CLOSE", "key": KEY}, lambda: None)
        assert action.reply is None
    s1.close()
    assert sent.msgs == []
    with s2.makefile("rb") as f:  # the socket closes when its last file object does
        s2.close()
        assert sent.msgs == []
        assert f is not None
    assert sent.msgs == [{"cmd": "NODE_SOCKET_ALL_CLOSED", "key": KEY}] * 2
    p1.close()
    p2.close()


def test_a_forgotten_socket_counts_as_closed_when_collected() -> None:
    sent = Sent()
    proto = HandleProtocol(sent)
    s1, p1 = receive_socket(proto)
    proto.receive({"cmd": "NODE_SOCKET_NOTIFY_CLOSE", "key": KEY}, lambda: None)
    del s1
    gc.collect()
    assert sent.wait_for(1) == [{"cmd": "NODE_SOCKET_ALL_CLOSED", "key": KEY}]
    assert count(proto)["count"] == 0
    p1.close()


def test_unusable_keys_are_ignored() -> None:
    proto = HandleProtocol(Sent())
    for key in (None, ["a"], {"k": 1}, True):
        assert proto.receive({"cmd": "NODE_SOCKET_GET_COUNT", "key": key},
                             lambda: None).reply is None
        assert proto.receive({"cmd": "NODE_SOCKET_NOTIFY_CLOSE", "key": key},
                             lambda: None).reply is None
    # A socket with an unusable key is an ordinary, uncounted socket.
    sock, peer = receive_socket(proto, key=["not", "hashable"])
    assert type(sock) is socket.socket
    sock.close()
    peer.close()


def test_a_server_handle_is_not_counted() -> None:
    proto = HandleProtocol(Sent())
    srv = socket.create_server(("127.0.0.1", 0))
    fd = srv.detach()
    action = proto.receive({"cmd": "NODE_HANDLE", "type": "net.Server", "key": KEY,
                            "msg": None}, lambda: fd)
    assert action.handle is not None and type(action.handle) is socket.socket
    assert count(proto)["count"] == 0
    action.handle.close()


def test_asyncio_channel_answers_when_a_socket_closes_in_another_thread() -> None:
    # The asyncio channel on one end of a socketpair; the other end plays Node's parent.
    import asyncio

    from procwire.process._channel import CodecLines
    from procwire.process._wire import AsyncHandleStream
    from procwire.process.aio import IpcChannel
    from procwire.transports.base import TransportOptions

    node_end, ours = socket.socketpair()
    node_end.settimeout(10)
    conn_a, conn_b = socket.socketpair()
    lines = [b'{"cmd":"NODE_HANDLE","type":"net.Socket","key":"k","msg":{"hold":1}}\n',
             b'{"cmd":"NODE_SOCKET_NOTIFY_CLOSE","key":"k"}\n', b'{"x":1}\n']
    node_end.sendmsg([lines[0]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   conn_b.fileno().to_bytes(4, "little"))])
    conn_b.close()
    node_end.sendall(lines[1] + lines[2])

    async def main() -> None:
        stream = AsyncHandleStream(ours, TransportOptions(), CodecLines(1 << 20),
                                   local_address="child://", remote_address="parent://")
        ch = IpcChannel(stream)
        try:
            msg, handle = await ch.recv_with_handle(timeout=10)
            assert msg == {"hold": 1} and handle is not None
            assert await ch.recv(timeout=10) == {"x": 1}  # NOTIFY_CLOSE: not answered yet
            closer = threading.Thread(target=handle.close)
            closer.start()
            closer.join(10)
            await ch.flush(timeout=10)
            for _ in range(500):  # the answer is queued on the loop: let it run (<= 5 s)
                await asyncio.sleep(0.01)
                if _peek(node_end).count(b"\n") >= 2:
                    break
        finally:
            await ch.close(timeout=5)

    asyncio.run(asyncio.wait_for(main(), 30))
    data = b""
    while data.count(b"\n") < 2:
        chunk = node_end.recv(4096)
        assert chunk, data
        data += chunk
    assert data.split(b"\n")[:2] == [b'{"cmd":"NODE_HANDLE_ACK"}',
                                     b'{"cmd":"NODE_SOCKET_ALL_CLOSED","key":"k"}']
    node_end.close()
    conn_a.close()


def _peek(sock: socket.socket) -> bytes:
    """What is waiting on ``sock``, without reading it."""
    import select
    if not select.select([sock], [], [], 0)[0]:
        return b""
    return sock.recv(4096, socket.MSG_PEEK)
