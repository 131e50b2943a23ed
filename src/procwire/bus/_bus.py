"""``Bus`` (blocking) and ``AsyncBus`` (asyncio): the public face of the event bus."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from .._errors import (
    ChannelClosed,
    ConnectionClosed,
    EncodeError,
    MessageTooLarge,
    ProcwireError,
    Timeout,
)
from ._backend import Backend, backend_for
from ._core import (
    DEFAULT_MAXSIZE,
    DEFAULT_POLICY,
    AsyncDispatcher,
    BusCore,
    Dispatcher,
    Event,
    Subscription,
    ThreadDispatcher,
    check_policy,
)
from ._errors import NoResponder, RemoteError
from ._patterns import MAX_NAME, RESERVED_PREFIX, check_name, check_pattern

__all__ = ["AsyncBus", "AsyncSubscription", "Bus"]

log = logging.getLogger("procwire.bus")

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_MESSAGE = 1 << 20



def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _error_reply(cid: Any, exc: BaseException) -> dict[str, Any]:
    return {"id": cid, "error": {"type": type(exc).__name__, "message": str(exc)}}


# This process's pid, kept by a fork hook: emit checks it on every call (a getpid each).
_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def _check_emit_name(event: str) -> None:
    check_name(event)
    if event.startswith(RESERVED_PREFIX):
        raise ValueError(f"event names under {RESERVED_PREFIX!r} are the bus's own notices")


def _check_emit_names(batch: list[tuple[str, Any]]) -> None:
    last: object = None
    for name, _ in batch:
        if name is not last:  # a run of one name (the same str object) is checked once
            _check_emit_name(name)
            last = name


def _raise_for_reply(name: str, reply: dict[str, Any]) -> Any:
    if reply.get("closed"):
        raise ChannelClosed("the bus was closed while waiting for a reply")
    if reply.get("no_responder") is True:  # the broker's answer when nobody handles it
        raise NoResponder(name)
    lost = reply.get("lost")
    if lost:  # the local broker's direct path: the answering bus went away (see _direct)
        raise ConnectionClosed(f"the bus answering {name!r} went away before it replied "
                               f"(its handler may have run): {lost}", reason="lost")
    error = reply.get("error")
    if error is not None:
        if isinstance(error, dict):
            raise RemoteError(name, str(error.get("type", "Error")), str(error.get("message", "")))
        raise RemoteError(name, "Error", str(error))
    return reply.get("data")


def _close_quietly(core: BusCore, timeout: float) -> None:
    try:
        core.close(timeout)
    except Exception as exc:
        log.error("closing an unclosed bus: %s", exc)


def _close_in_background(core: BusCore, emit_timeout: float | None) -> None:
    """An unclosed bus's finaliser must not block: the cyclic GC may run it on any thread,
    including the bus's own flusher (holding the outbox lock: a blocking close deadlocks) or
    an asyncio loop. The close (a Redis bus flushes what it queued, bounded by emit_timeout)
    goes to a daemon thread; at exit the atexit flush covers it."""
    timeout = 30.0 if emit_timeout is None else emit_timeout
    if sys.is_finalizing():
        # Interpreter exit, after the atexit flush published what was queued. No new thread
        # can start now, and the daemon threads (reader, flusher, a socket's writer) are
        # stopped wherever they were when they next wanted the GIL, holding any lock they
        # had: a close could wait on such a lock forever (it did). The OS closes the sockets.
        core.closed = True
        return
    threading.Thread(target=_close_quietly, args=(core, timeout), daemon=True,
                     name="procwire-bus-close-unclosed").start()


class _BusBase:
    """What the two twins share: construction, subscriptions (no I/O), stats."""

    _core: BusCore
    _backend: Backend

    def __init__(self, url: str | None, *, channel: str, maxsize: int, policy: str,
                 max_message_size: int, emit_timeout: float | None,
                 events: Dispatcher, requests: Dispatcher) -> None:
        if url is None:
            url = "broker://"  # this user's local broker (PROCWIRE_BROKER names another)
        check_policy(policy, maxsize)
        self.url = url
        self.maxsize = maxsize
        self.policy = policy
        self.emit_timeout = emit_timeout
        self._backend = backend_for(url, channel=channel, max_message_size=max_message_size,
                                    emit_timeout=emit_timeout)
        self._core = BusCore(self._backend, events=events, requests=requests)
        self._pid = os.getpid()
        self._ids = itertools.count(1)

    def _check_usable(self) -> None:
        if self._core.closed:
            raise ChannelClosed("this bus is closed")
        if _pid != self._pid:
            raise ProcwireError("this bus was created in another process (before a fork); "
                                "create a new one in this process")

    def _subscription(self, pattern: str, maxsize: int | None, policy: str | None,
                      **kw: Any) -> Subscription:
        self._check_usable()
        return Subscription(self._core, check_pattern(pattern),
                            maxsize=self.maxsize if maxsize is None else maxsize,
                            policy=self.policy if policy is None else policy, **kw)

    def _handler_sub(self, pattern: str, handler: Callable[..., Any], *, maxsize: int | None,
                     policy: str | None, with_event: bool, once: bool) -> Subscription:
        if not callable(handler):
            raise TypeError(f"a handler is callable, not {type(handler).__name__}")
        if with_event:
            def callback(ev: Event) -> Any:
                return handler(ev.name, ev.data)
        else:
            def callback(ev: Event) -> Any:
                return handler(ev.data)
        sub = self._subscription(pattern, maxsize, policy, callback=callback,
                                 dispatcher=self._core.events)
        sub.handler = handler
        sub.once = once
        self._core.add(sub)
        return sub

    def _remove(self, pattern: str, handler: Callable[..., Any] | None) -> int:
        subs = self._core.find(pattern, handler)
        for sub in subs:
            sub.close()
        return len(subs)

    def _request_envelope(self, data: Any) -> tuple[str, dict[str, Any]]:
        cid = f"{self._backend.reply_to}.{next(self._ids)}"
        return cid, {"id": cid, "reply_to": self._backend.reply_to, "data": data}

    def subscriptions(self) -> list[Subscription]:
        """The live subscriptions (handlers and iterators)."""
        return self._core.subscriptions()

    def stats(self) -> dict[str, Any]:
        """Counters: ``emitted``, ``received``, ``dropped``, ``blocked``,
        ``overflow_disconnects``, ``handler_errors``, requests, ``notices`` (gaps, bad
        messages), and the backend's own (``reconnects``, ``bad_messages``...)."""
        return self._core.stats()

    @property
    def closed(self) -> bool:
        return self._core.closed


class Bus(_BusBase):
    """An event bus with request/reply (blocking API; ``procwire.aio.Bus`` for asyncio).

    ``url``: None (the default) or ``broker://`` for this user's local broker, started in
    the background when none runs (``broker:///path.sock`` or ``PROCWIRE_BROKER`` name
    another socket); ``memory://NAME`` (one process); ``redis://HOST:PORT/DB`` or
    ``rediss://`` (across machines; events go as JSON ``{"event": name, "data": data}`` on the
    Redis channel ``channel``). ``channel`` also separates buses on one broker.

    Handlers run on a dispatcher thread (request handlers, one at a time, also on the local
    broker's direct-path threads), never in ``emit``; a handler that raises is logged and
    stays subscribed. Every subscription has a bounded buffer (``maxsize`` events); ``policy``
    says what happens when it fills: ``block`` (the delivery waits), ``drop_oldest``,
    ``disconnect``. ``emit`` waits up to ``emit_timeout`` (or its own ``timeout=``) for room in
    the outbox of its pipelining flusher (local broker, Redis; ``memory://``: none), then
    raises ``procwire.Timeout``; an event the flusher could not publish in that time is raised
    by the next ``emit``/``flush``/``close``: never dropped silently.

    >>> bus = Bus("memory://doc")
    >>> got = bus.subscribe("user.*")
    >>> bus.emit("user.created", {"id": 1})
    1
    >>> got.get(timeout=1)
    Event(name='user.created', data={'id': 1})
    >>> bus.close()
    """

    def __init__(self, url: str | None = None, *, channel: str = "procwire",
                 maxsize: int = DEFAULT_MAXSIZE, policy: str = DEFAULT_POLICY,
                 max_message_size: int = DEFAULT_MAX_MESSAGE,
                 timeout: float | None = DEFAULT_TIMEOUT,
                 emit_timeout: float | None = DEFAULT_TIMEOUT) -> None:
        super().__init__(url, channel=channel, maxsize=maxsize, policy=policy,
                         max_message_size=max_message_size, emit_timeout=emit_timeout,
                         events=ThreadDispatcher("procwire-bus-events"),
                         requests=ThreadDispatcher("procwire-bus-requests"))
        self._core.pattern_timeout = timeout
        # Request handlers run one at a time: on the requests dispatcher, or on the thread of
        # a backend's direct path (enable_inline), which then calls them itself.
        self._serve_lock = threading.Lock()
        self._backend.enable_inline(self._core.answer_now)
        self._backend.start(self._core, timeout)

    # -- events ----------------------------------------------------------------------------

    def on(self, pattern: str, handler: Callable[..., Any] | None = None, *,
           maxsize: int | None = None, policy: str | None = None,
           with_event: bool = False) -> Any:
        """Call ``handler(data)`` (``handler(name, data)`` with ``with_event=True``) for every
        event matching ``pattern``; also a decorator. Returns the handler."""
        if handler is None:
            def decorator(fn: F) -> F:
                self.on(pattern, fn, maxsize=maxsize, policy=policy, with_event=with_event)
                return fn
            return decorator
        if inspect.iscoroutinefunction(handler):
            raise TypeError("a coroutine handler needs procwire.aio.Bus (this Bus runs "
                            "handlers on a thread)")
        self._handler_sub(pattern, handler, maxsize=maxsize, policy=policy,
                          with_event=with_event, once=False)
        return handler

    def once(self, pattern: str, handler: Callable[..., Any] | None = None, *,
             with_event: bool = False) -> Any:
        """Like ``on``, for the first matching event only."""
        if handler is None:
            def decorator(fn: F) -> F:
                self.once(pattern, fn, with_event=with_event)
                return fn
            return decorator
        self._handler_sub(pattern, handler, maxsize=None, policy=None, with_event=with_event,
                          once=True)
        return handler

    def off(self, pattern: str, handler: Callable[..., Any] | None = None) -> int:
        """Remove ``handler`` (or every handler) registered on ``pattern``; how many."""
        return self._remove(pattern, handler)

    def emit(self, event: str, data: Any = None, *, timeout: float | None = None,
             confirm: bool = False) -> int:
        """Publish ``event`` with ``data`` (JSON-encodable) to every bus; returns how many
        buses received it, or -1 when that is not known yet: on the local broker and on
        ``redis://`` emit queues the event for a background flusher that pipelines it
        (``confirm=True`` waits for the confirmation and returns the count; ``flush()`` waits
        for all).

        ``timeout`` (default ``emit_timeout``) bounds the wait for an unreachable backend or a
        full outbox: then ``procwire.Timeout``. A queued event that could not be published
        within its timeout is counted and raised by the next ``emit``, ``flush`` or ``close``:
        never dropped silently."""
        if not (type(event) is str and 0 < len(event) <= MAX_NAME  # the usual case, inline
                and not event.startswith(RESERVED_PREFIX)):
            _check_emit_name(event)
        if self._core.closed or _pid != self._pid:
            self._check_usable()
        t = self.emit_timeout if timeout is None else timeout
        try:
            if confirm:
                n = self._backend.publish_confirmed(event, data, t)
            else:
                n = self._backend.publish(event, data, t)
        except ProcwireError as exc:
            # an earlier event's failure, reported after this one was queued: count it
            self._core.emitted += getattr(exc, "queued", 0)
            raise
        self._core.emitted += 1
        return n

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every event emitted so far is confirmed by the backend (the local
        broker and Redis queue them); raises what could not be published, or
        ``procwire.Timeout`` after ``timeout`` (default ``emit_timeout``; the events stay
        queued)."""
        self._check_usable()
        self._backend.flush(self.emit_timeout if timeout is None else timeout)

    def emit_many(self, events: Iterable[tuple[str, Any]], *,
                  timeout: float | None = None) -> None:
        """Publish several ``(event, data)`` pairs in order, pipelined where the backend can
        (Redis: through the outbox, with the emits around it; the local broker: as one batch
        frame, after the emits before it); returns once all are confirmed.
        Every event is checked and encoded before any is sent."""
        batch = list(events)
        _check_emit_names(batch)
        self._check_usable()
        try:
            self._backend.publish_many(batch, self.emit_timeout if timeout is None else timeout)
        except ProcwireError as exc:
            self._core.emitted += getattr(exc, "queued", 0)
            raise
        self._core.emitted += len(batch)

    def subscribe(self, pattern: str, *, maxsize: int | None = None, policy: str | None = None,
                  timeout: float | None = None) -> Subscription:
        """An iterator over events matching ``pattern`` (``Event(name, data)``); ``timeout``
        bounds the wait for each one (``procwire.Timeout``). Close it when done."""
        sub = self._subscription(pattern, maxsize, policy, timeout=timeout)
        self._core.add(sub)
        return sub

    # -- request/reply ---------------------------------------------------------------------

    def handle(self, name: str, fn: Callable[[Any], Any] | None = None, *,
               timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """Answer requests for ``name`` with ``fn(data)``; also a decorator. An exception in
        ``fn`` goes back to the requester as ``RemoteError``. Returns once requests reach
        this bus (``timeout`` bounds that)."""
        if fn is None:
            def decorator(f: F) -> F:
                self.handle(name, f, timeout=timeout)
                return f
            return decorator
        check_name(name, "request name")
        if not callable(fn) or inspect.iscoroutinefunction(fn):
            raise TypeError("a request handler is a plain callable (coroutines: procwire.aio)")
        backend, core = self._backend, self._core
        lock = self._serve_lock

        def answer(request: dict[str, Any], direct: bool = False) -> dict[str, Any] | None:
            cid = request["id"]
            # One handler at a time per bus, whichever thread runs it. Waiting for the lock
            # gives up once the bus closes (a handler may be closing it, and close() waits
            # for the thread waiting here).
            while not lock.acquire(timeout=0.05):
                if core.closed:
                    return _error_reply(cid, ChannelClosed(
                        "the bus closed before this request's handler ran"))
            try:
                if direct and sub.closed:
                    return None  # unhandled while it waited: "moved", nothing ran
                try:
                    return {"id": cid, "data": fn(request.get("data"))}
                except Exception as exc:
                    log.info("request handler for %r raised %r (sent back as RemoteError)",
                             name, exc)
                    return _error_reply(cid, exc)
            finally:
                lock.release()

        def serve(request: dict[str, Any]) -> None:
            cid, reply_to = request["id"], request["reply_to"]
            reply = answer(request)
            assert reply is not None
            try:
                try:
                    backend.reply(reply_to, reply, self.emit_timeout)
                except (EncodeError, MessageTooLarge) as exc:
                    backend.reply(reply_to, _error_reply(cid, exc), self.emit_timeout)
                core.requests_served += 1
            except ProcwireError as exc:
                log.warning("could not send the reply to %r: %s", name, exc)

        self._check_usable()
        sub = Subscription(core, name, maxsize=self.maxsize, policy=self.policy,
                           callback=serve, dispatcher=core.requests, kind="requests")
        sub.handler = fn
        sub.answer = answer
        core.add_responder(name, sub)
        try:
            backend.add_responder(name, timeout)
        except BaseException:
            core.remove_responder(name)
            raise
        return fn

    def unhandle(self, name: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Stop answering ``name``. Requests stop reaching this bus (confirmed by the backend)
        before the handler goes, so that none that arrives meanwhile is dropped."""
        if self._core.has_responder(name):
            try:
                self._backend.remove_responder(name, timeout)
            finally:
                self._core.remove_responder(name)

    def request(self, name: str, data: Any = None, *,
                timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """Send a request to the bus that handles ``name`` and return its reply.

        Raises ``NoResponder`` (no bus handles it), ``RemoteError`` (the handler raised; with
        its exception's type name and message) or ``procwire.Timeout``. When several buses
        handle one name, exactly one of them gets each request, in turn, on every backend.
        """
        check_name(name, "request name")
        self._check_usable()
        deadline = None if timeout is None else time.monotonic() + timeout
        cid, envelope = self._request_envelope(data)
        # A bare lock, released by the delivering thread: a cheaper wake-up than an Event
        # (a request/reply's latency is mostly such hand-offs).
        done = threading.Lock()
        done.acquire()
        box: list[dict[str, Any]] = []

        def deliver(reply: dict[str, Any]) -> None:
            if not box:
                box.append(reply)
                done.release()

        self._core.expect_reply(cid, deliver)
        try:
            n = self._backend.request(name, envelope, timeout)
            self._core.requests_sent += 1
            if n == 0:
                raise NoResponder(name)
            left = _remaining(deadline)
            if not done.acquire(timeout=-1 if left is None else left):
                raise Timeout(f"no reply to {name!r} in {timeout} s")
        finally:
            self._core.forget_reply(cid)
        return _raise_for_reply(name, box[0])

    # -- lifetime ----------------------------------------------------------------------------

    def close(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Flush queued events (within ``timeout``), unsubscribe everything, stop the threads
        and connections; then raise what could not be published, if anything. Idempotent."""
        if os.getpid() != self._pid:  # a forked child: the threads are the parent's
            self._core.closed = True
            return
        self._core.close(timeout)

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None and not core.closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            if os.getpid() != getattr(self, "_pid", None):  # forked: the parent's threads
                core.closed = True
                return
            _close_in_background(core, self.emit_timeout)

    def __repr__(self) -> str:
        return f"<Bus {self.url!r}{' closed' if self.closed else ''}>"


class AsyncSubscription:
    """A subscription for asyncio: ``async for event in sub``, ``await sub.get(timeout=)``."""

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    @property
    def pattern(self) -> str:
        return self._sub.pattern

    @property
    def closed(self) -> bool:
        return self._sub.closed

    async def get(self, timeout: float | None = None) -> Event:
        """The next event; ``procwire.Timeout`` after ``timeout`` seconds."""
        return await self._sub.aget(timeout)

    def get_nowait(self) -> Event | None:
        return self._sub.get_nowait()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._sub.aget(self._sub.timeout)
        except ChannelClosed:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        self._sub.close()

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._sub.close()

    def stats(self) -> dict[str, Any]:
        return self._sub.stats()

    def __repr__(self) -> str:
        return repr(self._sub).replace("<Subscription", "<AsyncSubscription", 1)


class AsyncBus(_BusBase):
    """The asyncio twin of :class:`Bus` (``procwire.aio.Bus``).

    Nothing happens at construction: ``await bus.start()`` or ``async with`` connects (the first
    ``emit``/``request``/``handle`` also does). Handlers run on the event loop: coroutine
    functions are awaited (one task per subscription, so one slow handler does not delay the
    others), plain functions are called (they must not block). Backend I/O runs on one worker
    thread per bus, in order.
    """

    def __init__(self, url: str | None = None, *, channel: str = "procwire",
                 maxsize: int = DEFAULT_MAXSIZE, policy: str = DEFAULT_POLICY,
                 max_message_size: int = DEFAULT_MAX_MESSAGE,
                 emit_timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._events = AsyncDispatcher()
        self._requests = AsyncDispatcher()
        super().__init__(url, channel=channel, maxsize=maxsize, policy=policy,
                         max_message_size=max_message_size, emit_timeout=emit_timeout,
                         events=self._events, requests=self._requests)
        # subscribe()/on() are not coroutines here: they send the pattern to a central
        # router (the broker) without waiting; the next awaited call confirms it, since the
        # broker handles one bus's frames in order.
        self._core.pattern_timeout = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._starting: asyncio.Lock | None = None

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None and self._executor is not None
        return await self._loop.run_in_executor(self._executor, fn, *args)

    async def start(self, timeout: float | None = DEFAULT_TIMEOUT) -> AsyncBus:
        """Connect (idempotent); returns the bus."""
        if self._started:
            return self
        self._check_usable()
        loop = asyncio.get_running_loop()
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._started:
                return self
            self._loop = loop
            self._events.bind(loop)
            self._requests.bind(loop)
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="procwire-bus-io")
            await self._io(self._backend.start, self._core, timeout)
            self._started = True
        return self

    async def __aenter__(self) -> AsyncBus:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def on(self, pattern: str, handler: Callable[..., Any] | None = None, *,
           maxsize: int | None = None, policy: str | None = None,
           with_event: bool = False) -> Any:
        """Call ``handler(data)`` on the loop for every matching event (awaited when it is a
        coroutine function); also a decorator. Returns the handler."""
        if handler is None:
            def decorator(fn: F) -> F:
                self.on(pattern, fn, maxsize=maxsize, policy=policy, with_event=with_event)
                return fn
            return decorator
        self._handler_sub(pattern, handler, maxsize=maxsize, policy=policy,
                          with_event=with_event, once=False)
        return handler

    def once(self, pattern: str, handler: Callable[..., Any] | None = None, *,
             with_event: bool = False) -> Any:
        """Like ``on``, for the first matching event only."""
        if handler is None:
            def decorator(fn: F) -> F:
                self.once(pattern, fn, with_event=with_event)
                return fn
            return decorator
        self._handler_sub(pattern, handler, maxsize=None, policy=None, with_event=with_event,
                          once=True)
        return handler

    def off(self, pattern: str, handler: Callable[..., Any] | None = None) -> int:
        """Remove ``handler`` (or every handler) registered on ``pattern``; how many."""
        return self._remove(pattern, handler)

    def subscribe(self, pattern: str, *, maxsize: int | None = None, policy: str | None = None,
                  timeout: float | None = None) -> AsyncSubscription:
        """An async iterator over events matching ``pattern``; ``timeout`` per event."""
        sub = self._subscription(pattern, maxsize, policy, timeout=timeout)
        self._core.add(sub)
        return AsyncSubscription(sub)

    async def emit(self, event: str, data: Any = None, *, timeout: float | None = None,
                   confirm: bool = False) -> int:
        """Publish ``event``; see :meth:`Bus.emit`. On Redis, an emit that finds room in the
        outbox returns without leaving the loop."""
        _check_emit_name(event)
        await self.start()
        self._check_usable()
        t = self.emit_timeout if timeout is None else timeout
        n: int | None = None
        try:
            if confirm:
                n = await self._io(self._backend.publish_confirmed, event, data, t)
            else:
                n = self._backend.publish_nowait(event, data, t)
                if n is None:
                    n = await self._io(self._backend.publish, event, data, t)
        except ProcwireError as exc:
            # an earlier event's failure, reported after this one was queued: count it
            self._core.emitted += getattr(exc, "queued", 0)
            raise
        self._core.emitted += 1
        assert n is not None
        return n

    async def flush(self, timeout: float | None = None) -> None:
        """See :meth:`Bus.flush`."""
        await self.start()
        self._check_usable()
        await self._io(self._backend.flush, self.emit_timeout if timeout is None else timeout)

    async def emit_many(self, events: Iterable[tuple[str, Any]], *,
                        timeout: float | None = None) -> None:
        """See :meth:`Bus.emit_many`."""
        batch = list(events)
        _check_emit_names(batch)
        await self.start()
        try:
            await self._io(self._backend.publish_many, batch,
                           self.emit_timeout if timeout is None else timeout)
        except ProcwireError as exc:
            self._core.emitted += getattr(exc, "queued", 0)
            raise
        self._core.emitted += len(batch)

    async def handle(self, name: str, fn: Callable[[Any], Any], *,
                     timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Answer requests for ``name`` with ``fn(data)`` (awaited if it is a coroutine
        function); returns once requests reach this bus."""
        check_name(name, "request name")
        if not callable(fn):
            raise TypeError(f"a request handler is callable, not {type(fn).__name__}")
        await self.start()
        backend, core = self._backend, self._core

        async def serve(request: dict[str, Any]) -> None:
            cid, reply_to = request["id"], request["reply_to"]
            try:
                result = fn(request.get("data"))
                if inspect.isawaitable(result):
                    result = await result
                reply = {"id": cid, "data": result}
            except Exception as exc:
                log.info("request handler for %r raised %r (sent back as RemoteError)", name, exc)
                reply = _error_reply(cid, exc)
            try:
                try:
                    await self._io(backend.reply, reply_to, reply, self.emit_timeout)
                except (EncodeError, MessageTooLarge) as exc:
                    await self._io(backend.reply, reply_to, _error_reply(cid, exc),
                                   self.emit_timeout)
                core.requests_served += 1
            except ProcwireError as exc:
                log.warning("could not send the reply to %r: %s", name, exc)

        self._check_usable()
        sub = Subscription(core, name, maxsize=self.maxsize, policy=self.policy,
                           callback=serve, dispatcher=core.requests, kind="requests")
        sub.handler = fn
        core.add_responder(name, sub)
        try:
            await self._io(backend.add_responder, name, timeout)
        except BaseException:
            core.remove_responder(name)
            raise

    async def unhandle(self, name: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """See :meth:`Bus.unhandle`."""
        if self._core.has_responder(name):
            try:
                await self._io(self._backend.remove_responder, name, timeout)
            finally:
                self._core.remove_responder(name)

    async def request(self, name: str, data: Any = None, *,
                      timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """See :meth:`Bus.request`."""
        check_name(name, "request name")
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        cid, envelope = self._request_envelope(data)
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()

        def set_reply(reply: dict[str, Any]) -> None:
            if not fut.done():
                fut.set_result(reply)

        def deliver(reply: dict[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(set_reply, reply)
            except RuntimeError:
                pass

        self._core.expect_reply(cid, deliver)
        try:
            n = await self._io(self._backend.request, name, envelope, timeout)
            self._core.requests_sent += 1
            if n == 0:
                raise NoResponder(name)
            try:
                reply = await asyncio.wait_for(fut, _remaining(deadline))
            except TimeoutError:
                raise Timeout(f"no reply to {name!r} in {timeout} s") from None
        finally:
            self._core.forget_reply(cid)
        return _raise_for_reply(name, reply)

    async def close(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """See :meth:`Bus.close`. Idempotent."""
        if self._core.closed:
            return
        if os.getpid() != self._pid:
            self._core.closed = True
            return
        if self._started and self._loop is not None and self._executor is not None:
            await self._loop.run_in_executor(None, self._core.close, timeout)
            self._executor.shutdown(wait=False)
        else:
            self._core.close(timeout)

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None and not core.closed and getattr(self, "_started", False):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            if os.getpid() != getattr(self, "_pid", None):  # forked: the parent's threads
                core.closed = True
                return
            _close_in_background(core, self.emit_timeout)

    def __repr__(self) -> str:
        return f"<AsyncBus {self.url!r}{' closed' if self.closed else ''}>"
