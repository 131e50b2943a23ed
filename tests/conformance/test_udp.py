"""``udp://``: the conformance suite over UDP on 127.0.0.1 and, when available, [::1].

UDP is unreliable (``reliable = False``: loss-tolerant checks, no EOF or ordering tests) and has
no connection step, so two adaptations:

* A listener only learns of a client from its first datagram, so ``open_client`` sends a hello
  and the listener wrapper's ``accept`` consumes it: the suite's "accept, then connect, then
  talk" sequences work unchanged.
* An empty datagram is the close notification, so an empty message cannot be sent: the size
  test starts at 1 byte.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

import procwire
import procwire.aio as aio
from procwire.testing import AsyncConformance, SyncConformance
from procwire.transports.udp import IPV4_MAX_DATAGRAM, IPV6_MAX_DATAGRAM


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _hello(codec: str) -> Any:
    return b"\0hello" if codec == "raw" else "\0hello"


class _Listener:
    """A listener whose ``accept`` eats the client's hello datagram."""

    def __init__(self, inner: procwire.Listener, codec: str) -> None:
        self._inner = inner
        self._hello = _hello(codec)
        self.address = inner.address

    def accept(self, timeout: float | None = None) -> procwire.Channel:
        ch = self._inner.accept(timeout=timeout)
        first = ch.recv(timeout=timeout)
        assert first == self._hello, f"expected the hello datagram, got {first!r}"
        return ch

    def close(self) -> None:
        self._inner.close()


class _AsyncListener:
    def __init__(self, inner: aio.AsyncListener, codec: str) -> None:
        self._inner = inner
        self._hello = _hello(codec)
        self.address = inner.address

    async def accept(self, timeout: float | None = None) -> aio.AsyncChannel:
        ch = await self._inner.accept(timeout=timeout)
        first = await ch.recv(timeout=timeout)
        assert first == self._hello, f"expected the hello datagram, got {first!r}"
        return ch

    async def close(self) -> None:
        await self._inner.close()


class _UdpConfig:
    reliable = False
    supports_reconnect = False  # nothing to refuse at connect time: no handshake
    host = "127.0.0.1"
    max_message_size = IPV4_MAX_DATAGRAM

    def url(self, tmp_path: Path) -> str:
        return f"udp://{self.host}:0" if ":" not in self.host else f"udp://[{self.host}]:0"

    def _sizes(self) -> list[int]:
        sizes: list[int] = super()._sizes()  # type: ignore[misc]
        return [s for s in sizes if s > 0]


class _SyncUdp(_UdpConfig, SyncConformance):
    def open_listener(self, url: str, codec: str, **options: Any) -> Any:
        return _Listener(super().open_listener(url, codec, **options), codec)

    def open_client(self, url: str, codec: str, *, retry: bool = False,
                    **options: Any) -> procwire.Channel:
        ch = super().open_client(url, codec, retry=retry, **options)
        ch.send(_hello(codec), timeout=self.timeout)
        return ch


class _AsyncUdp(_UdpConfig, AsyncConformance):
    async def aopen_listener(self, url: str, codec: str, **options: Any) -> Any:
        return _AsyncListener(await super().aopen_listener(url, codec, **options), codec)

    async def aopen_client(self, url: str, codec: str, *, retry: bool = False,
                           **options: Any) -> aio.AsyncChannel:
        ch = await super().aopen_client(url, codec, retry=retry, **options)
        await ch.send(_hello(codec), timeout=self.timeout)
        return ch


class TestUdp(_SyncUdp):
    pass


class TestUdpAsync(_AsyncUdp):
    pass


ipv6_only = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")


@ipv6_only
class TestUdp6(_SyncUdp):
    host = "::1"
    max_message_size = IPV6_MAX_DATAGRAM


@ipv6_only
class TestUdp6Async(_AsyncUdp):
    host = "::1"
    max_message_size = IPV6_MAX_DATAGRAM
