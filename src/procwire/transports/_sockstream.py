"""Framed message streams over a connected stream socket: blocking and asyncio.

Blocking writes follow asyncio's transport rule, which gives coalescing without latency: when
nothing is queued, ``send`` writes straight to the socket (``MSG_DONTWAIT``), so a lone message
or a request/reply costs one syscall and no wait. Only when the kernel buffer is full (the reader
is behind) does the rest go to a user-space buffer, which a flusher thread drains in large
writes while later ``send`` calls just append; a plain loop of ``send()`` thus turns into few
large writes exactly when that helps. The buffer is bounded by ``write_buffer``: past it ``send``
waits (up to its timeout).

Reads: one ``recv_into`` into the frame decoder's buffer, many frames split out of it.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import select
import socket
import struct
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .._errors import (
    ChannelClosed,
    ConnectionClosed,
    FrameTooLarge,
    ProcwireError,
    ProtocolError,
    Timeout,
)
from ..protocol.framing import (
    Framing,
    LengthPrefixed,
    _u32_pack,  # the header, inlined on the hot path
)
from .base import Buffer, Converter, TransportOptions, convert_all

_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_DONTWAIT = _SEND_FLAGS | getattr(socket, "MSG_DONTWAIT", 0)
_SMALL = 16 * 1024  # below this, header + payload are joined (cheaper than a gather write)
# Sends closer together than this, with nothing received in between, are a burst and are
# coalesced; a message sent after a pause or after receiving something (a lone message, a
# request, a reply) is written at once. A loop of send() calls runs at one call every 1-3 us.
_COALESCE_GAP = 10e-6
_FLUSH_AT = 64 * 1024  # a queued batch this large is written by the sending thread itself
# The flusher writes the tail of a burst once the sender has sent nothing for this long (or at
# once, when the sender waits for input).
_TAIL_WAIT = 100e-6
_perf = time.perf_counter
_TIMEVAL = struct.Struct("@ll")
_CLOSED_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ESHUTDOWN,
                  errno.ECONNABORTED}


def closed_error(exc: OSError) -> ConnectionClosed:
    reason = {errno.EPIPE: "broken pipe", errno.ECONNRESET: "reset"}.get(exc.errno or 0, "closed")
    err = ConnectionClosed(f"connection closed by peer ({exc.strerror or exc})", reason=reason)
    err.__cause__ = exc
    return err


# Streams alive in this process, so that a fork() can disarm the child's copies (see _forked).
_live: weakref.WeakSet[FramedStream] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for stream in list(_live):
        stream._disarm_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _set_limit(decoder: object, size: int) -> None:
    if hasattr(decoder, "max_frame_size"):
        decoder.max_frame_size = size


def _identity(b: Buffer) -> bytes:
    return bytes(b)


def deadline_of(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


class Wire(Protocol):
    """The raw byte I/O a ``FramedStream`` needs. ``try_send*`` never block (0 when the kernel
    buffer is full); ``send_all`` blocks (the flusher thread's call); errors are ``OSError``."""

    def try_send(self, data: Buffer) -> int: ...

    def try_send_parts(self, parts: list[Buffer]) -> int: ...

    def send_all(self, data: Buffer) -> None: ...

    def recv_into(self, view: memoryview, timeout: float | None) -> int: ...

    def drain_nowait(self) -> None: ...

    def shutdown(self, how: int) -> None: ...

    def close(self) -> None: ...


class SocketWire:
    """The raw byte I/O a framed stream needs, on a plain connected socket.

    Other wires (TLS over a memory BIO, a pair of pipe fds) provide the same methods.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        self._out_poller: select.poll | None = None

    def try_send(self, data: Buffer) -> int:
        """Write without blocking; returns the bytes written (0 when the kernel buffer is full)."""
        try:
            return self.sock.send(data, _DONTWAIT)
        except BlockingIOError:
            return 0

    def try_send_parts(self, parts: list[Buffer]) -> int:
        try:
            return self.sock.sendmsg(parts, (), _DONTWAIT)
        except BlockingIOError:
            return 0

    def send_all(self, data: Buffer) -> None:
        """Blocking write of everything (the flusher thread's call)."""
        self.sock.sendall(data, _SEND_FLAGS)

    def wait_writable(self, timeout: float | None) -> bool:
        """Block until the socket can take more bytes; False after ``timeout``."""
        if self._out_poller is None:
            self._out_poller = select.poll()
            self._out_poller.register(self.sock.fileno(), select.POLLOUT)
        ms = -1 if timeout is None else math.ceil(timeout * 1000)
        return bool(self._out_poller.poll(ms))

    def recv_into(self, view: memoryview, timeout: float | None) -> int:
        if timeout is not None:
            ms = math.ceil(timeout * 1000)
            if not self._poller.poll(ms):
                raise Timeout(f"no message within {timeout} s")
        return self.sock.recv_into(view)

    def drain_nowait(self) -> None:
        """Discard unread input, so closing a TCP socket sends FIN, not RST (which can destroy
        our own data still in flight to the peer)."""
        try:
            while self.sock.recv(65536, socket.MSG_DONTWAIT):
                pass
        except OSError:
            pass

    def shutdown(self, how: int) -> None:
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class FramedStream:
    """A blocking, thread-safe message stream over a wire, with length-prefixed framing.

    The hot paths (``send`` of a small message with nothing queued, ``receive`` without a
    timeout) are kept to a handful of attribute reads and one syscall: in a request/reply the
    library's own cost is what stands between the caller and raw-socket latency.
    """

    reliable = True

    def __init__(self, wire: Wire, opts: TransportOptions, *, local_address: str,
                 remote_address: str, framing: Framing | None = None) -> None:
        self._wire = wire
        self._framing = framing = framing or LengthPrefixed(opts.max_frame_size)
        self._lp = type(framing) is LengthPrefixed  # inline the header for our own framing
        self._max = framing.max_frame_size
        self._high_water = opts.write_buffer
        self.local_address = local_address
        self.remote_address = remote_address
        self._dec = framing.decoder()
        self._convert: Converter = _identity
        self._safe_convert: Converter | None = None
        self._encode: Callable[[Any], Buffer] = memoryview  # payloads as given, until set_encoder
        self._safe_encode: Callable[[Any], Buffer] = memoryview
        self._pending: deque[Any] = deque()
        self._rlock = threading.Lock()
        self._eof: BaseException | None = None
        # Plain sockets skip the wire's method layer on the hot paths.
        self._plain = wire if type(wire) is SocketWire else None
        sock = self._plain.sock if self._plain is not None else None
        plain = sock is not None
        self._sock_send = sock.send if sock is not None else None
        self._sock_recv_into = sock.recv_into if sock is not None else None
        # Reads on a plain socket with our framing take the inline path.
        self._fast_read = plain and self._lp
        self._rcvtimeo: float | None = None  # the socket's SO_RCVTIMEO (None: none)
        # Write side, guarded by _wlock. _idle caches "nothing queued, nothing in flight, no
        # error, not closed": the one check a direct write needs.
        self._wlock = threading.Lock()
        self._wcond = threading.Condition(self._wlock)
        self._wbuf = bytearray()
        self._inflight = False  # the flusher is writing a chunk outside the lock
        self._idle = True
        self._ok = True  # no write error, not closed, not forked
        # Queue size at which a send leaves the inline path: _FLUSH_AT while this thread writes
        # batches itself; write_buffer while the flusher thread is in charge (the kernel was
        # full), so sends just append and never retry a write the kernel would refuse.
        self._flush_at = min(_FLUSH_AT, self._high_water)
        self._append_limit = self._flush_at
        self._last_send = 0.0
        self._messages = 0
        self._writes = 0
        self._flusher_waiting = False
        self._flusher: threading.Thread | None = None
        self._werror: ConnectionClosed | None = None
        self._closed = False
        self._wire_closed = False
        self._pid = os.getpid()
        self._forked = False
        _live.add(self)

    def _disarm_after_fork(self) -> None:
        """In a forked child: this stream belongs to the parent. Its locks may be held by
        parent threads that do not exist here and its flusher thread is gone, so every call
        refuses, and close() only drops this process's file descriptor (a shutdown would cut
        the parent's connection too)."""
        self._forked = True
        self._idle = self._ok = False
        self._fast_read = False
        self._flusher = None
        self._wlock = threading.Lock()
        self._wcond = threading.Condition(self._wlock)
        self._rlock = threading.Lock()

    def _refuse_forked(self) -> None:
        raise ProcwireError(f"this channel was opened in process {self._pid}, before a "
                            "fork(); open a new channel in this process")

    # -- conversion -------------------------------------------------------------------------
    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None:
        """``convert`` runs on every frame; on an exception ``safe`` (default: ``convert``)
        runs on each frame of that batch alone, to produce a typed error for the bad one."""
        self._convert = convert
        self._safe_convert = safe
        if self._pending:
            self._pending = deque(convert_all(list(self._pending), convert, safe))

    def unreceive(self, items: list[Any]) -> None:
        self._pending.extendleft(reversed(items))

    def limit_frames(self, size: int | None) -> None:
        """Accept frames of at most ``size`` bytes from now on (None: back to the configured
        maximum). Used while a peer has not yet proved who it is."""
        _set_limit(self._dec, self._max if size is None else min(size, self._max))

    # -- writing ----------------------------------------------------------------------------
    def set_encoder(self, encode: Callable[[Any], Buffer],
                    safe: Callable[[Any], Buffer] | None = None) -> None:
        """From now on ``send`` takes objects: ``encode`` turns one into its payload (the fast
        path, often C); when it raises, ``safe`` runs to raise the codec's typed error."""
        self._encode = encode
        self._safe_encode = safe or encode

    def send(self, obj: Any, timeout: float | None = None) -> None:
        """Send one message: written at once when nothing is queued and it is not part of a
        burst; otherwise queued behind the others (``write_buffer`` bounds the queue, and a
        full queue waits up to ``timeout``)."""
        try:
            payload = self._encode(obj)
        except Exception:
            payload = self._safe_encode(obj)
        self._messages += 1
        n = len(payload)
        if n > _SMALL:
            return self._send_large(payload, timeout)
        if self._lp:
            if n > self._max:
                raise FrameTooLarge(n, self._max)
            data: Buffer = _u32_pack(n) + payload
        else:
            data = self._framing.frame(payload)
        lock = self._wlock
        lock.acquire()
        try:
            if not self._idle:
                # A burst is under way (or we are broken): queue behind it, no clock needed.
                wbuf = self._wbuf
                if self._ok and len(wbuf) < self._append_limit:
                    wbuf += data  # the common case of a burst, kept inline
                    return None
            else:
                now = _perf()
                if now - self._last_send > _COALESCE_GAP:
                    # A lone message, a request or a reply: write it now, no added latency.
                    self._last_send = now
                    try:
                        if self._sock_send is not None:
                            sent = self._sock_send(data, _DONTWAIT)
                            self._writes += 1
                        else:
                            sent = self._wire.try_send(data)
                    except BlockingIOError:
                        sent = 0
                    except OSError as exc:
                        raise self._fail_write(exc) from exc
                    if sent == len(data):
                        return None
                    data = memoryview(data)[sent:]
                else:
                    # Right behind the previous send: a burst starts; queue it.
                    self._last_send = now
            self._append(data, timeout)
        finally:
            lock.release()
        return None

    def _send_large(self, payload: Buffer, timeout: float | None) -> None:
        parts = self._framing.frame_parts(payload)
        with self._wlock:
            # Only a plain socket: other wires (TLS) have bytes of their own in between.
            wait = self._plain.wait_writable if self._plain is not None else None
            if not self._idle or wait is None:
                for p in parts:
                    self._append(p, timeout)
                return
            # Nothing queued: write from this thread with gather writes, without copying the
            # payload (a large message amortizes its syscalls; coalescing gains nothing).
            views = [memoryview(p).cast("B") for p in parts]
            deadline = deadline_of(timeout)
            while views:
                try:
                    sent = self._wire.try_send_parts(views)  # type: ignore[arg-type]
                    self._writes += 1
                except OSError as exc:
                    raise self._fail_write(exc) from exc
                while sent and views:
                    if sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
                if views and not wait(remaining(deadline)):
                    # The peer is slow: queue the rest (never half a frame on the wire
                    # without the rest following) and let the flusher finish it.
                    for v in views:
                        self._append(v, None, force=True)
                    return

    def _append(self, data: Buffer, timeout: float | None, force: bool = False) -> None:
        # Lock held. Queue behind what is already queued or in flight, keeping the order.
        if self._forked:
            self._refuse_forked()
        if self._werror is not None or self._closed:
            self._raise_write_error()
        wbuf = self._wbuf
        if not force and len(wbuf) >= self._high_water:
            self._wait_below(self._high_water, timeout)
            wbuf = self._wbuf
        was_empty = not wbuf
        wbuf += data
        if len(wbuf) >= self._append_limit and self._append_limit == self._flush_at \
                and not self._inflight:
            self._flush_nowait()  # a big enough batch: write it from this thread
            if not self._wbuf:
                return
            # The kernel is full: the flusher takes over, with blocking writes.
            self._append_limit = self._high_water
            self._kick()
            return
        if was_empty or self._idle:
            self._kick()

    def _flush_nowait(self) -> None:
        # Lock held, nothing in flight: write what the kernel takes now, keep the rest queued.
        try:
            if self._sock_send is not None:
                sent = self._sock_send(self._wbuf, _DONTWAIT)
                self._writes += 1
            else:
                sent = self._wire.try_send(self._wbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail_write(exc)
            return  # reported by the next call
        if sent == len(self._wbuf):
            self._wbuf = bytearray()
            if self._werror is None and not self._closed and not self._forked:
                self._idle = True
        else:
            del self._wbuf[:sent]

    def _fail_write(self, exc: OSError) -> ConnectionClosed:
        # Lock held.
        err = closed_error(exc)
        self._werror = err
        self._idle = self._ok = False
        return ConnectionClosed(str(err), reason=err.reason)

    def _kick(self) -> None:
        # Lock held; something is queued: make sure the flusher will write it.
        self._idle = False
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="procwire-flush",
                                             daemon=True)
            self._flusher.start()
        elif self._flusher_waiting:
            self._wcond.notify_all()

    def _wait_below(self, level: int, timeout: float | None) -> None:
        deadline = deadline_of(timeout)
        while (len(self._wbuf) >= level or (level == 1 and self._inflight)) \
                and self._werror is None:
            left = remaining(deadline)
            if left == 0.0:
                raise Timeout(f"peer not reading: {len(self._wbuf)} bytes still queued "
                              f"after {timeout} s")
            if self._wbuf and not self._inflight and self._flusher is not None \
                    and self._flusher_waiting:
                self._wcond.notify_all()
            self._wcond.wait(left)
        if self._werror is not None:
            self._raise_write_error()

    def _raise_write_error(self) -> None:
        if self._closed:
            raise ChannelClosed("channel is closed")  # whatever the flusher saw after that
        if self._werror is not None:
            raise ConnectionClosed(str(self._werror), reason=self._werror.reason) \
                from self._werror
        raise ChannelClosed("channel is closed")

    def _flush_loop(self) -> None:
        # The tail of a burst, and whatever the kernel refused, is written from here. This
        # thread needs the GIL only to swap buffers; it waits for it at most Python's switch
        # interval (5 ms) while the sending thread runs Python code, and not at all once that
        # thread blocks (recv, sleep, I/O).
        cond = self._wcond
        while True:
            with cond:
                while not self._wbuf:
                    self._inflight = False
                    self._append_limit = self._flush_at  # the sender writes batches again
                    cond.notify_all()
                    if self._closed or self._werror is not None or self._forked:
                        self._flusher = None
                        return
                    self._idle = True
                    self._flusher_waiting = True
                    woke = cond.wait(1.0)
                    self._flusher_waiting = False
                    if not woke and not self._wbuf:
                        self._flusher = None  # idle: let the thread go, a new one comes if needed
                        return
                if self._append_limit == self._flush_at:
                    # A burst is being collected and the kernel has room: let it grow while
                    # the sender keeps sending (it writes each 64 KiB itself); take the tail
                    # once a wait passes with no new message.
                    seen = -1
                    while self._wbuf and seen != self._messages and not self._inflight \
                            and self._append_limit == self._flush_at and self._ok:
                        seen = self._messages
                        self._flusher_waiting = True
                        cond.wait(_TAIL_WAIT)
                        self._flusher_waiting = False
                    if not self._wbuf:
                        continue
                data = self._wbuf
                self._wbuf = bytearray()
                self._inflight = True
                self._idle = False
                self._append_limit = self._high_water
                cond.notify_all()
            try:
                self._wire.send_all(data)
                self._writes += 1
                self._last_send = _perf()  # a send right after this continues the burst
            except OSError as exc:
                with cond:
                    self._fail_write(exc)
                    self._inflight = False
                    self._wbuf.clear()
                    self._flusher = None
                    cond.notify_all()
                return

    def stats(self) -> dict[str, int]:
        """``messages`` sent and ``writes`` made (write calls: fewer than messages when bursts
        were coalesced), and ``queued`` bytes waiting in user space."""
        return {"messages": self._messages, "writes": self._writes, "queued": len(self._wbuf)}

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued byte is handed to the kernel."""
        with self._wcond:
            if self._wbuf or self._inflight:
                self._wait_below(1, timeout)
            elif self._werror is not None:
                self._raise_write_error()

    def _flush_before_wait(self) -> None:
        # About to block for input: send a queued tail now rather than wait for the flusher
        # thread (a request followed by its reply must not wait for a thread switch).
        if self._wlock.acquire(blocking=False):
            try:
                if self._wbuf and not self._inflight and self._werror is None:
                    self._flush_nowait()
            finally:
                self._wlock.release()

    # -- reading ----------------------------------------------------------------------------
    def receive(self, timeout: float | None = None) -> list[Any]:
        """At least one message (converted), or raises ConnectionClosed / Timeout."""
        if not self._idle:
            self._flush_before_wait()
        with self._rlock:
            if not self._fast_read or self._pending:
                return self._receive_slow(timeout)
            if timeout != self._rcvtimeo:
                if timeout is not None and timeout <= 0:
                    return self._receive_slow(timeout)
                self._set_rcvtimeo(timeout)
            try:
                frames = self._dec.fill(self._sock_recv_into)  # type: ignore[attr-defined]
            except BlockingIOError:
                raise Timeout(f"no message within {timeout} s") from None
            except OSError as exc:
                raise self._read_failed(exc) from exc
            except ProtocolError as exc:
                self._eof = exc
                self._fast_read = False
                self._abort()
                raise
            if frames:
                # Something arrived: the next send answers it, so it is written at once even
                # if it follows our previous send closely (a fast request/reply is no burst).
                self._last_send = 0.0
                convert = self._convert
                try:
                    if len(frames) == 1:
                        return [convert(frames[0])]
                    return [convert(f) for f in frames]
                except Exception:
                    return convert_all(frames, convert, self._safe_convert)
            if frames is None:
                return self._at_eof()
            # Part of a frame only: wait for the rest with the exact deadline.
            return self._receive_slow(timeout)

    def _set_rcvtimeo(self, timeout: float | None) -> None:
        # A kernel receive timeout (set once per distinct value) instead of a poll() before
        # every read: the reply in a request/reply exchange costs one syscall, not two.
        assert isinstance(self._wire, SocketWire)
        t = 0.0 if timeout is None else max(timeout, 1e-6)
        sec = int(t)
        self._wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                   _TIMEVAL.pack(sec, int((t - sec) * 1e6)))
        self._rcvtimeo = timeout

    def _receive_slow(self, timeout: float | None) -> list[Any]:
        # _rlock held.
        if self._forked:
            self._refuse_forked()
        if self._pending:
            items = list(self._pending)
            self._pending.clear()
            return items
        if self._eof is not None:
            raise self._eof
        if timeout is None and self._rcvtimeo is not None:
            self._set_rcvtimeo(None)  # a read without poll() first must not time out
        deadline = deadline_of(timeout)
        dec = self._dec
        while True:
            try:
                n = self._wire.recv_into(dec.get_buffer(), remaining(deadline))
            except (ProtocolError, Timeout):
                raise  # Timeout is an OSError (via TimeoutError): not a dead connection
            except OSError as exc:
                raise self._read_failed(exc) from exc
            if n == 0:
                return self._at_eof()
            try:
                frames = dec.buffer_updated(n)
            except ProtocolError as exc:
                self._eof = exc
                self._fast_read = False
                self._abort()
                raise
            if frames:
                self._last_send = 0.0
                return convert_all(frames, self._convert, self._safe_convert)

    def _read_failed(self, exc: OSError) -> BaseException:
        self._fast_read = False
        if self._closed:
            self._eof = ChannelClosed("channel is closed")
        else:
            self._eof = closed_error(exc)
        return self._eof

    def _at_eof(self) -> list[Any]:
        self._fast_read = False
        if self._closed:
            self._eof = ChannelClosed("channel is closed")
            raise self._eof
        try:
            self._dec.check_eof()
        except ProtocolError as exc:
            self._eof = ConnectionClosed(str(exc), reason="truncated")
            raise self._eof from exc
        self._eof = ConnectionClosed("peer closed the connection", reason="eof")
        raise self._eof

    def _abort(self) -> None:
        with self._wcond:
            self._closed = True
            self._idle = self._ok = False
            self._wbuf.clear()
            self._wcond.notify_all()
        self._wire.shutdown(socket.SHUT_RDWR)

    # -- closing ----------------------------------------------------------------------------
    def close(self, timeout: float | None = 10.0) -> None:
        """Flush what is queued (up to ``timeout``), then close. Idempotent.

        Raises ``Timeout`` (after closing) when queued messages could not be handed to the
        kernel in time because the peer stopped reading: the caller learns of the loss.
        """
        if self._forked:
            if not self._wire_closed:
                self._wire_closed = self._closed = True
                self._wire.close()
            return
        lost: Timeout | None = None
        with self._wcond:
            if self._wire_closed:
                return
            try:
                if (self._wbuf or self._inflight) and self._werror is None:
                    self._wait_below(1, timeout)
            except Timeout:
                lost = Timeout(f"closed with at least {len(self._wbuf)} queued bytes not "
                               f"delivered: the peer did not read them within {timeout} s")
            except (ConnectionClosed, ChannelClosed):
                pass  # the peer is gone: nothing could be delivered anyway
            self._closed = True
            self._idle = self._ok = False
            self._wcond.notify_all()
            self._wire_closed = True
        wire = self._wire
        wire.shutdown(socket.SHUT_WR)
        wire.drain_nowait()
        wire.shutdown(socket.SHUT_RDWR)  # wakes a reader or flusher blocked on the socket
        wire.close()
        if lost is not None:
            raise lost

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed procwire stream {self.remote_address}", ResourceWarning,
                          stacklevel=1)
            try:
                self._wire.close()
            except Exception:
                pass


# ------------------------------------------------------------------------------------------
# asyncio
# ------------------------------------------------------------------------------------------

class _FramedProtocol(asyncio.BufferedProtocol):
    def __init__(self, stream: AsyncFramedStream) -> None:
        self._s = stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._s._dec.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        s = self._s
        try:
            frames = s._dec.buffer_updated(nbytes)
        except ProtocolError as exc:
            s._set_eof(exc)
            s._transport.abort()
            return
        if frames:
            items = convert_all(frames, s._convert, s._safe_convert)
            s._inbox.extend(items)
            s._inbox_bytes += sum(len(f) for f in frames)
            s._wake()
            if s._inbox_bytes >= s._inbox_limit and not s._reading_paused:
                s._reading_paused = True
                s._transport.pause_reading()

    def eof_received(self) -> bool:
        s = self._s
        try:
            s._dec.check_eof()
            s._set_eof(ConnectionClosed("peer closed the connection", reason="eof"))
        except ProtocolError as exc:
            s._set_eof(ConnectionClosed(str(exc), reason="truncated"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        s = self._s
        if exc is None:
            s._set_eof(ConnectionClosed("connection closed", reason="eof"))
        elif isinstance(exc, OSError):
            s._set_eof(closed_error(exc))
        else:
            err = ConnectionClosed(f"connection lost: {exc}", reason="error")
            err.__cause__ = exc
            s._set_eof(err)
        s._lost = True
        s._wake_writers()

    def pause_writing(self) -> None:
        self._s._write_paused = True

    def resume_writing(self) -> None:
        self._s._write_paused = False
        self._s._wake_writers()


class AsyncFramedStream:
    """asyncio message stream over a stream transport (UNIX, TCP, TLS).

    A lone message is written at once; sends in quick succession (a burst) are collected and
    written in one go when the sending task next yields to the event loop. asyncio's transport
    buffers what the kernel refuses; ``write_buffer`` is its high-water mark, past which
    ``send`` awaits drain.
    Received messages wait in an inbox bounded by ``inbox`` bytes, past which reading pauses.
    """

    reliable = True

    def __init__(self, opts: TransportOptions, framing: Framing | None = None) -> None:
        self._framing = framing = framing or LengthPrefixed(opts.max_frame_size)
        self._dec = framing.decoder()
        self._convert: Converter = _identity
        self._safe_convert: Converter | None = None
        self._encode: Callable[[Any], Buffer] = memoryview
        self._safe_encode: Callable[[Any], Buffer] = memoryview
        self._out: bytearray | None = None  # a burst being collected (see send)
        self._last_send = 0.0
        self._inbox: deque[Any] = deque()
        self._inbox_bytes = 0
        self._inbox_limit = opts.inbox
        self._write_limit = opts.write_buffer
        self._reading_paused = False
        self._write_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._eof: BaseException | None = None
        self._lost = False
        self._closed = False
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self.local_address = ""
        self.remote_address = ""

    def protocol(self) -> _FramedProtocol:
        return _FramedProtocol(self)

    def attach(self, transport: asyncio.BaseTransport, local: str, remote: str) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=self._write_limit)
        self.local_address = local
        self.remote_address = remote

    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None:
        self._convert = convert
        self._safe_convert = safe
        if self._inbox:
            self._inbox = deque(convert_all(list(self._inbox), convert, safe))

    def unreceive(self, items: list[Any]) -> None:
        self._inbox.extendleft(reversed(items))

    def limit_frames(self, size: int | None) -> None:
        """See ``FramedStream.limit_frames``."""
        top = self._framing.max_frame_size
        _set_limit(self._dec, top if size is None else min(size, top))

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_writers(self) -> None:
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    def _set_eof(self, exc: BaseException) -> None:
        if self._eof is None:
            self._eof = exc
        self._wake()

    def set_encoder(self, encode: Callable[[Any], Buffer],
                    safe: Callable[[Any], Buffer] | None = None) -> None:
        """See ``FramedStream.set_encoder``."""
        self._encode = encode
        self._safe_encode = safe or encode

    async def send(self, obj: Any, timeout: float | None = None) -> None:
        """Send one message (see ``FramedStream.send``); awaits only when the write buffer is
        above ``write_buffer`` bytes."""
        try:
            payload = self._encode(obj)
        except Exception:
            payload = self._safe_encode(obj)
        if self._closed:
            raise ChannelClosed("channel is closed")
        if self._lost or self._transport.is_closing():
            raise self._write_closed()
        if len(payload) <= _SMALL:
            data = self._framing.frame(payload)
            out = self._out
            if out is not None:
                # A burst is being collected: it goes out in one write when this task next
                # yields to the loop (or at _FLUSH_AT bytes).
                out += data
                if len(out) >= _FLUSH_AT:
                    self._flush_out()
            else:
                now = _perf()
                if now - self._last_send > _COALESCE_GAP:
                    self._transport.write(data)  # a lone message: at once
                else:
                    self._out = bytearray(data)
                    asyncio.get_running_loop().call_soon(self._flush_out)
                self._last_send = now
        else:
            self._flush_out()
            self._transport.writelines(self._framing.frame_parts(payload))
        if self._write_paused:
            await self._drain(timeout)

    def _flush_out(self) -> None:
        out = self._out
        if out is not None:
            self._out = None
            if not self._lost and not self._transport.is_closing():
                self._transport.write(out)

    def _write_closed(self) -> ConnectionClosed:
        if isinstance(self._eof, ConnectionClosed):
            return ConnectionClosed(str(self._eof), reason=self._eof.reason)
        return ConnectionClosed("connection closed", reason="closed")

    async def _drain(self, timeout: float | None) -> None:
        while self._write_paused and not self._lost:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            try:
                async with asyncio.timeout(timeout):
                    await fut
            except TimeoutError:
                raise Timeout(f"peer not reading: write buffer full after {timeout} s") from None
        if self._lost:
            raise self._write_closed()

    async def flush(self, timeout: float | None = None) -> None:
        self._flush_out()
        deadline = deadline_of(timeout)
        # asyncio exposes no "buffer empty" event below the high-water mark; poll briefly.
        while self._transport.get_write_buffer_size() and not self._lost:
            left = remaining(deadline)
            if left == 0.0:
                raise Timeout(f"write buffer not flushed within {timeout} s")
            await asyncio.sleep(0.001)
        if self._lost and self._transport.get_write_buffer_size():
            raise self._write_closed()

    async def receive(self, timeout: float | None = None) -> list[Any]:
        self._last_send = 0.0  # what we send next answers what we receive: no burst
        if not self._inbox:
            if self._eof is not None:
                raise self._eof
            if self._closed:
                raise ChannelClosed("channel is closed")
            if self._waiter is not None:
                raise RuntimeError("receive() called while another receive() waits")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                if not self._inbox:
                    raise Timeout(f"no message within {timeout} s") from None
            finally:
                self._waiter = None
            if not self._inbox:
                if self._eof is not None:
                    raise self._eof
                raise ChannelClosed("channel is closed")
        items = list(self._inbox)
        self._inbox.clear()
        self._inbox_bytes = 0
        if self._reading_paused and not self._lost:
            self._reading_paused = False
            self._transport.resume_reading()
        return items

    async def close(self, timeout: float | None = 10.0) -> None:
        """Flush (up to ``timeout``), then close; raises ``Timeout`` after closing if queued
        messages could not be delivered in time. Idempotent."""
        if self._closed:
            return
        self._closed = True
        t = self._transport
        if t is None:
            return
        lost: Timeout | None = None
        try:
            await self.flush(timeout)
        except Timeout:
            lost = Timeout(f"closed with {t.get_write_buffer_size()} queued bytes not "
                           f"delivered: the peer did not read them within {timeout} s")
        except ConnectionClosed:
            pass
        if t.can_write_eof() and not t.is_closing():
            try:
                t.write_eof()
            except OSError:
                pass
        if lost is not None:
            t.abort()
        else:
            t.close()
        self._set_eof(ChannelClosed("channel is closed"))
        if lost is not None:
            raise lost

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_transport", None) is not None:
            warnings.warn(f"unclosed procwire stream {self.remote_address}", ResourceWarning,
                          stacklevel=1)
