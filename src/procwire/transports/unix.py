"""``unix:///path/app.sock`` and ``unix://@name`` (Linux abstract namespace).

Security: the socket file is created 0600 (owner only). When procwire creates the folder that
holds it, the folder is 0700. A stale socket file (one nobody listens on) is replaced; any other
existing file is left alone and reported as ``AddressInUse``.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from typing import Any

from .._errors import AddressError, AddressInUse, ConnectionRefused
from .._url import Address
from ._sockets import (
    AsyncSocketListener,
    SocketListener,
    aconnect_socket,
    attach_async,
    connect_socket,
)
from ._sockstream import FramedStream, SocketWire
from .base import TransportOptions

LOCAL_ONLY = True
_umask_lock = threading.Lock()


def _target(addr: Address) -> str | bytes:
    if addr.path.startswith("@"):
        return b"\0" + addr.path[1:].encode()
    return addr.path


def url_of(path: str | bytes) -> str:
    if isinstance(path, bytes):
        return "unix://@" + path[1:].decode(errors="replace") if path[:1] == b"\0" else \
            "unix://" + path.decode(errors="replace")
    if not path:
        return "unix://"
    return "unix://" + path


def _describe(peer: Any) -> str:
    return url_of(peer) if peer else "unix://(unnamed)"


def _listening_paths() -> set[str] | None:
    """Paths of listening UNIX sockets in this network namespace (Linux), or None elsewhere.

    Reading this beats probing with connect(): a probe that reaches a live listener lands in
    its accept queue and would be handed to it as a bogus client.
    """
    try:
        with open("/proc/net/unix", "rb") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    paths = set()
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode [Path]; Flags 00010000 = listening.
        fields = line.split(None, 7)
        if len(fields) == 8 and int(fields[3], 16) & 0x10000:
            paths.add(os.fsdecode(fields[7]))
    return paths


def _is_live(path: str) -> bool:
    listening = _listening_paths()
    if listening is not None:
        return os.path.abspath(path) in listening or path in listening
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # cannot tell: do not remove it
    finally:
        probe.close()
    return True


def _prepare_path(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressInUse(f"{path} exists and is not a socket; not removing it")
    if _is_live(path):
        raise AddressInUse(f"something already listens on {path}")
    os.unlink(path)  # stale: its listener is gone


def _bind(addr: Address, opts: TransportOptions) -> tuple[socket.socket, str, Any]:
    target = _target(addr)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if isinstance(target, str):
            _prepare_path(target)
            mode = int(str(opts.extra.get("mode", "600")), 8)
            with _umask_lock:  # umask is process-wide; keep the window small and serialized
                old = os.umask(0o777 & ~mode)
                try:
                    sock.bind(target)
                finally:
                    os.umask(old)
            os.chmod(target, mode)
        else:
            try:
                sock.bind(target)
            except OSError as exc:
                raise AddressInUse(f"abstract socket {addr.path} is in use") from exc
        sock.listen(opts.backlog)
    except BaseException:
        sock.close()
        raise
    on_close = None
    if isinstance(target, str):
        ino = os.stat(target).st_ino

        def on_close() -> None:
            try:  # remove the file only if it is still ours
                if os.stat(target).st_ino == ino:
                    os.unlink(target)
            except OSError:
                pass
    return sock, url_of(target), on_close


def _check(addr: Address, opts: TransportOptions) -> None:
    unknown = set(opts.extra) - {"mode"}
    if unknown:
        raise AddressError(f"unknown option(s) for unix://: {', '.join(sorted(unknown))}")


def listen(addr: Address, opts: TransportOptions) -> SocketListener:
    _check(addr, opts)
    sock, url, on_close = _bind(addr, opts)
    return SocketListener(sock, opts, url, _describe, on_close=on_close)


def connect(addr: Address, opts: TransportOptions, timeout: float | None) -> FramedStream:
    _check(addr, opts)
    target = _target(addr)
    try:
        sock = connect_socket(socket.AF_UNIX, target, timeout)
    except PermissionError as exc:
        raise ConnectionRefused(f"no permission to connect to {addr.path}") from exc
    return FramedStream(SocketWire(sock), opts, local_address="unix://(client)",
                        remote_address=url_of(target))


async def alisten(addr: Address, opts: TransportOptions) -> AsyncSocketListener:
    _check(addr, opts)
    sock, url, on_close = _bind(addr, opts)
    return AsyncSocketListener(sock, opts, url, _describe, on_close=on_close)


async def aconnect(addr: Address, opts: TransportOptions, timeout: float | None) -> Any:
    _check(addr, opts)
    target = _target(addr)
    try:
        sock = await aconnect_socket(socket.AF_UNIX, target, timeout)
    except PermissionError as exc:
        raise ConnectionRefused(f"no permission to connect to {addr.path}") from exc
    return await attach_async(sock, opts, "unix://(client)", url_of(target))
