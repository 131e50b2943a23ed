"""``tcp://host:port`` (IPv4 or ``[::1]``); port 0 picks a free port (see ``Listener.address``).

Listening beyond loopback needs ``auth=`` (or TLS, ``tls://``) unless ``insecure=True``: an open
port without either lets anyone on the network send messages.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from .._errors import AddressError, AddressInUse, InsecureError
from .._url import Address, format_inet
from ._sockets import (
    AsyncSocketListener,
    SocketListener,
    aconnect_socket,
    attach_async,
    connect_socket,
)
from ._sockstream import FramedStream, SocketWire
from .base import TransportOptions

LOCAL_ONLY = False
SCHEME = "tcp"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def configure(sock: socket.socket) -> None:
    # Latency over bandwidth: a lone small message goes out at once (coalescing is done above).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def describe(scheme: str) -> Any:
    def _d(peer: Any) -> str:
        return format_inet(scheme, peer[0], peer[1])
    return _d


def check_exposure(addr: Address, opts: TransportOptions, secured: bool) -> None:
    if not secured and not opts.auth and not opts.insecure and not is_loopback(addr.host):
        raise InsecureError(
            f"refusing to listen on non-loopback address {addr.host} without auth= or TLS; "
            "pass auth=KEY, use tls://, or insecure=True if the network is trusted")


def bind(addr: Address, opts: TransportOptions) -> socket.socket:
    sock = socket.socket(family_of(addr.host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if opts.extra.get("reuse_port"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((addr.host, addr.port))
        except OSError as exc:
            if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
                raise AddressInUse(f"{addr.host}:{addr.port} is already in use") from exc
            raise AddressError(f"cannot bind {addr.host}:{addr.port}: {exc.strerror}") from exc
        sock.listen(opts.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _check(opts: TransportOptions) -> None:
    unknown = set(opts.extra) - {"reuse_port"}
    if unknown:
        raise AddressError(f"unknown option(s) for tcp://: {', '.join(sorted(unknown))}")


def listen(addr: Address, opts: TransportOptions) -> SocketListener:
    _check(opts)
    check_exposure(addr, opts, secured=False)
    sock = bind(addr, opts)
    host, port = sock.getsockname()[:2]
    return SocketListener(sock, opts, format_inet(SCHEME, host, port), describe(SCHEME),
                          configure=configure)


def connect(addr: Address, opts: TransportOptions, timeout: float | None) -> FramedStream:
    _check(opts)
    sock = connect_socket(family_of(addr.host), (addr.host, addr.port), timeout, configure)
    local = sock.getsockname()
    return FramedStream(SocketWire(sock), opts, local_address=format_inet(SCHEME, *local[:2]),
                        remote_address=format_inet(SCHEME, addr.host, addr.port or 0))


async def alisten(addr: Address, opts: TransportOptions) -> AsyncSocketListener:
    _check(opts)
    check_exposure(addr, opts, secured=False)
    sock = bind(addr, opts)
    host, port = sock.getsockname()[:2]
    return AsyncSocketListener(sock, opts, format_inet(SCHEME, host, port), describe(SCHEME),
                               configure=configure)


async def aconnect(addr: Address, opts: TransportOptions, timeout: float | None) -> Any:
    _check(opts)
    sock = await aconnect_socket(family_of(addr.host), (addr.host, addr.port), timeout,
                                 configure)
    local = sock.getsockname()
    return await attach_async(sock, opts, format_inet(SCHEME, *local[:2]),
                              format_inet(SCHEME, addr.host, addr.port or 0))
