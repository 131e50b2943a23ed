"""Byte I/O over a pair of file descriptors (pipes, a tty, a socket): blocking and asyncio.

``PipeWire`` has the method set of ``_sockstream.SocketWire``, so ``FramedStream`` runs over it
unchanged; ``PipePairTransport`` is one ``asyncio.Transport`` over a read fd and a write fd, so
``AsyncFramedStream`` runs over it unchanged.

Non-blocking without side effects: ``O_NONBLOCK`` belongs to the open file description, which
a pipe or terminal inherited as stdin/stdout shares with the parent (a shell left with a
non-blocking terminal breaks). So on Linux a FIFO or character device is reopened through
``/proc/self/fd/N``, which gives a private description; only where that is impossible (a
socket, no ``/proc``) is the flag set on the shared one.

Pipes cannot be shut down like sockets, and closing an fd does not wake a thread blocked on it.
So the reader and the flusher never block in ``read``/``write``: they wait in ``poll`` on their
fd and on a wake-up pipe that ``shutdown``/``close`` write to; fds are closed only once the
thread using them has let go.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import select
import socket
import stat
import sys
import threading
import time
import warnings
from typing import Any

from .._errors import Timeout
from .base import Buffer

__all__ = ["PipePairTransport", "PipeWire", "private_nonblocking"]


def private_nonblocking(fd: int, mode: int) -> int:
    """A non-blocking fd for the file open as ``fd`` (``mode``: ``os.O_RDONLY``,
    ``os.O_WRONLY`` or ``os.O_RDWR``), without changing what other holders of ``fd`` see.

    Takes ownership of ``fd``: returns it, or a replacement (``fd`` is then closed).
    """
    st = os.fstat(fd)
    if sys.platform.startswith("linux") and (stat.S_ISFIFO(st.st_mode)
                                             or stat.S_ISCHR(st.st_mode)):
        try:
            new = os.open(f"/proc/self/fd/{fd}",
                          mode | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            pass
        else:
            os.close(fd)
            return new
    os.set_blocking(fd, False)
    return fd


def _closed_error() -> OSError:
    return OSError(errno.EBADF, "pipe channel is closed")


class PipeWire:
    """The wire of a ``FramedStream`` over a read fd and a write fd (may be the same fd).

    Owns both fds from construction on (see ``private_nonblocking``) and closes them.
    """

    def __init__(self, read_fd: int, write_fd: int) -> None:
        if read_fd == write_fd:
            self._rfd = self._wfd = private_nonblocking(read_fd, os.O_RDWR)
        else:
            self._rfd = private_nonblocking(read_fd, os.O_RDONLY)
            try:
                self._wfd = private_nonblocking(write_fd, os.O_WRONLY)
            except BaseException:
                os.close(self._rfd)
                raise
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Held for the whole of a read (resp. write) call, poll included: close() takes them
        # after waking the holder, so no fd is closed while a thread still uses it.
        self._rmutex = threading.Lock()
        self._wmutex = threading.Lock()
        self._rpoll = select.poll()
        self._rpoll.register(self._rfd, select.POLLIN)
        self._rpoll.register(self._wake_r, select.POLLIN)
        self._wpoll = select.poll()
        self._wpoll.register(self._wfd, select.POLLOUT)
        self._wpoll.register(self._wake_r, select.POLLIN)
        self._closed = False  # reading and writing are over
        self._wclosed = False  # writing is over
        self._fds_closed = False

    # -- writing ----------------------------------------------------------------------------
    def try_send(self, data: Buffer) -> int:
        """Write without blocking; returns the bytes written (0 when the pipe is full)."""
        with self._wmutex:
            if self._wclosed:
                raise OSError(errno.EPIPE, "pipe channel is closed for writing")
            try:
                return os.write(self._wfd, data)
            except BlockingIOError:
                return 0

    def try_send_parts(self, parts: list[Buffer]) -> int:
        with self._wmutex:
            if self._wclosed:
                raise OSError(errno.EPIPE, "pipe channel is closed for writing")
            try:
                return os.writev(self._wfd, parts)
            except BlockingIOError:
                return 0

    def send_all(self, data: Buffer) -> None:
        """Blocking write of everything (the flusher thread's call); OSError when closed."""
        view = memoryview(data).cast("B")
        with self._wmutex:
            while view:
                if self._wclosed:
                    raise OSError(errno.EPIPE, "pipe channel is closed for writing")
                try:
                    n = os.write(self._wfd, view)
                except BlockingIOError:
                    self._wpoll.poll()  # the pipe has room, or shutdown() woke us
                    continue
                view = view[n:]

    # -- reading ----------------------------------------------------------------------------
    def recv_into(self, view: memoryview, timeout: float | None) -> int:
        """Read into ``view``; 0 at end of stream. Raises Timeout, or OSError once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._rmutex:
            while True:
                if self._closed:
                    raise _closed_error()
                try:
                    return os.readv(self._rfd, [view])
                except BlockingIOError:
                    pass
                if deadline is None:
                    ms = -1
                else:
                    ms = math.ceil(max(0.0, deadline - time.monotonic()) * 1000)
                if not self._rpoll.poll(ms):
                    raise Timeout(f"no message within {timeout} s")

    def drain_nowait(self) -> None:
        """Nothing to do: unlike TCP, closing a pipe with unread input loses nothing sent."""

    # -- closing ----------------------------------------------------------------------------
    def shutdown(self, how: int) -> None:
        """``SHUT_WR``: end of stream for the peer (if no write is in progress; else at close).
        ``SHUT_RDWR``: wakes any thread blocked in ``recv_into`` or ``send_all``."""
        if how == socket.SHUT_RD:
            return
        self._wclosed = True
        full = how == socket.SHUT_RDWR
        if full:
            self._closed = True
            try:
                os.write(self._wake_w, b"x")  # stays unread: every later poll returns at once
            except OSError:
                pass  # the pipe already holds a byte, or is closed
        # A flusher blocked on a full pipe holds _wmutex; only a full shutdown wakes it.
        if self._wmutex.acquire(blocking=full):
            try:
                self._close_write_fd()
            finally:
                self._wmutex.release()

    def _close_write_fd(self) -> None:
        # _wmutex held.
        wfd = self._wfd
        if wfd >= 0 and wfd != self._rfd:
            self._wfd = -1
            os.close(wfd)

    def close(self) -> None:
        """Close both fds and the wake-up pipe. Idempotent."""
        if self._fds_closed:
            return
        self.shutdown(socket.SHUT_RDWR)
        with self._wmutex, self._rmutex:
            if self._fds_closed:
                return
            self._fds_closed = True
            self._close_write_fd()
            fds = [self._rfd, self._wake_r, self._wake_w]
            self._rfd = self._wfd = -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        if not getattr(self, "_fds_closed", True):
            warnings.warn("unclosed procwire pipe wire", ResourceWarning, stacklevel=1)
            try:
                self.close()
            except Exception:
                pass


# ------------------------------------------------------------------------------------------
# asyncio
# ------------------------------------------------------------------------------------------

class _WriteSide(asyncio.Protocol):
    """Protocol of the write-pipe transport: passes flow control on to the owner."""

    def __init__(self) -> None:
        self.owner: PipePairTransport | None = None

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner._proto.pause_writing()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner._proto.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.owner is not None:
            self.owner._write_lost()


class PipePairTransport(asyncio.Transport):
    """One asyncio transport over a read fd and a write pipe transport.

    Reading feeds a ``BufferedProtocol`` straight from ``os.readv`` into its buffer (asyncio's
    own read-pipe transport only supports ``data_received``, one copy more). Writing goes
    through the transport of ``loop.connect_write_pipe``, with its buffering and flow control.
    Use ``open`` to build one.

    End of input (the peer exited or closed its end) closes the whole transport, as a socket
    transport does. A write side that breaks first (the peer closed only its reading end)
    makes ``is_closing()`` true, so sends fail, while what is still to read is delivered.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, rfd: int,
                 write_transport: asyncio.WriteTransport,
                 protocol: asyncio.BufferedProtocol) -> None:
        super().__init__()
        self._loop = loop
        self._rfd = rfd
        self._wt = write_transport
        self._proto = protocol
        self._reading = False
        self._paused = False
        self._closing = False
        self._wlost = False
        self._lost_called = False

    @classmethod
    async def open(cls, read_fd: int, write_fd: int,
                   protocol: asyncio.BufferedProtocol) -> PipePairTransport:
        """Takes ownership of both fds (see ``private_nonblocking``)."""
        loop = asyncio.get_running_loop()
        if read_fd == write_fd:
            # One fd both ways (a socket, a tty): the write transport gets its own fd, as
            # an event loop watches each fd number for one reader only.
            write_fd = os.dup(read_fd)
        rfd = private_nonblocking(read_fd, os.O_RDONLY)
        try:
            wfd = private_nonblocking(write_fd, os.O_WRONLY)
        except BaseException:
            os.close(rfd)
            raise
        side = _WriteSide()
        try:
            wt, _ = await loop.connect_write_pipe(lambda: side,
                                                  os.fdopen(wfd, "wb", buffering=0))
        except BaseException:
            os.close(rfd)
            raise
        self = cls(loop, rfd, wt, protocol)
        side.owner = self
        protocol.connection_made(self)
        self._start_reading()
        return self

    # -- reading ----------------------------------------------------------------------------
    def _start_reading(self) -> None:
        if not self._reading and not self._closing and self._rfd >= 0:
            self._loop.add_reader(self._rfd, self._read_ready)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._rfd)
            self._reading = False

    def _read_ready(self) -> None:
        try:
            n = os.readv(self._rfd, [self._proto.get_buffer(-1)])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if n == 0:
            self._stop_reading()
            if not self._proto.eof_received():
                self.close()
            return
        self._proto.buffer_updated(n)

    def _fatal(self, exc: BaseException) -> None:
        self._stop_reading()
        self._closing = True
        self._wt.abort()
        self._close_rfd()
        self._loop.call_soon(self._lost, exc)

    def pause_reading(self) -> None:
        self._paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        self._paused = False
        self._start_reading()

    def is_reading(self) -> bool:
        return self._reading

    # -- writing ----------------------------------------------------------------------------
    def write(self, data: Any) -> None:
        if not self._wlost:
            self._wt.write(data)

    def writelines(self, list_of_data: Any) -> None:
        if not self._wlost:
            self._wt.writelines(list_of_data)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._wt.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._wlost else self._wt.get_write_buffer_size()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self._wlost:
            self._wt.write_eof()

    def _write_lost(self) -> None:
        self._wlost = True
        self._proto.resume_writing()  # nobody waits for a drain that cannot come

    # -- closing ----------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing or self._wlost

    def close(self) -> None:
        """Flush what is buffered for writing (in the background), stop reading, close."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        self._close_rfd()
        self._wt.close()
        self._loop.call_soon(self._lost, None)

    def abort(self) -> None:
        if self._closing and self._rfd < 0:
            return
        self._closing = True
        self._stop_reading()
        self._close_rfd()
        self._wt.abort()
        self._loop.call_soon(self._lost, None)

    def _close_rfd(self) -> None:
        if self._rfd >= 0:
            fd = self._rfd
            self._rfd = -1
            os.close(fd)

    def _lost(self, exc: BaseException | None) -> None:
        if not self._lost_called:
            self._lost_called = True
            self._proto.connection_lost(exc if isinstance(exc, Exception) or exc is None
                                        else None)
