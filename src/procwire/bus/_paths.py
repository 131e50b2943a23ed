"""Where the local broker lives, and the file locks that keep it to one per socket.

Default socket: ``$XDG_RUNTIME_DIR/procwire/broker.sock`` when ``XDG_RUNTIME_DIR`` names a
folder, else ``/tmp/procwire-<uid>/broker.sock``; ``PROCWIRE_BROKER`` (a socket path) overrides
both. Next to the socket ``S``: ``S.lock`` (held by the running broker for its whole life),
``S.spawn`` (held by a client while it starts a broker), ``S.pid`` and ``S.log``.
The folder is created 0700 and must belong to this user and be closed to others.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Iterator

from .._errors import AddressError, InsecureError, Timeout

__all__ = ["DIRECT_PREFIX", "BrokerFiles", "default_socket_path", "direct_path_ok", "try_lock",
           "wait_lock"]

ENV = "PROCWIRE_BROKER"
DIRECT_PREFIX = ".pw-rr-"  # a bus's direct request socket (see _direct), in the broker's folder


def default_socket_path() -> str:
    """The socket this user's ``Bus()`` uses (see the module docstring)."""
    env = os.environ.get(ENV)
    if env:
        return os.path.abspath(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "procwire", "broker.sock")
    return os.path.join("/tmp", f"procwire-{os.getuid()}", "broker.sock")


class BrokerFiles:
    """The files of one broker, named after its socket."""

    def __init__(self, socket_path: str) -> None:
        if not socket_path or not os.path.isabs(socket_path):
            raise AddressError(f"the broker socket must be an absolute path, not "
                               f"{socket_path!r}")
        if len(os.fsencode(socket_path)) > 100:
            raise AddressError(f"{socket_path!r} is too long for a UNIX socket (max ~100 "
                               "bytes)")
        self.socket = socket_path
        self.folder = os.path.dirname(socket_path)
        self.lock = socket_path + ".lock"
        self.spawn = socket_path + ".spawn"
        self.pid = socket_path + ".pid"
        self.log = socket_path + ".log"

    @property
    def url(self) -> str:
        return "unix://" + self.socket

    def ensure_folder(self) -> None:
        """Create the folder 0700 if missing; refuse one another user could write into."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        st = os.stat(self.folder)
        if st.st_uid != os.getuid():
            raise InsecureError(f"{self.folder} belongs to uid {st.st_uid}, not to this user "
                                f"({os.getuid()}); refusing to put the broker there")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise InsecureError(f"{self.folder} is writable by others; refusing to put the "
                                "broker there (chmod 700 it)")

    def read_pid(self) -> int | None:
        try:
            with open(self.pid) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None


def direct_path_ok(path: str, folder: str) -> bool:
    """Is ``path`` a direct request socket a bus of the broker in ``folder`` (a ``realpath``)
    would use? Its folder is compared as a real path: a bus may reach the broker through a
    symlink. (The broker removes such a file when its bus died: never anything else.)"""
    if not (isinstance(path, str) and 0 < len(path) <= 200 and os.path.isabs(path)
            and "\0" not in path and os.path.basename(path).startswith(DIRECT_PREFIX)):
        return False
    return os.path.realpath(os.path.dirname(path)) == folder


def _open_lock(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def try_lock(path: str, wait: float = 0.0) -> int | None:
    """An exclusive ``flock`` on ``path`` (the fd: keep it open to hold the lock), polling for
    up to ``wait`` seconds; None when someone else holds it."""
    fd = _open_lock(path)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.01)
        except BaseException:
            os.close(fd)
            raise


@contextlib.contextmanager
def wait_lock(path: str, timeout: float | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block; ``Timeout`` if it stays taken."""
    fd = try_lock(path, 3600.0 if timeout is None else timeout)
    if fd is None:
        raise Timeout(f"{path} stayed locked for {timeout} s")
    try:
        yield
    finally:
        os.close(fd)  # releases the lock
