"""``memory://name``: channels inside one process, with a socket's semantics.

``listen("memory://jobs")`` registers ``jobs`` in a process-wide registry (``AddressInUse`` if
it is taken; the name is freed on close, or when the listener is dropped unclosed);
``connect("memory://jobs")`` creates a connected pair of in-memory message streams and queues
the server end for ``accept``. Nothing touches the operating system, yet the behaviour is a
socket's:

* messages go through the codec (encoded on send, decoded on receive), so the receiver gets a
  copy, never an object the sender still holds;
* each direction is a queue bounded by the sender's ``write_buffer`` (bytes of encoded
  messages not yet received). When it is full ``send`` waits, then raises ``Timeout``; one
  message larger than the bound still goes through when the queue is below it;
* ``close()`` on one side: the other side receives everything sent before, then
  ``ConnectionClosed`` (reason ``"eof"``). Messages the closing side had not read are dropped,
  and the peer's later sends raise ``ConnectionClosed`` (reason ``"broken pipe"``);
* a message over the sender's ``max_frame_size`` raises ``FrameTooLarge`` (nothing sent); one
  over the receiver's ``max_frame_size`` breaks the connection, as on a socket;
* the listener's backlog holds ``backlog`` connections not yet accepted; past that, connect
  waits (up to its timeout).

Threads or one event loop: a blocking listener (``procwire.listen``) serves blocking clients
used from any threads; an asyncio listener (``procwire.aio.listen``) serves asyncio clients of
the same event loop. A blocking client cannot connect to an asyncio listener or the other way
round (``AddressError``): mixing a blocking end and an asyncio end of one channel is not
supported.

After ``fork()`` the child starts with an empty registry, and memory channels and listeners
inherited from the parent raise ``ProcwireError`` when used (their other ends stayed behind).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import warnings
import weakref
from collections import deque
from typing import Any

from .._errors import (
    AddressError,
    AddressInUse,
    ChannelClosed,
    ConnectionClosed,
    ConnectionRefused,
    FrameTooLarge,
    ProcwireError,
    Timeout,
)
from .._url import Address
from ._sockstream import deadline_of, remaining
from .base import Buffer, Converter, TransportOptions, convert_all

LOCAL_ONLY = True

__all__ = [
    "AsyncMemoryListener",
    "AsyncMemoryStream",
    "MemoryListener",
    "MemoryStream",
    "aconnect",
    "alisten",
    "apair",
    "connect",
    "listen",
    "pair",
]

# Weak values: a listener dropped without close() frees its name (and warns, via its streams).
_registry: weakref.WeakValueDictionary[str, MemoryListener | AsyncMemoryListener] = \
    weakref.WeakValueDictionary()
_registry_lock = threading.Lock()
_ids = itertools.count(1)
# Bumped in a forked child: a memory channel's other end (a thread, a task) did not come along,
# so objects made before the fork refuse use instead of waiting forever on a copy.
_generation = 0


def _after_fork_in_child() -> None:
    global _generation, _registry_lock
    _generation += 1
    _registry_lock = threading.Lock()  # another thread may have held it at fork time
    _registry.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _refuse_forked() -> ProcwireError:
    return ProcwireError("this memory:// channel or listener belongs to the parent process "
                         "(created before a fork()); open a new one in this process")


def _identity(b: Buffer) -> bytes:
    return bytes(b)


def _check(opts: TransportOptions) -> None:
    if opts.extra:
        raise AddressError(f"unknown option(s) for memory://: {', '.join(sorted(opts.extra))}")


def _eof() -> ConnectionClosed:
    return ConnectionClosed("peer closed the connection", reason="eof")


def _broken() -> ConnectionClosed:
    return ConnectionClosed("peer closed the connection", reason="broken pipe")


# ------------------------------------------------------------------------------------------
# Blocking
# ------------------------------------------------------------------------------------------

class _Direction:
    """One direction of a connection: a byte-bounded queue of encoded messages.

    Guarded by the connection's lock; ``readable`` and ``writable`` are conditions on it.
    """

    __slots__ = ("error", "limit", "max_frame", "queue", "queued", "readable", "reader_gone",
                 "writable", "writer_gone")

    def __init__(self, lock: threading.Lock, limit: int, max_frame: int) -> None:
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.limit = limit  # the sender's write_buffer
        self.max_frame = max_frame  # the receiver's max_frame_size
        self.writer_gone = False
        self.reader_gone = False
        self.error: BaseException | None = None  # set when the connection was broken
        self.readable = threading.Condition(lock)
        self.writable = threading.Condition(lock)


class MemoryStream:
    """A blocking, thread-safe in-memory message stream (one end of a connection)."""

    reliable = True

    def __init__(self, lock: threading.Lock, out: _Direction, inp: _Direction,
                 opts: TransportOptions, local_address: str, remote_address: str) -> None:
        self._lock = lock
        self._out = out
        self._in = inp
        self._gen = _generation
        self._max_frame = opts.max_frame_size
        self._convert: Converter = _identity
        self._safe: Converter | None = None
        self._pending: deque[Any] = deque()
        self._eof: BaseException | None = None
        self._closed = False
        self.local_address = local_address
        self.remote_address = remote_address

    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None:
        self._convert = convert
        self._safe = safe
        if self._pending:
            self._pending = deque(convert_all(list(self._pending), convert, safe))

    def unreceive(self, items: list[Any]) -> None:
        self._pending.extendleft(reversed(items))

    def send(self, payload: Buffer, timeout: float | None = None) -> None:
        if self._gen != _generation:
            raise _refuse_forked()
        n = len(payload)
        if n > self._max_frame:
            raise FrameTooLarge(n, self._max_frame)
        data = bytes(payload)  # a copy: the caller may reuse its buffer
        out = self._out
        with self._lock:
            if self._closed:
                raise ChannelClosed("channel is closed")
            deadline = None
            while True:
                if out.error is not None:
                    raise ConnectionClosed(str(out.error), reason="closed") from out.error
                if out.reader_gone:
                    raise _broken()
                if out.queued < out.limit:
                    break
                if deadline is None:
                    deadline = deadline_of(timeout)
                left = remaining(deadline)
                if left == 0.0:
                    raise Timeout(f"peer not reading: {out.queued} bytes still queued after "
                                  f"{timeout} s")
                out.writable.wait(left)
                if self._closed:
                    raise ChannelClosed("channel is closed")
            if n > out.max_frame:
                # What a socket receiver does with an oversized frame: the stream is broken.
                err = FrameTooLarge(n, out.max_frame)
                self._break(err)
                raise ConnectionClosed(f"peer refused the message: {err}",
                                       reason="closed") from err
            out.queue.append(data)
            out.queued += n
            out.readable.notify()

    def _break(self, err: BaseException) -> None:
        # Called with the lock held.
        for d in (self._out, self._in):
            d.error = err
            d.queue.clear()
            d.queued = 0
            d.readable.notify_all()
            d.writable.notify_all()

    def receive(self, timeout: float | None = None) -> list[Any]:
        """At least one message (converted), or raises ConnectionClosed / Timeout."""
        if self._gen != _generation:
            raise _refuse_forked()
        if self._pending:
            items = list(self._pending)
            self._pending.clear()
            return items
        inp = self._in
        with self._lock:
            deadline = None
            while not inp.queue:
                if self._closed:
                    raise ChannelClosed("channel is closed")
                if inp.error is not None:
                    if self._eof is None:
                        self._eof = ConnectionClosed(f"connection broken: {inp.error}",
                                                     reason="closed")
                        self._eof.__cause__ = inp.error
                    raise self._eof
                if inp.writer_gone:
                    if self._eof is None:
                        self._eof = _eof()
                    raise self._eof
                if deadline is None:
                    deadline = deadline_of(timeout)
                left = remaining(deadline)
                if left == 0.0:
                    raise Timeout(f"no message within {timeout} s")
                inp.readable.wait(left)
            frames = list(inp.queue)
            inp.queue.clear()
            inp.queued = 0
            inp.writable.notify_all()
        return convert_all(frames, self._convert, self._safe)

    def flush(self, timeout: float | None = None) -> None:
        """Nothing to do: a sent message is already where the peer reads it."""

    def close(self, timeout: float | None = None) -> None:
        """Close this end: the peer reads what was sent, then gets ConnectionClosed.
        Idempotent."""
        if self._gen != _generation:
            self._closed = True  # the peer is in the parent; its lock may be held forever
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._out.writer_gone = True
            self._out.readable.notify_all()
            self._in.reader_gone = True
            self._in.queue.clear()  # unread input is dropped, as on a socket
            self._in.queued = 0
            # Wake our own blocked reader and writer (they raise ChannelClosed) and the peer's
            # blocked writer (it gets "broken pipe").
            self._in.readable.notify_all()
            self._in.writable.notify_all()
            self._out.writable.notify_all()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed procwire stream {self.remote_address}", ResourceWarning,
                          stacklevel=1)


def _connected(a_opts: TransportOptions, b_opts: TransportOptions, a_local: str,
               b_local: str) -> tuple[MemoryStream, MemoryStream]:
    lock = threading.Lock()
    ab = _Direction(lock, a_opts.write_buffer, b_opts.max_frame_size)
    ba = _Direction(lock, b_opts.write_buffer, a_opts.max_frame_size)
    return (MemoryStream(lock, ab, ba, a_opts, a_local, b_local),
            MemoryStream(lock, ba, ab, b_opts, b_local, a_local))


def pair(opts: TransportOptions) -> tuple[MemoryStream, MemoryStream]:
    """Two connected blocking streams (``procwire.testing.memory_pair`` wraps them)."""
    n = next(_ids)
    return _connected(opts, opts, f"memory://(pair-{n}-a)", f"memory://(pair-{n}-b)")


class MemoryListener:
    """Blocking listener for ``memory://name``: connections wait in a bounded backlog."""

    def __init__(self, name: str, opts: TransportOptions) -> None:
        self._name = name
        self._opts = opts
        self.address = f"memory://{name}"
        self._gen = _generation
        self._cond = threading.Condition(threading.Lock())
        self._backlog: deque[MemoryStream] = deque()
        self._limit = max(1, opts.backlog)
        self._closed = False

    def _enqueue(self, opts: TransportOptions, timeout: float | None) -> MemoryStream:
        if self._gen != _generation:
            raise _refuse_forked()
        with self._cond:
            deadline = deadline_of(timeout)
            while len(self._backlog) >= self._limit and not self._closed:
                left = remaining(deadline)
                if left == 0.0:
                    raise Timeout(f"{self.address}: backlog full for {timeout} s")
                self._cond.wait(left)
            if self._closed:
                raise ConnectionRefused(f"nothing listens at {self.address}")
            n = next(_ids)
            client, server = _connected(opts, self._opts, f"memory://{self._name}#{n}",
                                        self.address)
            self._backlog.append(server)
            self._cond.notify_all()
            return client

    def accept(self, timeout: float | None = None) -> MemoryStream:
        if self._gen != _generation:
            raise _refuse_forked()
        with self._cond:
            deadline = deadline_of(timeout)
            while True:
                if self._closed:
                    raise ChannelClosed("listener is closed")
                if self._backlog:
                    stream = self._backlog.popleft()
                    self._cond.notify_all()
                    return stream
                left = remaining(deadline)
                if left == 0.0:
                    raise Timeout(f"no connection within {timeout} s")
                self._cond.wait(left)

    def close(self) -> None:
        if self._gen != _generation:
            self._closed = True
            return
        with _registry_lock:
            if _registry.get(self._name) is self:
                del _registry[self._name]
        with self._cond:
            if self._closed:
                return
            self._closed = True
            orphans = list(self._backlog)
            self._backlog.clear()
            self._cond.notify_all()
        for stream in orphans:  # their clients see the connection end, as with a socket
            stream.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed procwire listener {self.address}", ResourceWarning,
                          stacklevel=1)


def _lookup(addr: Address) -> MemoryListener | AsyncMemoryListener:
    with _registry_lock:
        listener = _registry.get(addr.path)
    if listener is None:
        raise ConnectionRefused(f"nothing listens at memory://{addr.path}")
    return listener


def _register(addr: Address, listener: MemoryListener | AsyncMemoryListener) -> None:
    listener._closed = True  # until registered: a refused listener is not "left unclosed"
    with _registry_lock:
        old = _registry.get(addr.path)
        if isinstance(old, AsyncMemoryListener) and old._loop.is_closed():
            old = None  # stale: its event loop ended without closing it
        if old is not None and not old._closed:
            raise AddressInUse(f"memory://{addr.path} is already in use")
        _registry[addr.path] = listener
        listener._closed = False


def listen(addr: Address, opts: TransportOptions) -> MemoryListener:
    _check(opts)
    listener = MemoryListener(addr.path, opts)
    _register(addr, listener)
    return listener


def connect(addr: Address, opts: TransportOptions, timeout: float | None) -> MemoryStream:
    _check(opts)
    listener = _lookup(addr)
    if not isinstance(listener, MemoryListener):
        raise AddressError(f"memory://{addr.path} is served by an asyncio listener; "
                           "connect with procwire.aio.connect from its event loop")
    return listener._enqueue(opts, timeout)


# ------------------------------------------------------------------------------------------
# asyncio
# ------------------------------------------------------------------------------------------

def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for w in waiters:
        if not w.done():
            w.set_result(None)
    waiters.clear()


async def _wait(waiters: list[asyncio.Future[None]], deadline: float | None) -> bool:
    """Wait to be woken; False when the deadline passed first."""
    left = remaining(deadline)
    if left == 0.0:
        return False
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        async with asyncio.timeout(left):
            await fut
    except TimeoutError:
        return False
    finally:
        if fut in waiters:
            waiters.remove(fut)
    return True


class _ADirection:
    """One direction of an asyncio connection. Only touched from one event loop, so no lock;
    waiters are futures created when someone waits (nothing binds to a loop before)."""

    __slots__ = ("error", "limit", "max_frame", "queue", "queued", "reader_gone", "readers",
                 "writer_gone", "writers")

    def __init__(self, limit: int, max_frame: int) -> None:
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.limit = limit
        self.max_frame = max_frame
        self.writer_gone = False
        self.reader_gone = False
        self.error: BaseException | None = None
        self.readers: list[asyncio.Future[None]] = []
        self.writers: list[asyncio.Future[None]] = []


class AsyncMemoryStream:
    """The asyncio twin of ``MemoryStream`` (both ends in one event loop)."""

    reliable = True

    def __init__(self, out: _ADirection, inp: _ADirection, opts: TransportOptions,
                 local_address: str, remote_address: str) -> None:
        self._out = out
        self._in = inp
        self._gen = _generation
        self._max_frame = opts.max_frame_size
        self._convert: Converter = _identity
        self._safe: Converter | None = None
        self._pending: deque[Any] = deque()
        self._eof: BaseException | None = None
        self._closed = False
        self.local_address = local_address
        self.remote_address = remote_address

    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None:
        self._convert = convert
        self._safe = safe
        if self._pending:
            self._pending = deque(convert_all(list(self._pending), convert, safe))

    def unreceive(self, items: list[Any]) -> None:
        self._pending.extendleft(reversed(items))

    async def send(self, payload: Buffer, timeout: float | None = None) -> None:
        if self._gen != _generation:
            raise _refuse_forked()
        n = len(payload)
        if n > self._max_frame:
            raise FrameTooLarge(n, self._max_frame)
        data = bytes(payload)
        out = self._out
        deadline = None
        while True:
            if self._closed:
                raise ChannelClosed("channel is closed")
            if out.error is not None:
                raise ConnectionClosed(str(out.error), reason="closed") from out.error
            if out.reader_gone:
                raise _broken()
            if out.queued < out.limit:
                break
            if deadline is None:
                deadline = deadline_of(timeout)
            if not await _wait(out.writers, deadline):
                raise Timeout(f"peer not reading: {out.queued} bytes still queued after "
                              f"{timeout} s")
        if n > out.max_frame:
            err = FrameTooLarge(n, out.max_frame)
            self._break(err)
            raise ConnectionClosed(f"peer refused the message: {err}", reason="closed") from err
        out.queue.append(data)
        out.queued += n
        _wake(out.readers)

    def _break(self, err: BaseException) -> None:
        for d in (self._out, self._in):
            d.error = err
            d.queue.clear()
            d.queued = 0
            _wake(d.readers)
            _wake(d.writers)

    async def receive(self, timeout: float | None = None) -> list[Any]:
        if self._gen != _generation:
            raise _refuse_forked()
        if self._pending:
            items = list(self._pending)
            self._pending.clear()
            return items
        inp = self._in
        deadline = None
        while not inp.queue:
            if self._closed:
                raise ChannelClosed("channel is closed")
            if inp.error is not None:
                if self._eof is None:
                    self._eof = ConnectionClosed(f"connection broken: {inp.error}",
                                                 reason="closed")
                    self._eof.__cause__ = inp.error
                raise self._eof
            if inp.writer_gone:
                if self._eof is None:
                    self._eof = _eof()
                raise self._eof
            if deadline is None:
                deadline = deadline_of(timeout)
            if not await _wait(inp.readers, deadline):
                raise Timeout(f"no message within {timeout} s")
        frames = list(inp.queue)
        inp.queue.clear()
        inp.queued = 0
        _wake(inp.writers)
        return convert_all(frames, self._convert, self._safe)

    async def flush(self, timeout: float | None = None) -> None:
        """Nothing to do: a sent message is already where the peer reads it."""

    async def close(self, timeout: float | None = None) -> None:
        """Close this end: the peer reads what was sent, then gets ConnectionClosed."""
        self.close_nowait()

    def close_nowait(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.writer_gone = True
        _wake(self._out.readers)
        self._in.reader_gone = True
        self._in.queue.clear()
        self._in.queued = 0
        _wake(self._in.readers)
        _wake(self._in.writers)
        _wake(self._out.writers)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed procwire stream {self.remote_address}", ResourceWarning,
                          stacklevel=1)


def _aconnected(a_opts: TransportOptions, b_opts: TransportOptions, a_local: str,
                b_local: str) -> tuple[AsyncMemoryStream, AsyncMemoryStream]:
    ab = _ADirection(a_opts.write_buffer, b_opts.max_frame_size)
    ba = _ADirection(b_opts.write_buffer, a_opts.max_frame_size)
    return (AsyncMemoryStream(ab, ba, a_opts, a_local, b_local),
            AsyncMemoryStream(ba, ab, b_opts, b_local, a_local))


def apair(opts: TransportOptions) -> tuple[AsyncMemoryStream, AsyncMemoryStream]:
    """Two connected asyncio streams (``procwire.testing.amemory_pair`` wraps them). Not a
    coroutine: creating them binds nothing to an event loop."""
    n = next(_ids)
    return _aconnected(opts, opts, f"memory://(pair-{n}-a)", f"memory://(pair-{n}-b)")


class AsyncMemoryListener:
    """asyncio listener for ``memory://name``; clients must run in the same event loop."""

    def __init__(self, name: str, opts: TransportOptions,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._name = name
        self._opts = opts
        self._loop = loop
        self._gen = _generation
        self.address = f"memory://{name}"
        self._backlog: deque[AsyncMemoryStream] = deque()
        self._limit = max(1, opts.backlog)
        self._acceptors: list[asyncio.Future[None]] = []
        self._connectors: list[asyncio.Future[None]] = []
        self._closed = False

    async def _enqueue(self, opts: TransportOptions,
                       timeout: float | None) -> AsyncMemoryStream:
        if self._gen != _generation:
            raise _refuse_forked()
        if asyncio.get_running_loop() is not self._loop:
            raise AddressError(f"{self.address} is served from another event loop")
        deadline = deadline_of(timeout)
        while len(self._backlog) >= self._limit and not self._closed:
            if not await _wait(self._connectors, deadline):
                raise Timeout(f"{self.address}: backlog full for {timeout} s")
        if self._closed:
            raise ConnectionRefused(f"nothing listens at {self.address}")
        n = next(_ids)
        client, server = _aconnected(opts, self._opts, f"memory://{self._name}#{n}",
                                     self.address)
        self._backlog.append(server)
        _wake(self._acceptors)
        return client

    async def accept(self, timeout: float | None = None) -> AsyncMemoryStream:
        if self._gen != _generation:
            raise _refuse_forked()
        deadline = deadline_of(timeout)
        while True:
            if self._closed:
                raise ChannelClosed("listener is closed")
            if self._backlog:
                stream = self._backlog.popleft()
                _wake(self._connectors)
                return stream
            if not await _wait(self._acceptors, deadline):
                raise Timeout(f"no connection within {timeout} s")

    async def close(self) -> None:
        with _registry_lock:
            if _registry.get(self._name) is self:
                del _registry[self._name]
        if self._closed:
            return
        self._closed = True
        orphans = list(self._backlog)
        self._backlog.clear()
        _wake(self._acceptors)
        _wake(self._connectors)
        for stream in orphans:
            stream.close_nowait()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed procwire listener {self.address}", ResourceWarning,
                          stacklevel=1)


async def alisten(addr: Address, opts: TransportOptions) -> AsyncMemoryListener:
    _check(opts)
    listener = AsyncMemoryListener(addr.path, opts, asyncio.get_running_loop())
    _register(addr, listener)
    return listener


async def aconnect(addr: Address, opts: TransportOptions,
                   timeout: float | None) -> AsyncMemoryStream:
    _check(opts)
    listener = _lookup(addr)
    if not isinstance(listener, AsyncMemoryListener):
        raise AddressError(f"memory://{addr.path} is served by a blocking listener; "
                           "connect with procwire.connect")
    return await listener._enqueue(opts, timeout)
