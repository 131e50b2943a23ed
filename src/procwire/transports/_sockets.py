"""Listening and connecting with stream sockets, shared by the UNIX, TCP and TLS transports."""

from __future__ import annotations

import asyncio
import math
import select
import socket
import threading
import warnings
from collections.abc import Callable
from typing import Any

from .._errors import ChannelClosed, ConnectionRefused, Timeout
from ._sockstream import AsyncFramedStream, FramedStream, SocketWire
from .base import TransportOptions

# Builds (wire, local_address, remote_address) for a freshly connected socket, so TLS can
# put its own wire on top.
WireFactory = Callable[[socket.socket, bool], SocketWire]


def plain_wire(sock: socket.socket, server_side: bool) -> SocketWire:
    return SocketWire(sock)


class SocketListener:
    """Blocking accept on a listening socket; ``describe(sock)`` names a peer for addresses."""

    def __init__(self, sock: socket.socket, opts: TransportOptions, address: str,
                 describe: Callable[[Any], str], *, on_close: Callable[[], None] | None = None,
                 wire: WireFactory = plain_wire, configure: Callable[[socket.socket], None]
                 | None = None) -> None:
        self._sock = sock
        self._opts = opts
        self.address = address
        self._describe = describe
        self._on_close = on_close
        self._wire = wire
        self._configure = configure
        self._closed = False
        self._lock = threading.Lock()
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None = None) -> FramedStream:
        if self._closed:
            raise ChannelClosed("listener is closed")
        ms = -1 if timeout is None else math.ceil(timeout * 1000)
        while True:
            if not self._poller.poll(ms):
                raise Timeout(f"no connection within {timeout} s")
            if self._closed:
                raise ChannelClosed("listener is closed")
            try:
                conn, peer = self._sock.accept()
            except BlockingIOError:
                continue  # another thread took it
            except OSError as exc:
                if self._closed:
                    raise ChannelClosed("listener is closed") from exc
                raise
            if self._configure is not None:
                self._configure(conn)
            wire = self._wire(conn, True)
            return FramedStream(wire, self._opts, local_address=self.address,
                                remote_address=self._describe(peer))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept
        except OSError:
            pass
        self._sock.close()
        if self._on_close is not None:
            self._on_close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed procwire listener {self.address}", ResourceWarning,
                          stacklevel=1)
            self.close()


class AsyncSocketListener:
    """asyncio accept on a listening socket (pull-based: the kernel backlog is the bound)."""

    def __init__(self, sock: socket.socket, opts: TransportOptions, address: str,
                 describe: Callable[[Any], str], *, on_close: Callable[[], None] | None = None,
                 ssl_context: Any = None,
                 configure: Callable[[socket.socket], None] | None = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._opts = opts
        self.address = address
        self._describe = describe
        self._on_close = on_close
        self._ssl = ssl_context
        self._configure = configure
        self._closed = False

    async def accept(self, timeout: float | None = None) -> AsyncFramedStream:
        if self._closed:
            raise ChannelClosed("listener is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                conn, peer = await loop.sock_accept(self._sock)
        except TimeoutError:
            raise Timeout(f"no connection within {timeout} s") from None
        except OSError as exc:
            if self._closed:
                raise ChannelClosed("listener is closed") from exc
            raise
        if self._configure is not None:
            self._configure(conn)
        return await attach_async(conn, self._opts, self.address, self._describe(peer),
                                  ssl_context=self._ssl, server_side=True, timeout=timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self._on_close is not None:
            self._on_close()


async def attach_async(sock: socket.socket, opts: TransportOptions, local: str, remote: str, *,
                       ssl_context: Any = None, server_side: bool = False,
                       server_hostname: str | None = None,
                       timeout: float | None = None) -> AsyncFramedStream:
    """Wrap a connected socket in an asyncio framed stream."""
    loop = asyncio.get_running_loop()
    stream = AsyncFramedStream(opts)
    sock.setblocking(False)
    kwargs: dict[str, Any] = {}
    if ssl_context is not None:
        kwargs["ssl"] = ssl_context
        kwargs["ssl_handshake_timeout"] = timeout if timeout else 60.0
        if not server_side:
            kwargs["server_hostname"] = server_hostname
    if server_side:
        transport, _ = await loop.connect_accepted_socket(stream.protocol, sock, **kwargs)
    else:
        transport, _ = await loop.create_connection(stream.protocol, sock=sock, **kwargs)
    stream.attach(transport, local, remote)
    return stream


def connect_socket(family: int, target: Any, timeout: float | None,
                   configure: Callable[[socket.socket], None] | None = None) -> socket.socket:
    """A connected blocking socket, or ConnectionRefused / Timeout."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.settimeout(None)
        if configure is not None:
            configure(sock)
        return sock
    except BaseException as exc:
        sock.close()
        err = _connect_error(exc, target, timeout)
        if err is exc:
            raise
        raise err from exc


async def aconnect_socket(family: int, target: Any, timeout: float | None,
                          configure: Callable[[socket.socket], None] | None = None
                          ) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, target)
        if configure is not None:
            configure(sock)
        return sock
    except BaseException as exc:
        sock.close()
        err = _connect_error(exc, target, timeout)
        if err is exc:
            raise
        raise err from exc


def _connect_error(exc: BaseException, target: Any, timeout: float | None) -> BaseException:
    """procwire's error for a failed connect (the same exception when it is not a known one)."""
    if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
        return ConnectionRefused(f"nothing listens at {_fmt(target)} ({exc.strerror})")
    if isinstance(exc, TimeoutError):
        return Timeout(f"connect to {_fmt(target)} timed out after {timeout} s")
    return exc


def _fmt(target: Any) -> str:
    if isinstance(target, tuple):
        return f"{target[0]}:{target[1]}"
    if isinstance(target, bytes):
        return target.decode(errors="replace")
    return str(target)
