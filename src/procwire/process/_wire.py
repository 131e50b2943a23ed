"""Byte I/O for the Node IPC channel: a socket wire that also carries file descriptors.

Node passes handles (sockets, servers) over its IPC socketpair with SCM_RIGHTS, one descriptor
sent with the first bytes of a ``NODE_HANDLE`` line. ``FramedStream`` reads with ``recv_into``,
which lets the kernel discard (and close) any descriptor that arrives. So this wire reads with
``recvmsg_into`` and keeps every descriptor that comes in, in arrival order, until the message
layer claims it for its ``NODE_HANDLE`` line.

Why arrival order is enough: the kernel never merges, in one read, the bytes of two writes that
each carry descriptors, and the descriptor arrives with the read that holds the start of its
line. So by the time the line is decoded, its descriptor is queued, behind those of earlier
handle lines only.

Bounds: at most ``MAX_QUEUED_FDS`` unclaimed descriptors are kept; past that (a peer sending
descriptors without ``NODE_HANDLE`` lines) the oldest is closed. A read has room for 64
descriptors (as libuv); more in one write are truncated by the kernel, and the handle lines
without a descriptor are answered ``NODE_HANDLE_NACK``, which makes a Node sender resend.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import struct
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

from .._errors import ChannelClosed, ConnectionClosed, ProtocolError, Timeout
from ..transports._sockstream import SocketWire, closed_error, deadline_of, remaining
from ..transports.base import Buffer, Converter, TransportOptions, convert_all

__all__ = ["MAX_QUEUED_FDS", "AsyncHandleStream", "FdQueue", "HandleWire"]

MAX_QUEUED_FDS = 64
_ANC_SIZE = socket.CMSG_SPACE(64 * array.array("i").itemsize)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)  # received fds must not leak to children
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_DONTWAIT = _SEND_FLAGS | getattr(socket, "MSG_DONTWAIT", 0)
_TIMEVAL = struct.Struct("@ll")


class FdQueue:
    """Received descriptors not yet claimed by a handle message (bounded, oldest closed)."""

    def __init__(self) -> None:
        self._fds: deque[int] = deque()

    def take_anc(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                for fd in fds:
                    if len(self._fds) >= MAX_QUEUED_FDS:
                        _close_quietly(self._fds.popleft())
                    self._fds.append(fd)

    def pop(self) -> int | None:
        return self._fds.popleft() if self._fds else None

    def close(self) -> None:
        while self._fds:
            _close_quietly(self._fds.popleft())


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class HandleWire(SocketWire):
    """A ``SocketWire`` whose reads keep received descriptors (see the module docstring) and
    which can write bytes with descriptors attached (``send_with_fds``)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.fds = FdQueue()
        #: The socket's receive timeout now (SO_RCVTIMEO; None: a read blocks until data).
        self.rcvtimeo: float | None = None
        #: The receive timeout last asked for (``set_rcvtimeo``): ``rcvtimeo`` is within 1 ms
        #: or 1% of it.
        self.asked_timeout: float | None = None

    def recv_into(self, view: memoryview, timeout: float | None) -> int:
        # A kernel receive timeout instead of a poll() before each read: the reply of a
        # request/reply costs one syscall. It is reset only when the wanted timeout differs
        # by more than 1 ms or 1% (callers pass "what is left of the deadline", a slightly
        # different float each time).
        if timeout != self.asked_timeout:
            if timeout is not None and timeout <= 0:
                if not self._poller.poll(0):
                    raise Timeout(f"no message within {timeout} s")
            else:
                self.set_rcvtimeo(timeout)
        try:
            n, anc, _flags, _addr = self.sock.recvmsg_into([view], _ANC_SIZE, _RECV_FLAGS)
        except BlockingIOError:
            raise Timeout(f"no message within {timeout} s") from None
        if anc:
            self.fds.take_anc(anc)
        return n

    def set_rcvtimeo(self, timeout: float | None) -> None:
        """Set the socket's receive timeout, unless it is already within 1 ms or 1% of it
        (callers pass what is left of a deadline, a slightly different float each time)."""
        self.asked_timeout = timeout
        cur = self.rcvtimeo
        if timeout == cur or (timeout is not None and cur is not None
                              and abs(timeout - cur) <= max(0.001, 0.01 * timeout)):
            return
        t = 0.0 if timeout is None else max(timeout, 1e-6)
        sec = int(t)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             _TIMEVAL.pack(sec, int((t - sec) * 1e6)))
        self.rcvtimeo = timeout

    def send_with_fds(self, data: bytes, fds: list[int], timeout: float | None) -> None:
        """Write all of ``data``, the descriptors attached to its first byte. The caller makes
        sure nothing else is being written meanwhile."""
        deadline = deadline_of(timeout)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        view = memoryview(data)
        while True:
            try:
                sent = self.sock.sendmsg([view], anc, _DONTWAIT)
                break
            except BlockingIOError:
                if not self.wait_writable(remaining(deadline)):
                    raise Timeout(f"peer not reading: handle not sent within {timeout} s") \
                        from None
        view = view[sent:]
        while view:
            try:
                sent = self.sock.send(view, _DONTWAIT)
            except BlockingIOError:
                # Half a line is out: the rest must follow whatever the timeout says, or the
                # stream is broken for good.
                self.wait_writable(None)
                continue
            view = view[sent:]

    def close(self) -> None:
        self.fds.close()
        super().close()


class AsyncHandleStream:
    """asyncio message stream over a connected UNIX socket, reading with ``recvmsg`` so that
    received descriptors are kept (asyncio's own transports would drop them).

    Reads: the loop's reader callback fills the framing decoder's buffer; decoded messages wait
    in an inbox bounded by ``inbox`` bytes, past which reading stops until ``receive`` empties
    it (the kernel buffer then pushes back on the sender). Writes: straight to the socket when
    nothing is queued; otherwise queued (bounded by ``write_buffer``, past which ``send``
    awaits, up to its timeout) and written by a writer callback.
    """

    reliable = True

    def __init__(self, sock: socket.socket, opts: TransportOptions, framing: Any, *,
                 local_address: str, remote_address: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._framing = framing
        self._dec = framing.decoder()
        self.fds = FdQueue()
        self._convert: Converter = bytes
        self._safe_convert: Converter | None = None
        self._encode: Callable[[Any], Buffer] = memoryview
        self._safe_encode: Callable[[Any], Buffer] = memoryview
        self._inbox: deque[Any] = deque()
        self._inbox_bytes = 0
        self._inbox_limit = opts.inbox
        self._write_limit = opts.write_buffer
        self._wbuf = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._writing = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._eof: BaseException | None = None
        self._werror: ConnectionClosed | None = None
        self._closed = False
        self.local_address = local_address
        self.remote_address = remote_address

    # -- setup --------------------------------------------------------------------------------
    def _start(self) -> None:
        # Bound to a loop at first use, not at construction.
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._resume_reading()

    def _resume_reading(self) -> None:
        if not self._reading and self._eof is None and self._loop is not None:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None:
        self._convert = convert
        self._safe_convert = safe

    def set_encoder(self, encode: Callable[[Any], Buffer],
                    safe: Callable[[Any], Buffer] | None = None) -> None:
        self._encode = encode
        self._safe_encode = safe or encode

    def unreceive(self, items: list[Any]) -> None:
        self._inbox.extendleft(reversed(items))

    # -- reading ------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        dec = self._dec
        try:
            n, anc, _flags, _addr = self.sock.recvmsg_into([dec.get_buffer()], _ANC_SIZE,
                                                           _RECV_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except ProtocolError as exc:
            self._set_eof(exc)
            return
        except OSError as exc:
            self._set_eof(closed_error(exc))
            return
        if anc:
            self.fds.take_anc(anc)
        if n == 0:
            try:
                dec.check_eof()
                self._set_eof(ConnectionClosed("peer closed the connection", reason="eof"))
            except ProtocolError as exc:
                self._set_eof(ConnectionClosed(str(exc), reason="truncated"))
            return
        try:
            frames = dec.buffer_updated(n)
        except ProtocolError as exc:
            self._set_eof(exc)
            return
        if frames:
            self._inbox.extend(convert_all(frames, self._convert, self._safe_convert))
            self._inbox_bytes += sum(len(f) for f in frames)
            try:
                dec.get_buffer()  # raises an error found after these lines (a line too long)
            except ProtocolError as exc:
                self._set_eof(exc)  # receive() still returns the lines first
            self._wake()
            if self._inbox_bytes >= self._inbox_limit:
                self._pause_reading()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _set_eof(self, exc: BaseException) -> None:
        if self._eof is None:
            self._eof = exc
        self._pause_reading()
        self._wake()

    async def receive(self, timeout: float | None = None) -> list[Any]:
        """At least one message, or raises ``ConnectionClosed`` / ``Timeout``."""
        self._start()
        if not self._inbox:
            if self._closed:
                raise ChannelClosed("channel is closed")
            if self._eof is not None:
                raise self._eof
            if self._waiter is not None:
                raise RuntimeError("receive() called while another receive() waits")
            assert self._loop is not None
            self._waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                if not self._inbox:
                    raise Timeout(f"no message within {timeout} s") from None
            finally:
                self._waiter = None
            if not self._inbox:
                if self._closed:
                    raise ChannelClosed("channel is closed")
                assert self._eof is not None
                raise self._eof
        items = list(self._inbox)
        self._inbox.clear()
        self._inbox_bytes = 0
        self._resume_reading()
        return items

    # -- writing ------------------------------------------------------------------------------
    async def send(self, obj: Any, timeout: float | None = None) -> None:
        """Encode and send one message; awaits only while ``write_buffer`` bytes are queued."""
        try:
            payload = self._encode(obj)
        except Exception:
            payload = self._safe_encode(obj)
        data = self._framing.frame(payload)
        self._check_writable()
        self._start()
        if not self._wbuf:
            try:
                sent = self.sock.send(data, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._fail_write(exc) from exc
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        if len(self._wbuf) >= self._write_limit:
            await self._drain(self._write_limit, timeout)
        self._wbuf += data
        self._want_write()

    async def send_with_fds(self, obj: Any, fds: list[int], timeout: float | None) -> None:
        """Send one message with descriptors attached to its first byte, after everything
        queued before it (so the descriptors travel with this message's line)."""
        payload = self._safe_encode(obj)
        data = self._framing.frame(payload)
        self._check_writable()
        self._start()
        deadline = deadline_of(timeout)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        while True:
            if self._wbuf:
                await self._drain(1, remaining(deadline))
                continue
            try:
                sent = self.sock.sendmsg([data], anc, _DONTWAIT)
            except BlockingIOError:
                await self._wait_writable(remaining(deadline))
                continue
            except OSError as exc:
                raise self._fail_write(exc) from exc
            break
        if sent < len(data):
            self._wbuf += memoryview(data)[sent:]
            self._want_write()

    def _check_writable(self) -> None:
        if self._closed:
            raise ChannelClosed("channel is closed")
        if self._werror is not None:
            raise ConnectionClosed(str(self._werror), reason=self._werror.reason)

    def _fail_write(self, exc: OSError) -> ConnectionClosed:
        self._werror = closed_error(exc)
        self._wbuf.clear()
        self._stop_writing()
        self._wake_writers()
        return ConnectionClosed(str(self._werror), reason=self._werror.reason)

    def _want_write(self) -> None:
        if not self._writing and self._loop is not None:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True

    def _stop_writing(self) -> None:
        if self._writing and self._loop is not None:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _on_writable(self) -> None:
        if self._wbuf:
            try:
                sent = self.sock.send(self._wbuf, _DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail_write(exc)
                return
            del self._wbuf[:sent]
        if not self._wbuf:
            self._stop_writing()
        self._wake_writers()

    def _wake_writers(self) -> None:
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    async def _wait_writable(self, timeout: float | None) -> None:
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(fut)
        self._want_write()
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise Timeout(f"peer not reading: still blocked after {timeout} s") from None
        self._check_writable()

    async def _drain(self, level: int, timeout: float | None) -> None:
        """Wait until fewer than ``level`` bytes are queued."""
        deadline = deadline_of(timeout)
        while len(self._wbuf) >= level:
            self._check_writable()
            await self._wait_writable(remaining(deadline))
        self._check_writable()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued byte is handed to the kernel."""
        if self._wbuf:
            await self._drain(1, timeout)
        elif self._werror is not None:
            self._check_writable()

    async def close(self, timeout: float | None = 10.0) -> None:
        """Flush (up to ``timeout``), then close; raises ``Timeout`` after closing when queued
        bytes could not be delivered in time. Idempotent."""
        if self._closed:
            return
        lost: Timeout | None = None
        if self._wbuf and self._werror is None and self._loop is not None:
            try:
                await self._drain(1, timeout)
            except Timeout:
                lost = Timeout(f"closed with {len(self._wbuf)} queued bytes not delivered: "
                               f"the peer did not read them within {timeout} s")
            except ConnectionClosed:
                pass
        self._closed = True
        self._pause_reading()
        self._stop_writing()
        self._wake()
        self._wake_writers()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.fds.close()
        if lost is not None:
            raise lost

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed procwire stream {self.remote_address}", ResourceWarning,
                          stacklevel=1)
            try:
                self.sock.close()
            except Exception:
                pass
