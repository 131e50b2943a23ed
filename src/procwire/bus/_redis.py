"""``redis://`` and ``rediss://``: the bus on Redis pub/sub, with redis-py.

Wire format (what a Node process with ioredis speaks to join):

* events: ``PUBLISH <channel> {"event": name, "data": data}`` (JSON; ``data`` may be absent);
* requests: ``PUBLISH <channel>:request:<name> {"id": str, "reply_to": str, "data": ...}``; the
  number of receivers PUBLISH returns is how ``NoResponder`` is known at once;
* replies: ``PUBLISH <reply_to> {"id": str, "data": ...}`` or ``{"id": str, "error": {"type":
  str, "message": str}}``; ``reply_to`` is ``<channel>:reply:<bus id>``.

Two connections: commands (PUBLISH, from any thread, through redis-py's pool) and one
subscriber connection read by a thread. When the subscriber connection drops, the thread
reconnects with backoff (50 ms doubling to ``reconnect_max``), subscribes again, and tells the
subscribers with a ``procwire.gap`` notice saying why: ``restarted`` (a new Redis run id),
``dropped_by_server`` (Redis kept running but closed us: a subscriber too slow for
``client-output-buffer-limit pubsub``, or ``CLIENT KILL``) or ``connection_lost``.

``emit`` during an outage retries until its timeout, then raises ``procwire.Timeout``: it never
drops an event silently. (If Redis dies after receiving a PUBLISH but before answering, the
retry can publish that event twice.)

Bad input on the channel (not JSON, no ``"event"`` string, a reserved ``procwire.`` name, more
than ``max_message_size`` bytes) is skipped, counted in ``bad_messages`` and reported as a
``procwire.bad_message`` notice; the messages after it flow on.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
import urllib.parse
import uuid
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
from ._backend import Backend, Sink
from ._patterns import MAX_NAME, RESERVED_PREFIX

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as _exc:  # pragma: no cover - the extra is missing
    raise ProcwireError("the redis:// bus needs redis-py: pip install 'procwire[redis]'"
                        ) from _exc

__all__ = ["RedisBackend"]

log = logging.getLogger("procwire.bus")

_json = JsonCodec()
_POLL = 0.25  # how often the reader looks at the closed flag while idle


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

_CONN_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
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
    ``?channel=`` in the URL), ``max_message_size``, ``emit_timeout`` (also the socket timeout),
    ``reconnect_max`` (longest pause between reconnection attempts)."""

    def __init__(self, url: str, *, channel: str = "procwire", max_message_size: int = 1 << 20,
                 emit_timeout: float | None = 5.0, reconnect_max: float = 2.0,
                 **_: Any) -> None:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query)
        for key, value in query:
            if key == "channel":
                channel = value
        rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "channel"])
        redis_url = urllib.parse.urlunsplit(parts._replace(query=rest))
        if not channel or not isinstance(channel, str):
            raise AddressError("a Redis bus needs a non-empty channel name")
        self.url = _redact(url)
        self.channel = channel
        self.max_message_size = max_message_size
        self.reconnect_max = reconnect_max
        self.reply_to = f"{channel}:reply:{uuid.uuid4().hex[:16]}"
        self._ch = channel.encode()
        self._reply_ch = self.reply_to.encode()
        self._reply_prefix = f"{channel}:reply:"
        self._req_prefix = f"{channel}:request:".encode()
        sock_timeout = emit_timeout if emit_timeout else 5.0
        try:
            self._client = redis.Redis.from_url(
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

    # -- subscriber connection -------------------------------------------------------------

    def _server_run_id(self) -> str | None:
        try:
            info = self._client.info("server")
        except redis.RedisError:
            return None
        run_id = info.get("run_id")
        return str(run_id) if run_id is not None else None

    def _open_subscriber(self, timeout: float | None) -> Any:
        """A new connection subscribed to every channel, confirmations read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        conn: Any = self._client.connection_pool.make_connection()
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
                self._handle(msg)
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
        read = conn.read_response
        while not self._closed:
            if can_read(timeout=_POLL):
                handle(read(disconnect_on_error=False))

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

    def _handle(self, msg: Any) -> None:
        kind = msg[0]
        if kind == b"message":
            ch, payload = msg[1], msg[2]
            if ch == self._ch:
                self._on_event(payload)
            elif ch == self._reply_ch:
                self._on_reply(payload)
            elif ch.startswith(self._req_prefix):
                self._on_request(ch[len(self._req_prefix):], payload)
        elif kind == b"subscribe":
            with self._lock:
                ev = self._confirmed.get(msg[1])
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
        name = env.event
        if not name or len(name) > MAX_NAME or name.startswith(RESERVED_PREFIX):
            self._bad(f"event name not allowed: {name[:80]!r}", self._ch, payload)
            return
        assert self._sink is not None
        self._sink.on_event(name, env.data)

    def _on_request(self, name_b: bytes, payload: bytes) -> None:
        ch = self._req_prefix + name_b
        if not self._check_size(ch, payload):
            return
        try:
            req = _decode_request(payload)
        except msgspec.DecodeError as exc:
            self._bad(f"not a request envelope: {exc}", ch, payload)
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
        if self._closed:
            raise ChannelClosed("this bus is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                return int(self._client.publish(channel, payload))
            except redis.AuthenticationError as exc:
                raise AuthenticationError(f"Redis at {self.url}: {exc}") from exc
            except _CONN_ERRORS as exc:
                if self._closed:
                    raise ChannelClosed("this bus is closed") from exc
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"Redis at {self.url} unreachable for {timeout} s; nothing "
                                  f"was published ({exc})") from exc
                time.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 2, 0.25)
            except redis.RedisError as exc:
                raise ProtocolError(f"Redis at {self.url}: {exc}") from exc

    def publish(self, name: str, data: Any, timeout: float | None) -> int:
        return self._publish(self._ch, self._encode({"event": name, "data": data}), timeout)

    def publish_many(self, events: list[tuple[str, Any]], timeout: float | None) -> None:
        # Encode everything first: a bad event raises before anything is sent.
        payloads = [self._encode({"event": name, "data": data}) for name, data in events]
        if self._closed:
            raise ChannelClosed("this bus is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                pipe = self._client.pipeline(transaction=False)
                for payload in payloads:
                    pipe.publish(self._ch, payload)
                pipe.execute()
                return
            except redis.AuthenticationError as exc:
                raise AuthenticationError(f"Redis at {self.url}: {exc}") from exc
            except _CONN_ERRORS as exc:
                if self._closed:
                    raise ChannelClosed("this bus is closed") from exc
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"Redis at {self.url} unreachable for {timeout} s; "
                                  f"{len(payloads)} events were not published ({exc})") from exc
                time.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 2, 0.25)
            except redis.RedisError as exc:
                raise ProtocolError(f"Redis at {self.url}: {exc}") from exc

    def request(self, name: str, request: dict[str, Any], timeout: float | None) -> int:
        t0 = time.monotonic()
        if not self._up.wait(timeout):
            raise Timeout(f"Redis at {self.url} unreachable for {timeout} s; the request was "
                          "not sent")
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - t0))
        return self._publish(self._req_prefix + name.encode(), self._encode(request), timeout)

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
        ch = self._req_prefix + name.encode()
        with self._lock:
            self._channels.add(ch)
            ev = self._confirmed.setdefault(ch, threading.Event())
        self._send_sub("SUBSCRIBE", ch)
        if not ev.wait(timeout):
            raise Timeout(f"Redis at {self.url} did not confirm SUBSCRIBE {ch!r} in "
                          f"{timeout} s")

    def remove_responder(self, name: str, timeout: float | None) -> None:
        ch = self._req_prefix + name.encode()
        with self._lock:
            self._channels.discard(ch)
            self._confirmed.pop(ch, None)
        self._send_sub("UNSUBSCRIBE", ch)

    def stats(self) -> dict[str, Any]:
        return {"backend": "redis", "url": self.url, "channel": self.channel,
                "connected": self.connected, "reconnects": self.reconnects,
                "server_disconnects": self.server_disconnects,
                "bad_messages": self.bad_messages}

    def close(self, timeout: float | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._wlock:
            sock = getattr(self._conn, "_sock", None)
        if sock is not None:  # wake the reader now rather than at its next poll
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else None)
        if thread is None or not thread.is_alive():
            with self._wlock:
                conn, self._conn = self._conn, None
            if conn is not None:
                conn.disconnect()
        self._client.close()
