"""``tcp://``: the conformance suite over TCP on 127.0.0.1 and, when available, [::1]."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from procwire.testing import AsyncConformance, SyncConformance, free_tcp_port


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class Tcp4Hooks:
    def url(self, tmp_path: Path) -> str:
        return f"tcp://127.0.0.1:{free_tcp_port('127.0.0.1')}"


class Tcp6Hooks:
    def url(self, tmp_path: Path) -> str:
        return f"tcp://[::1]:{free_tcp_port('::1')}"


class TestTcp(Tcp4Hooks, SyncConformance):
    pass


class TestTcpAsync(Tcp4Hooks, AsyncConformance):
    pass


ipv6_only = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")


@ipv6_only
class TestTcp6(Tcp6Hooks, SyncConformance):
    pass


@ipv6_only
class TestTcp6Async(Tcp6Hooks, AsyncConformance):
    pass
