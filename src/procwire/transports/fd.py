"""Connected socket pairs (``procwire.pipe()``) and inherited socket fds (``fd://3``).

``fd://N`` adopts file descriptor N, which must be a connected stream socket this process
inherited (e.g. passed with ``subprocess.Popen(pass_fds=...)``); the channel owns it from then
on and closes it.
"""

from __future__ import annotations

import socket
from typing import Any

from .._errors import AddressError
from .._url import Address
from ._sockets import attach_async
from ._sockstream import AsyncFramedStream, FramedStream, SocketWire
from .base import TransportOptions

LOCAL_ONLY = True


def pair(opts: TransportOptions) -> tuple[FramedStream, FramedStream]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (FramedStream(SocketWire(a), opts, local_address="pipe://a", remote_address="pipe://b"),
            FramedStream(SocketWire(b), opts, local_address="pipe://b", remote_address="pipe://a"))


async def apair(opts: TransportOptions) -> tuple[AsyncFramedStream, AsyncFramedStream]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sa = await attach_async(a, opts, "pipe://a", "pipe://b")
    except BaseException:
        a.close()
        b.close()
        raise
    sb = await attach_async(b, opts, "pipe://b", "pipe://a")
    return sa, sb


def _adopt(addr: Address) -> socket.socket:
    try:
        fd = int(addr.path)
    except ValueError:
        raise AddressError(f"{addr.url!r}: expected fd://<number>") from None
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise AddressError(f"fd {fd} is not a usable socket: {exc.strerror}") from exc
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise AddressError(f"fd {fd} is not a stream socket")
    return sock


def connect(addr: Address, opts: TransportOptions, timeout: float | None) -> FramedStream:
    sock = _adopt(addr)
    return FramedStream(SocketWire(sock), opts, local_address=addr.url,
                        remote_address=addr.url)


async def aconnect(addr: Address, opts: TransportOptions, timeout: float | None) -> Any:
    sock = _adopt(addr)
    return await attach_async(sock, opts, addr.url, addr.url)


def listen(addr: Address, opts: TransportOptions) -> Any:
    raise AddressError("fd:// adopts one connected socket; it cannot listen")


async def alisten(addr: Address, opts: TransportOptions) -> Any:
    raise AddressError("fd:// adopts one connected socket; it cannot listen")
