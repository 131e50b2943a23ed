"""The backend-independent part of a bus: bounded subscription buffers with a policy for when
they fill, routing by glob pattern, the dispatchers that run handlers (a thread for the blocking
Bus, tasks on the loop for the asyncio one) and the table of requests waiting for a reply.

Threads: a backend delivers from its own thread (or, for ``memory://``, from the emitting
thread) into ``BusCore.on_*``, which only files items into subscription buffers. User code runs
on a dispatcher or in the thread that iterates a subscription, never on the backend's thread,
so a slow handler cannot stall delivery to the others, except through a full ``block`` buffer,
which is what ``block`` means.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from itertools import chain, repeat, starmap
from operator import length_hint
from typing import Any, Literal, NamedTuple

from .._errors import ChannelClosed, ConnectionClosed, Timeout
from ._backend import Backend
from ._patterns import Matcher

__all__ = ["DEFAULT_MAXSIZE", "DEFAULT_POLICY", "POLICIES", "BusCore", "Event", "Subscription"]

log = logging.getLogger("procwire.bus")

Policy = Literal["block", "drop_oldest", "disconnect"]
POLICIES: tuple[str, ...] = ("block", "drop_oldest", "disconnect")
DEFAULT_MAXSIZE = 10_000
DEFAULT_POLICY: Policy = "block"
# Events a consumer moves out of the buffer at once (they wait in the subscription's shared
# iterator for the next gets, which then take no lock): a subscription holds at most maxsize
# events in its buffer plus PREFETCH - 1 taken but not yet handed out.
PREFETCH = 128
_BATCH = 64  # items a dispatcher takes from one subscription before serving the next


class Event(NamedTuple):
    """One event as a subscription yields it: ``name`` and ``data``."""

    name: str
    data: Any


def check_policy(policy: str, maxsize: int) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if not isinstance(maxsize, int) or maxsize < 1:
        raise ValueError(f"maxsize must be an int >= 1, not {maxsize!r}")


def _wake_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake_async(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
    for loop, fut in waiters:
        try:
            loop.call_soon_threadsafe(_wake_future, fut)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


_MISSING: Any = object()


class _Batches:
    """The source of a subscription's iteration ``chain``: each item is the subscription's
    shared iterator of taken events, filled (waiting up to the subscription's ``timeout``);
    closed and drained ends the loop."""

    __slots__ = ("_sub",)

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> Iterator[Event]:
        sub = self._sub
        try:
            return sub._fill(sub.timeout)
        except ChannelClosed:
            raise StopIteration from None


class Subscription:
    """A bounded buffer of events matching ``pattern``, filled by the bus.

    Iterate it (``for event in sub``), or call ``get(timeout=)``; each item is an
    :class:`Event` ``(name, data)``. ``timeout`` (given to ``Bus.subscribe``) bounds the wait for
    each item during iteration: ``procwire.Timeout`` when none came in time.

    When the buffer holds ``maxsize`` events, ``policy`` decides: ``block`` holds the delivery
    (the emitter for ``memory://``, the Redis reader for ``redis://``) until there is room;
    ``drop_oldest`` discards the oldest event and counts it in ``dropped``; ``disconnect``
    closes the subscription: the buffered events can still be read, then
    ``ConnectionClosed(reason="overflow")`` is raised. ``stats()`` shows the counters.
    """

    def __init__(self, core: BusCore, pattern: str, *, maxsize: int, policy: str,
                 timeout: float | None = None,
                 callback: Callable[[Any], Any] | None = None,
                 dispatcher: Dispatcher | None = None, kind: str = "events") -> None:
        check_policy(policy, maxsize)
        self._core = core
        self._matcher = Matcher(pattern)
        self.pattern = pattern
        self.maxsize = maxsize
        self.policy = policy
        self.timeout = timeout
        self.kind = kind
        self._callback = callback
        self._dispatcher = dispatcher
        self._buf: deque[Any] = deque()
        # Events a getter moved out of _buf in one go (at most PREFETCH), as a list and an
        # iterator over it that every consumer shares: ``get`` takes from the iterator without
        # the lock, and iteration (``for event in sub``) hands the iterator itself to a C
        # ``chain``, so a batch is walked without a Python call per event. They count as taken
        # already (see ``taken``); ``close`` empties the list, which ends the iterator too.
        self._ready_list: list[Any] = []
        self._ready_it: Iterator[Any] = iter(self._ready_list)
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._getters = 0
        self._putters = 0
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._scheduled = False
        self._getter_ident = 0
        self._closed = False
        self._close_error: BaseException | None = None
        self._once_fired = False
        self.once = False
        self.handler: Callable[..., Any] | None = None
        #: a responder's handler as a function request -> reply, for a backend's direct path
        #: (``BusCore.answer_now``); None: requests come only through the buffer
        self.answer: Callable[[dict[str, Any], bool], dict[str, Any] | None] | None = None
        # counters
        self.received = 0
        self._moved = 0  # out of _buf: handed out, or in _ready_it
        self.dropped = 0
        self.blocked = 0

    # -- producer side (backend threads) -------------------------------------------------

    def _put(self, item: Any) -> None:
        wake = False
        overflow = False
        waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        with self._lock:
            if self._closed:
                return
            buf = self._buf
            if len(buf) >= self.maxsize:
                policy = self.policy
                if policy == "block" and threading.get_ident() in (
                        self._consumer_ident(), self._getter_ident):
                    # The consumer itself is delivering (a handler emitting to its own full
                    # buffer through memory://): waiting would wait for ourselves forever.
                    policy = "drop_oldest"
                if policy == "drop_oldest":
                    buf.popleft()
                    self.dropped += 1
                elif policy == "disconnect":
                    self._closed = True
                    self._close_error = ConnectionClosed(
                        f"subscription {self.pattern!r} fell {self.maxsize} events behind and "
                        "was disconnected (policy='disconnect')", reason="overflow")
                    overflow = True
                else:
                    self.blocked += 1
                    self._putters += 1
                    try:
                        while len(buf) >= self.maxsize and not self._closed:
                            self._not_full.wait()
                    finally:
                        self._putters -= 1
                    if self._closed:
                        return
            if not overflow:
                buf.append(item)
                self.received += 1
                if self._dispatcher is not None and not self._scheduled:
                    self._scheduled = True
                    wake = True
            if self._getters:
                self._not_empty.notify_all() if overflow else self._not_empty.notify()
            if self._async_waiters:
                waiters, self._async_waiters = self._async_waiters, []
        _wake_async(waiters)
        if overflow:
            self._core._overflowed(self)
            if self._dispatcher is not None:  # a handler: nobody else will see the error
                log.warning("%s", self._close_error)
        elif wake:
            assert self._dispatcher is not None
            self._dispatcher.enqueue(self)

    def _put_many(self, items: list[Any]) -> None:
        """``_put`` for a batch, in order: one lock and one wake-up when it all fits (the
        common case of a burst); item by item, with the policy, when it does not."""
        wake = False
        waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        with self._lock:
            if self._closed:
                return
            buf = self._buf
            if len(buf) + len(items) > self.maxsize:
                fits = False
            else:
                fits = True
                buf.extend(items)
                self.received += len(items)
                if self._dispatcher is not None and not self._scheduled:
                    self._scheduled = True
                    wake = True
                if self._getters:
                    self._not_empty.notify(len(items))
                if self._async_waiters:
                    waiters, self._async_waiters = self._async_waiters, []
        if not fits:
            for item in items:
                self._put(item)
            return
        _wake_async(waiters)
        if wake:
            assert self._dispatcher is not None
            self._dispatcher.enqueue(self)

    def _consumer_ident(self) -> int:
        return self._dispatcher.ident if self._dispatcher is not None else 0

    # -- consumer side --------------------------------------------------------------------

    @property
    def taken(self) -> int:
        """Events handed out so far."""
        return self._moved - length_hint(self._ready_it)

    def _pop(self) -> Any:
        item = self._buf.popleft()
        self._moved += 1
        if self._putters:
            self._not_full.notify()
        return item

    def _fill(self, timeout: float | None) -> Iterator[Any]:
        """The shared iterator of taken events, with at least one event left in it when this
        returns: up to PREFETCH events are moved out of _buf under one lock (a burst costs one
        lock, not one each), waiting up to ``timeout`` (None: forever) for one to come.
        ``Timeout``, or the close error once closed and drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._getter_ident = threading.get_ident()
            while True:
                it = self._ready_it
                if length_hint(it):  # another getter filled it (nobody adds to a batch)
                    return it
                buf = self._buf
                if buf:
                    if len(buf) <= PREFETCH:
                        batch = list(buf)
                        buf.clear()
                    else:  # PREFETCH calls of popleft, in C
                        batch = list(starmap(buf.popleft, repeat((), PREFETCH)))
                    self._moved += len(batch)
                    if self._putters:
                        self._not_full.notify_all()
                    self._ready_list = batch
                    self._ready_it = it = iter(batch)
                    return it
                if self._closed:
                    raise self._closed_error()
                if deadline is None:
                    wait = None
                else:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        raise Timeout(f"no event matching {self.pattern!r} in {timeout} s")
                self._getters += 1
                try:
                    self._not_empty.wait(wait)
                finally:
                    self._getters -= 1

    def get(self, timeout: float | None = None) -> Event:
        """The next event; ``procwire.Timeout`` after ``timeout`` seconds (None: wait)."""
        item = next(self._ready_it, _MISSING)
        while item is _MISSING:  # another getter thread may empty a batch we were handed
            item = next(self._fill(timeout), _MISSING)
        return item  # type: ignore[no-any-return]

    def get_nowait(self) -> Event | None:
        """The next event if one is buffered, else None (raises once closed and drained)."""
        item = next(self._ready_it, _MISSING)
        if item is not _MISSING:
            return item  # type: ignore[no-any-return]
        with self._lock:
            if self._buf:
                item = self._pop()
                return item  # type: ignore[no-any-return]
            if self._closed:
                raise self._closed_error()
            return None

    async def aget(self, timeout: float | None = None) -> Event:
        """``get`` for asyncio: waits on the running loop, never blocks it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            item = next(self._ready_it, _MISSING)
            if item is not _MISSING:
                return item  # type: ignore[no-any-return]
            with self._lock:
                if self._buf:
                    item = self._pop()
                    return item  # type: ignore[no-any-return]
                if self._closed:
                    raise self._closed_error()
                fut: asyncio.Future[None] = loop.create_future()
                self._async_waiters.append((loop, fut))
            try:
                if deadline is None:
                    await fut
                else:
                    wait = deadline - loop.time()
                    if wait <= 0:
                        raise Timeout(f"no event matching {self.pattern!r} in {timeout} s")
                    try:
                        await asyncio.wait_for(fut, wait)
                    except TimeoutError:
                        raise Timeout(f"no event matching {self.pattern!r} in {timeout} s"
                                      ) from None
            finally:
                with self._lock:
                    if (loop, fut) in self._async_waiters:
                        self._async_waiters.remove((loop, fut))

    def _take(self, n: int) -> list[Any]:
        """Up to ``n`` items for a dispatcher; clears ``_scheduled`` when it empties the buffer."""
        with self._lock:
            buf = self._buf
            k = min(n, len(buf))
            items = [buf.popleft() for _ in range(k)]
            self._moved += k
            if not buf:
                self._scheduled = False
            if self._putters and k:
                self._not_full.notify_all()
            return items

    def _closed_error(self) -> BaseException:
        return self._close_error or ChannelClosed(f"subscription {self.pattern!r} is closed")

    def __iter__(self) -> Iterator[Event]:
        """Events until the subscription is closed (then the loop ends), each waited for up to
        ``timeout``. Iteration is the hot loop: the iterator is a C ``chain`` over the batches
        ``_fill`` takes, so Python code runs once per batch, not once per event. A loop left
        early (``break``) leaves the rest of its batch to the next ``get`` or loop."""
        return chain.from_iterable(_Batches(self))

    def __next__(self) -> Event:
        try:
            return self.get(self.timeout)
        except ChannelClosed:
            raise StopIteration from None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop receiving; drops what is buffered. Idempotent."""
        self._shut(ChannelClosed(f"subscription {self.pattern!r} is closed"), clear=True)
        self._core._discard(self)

    def _shut(self, error: BaseException, *, clear: bool) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close_error = error
            if clear:
                self._buf.clear()
                self._moved -= length_hint(self._ready_it)
                self._ready_list.clear()  # ends the shared iterator, also inside a loop
            self._not_full.notify_all()
            self._not_empty.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake_future, fut)
            except RuntimeError:
                pass

    def stats(self) -> dict[str, Any]:
        """Counters: ``received`` (buffered), ``taken`` (handed out), ``dropped``, ``blocked``
        (times the delivery waited for room), ``queued`` now, ``closed`` and why."""
        with self._lock:
            return {"pattern": self.pattern, "policy": self.policy, "maxsize": self.maxsize,
                    "queued": len(self._buf) + length_hint(self._ready_it),
                    "received": self.received, "taken": self.taken,
                    "dropped": self.dropped, "blocked": self.blocked, "closed": self._closed,
                    "reason": getattr(self._close_error, "reason", None)
                    if self._closed else None}

    def __repr__(self) -> str:
        queued = len(self._buf) + length_hint(self._ready_it)
        state = "closed" if self._closed else f"{queued} queued"
        return f"<Subscription {self.pattern!r} {self.policy} maxsize={self.maxsize} {state}>"

    # -- handler invocation (dispatchers) --------------------------------------------------

    def _claim_once(self) -> bool:
        """For ``once`` handlers: True for the first event only, and unsubscribe."""
        with self._lock:
            if self._once_fired:
                return False
            self._once_fired = True
        self._core._discard(self)
        self._shut(ChannelClosed("once"), clear=True)
        return True

    def _invoke(self, item: Any) -> Any:
        if self.once and not self._claim_once():
            return None
        assert self._callback is not None
        return self._callback(item)


class Dispatcher:
    """Runs subscriptions' callbacks somewhere other than the backend's thread."""

    ident = 0

    def enqueue(self, sub: Subscription) -> None:
        raise NotImplementedError

    def close(self, timeout: float | None) -> None:
        raise NotImplementedError


def _report(sub: Subscription, exc: BaseException) -> None:
    sub._core.handler_errors += 1
    log.error("bus handler %r for %r raised; the subscription continues", sub.handler,
              sub.pattern, exc_info=exc)


class ThreadDispatcher(Dispatcher):
    """One thread (started on first use) serving ready subscriptions round-robin, ``_BATCH``
    items at a time, so a busy subscription does not starve the others."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._ready: deque[Subscription] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def enqueue(self, sub: Subscription) -> None:
        with self._cond:
            if self._closed:
                return
            self._ready.append(sub)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        self.ident = threading.get_ident()
        ready = self._ready
        while True:
            with self._cond:
                while not ready and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                sub = ready.popleft()
            for item in sub._take(_BATCH):
                if sub._closed and sub._close_error is not None and not isinstance(
                        sub._close_error, ConnectionClosed):
                    break  # off()/close(): stop calling this handler at once
                try:
                    sub._invoke(item)
                except Exception as exc:
                    _report(sub, exc)
            if sub._scheduled:
                self.enqueue(sub)

    def close(self, timeout: float | None) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


class AsyncDispatcher(Dispatcher):
    """Runs callbacks on one event loop: a task per ready subscription (so one slow async
    handler does not hold up the others), awaiting what the callback returns."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ident = threading.get_ident()

    def enqueue(self, sub: Subscription) -> None:
        loop = self.loop
        if loop is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(self._spawn, sub)
        except RuntimeError:  # the loop is closed
            pass

    def _spawn(self, sub: Subscription) -> None:
        assert self.loop is not None
        task = self.loop.create_task(self._drain(sub))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, sub: Subscription) -> None:
        while not self._closed:
            for item in sub._take(_BATCH):
                if sub._closed and not isinstance(sub._close_error, ConnectionClosed):
                    break
                try:
                    result = sub._invoke(item)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    _report(sub, exc)
            if not sub._scheduled:
                return
            await asyncio.sleep(0)  # let other subscriptions' tasks run

    def close(self, timeout: float | None) -> None:
        self._closed = True
        loop = self.loop
        if loop is None:
            return
        if threading.get_ident() == self.ident:
            self._cancel_all()
        else:  # Task.cancel is not thread-safe
            try:
                loop.call_soon_threadsafe(self._cancel_all)
            except RuntimeError:
                pass

    def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class BusCore:
    """Routing, subscriptions and pending requests of one bus; the backend's ``Sink``."""

    def __init__(self, backend: Backend, *, events: Dispatcher, requests: Dispatcher) -> None:
        self.backend = backend
        self.events = events
        self.requests = requests
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self._responders: dict[str, Subscription] = {}
        self._pending: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.closed = False
        #: how long ``add`` waits for the backend to confirm a pattern (0: send, do not wait;
        #: what the asyncio bus uses, since subscribe() there is not a coroutine)
        self.pattern_timeout: float | None = 5.0
        # counters
        self.emitted = 0
        self.received = 0
        self.handler_errors = 0
        self.overflows = 0
        self.requests_sent = 0
        self.requests_served = 0
        self.requests_unhandled = 0
        self.replies_late = 0
        self.notices: dict[str, int] = {}

    # -- Sink --------------------------------------------------------------------------

    def on_event(self, name: str, data: Any) -> None:
        self.received += 1
        routes = self._routes.get(name)
        if routes is None:
            routes = self._route(name)
        if routes:
            event = Event(name, data)
            for sub in routes:
                sub._put(event)

    def on_events(self, items: list[Event]) -> None:
        """A batch of events, in order: each subscription gets its share in one
        ``_put_many`` (one lock and one wake-up per batch instead of per event)."""
        self.received += len(items)
        routes_of = self._routes.get
        # The common case: every event of the batch goes to the same subscriptions (one
        # subscription, or names that all match alike): the batch is handed over whole.
        first = routes_of(items[0][0]) if items else None
        if first is not None:
            for ev in items:
                if routes_of(ev[0]) is not first:
                    break
            else:
                for sub in first:
                    sub._put_many(items)
                return
        shares: dict[Subscription, list[Event]] = {}
        for ev in items:
            name = ev[0]
            routes = routes_of(name)
            if routes is None:
                routes = self._route(name)
                routes_of = self._routes.get  # _route may have started a new cache
            for sub in routes:
                share = shares.get(sub)
                if share is None:
                    shares[sub] = [ev]
                else:
                    share.append(ev)
        for sub, share in shares.items():
            sub._put_many(share)

    def on_request(self, name: str, request: dict[str, Any]) -> None:
        sub = self._responders.get(name)
        if sub is None:  # unhandled between the backend's routing and here: let it time out
            self.requests_unhandled += 1
            return
        sub._put(request)

    def answer_now(self, name: str, request: dict[str, Any]) -> dict[str, Any] | None:
        """Run ``name``'s handler on the calling thread and return its reply (a backend's
        direct path, see ``Backend.enable_inline``); None when this bus does not answer
        ``name`` that way (not handled, or an asyncio handler)."""
        sub = self._responders.get(name)
        answer = None if sub is None else sub.answer  # (it checks for unhandled itself)
        if answer is None:
            return None
        reply: dict[str, Any] | None = answer(request, True)
        if reply is not None:
            self.requests_served += 1
        return reply

    def on_reply(self, reply: dict[str, Any]) -> None:
        deliver = self._pending.pop(reply.get("id"), None)  # type: ignore[arg-type]
        if deliver is None:
            self.replies_late += 1  # the request timed out already
        else:
            deliver(reply)

    def on_notice(self, name: str, info: dict[str, Any]) -> None:
        self.notices[name] = self.notices.get(name, 0) + 1
        self.on_event(name, info)

    # -- subscriptions -----------------------------------------------------------------

    def _route(self, name: str) -> tuple[Subscription, ...]:
        with self._lock:
            routes = tuple(s for s in self._subs if s._matcher.matches(name))
            if len(self._routes) >= 4096:  # bounded cache: names may be unbounded (ids)
                self._routes = {}
            self._routes[name] = routes
            return routes

    def add(self, sub: Subscription) -> None:
        if self.closed:
            raise ChannelClosed("this bus is closed")
        with self._lock:
            self._subs.append(sub)
            self._routes = {}
        # Backends that route centrally (the broker) learn the pattern; this bus still
        # filters locally, so a backend that sends more than asked is harmless.
        try:
            self.backend.add_pattern(sub.pattern, self.pattern_timeout)
        except BaseException:
            with self._lock:
                if sub in self._subs:
                    self._subs.remove(sub)
                    self._routes = {}
            raise

    def add_responder(self, name: str, sub: Subscription) -> None:
        with self._lock:
            if name in self._responders:
                raise ValueError(f"this bus already handles {name!r} (unhandle it first)")
            self._responders[name] = sub

    def has_responder(self, name: str) -> bool:
        with self._lock:
            return name in self._responders

    def remove_responder(self, name: str) -> Subscription | None:
        with self._lock:
            sub = self._responders.pop(name, None)
        if sub is not None:
            sub._shut(ChannelClosed("unhandled"), clear=True)
        return sub

    def _discard(self, sub: Subscription) -> None:
        with self._lock:
            if sub not in self._subs:
                return
            self._subs.remove(sub)
            self._routes = {}
        if not self.closed:
            self.backend.remove_pattern(sub.pattern, 0)  # never waits: any thread calls this

    def _overflowed(self, sub: Subscription) -> None:
        self.overflows += 1
        self._discard(sub)

    def find(self, pattern: str, handler: Callable[..., Any] | None) -> list[Subscription]:
        with self._lock:
            return [s for s in self._subs if s.pattern == pattern and s._callback is not None
                    and (handler is None or s.handler == handler)]

    def subscriptions(self) -> list[Subscription]:
        with self._lock:
            return list(self._subs)

    # -- requests ----------------------------------------------------------------------

    def expect_reply(self, cid: str, deliver: Callable[[dict[str, Any]], None]) -> None:
        self._pending[cid] = deliver

    def forget_reply(self, cid: str) -> None:
        self._pending.pop(cid, None)

    # -- the end -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        subs = self.subscriptions()
        return {
            "emitted": self.emitted, "received": self.received,
            "subscriptions": len(subs),
            "dropped": sum(s.dropped for s in subs), "blocked": sum(s.blocked for s in subs),
            "overflow_disconnects": self.overflows, "handler_errors": self.handler_errors,
            "requests_sent": self.requests_sent, "requests_served": self.requests_served,
            "requests_unhandled": self.requests_unhandled, "replies_late": self.replies_late,
            "notices": dict(self.notices), "backend": self.backend.stats(),
        }

    def close(self, timeout: float | None) -> None:
        """Stop requests reaching this bus (while its handlers still answer those already on
        their way), close subscriptions (waking blocked deliveries), the backend, then
        dispatchers."""
        if not self.closed and self._responders:
            try:
                self.backend.stop_responding(timeout)
            except Exception as exc:  # closing goes on; the backend's close drops them anyway
                log.warning("procwire bus: closing, could not stop requests first: %s", exc)
            # let the handlers answer the requests that arrived before (bounded: a handler
            # may be the one closing, or stuck)
            end = time.monotonic() + (1.0 if timeout is None else min(timeout, 1.0))
            while time.monotonic() < end and any(
                    r._buf or r._scheduled for r in list(self._responders.values())):
                time.sleep(0.005)
        with self._lock:
            if self.closed:
                return
            self.closed = True
            subs = list(self._subs) + list(self._responders.values())
            self._subs.clear()
            self._responders.clear()
            self._routes = {}
            pending, self._pending = self._pending, {}
        for sub in subs:
            sub._shut(ChannelClosed("the bus is closed"), clear=False)
        for deliver in pending.values():
            deliver({"closed": True})
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.backend.close(timeout)  # may raise what it could not publish, once closed
        finally:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.events.close(left)
            self.requests.close(left)
