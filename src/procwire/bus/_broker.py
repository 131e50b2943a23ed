"""The local broker: one asyncio process per user (per socket) that routes bus events by
pattern and carries request/reply between the processes of one machine.

It listens with procwire's own channel layer (``unix://``, length-prefixed frames; see
``_wire.py`` for the frames) and never decodes event data: a publisher's frame is forwarded
byte for byte to every client whose registered patterns match the event name, and to nobody
else.

Flow control: every client has a bounded outgoing queue (``max_queue`` frames and
``max_queue_bytes``). When a client reads too slowly and its queue fills, its ``policy`` decides:
``drop_oldest`` discards the oldest events (counted; the client gets a ``procwire.gap`` notice
saying how many once it catches up) or ``disconnect`` closes it (it reconnects and reports the
gap itself). Acknowledgements, requests and replies go through a separate queue that is never
dropped from; a client that lets that one overflow is disconnected. A publisher is never slowed
down by a slow subscriber.

Bad clients: a frame that is not a broker frame, an unknown kind, a forbidden name, a frame over
``max_frame`` bytes, or no ``hello`` within 5 s: the client gets ``bye`` with the reason and is
disconnected, counted in ``bad_clients``; everybody else is untouched.

Lifetime: the broker holds an exclusive ``flock`` on ``<socket>.lock`` while it runs (a second
broker on the same socket gives up), writes ``<socket>.pid``, and, with ``idle > 0``, exits after
``idle`` seconds without clients. ``python -m procwire.bus._broker --socket PATH --detach`` is
how ``Bus()`` starts one in the background.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections import deque
from typing import Any

import msgspec

from .._async.channel import AsyncChannel, AsyncListener
from .._async.channel import listen as alisten
from .._errors import AddressInUse, ChannelClosed, ConnectionClosed, ProcwireError, Timeout
from ._paths import BrokerFiles, default_socket_path, try_lock
from ._patterns import MAX_NAME, RESERVED_PREFIX, Matcher
from ._wire import VERSION, BrokerFrame, decode_broker_frame, encode_frame

__all__ = ["DEFAULT_IDLE", "Broker", "main", "serve"]

log = logging.getLogger("procwire.bus.broker")

DEFAULT_IDLE = 60.0          # an auto-started broker exits after this long without clients
DEFAULT_QUEUE = 10_000       # frames queued per client
DEFAULT_QUEUE_BYTES = 64 << 20
DEFAULT_POLICY = "drop_oldest"
BROKER_POLICIES = ("drop_oldest", "disconnect")
DEFAULT_MAX_FRAME = (1 << 20) + 4096   # a 1 MiB message plus its envelope
DEFAULT_MAX_CLIENTS = 4096
MAX_PATTERNS = 10_000        # per client
HELLO_TIMEOUT = 5.0
_WRITE_BUFFER = 256 * 1024   # the channel's own buffer: small, so our queue is the real bound
_ROUTE_CACHE = 4096
_FAIR_BATCH = 64             # frames one client's reader handles before yielding to the loop


class _Bad(Exception):
    """A client broke the protocol: it is told why and disconnected."""


class _Hello(msgspec.Struct):
    pid: int = 0
    reply_to: str = ""
    channel: str = "procwire"
    patterns: list[str] = []
    handles: list[str] = []
    queue: int = 0
    policy: str = ""
    version: int = VERSION


class _ReqHead(msgspec.Struct):
    id: str
    reply_to: str = ""


_decode_hello = msgspec.json.Decoder(_Hello).decode
_decode_req = msgspec.json.Decoder(_ReqHead).decode
_decode_batch = msgspec.json.Decoder(list[tuple[str, msgspec.Raw]]).decode
_json_str = msgspec.json.Encoder().encode


def _name_ok(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME and not name.startswith(RESERVED_PREFIX)


class _Client:
    """One connected bus, as the broker sees it."""

    def __init__(self, cid: int, ch: AsyncChannel) -> None:
        self.id = cid
        self.ch = ch
        self.space: _Space | None = None
        self.name = ""
        self.pid = 0
        self.reply_to = ""
        self.patterns: dict[str, Matcher] = {}
        self.handles: set[str] = set()
        self.out: deque[bytes] = deque()   # events: dropped from under drop_oldest
        self.ctl: deque[bytes] = deque()   # acks, requests, replies, notices: never dropped
        self.out_bytes = 0
        self.max_queue = DEFAULT_QUEUE
        self.max_bytes = DEFAULT_QUEUE_BYTES
        self.policy = DEFAULT_POLICY
        self.waiter: asyncio.Future[None] | None = None
        self.idle = False     # the writer waits with nothing queued: others may write directly
        self.closing = False
        self.since = time.time()
        # counters
        self.frames_in = 0
        self.events_in = 0
        self.requests_in = 0
        self.delivered = 0
        self.dropped = 0
        self.unreported = 0  # dropped, not yet told to the client
        self.queue_peak = 0

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "name": self.name,
                "channel": self.space.name if self.space else None,
                "patterns": sorted(self.patterns)[:20], "n_patterns": len(self.patterns),
                "handles": sorted(self.handles)[:20], "policy": self.policy,
                "max_queue": self.max_queue, "queued": len(self.out) + len(self.ctl),
                "queue_peak": self.queue_peak, "frames_in": self.frames_in,
                "events_in": self.events_in, "requests_in": self.requests_in,
                "delivered": self.delivered, "dropped": self.dropped,
                "connected_for": round(time.time() - self.since, 3)}


class _Space:
    """The clients of one bus channel name (``Bus(channel=...)``): routing and responders."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[_Client] = set()
        self.subscribers: list[_Client] = []
        self.routes: dict[str, tuple[_Client, ...]] = {}
        self.handlers: dict[str, list[_Client]] = {}
        self.turn: dict[str, int] = {}

    def route(self, name: str) -> tuple[_Client, ...]:
        found = tuple(c for c in self.subscribers
                      if any(m.matches(name) for m in c.patterns.values()))
        if len(self.routes) >= _ROUTE_CACHE:  # names can be unbounded (ids in them)
            self.routes.clear()
        self.routes[name] = found
        return found

    def resubscribed(self, c: _Client) -> None:
        has = c in self.subscribers
        if c.patterns and not has:
            self.subscribers.append(c)
        elif not c.patterns and has:
            self.subscribers.remove(c)
        self.routes.clear()

    def pick_handler(self, name: str) -> _Client | None:
        hs = self.handlers.get(name)
        if not hs:
            return None
        i = self.turn.get(name, 0) % len(hs)
        self.turn[name] = i + 1
        return hs[i]

    def drop(self, c: _Client) -> None:
        self.members.discard(c)
        if c in self.subscribers:
            self.subscribers.remove(c)
            self.routes.clear()
        for name in list(c.handles):
            self.unhandle(c, name)

    def unhandle(self, c: _Client, name: str) -> None:
        hs = self.handlers.get(name)
        if hs and c in hs:
            hs.remove(c)
            if not hs:
                del self.handlers[name]
                self.turn.pop(name, None)


class Broker:
    """The broker server; ``await Broker(...).run()`` serves until stopped or idle."""

    def __init__(self, socket_path: str, *, idle: float = 0.0, max_queue: int = DEFAULT_QUEUE,
                 max_queue_bytes: int = DEFAULT_QUEUE_BYTES, policy: str = DEFAULT_POLICY,
                 max_frame: int = DEFAULT_MAX_FRAME,
                 max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        if policy not in BROKER_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(BROKER_POLICIES)}")
        self.files = BrokerFiles(socket_path)
        self.idle = idle
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.policy = policy
        self.max_frame = max_frame
        self.max_clients = max_clients
        self.run_id = uuid.uuid4().hex[:16]
        self.started = time.time()
        self.clients: dict[int, _Client] = {}
        self.spaces: dict[str, _Space] = {}
        self.by_reply: dict[str, _Client] = {}
        self._next_id = 0
        self._stop: asyncio.Event | None = None
        self._listener: AsyncListener | None = None
        self._last_activity = time.monotonic()
        self._samples: deque[tuple[float, int, int, int]] = deque(maxlen=6)
        self._tasks: set[asyncio.Task[None]] = set()
        # counters
        self.clients_seen = 0
        self.events_in = 0
        self.deliveries = 0
        self.requests_in = 0
        self.replies = 0
        self.replies_unroutable = 0
        self.no_responder = 0
        self.dropped = 0
        self.slow_disconnects = 0
        self.bad_clients = 0
        self.refused = 0

    # -- serving -----------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.files.ensure_folder()
        self._listener = await alisten(self.files.url, codec="raw", max_frame_size=self.max_frame,
                                       write_buffer=_WRITE_BUFFER, inbox=1 << 20, backlog=512)
        fd = os.open(self.files.pid + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(self.files.pid + ".tmp", self.files.pid)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        log.info("procwire broker %d listening on %s (idle exit: %s)", os.getpid(),
                 self.files.socket, f"{self.idle} s" if self.idle > 0 else "never")
        accept = asyncio.create_task(self._accept_loop())
        ticker = asyncio.create_task(self._ticker())
        tasks = self._tasks
        try:
            await self._stop.wait()
        finally:
            listener, self._listener = self._listener, None
            await listener.close()       # unlinks the socket: new clients start a new broker
            accept.cancel()
            ticker.cancel()
            for c in list(self.clients.values()):
                self._bye(c, "shutdown")
            if tasks:
                await asyncio.wait(tasks, timeout=2)
            for t in tasks:
                t.cancel()
            if self.files.read_pid() == os.getpid():
                with contextlib.suppress(OSError):
                    os.unlink(self.files.pid)
            log.info("procwire broker %d stopped", os.getpid())

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                ch = await self._listener.accept()
            except ChannelClosed:
                return
            except (ProcwireError, OSError) as exc:  # e.g. out of file descriptors
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(self.clients) >= self.max_clients:
                self.refused += 1
                await ch.close(0)
                continue
            task = asyncio.create_task(self._serve(ch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ticker(self) -> None:
        step = 1.0 if self.idle <= 0 else min(1.0, max(0.05, self.idle / 4))
        last_sample = 0.0
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            if now - last_sample >= 1.0:
                last_sample = now
                self._samples.append((now, self.events_in, self.deliveries, self.requests_in))
            if self.idle > 0 and not self.clients and now - self._last_activity >= self.idle:
                log.info("no clients for %.1f s: exiting", self.idle)
                self.stop()
                return

    # -- one client --------------------------------------------------------------------------

    async def _serve(self, ch: AsyncChannel) -> None:
        self._next_id += 1
        c = _Client(self._next_id, ch)
        self.clients[c.id] = c
        self.clients_seen += 1
        writer: asyncio.Task[None] | None = None
        try:
            try:
                first = await ch.recv(timeout=HELLO_TIMEOUT)
            except Timeout:
                raise _Bad(f"no hello within {HELLO_TIMEOUT} s") from None
            try:
                hello = decode_broker_frame(first)
            except (msgspec.DecodeError, ValueError) as exc:
                raise _Bad(f"not a broker frame: {exc}") from None
            if hello.kind != "hello":
                raise _Bad(f"the first frame must be hello, not {hello.kind!r}")
            self._hello(c, hello)
            writer = asyncio.create_task(self._writer(c))
            await self._read_loop(c)
        except _Bad as exc:
            self.bad_clients += 1
            if self.bad_clients <= 10 or self.bad_clients % 1000 == 0:
                log.warning("client %d (pid %d): %s; disconnected (%d bad clients so far)",
                            c.id, c.pid, exc, self.bad_clients)
            self._bye(c, f"protocol error: {exc}")
            if writer is None:
                writer = asyncio.create_task(self._writer(c))
        except ProcwireError as exc:  # FrameTooLarge, a reset...
            if not isinstance(exc, ConnectionClosed | ChannelClosed):
                self.bad_clients += 1
                log.warning("client %d (pid %d): %s; disconnected", c.id, c.pid, exc)
        except Exception:  # a bug: drop this client, keep serving the others, say so
            log.exception("client %d (pid %d): unexpected error; disconnected", c.id, c.pid)
        finally:
            self._forget(c)
            if writer is not None:
                if c.closing:  # let the bye go out
                    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(asyncio.shield(writer), 1.0)
                writer.cancel()
            with contextlib.suppress(ProcwireError, OSError):
                await ch.close(timeout=0.5)
            self._last_activity = time.monotonic()

    def _hello(self, c: _Client, f: BrokerFrame) -> None:
        try:
            h = _decode_hello(f.body)
        except (msgspec.DecodeError, ValueError) as exc:
            raise _Bad(f"bad hello: {exc}") from None
        if h.version != VERSION:
            raise _Bad(f"wire version {h.version} (this broker speaks {VERSION})")
        if not h.channel or len(h.channel) > MAX_NAME:
            raise _Bad("bad channel name")
        if len(h.reply_to) > 200 or len(h.patterns) > MAX_PATTERNS:
            raise _Bad("hello too large")
        c.name = f.name[:200]
        c.pid = h.pid
        if h.queue > 0:
            c.max_queue = min(h.queue, self.max_queue)
        else:
            c.max_queue = self.max_queue
        c.max_bytes = self.max_queue_bytes
        c.policy = h.policy if h.policy in BROKER_POLICIES else self.policy
        space = self.spaces.get(h.channel)
        if space is None:
            space = self.spaces[h.channel] = _Space(h.channel)
        c.space = space
        space.members.add(c)
        if h.reply_to:
            c.reply_to = h.reply_to
            self.by_reply[h.reply_to] = c
        try:
            for p in h.patterns:
                self._sub(c, p)
            for name in h.handles:
                self._handle(c, name)
        except (ValueError, TypeError) as exc:
            raise _Bad(f"bad hello: {exc}") from None
        self._ctl(c, encode_frame("welcome", f.seq, "", {
            "broker_pid": os.getpid(), "run_id": self.run_id, "client_id": c.id,
            "max_frame": self.max_frame, "queue": c.max_queue, "policy": c.policy,
            "version": VERSION}))

    async def _read_loop(self, c: _Client) -> None:
        recv = c.ch.recv
        decode = decode_broker_frame
        space = c.space
        assert space is not None
        routes = space.routes
        burst = 0
        while True:
            b = await recv()
            c.frames_in += 1
            burst += 1
            if burst >= _FAIR_BATCH:
                # recv() does not yield while this client's inbox holds frames: let the
                # writers (and other clients) run now and then.
                burst = 0
                await asyncio.sleep(0)
            try:
                f = decode(b)
            except (msgspec.DecodeError, ValueError) as exc:
                raise _Bad(f"not a broker frame: {exc}") from None
            kind = f.kind
            if kind == "pub":
                name = f.name
                if not _name_ok(name):
                    raise _Bad(f"event name not allowed: {name[:80]!r}")
                targets = routes.get(name)
                if targets is None:
                    targets = space.route(name)
                for t in targets:
                    if t.idle:
                        await self._direct(t, b)
                    else:
                        self._push(t, b)
                n = len(targets)
                self.events_in += 1
                self.deliveries += n
                c.events_in += 1
                if f.seq:
                    await self._reply(c, b'["ok",%d,"",%d]' % (f.seq, n))
            elif kind == "pubs":
                await self._publish_batch(c, space, f, b)
            elif kind == "req":
                await self._request(c, space, f, b)
            elif kind == "rep":
                target = self.by_reply.get(f.name)
                if target is None:
                    self.replies_unroutable += 1
                else:
                    self.replies += 1
                    await self._reply(target, b)
            elif kind in ("sub", "unsub", "handle", "unhandle"):
                try:
                    if kind == "sub":
                        self._sub(c, f.name)
                    elif kind == "unsub":
                        if c.patterns.pop(f.name, None) is not None:
                            space.resubscribed(c)
                    elif kind == "handle":
                        self._handle(c, f.name)
                    else:
                        c.handles.discard(f.name)
                        space.unhandle(c, f.name)
                except ValueError as exc:
                    if f.seq:
                        self._ctl(c, encode_frame("err", f.seq, "", {
                            "type": "ValueError", "message": str(exc)}))
                    continue
                if f.seq:
                    await self._reply(c, b'["ok",%d,"",null]' % f.seq)
            elif kind == "stats":
                await self._reply(c, encode_frame("ok", f.seq, "", self.stats()))
            else:
                raise _Bad(f"unknown frame kind {kind[:40]!r}")

    async def _publish_batch(self, c: _Client, space: _Space, f: BrokerFrame,
                             b: bytes) -> None:
        """``pubs``: many events in one frame. When every event goes to the same buses (the
        usual case: one name, or names with the same subscribers), the frame is forwarded
        unchanged, one write per bus for the whole batch; otherwise each bus gets a frame
        with just its events, in order."""
        try:
            items = _decode_batch(f.body)
        except (msgspec.DecodeError, ValueError) as exc:
            raise _Bad(f"bad event batch: {exc}") from None
        routes = space.routes
        first: tuple[_Client, ...] | None = None
        same = True
        per: list[tuple[_Client, ...]] = []
        for name, _ in items:
            if not _name_ok(name):
                raise _Bad(f"event name not allowed: {name[:80]!r}")
            targets = routes.get(name)
            if targets is None:
                targets = space.route(name)
            per.append(targets)
            if first is None:
                first = targets
            elif targets is not first and targets != first:
                same = False
        n = 0
        if same and first:
            n = len(first) * len(items)
            for t in first:
                if t.idle:
                    await self._direct(t, b)
                else:
                    self._push(t, b)
        elif not same:
            mine: dict[_Client, list[bytes]] = {}
            for (name, data), targets in zip(items, per, strict=True):
                if targets:
                    item = b"[" + _json_str(name) + b"," + bytes(data) + b"]"
                    for t in targets:
                        mine.setdefault(t, []).append(item)
                    n += len(targets)
            for t, parts in mine.items():
                frame = b'["pubs",0,"",[' + b",".join(parts) + b"]]"
                if t.idle:
                    await self._direct(t, frame)
                else:
                    self._push(t, frame)
        self.events_in += len(items)
        self.deliveries += n
        c.events_in += len(items)
        if f.seq:
            await self._reply(c, b'["ok",%d,"",%d]' % (f.seq, n))

    def _sub(self, c: _Client, pattern: str) -> None:
        if pattern in c.patterns:
            return
        if len(c.patterns) >= MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} patterns per client")
        c.patterns[pattern] = Matcher(pattern)  # ValueError for a bad one
        assert c.space is not None
        c.space.resubscribed(c)

    def _handle(self, c: _Client, name: str) -> None:
        if not _name_ok(name):
            raise ValueError(f"request name not allowed: {name[:80]!r}")
        assert c.space is not None
        hs = c.space.handlers.setdefault(name, [])
        if c not in hs:
            hs.append(c)
        c.handles.add(name)

    async def _request(self, c: _Client, space: _Space, f: BrokerFrame, b: bytes) -> None:
        if not _name_ok(f.name):
            raise _Bad(f"request name not allowed: {f.name[:80]!r}")
        self.requests_in += 1
        c.requests_in += 1
        target = space.pick_handler(f.name)
        if target is not None:
            await self._reply(target, b)
            return
        try:
            head = _decode_req(f.body)
        except (msgspec.DecodeError, ValueError) as exc:
            raise _Bad(f"bad request: {exc}") from None
        self.no_responder += 1
        # Straight back to the requester: nobody will answer, so it need not wait.
        await self._reply(c, encode_frame("rep", 0, head.reply_to, {"id": head.id,
                                                                    "no_responder": True}))

    # -- outgoing ----------------------------------------------------------------------------

    async def _direct(self, c: _Client, b: bytes) -> None:
        """Write ``b`` to an idle client at once (no queue, no writer wake-up: the common
        case, and what keeps a request/reply at one loop pass per hop). The channel writes
        before it would wait for the peer to drain; ``timeout=0`` turns that wait into a
        ``Timeout`` one loop pass later, and the client's writer task takes over from there."""
        try:
            await c.ch.send(b, timeout=0)
        except Timeout:
            c.idle = False  # its socket is full: queue from now on
        except ProcwireError:
            return  # gone: its own reader task cleans up
        c.delivered += 1

    async def _reply(self, c: _Client, b: bytes) -> None:
        if c.idle and not c.closing:
            await self._direct(c, b)
        else:
            self._ctl(c, b)

    def _push(self, c: _Client, b: bytes) -> None:
        if c.closing:
            return
        out = c.out
        out.append(b)
        c.out_bytes += len(b)
        if len(out) >= c.max_queue or c.out_bytes > c.max_bytes:
            self._overflow(c)
        if c.waiter is not None:
            c.wake()

    def _ctl(self, c: _Client, b: bytes) -> None:
        if c.closing:
            return
        c.ctl.append(b)
        if len(c.ctl) > c.max_queue:
            self.slow_disconnects += 1
            self._bye(c, f"slow consumer: {len(c.ctl)} replies and acknowledgements unread")
            return
        if c.waiter is not None:
            c.wake()

    def _overflow(self, c: _Client) -> None:
        out = c.out
        if len(out) > c.queue_peak:
            c.queue_peak = len(out)
        if c.policy == "disconnect":
            self.slow_disconnects += 1
            log.info("client %d (pid %d) fell %d events behind: disconnected", c.id, c.pid,
                     len(out))
            self._bye(c, f"slow consumer: {len(out)} events unread (policy disconnect)")
            return
        n = 0
        while len(out) >= c.max_queue or (c.out_bytes > c.max_bytes and out):
            c.out_bytes -= len(out.popleft())
            n += 1
        c.dropped += n
        c.unreported += n
        self.dropped += n

    def _bye(self, c: _Client, reason: str) -> None:
        if c.closing:
            return
        c.out.clear()
        c.out_bytes = 0
        c.ctl.clear()
        c.ctl.append(encode_frame("bye", 0, reason[:500], None))
        c.closing = True
        c.idle = False
        self._forget(c)
        c.wake()
        # The writer may be stuck behind a peer that reads nothing: cut it off if the bye
        # has not gone out in a second.
        task = asyncio.get_running_loop().create_task(self._cut(c))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cut(self, c: _Client) -> None:
        await asyncio.sleep(1.0)
        with contextlib.suppress(ProcwireError, OSError):
            await c.ch.close(timeout=0)

    async def _writer(self, c: _Client) -> None:
        loop = asyncio.get_running_loop()
        send = c.ch.send
        out, ctl = c.out, c.ctl
        try:
            while True:
                if ctl:
                    b = ctl.popleft()
                elif out:
                    b = out.popleft()
                    c.out_bytes -= len(b)
                elif c.unreported:
                    n, c.unreported = c.unreported, 0
                    b = encode_frame("notice", 0, "procwire.gap", {
                        "reason": "slow_consumer", "dropped": n,
                        "detail": f"the broker dropped {n} events this bus read too slowly "
                                  f"for (queue of {c.max_queue}, policy drop_oldest)"})
                elif c.closing:
                    await c.ch.close(timeout=1.0)
                    return
                else:
                    c.idle = True  # nothing queued, the socket takes more: write directly
                    fut = loop.create_future()
                    c.waiter = fut
                    await fut
                    c.idle = False
                    continue
                await send(b)
                c.delivered += 1
        except (ProcwireError, OSError):
            pass

    def _forget(self, c: _Client) -> None:
        if self.clients.pop(c.id, None) is None:
            return
        if c.space is not None:
            c.space.drop(c)
            if not c.space.members:
                self.spaces.pop(c.space.name, None)
        if c.reply_to and self.by_reply.get(c.reply_to) is c:
            del self.by_reply[c.reply_to]

    # -- status ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What ``procwire broker --status`` shows."""
        rates = {"events_in": 0.0, "deliveries": 0.0, "requests": 0.0}
        s = self._samples
        if len(s) >= 2 and s[-1][0] > s[0][0]:
            dt = s[-1][0] - s[0][0]
            rates = {"events_in": round((s[-1][1] - s[0][1]) / dt, 1),
                     "deliveries": round((s[-1][2] - s[0][2]) / dt, 1),
                     "requests": round((s[-1][3] - s[0][3]) / dt, 1)}
        return {
            "pid": os.getpid(), "run_id": self.run_id, "socket": self.files.socket,
            "uptime": round(time.time() - self.started, 3), "idle_exit": self.idle,
            "policy": self.policy, "max_queue": self.max_queue, "max_frame": self.max_frame,
            "clients": [c.info() for c in self.clients.values()],
            "totals": {"clients_seen": self.clients_seen, "events_in": self.events_in,
                       "deliveries": self.deliveries, "requests": self.requests_in,
                       "replies": self.replies, "replies_unroutable": self.replies_unroutable,
                       "no_responder": self.no_responder, "dropped": self.dropped,
                       "slow_disconnects": self.slow_disconnects,
                       "bad_clients": self.bad_clients, "refused": self.refused},
            "rates": rates,
        }


# -- process entry points --------------------------------------------------------------------

LOCK_TAKEN = 3  # exit status: another broker holds the lock (not an error for a spawner)


def _log_to_file(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.getsize(path) > (1 << 20):  # bounded: keep one previous log
            os.replace(path, path + ".1")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def serve(socket_path: str | None = None, *, idle: float = 0.0, detach: bool = False,
          max_queue: int = DEFAULT_QUEUE, policy: str = DEFAULT_POLICY,
          max_frame: int = DEFAULT_MAX_FRAME, lock_wait: float = 2.0) -> int:
    """Run a broker until it is stopped (SIGTERM/SIGINT) or idle; the exit status.

    ``detach``: log to ``<socket>.log`` and fork; the parent returns at once with 0 (a broker
    is starting) or ``LOCK_TAKEN`` (another broker holds the lock), which is what a client that
    started this process waits for.
    """
    files = BrokerFiles(socket_path or default_socket_path())
    files.ensure_folder()
    if detach:
        _log_to_file(files.log)
    lock_fd = try_lock(files.lock, wait=lock_wait)
    if lock_fd is None:
        pid = files.read_pid()
        log.info("a broker already runs on %s%s", files.socket, f" (pid {pid})" if pid else "")
        return LOCK_TAKEN
    try:
        if detach and os.fork() != 0:
            os._exit(0)  # the starter learns a broker is on its way; the child serves
        broker = Broker(files.socket, idle=idle, max_queue=max_queue, policy=policy,
                        max_frame=max_frame)
        try:
            asyncio.run(broker.run())
        except AddressInUse as exc:
            log.error("cannot listen: %s", exc)
            return 1
        return 0
    finally:
        os.close(lock_fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m procwire.bus._broker",
                                 description="the procwire local bus broker")
    ap.add_argument("--socket", default=None)
    ap.add_argument("--idle", type=float, default=0.0)
    ap.add_argument("--detach", action="store_true")
    ap.add_argument("--max-queue", type=int, default=DEFAULT_QUEUE)
    ap.add_argument("--policy", choices=BROKER_POLICIES, default=DEFAULT_POLICY)
    ap.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(message)s")
    return serve(args.socket, idle=args.idle, detach=args.detach, max_queue=args.max_queue,
                 policy=args.policy, max_frame=args.max_frame)


if __name__ == "__main__":
    sys.exit(main())
