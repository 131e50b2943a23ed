"""The test fixtures' own servers work: a real redis-server that can be restarted."""

from __future__ import annotations

import socket
from typing import Any


def ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16)


def test_redis_server_fixture_restarts(redis_server: Any) -> None:
    assert ping(redis_server.port).startswith(b"+PONG")
    redis_server.restart()
    assert ping(redis_server.port).startswith(b"+PONG")
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
