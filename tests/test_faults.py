"""Bad input and faults: each gets a typed error on its own connection; the listener keeps
serving everyone else and no message for others is lost."""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import procwire
from procwire.protocol.framing import encode_frame


@pytest.fixture(params=["unix", "tcp"])
def server(request: pytest.FixtureRequest, sock_dir: str) -> Iterator[procwire.Listener]:
    url = f"unix://{sock_dir}/s.sock" if request.param == "unix" else "tcp://127.0.0.1:0"
    with procwire.listen(url) as srv:
        yield srv


def raw_client(address: str) -> socket.socket:
    if address.startswith("unix://"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(address[len("unix://"):])
    else:
        host, port = address[len("tcp://"):].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=5)
    return s


class GoodTraffic:
    """A well-behaved client sending N numbered messages while the bad things happen."""

    def __init__(self, srv: procwire.Listener, n: int = 5000) -> None:
        self.n = n
        self.client = procwire.connect(srv.address, timeout=5)
        self.server_side = srv.accept(timeout=5)
        self.got: list[Any] = []
        self.thread = threading.Thread(target=self._send, daemon=True)
        self.thread.start()

    def _send(self) -> None:
        for i in range(self.n):
            self.client.send(i)

    def check(self) -> None:
        self.thread.join(10)
        while len(self.got) < self.n:
            self.got.append(self.server_side.recv(timeout=10))
        assert self.got == list(range(self.n))
        self.client.close()
        self.server_side.close()


def test_garbage_bytes(server: procwire.Listener) -> None:
    good = GoodTraffic(server)
    with raw_client(server.address) as bad:
        bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        ch = server.accept(timeout=5)
        with pytest.raises(procwire.FrameTooLarge):
            ch.recv(timeout=5)
        with pytest.raises(procwire.ProtocolError):  # it stays failed, no guessing
            ch.recv(timeout=1)
        ch.close()
    good.check()


def test_length_header_announcing_2_pow_40(server: procwire.Listener) -> None:
    good = GoodTraffic(server)
    with raw_client(server.address) as bad:
        bad.sendall(b"\xff\xff\xff\xff" + struct.pack(">Q", 1 << 40))
        ch = server.accept(timeout=5)
        with pytest.raises(procwire.FrameTooLarge) as info:
            ch.recv(timeout=5)
        assert info.value.size == 1 << 40
        ch.close()
    good.check()


def test_frame_cut_off_by_close(server: procwire.Listener) -> None:
    good = GoodTraffic(server)
    with raw_client(server.address) as bad:
        bad.sendall(encode_frame(b'"complete"') + encode_frame(b'"cut off here"')[:7])
    ch = server.accept(timeout=5)
    assert ch.recv(timeout=5) == "complete"
    with pytest.raises(procwire.ConnectionClosed) as info:
        ch.recv(timeout=5)
    assert info.value.reason == "truncated"
    ch.close()
    good.check()


def test_half_frame_then_stall(server: procwire.Listener) -> None:
    with raw_client(server.address) as bad:
        frame = encode_frame(b'{"late": true}')
        bad.sendall(frame[:6])
        stalled = server.accept(timeout=5)
        good = GoodTraffic(server)  # served while the stalled one waits
        with pytest.raises(procwire.Timeout):
            stalled.recv(timeout=0.3)
        good.check()
        bad.sendall(frame[6:])  # the rest arrives late: the message is intact
        assert stalled.recv(timeout=5) == {"late": True}
        stalled.close()


def test_invalid_json_then_valid(server: procwire.Listener) -> None:
    good = GoodTraffic(server)
    with raw_client(server.address) as bad:
        bad.sendall(encode_frame(b"{not json") + encode_frame(b'{"ok": 1}'))
        ch = server.accept(timeout=5)
        with pytest.raises(procwire.DecodeError) as info:
            ch.recv(timeout=5)
        assert info.value.payload == b"{not json"
        assert ch.recv(timeout=5) == {"ok": 1}  # framing intact: the channel goes on
        ch.close()
    good.check()


PEER = """
import sys, procwire
ch = procwire.connect(sys.argv[1], timeout=5)
ch.send("ready")
i = 0
while True:
    ch.send({"i": i, "pad": "x" * 500})
    i += 1
"""


def test_peer_killed_mid_stream(server: procwire.Listener, children: Any) -> None:
    good = GoodTraffic(server)
    proc = children.python(PEER, server.address)
    ch = server.accept(timeout=10)
    assert ch.recv(timeout=10) == "ready"
    for _ in range(100):
        ch.recv(timeout=5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    expected = 100
    with pytest.raises(procwire.ConnectionClosed):
        for _ in range(10_000_000):
            msg = ch.recv(timeout=10)
            assert msg["i"] == expected  # every complete message, in order, none invented
            expected += 1
    ch.close()
    good.check()


def test_sender_learns_of_dead_peer_on_next_call(server: procwire.Listener) -> None:
    client = procwire.connect(server.address, timeout=5)
    peer = server.accept(timeout=5)
    peer.close()
    time.sleep(0.1)
    with pytest.raises(procwire.ConnectionClosed):
        for _ in range(1000):  # TCP may accept a first write after the peer's FIN
            client.send("anyone?")
            time.sleep(0.01)
    client.close()


def test_send_after_close_and_double_close(server: procwire.Listener) -> None:
    client = procwire.connect(server.address, timeout=5)
    client.close()
    client.close()
    with pytest.raises(procwire.ChannelClosed):
        client.send(1)
    with pytest.raises(procwire.ChannelClosed):
        client.recv(timeout=1)
    server.accept(timeout=5).close()
