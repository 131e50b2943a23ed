"""``udp://host:port``: one message per datagram. UNRELIABLE: messages may be lost or reordered.

Every stream of this transport has ``reliable = False``. There is no framing header: a datagram's
payload is exactly one encoded message, so any program that can send a UDP datagram of JSON can
talk to a ``udp://`` listener. What that costs:

* **Loss and reordering.** The network (and, on one machine, a full socket buffer or a full
  per-peer queue) drops datagrams silently. Counters (``stats()``) say how many procwire itself
  dropped; what the kernel or the network dropped is invisible.
* **Size.** A message longer than ``min(max_frame_size, 65507)`` bytes (65527 over IPv6) is refused
  at ``send`` with ``MessageTooLarge`` and nothing is sent. A received datagram longer than the
  receiver's limit (seen by the kernel's ``MSG_TRUNC`` flag) is dropped and counted, never
  delivered cut. An empty message cannot be sent (``EncodeError``): see *close* below.
* **Close is best effort.** UDP has no connections and no EOF. ``close()`` sends one empty
  datagram, which the other side takes as "peer closed": its ``recv`` then raises
  ``ConnectionClosed(reason="eof")`` after the messages that came first. That datagram can be
  lost like any other; then the other side never learns, and keeps waiting (use timeouts).
* **Refused.** On a connected (client) stream, a datagram that reached a port where nobody
  listens comes back as ICMP "port unreachable"; the next ``send`` or ``recv`` raises
  ``ConnectionRefused`` (a ``ConnectionClosed`` with ``reason="refused"``). Like every socket
  error, it ends that stream: later calls raise it again.

``connect("udp://127.0.0.1:PORT")`` is a connected UDP socket: it sends to, and receives from, that
peer only. ``listen("udp://127.0.0.1:0")`` binds one socket (``address`` is the real URL) and,
since UDP has no connections, demultiplexes by peer address: ``accept()`` returns a channel per new
peer address, whose first ``recv`` returns the datagram that announced it; that channel's ``send``
answers the peer from the listening socket. A peer whose channel was closed, or that sent its close
notification, counts as new when it sends again.

Bounds, all per listener (options pass through ``listen(url, max_peers=..., queue=...)``):

* ``max_peers`` (default 1024): peers known at once, accepted or waiting for ``accept()``;
  a datagram from one more peer is dropped and counted (``dropped_max_peers``). A peer that
  vanishes without its close notification keeps its slot until its channel is closed.
* ``queue`` (default 1024): received, not yet consumed messages per peer, also bounded by
  ``inbox`` bytes; when full, the newest datagram is dropped and counted (``dropped_queue_full``).
* ``rcvbuf`` (default 4 MiB): the ``SO_RCVBUF`` requested (capped by the kernel at
  ``net.core.rmem_max``); what overflows it is dropped by the kernel, uncounted.

Counters: ``stats()`` on a stream returns ``sent``, ``received`` (queued for delivery),
``dropped_queue_full`` and ``dropped_truncated``; on a listener, the same summed over its peers
plus ``peers``, ``pending_accept``, ``dropped_max_peers`` and ``dropped_unrouted`` (datagrams from
new peers after the listener closed, or after the stream ended).

Threads: the blocking listener has no thread of its own. Whichever ``accept()`` or ``recv()``
caller needs data reads the shared socket and routes what it gets to every peer's queue; while no
one waits, datagrams wait in the kernel's socket buffer (and are dropped by the kernel when it
fills). The asyncio twins read as soon as data arrives.

Security: ``auth=`` is not supported (``AddressError``): there is no handshake to carry it. So the
``pickle`` codec is refused, and listening beyond loopback needs ``insecure=True``. Anyone who can
reach the port can send messages, and a source address is easy to forge.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import math
import os
import select
import socket
import threading
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from .._errors import (
    AddressError,
    AddressInUse,
    ChannelClosed,
    ConnectionClosed,
    ConnectionRefused,
    EncodeError,
    InsecureError,
    MessageTooLarge,
    Timeout,
)
from .._url import Address, format_inet
from ._sockstream import deadline_of, remaining
from .base import Buffer, Converter, TransportOptions, convert_all
from .tcp import family_of, is_loopback

__all__ = [
    "DEFAULT_MAX_PEERS",
    "DEFAULT_QUEUE",
    "DEFAULT_RCVBUF",
    "IPV4_MAX_DATAGRAM",
    "IPV6_MAX_DATAGRAM",
    "AsyncUdpListener",
    "AsyncUdpStream",
    "UdpListener",
    "UdpStream",
    "aconnect",
    "alisten",
    "connect",
    "listen",
]

LOCAL_ONLY = False
SCHEME = "udp"

IPV4_MAX_DATAGRAM = 65507  # 65535 - 20 (IPv4 header) - 8 (UDP header)
IPV6_MAX_DATAGRAM = 65527  # 65535 - 8: the IPv6 payload length does not count its own header
DEFAULT_MAX_PEERS = 1024
DEFAULT_QUEUE = 1024
DEFAULT_RCVBUF = 4 * 1024 * 1024

_BATCH = 256  # datagrams read per wake-up, so one busy peer cannot hold the reader forever
# A plain int: socket.MSG_TRUNC is an enum.Flag, whose operators cost about 1 us a call.
_MSG_TRUNC = int(getattr(socket, "MSG_TRUNC", 0x20))
_OPTIONS = {"max_peers", "queue", "rcvbuf"}

T = TypeVar("T")


def _size(payload: Buffer) -> int:
    return payload.nbytes if isinstance(payload, memoryview) else len(payload)


def _again(exc: BaseException) -> BaseException:
    """A fresh copy of a sticky error, so repeated raises do not pile up tracebacks."""
    if isinstance(exc, ConnectionRefused):
        return ConnectionRefused(str(exc))
    if isinstance(exc, ConnectionClosed):
        return ConnectionClosed(str(exc), reason=exc.reason)
    if isinstance(exc, ChannelClosed):
        return ChannelClosed(str(exc))
    return exc


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _url_of(sockaddr: Any) -> str:
    return format_inet(SCHEME, sockaddr[0], sockaddr[1])


class _Settings:
    __slots__ = ("byte_limit", "limit", "max_peers", "queue", "rcvbuf")

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        if opts.auth:
            raise AddressError("udp:// does not support auth= (there is no handshake to carry "
                               "it); use tcp:// or tls:// with auth=, or drop auth=")
        unknown = set(opts.extra) - _OPTIONS
        if unknown:
            raise AddressError(f"unknown option(s) for udp://: {', '.join(sorted(unknown))}")
        family_max = IPV6_MAX_DATAGRAM if family_of(addr.host) == socket.AF_INET6 \
            else IPV4_MAX_DATAGRAM
        if opts.max_frame_size < 1:
            raise AddressError(f"max_frame_size must be at least 1, not {opts.max_frame_size}")
        self.limit = min(family_max, opts.max_frame_size)
        self.max_peers = _positive(opts.extra, "max_peers", DEFAULT_MAX_PEERS)
        self.queue = _positive(opts.extra, "queue", DEFAULT_QUEUE)
        self.rcvbuf = _positive(opts.extra, "rcvbuf", DEFAULT_RCVBUF)
        self.byte_limit = max(1, opts.inbox)


def _positive(extra: dict[str, Any], name: str, default: int) -> int:
    value = extra.get(name, default)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AddressError(f"udp:// option {name}= must be a positive integer, not {value!r}")
    return value


class _Inbox:
    """One peer: its address, its bounded queue of raw datagrams, its counters."""

    __slots__ = ("addr", "dropped", "eof", "nbytes", "queue", "received", "sent", "truncated",
                 "waiters")

    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.queue: deque[bytes] = deque()
        self.nbytes = 0
        self.eof: BaseException | None = None  # sticky end: peer closed, refused, socket error
        self.received = 0
        self.dropped = 0
        self.truncated = 0
        self.sent = 0
        self.waiters: list[asyncio.Future[None]] = []  # asyncio only

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "received": self.received,
                "dropped_queue_full": self.dropped, "dropped_truncated": self.truncated}


class _Core:
    """The socket shared by a listener and its channels (or owned by one connected stream):
    reads datagrams, routes them to per-peer queues, keeps the counters.

    Subclasses add waiting (threads or asyncio). ``users`` counts the listener and the channels
    still open; the socket closes when the last one does, so closing a listener does not cut off
    the channels it already accepted (as with TCP).
    """

    def __init__(self, sock: socket.socket, settings: _Settings, address: str,
                 peer: Any | None) -> None:
        sock.setblocking(False)
        _grow_rcvbuf(sock, settings.rcvbuf)
        self.sock = sock
        self.settings = settings
        self.limit = settings.limit
        self.address = address
        self._view = memoryview(bytearray(settings.limit))
        # Polled with a zero timeout, under the lock (poll objects are not thread-safe).
        self._peek = select.poll()
        self._peek.register(sock.fileno(), select.POLLIN)
        self.peers: dict[Any, _Inbox] = {}
        self.backlog: deque[_Inbox] = deque()  # new peers not yet accept()ed
        self.connected: _Inbox | None = _Inbox(peer) if peer is not None else None
        self.accepting = peer is None
        self.listener_closed = False
        self.users = 1
        self.closed = False
        # Listener-wide counters (a connected stream reports its inbox's).
        self.sent = 0
        self.received = 0
        self.dropped_queue_full = 0
        self.dropped_truncated = 0
        self.dropped_max_peers = 0
        self.dropped_unrouted = 0
        self.errors = 0

    # -- hooks ------------------------------------------------------------------------------
    def _wake(self, inbox: _Inbox) -> None:
        pass

    def _wake_accept(self) -> None:
        pass

    # -- reading and routing ------------------------------------------------------------------
    def read_batch(self) -> None:
        """Read what the socket holds now (up to a batch) without blocking, and route it.

        ``recv_into``/``recvfrom_into`` with ``MSG_TRUNC`` report a datagram's real length, so
        truncation shows without ``recvmsg_into``'s flags (which cost about 2 us more a call).
        After the first datagram a zero-timeout poll asks whether more wait: in a ping-pong
        there is none, and a read that fails with EAGAIN costs about three times that poll.
        """
        sock = self.sock
        view = self._view
        size = len(view)
        connected = self.connected is not None
        addr: Any = None
        for i in range(_BATCH):
            try:
                if connected:
                    n = sock.recv_into(view, 0, _MSG_TRUNC)
                else:
                    n, addr = sock.recvfrom_into(view, 0, _MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._read_error(exc)
                return
            self._route(n, n > size, addr)
            if i == 0 and not self._peek.poll(0):
                return

    def _read_error(self, exc: OSError) -> None:
        ib = self.connected
        if ib is None:
            # An unconnected socket gets no ICMP errors (no IP_RECVERR); nothing else here is
            # about one peer, and the next read will tell if the socket itself is broken.
            self.errors += 1
            return
        if ib.eof is None:
            ib.eof = _socket_error(exc, self.connected_url())
            self._wake(ib)

    def connected_url(self) -> str:
        return _url_of(self.connected.addr) if self.connected is not None else self.address

    def _route(self, n: int, truncated: bool, addr: Any) -> None:
        ib = self.connected
        if ib is None:
            key = addr[:2]
            ib = self.peers.get(key)
            if ib is None:
                if n == 0 and not truncated:
                    return  # close notice from a peer we do not know (e.g. already forgotten)
                if not self.accepting:
                    self.dropped_unrouted += 1
                    return
                if truncated:
                    self.dropped_truncated += 1
                    return
                if len(self.peers) >= self.settings.max_peers:
                    self.dropped_max_peers += 1
                    return
                ib = _Inbox(addr)
                self.peers[key] = ib
                self.backlog.append(ib)
                self._wake_accept()
        if truncated:
            ib.truncated += 1
            self.dropped_truncated += 1
            return
        if ib.eof is not None:
            self.dropped_unrouted += 1
            return
        if n == 0:
            ib.eof = ConnectionClosed("peer closed the channel (close notification)",
                                      reason="eof")
            self.forget(ib)
            self._wake(ib)
            return
        if len(ib.queue) >= self.settings.queue or (
                ib.queue and ib.nbytes + n > self.settings.byte_limit):
            ib.dropped += 1
            self.dropped_queue_full += 1
            return
        ib.queue.append(bytes(self._view[:n]))
        ib.nbytes += n
        ib.received += 1
        self.received += 1
        self._wake(ib)

    def forget(self, ib: _Inbox) -> None:
        """Stop routing to ``ib``: a later datagram from that address is a new peer."""
        if self.connected is None:
            key = ib.addr[:2]
            if self.peers.get(key) is ib:
                del self.peers[key]

    # -- sending ------------------------------------------------------------------------------
    def try_send(self, ib: _Inbox, data: Buffer) -> bool:
        """Send one datagram now; False when the kernel's send buffer is full."""
        if self.closed:
            raise ChannelClosed("channel is closed")
        try:
            if self.connected is not None:
                self.sock.send(data)
            else:
                self.sock.sendto(data, ib.addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise MessageTooLarge(f"the kernel refused a {_size(data)}-byte datagram to "
                                      f"{_url_of(ib.addr)} (EMSGSIZE)") from exc
            if self.closed or exc.errno == errno.EBADF:
                raise ChannelClosed("channel is closed") from exc
            if ib.eof is None:
                ib.eof = _socket_error(exc, _url_of(ib.addr))
            raise _again(ib.eof) from exc
        ib.sent += 1
        self.sent += 1
        return True

    def notify_close(self, ib: _Inbox) -> None:
        """The best-effort close notification: one empty datagram, errors ignored."""
        if ib.eof is not None or self.closed:
            return
        try:
            if self.connected is not None:
                self.sock.send(b"")
            else:
                self.sock.sendto(b"", ib.addr)
        except OSError:
            pass

    # -- counters -----------------------------------------------------------------------------
    def listener_stats(self) -> dict[str, int]:
        return {"sent": self.sent, "received": self.received,
                "dropped_queue_full": self.dropped_queue_full,
                "dropped_truncated": self.dropped_truncated,
                "dropped_max_peers": self.dropped_max_peers,
                "dropped_unrouted": self.dropped_unrouted, "errors": self.errors,
                "peers": len(self.peers), "pending_accept": len(self.backlog)}

    def close_listener_locked(self) -> None:
        self.accepting = False
        self.listener_closed = True
        for ib in self.backlog:  # peers nobody accepted: tell them, best effort
            self.notify_close(ib)
            self.forget(ib)
        self.backlog.clear()


def _grow_rcvbuf(sock: socket.socket, size: int) -> None:
    # A burst larger than the kernel's receive buffer is lost before anyone can read it, and the
    # default (about 200 KiB) holds only a few hundred small datagrams. The kernel caps the
    # request at net.core.rmem_max; never shrink a buffer that is already larger.
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:
        pass


def _socket_error(exc: OSError, url: str) -> ConnectionClosed:
    if exc.errno == errno.ECONNREFUSED:
        err: ConnectionClosed = ConnectionRefused(
            f"nothing listens at {url} (ICMP port unreachable)")
    else:
        name = errno.errorcode.get(exc.errno or 0, "error").lower()
        err = ConnectionClosed(f"udp socket error with {url}: {exc.strerror or exc}",
                               reason=name)
    err.__cause__ = exc
    return err


def _check_payload(payload: Buffer, limit: int) -> None:
    n = _size(payload)
    if n > limit:
        raise MessageTooLarge(f"a {n}-byte message does not fit in one udp:// datagram "
                              f"(limit {limit} bytes); nothing was sent")
    if n == 0:
        raise EncodeError("udp:// cannot carry an empty message: an empty datagram is the "
                          "close notification")


# ------------------------------------------------------------------------------------------
# blocking
# ------------------------------------------------------------------------------------------

class _SyncCore(_Core):
    """Blocking side: no thread of its own. A caller that needs data takes the *reader* role,
    polls the socket (and a wake-up pipe) with the lock released, then routes under the lock;
    other callers wait on the condition, woken after every batch."""

    def __init__(self, sock: socket.socket, settings: _Settings, address: str,
                 peer: Any | None) -> None:
        super().__init__(sock, settings, address, peer)
        self.cond = threading.Condition(threading.Lock())
        self._reading = False
        # The pipe wakes the reader when a stream closes or the socket is closing; a shutdown()
        # alone would not do on every platform.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)

    def wake_reader(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # pipe full: the reader is being woken already

    def wait_for(self, take: Callable[[], T | None], timeout: float | None, what: str) -> T:
        """Block until ``take()`` (called under the lock) returns something, reading the socket
        when no one else does. ``take`` may raise to end the wait."""
        deadline = deadline_of(timeout)
        cond = self.cond
        with cond:
            while True:
                result = take()
                if result is not None:
                    return result
                if self.closed:
                    raise ChannelClosed("channel is closed")
                left = remaining(deadline)
                if self._reading:
                    if left == 0.0:
                        raise Timeout(f"{what} within {timeout} s")
                    cond.wait(left)
                    continue
                if left == 0.0:
                    self.read_batch()  # one last look without blocking
                    result = take()
                    if result is not None:
                        return result
                    raise Timeout(f"{what} within {timeout} s")
                self._reading = True
                cond.release()
                try:
                    events = self._poller.poll(-1 if left is None else math.ceil(left * 1000))
                finally:
                    cond.acquire()
                    self._reading = False
                    cond.notify_all()
                for fd, _ in events:
                    if fd == self._wake_r:
                        self._drain_wake()
                if events and not self.closed:
                    self.read_batch()
                    cond.notify_all()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass

    def send(self, ib: _Inbox, data: Buffer, timeout: float | None) -> None:
        deadline = deadline_of(timeout)
        while True:
            with self.cond:
                if self.try_send(ib, data):
                    return
            left = remaining(deadline)
            if left == 0.0:
                raise Timeout(f"socket send buffer still full after {timeout} s")
            # A fresh poll object: poll objects refuse concurrent use from several threads.
            p = select.poll()
            p.register(self.sock.fileno(), select.POLLOUT)
            p.poll(-1 if left is None else math.ceil(left * 1000))

    def release(self) -> None:
        """One user (listener or channel) is done; the last one closes the socket."""
        with self.cond:
            self.users -= 1
            if self.users > 0 or self.closed:
                return
            self.closed = True
            self.wake_reader()
            deadline = deadline_of(5.0)
            while self._reading:
                left = remaining(deadline)
                if not left:
                    break
                self.cond.wait(left)
            self.cond.notify_all()
            self._close_fds()

    def _close_fds(self) -> None:
        self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.closed = True
            warnings.warn(f"unclosed procwire udp socket {self.address}", ResourceWarning,
                          stacklevel=1)
            try:
                self._close_fds()
            except Exception:
                pass


class _StreamBase:
    reliable = False

    def __init__(self, ib: _Inbox, limit: int, local_address: str,
                 remote_address: str) -> None:
        self._inbox = ib
        self._limit = limit
        self.local_address = local_address
        self.remote_address = remote_address
        self.max_message_size = limit
        self._convert: Converter = bytes
        self._safe_convert: Converter | None = None
        self._pending: deque[Any] = deque()
        self._closed = False

    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None:
        """``convert`` runs on each message; when it raises, ``safe`` (default ``convert``)
        runs on each message of that batch alone, to give the bad one a typed error."""
        self._convert = convert
        self._safe_convert = safe
        if self._pending:
            self._pending = deque(convert_all(list(self._pending), convert, safe))

    def unreceive(self, items: list[Any]) -> None:
        self._pending.extendleft(reversed(items))

    def stats(self) -> dict[str, int]:
        """Counters for this peer: ``sent``, ``received`` (datagrams queued for delivery),
        ``dropped_queue_full`` (the per-peer queue was full) and ``dropped_truncated`` (a
        datagram over the size limit)."""
        return self._inbox.stats()

    def _take(self) -> list[bytes] | None:
        if self._closed:
            raise ChannelClosed("channel is closed")
        ib = self._inbox
        if ib.queue:
            items = list(ib.queue)
            ib.queue.clear()
            ib.nbytes = 0
            return items
        if ib.eof is not None:
            raise _again(ib.eof)
        return None

    def _check_send(self, payload: Buffer) -> None:
        if self._closed:
            raise ChannelClosed("channel is closed")
        if self._inbox.eof is not None:
            raise _again(self._inbox.eof)
        _check_payload(payload, self._limit)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.local_address} -> {self.remote_address}>"


class UdpStream(_StreamBase):
    """A blocking UDP message stream (unreliable: ``reliable`` is False).

    One message per datagram; messages may be lost or reordered. ``send`` refuses a message over
    ``max_message_size`` bytes with ``MessageTooLarge``; ``close`` sends a best-effort close
    notification. Thread-safe.
    """

    def __init__(self, core: _SyncCore, ib: _Inbox, local_address: str,
                 remote_address: str) -> None:
        super().__init__(ib, core.limit, local_address, remote_address)
        self._core = core

    def send(self, payload: Buffer, timeout: float | None = None) -> None:
        """Send one datagram. Waits (up to ``timeout``) only while the kernel's send buffer is
        full; delivery is not confirmed."""
        self._check_send(payload)
        self._core.send(self._inbox, payload, timeout)

    def receive(self, timeout: float | None = None) -> list[Any]:
        """The messages queued for this peer (at least one), converted; raises ``Timeout``,
        ``ConnectionClosed`` (close notification or socket error) or ``ChannelClosed``."""
        if self._pending:
            items = list(self._pending)
            self._pending.clear()
            return items
        raw = self._core.wait_for(self._take, timeout, "no message")
        return convert_all(raw, self._convert, self._safe_convert)

    def flush(self, timeout: float | None = None) -> None:
        """Nothing to do: ``send`` hands each datagram to the kernel before it returns."""
        if self._closed:
            raise ChannelClosed("channel is closed")

    def close(self, timeout: float | None = None) -> None:
        """Send the close notification (best effort: it may be lost) and close. Idempotent."""
        core = self._core
        with core.cond:
            if self._closed:
                return
            self._closed = True
            core.notify_close(self._inbox)
            core.forget(self._inbox)
            core.cond.notify_all()
        core.wake_reader()  # a reader polling for this stream alone must notice
        core.release()


class UdpListener:
    """Blocking UDP listener: one bound socket, one channel per peer address (see module doc)."""

    def __init__(self, core: _SyncCore) -> None:
        self._core = core
        self.address = core.address

    def fileno(self) -> int:
        return self._core.sock.fileno()

    def _take(self) -> _Inbox | None:
        core = self._core
        if core.listener_closed:
            raise ChannelClosed("listener is closed")
        return core.backlog.popleft() if core.backlog else None

    def accept(self, timeout: float | None = None) -> UdpStream:
        """The channel of the next new peer; its first datagram is that channel's first
        message. Raises ``Timeout`` or ``ChannelClosed``."""
        core = self._core
        ib = core.wait_for(self._take, timeout, "no new peer")
        with core.cond:
            core.users += 1
        return UdpStream(core, ib, self.address, _url_of(ib.addr))

    def stats(self) -> dict[str, int]:
        """Counters for the whole socket: ``sent``, ``received``, ``dropped_queue_full``,
        ``dropped_truncated``, ``dropped_max_peers``, ``dropped_unrouted``, ``errors`` (socket
        errors on reading, which drop nothing known), and the current
        ``peers`` and ``pending_accept``."""
        with self._core.cond:
            return self._core.listener_stats()

    def close(self) -> None:
        """Stop accepting; peers not yet accepted get a close notification. Channels already
        accepted keep working (they share the socket, which closes with the last of them)."""
        core = self._core
        with core.cond:
            if core.listener_closed:
                return
            core.close_listener_locked()
            core.cond.notify_all()
        core.wake_reader()
        core.release()

    def __repr__(self) -> str:
        return f"<UdpListener {self.address}>"


# ------------------------------------------------------------------------------------------
# asyncio
# ------------------------------------------------------------------------------------------

class _AsyncCore(_Core):
    """asyncio side: the loop reads as soon as the socket is readable (``add_reader``)."""

    def __init__(self, sock: socket.socket, settings: _Settings, address: str,
                 peer: Any | None) -> None:
        super().__init__(sock, settings, address, peer)
        self.loop = asyncio.get_running_loop()
        self.accept_waiters: list[asyncio.Future[None]] = []
        self._write_waiters: list[asyncio.Future[None]] = []
        self._fd = sock.fileno()
        self.loop.add_reader(self._fd, self.read_batch)

    def _wake(self, inbox: _Inbox) -> None:
        _wake_all(inbox.waiters)

    def _wake_accept(self) -> None:
        _wake_all(self.accept_waiters)

    async def wait_for(self, take: Callable[[], T | None], waiters: list[asyncio.Future[None]],
                       timeout: float | None, what: str) -> T:
        result = take()
        if result is not None:
            return result
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self.closed:
                        raise ChannelClosed("channel is closed")
                    fut = self.loop.create_future()
                    waiters.append(fut)
                    try:
                        await fut
                    finally:
                        if fut in waiters:
                            waiters.remove(fut)
                    result = take()
                    if result is not None:
                        return result
        except TimeoutError as exc:
            if isinstance(exc, Timeout):
                raise
            result = take()
            if result is not None:
                return result
            raise Timeout(f"{what} within {timeout} s") from None

    async def send(self, ib: _Inbox, data: Buffer, timeout: float | None) -> None:
        if self.try_send(ib, data):
            return
        try:
            async with asyncio.timeout(timeout):
                while True:
                    fut = self.loop.create_future()
                    if not self._write_waiters:
                        self.loop.add_writer(self._fd, self._writable)
                    self._write_waiters.append(fut)
                    try:
                        await fut
                    finally:
                        if fut in self._write_waiters:
                            self._write_waiters.remove(fut)
                        if not self._write_waiters and not self.closed:
                            self.loop.remove_writer(self._fd)
                    if self.try_send(ib, data):
                        return
        except TimeoutError as exc:
            if isinstance(exc, Timeout):
                raise
            raise Timeout(f"socket send buffer still full after {timeout} s") from None

    def _writable(self) -> None:
        _wake_all(self._write_waiters)

    def release(self) -> None:
        self.users -= 1
        if self.users > 0 or self.closed:
            return
        self._shut()

    def _shut(self) -> None:
        self.closed = True
        try:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
        except (RuntimeError, ValueError):
            pass  # loop already closed
        self.sock.close()
        for ib in [*self.peers.values(), *self.backlog,
                   *([self.connected] if self.connected else [])]:
            _wake_all(ib.waiters)
        _wake_all(self.accept_waiters)
        _wake_all(self._write_waiters)

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.closed = True
            warnings.warn(f"unclosed procwire udp socket {self.address}", ResourceWarning,
                          stacklevel=1)
            try:
                self.sock.close()
            except Exception:
                pass


def _wake_all(waiters: list[asyncio.Future[None]]) -> None:
    for w in waiters:
        if not w.done():
            w.set_result(None)
    waiters.clear()


class AsyncUdpStream(_StreamBase):
    """The asyncio twin of ``UdpStream`` (unreliable: ``reliable`` is False)."""

    def __init__(self, core: _AsyncCore, ib: _Inbox, local_address: str,
                 remote_address: str) -> None:
        super().__init__(ib, core.limit, local_address, remote_address)
        self._core = core

    async def send(self, payload: Buffer, timeout: float | None = None) -> None:
        """Send one datagram; waits only while the kernel's send buffer is full."""
        self._check_send(payload)
        await self._core.send(self._inbox, payload, timeout)

    async def receive(self, timeout: float | None = None) -> list[Any]:
        """The messages queued for this peer (at least one), converted."""
        if self._pending:
            items = list(self._pending)
            self._pending.clear()
            return items
        raw = await self._core.wait_for(self._take, self._inbox.waiters, timeout, "no message")
        return convert_all(raw, self._convert, self._safe_convert)

    async def flush(self, timeout: float | None = None) -> None:
        """Nothing to do: ``send`` hands each datagram to the kernel before it returns."""
        if self._closed:
            raise ChannelClosed("channel is closed")

    async def close(self, timeout: float | None = None) -> None:
        """Send the close notification (best effort) and close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        core = self._core
        core.notify_close(self._inbox)
        core.forget(self._inbox)
        _wake_all(self._inbox.waiters)
        core.release()


class AsyncUdpListener:
    """The asyncio twin of ``UdpListener``."""

    def __init__(self, core: _AsyncCore) -> None:
        self._core = core
        self.address = core.address

    def _take(self) -> _Inbox | None:
        core = self._core
        if core.listener_closed:
            raise ChannelClosed("listener is closed")
        return core.backlog.popleft() if core.backlog else None

    async def accept(self, timeout: float | None = None) -> AsyncUdpStream:
        """The channel of the next new peer (its first datagram is its first message)."""
        core = self._core
        ib = await core.wait_for(self._take, core.accept_waiters, timeout, "no new peer")
        core.users += 1
        return AsyncUdpStream(core, ib, self.address, _url_of(ib.addr))

    def stats(self) -> dict[str, int]:
        """Counters for the whole socket (see ``UdpListener.stats``)."""
        return self._core.listener_stats()

    async def close(self) -> None:
        """Stop accepting; accepted channels keep working until they close."""
        core = self._core
        if core.listener_closed:
            return
        core.close_listener_locked()
        _wake_all(core.accept_waiters)
        core.release()

    def __repr__(self) -> str:
        return f"<AsyncUdpListener {self.address}>"


# ------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------

def _check_exposure(addr: Address, opts: TransportOptions) -> None:
    if not opts.insecure and not is_loopback(addr.host):
        raise InsecureError(
            f"refusing to listen on non-loopback address {addr.host} over udp:// (no auth is "
            "possible, and source addresses are easy to forge); pass insecure=True if the "
            "network is trusted")


def _bind(addr: Address, settings: _Settings) -> socket.socket:
    sock = socket.socket(family_of(addr.host), socket.SOCK_DGRAM)
    try:
        # No SO_REUSEADDR: on UDP it would let a second listener share the port silently.
        sock.bind((addr.host, addr.port))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE,):
            raise AddressInUse(f"{addr.host}:{addr.port} is already in use") from exc
        raise AddressError(f"cannot bind udp://{addr.host}:{addr.port}: "
                           f"{exc.strerror or exc}") from exc
    return sock


def _connected(addr: Address, target: Any) -> socket.socket:
    sock = socket.socket(family_of(addr.host), socket.SOCK_DGRAM)
    try:
        sock.connect(target)  # sends nothing: it fixes the peer and filters what is received
    except OSError as exc:
        sock.close()
        raise ConnectionRefused(f"cannot reach udp://{addr.host}:{addr.port} "
                                f"({exc.strerror or exc})") from exc
    return sock


def _resolve_sync(addr: Address) -> Any:
    if _is_ip(addr.host):
        return (addr.host, addr.port)
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, family_of(addr.host),
                                   socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise AddressError(f"cannot resolve {addr.host!r}: {exc.strerror}") from exc
    return infos[0][4]


def listen(addr: Address, opts: TransportOptions) -> UdpListener:
    """Bind ``udp://host:port`` (port 0 picks one; see ``address``)."""
    settings = _Settings(addr, opts)
    _check_exposure(addr, opts)
    sock = _bind(addr, settings)
    core = _SyncCore(sock, settings, _url_of(sock.getsockname()), None)
    return UdpListener(core)


def connect(addr: Address, opts: TransportOptions, timeout: float | None) -> UdpStream:
    """A connected UDP socket to ``udp://host:port``. Nothing is sent, so this succeeds even
    when nobody listens: that shows later as ``ConnectionRefused`` from ``send``/``recv``."""
    settings = _Settings(addr, opts)
    sock = _connected(addr, _resolve_sync(addr))
    peer = sock.getpeername()
    core = _SyncCore(sock, settings, _url_of(sock.getsockname()), peer)
    assert core.connected is not None
    return UdpStream(core, core.connected, core.address, _url_of(peer))


async def alisten(addr: Address, opts: TransportOptions) -> AsyncUdpListener:
    """asyncio twin of ``listen``."""
    settings = _Settings(addr, opts)
    _check_exposure(addr, opts)
    sock = _bind(addr, settings)
    try:
        core = _AsyncCore(sock, settings, _url_of(sock.getsockname()), None)
    except BaseException:
        sock.close()
        raise
    return AsyncUdpListener(core)


async def aconnect(addr: Address, opts: TransportOptions,
                   timeout: float | None) -> AsyncUdpStream:
    """asyncio twin of ``connect``."""
    settings = _Settings(addr, opts)
    if _is_ip(addr.host):
        target: Any = (addr.host, addr.port)
    else:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(addr.host, addr.port,
                                               family=family_of(addr.host),
                                               type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise AddressError(f"cannot resolve {addr.host!r}: {exc.strerror}") from exc
        except TimeoutError:
            raise Timeout(f"resolving {addr.host!r} took longer than {timeout} s") from None
        target = infos[0][4]
    sock = _connected(addr, target)
    peer = sock.getpeername()
    try:
        core = _AsyncCore(sock, settings, _url_of(sock.getsockname()), peer)
    except BaseException:
        sock.close()
        raise
    assert core.connected is not None
    return AsyncUdpStream(core, core.connected, core.address, _url_of(peer))
