"""Wake-ups between processes on one machine, without polling.

Every process that waits on a queue binds one UNIX datagram socket in a folder next to the
database (``<db>-wake/``, mode 0700), named ``<queue hash>.<random>``. After a commit that makes
work ready, the writer lists the folder and sends one byte to each socket of that queue. A
thread per waiting process reads its socket and bumps a generation counter that blocked
``get`` calls (threads) and ``asyncio`` tasks wait on.

Bounds: each socket's receive buffer is the kernel's (a few hundred datagrams). When it is full
the sender gets EAGAIN and moves on: a full buffer already means a wake-up is pending. A
socket whose process died refuses the datagram (ECONNREFUSED) and the sender removes it.
Paths longer than AF_UNIX allows go through ``/proc/self/fd/<dirfd>/`` (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
import select
import socket
import threading

__all__ = ["Notifier"]

_MAX_PATH = 100


class Notifier:
    """The wake-up folder of one queue in one database file."""

    def __init__(self, folder: str, queue: str) -> None:
        self.folder = folder
        self.prefix = hashlib.blake2b(queue.encode(), digest_size=6).hexdigest() + "."
        self._lock = threading.Lock()
        self._pid = 0
        self._dirfd = -1
        self._sender: socket.socket | None = None
        self._waker: _Waker | None = None
        self._closed = False

    # -- per process state (reset after a fork: threads and sockets do not carry over) ------
    def _check(self) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    # Inherited sockets belong to the parent: leave them alone, open our own.
                    self._sender = None
                    self._waker = None
                    self._dirfd = -1
                    os.makedirs(self.folder, mode=0o700, exist_ok=True)
                    self._pid = os.getpid()

    def _addr(self, name: str) -> str:
        path = os.path.join(self.folder, name)
        if len(path) <= _MAX_PATH:
            return path
        if self._dirfd < 0:
            self._dirfd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._dirfd}/{name}"

    def notify(self) -> None:
        """Wake every process waiting on this queue (best effort, never blocks)."""
        self._check()
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        mine = [n for n in names if n.startswith(self.prefix)]
        if not mine:
            return
        sender = self._sender
        if sender is None:
            sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sender.setblocking(False)
            self._sender = sender
        for name in mine:
            try:
                sender.sendto(b"\0", self._addr(name))
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:
                    # Nobody bound: a process that died without closing. Remove the leftover.
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.folder, name))
                # EAGAIN (buffer full: a wake-up is pending anyway), ENOENT (just closed): fine.

    def waker(self) -> _Waker:
        self._check()
        w = self._waker
        if w is None:
            with self._lock:
                if self._waker is None:
                    self._waker = _Waker(self)
                w = self._waker
        return w

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                if self._waker is not None:
                    self._waker.close()
                if self._sender is not None:
                    self._sender.close()
                if self._dirfd >= 0:
                    os.close(self._dirfd)
            self._waker = None
            self._sender = None
            self._dirfd = -1
            self._pid = 0


class _Waker:
    """This process's socket and the thread that turns its datagrams into wake-ups."""

    def __init__(self, notifier: Notifier) -> None:
        self.name = notifier.prefix + secrets.token_hex(6)
        self.path = os.path.join(notifier.folder, self.name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(notifier._addr(self.name))
        finally:
            os.umask(old)
        self.sock.setblocking(False)
        self._stop_r, self._stop_w = os.pipe()
        self.generation = 0
        self.cond = threading.Condition()
        self._async: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._thread = threading.Thread(target=self._run, name="procwire-queue-waker",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self.sock.fileno(), self._stop_r], [], [])
            if self._stop_r in ready:
                return
            with contextlib.suppress(OSError):
                while self.sock.recv(64):
                    pass
            self.bump()

    def bump(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()
            waiters = list(self._async)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(event.set)

    def wait(self, generation: int, timeout: float) -> None:
        with self.cond:
            if self.generation == generation:
                self.cond.wait(timeout)

    async def await_wake(self, generation: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self.cond:
            if self.generation != generation:
                return
            self._async.add(entry)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            with self.cond:
                self._async.discard(entry)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(5)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._stop_r)
        os.close(self._stop_w)
        self.bump()
