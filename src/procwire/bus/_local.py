"""``broker://``: the bus through this user's local broker (the default ``Bus()``).

``Bus()`` / ``Bus("broker://")`` use the default socket (see ``_paths``; ``PROCWIRE_BROKER``
overrides it); ``Bus("broker:///path/to/broker.sock")`` names one. Query options:
``idle`` (seconds a broker this bus starts stays up without clients, default 60),
``queue`` (frames the broker may queue for this bus, default 10 000) and ``policy``
(``drop_oldest`` or ``disconnect``: what the broker does when that queue is full),
``autostart`` (``0``: never start a broker, fail with ``ConnectionRefused``), ``outbox``
(below) and ``direct`` (``0``: no direct request path, see ``_direct``).

When nothing listens on the socket, the bus starts a broker, detached (its own session, output
to ``<socket>.log``, not a child that dies with this process), under an ``flock`` on
``<socket>.spawn`` so that many processes starting at once start one broker.

One main connection per bus, read by one thread (events, requests to this bus's handlers,
acknowledgements), plus, from the first request or ``emit_many`` of a blocking bus on, a
requests connection whose answer the calling thread reads itself (one thread at a time; the
others, and the asyncio bus, use the main connection). If the main connection breaks (the broker
was killed, or it disconnected this bus for reading too slowly), the thread reconnects with
backoff, starting a new broker when none runs, registers the bus's patterns and request names
again, and emits ``procwire.gap`` with ``{"reason", "detail", "down_for", "backend"}``: events
published meanwhile are lost (the requests connection is opened again at the next request).
``reason``: ``restarted`` (a new broker), ``dropped_by_server`` (the broker said bye: too slow,
or a protocol error), ``connection_lost``; the broker itself sends ``slow_consumer`` gaps when
it dropped events under ``drop_oldest``.

``emit`` is pipelined: it queues the encoded event in a bounded outbox (``outbox`` events,
default 10 000) and returns -1; a flusher thread writes everything queued since its last write
as one ``pubs`` frame, which the broker answers with ``ok`` (read by the reader thread; the
broker handles a connection's frames in order, so the answers come in the order the batches
went). A full outbox makes ``emit`` wait up to its timeout (then ``procwire.Timeout``); an
event that cannot be written before its timeout while the broker is unreachable is counted and
raised by the next ``emit``/``flush``/``close``: never dropped silently. What was written but
not confirmed when the connection broke is written again on the next connection, before
anything newer (the broker may have delivered part of it: those events arrive twice). A
confirmed emit (``confirm=True``: one ``pub`` frame and its ``ok``, with the receiver count),
``emit_many``, requests and replies wait for the events queued before them, so order holds.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from .._errors import (
    AddressError,
    ChannelClosed,
    ConnectionClosed,
    ConnectionRefused,
    DecodeError,
    ProcwireError,
    ProtocolError,
    Timeout,
)
from .._sync.channel import Channel
from .._sync.channel import connect as sync_connect
from ._backend import Backend, Sink, flush_at_exit
from ._broker import BROKER_POLICIES, DEFAULT_IDLE, LOCK_TAKEN
from ._core import Event
from ._direct import MAX_FRAME, DirectServer
from ._paths import BrokerFiles, default_socket_path, wait_lock
from ._wire import (
    VERSION,
    ClientFrame,
    WireCodec,
    batch_frame,
    encode_batch,
    encode_frame,
    encode_item,
)

__all__ = ["LocalBackend", "connect_broker", "start_broker"]

log = logging.getLogger("procwire.bus")

_ENVELOPE = 4096  # bytes of frame around a message's data, within the broker's max frame
DEFAULT_OUTBOX = 10_000  # events emitted but not yet confirmed before emit() waits for room
_SEND_SLICE = 0.25  # the flusher's longest wait for room in the socket at a time
_BATCH_HEAD = 40  # bytes of a "pubs" frame around its items: ["pubs",<seq>,"",[ ... ]]
_OUTBOX_BYTES = 64 << 20  # ... or this many bytes of them
_ASYNC_IO_THREAD = "procwire-bus-io"  # AsyncBus's single I/O thread (see request())


def _src_root() -> str:
    import procwire

    return os.path.dirname(os.path.dirname(os.path.abspath(procwire.__file__)))


def start_broker(files: BrokerFiles, *, idle: float, timeout: float | None,
                 extra: list[str] | None = None) -> None:
    """Start a detached broker on ``files.socket`` and wait until it has forked (or found
    another broker holding the lock); the caller then connects with retries."""
    files.ensure_folder()
    cmd = [sys.executable, "-m", "procwire.bus._broker", "--socket", files.socket,
           "--idle", str(idle), "--detach", *(extra or [])]
    env = dict(os.environ)
    # The broker must import this same procwire, wherever it comes from.
    env["PYTHONPATH"] = _src_root() + (os.pathsep + env["PYTHONPATH"]
                                       if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd="/",
                            env=env, close_fds=True)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise Timeout(f"the broker did not start within {timeout} s (see {files.log})"
                      ) from None
    if rc not in (0, LOCK_TAKEN):
        raise ConnectionRefused(f"could not start a broker on {files.socket} (exit status "
                                f"{rc}; see {files.log})")


def connect_broker(files: BrokerFiles, *, timeout: float | None, autostart: bool,
                   idle: float = DEFAULT_IDLE, max_frame: int = MAX_FRAME) -> Channel:
    """A channel to the broker on ``files.socket``, starting one if none runs (``autostart``)."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def attempt(retry: bool) -> Channel:
        return sync_connect(files.url, codec=WireCodec(), timeout=left(), retry=retry,
                            max_frame_size=max_frame)

    try:
        return attempt(False)
    except ConnectionRefused:
        if not autostart:
            raise
    files.ensure_folder()
    with wait_lock(files.spawn, left()):
        try:  # someone else may have started it while we waited for the lock
            return attempt(False)
        except ConnectionRefused:
            pass
        start_broker(files, idle=idle, timeout=left())
        return attempt(True)


class _Slot:
    """One thread waiting for one answer (cheaper than an Event)."""

    __slots__ = ("lock", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.value: ClientFrame | None = None  # None: the connection was lost first

    def set(self, value: ClientFrame | None) -> None:
        self.value = value
        self.lock.release()

    def wait(self, timeout: float | None) -> bool:
        return self.lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout))


class _Lost(Exception):
    """The connection broke before the broker answered."""


def _close_quietly(ch: Channel) -> None:
    """Close a channel that is being given up: unsent bytes in its buffer make ``close``
    raise ``Timeout``, which must not end the caller (the reader thread, mid-recovery)."""
    try:
        ch.close(0)
    except ProcwireError:
        pass


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _wait(timeout: float | None, deadline: float | None) -> float | None:
    """A fast path's wait for its reply: ``timeout`` itself while little of it has gone (the
    socket's receive timeout is then set once, not at every call; the caller's own wait for
    the reply keeps the exact deadline), else what is left of it."""
    if deadline is None or timeout is None:
        return None
    left = max(0.0, deadline - time.monotonic())
    return timeout if timeout - left < 0.05 else left


def _bool(value: str) -> bool:
    return value.strip().lower() not in ("0", "no", "false", "off", "")


class LocalBackend(Backend):
    """See the module docstring."""

    def __init__(self, url: str, *, channel: str = "procwire", max_message_size: int = 1 << 20,
                 emit_timeout: float | None = 5.0, **_: Any) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.netloc:
            raise AddressError(f"{url!r}: use broker:///absolute/path.sock (or broker:// for "
                               "the default)")
        path = urllib.parse.unquote(parts.path) or default_socket_path()
        self.files = BrokerFiles(path)
        self.idle = DEFAULT_IDLE
        self.queue = 0
        self.policy = ""
        self.autostart = True
        self.outbox_max = DEFAULT_OUTBOX
        self.direct = True  # the direct request path, both ways (see _direct)
        for key, value in urllib.parse.parse_qsl(parts.query):
            try:
                if key == "idle":
                    self.idle = float(value)
                elif key == "queue":
                    self.queue = int(value)
                elif key == "policy":
                    if value not in BROKER_POLICIES:
                        raise ValueError(f"policy must be one of {', '.join(BROKER_POLICIES)}")
                    self.policy = value
                elif key == "autostart":
                    self.autostart = _bool(value)
                elif key == "outbox":
                    self.outbox_max = int(value)
                    if self.outbox_max < 1:
                        raise ValueError("outbox must be an int >= 1")
                elif key == "direct":
                    self.direct = _bool(value)
                else:
                    raise ValueError(f"unknown option {key!r} (idle, queue, policy, autostart,"
                                     " outbox, direct)")
            except ValueError as exc:
                raise AddressError(f"{url!r}: {exc}") from None
        if not channel or not isinstance(channel, str):
            raise AddressError("a bus needs a non-empty channel name")
        self.url = "broker://" + self.files.socket
        self.channel = channel
        self.max_message_size = max_message_size
        self.reply_to = uuid.uuid4().hex
        self._name = f"{os.path.basename(sys.argv[0] or 'python')}[{os.getpid()}]"
        self._lock = threading.Lock()
        self._patterns: dict[str, int] = {}
        self._handles: set[str] = set()
        self._pending: dict[int, _Slot] = {}
        self._seq = itertools.count(1)
        self._ch: Channel | None = None
        self._sink: Sink | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stop = threading.Event()
        self._up = threading.Event()
        self._limit = max_message_size + _ENVELOPE
        self._registered: tuple[set[str], set[str]] = (set(), set())
        # The requests connection (see _request_direct): one thread at a time uses it.
        self._rr: Channel | None = None
        self._rr_lock = threading.Lock()
        self._rr_reply_to = uuid.uuid4().hex
        self._rr_retry_at = 0.0
        # The direct path (see _direct): as responder, our DirectServer; as requester, the
        # routes the broker gave us (name -> socket path) and connections to those sockets.
        self._inline: Callable[[str, dict[str, Any]], dict[str, Any] | None] | None = None
        self._direct: DirectServer | None = None
        self._direct_tried = False
        self._direct_lock = threading.Lock()
        self._routes: dict[str, str] = {}
        self._peers: dict[str, Channel] = {}
        self._peer_retry: dict[str, float] = {}  # path -> not before (it failed)
        self.broker: dict[str, Any] = {}
        self.emit_timeout = emit_timeout
        # The outbox (pipelined emit; see the module docstring): events emitted and waiting for
        # the flusher, then written in "pubs" frames that wait for the broker's "ok". Counted
        # in _queued (ever queued) and _settled (ever confirmed or failed), in order.
        self._olock = threading.Lock()
        self._wlock = threading.Lock()  # the flusher's write (taken before _olock)
        self._ocond = threading.Condition(self._olock)  # settled moved, or room made
        self._owake = threading.Condition(self._olock)  # work for the flusher
        self._out: deque[tuple[bytes, float | None]] = deque()  # (item, give up at)
        self._out_bytes = 0  # of _out and _inflight
        self._inflight: deque[tuple[int, list[tuple[bytes, float | None]]]] = deque()
        self._queued = 0
        self._settled = 0
        self._flusher: threading.Thread | None = None
        self._flusher_idle = False  # waiting for work: emit notifies it
        self._closing = False
        self._fail_count = 0
        self._fail_reason = ""
        self._pid = os.getpid()
        # counters
        self.emit_failed = 0
        self.emit_resent = 0
        self.outbox_full = 0
        self.reconnects = 0
        self.server_disconnects = 0
        self.brokers_started = 0
        self.events_received = 0
        self.bad_frames = 0
        self.gaps_from_broker = 0
        self.requests_direct = 0  # sent on the requests connection (the fast path)
        self.requests_peer = 0  # sent straight to the handling bus (the direct path)
        self.peer_fallbacks = 0  # ... that went back through the broker instead
        self.batches_direct = 0  # emit_many batches sent there

    # -- connecting ------------------------------------------------------------------------

    def _hello(self, ch: Channel, timeout: float | None) -> dict[str, Any]:
        with self._lock:
            patterns = sorted(self._patterns)
            handles = sorted(self._handles)
        self._registered = (set(patterns), set(handles))
        ch.send(encode_frame("hello", 1, self._name, {
            "pid": os.getpid(), "reply_to": self.reply_to, "channel": self.channel,
            "patterns": patterns, "handles": handles, "queue": self.queue,
            "policy": self.policy, "version": VERSION,
            "direct": self._direct.path if self._direct is not None else ""}),
            timeout=timeout)
        f: ClientFrame = ch.recv(timeout=timeout)
        if f.kind == "bye":
            raise ConnectionClosed(f"the broker refused this bus: {f.name}", reason="refused")
        if f.kind != "welcome" or not isinstance(f.body, dict):
            raise ProtocolError(f"the broker answered hello with {f.kind!r}")
        return f.body

    def _open(self, timeout: float | None) -> tuple[Channel, dict[str, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        ch = connect_broker(self.files, timeout=timeout, autostart=self.autostart,
                            idle=self.idle)
        try:
            info = self._hello(ch, None if deadline is None
                               else max(0.01, deadline - time.monotonic()))
        except BaseException:
            _close_quietly(ch)
            raise
        limit = info.get("max_frame")
        if isinstance(limit, int) and limit > 0:
            self._limit = min(self.max_message_size + _ENVELOPE, limit)
        return ch, info

    def _install(self, ch: Channel) -> bool:
        """Make ``ch`` the live channel; then register what changed since its hello (a
        subscribe from another thread during the handshake). False once closed."""
        with self._lock:
            if self._closed:
                return False
            self._ch = ch
            patterns, handles = set(self._patterns), set(self._handles)
        sent_p, sent_h = self._registered
        for p in patterns - sent_p:
            self._notify("sub", p)
        for p in sent_p - patterns:
            self._notify("unsub", p)
        for h in handles - sent_h:
            self._notify("handle", h)
        for h in sent_h - handles:
            self._notify("unhandle", h)
        return True

    def start(self, sink: Sink, timeout: float | None) -> None:
        self._sink = sink
        ch, info = self._open(timeout)
        self.broker = info
        if not self._install(ch):
            _close_quietly(ch)
            raise ChannelClosed("this bus is closed")
        self._up.set()
        self._thread = threading.Thread(target=self._reader, args=(ch,), daemon=True,
                                        name="procwire-bus-broker")
        self._thread.start()

    # -- the reader thread -----------------------------------------------------------------

    def _reader(self, ch: Channel) -> None:
        bye: str | None = None
        try:
            while not self._closed:
                try:
                    bye = self._read_loop(ch)
                except (ConnectionClosed, ChannelClosed, ProtocolError, OSError) as exc:
                    bye = bye or f"{type(exc).__name__}: {exc}"
                if self._closed:
                    break
                new = self._recover(ch, bye)
                if new is None:
                    break
                ch, bye = new, None
        except Exception:  # a bug: say so rather than die silently
            log.exception("procwire bus: the broker reader thread failed")
        finally:
            self._up.clear()
            self._fail_pending()

    def _read_loop(self, ch: Channel) -> str | None:
        """Deliver frames until the connection ends; the broker's bye reason, if it said one."""
        recv = ch.recv
        sink = self._sink
        assert sink is not None
        pending = self._pending
        while True:
            try:
                f = recv()
            except DecodeError as exc:
                self.bad_frames += 1
                log.warning("procwire bus: skipped a bad frame from the broker: %s", exc)
                continue
            kind = f.kind
            if kind == "pub":
                self.events_received += 1
                sink.on_event(f.name, f.body)
            elif kind == "pubs":
                body = f.body
                if not isinstance(body, list):
                    self.bad_frames += 1
                    continue
                if body and type(body[0]) is not Event:  # not all [str, data] pairs
                    good = [Event(*x) for x in body if isinstance(x, list) and len(x) == 2
                            and isinstance(x[0], str)]
                    self.bad_frames += 1
                    body = good
                self.events_received += len(body)
                sink.on_events(body)  # Events, decoded by decode_client_frame
            elif kind == "ok" or kind == "err":
                slot = pending.pop(f.seq, None)
                if slot is not None:
                    slot.set(f)
                elif self._inflight:
                    self._confirm(f.seq, f)
            elif kind == "rep":
                if isinstance(f.body, dict):
                    sink.on_reply(f.body)
            elif kind == "req":
                body = f.body
                if isinstance(body, dict) and isinstance(body.get("id"), str) and \
                        isinstance(body.get("reply_to"), str):
                    sink.on_request(f.name, body)
                else:
                    self.bad_frames += 1
            elif kind == "notice":
                if f.name.startswith("procwire.") and isinstance(f.body, dict):
                    self.gaps_from_broker += f.name == "procwire.gap"
                    sink.on_notice(f.name, dict(f.body, backend=self.url))
            elif kind == "bye":
                return f.name or "bye"
            else:
                self.bad_frames += 1

    def _fail_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.set(None)

    def _recover(self, old: Channel, bye: str | None) -> Channel | None:
        """Reconnect (starting a broker if needed) with backoff; report the gap."""
        down_since = time.monotonic()
        self._up.clear()
        with self._lock:
            ch, self._ch = self._ch, None
        _close_quietly(old)
        self._fail_pending()
        self._requeue()  # (their emit timeouts now run: see _expire)
        old_run = self.broker.get("run_id")
        dropped = bye is not None and not bye.startswith(("ConnectionClosed", "Protocol",
                                                          "ChannelClosed", "OSError"))
        if dropped:
            self.server_disconnects += 1
        log.warning("procwire bus: lost the broker at %s (%s); reconnecting", self.files.socket,
                    bye)
        delay = 0.02
        while not self._closed:
            try:
                ch, info = self._open(timeout=max(2.0, 4 * delay))
            except (ProcwireError, OSError) as exc:
                log.debug("procwire bus: broker still unreachable: %s", exc)
                self._stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 1.0)
                continue
            self.broker = info
            if not self._install(ch):
                _close_quietly(ch)
                return None
            self.reconnects += 1
            self._requeue()  # before _up: the flusher writes it first
            self._up.set()
            if info.get("run_id") != old_run:
                reason = "restarted"
            elif dropped:
                reason = "dropped_by_server"
            else:
                reason = "connection_lost"
            gap = {"reason": reason, "detail": bye or "", "backend": self.url,
                   "down_for": round(time.monotonic() - down_since, 3)}
            log.warning("procwire bus: reconnected to the broker (%s) after %.3f s; events "
                        "published meanwhile are lost (procwire.gap)", reason, gap["down_for"])
            if self._sink is not None:
                self._sink.on_notice("procwire.gap", gap)
            return ch
        return None

    # -- sending ---------------------------------------------------------------------------

    def _lost(self, ch: Channel) -> None:
        """A sending thread found ``ch`` broken: the reader will reconnect. Only while ``ch``
        is still the live channel: a send that failed on an old one must not mark the new
        one down (nothing would set it up again until the next loss)."""
        with self._lock:
            if self._ch is ch:
                self._up.clear()

    def _channel(self, deadline: float | None, what: str) -> Channel:
        """The live channel, waiting (until ``deadline``) for a reconnection if needed."""
        while True:
            if self._closed:
                raise ChannelClosed("this bus is closed")
            ch = self._ch
            if ch is not None and self._up.is_set():
                return ch
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"the broker at {self.files.socket} is unreachable; {what}")
            self._up.wait(0.05 if left is None else min(left, 0.05))

    def _call(self, kind: str, name: str, body: Any, timeout: float | None) -> ClientFrame:
        """Send a frame and wait for the broker's answer. Retries on a new connection after
        a reconnect, within ``timeout``."""
        return self._call_raw(lambda seq: encode_frame(kind, seq, name, body, self._limit),
                              f"{kind} {name!r}", timeout)

    def _call_raw(self, make: Callable[[int], bytes], what: str, timeout: float | None,
                  frames: list[bytes] | None = None) -> ClientFrame:
        """Send ``frames``, then ``make(seq)``, and wait for the answer to ``seq``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ch = self._channel(deadline, f"{what} was not sent")
            seq = next(self._seq)
            data = make(seq)
            slot = _Slot()
            with self._lock:
                self._pending[seq] = slot
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                for b in frames or ():
                    ch.send(b, timeout=left)
                ch.send(data, timeout=left)
            except (ConnectionClosed, ChannelClosed):
                with self._lock:
                    self._pending.pop(seq, None)
                if self._closed:
                    raise
                self._lost(ch)
                continue
            except BaseException:
                with self._lock:
                    self._pending.pop(seq, None)
                raise
            left = None if deadline is None else deadline - time.monotonic()
            if not slot.wait(left):
                with self._lock:
                    self._pending.pop(seq, None)
                raise Timeout(f"the broker did not answer {what} within {timeout} s")
            f = slot.value
            if f is None:  # lost: send again on the next connection
                if self._closed:
                    raise ChannelClosed("this bus is closed")
                continue
            if f.kind == "err":
                err = f.body if isinstance(f.body, dict) else {}
                raise ValueError(str(err.get("message", "the broker refused it")))
            return f

    def _send(self, data: bytes, timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ch = self._channel(deadline, what)
            try:
                ch.send(data, timeout=None if deadline is None
                        else max(0.0, deadline - time.monotonic()))
                return
            except (ConnectionClosed, ChannelClosed):
                if self._closed:
                    raise
                self._lost(ch)

    # -- the outbox: pipelined emit ---------------------------------------------------------

    def publish(self, name: str, data: Any, timeout: float | None) -> int:
        """Queue the event for the flusher; -1 (the receiver count is not known yet). Waits
        up to ``timeout`` for room when ``outbox`` events are unconfirmed."""
        item = encode_item(name, data, self._limit - 64)  # refused here, before queueing
        deadline = None if timeout is None else time.monotonic() + timeout
        size = len(item)
        with self._olock:
            if (self._queued - self._settled < self.outbox_max and self._fail_count == 0
                    and self._out_bytes + size <= _OUTBOX_BYTES and self._flusher is not None
                    and not self._closing):  # the usual case, in one short critical section
                self._enqueue(item, deadline)
                return -1
            self._wait_for_room(size, deadline, timeout)
            if self._flusher is None:
                self._start_flusher()
            self._enqueue(item, deadline)
            self._raise_failure(queued=1)
        return -1

    def publish_nowait(self, name: str, data: Any, timeout: float | None) -> int | None:
        """``publish`` when there is room right away (the asyncio bus, on its loop)."""
        item = encode_item(name, data, self._limit - 64)
        with self._olock:
            if (self._closing or self._fail_count or self._flusher is None
                    or self._queued - self._settled >= self.outbox_max
                    or self._out_bytes + len(item) > _OUTBOX_BYTES):
                return None
            self._enqueue(item, None if timeout is None else time.monotonic() + timeout)
        return -1

    def _enqueue(self, item: bytes, deadline: float | None) -> None:
        """With ``_olock`` held and room checked: queue ``item``; wake an idle flusher."""
        self._out.append((item, deadline))
        self._out_bytes += len(item)
        self._queued += 1
        if self._flusher_idle:
            self._owake.notify()

    def publish_confirmed(self, name: str, data: Any, timeout: float | None) -> int:
        """One confirmed ``pub`` frame, after the events queued before it (in order)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._drain_or_raise(timeout, "this event was not sent")
        f = self._call("pub", name, data, _left(deadline))
        return int(f.body) if isinstance(f.body, int) else -1

    def _wait_for_room(self, size: int, deadline: float | None, timeout: float | None) -> None:
        """With ``_olock`` held: wait until the outbox has room (``Timeout``: none came)."""
        if self._closing:
            raise ChannelClosed("this bus is closed")
        if not (self._queued - self._settled >= self.outbox_max
                or self._out_bytes + size > _OUTBOX_BYTES):
            return
        self.outbox_full += 1
        while (self._queued - self._settled >= self.outbox_max
               or (self._out_bytes and self._out_bytes + size > _OUTBOX_BYTES)):
            left = _left(deadline)
            if left is not None and left <= 0:
                raise Timeout(f"the outbox to the broker at {self.files.socket} stayed full "
                              f"({self._queued - self._settled} events unconfirmed) for "
                              f"{timeout} s: the broker is unreachable or slower than the "
                              "emits; this event was not queued")
            self._ocond.wait(left)
            if self._closing:
                raise ChannelClosed("this bus is closed")

    def _raise_failure(self, queued: int = 0) -> None:
        """Raise (once) what the flusher could not publish; call with ``_olock`` held.
        ``queued``: events of the raising call itself that were queued (the exception's
        ``.queued``, so that the caller still counts them)."""
        n = self._fail_count
        if not n:
            return
        reason = self._fail_reason
        self._fail_count, self._fail_reason = 0, ""
        more = f" (this call's {queued} event(s) were queued)" if queued else ""
        exc = Timeout(f"{n} emitted event(s) were not published: {reason}{more}")
        exc.queued = queued  # type: ignore[attr-defined]
        raise exc

    def _fail(self, n: int, reason: str) -> None:
        """Count ``n`` events (taken out of the outbox by the caller) as not published; call
        with ``_olock`` held. The first reason since the last raise is kept."""
        if not n:
            return
        if not self._fail_count:
            self._fail_reason = reason
        self._fail_count += n
        self.emit_failed += n
        self._settled += n
        self._ocond.notify_all()

    def _start_flusher(self) -> None:
        """With ``_olock`` held: the flusher thread, at the first emit."""
        t = threading.Thread(target=self._flush_loop, daemon=True,
                             name="procwire-bus-broker-flusher")
        self._flusher = t
        flush_at_exit(self)
        t.start()

    def _flush_loop(self) -> None:
        """Write what is queued as ``pubs`` frames (everything queued since the last write,
        up to one frame, in one send), each answered by an ``ok`` that the reader thread
        hands to ``_confirm``. While the broker is unreachable, events whose emit timeout
        has passed are failed (raised by the next emit, flush or close)."""
        try:
            while True:
                with self._olock:
                    while not self._out and not self._closing:
                        self._flusher_idle = True
                        try:
                            self._owake.wait()
                        finally:
                            self._flusher_idle = False
                    if not self._out:
                        return  # closing, nothing left to write
                batch: list[bytes] = []
                with self._wlock:  # (the reader's _requeue never runs mid-write)
                    ch = self._ch
                    if ch is None or not self._up.is_set():
                        ch = None
                    else:
                        seq, batch = self._take_batch()
                        try:
                            if batch:
                                # A bounded wait, so that close() (which needs the socket's
                                # write lock) never waits on a broker that stopped reading.
                                ch.send(batch_frame(seq, batch), timeout=_SEND_SLICE)
                        except Timeout:
                            # The socket's queue stayed full: nothing of this frame went
                            # out. Put it back in front and try again (or fail it, closed).
                            self._unsend(seq)
                            ch = None
                        except (ConnectionClosed, ChannelClosed, OSError):
                            # The reader thread sees the loss too: it puts what is in flight
                            # back in front of the outbox, or fails it once closed.
                            ch = None
                if ch is None:
                    self._expire()
                    if self._closed:
                        return
                    self._up.wait(0.05)
                elif not batch:  # an event to fail waits for the batches before it
                    with self._olock:
                        if self._inflight:
                            self._ocond.wait(0.05)
        except Exception:  # a bug: say so, and do not leave emit queueing for nobody
            log.exception("procwire bus: the broker flusher thread failed")
            with self._olock:
                n = len(self._out) + sum(len(b) for _, b in self._inflight)
                self._out.clear()
                self._inflight.clear()
                self._out_bytes = 0
                self._fail(n, "the flusher thread failed (a bug; see the log)")
                self._flusher = None  # the next emit starts another

    def _take_batch(self) -> tuple[int, list[bytes]]:
        """The flusher: the queued events that fit one frame, now in flight under a new
        seq. An event larger than the broker's frame limit (it shrank since the event was
        encoded: a broker restarted with a smaller ``--max-frame``) fails instead, once the
        events before it are settled: the broker would disconnect this bus for it, again
        after every reconnection. ``(0, [])``: nothing to write now."""
        item_max = self._limit - 64  # what publish accepts under the current limit
        room = self._limit - _BATCH_HEAD
        with self._olock:
            batch: list[tuple[bytes, float | None]] = []
            size = 0
            out = self._out
            while out:
                n = len(out[0][0]) + 1
                if n - 1 > item_max:
                    if batch or self._inflight:
                        # Failed once everything before it is settled: flush() and the
                        # calls that wait for earlier emits count settled events in order.
                        break
                    self._out_bytes -= len(out.popleft()[0])
                    self._fail(1, f"larger than the broker's frame limit ({self._limit} bytes)")
                    continue
                if batch and size + n > room:
                    break
                batch.append(out.popleft())
                size += n
            if not batch:
                return 0, []
            seq = next(self._seq)
            self._inflight.append((seq, batch))
        return seq, [it for it, _ in batch]

    def _unsend(self, seq: int) -> None:
        """The flusher (``_wlock`` held): batch ``seq``, the newest in flight, was not
        written after all: back in front of the outbox."""
        with self._olock:
            if self._inflight and self._inflight[-1][0] == seq:
                _, batch = self._inflight.pop()
                self._out.extendleft(reversed(batch))

    def _expire(self) -> None:
        """Fail the queued events whose emit timeout has passed (the broker is down)."""
        now = time.monotonic()
        with self._olock:
            out = self._out
            n = 0
            while out and out[0][1] is not None and out[0][1] <= now:  # type: ignore[operator]
                self._out_bytes -= len(out.popleft()[0])
                n += 1
            self._fail(n, f"the broker at {self.files.socket} stayed unreachable for their "
                          "emit timeout")

    def _confirm(self, seq: int, f: ClientFrame) -> None:
        """The reader thread: ``ok`` (or ``err``) for ``seq``. Every batch gets its own
        answer, in order (the broker handles a connection's frames in order), so it is the
        oldest batch in flight, or no batch at all (a call that timed out: its late answer must
        not confirm a batch the broker may not have seen yet)."""
        with self._olock:
            inflight = self._inflight
            if not inflight or inflight[0][0] != seq:
                return  # an answer to a call that gave up waiting: not a batch's
            _, batch = inflight.popleft()
            done = len(batch)
            self._out_bytes -= sum(len(it) for it, _ in batch)
            if f.kind == "err":
                err = f.body if isinstance(f.body, dict) else {}
                self._fail(done, f"the broker refused them: {err.get('message', err)}")
            else:
                self._settled += done
                self._ocond.notify_all()

    def _requeue(self) -> None:
        """The reader thread, its connection lost (and again once reconnected, before the
        flusher may write): what was written but not confirmed goes back in front of the
        outbox, in order, to be written again on the new connection (the broker may have
        delivered some of it before the connection broke: those arrive twice)."""
        with self._wlock, self._olock:
            again = [it for _, batch in self._inflight for it in batch]
            self._inflight.clear()
            if again:
                self.emit_resent += len(again)
                self._out.extendleft(reversed(again))
                self._owake.notify()

    def _drain(self, timeout: float | None) -> bool:
        """Wait until every event queued so far is confirmed or failed; False on timeout."""
        with self._olock:
            target = self._queued
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._settled < target:
                left = _left(deadline)
                if left is not None and left <= 0:
                    return False
                self._ocond.wait(left)
            return True

    def _drain_or_raise(self, timeout: float | None, what: str) -> None:
        """Before a frame that must follow the emits queued so far (a confirmed emit, an
        emit_many, a request, a reply): wait for them, and raise what failed."""
        if self._queued == self._settled and not self._fail_count:
            return  # the usual case: nothing queued
        if not self._drain(timeout):
            raise Timeout(f"the broker did not confirm the events emitted before within "
                          f"{timeout} s; {what}")
        with self._olock:
            self._raise_failure()

    def flush(self, timeout: float | None) -> None:
        if not self._drain(timeout):
            with self._olock:
                left = self._queued - self._settled
            raise Timeout(f"{left} event(s) not yet confirmed by the broker at "
                          f"{self.files.socket} after {timeout} s (they stay queued)")
        with self._olock:
            self._raise_failure()

    def flush_at_exit_pending(self) -> bool:
        # (also failures counted and not raised yet: the atexit flush logs them)
        return not self._closed and self._pid == os.getpid() and \
            (self._queued != self._settled or bool(self._fail_count))

    def publish_many(self, events: list[tuple[str, Any]], timeout: float | None) -> None:
        if not events:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        self._drain_or_raise(timeout, "these events were not sent")
        timeout = _left(deadline)
        body = encode_batch(events, self._limit - 32)
        if body is not None:  # the usual case: one encoder call, one frame
            if self._rr_lock.acquire(blocking=False):
                try:
                    if self._publish_direct(body, timeout):
                        return
                finally:
                    self._rr_lock.release()
            self._call_raw(lambda seq: b'["pubs",%d,"",' % seq + body + b"]", "pubs", timeout)
            return
        # Encode everything first: a bad event raises before anything is sent. The events
        # travel in "pubs" frames of up to the frame limit (the broker forwards a batch as
        # one write per subscriber); one confirmation for the lot, since the broker handles
        # a connection's frames in order.
        items = [encode_item(name, data, self._limit) for name, data in events]
        chunks: list[list[bytes]] = [[]]
        size = 0
        for item in items:
            if size + len(item) + 32 > self._limit and chunks[-1]:
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += len(item) + 1
        head = [batch_frame(0, chunk) for chunk in chunks[:-1]]
        self._call_raw(lambda seq: batch_frame(seq, chunks[-1]), "pubs", timeout, head)

    def request(self, name: str, request: dict[str, Any], timeout: float | None) -> int:
        # The broker answers {no_responder: true} itself when nobody handles it, so the
        # count is never needed (-1).
        deadline = None if timeout is None else time.monotonic() + timeout
        self._drain_or_raise(timeout, "the request was not sent")
        if self._rr_lock.acquire(blocking=False):
            try:
                if self._routes and self._request_peer(name, request, timeout, deadline):
                    return -1
                if self._request_direct(name, request, _wait(timeout, deadline)):
                    return -1
            finally:
                self._rr_lock.release()
        timeout = _left(deadline)
        data = encode_frame("req", 0, name, request, self._limit)
        self._send(data, timeout, "the request was not sent")
        return -1

    def _request_direct(self, name: str, request: dict[str, Any],
                        timeout: float | None) -> bool:
        """The fast path of a request (``_rr_lock`` held): sent on this bus's requests
        connection, whose replies the calling thread reads itself, and delivered to the sink
        before returning, so the waiting caller needs no wake-up from another thread.
        True: sent, and answered or timed out; False: not sent, use the main connection."""
        cid = request.get("id")
        ch = self._rr_send(lambda: encode_frame(
            "req", 0, name, dict(request, reply_to=self._rr_reply_to), self._limit), timeout)
        if ch is None:
            return False
        self.requests_direct += 1
        try:
            # (timed out: the caller's wait for the reply times out as usual)
            self._rr_until(ch, timeout, lambda f: f.kind == "rep" and f.body.get("id") == cid)
        except _Lost:
            pass  # like on the main connection, the caller times out (a resend could run
            # the handler twice)
        return True

    def _request_peer(self, name: str, request: dict[str, Any], timeout: float | None,
                      deadline: float | None) -> bool:
        """The direct path (``_rr_lock`` held; see ``_direct``): the request goes straight to
        the one bus that handles ``name``, on a connection whose reply this thread reads.
        True: sent, and answered, timed out or lost (the caller raises); False: not sent, or
        that bus no longer answers ``name`` (nothing ran): go through the broker."""
        rr = self._rr
        if rr is not None:
            self._poll_rr(rr)  # the broker's route updates come in order on this connection
        path = self._routes.get(name)
        if path is None or self._closed:
            return False
        cid = request.get("id")
        data = encode_frame("req", 0, name, {"id": cid, "data": request.get("data")},
                            self._limit)  # too large, unencodable: raised as on any path
        ch = self._peers.get(path)
        if ch is None:
            if time.monotonic() < self._peer_retry.get(path, 0.0):
                return False  # it failed a moment ago: through the broker for now
            ch = self._connect_peer(path, _left(deadline))
            if ch is None:
                self._forget_route(name, path)
                return False
        try:
            ch.send(data, timeout=_left(deadline))
        except (ProcwireError, OSError):  # it closed: the request did not get there whole
            self._drop_peer(path)
            self._forget_route(name, path)
            return False
        self.requests_peer += 1
        sink = self._sink
        assert sink is not None
        wait = _wait(timeout, deadline)
        while True:
            try:
                f: ClientFrame = ch.recv(wait)
            except Timeout:
                return True  # the caller times out; a late reply is skipped next time
            except (ProcwireError, OSError) as exc:
                # It went away (or sent garbage) after taking the request: the handler may
                # have run, so it is not sent again.
                self._drop_peer(path)
                if self._closed:  # this bus closed it
                    sink.on_reply({"id": cid, "closed": True})
                    return True
                self._forget_route(name, path)
                sink.on_reply({"id": cid, "lost": f"{type(exc).__name__}: {exc}"})
                return True
            body = f.body
            if f.kind == "rep" and isinstance(body, dict):
                if body.get("id") == cid:
                    if body.get("moved"):  # it no longer answers name: nothing ran
                        self._drop_peer(path)  # (it may be closing this connection)
                        self._forget_route(name, path)
                        return False
                    sink.on_reply(body)
                    return True
                sink.on_reply(body)  # a late reply to an earlier request that timed out
            else:
                self.bad_frames += 1
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return True

    def _connect_peer(self, path: str, timeout: float | None) -> Channel | None:
        try:
            ch = sync_connect("unix://" + path, codec=WireCodec(),
                              timeout=1.0 if timeout is None else min(timeout, 1.0),
                              max_frame_size=MAX_FRAME)
        except (ProcwireError, OSError) as exc:
            log.debug("procwire bus: no direct connection to %s: %s", path, exc)
            return None
        with self._lock:
            if not self._closed:
                if len(self._peers) >= 16:  # bounded: close the oldest
                    self._drop_peer(next(iter(self._peers)))
                self._peers[path] = ch
                return ch
        _close_quietly(ch)  # closed meanwhile
        return None

    def _drop_peer(self, path: str) -> None:
        ch = self._peers.pop(path, None)
        if ch is not None:
            _close_quietly(ch)

    def _forget_route(self, name: str, path: str) -> None:
        """``path`` failed for ``name``: go through the broker (which gives the route again
        with each request it carries; ``path`` is not tried for 2 s)."""
        self.peer_fallbacks += 1
        if self._routes.get(name) == path:
            del self._routes[name]
        now = time.monotonic()
        if self._peer_retry.get(path, 0.0) <= now:  # (never pushed further while it runs)
            self._peer_retry[path] = now + 2.0
        if len(self._peer_retry) > 64:
            self._peer_retry = {p: t for p, t in self._peer_retry.items() if t > now}

    def _on_route(self, f: ClientFrame) -> None:
        """The broker's ``route`` frame (on the requests connection): ``name`` is answered
        by the bus listening at ``body["path"]`` alone, or (body null) no longer."""
        path = f.body.get("path") if isinstance(f.body, dict) else None
        if isinstance(path, str) and path:
            if len(self._routes) >= 4096:
                self._routes.clear()
            self._routes[f.name] = path
            return
        old = self._routes.pop(f.name, None)
        if old is not None and old in self._peers and old not in self._routes.values():
            self._drop_peer(old)  # no route leads there now: free its slot at that bus

    def _poll_rr(self, rr: Channel) -> None:
        """Take what already arrived on the requests connection (route updates, late
        replies) without waiting."""
        for _ in range(1000):
            try:
                f: ClientFrame = rr.recv(0)
            except Timeout:
                return
            except DecodeError:
                self.bad_frames += 1
                continue
            except (ProcwireError, OSError):
                self._drop_rr(rr)
                return
            try:
                if not self._rr_frame(rr, f):
                    self.bad_frames += 1
            except _Lost:
                return

    def _rr_frame(self, ch: Channel, f: ClientFrame) -> bool:
        """A frame from the requests connection ``ch`` that is not an answer the reader is
        waiting for: a reply (to the sink), a route update, bye (``_Lost``). False: none
        of these."""
        if f.kind == "rep" and isinstance(f.body, dict):
            assert self._sink is not None
            self._sink.on_reply(f.body)
        elif f.kind == "route":
            self._on_route(f)
        elif f.kind == "bye":
            self._drop_rr(ch)
            raise _Lost()
        else:
            return False
        return True

    def _publish_direct(self, body: bytes, timeout: float | None) -> bool:
        """``emit_many``'s fast path (``_rr_lock`` held): the batch goes on the requests
        connection, whose confirmation the calling thread reads itself (no wake-up from the
        reader thread on the way back). True: confirmed. False: not sent, or that connection
        broke before the confirmation came: the caller sends the batch on the main
        connection (the broker may then have it twice, as after any lost connection)."""
        seq = next(self._seq)
        ch = self._rr_send(lambda: b'["pubs",%d,"",' % seq + body + b"]", timeout)
        if ch is None:
            return False
        self.batches_direct += 1
        try:
            f = self._rr_until(ch, timeout, lambda f: f.kind in ("ok", "err") and f.seq == seq)
        except _Lost:
            return False
        if f is None:  # its confirmation would come later on this connection: give it up
            self._drop_rr(ch)
            raise Timeout(f"the broker did not confirm the events within {timeout} s; they "
                          "may have been delivered")
        if f.kind == "err":
            err = f.body if isinstance(f.body, dict) else {}
            raise ValueError(str(err.get("message", "the broker refused it")))
        return True

    def _rr_send(self, make: Callable[[], bytes], timeout: float | None) -> Channel | None:
        """Send ``make()`` on the requests connection (``_rr_lock`` held); the connection, or
        None when nothing was sent (use the main connection)."""
        if self._closed or threading.current_thread().name.startswith(_ASYNC_IO_THREAD):
            return None  # the asyncio bus's one I/O thread must not wait a round trip
        ch = self._rr or self._open_rr()
        if ch is None:
            return None
        try:
            ch.send(make(), timeout=timeout)
        except (ProcwireError, OSError):
            self._drop_rr(ch)
            return None
        return ch

    def _rr_until(self, ch: Channel, timeout: float | None,
                  match: Callable[[ClientFrame], bool]) -> ClientFrame | None:
        """Read the requests connection until a frame ``match`` accepts (returned), handing
        every reply on the way to the sink (ours, or a late one for an earlier timed-out
        call). None: ``timeout`` ran out. ``_Lost`` (the connection dropped): it broke, or
        the broker said bye."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = timeout  # the same value every time: no change of the socket's timeout
        while True:
            try:
                f: ClientFrame = ch.recv(wait)
            except Timeout:
                return None
            except DecodeError as exc:
                self.bad_frames += 1
                log.warning("procwire bus: skipped a bad frame from the broker: %s", exc)
                continue
            except (ProcwireError, OSError) as exc:
                self._drop_rr(ch)
                raise _Lost() from exc
            taken = self._rr_frame(ch, f)  # (a reply goes to the sink first)
            if match(f):
                return f
            if not taken:
                self.bad_frames += 1
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return None

    def _open_rr(self) -> Channel | None:
        """Connect the requests connection (never starts a broker: the main connection's
        reader does that); None when the broker is not reachable right now."""
        now = time.monotonic()
        if not self._up.is_set() or now < self._rr_retry_at:
            return None
        ch: Channel | None = None
        try:
            ch = connect_broker(self.files, timeout=2.0, autostart=False)
            ch.send(encode_frame("hello", 1, self._name + " requests", {
                "pid": os.getpid(), "reply_to": self._rr_reply_to, "channel": self.channel,
                "patterns": [], "handles": [], "queue": self.queue, "policy": self.policy,
                "version": VERSION, "routes": self.direct}), timeout=2.0)
            f: ClientFrame = ch.recv(timeout=2.0)
            if f.kind != "welcome":
                raise ProtocolError(f"the broker answered hello with {f.kind!r}")
        except (ProcwireError, OSError) as exc:
            log.debug("procwire bus: no requests connection: %s", exc)
            if ch is not None:
                _close_quietly(ch)
            self._rr_retry_at = now + 1.0
            return None
        with self._lock:
            if self._closed:
                _close_quietly(ch)
                return None
            self._rr = ch
        return ch

    def _drop_rr(self, ch: Channel) -> None:
        with self._lock:
            if self._rr is ch:
                self._rr = None
                self._routes.clear()  # a new requests connection gets them again
        _close_quietly(ch)

    def reply(self, reply_to: str, reply: dict[str, Any], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._drain_or_raise(timeout, "the reply was not sent")
        self._send(encode_frame("rep", 0, reply_to, reply, self._limit), _left(deadline),
                   "the reply was not sent")

    def enable_inline(self, answer: Callable[[str, dict[str, Any]], dict[str, Any] | None]
                      ) -> None:
        self._inline = answer

    def _direct_server(self) -> DirectServer | None:
        """This bus's direct request socket, started with its first handler (blocking buses
        only); None when it cannot listen (requests then all go through the broker)."""
        with self._direct_lock:
            if (self._direct is None and not self._direct_tried and self._inline is not None
                    and self.direct and not self._closed):
                self._direct_tried = True
                try:
                    self._direct = DirectServer(self.files.folder, self._inline, self._limit)
                except (ProcwireError, OSError, ValueError) as exc:
                    log.info("procwire bus: no direct request socket (requests to this bus "
                             "go through the broker): %s", exc)
        return self._direct

    def add_responder(self, name: str, timeout: float | None) -> None:
        direct = self._direct_server()
        with self._lock:
            self._handles.add(name)
        if self._ch is not None:
            self._call("handle", name, {"direct": direct.path} if direct else None, timeout)

    def stop_responding(self, timeout: float | None) -> None:
        """Closing: the broker stops sending this bus requests (confirmed), then the direct
        socket answers "moved" (those requests go through the broker, to another bus or to
        NoResponder); requests already here are still answered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            names = sorted(self._handles)
            self._handles.clear()
        for name in names:
            if self._ch is None or not self._up.is_set():
                break  # reconnecting: its hello carries no names now
            try:
                self._call("unhandle", name, None, _left(deadline))
            except ProcwireError as exc:
                log.info("procwire bus: closing, the broker did not confirm unhandle %r: %s",
                         name, exc)
                break
        if self._direct is not None:
            self._direct.draining = True

    def remove_responder(self, name: str, timeout: float | None) -> None:
        with self._lock:
            self._handles.discard(name)
        self._notify("unhandle", name)

    def add_pattern(self, pattern: str, timeout: float | None) -> None:
        with self._lock:
            n = self._patterns.get(pattern, 0)
            self._patterns[pattern] = n + 1
        if n or self._ch is None:
            return  # already registered, or not connected yet: hello will carry it
        if timeout == 0:
            self._notify("sub", pattern)  # confirmed by the next answered call (in order)
            return
        try:
            self._call("sub", pattern, None, timeout)
        except BaseException:
            self.remove_pattern(pattern, 0)
            raise

    def remove_pattern(self, pattern: str, timeout: float | None) -> None:
        with self._lock:
            n = self._patterns.get(pattern, 0) - 1
            if n > 0:
                self._patterns[pattern] = n
                return
            self._patterns.pop(pattern, None)
        self._notify("unsub", pattern)

    def _notify(self, kind: str, name: str) -> None:
        """Send without waiting, from any thread (the reader's too); best effort: after a
        reconnect, hello carries the current patterns and names anyway."""
        ch = self._ch
        if ch is None or self._closed:
            return
        try:
            ch.send(encode_frame(kind, 0, name, None), timeout=0)
        except ProcwireError:
            pass

    def broker_stats(self, timeout: float | None = 5.0) -> dict[str, Any]:
        """The broker's own counters (what ``procwire broker --status`` shows)."""
        f = self._call("stats", "", None, timeout)
        return f.body if isinstance(f.body, dict) else {}

    def stats(self) -> dict[str, Any]:
        return {"backend": "broker", "url": self.url, "channel": self.channel,
                "connected": self._up.is_set(), "broker_pid": self.broker.get("broker_pid"),
                "run_id": self.broker.get("run_id"), "reconnects": self.reconnects,
                "server_disconnects": self.server_disconnects,
                "events_received": self.events_received, "bad_frames": self.bad_frames,
                "gaps_from_broker": self.gaps_from_broker,
                "requests_direct": self.requests_direct, "batches_direct": self.batches_direct,
                "requests_peer": self.requests_peer, "peer_fallbacks": self.peer_fallbacks,
                **(self._direct.stats() if self._direct is not None else {}),
                "outbox": self._queued - self._settled, "outbox_full": self.outbox_full,
                "emit_failed": self.emit_failed, "emit_resent": self.emit_resent}

    def close(self, timeout: float | None) -> None:
        """Flush the outbox (up to ``timeout``), stop the threads, disconnect; then raise what
        could not be published, if anything."""
        if self._closed:
            return
        if self._pid != os.getpid():
            # A forked child: the socket is shared with the parent and the threads are the
            # parent's. Touch nothing.
            self._closed = True
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._queued != self._settled:
            self._drain(timeout)
        timeout = _left(deadline)
        with self._olock:
            self._closing = True
            self._owake.notify_all()
            self._ocond.notify_all()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ch, self._ch = self._ch, None
            rr, self._rr = self._rr, None
        if rr is not None:  # wakes a thread waiting for a reply on it
            try:
                rr.close(0)
            except ProcwireError:
                pass
        for path in list(self._peers):
            self._drop_peer(path)
        with self._direct_lock:  # (a handle() meanwhile starts none now: _closed)
            direct = self._direct
        if direct is not None:
            direct.close(timeout)
        self._stop.set()
        self._up.set()  # wake anyone waiting for a reconnection: they see _closed
        if ch is not None:
            try:
                ch.close(timeout=0 if timeout is None else min(timeout, 1.0))
            except ProcwireError:
                pass
        for thread in (self._thread, self._flusher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
        self._fail_pending()
        with self._olock:  # what is still unconfirmed fails now, reported here
            n = len(self._out) + sum(len(b) for _, b in self._inflight)
            self._out.clear()
            self._inflight.clear()
            self._out_bytes = 0
            self._fail(n, "the bus was closed before the broker confirmed them")
            self._raise_failure()
