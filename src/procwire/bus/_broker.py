"""The local broker: one asyncio process per user (per socket) that routes bus events by
pattern and carries request/reply between the processes of one machine.

It speaks procwire's channel framing over ``unix://`` (4-byte length, then the payload; see
``_wire.py`` for the frames), with the sans-IO ``FrameDecoder`` driven straight from an asyncio
``BufferedProtocol``: a frame is handled in the callback that read it, and what it causes is
written in that same loop pass (no task, future or queue between reading and writing). It never
decodes event data: a publisher's frame is forwarded byte for byte (one ``bytes`` object, built
once) to every client whose registered patterns match the event name, and to nobody else. The
frames one read brings in are answered with one write per client (the writes of a burst are
coalesced).

Flow control: every client has a bounded outgoing queue (``max_queue`` frames and
``max_queue_bytes``) behind the socket's own small buffer (``_WRITE_BUFFER``). While the socket
takes data, frames are written at once; once it is full, frames queue. When a client reads too
slowly and its queue fills, its ``policy`` decides: ``drop_oldest`` discards the oldest events
(counted; the client gets a ``procwire.gap`` notice saying how many once it catches up) or
``disconnect`` closes it (it reconnects and reports the gap itself). Acknowledgements, requests
and replies go through a separate queue that is never dropped from; a client that lets that one
overflow is disconnected. A publisher is never slowed down by a slow subscriber.

Bad clients: a frame that is not a broker frame, an unknown kind, a forbidden name, or no
``hello`` within 5 s: the client gets ``bye`` with the reason and is disconnected; a frame over
``max_frame`` bytes: disconnected at once (the stream has no trustworthy boundary left). Both are
counted in ``bad_clients``; everybody else is untouched.

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
import stat
import struct
import sys
import time
import uuid
from collections import deque
from typing import Any

import msgspec

from .._errors import AddressInUse, ProtocolError
from .._url import Address
from ..protocol.framing import FrameDecoder
from ..transports import unix as _unix
from ..transports.base import TransportOptions
from ._paths import DIRECT_PREFIX, BrokerFiles, default_socket_path, direct_path_ok, try_lock
from ._patterns import MAX_NAME, RESERVED_PREFIX, Matcher
from ._wire import VERSION, decode_broker_frame, encode_frame

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
_WRITE_BUFFER = 256 * 1024   # the transport's own buffer: small, so our queue is the real bound
_READ_BUFFER = 64 * 1024     # per client; a larger frame gets a buffer of its own
_DRAIN_CHUNK = 64 * 1024     # queued frames joined into one write when a client catches up
_ROUTE_CACHE = 4096
_MAX_GIVEN = 1024  # direct routes given to one requests connection at most

_u32 = struct.Struct(">I").pack


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
    direct: str = ""  # this bus's direct request socket (see _direct), if it has one
    routes: bool = False  # send this connection the direct routes of the names it requests


class _HandleBody(msgspec.Struct):
    direct: str = ""


class _ReqHead(msgspec.Struct):
    id: str
    reply_to: str = ""


_decode_hello = msgspec.json.Decoder(_Hello).decode
_decode_req = msgspec.json.Decoder(_ReqHead).decode
_decode_handle = msgspec.json.Decoder(_HandleBody | None).decode
_decode_batch = msgspec.json.Decoder(list[tuple[str, msgspec.Raw]]).decode
_json_str = msgspec.json.Encoder().encode


def _name_ok(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME and not name.startswith(RESERVED_PREFIX)


def _framed(payload: bytes) -> bytes:
    return _u32(len(payload)) + payload


class _Client(asyncio.BufferedProtocol):
    """One connected bus, as the broker sees it: its connection's protocol and its state."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.id = 0
        self.transport: asyncio.Transport | None = None
        self.dec = FrameDecoder(broker.max_frame, _READ_BUFFER)
        self.space: _Space | None = None
        self.name = ""
        self.pid = 0
        self.reply_to = ""
        self.patterns: dict[str, Matcher] = {}
        self.handles: set[str] = set()
        self.direct = ""      # its direct request socket (a responder), or ""
        self.routes = False   # a requests connection that takes direct routes
        self.given: set[str] = set()  # names whose route it was given (and not withdrawn)
        self.out: deque[bytes] = deque()   # events: dropped from under drop_oldest
        self.ctl: deque[bytes] = deque()   # acks, requests, replies, notices: never dropped
        self.out_bytes = 0
        self.max_queue = DEFAULT_QUEUE
        self.max_bytes = DEFAULT_QUEUE_BYTES
        self.policy = DEFAULT_POLICY
        self.paused = False   # the transport's buffer is full: frames queue in out / ctl
        self.closing = False  # said bye, failed, or gone: nothing more is sent or read
        self.timer: asyncio.TimerHandle | None = None
        self.since = time.time()
        # counters
        self.frames_in = 0
        self.events_in = 0
        self.requests_in = 0
        self.delivered = 0
        self.dropped = 0
        self.unreported = 0  # dropped, not yet told to the client
        self.queue_peak = 0

    # -- asyncio protocol callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.broker._connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.closing:  # a broken stream's decoder refuses: read into a scrap buffer
            return memoryview(bytearray(4096))
        return self.dec.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return
        try:
            frames = self.dec.buffer_updated(nbytes)
        except ProtocolError as exc:  # FrameTooLarge: no frame boundary to trust any more
            self.broker._failed(self, exc)
            return
        if frames:
            self.broker._frames(self, frames)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.broker._lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.broker._drain(self)

    # -- status --------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "name": self.name,
                "channel": self.space.name if self.space else None,
                "patterns": sorted(self.patterns)[:20], "n_patterns": len(self.patterns),
                "handles": sorted(self.handles)[:20], "direct": bool(self.direct),
                "policy": self.policy,
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
        # name -> requests connections given its direct route (withdrawn when its handlers
        # change)
        self.holders: dict[str, set[_Client]] = {}

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

    def drop(self, c: _Client) -> list[str]:
        """``c`` left; the names whose handlers changed."""
        self.members.discard(c)
        if c in self.subscribers:
            self.subscribers.remove(c)
            self.routes.clear()
        for name in c.given:
            held = self.holders.get(name)
            if held is not None:
                held.discard(c)
                if not held:
                    del self.holders[name]
        c.given.clear()
        return [name for name in list(c.handles) if self.unhandle(c, name)]

    def unhandle(self, c: _Client, name: str) -> bool:
        hs = self.handlers.get(name)
        if hs and c in hs:
            hs.remove(c)
            if not hs:
                del self.handlers[name]
                self.turn.pop(name, None)
            return True
        return False

    def withdraw(self, name: str) -> set[_Client]:
        """``name``'s handlers changed: the connections given its route, which no longer
        holds."""
        held = self.holders.pop(name, None) or set()
        for h in held:
            h.given.discard(name)
        return held


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
        self.clients: dict[int, _Client] = {}   # connected and not told to go
        self.conns: set[_Client] = set()        # every open connection, leaving ones too
        self.spaces: dict[str, _Space] = {}
        self.by_reply: dict[str, _Client] = {}
        self._next_id = 0
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_activity = time.monotonic()
        self._samples: deque[tuple[float, int, int, int]] = deque(maxlen=6)
        # While the frames of one read are handled: what each client gets, written as one
        # buffer at the end (None: write at once).
        self._batch: dict[_Client, list[bytes]] | None = None
        # counters
        self.clients_seen = 0
        self.events_in = 0
        self.deliveries = 0
        self.requests_in = 0
        self.replies = 0
        self.replies_unroutable = 0
        self.no_responder = 0
        self.routes_given = 0
        self.bad_direct = 0
        self.folder_real = os.path.realpath(self.files.folder)
        self.dropped = 0
        self.slow_disconnects = 0
        self.bad_clients = 0
        self.refused = 0

    # -- serving -----------------------------------------------------------------------------

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.files.ensure_folder()
        sock, _, unlink = _unix._bind(Address.parse(self.files.url),
                                      TransportOptions(backlog=512))
        try:
            server = await loop.create_unix_server(lambda: _Client(self), sock=sock)
        except BaseException:
            sock.close()
            if unlink is not None:
                unlink()
            raise
        fd = os.open(self.files.pid + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(self.files.pid + ".tmp", self.files.pid)
        self._sweep_direct()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        log.info("procwire broker %d listening on %s (idle exit: %s)", os.getpid(),
                 self.files.socket, f"{self.idle} s" if self.idle > 0 else "never")
        ticker = asyncio.create_task(self._ticker())
        try:
            await self._stop.wait()
        finally:
            server.close()               # no new clients; the socket file goes too, so new
            if unlink is not None:       # clients start a new broker
                unlink()
            ticker.cancel()
            for c in list(self.clients.values()):
                self._bye(c, "shutdown")
            deadline = time.monotonic() + 2.0
            while self.conns and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for c in list(self.conns):
                if c.transport is not None:
                    c.transport.abort()
            await asyncio.sleep(0)       # let connection_lost run
            if self.files.read_pid() == os.getpid():
                with contextlib.suppress(OSError):
                    os.unlink(self.files.pid)
            log.info("procwire broker %d stopped", os.getpid())

    def _remove_dead_direct(self, path: str, again: bool) -> None:
        """A bus with the direct socket ``path`` left: remove the file if nothing listens on it
        (its bus died; one that was only disconnected still listens and keeps it). A dying
        process may close its broker connection a moment before its listening socket: look
        again after a while."""
        if any(c.direct == path for c in self.clients.values()):
            return  # it came back meanwhile
        listening = _unix._listening_paths()  # (Linux; elsewhere the file is left)
        if listening is not None and path not in listening:
            with contextlib.suppress(OSError):
                os.unlink(path)  # checked when taken: named so, in this broker's folder
        elif listening is not None and again and self._loop is not None:
            self._loop.call_later(1.0, self._remove_dead_direct, path, False)

    def _sweep_direct(self) -> None:
        """Remove the direct request sockets of buses that died while no broker ran (nothing
        listens on them)."""
        try:
            names = [n for n in os.listdir(self.files.folder) if n.startswith(DIRECT_PREFIX)]
        except OSError:
            return
        if not names:
            return
        listening = _unix._listening_paths()
        if listening is None:
            return  # (not Linux: no way to tell without connecting; the files are left)
        # as each bus spelled it: compare real paths
        live = {os.path.realpath(p) for p in listening
                if os.path.basename(p).startswith(DIRECT_PREFIX)}
        for n in names:
            path = os.path.join(self.files.folder, n)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode) and os.path.realpath(path) not in live:
                    os.unlink(path)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _ticker(self) -> None:
        step = 1.0 if self.idle <= 0 else min(1.0, max(0.05, self.idle / 4))
        last_sample = 0.0
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            if now - last_sample >= 1.0:
                last_sample = now
                self._samples.append((now, self.events_in, self.deliveries, self.requests_in))
            if self.idle > 0 and not self.conns and now - self._last_activity >= self.idle:
                log.info("no clients for %.1f s: exiting", self.idle)
                self.stop()
                return

    # -- connections -------------------------------------------------------------------------

    def _connected(self, c: _Client) -> None:
        assert c.transport is not None and self._loop is not None
        if len(self.clients) >= self.max_clients:
            self.refused += 1
            c.closing = True
            c.transport.abort()
            return
        self._next_id += 1
        c.id = self._next_id
        self.clients[c.id] = c
        self.conns.add(c)
        self.clients_seen += 1
        c.transport.set_write_buffer_limits(high=_WRITE_BUFFER)
        c.timer = self._loop.call_later(HELLO_TIMEOUT, self._hello_late, c)

    def _hello_late(self, c: _Client) -> None:
        c.timer = None
        if c.space is None and not c.closing:
            self._protocol_error(c, f"no hello within {HELLO_TIMEOUT} s")

    def _lost(self, c: _Client) -> None:
        self.conns.discard(c)
        self._forget(c)
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        c.out.clear()
        c.ctl.clear()
        c.out_bytes = 0
        if self._batch is not None:
            self._batch.pop(c, None)
        self._last_activity = time.monotonic()

    def _protocol_error(self, c: _Client, reason: str) -> None:
        self.bad_clients += 1
        if self.bad_clients <= 10 or self.bad_clients % 1000 == 0:
            log.warning("client %d (pid %d): %s; disconnected (%d bad clients so far)",
                        c.id, c.pid, reason, self.bad_clients)
        self._bye(c, f"protocol error: {reason}")

    def _failed(self, c: _Client, exc: BaseException) -> None:
        """The stream itself is broken (a frame over the limit): close, no bye."""
        self.bad_clients += 1
        log.warning("client %d (pid %d): %s; disconnected", c.id, c.pid, exc)
        c.closing = True
        self._forget(c)
        if c.transport is not None:
            c.transport.abort()

    # -- incoming frames ---------------------------------------------------------------------

    def _frames(self, c: _Client, frames: list[memoryview]) -> None:
        """The frames of one read (views into ``c``'s read buffer, valid until we return)."""
        if len(frames) == 1:  # a request, a reply, an emit: written out at once
            self._frame_safely(c, frames[0])
            return
        batch: dict[_Client, list[bytes]] = {}
        self._batch = batch
        try:
            for f in frames:
                if c.closing:
                    break
                self._frame_safely(c, f)
        finally:
            self._batch = None
            for t, parts in batch.items():
                tr = t.transport
                if not t.closing and tr is not None and not tr.is_closing():
                    tr.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def _frame_safely(self, c: _Client, b: memoryview) -> None:
        try:
            self._frame(c, b)
        except _Bad as exc:
            self._protocol_error(c, str(exc))
        except Exception:  # a bug: drop this client, keep serving the others, say so
            log.exception("client %d (pid %d): unexpected error; disconnected", c.id, c.pid)
            self._bye(c, "internal error")

    def _frame(self, c: _Client, b: memoryview) -> None:
        c.frames_in += 1
        try:
            f = decode_broker_frame(b)
        except RecursionError:
            raise _Bad("not a broker frame: JSON nested too deeply") from None
        except (msgspec.DecodeError, ValueError) as exc:
            raise _Bad(f"not a broker frame: {exc}") from None
        space = c.space
        kind = f.kind
        if space is None:
            if kind != "hello":
                raise _Bad(f"the first frame must be hello, not {kind!r}")
            self._hello(c, f.seq, f.name, f.body)
            return
        if kind == "pub":
            name = f.name
            if not _name_ok(name):
                raise _Bad(f"event name not allowed: {name[:80]!r}")
            targets = space.routes.get(name)
            if targets is None:
                targets = space.route(name)
            if targets:
                wire = _u32(len(b)) + b   # built once, the same bytes to every subscriber
                send = self._send
                for t in targets:
                    send(t, wire, False)
            n = len(targets)
            self.events_in += 1
            self.deliveries += n
            c.events_in += 1
            if f.seq:
                self._send(c, _framed(b'["ok",%d,"",%d]' % (f.seq, n)), True)
        elif kind == "req":
            self._request(c, space, f.seq, f.name, f.body, b)
        elif kind == "rep":
            target = self.by_reply.get(f.name)
            if target is None:
                self.replies_unroutable += 1
            else:
                self.replies += 1
                self._send(target, _u32(len(b)) + b, True)
        elif kind == "pubs":
            self._publish_batch(c, space, f.seq, f.body, b)
        elif kind in ("sub", "unsub", "handle", "unhandle"):
            try:
                if kind == "sub":
                    self._sub(c, f.name)
                elif kind == "unsub":
                    if c.patterns.pop(f.name, None) is not None:
                        space.resubscribed(c)
                elif kind == "handle":
                    self._direct_of(c, f.body)
                    self._handle(c, f.name)
                else:
                    c.handles.discard(f.name)
                    if space.unhandle(c, f.name):
                        self._reroute(space, f.name)
            except ValueError as exc:
                if f.seq:
                    self._send(c, _framed(encode_frame("err", f.seq, "", {
                        "type": "ValueError", "message": str(exc)})), True)
                return
            if f.seq:
                self._send(c, _framed(b'["ok",%d,"",null]' % f.seq), True)
        elif kind == "stats":
            self._send(c, _framed(encode_frame("ok", f.seq, "", self.stats())), True)
        else:
            raise _Bad(f"unknown frame kind {kind[:40]!r}")

    def _hello(self, c: _Client, seq: int, name: str, body: msgspec.Raw) -> None:
        try:
            h = _decode_hello(body)
        except (msgspec.DecodeError, ValueError) as exc:
            raise _Bad(f"bad hello: {exc}") from None
        if h.version != VERSION:
            raise _Bad(f"wire version {h.version} (this broker speaks {VERSION})")
        if not h.channel or len(h.channel) > MAX_NAME:
            raise _Bad("bad channel name")
        if len(h.reply_to) > 200 or len(h.patterns) > MAX_PATTERNS:
            raise _Bad("hello too large")
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        c.name = name[:200]
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
        c.routes = h.routes
        if h.direct:
            self._set_direct(c, h.direct)
        try:
            for p in h.patterns:
                self._sub(c, p)
            for n in h.handles:
                self._handle(c, n)
        except (ValueError, TypeError) as exc:
            raise _Bad(f"bad hello: {exc}") from None
        self._send(c, _framed(encode_frame("welcome", seq, "", {
            "broker_pid": os.getpid(), "run_id": self.run_id, "client_id": c.id,
            "max_frame": self.max_frame, "queue": c.max_queue, "policy": c.policy,
            "version": VERSION})), True)

    def _publish_batch(self, c: _Client, space: _Space, seq: int, body: msgspec.Raw,
                       b: memoryview) -> None:
        """``pubs``: many events in one frame. When every event goes to the same buses (the
        usual case: one name, or names with the same subscribers), the frame is forwarded
        unchanged, one write per bus for the whole batch; otherwise each bus gets a frame
        with just its events, in order."""
        try:
            items = _decode_batch(body)
        except (msgspec.DecodeError, ValueError) as exc:
            raise _Bad(f"bad event batch: {exc}") from None
        routes = space.routes
        first: tuple[_Client, ...] | None = None
        same = True
        per: list[tuple[_Client, ...]] = []
        last_name = None
        targets: tuple[_Client, ...] = ()
        for name, _ in items:
            if name != last_name:  # batches mostly repeat one name
                if not _name_ok(name):
                    raise _Bad(f"event name not allowed: {name[:80]!r}")
                targets = routes.get(name)  # type: ignore[assignment]
                if targets is None:
                    targets = space.route(name)
                last_name = name
                if first is None:
                    first = targets
                elif targets is not first and targets != first:
                    same = False
            per.append(targets)
        n = 0
        send = self._send
        if same and first:
            n = len(first) * len(items)
            wire = _u32(len(b)) + b
            for t in first:
                send(t, wire, False)
        elif not same:
            mine: dict[_Client, list[bytes]] = {}
            for (name, data), ts in zip(items, per, strict=True):
                if ts:
                    item = b"[" + _json_str(name) + b"," + bytes(data) + b"]"
                    for t in ts:
                        mine.setdefault(t, []).append(item)
                    n += len(ts)
            for t, parts in mine.items():
                send(t, _framed(b'["pubs",0,"",[' + b",".join(parts) + b"]]"), False)
        self.events_in += len(items)
        self.deliveries += n
        c.events_in += len(items)
        if seq:
            send(c, _framed(b'["ok",%d,"",%d]' % (seq, n)), True)

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
            self._reroute(c.space, name)
        c.handles.add(name)

    def _direct_of(self, c: _Client, body: msgspec.Raw) -> None:
        """A ``handle`` frame's body: ``{"direct": path}`` (the bus's direct request socket)
        or null."""
        try:
            h = _decode_handle(body)
        except (msgspec.DecodeError, ValueError) as exc:
            raise _Bad(f"bad handle frame: {exc}") from None
        if h is not None and h.direct and h.direct != c.direct and self._set_direct(c, h.direct):
            for name in c.handles:
                self._reroute(c.space, name)  # type: ignore[arg-type]

    def _set_direct(self, c: _Client, path: str) -> bool:
        """Take ``path`` as ``c``'s direct request socket if it is one in this broker's
        folder (however the client spells that folder); otherwise ignore it (its requests
        come through here, as ever)."""
        if direct_path_ok(path, self.folder_real):
            c.direct = path
            return True
        self.bad_direct += 1
        log.info("client %d (pid %d): direct request socket %r is not in %s; ignored",
                 c.id, c.pid, path[:200], self.files.folder)
        return False

    def _reroute(self, space: _Space, name: str) -> None:
        """``name``'s handlers changed: withdraw its direct route from those given it (they
        read it before their next direct request)."""
        for h in space.withdraw(name):
            if not h.closing:
                self._send(h, _framed(encode_frame("route", 0, name, None)), True)

    def _request(self, c: _Client, space: _Space, seq: int, name: str, body: msgspec.Raw,
                 b: memoryview) -> None:
        if not _name_ok(name):
            raise _Bad(f"request name not allowed: {name[:80]!r}")
        self.requests_in += 1
        c.requests_in += 1
        target = space.pick_handler(name)
        if target is not None:
            if (c.routes and target.direct and len(space.handlers[name]) == 1
                    and (name in c.given or len(c.given) < _MAX_GIVEN)):
                # Its only handler has a direct socket: the requester may go there itself
                # (again, with each request that still comes here: it may have given up on
                # the socket for a while).
                c.given.add(name)
                space.holders.setdefault(name, set()).add(c)
                self.routes_given += 1
                self._send(c, _framed(encode_frame("route", 0, name, {
                    "path": target.direct})), True)
            self._send(target, _u32(len(b)) + b, True)
            return
        try:
            head = _decode_req(body)
        except (msgspec.DecodeError, ValueError) as exc:
            raise _Bad(f"bad request: {exc}") from None
        self.no_responder += 1
        # Straight back to the requester: nobody will answer, so it need not wait.
        self._send(c, _framed(encode_frame("rep", 0, head.reply_to, {
            "id": head.id, "no_responder": True})), True)

    # -- outgoing ----------------------------------------------------------------------------

    def _send(self, t: _Client, data: bytes, ctl: bool) -> None:
        """Give ``t`` one framed message: written now (or at the end of this read's frames)
        while its socket takes data, queued (bounded, see the module docstring) when not.
        ``ctl``: an answer, request or reply (never dropped) rather than an event."""
        if t.closing:
            return
        if t.paused:
            if ctl:
                t.ctl.append(data)
                if len(t.ctl) > t.max_queue:
                    self.slow_disconnects += 1
                    self._bye(t, f"slow consumer: {len(t.ctl)} replies and acknowledgements "
                                 "unread")
                return
            out = t.out
            out.append(data)
            t.out_bytes += len(data)
            if len(out) > t.queue_peak:
                t.queue_peak = len(out)
            if len(out) >= t.max_queue or t.out_bytes > t.max_bytes:
                self._overflow(t)
            return
        batch = self._batch
        if batch is None:
            tr = t.transport
            if tr is None or tr.is_closing():  # failed: connection_lost is on its way
                return
            t.delivered += 1
            tr.write(data)
        else:
            t.delivered += 1
            parts = batch.get(t)
            if parts is None:
                batch[t] = [data]
            else:
                parts.append(data)

    def _drain(self, c: _Client) -> None:
        """``c``'s socket takes data again: write what queued, a chunk at a time, then the
        gap notice if events were dropped."""
        tr = c.transport
        if tr is None:
            return
        ctl, out = c.ctl, c.out
        while not c.paused and not c.closing:
            if ctl or out:
                chunk: list[bytes] = []
                size = 0
                while ctl and size < _DRAIN_CHUNK:
                    b = ctl.popleft()
                    chunk.append(b)
                    size += len(b)
                while out and size < _DRAIN_CHUNK:
                    b = out.popleft()
                    c.out_bytes -= len(b)
                    chunk.append(b)
                    size += len(b)
                c.delivered += len(chunk)
                tr.write(b"".join(chunk))
            elif c.unreported:
                n, c.unreported = c.unreported, 0
                tr.write(_framed(encode_frame("notice", 0, "procwire.gap", {
                    "reason": "slow_consumer", "dropped": n,
                    "detail": f"the broker dropped {n} events this bus read too slowly "
                              f"for (queue of {c.max_queue}, policy drop_oldest)"})))
            else:
                return

    def _overflow(self, c: _Client) -> None:
        out = c.out
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
        """Tell ``c`` why, then close its connection (what is queued for it is dropped)."""
        if c.closing:
            return
        c.closing = True
        c.out.clear()
        c.out_bytes = 0
        c.ctl.clear()
        self._forget(c)
        if self._batch is not None:
            self._batch.pop(c, None)
        tr = c.transport
        if tr is None or tr.is_closing():
            return
        tr.write(_framed(encode_frame("bye", 0, reason[:500], None)))
        tr.close()  # after what the transport holds is written
        # The peer may read nothing: cut it off if that has not gone out in a second.
        assert self._loop is not None
        if c.timer is not None:
            c.timer.cancel()
        c.timer = self._loop.call_later(1.0, tr.abort)

    def _forget(self, c: _Client) -> None:
        if self.clients.pop(c.id, None) is None:
            return
        if c.space is not None:
            for name in c.space.drop(c):
                self._reroute(c.space, name)
            if c.direct:
                self._remove_dead_direct(c.direct, again=True)
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
                       "no_responder": self.no_responder, "routes_given": self.routes_given,
                       "bad_direct": self.bad_direct,
                       "dropped": self.dropped,
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
