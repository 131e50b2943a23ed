"""``redis://`` and ``rediss://``: the bus on Redis pub/sub, with redis-py.

Wire format (what a Node process with ioredis speaks to join):

* events: ``PUBLISH <channel> {"event": name, "data": data}`` (JSON; ``data`` may be absent);
* a bus handling ``name`` subscribes its own ``<channel>:request:<name>:<bus id>``: that
  subscription is its presence (Redis drops it with the connection);
* requests go to ONE responder: ``PUBSUB CHANNELS <channel>:request:<name>:*`` lists them
  (cached for ``_RESPONDERS_TTL``), then ``PUBLISH <that channel> {"id": str, "reply_to": str,
  "data": ...}``, rotating; PUBLISH counting 0 receivers means that one is gone: try the next,
  list again once, then ``NoResponder``;
* replies: ``PUBLISH <reply_to> {"id": str, "data": ...}`` or ``{"id": str, "error": {"type":
  str, "message": str}}``; ``reply_to`` is ``<channel>:reply:<bus id>``.

The subscriber connection is read by a thread. When the subscriber connection drops, the thread
reconnects with backoff (50 ms doubling to ``reconnect_max``), subscribes again, and tells the
subscribers with a ``procwire.gap`` notice saying why: ``restarted`` (a new Redis run id),
``dropped_by_server`` (Redis kept running but closed us: a subscriber too slow for
``client-output-buffer-limit pubsub``, or ``CLIENT KILL``) or ``connection_lost``.

Three connections: the subscriber, the flusher's, and the pool (requests, replies, PUBSUB).
``emit`` is pipelined: it queues the encoded PUBLISH in a bounded outbox and a flusher thread
writes all that is queued in one go, then reads the confirmations (like ioredis's automatic
pipelining). A full outbox makes ``emit`` wait up to its timeout (then ``procwire.Timeout``);
an event the flusher cannot publish before its timeout is counted and raised by the next
``emit``/``flush``/``close``: never dropped silently. (If Redis dies after receiving a pipeline
but before answering, the retry can publish those events twice.)

Bad input on the channel (not JSON, JSON nested too deeply, no ``"event"`` string, a reserved
``procwire.`` name, more than ``max_message_size`` bytes) is skipped, counted in
``bad_messages`` and reported as a ``procwire.bad_message`` notice; the messages after it flow
on. So is a message whose handling raised anything unexpected (a bug, logged with its
traceback): one message never ends the reader thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.parse
import uuid
from collections import deque
from itertools import islice
from typing import Any

import msgspec

from .._errors import (
    AddressError,
    AuthenticationError,
    ChannelClosed,
    ConnectionRefused,
    MessageTooLarge,
    ProcwireError,
    ProtocolError,
    Timeout,
)
from ..codecs import JsonCodec
from ._backend import Backend, Sink, flush_at_exit
from ._patterns import MAX_NAME, RESERVED_PREFIX

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as _exc:  # pragma: no cover - the extra is missing
    raise ProcwireError("the redis:// bus needs redis-py: pip install 'procwire[redis]'"
                        ) from _exc
_hiredis: Any
_NOT_ENOUGH: Any
try:
    import hiredis as _hiredis
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH
except ImportError:  # pragma: no cover - it comes with procwire[redis]
    _hiredis = _NOT_ENOUGH = None

__all__ = ["RedisBackend"]

log = logging.getLogger("procwire.bus")

_json = JsonCodec()
_POLL = 0.25  # how often the reader looks at the closed flag while idle
DEFAULT_OUTBOX = 10_000  # events queued for the flusher before emit() waits for room
_OUTBOX_BYTES = 64 << 20  # ... or this many bytes of commands
_PIPELINE = 4096  # most commands in one pipelined write
_PIPELINE_BYTES = 4 << 20
_RESPONDERS_TTL = 1.0  # how long a requester trusts its list of a name's responders
_READ_TIMEOUT = 30.0  # least wait for the reply to a written command (see __init__)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())

# One queued PUBLISH: (the RESP command, the time the flusher may retry it until (None: no
# limit), a one-slot box for its receiver count when someone waits for it (else None)).
_Item = tuple[bytes, float | None, list[Any] | None]


def _resp_publish(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(channel), channel, len(payload), payload)


class _Envelope(msgspec.Struct):
    event: str
    data: Any = None


class _Request(msgspec.Struct):
    id: str
    reply_to: str
    data: Any = None


class _Reply(msgspec.Struct):
    id: str
    data: Any = None
    error: Any = None


_decode_event = msgspec.json.Decoder(_Envelope).decode
_decode_request = msgspec.json.Decoder(_Request).decode
_decode_reply = msgspec.json.Decoder(_Reply).decode
# what msgspec raises for JSON nested deeper than the interpreter's recursion limit
_TOO_DEEP = "JSON nested too deeply (past the recursion limit)"

_CONN_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
_FLUSH_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError) + (
    (_hiredis.HiredisError,) if _hiredis is not None else ())
_ANY_ERRORS = (redis.RedisError, OSError)


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


class RedisBackend(Backend):
    """See the module docstring. Options: ``channel`` (default ``procwire``; also
    ``?channel=`` in the URL), ``max_message_size``, ``emit_timeout`` (also the connect timeout
    and that of idempotent commands; a written PUBLISH waits ``max(30 s, 2 x emit_timeout)``
    for its reply and is never resent), ``reconnect_max`` (longest pause between reconnection
    attempts)."""

    def __init__(self, url: str, *, channel: str = "procwire", max_message_size: int = 1 << 20,
                 emit_timeout: float | None = 5.0, reconnect_max: float = 2.0,
                 outbox: int = DEFAULT_OUTBOX, **_: Any) -> None:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query)
        ours = ("channel", "outbox")
        for key, value in query:
            if key == "channel":
                channel = value
            elif key == "outbox":
                try:
                    outbox = int(value)
                except ValueError:
                    raise AddressError(f"outbox={value!r}: not an integer") from None
        if not isinstance(outbox, int) or outbox < 1:
            raise AddressError(f"outbox must be an int >= 1, not {outbox!r}")
        rest = urllib.parse.urlencode([(k, v) for k, v in query if k not in ours])
        redis_url = urllib.parse.urlunsplit(parts._replace(query=rest))
        if not channel or not isinstance(channel, str):
            raise AddressError("a Redis bus needs a non-empty channel name")
        self.url = _redact(url)
        self.channel = channel
        self.max_message_size = max_message_size
        self.reconnect_max = reconnect_max
        self.bus_id = uuid.uuid4().hex[:16]
        self.reply_to = f"{channel}:reply:{self.bus_id}"
        self.emit_timeout = emit_timeout
        self._ch = channel.encode()
        self._reply_ch = self.reply_to.encode()
        self._reply_prefix = f"{channel}:reply:"
        self._req_prefix = f"{channel}:request:".encode()
        # this bus's request channels end with ":<bus id>": its presence as a responder
        self._req_suffix = f":{self.bus_id}".encode()
        self._resp_cache: dict[str, tuple[float, list[bytes]]] = {}
        self._rr = itertools.count()
        sock_timeout = emit_timeout if emit_timeout else 5.0
        # How long a written command may wait for its reply before the connection is given up:
        # NOT emit_timeout. A Redis stall longer than the socket timeout used to make the
        # flusher (and requests) resend commands Redis had received: duplicates, a request
        # handled twice. A command once written is never resent after a read timeout.
        self._read_timeout = max(_READ_TIMEOUT, 2 * sock_timeout)
        self._sock_timeout = sock_timeout
        try:
            self._client = redis.Redis.from_url(
                # (idempotent commands keep the short timeout; PUBLISH sets its own)
                redis_url, socket_timeout=sock_timeout, socket_connect_timeout=sock_timeout,
                retry=Retry(NoBackoff(), 0), health_check_interval=0,
                # RESP2: pub/sub messages are plain replies (RESP3 turns them into push
                # notifications that read_response hides from us).
                protocol=2)
        except (ValueError, TypeError) as exc:
            raise AddressError(f"{self.url!r}: {exc}") from exc
        self._lock = threading.Lock()      # channels and confirmations
        self._wlock = threading.Lock()     # writes on the subscriber connection
        self._channels: set[bytes] = {self._ch, self._reply_ch}
        self._confirmed: dict[bytes, threading.Event] = {}
        self._unconfirmed: dict[bytes, threading.Event] = {}  # UNSUBSCRIBE waiting
        self._conn: Any = None
        self._sink: Sink | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stop = threading.Event()  # interrupts the reconnection pauses
        self._run_id: str | None = None
        # counters
        self.reconnects = 0
        self.server_disconnects = 0
        self.bad_messages = 0
        self.connected = False
        # set while the subscriber connection is up: a request waits for it, or its reply
        # would be published while nobody listens on the reply channel
        self._up = threading.Event()
        # The outbox (pipelined emit): encoded PUBLISH commands waiting for the flusher, which
        # writes all of them in one go and reads the confirmations. Settled in order, so
        # ``_settled`` (confirmed or failed) and ``_queued`` (ever queued) are sequence numbers.
        self.outbox_max = outbox
        self._out: deque[_Item] = deque()
        self._out_bytes = 0
        self._olock = threading.Lock()
        self._ocond = threading.Condition(self._olock)   # the outbox's state
        self._room = threading.Condition(self._olock)    # emitters waiting for room
        self._wake = threading.Condition(self._olock)    # the idle flusher
        self._done = threading.Condition(self._olock)    # waiters for confirmations
        self._queued = 0
        self._settled = 0
        self._results: dict[int, int] = {}   # seq -> receivers, for confirm=True waiters
        self._fail_count = 0
        self._fail_cls: type[ProcwireError] = Timeout
        self._fail_reason = ""
        self._halt = threading.Event()  # close(): stop retrying, fail what is left
        self._pid = os.getpid()
        self._flusher: threading.Thread | None = None
        self._flusher_idle = False
        self._closing = False
        self._flush_conn: Any = None
        self._flush_reader: Any = None  # hiredis.Reader for the flusher's connection
        self._flush_wrote = False  # the current pipeline's write has begun
        self.published = 0
        self.unheard = 0
        self.emit_failed = 0
        self.outbox_full = 0
        self.pipelines = 0
        self.flush_errors = 0  # pipelines that failed to go out (then retried or failed)

    # -- subscriber connection -------------------------------------------------------------

    def _server_run_id(self) -> str | None:
        try:
            info = self._client.info("server")
        except redis.RedisError:
            return None
        run_id = info.get("run_id")
        return str(run_id) if run_id is not None else None

    def _new_connection(self, **override: Any) -> Any:
        """A connection of our own, outside the pool's count (the pool refuses more than
        ``max_connections`` ever made, and a long outage makes many attempts)."""
        pool = self._client.connection_pool
        return pool.connection_class(**{**pool.connection_kwargs, **override})

    def _open_subscriber(self, timeout: float | None) -> Any:
        """A new connection subscribed to every channel, confirmations read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        conn: Any = self._new_connection()
        try:
            conn.connect()
            with self._lock:
                channels = sorted(self._channels)
                for ch in channels:
                    self._confirmed.setdefault(ch, threading.Event())
            conn.send_command("SUBSCRIBE", *channels, check_health=False)
            waiting = set(channels)
            while waiting:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"Redis at {self.url} did not confirm SUBSCRIBE in "
                                  f"{timeout} s")
                if not conn.can_read(timeout=_POLL if left is None else min(left, _POLL)):
                    continue
                msg = conn.read_response(disconnect_on_error=False)
                if isinstance(msg, list) and msg and msg[0] == b"subscribe":
                    waiting.discard(msg[1])
                self._handle_guarded(msg)
        except BaseException:
            conn.disconnect()
            raise
        self._run_id = self._server_run_id() or self._run_id
        return conn

    def start(self, sink: Sink, timeout: float | None) -> None:
        self._sink = sink
        try:
            conn = self._open_subscriber(timeout)
        except redis.AuthenticationError as exc:
            raise AuthenticationError(f"Redis at {self.url}: {exc}") from exc
        except _CONN_ERRORS as exc:
            raise ConnectionRefused(f"cannot reach Redis at {self.url}: {exc}") from exc
        except redis.RedisError as exc:
            raise ProtocolError(f"Redis at {self.url}: {exc}") from exc
        with self._wlock:
            self._conn = conn
        self.connected = True
        self._up.set()
        self._thread = threading.Thread(target=self._reader, args=(conn,), daemon=True,
                                        name=f"procwire-bus-redis-{self.channel}")
        self._thread.start()
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                         name=f"procwire-bus-redis-flush-{self.channel}")
        self._flusher.start()
        self._pid = os.getpid()
        flush_at_exit(self)

    def _reader(self, conn: Any) -> None:
        try:
            while not self._closed:
                try:
                    self._read_loop(conn)
                except _ANY_ERRORS as exc:
                    if self._closed:
                        break
                    conn.disconnect()
                    conn = self._recover(exc)
                    if conn is None:
                        break
        except Exception:  # a bug: say so rather than die silently
            log.exception("procwire bus: the Redis reader thread failed")
        finally:
            self.connected = False
            self._up.clear()
            if conn is not None:
                conn.disconnect()

    def _read_loop(self, conn: Any) -> None:
        handle = self._handle
        can_read = conn.can_read
        parser = conn._parser
        reader = getattr(parser, "_reader", None)
        if reader is None or _NOT_ENOUGH is None or not hasattr(parser, "read_from_socket"):
            read = conn.read_response  # pragma: no cover - redis-py without hiredis
            while not self._closed:
                if can_read(timeout=_POLL):
                    self._handle_guarded(read(disconnect_on_error=False))
            return
        # With hiredis: take every complete message from redis-py's own reader (so nothing it
        # buffered is skipped) and read the socket only when it has none; per message this
        # costs about half of what read_response does, which matters with many subscribers.
        gets = reader.gets
        fill = parser.read_from_socket
        while not self._closed:
            msg = gets()
            if msg is _NOT_ENOUGH:
                if can_read(timeout=_POLL):
                    fill(timeout=_POLL, raise_on_timeout=False)
            elif isinstance(msg, Exception):
                raise msg if isinstance(msg, redis.RedisError) else ProtocolError(str(msg))
            else:
                try:  # (free in 3.11 unless it raises)
                    handle(msg)
                except Exception as exc:
                    self._unexpected(msg, exc)

    def _recover(self, exc: BaseException) -> Any:
        """Reconnect with backoff and resubscribe; report the gap. None once closed."""
        down_since = time.monotonic()
        self.connected = False
        self._up.clear()
        with self._lock:
            for ev in self._confirmed.values():
                ev.clear()
        old_run_id = self._run_id
        now_run_id = self._server_run_id()
        if now_run_id is not None and now_run_id == old_run_id:
            reason = "dropped_by_server"
            detail = ("Redis closed the subscriber connection while it kept running: this bus "
                      "read too slowly for client-output-buffer-limit pubsub (or CLIENT KILL)")
            self.server_disconnects += 1
        else:
            reason = "restarted" if now_run_id is not None else "connection_lost"
            detail = str(exc) or type(exc).__name__
        log.warning("procwire bus: lost the Redis subscriber connection to %s (%s: %s); "
                    "reconnecting", self.url, reason, detail)
        delay = 0.05
        while not self._closed:
            try:
                conn = self._open_subscriber(timeout=max(1.0, self.reconnect_max))
            except (*_ANY_ERRORS, Timeout) as again:
                detail_again = str(again)
                self._stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.reconnect_max)
                log.debug("procwire bus: Redis still unreachable: %s", detail_again)
                continue
            if reason == "connection_lost" and old_run_id and self._run_id != old_run_id:
                reason = "restarted"
            with self._wlock:
                self._conn = conn
            self.connected = True
            self._up.set()
            self.reconnects += 1
            info = {"reason": reason, "detail": detail, "backend": self.url,
                    "down_for": round(time.monotonic() - down_since, 3)}
            log.warning("procwire bus: reconnected to Redis at %s after %.3f s; events "
                        "published meanwhile are lost (procwire.gap)", self.url,
                        info["down_for"])
            if self._sink is not None:
                self._sink.on_notice("procwire.gap", info)
            return conn
        return None

    # -- incoming --------------------------------------------------------------------------

    def _handle_guarded(self, msg: Any) -> None:
        try:
            self._handle(msg)
        except Exception as exc:
            self._unexpected(msg, exc)

    def _unexpected(self, msg: Any, exc: Exception) -> None:
        """Handling ``msg`` raised ``exc`` (not bad input we know of: a bug, or something new
        from the server): log it, report it as a bad message, and go on with the next one."""
        log.error("procwire bus: handling a message from Redis failed; skipped",
                  exc_info=exc)
        ok = isinstance(msg, list | tuple) and len(msg) >= 3
        channel = msg[1] if ok and isinstance(msg[1], bytes) else b"?"
        payload = msg[2] if ok and isinstance(msg[2], bytes) else repr(msg)[:200].encode()
        try:
            self._bad(f"could not be handled ({type(exc).__name__}: {exc})", channel, payload)
        except Exception:  # the report itself failed: the log has it, the reader goes on
            log.exception("procwire bus: reporting a bad message failed")

    def _handle(self, msg: Any) -> None:
        kind = msg[0]
        if kind == b"message":
            ch, payload = msg[1], msg[2]
            if ch == self._ch:
                self._on_event(payload)
            elif ch == self._reply_ch:
                self._on_reply(payload)
            elif ch.startswith(self._req_prefix) and ch.endswith(self._req_suffix):
                self._on_request(ch, payload)
        elif kind == b"subscribe":
            with self._lock:
                ev = self._confirmed.get(msg[1])
            if ev is not None:
                ev.set()
        elif kind == b"unsubscribe":
            with self._lock:
                ev = self._unconfirmed.get(msg[1])
            if ev is not None:
                ev.set()

    def _bad(self, reason: str, channel: bytes, payload: bytes) -> None:
        self.bad_messages += 1
        n = self.bad_messages
        if n <= 10 or n % 1000 == 0:  # bounded log noise under a flood
            log.warning("procwire bus: skipped a bad message on Redis channel %r (%s); "
                        "%d so far", channel.decode(errors="replace"), reason, n)
        if self._sink is not None:
            self._sink.on_notice("procwire.bad_message", {
                "reason": reason, "channel": channel.decode(errors="replace"),
                "size": len(payload),
                "sample": bytes(payload[:200]).decode("utf-8", "replace")})

    def _check_size(self, channel: bytes, payload: bytes) -> bool:
        if len(payload) > self.max_message_size:
            self._bad(f"{len(payload)} bytes exceed max_message_size={self.max_message_size}",
                      channel, payload)
            return False
        return True

    def _on_event(self, payload: bytes) -> None:
        if len(payload) > self.max_message_size:
            self._check_size(self._ch, payload)
            return
        try:
            env = _decode_event(payload)
        except msgspec.ValidationError as exc:
            self._bad(f"not an event envelope: {exc}", self._ch, payload)
            return
        except msgspec.DecodeError as exc:
            self._bad(f"not JSON: {exc}", self._ch, payload)
            return
        except RecursionError:
            self._bad(_TOO_DEEP, self._ch, payload)
            return
        name = env.event
        if not name or len(name) > MAX_NAME or name.startswith(RESERVED_PREFIX):
            self._bad(f"event name not allowed: {name[:80]!r}", self._ch, payload)
            return
        assert self._sink is not None
        self._sink.on_event(name, env.data)

    def _on_request(self, ch: bytes, payload: bytes) -> None:
        name_b = ch[len(self._req_prefix):-len(self._req_suffix)]
        if not self._check_size(ch, payload):
            return
        try:
            req = _decode_request(payload)
        except msgspec.DecodeError as exc:
            self._bad(f"not a request envelope: {exc}", ch, payload)
            return
        except RecursionError:
            self._bad(_TOO_DEEP, ch, payload)
            return
        if not req.reply_to.startswith(self._reply_prefix):
            self._bad(f"reply_to outside {self._reply_prefix!r}", ch, payload)
            return
        assert self._sink is not None
        self._sink.on_request(name_b.decode(errors="replace"),
                              {"id": req.id, "reply_to": req.reply_to, "data": req.data})

    def _on_reply(self, payload: bytes) -> None:
        if not self._check_size(self._reply_ch, payload):
            return
        try:
            rep = _decode_reply(payload)
        except msgspec.DecodeError as exc:
            self._bad(f"not a reply envelope: {exc}", self._reply_ch, payload)
            return
        except RecursionError:
            self._bad(_TOO_DEEP, self._reply_ch, payload)
            return
        reply: dict[str, Any] = {"id": rep.id, "data": rep.data}
        if rep.error is not None:
            reply["error"] = rep.error
        assert self._sink is not None
        self._sink.on_reply(reply)

    # -- outgoing --------------------------------------------------------------------------

    def _encode(self, obj: Any) -> bytes:
        data: bytes = _json.encode(obj)
        if len(data) > self.max_message_size:
            raise MessageTooLarge(f"{len(data)} bytes of JSON exceed max_message_size="
                                  f"{self.max_message_size} (nothing was sent)")
        return data

    def _publish(self, channel: bytes, payload: bytes, timeout: float | None) -> int:
        """One confirmed PUBLISH on the pool (requests, replies), after what the outbox holds
        so far, so that an emit followed by a request or a reply arrives in that order."""
        if self._closed:
            raise ChannelClosed("this bus is closed")
        if not self._drain(timeout):
            raise Timeout(f"Redis at {self.url} did not confirm the events emitted before "
                          f"this message in {timeout} s; it was not sent")
        return self._publish_once(channel, payload, timeout)

    def _publish_once(self, channel: bytes, payload: bytes, timeout: float | None) -> int:
        """PUBLISH on a pool connection: connecting is retried until ``timeout``, but once the
        command may have been written it is never resent (a request would run twice): no reply
        in time, or the connection lost meanwhile, is ``Timeout`` (outcome unknown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pool = self._client.connection_pool
        conn = self._call(pool.get_connection, timeout)
        try:
            left = _left(deadline)
            sock = getattr(conn, "_sock", None)
            if sock is not None:
                sock.settimeout(self._read_timeout if left is None else max(left, 0.001))
            try:
                conn.send_command("PUBLISH", channel, payload, check_health=False)
                n = conn.read_response()
            except redis.AuthenticationError as exc:
                raise AuthenticationError(f"Redis at {self.url}: {exc}") from exc
            except redis.ResponseError as exc:
                raise ProtocolError(f"Redis at {self.url}: {exc}") from exc
            except _ANY_ERRORS as exc:
                conn.disconnect()
                if self._closed:
                    raise ChannelClosed("this bus is closed") from exc
                raise Timeout(f"Redis at {self.url} did not confirm a PUBLISH in {timeout} s "
                              f"({exc}); it was not resent and may have been delivered"
                              ) from exc
            finally:
                sock = getattr(conn, "_sock", None)
                if sock is not None:
                    sock.settimeout(self._sock_timeout)
        finally:
            pool.release(conn)
        return int(n)

    def _call(self, fn: Any, timeout: float | None) -> Any:
        """``fn()`` (one command on the pool), retried on connection errors until
        ``timeout``; then ``Timeout``. Never retried: auth and server errors."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                return fn()
            except redis.AuthenticationError as exc:
                raise AuthenticationError(f"Redis at {self.url}: {exc}") from exc
            except _CONN_ERRORS as exc:
                if self._closed:
                    raise ChannelClosed("this bus is closed") from exc
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"Redis at {self.url} unreachable for {timeout} s; nothing "
                                  f"was sent ({exc})") from exc
                time.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 2, 0.25)
            except redis.RedisError as exc:
                raise ProtocolError(f"Redis at {self.url}: {exc}") from exc

    # -- the outbox: pipelined emit -----------------------------------------------------------

    def _event_command(self, name: str, data: Any) -> bytes:
        return _resp_publish(self._ch, self._encode({"event": name, "data": data}))

    def _raise_failure(self, queued: int = 0) -> None:
        """Raise (once) what the flusher could not publish; call with ``_ocond`` held.
        ``queued``: how many events of the raising call itself were queued before (they are
        not part of the failure: they will be published or reported like any other); the
        exception carries it as ``.queued`` so that the caller still counts them."""
        n = self._fail_count
        if not n:
            return
        cls, reason = self._fail_cls, self._fail_reason
        self._fail_count, self._fail_cls, self._fail_reason = 0, Timeout, ""
        more = f" (this call's {queued} event(s) were queued)" if queued else ""
        exc = cls(f"{n} emitted event(s) were not published: {reason}{more}")
        exc.queued = queued  # type: ignore[attr-defined]
        raise exc

    def _fail(self, items: list[_Item], cls: type[ProcwireError], reason: str) -> None:
        """Record ``items`` as not published; call with ``_ocond`` held. The first reason
        since the last raise is kept; the count covers them all."""
        if not self._fail_count:
            self._fail_cls, self._fail_reason = cls, reason
        self._fail_count += len(items)
        self.emit_failed += len(items)
        for _cmd, _limit, box in items:
            if box is not None:
                box.append(None)

    def _enqueue(self, cmds: list[bytes], timeout: float | None, box: list[Any] | None,
                 block: bool = True) -> bool:
        """Queue ``cmds`` in order for the flusher (False: no room and ``block`` is False).
        Then raises a pending flush failure (of earlier events: ``cmds`` are queued first and
        the exception's ``.queued`` says so); ``Timeout`` when there is no room in time
        (nothing queued)."""
        size = sum(len(c) for c in cmds)
        n = len(cmds)
        with self._ocond:
            if self._closing:
                raise ChannelClosed("this bus is closed")
            out = self._out
            if out and (len(out) + n > self.outbox_max or self._out_bytes + size > _OUTBOX_BYTES):
                if not block:
                    return False
                self.outbox_full += 1
                deadline = None if timeout is None else time.monotonic() + timeout
                while out and (len(out) + n > self.outbox_max
                               or self._out_bytes + size > _OUTBOX_BYTES):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise Timeout(
                            f"the outbox to Redis at {self.url} stayed full ({len(out)} events "
                            f"queued) for {timeout} s: Redis is unreachable or slower than the "
                            f"emits; {n} event(s) not queued")
                    if self._closing:
                        raise ChannelClosed("this bus is closed")
                    self._room.wait(left)
            limit = None if timeout is None else time.monotonic() + timeout
            last = n - 1
            for i, cmd in enumerate(cmds):
                out.append((cmd, limit, box if i == last else None))
            self._queued += n
            self._out_bytes += size
            if self._flusher_idle:
                self._wake.notify()
            self._raise_failure(queued=n)
        return True

    def publish(self, name: str, data: Any, timeout: float | None) -> int:
        """Queue the event for the flusher; -1 (the receiver count is not known yet)."""
        cmd = self._event_command(name, data)
        with self._olock:  # the common case in one short critical section
            if (not self._closing and not self._fail_count and len(self._out) < self.outbox_max
                    and self._out_bytes + len(cmd) <= _OUTBOX_BYTES):
                self._out.append((cmd, None if timeout is None else time.monotonic() + timeout,
                                  None))
                self._queued += 1
                self._out_bytes += len(cmd)
                if self._flusher_idle:
                    self._wake.notify()
                return -1
        self._enqueue([cmd], timeout, None)  # waits for room, raises a failure...
        return -1

    def publish_nowait(self, name: str, data: Any, timeout: float | None) -> int | None:
        if self._enqueue([self._event_command(name, data)], timeout, None, block=False):
            return -1
        return None

    def publish_confirmed(self, name: str, data: Any, timeout: float | None) -> int:
        box: list[Any] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        self._enqueue([self._event_command(name, data)], timeout, box)
        self._wait_box(box, deadline, timeout)
        n = box[0]
        if n is None:
            with self._ocond:
                self._raise_failure()
            raise Timeout(f"the event was not published to Redis at {self.url}")
        return int(n)

    def publish_many(self, events: list[tuple[str, Any]], timeout: float | None) -> None:
        # Encode everything first: a bad event raises before anything is queued.
        cmds = [self._event_command(name, data) for name, data in events]
        if not cmds:
            return
        box: list[Any] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        self._enqueue(cmds, timeout, box)
        self._wait_box(box, deadline, timeout)
        with self._ocond:  # some of them (or earlier events) may have failed: say so now
            self._raise_failure()
        if box[0] is None:
            raise Timeout(f"events were not published to Redis at {self.url}")

    def _wait_box(self, box: list[Any], deadline: float | None, timeout: float | None) -> None:
        with self._ocond:
            while not box:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"Redis at {self.url} did not confirm in {timeout} s (the "
                                  "events stay queued; a failure is raised by a later call)")
                self._done.wait(left)

    def _drain(self, timeout: float | None) -> bool:
        """Wait until everything queued so far is settled; False on timeout."""
        with self._ocond:
            target = self._queued
            if self._settled >= target:
                return True
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._settled < target:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._done.wait(left)
            return True

    def flush_at_exit_pending(self) -> bool:
        # (a forked child has the parent's outbox but not its flusher)
        # (also failures counted and not raised yet: the atexit flush logs them)
        return not self._closed and self._pid == os.getpid() and \
            (bool(self._out) or bool(self._fail_count))

    def flush(self, timeout: float | None) -> None:
        if not self._drain(timeout):
            with self._ocond:
                left = self._queued - self._settled
            raise Timeout(f"{left} event(s) not yet confirmed by Redis at {self.url} after "
                          f"{timeout} s (they stay queued)")
        with self._ocond:
            self._raise_failure()

    def _flush_loop(self) -> None:
        """The flusher thread. An unexpected exception (a bug) must not leave ``emit`` queueing
        for nobody: what is queued is failed (reported by the next emit/flush/close), the
        connection dropped, and the loop starts again."""
        while True:
            try:
                self._flush_once_loop()
                break
            except Exception:
                log.exception("procwire bus: the Redis flusher thread failed; restarting it")
                self.flush_errors += 1
                conn = self._flush_conn
                if conn is not None:
                    try:
                        conn.disconnect()
                    except Exception:  # pragma: no cover - best effort
                        pass
                self._flush_reader = None
                with self._ocond:
                    if self._out:
                        self._fail(list(self._out), ProtocolError,
                                   "the flusher thread failed (a bug; see the log)")
                        self._settle_failed(len(self._out))
                    if self._closing or self._closed:
                        break
                self._halt.wait(0.1)
        if self._closed and self._pid == os.getpid():
            # close() has already failed and reported what was left: drop our connection
            conn = self._flush_conn
            if conn is not None:
                conn.disconnect()

    def _flush_once_loop(self) -> None:
        """Write everything queued as one pipeline, read the replies, settle in order; on a
        connection error retry the rest until each event's deadline."""
        delay = 0.01
        ocond = self._ocond
        while True:
            with ocond:
                while not self._out:
                    if self._closing or self._closed:
                        return
                    self._flusher_idle = True
                    try:
                        self._wake.wait()
                    finally:
                        self._flusher_idle = False
                if self._halt.is_set():
                    self._fail_rest()
                    return
                first = self._settled + 1
                batch: list[bytes] = []
                size = 0
                for cmd, _d, _b in islice(self._out, _PIPELINE):
                    batch.append(cmd)
                    size += len(cmd)
                    if size >= _PIPELINE_BYTES:
                        break
            results: list[Any] = []
            error: BaseException | None = None
            self._flush_wrote = False
            try:
                self._write_read(b"".join(batch), len(batch), results)
            except _FLUSH_ERRORS as exc:
                error = exc
                self.flush_errors += 1
                if self._flush_conn is not None:  # reconnects on its next write
                    self._flush_conn.disconnect()
                self._flush_reader = None
            if self._closed:
                return  # close() failed and reported this batch: discard it
            with ocond:
                self._settle(first, results)
                if error is None:
                    delay = 0.01
                    continue
                if self._flush_wrote and isinstance(error, (TimeoutError,
                                                            redis.TimeoutError)):
                    # Written, then no reply within the read timeout: Redis may have
                    # published them; resending could duplicate. Report, do not resend.
                    unanswered = first + len(batch) - 1 - self._settled
                    if unanswered > 0:
                        items = list(islice(self._out, unanswered))
                        self._fail(items, Timeout, (
                            f"Redis at {self.url} did not answer within "
                            f"{self._read_timeout} s; not resent, they may have been "
                            "delivered (outcome unknown)"))
                        self._settle_failed(unanswered)
                wait = self._expire(error)
            if wait is None:
                continue
            self._halt.wait(min(delay, wait))
            delay = min(delay * 2, 0.25)

    def _write_read(self, data: bytes, n: int, results: list[Any]) -> None:
        """Send one pipeline on the flusher's connection and append its ``n`` replies (an
        error reply as an exception object) to ``results``, also when failing halfway."""
        conn = self._flush_conn
        if conn is None:
            conn = self._flush_conn = self._new_connection(socket_timeout=self._read_timeout)
        if conn._sock is None:
            conn.connect()  # AUTH, SELECT, TLS: redis-py's part
            self._flush_reader = None
        sock = conn._sock
        self._flush_wrote = True  # from here on the pipeline may have reached Redis
        if _hiredis is None:  # pragma: no cover - hiredis comes with procwire[redis]
            conn.send_packed_command([data], check_health=False)
            for _ in range(n):
                try:
                    results.append(conn.read_response())
                except redis.ResponseError as exc:
                    results.append(exc)
            return
        # The replies are read in bulk with hiredis (C) straight from the socket: redis-py's
        # per-reply read_response costs more CPU than the rest of an emit.
        reader = self._flush_reader
        if reader is None:
            # protocolError: a malformed reply is a redis.InvalidResponse (a connection error
            # here: reconnect), not a hiredis.ProtocolError that would escape the flusher
            reader = self._flush_reader = _hiredis.Reader(
                protocolError=redis.InvalidResponse, replyError=redis.ResponseError)
        sock.sendall(data)
        gets, feed, recv = reader.gets, reader.feed, sock.recv
        while len(results) < n:
            reply = gets()
            if reply is False:
                chunk = recv(65536)
                if not chunk:
                    raise redis.ConnectionError("Redis closed the connection")
                feed(chunk)
            else:
                results.append(reply)

    def _settle(self, first: int, results: list[Any]) -> None:
        """The replies for the items from seq ``first`` on; call with ``_ocond`` held."""
        skip = self._settled + 1 - first  # settled meanwhile by close(): already failed
        out = self._out
        bad: list[_Item] = []
        for r in islice(results, max(0, skip), None):
            item = out.popleft()
            self._out_bytes -= len(item[0])
            self._settled += 1
            if isinstance(r, Exception):
                bad.append(item)
                continue
            self.published += 1
            if r == 0:
                self.unheard += 1
            box = item[2]
            if box is not None:
                box.append(r)
        if results:
            self.pipelines += 1
        if bad:
            why = next(r for r in results if isinstance(r, Exception))
            self._fail(bad, ProtocolError, f"Redis at {self.url} refused them: {why}")
        self._room.notify_all()
        self._done.notify_all()

    def _settle_failed(self, n: int) -> None:
        """Drop the first ``n`` queued items (already recorded by ``_fail``)."""
        out = self._out
        for _ in range(n):
            item = out.popleft()
            self._out_bytes -= len(item[0])
            self._settled += 1
        self._room.notify_all()
        self._done.notify_all()

    def _fail_rest(self) -> None:
        """Fail everything still queued (closing); call with ``_ocond`` held."""
        if self._out:
            self._fail(list(self._out), ChannelClosed,
                       f"the bus was closed before Redis at {self.url} confirmed them")
            self._settle_failed(len(self._out))

    def _expire(self, error: BaseException) -> float | None:
        """After a failed write: fail the queued events whose deadline passed; how long
        until the oldest one left expires (None: nothing left or no limit... retry now)."""
        now = time.monotonic()
        expired: list[_Item] = []
        for item in self._out:
            limit = item[1]
            if limit is None or limit > now:
                break
            expired.append(item)
        if expired:
            self._fail(expired, Timeout, f"Redis at {self.url} stayed unreachable until "
                                         f"their emit timeout ({error})")
            self._settle_failed(len(expired))
        if not self._out:
            return None
        limit = self._out[0][1]
        return 3600.0 if limit is None else max(0.0, limit - now)

    def _responders(self, name: str, timeout: float | None) -> list[bytes]:
        """The request channels of the buses handling ``name`` now (one per bus)."""
        prefix = self._req_prefix + name.encode() + b":"
        pattern = re.sub(rb"([\\*?\[\]])", rb"\\\1", prefix) + b"*"
        found = self._call(lambda: self._client.pubsub_channels(pattern), timeout)
        # "<channel>:request:a:*" also matches the channels of a name "a:b": a bus id has no ":"
        chans = sorted(c for c in found if b":" not in c[len(prefix):])
        if len(self._resp_cache) >= 1024:  # bounded: request names may be unbounded
            self._resp_cache.clear()
        self._resp_cache[name] = (time.monotonic(), chans)
        return chans

    def request(self, name: str, request: dict[str, Any], timeout: float | None) -> int:
        """Send the request to ONE bus that handles ``name``, rotating among them; 0 when none
        does. The list of responders is cached for ``_RESPONDERS_TTL``; a responder that
        has gone (PUBLISH counts 0 receivers) is skipped and the list fetched again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._up.wait(timeout):
            raise Timeout(f"Redis at {self.url} unreachable for {timeout} s; the request was "
                          "not sent")
        payload = self._encode(request)
        cached = self._resp_cache.get(name)
        if cached is None or not cached[1] or time.monotonic() - cached[0] > _RESPONDERS_TTL:
            chans, fresh = self._responders(name, _left(deadline)), True
        else:
            chans, fresh = cached[1], False
        tried: set[bytes] = set()
        while True:
            start = next(self._rr)
            for k in range(len(chans)):
                ch = chans[(start + k) % len(chans)]
                if ch in tried:
                    continue
                tried.add(ch)
                if self._publish(ch, payload, _left(deadline)) > 0:
                    return 1
                cached = self._resp_cache.get(name)  # gone: no later request tries it again
                if cached is not None and ch in cached[1]:
                    self._resp_cache[name] = (cached[0], [c for c in cached[1] if c != ch])
            if fresh:
                return 0
            chans, fresh = self._responders(name, _left(deadline)), True

    def reply(self, reply_to: str, reply: dict[str, Any], timeout: float | None) -> None:
        self._publish(reply_to.encode(), self._encode(reply), timeout)

    def _send_sub(self, *args: Any) -> None:
        with self._wlock:
            conn = self._conn
            if conn is None:
                return
            try:
                conn.send_command(*args, check_health=False)
            except _ANY_ERRORS:
                pass  # the reader reconnects and subscribes to every channel again

    def add_responder(self, name: str, timeout: float | None) -> None:
        ch = self._req_prefix + name.encode() + self._req_suffix
        with self._lock:
            self._channels.add(ch)
            ev = self._confirmed.setdefault(ch, threading.Event())
        self._send_sub("SUBSCRIBE", ch)
        if not ev.wait(timeout):
            raise Timeout(f"Redis at {self.url} did not confirm SUBSCRIBE {ch!r} in "
                          f"{timeout} s")

    def remove_responder(self, name: str, timeout: float | None) -> None:
        """UNSUBSCRIBE, confirmed: requests already on their way arrive before the
        confirmation (same connection, in order), so the caller's handler still answers them."""
        self._unsubscribe([self._req_prefix + name.encode() + self._req_suffix], timeout)

    def stop_responding(self, timeout: float | None) -> None:
        with self._lock:
            chans = [c for c in self._channels
                     if c.startswith(self._req_prefix) and c.endswith(self._req_suffix)]
        if chans:
            self._unsubscribe(chans, timeout)

    def _unsubscribe(self, chans: list[bytes], timeout: float | None) -> None:
        waits = []
        with self._lock:
            for ch in chans:
                self._channels.discard(ch)
                self._confirmed.pop(ch, None)
                ev = self._unconfirmed[ch] = threading.Event()
                waits.append(ev)
        try:
            if not self._up.is_set():
                return  # reconnecting: the new subscription leaves them out
            self._send_sub("UNSUBSCRIBE", *chans)
            deadline = None if timeout is None else time.monotonic() + timeout
            for ev in waits:
                while not ev.wait(0.05):
                    if not self._up.is_set() or self._closed:
                        return  # the connection went: so did the subscription
                    left = _left(deadline)
                    if left is not None and left <= 0:
                        raise Timeout(f"Redis at {self.url} did not confirm UNSUBSCRIBE "
                                      f"in {timeout} s")
        finally:
            with self._lock:
                for ch in chans:
                    self._unconfirmed.pop(ch, None)

    def stats(self) -> dict[str, Any]:
        return {"backend": "redis", "url": self.url, "channel": self.channel,
                "connected": self.connected, "reconnects": self.reconnects,
                "server_disconnects": self.server_disconnects,
                "bad_messages": self.bad_messages, "published": self.published,
                "unheard": self.unheard, "emit_failed": self.emit_failed,
                "outbox": len(self._out), "outbox_max": self.outbox_max,
                "outbox_full": self.outbox_full, "pipelines": self.pipelines,
                "flush_errors": self.flush_errors}

    def close(self, timeout: float | None) -> None:
        """Flush the outbox (up to ``timeout``), stop the threads, disconnect; then raise what
        could not be published, if anything."""
        if self._closed:
            return
        if self._pid != os.getpid():
            # A forked child: the sockets are shared with the parent (a shutdown() would cut
            # the parent's subscription) and the threads are the parent's. Touch nothing.
            self._closing = self._closed = True
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ocond:
            self._closing = True
            self._wake.notify_all()
            self._room.notify_all()
        flusher = self._flusher
        if flusher is not None and flusher.is_alive() and not self._drain(timeout):
            self._halt.set()  # stop retrying: what is left fails, and is reported below
            conn = self._flush_conn
            sock = getattr(conn, "_sock", None)
            if sock is not None:  # interrupt a read waiting on a dead server
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._closed = True
        self._stop.set()
        self._halt.set()
        with self._wlock:
            sock = getattr(self._conn, "_sock", None)
        if sock is not None:  # wake the reader now rather than at its next poll
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in (flusher, self._thread):
            if thread is not None and thread is not threading.current_thread():
                left = None if deadline is None else max(0.1, deadline - time.monotonic())
                thread.join(left)
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._wlock:
                conn, self._conn = self._conn, None
            if conn is not None:
                conn.disconnect()
        fconn = self._flush_conn
        if fconn is not None and (flusher is None or not flusher.is_alive()):
            fconn.disconnect()
        self._client.close()
        with self._ocond:
            # Everything past the settled mark fails now, whether or not the flusher has
            # exited (it may sit in a connect() to a host that drops SYNs): it discards its
            # batch when it comes back, and close() reports them, not a later nobody.
            self._fail_rest()
            self._raise_failure()
