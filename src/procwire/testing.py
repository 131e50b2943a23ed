"""Test helpers: the transport conformance suite and in-memory channel pairs.

In-memory pairs, for your own tests (no sockets, no files, same semantics as a socket)::

    >>> from procwire.testing import memory_pair
    >>> a, b = memory_pair()
    >>> a.send({"n": 1})
    >>> b.recv(timeout=5)
    {'n': 1}
    >>> a.close(); b.close()

The conformance suite checks that a transport behaves like every other one: ordering, message
sizes up to the limit, many senders, EOF and close, timeouts, reconnect, listeners, bursts and
back-pressure. Subclass ``SyncConformance`` (blocking API) and ``AsyncConformance``
(``procwire.aio``) in a pytest module and say how to reach a fresh endpoint::

    import uuid
    from procwire.testing import AsyncConformance, SyncConformance

    class UnixHooks:
        def url(self, tmp_path):
            return f"unix://{tmp_path}/{uuid.uuid4().hex[:8]}.sock"

    class TestUnix(UnixHooks, SyncConformance):
        pass

    class TestUnixAsync(UnixHooks, AsyncConformance):
        pass

A transport without a listener (a connected pair, like ``procwire.pipe()``) sets
``supports_listener = False`` and overrides ``make_pair`` / ``amake_pair``; the listener tests
are then skipped. See ``docs/testing.md`` for every hook and flag.

The suite needs pytest (it uses the ``tmp_path`` fixture and ``pytest.skip``) but this module
imports it only when a test runs, so ``memory_pair`` works without it. Async tests run each
coroutine with ``asyncio.run`` inside a plain test function: no plugin needed.

To mark one inherited test (e.g. a known bug), override it::

    class TestMine(SyncConformance):
        @pytest.mark.xfail(strict=True, reason="...")
        def test_backpressure(self, tmp_path):
            super().test_backpressure(tmp_path)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn

from ._async.channel import AsyncChannel, AsyncListener
from ._async.channel import connect as aconnect
from ._async.channel import listen as alisten
from ._errors import (
    AddressInUse,
    ChannelClosed,
    ConnectionClosed,
    ConnectionRefused,
    FrameTooLarge,
    MessageTooLarge,
    Timeout,
)
from ._sync.channel import Channel, Listener, connect, listen
from .codecs import Codec, get_codec
from .protocol.framing import DEFAULT_MAX_FRAME_SIZE
from .transports.base import DEFAULT_WRITE_BUFFER, TransportOptions

__all__ = [
    "AsyncConformance",
    "SyncConformance",
    "amemory_pair",
    "free_tcp_port",
    "memory_pair",
]


# ------------------------------------------------------------------------------------------
# In-memory pairs
# ------------------------------------------------------------------------------------------

def memory_pair(codec: str | Codec = "json", *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                write_buffer: int = DEFAULT_WRITE_BUFFER) -> tuple[Channel, Channel]:
    """Two connected blocking channels in memory (use them from threads of one process).

    Messages go through the codec both ways, so what the peer receives is a decoded copy,
    exactly as over a socket. Each direction holds at most ``write_buffer`` bytes of unread
    messages; past that ``send`` waits (then raises ``Timeout``).

    >>> a, b = memory_pair(codec="raw")
    >>> a.send(b"ping"); b.recv(timeout=1)
    b'ping'
    >>> a.close(); b.recv(timeout=1)
    Traceback (most recent call last):
    ...
    procwire._errors.ConnectionClosed: peer closed the connection
    >>> b.close()
    """
    from .transports import memory

    opts = TransportOptions(max_frame_size=max_frame_size, write_buffer=write_buffer)
    a, b = memory.pair(opts)
    return Channel(a, get_codec(codec)), Channel(b, get_codec(codec))


async def amemory_pair(codec: str | Codec = "json", *,
                       max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                       write_buffer: int = DEFAULT_WRITE_BUFFER
                       ) -> tuple[AsyncChannel, AsyncChannel]:
    """Two connected asyncio channels in memory (use them from one event loop).

    >>> import asyncio
    >>> async def main():
    ...     a, b = await amemory_pair()
    ...     await a.send([1, 2])
    ...     print(await b.recv(timeout=1))
    ...     await a.close(); await b.close()
    >>> asyncio.run(main())
    [1, 2]
    """
    from .transports import memory

    opts = TransportOptions(max_frame_size=max_frame_size, write_buffer=write_buffer)
    a, b = memory.apair(opts)
    return AsyncChannel(a, get_codec(codec)), AsyncChannel(b, get_codec(codec))


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (for a URL that must be known before listening,
    as in the reconnect test). Another process could take it in between; fine for tests."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------------------------------
# Helpers shared by both suites
# ------------------------------------------------------------------------------------------

def _skip(reason: str) -> NoReturn:
    import pytest

    pytest.skip(reason)


def _expect(kinds: type[BaseException] | tuple[type[BaseException], ...],
            fn: Callable[..., Any], *args: Any, **kwargs: Any) -> BaseException:
    """Call ``fn`` and return the exception it raised, which must be one of ``kinds``."""
    try:
        result = fn(*args, **kwargs)
    except kinds as exc:
        return exc
    raise AssertionError(f"{getattr(fn, '__name__', fn)} returned {result!r}, expected {kinds}")


async def _aexpect(kinds: type[BaseException] | tuple[type[BaseException], ...],
                   aw: Awaitable[Any]) -> BaseException:
    try:
        result = await aw
    except kinds as exc:
        return exc
    raise AssertionError(f"returned {result!r}, expected {kinds}")


def _msg(codec: str, sender: int, seq: int) -> Any:
    if codec == "raw":
        return b"%d:%d" % (sender, seq)
    return [sender, seq]


def _unmsg(codec: str, obj: Any) -> tuple[int, int]:
    if codec == "raw":
        s, _, i = bytes(obj).partition(b":")
        return int(s), int(i)
    return int(obj[0]), int(obj[1])


_SEQ = struct.Struct(">Q")


class _Worker(threading.Thread):
    """A daemon thread that keeps its result or exception for ``finish()``."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        super().__init__(daemon=True, name="procwire-conformance")
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args, **self._kwargs)
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"worker {self._fn!r} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


class _Config:
    """Hooks and capability flags common to both suites (override in the subclass)."""

    #: Stream transports are reliable; datagram ones (UDP) set False and get loss-tolerant
    #: checks (most messages arrive, none corrupted, none duplicated; order not checked).
    reliable: bool = True
    #: The largest message the suite sends; it is passed as ``max_frame_size`` so that one
    #: byte more must be refused (``FrameTooLarge`` or ``MessageTooLarge``).
    max_message_size: int = 4 * 1024 * 1024
    #: False for pair-only transports: then override ``make_pair`` / ``amake_pair``.
    supports_listener: bool = True
    #: Connecting where nothing listens raises ``ConnectionRefused``, and ``retry=True``
    #: waits for the listener to appear.
    supports_reconnect: bool = True
    #: Codecs the ordering test runs with; the first one is used by the other tests.
    codecs: tuple[str, ...] = ("json", "raw")
    #: Extra keyword arguments for ``connect()`` / ``listen()`` (e.g. ``auth=``, ``cafile=``).
    connect_kwargs: dict[str, Any] = {}
    listen_kwargs: dict[str, Any] = {}
    #: Bound on any single blocking call the suite makes, in seconds.
    timeout: float = 10.0
    #: Bound on one whole test (bulk transfers included), in seconds.
    test_timeout: float = 45.0
    #: Unreliable transports only: the fraction of messages that must arrive.
    min_delivery: float = 0.5
    #: Message counts (kept modest so the suite stays fast).
    ordering_count: int = 10_000
    burst_count: int = 50_000

    def url(self, tmp_path: Path) -> str:
        """A listen URL for a fresh endpoint; each call must return a new one, usable before
        anything listens there (for TCP, pick a free port with ``free_tcp_port()``)."""
        raise NotImplementedError(f"{type(self).__name__} must define url(tmp_path)")

    def _pair_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"max_frame_size": self.max_message_size, **options}

    def _require_listener(self) -> None:
        if not self.supports_listener:
            _skip("transport has no listener")

    def _require_reliable(self) -> None:
        if not self.reliable:
            _skip("unreliable transport: no EOF or ordering guarantees")

    def _check_streams(self, got: list[tuple[int, int]], senders: int, per_sender: int) -> None:
        """Reliable: every sender's sequence complete and in order. Unreliable: no duplicates,
        nothing corrupted, at least ``min_delivery`` of the messages."""
        if not self.reliable:
            assert len(set(got)) == len(got), "duplicated messages"
            bad = [m for m in got if not (0 <= m[0] < senders and 0 <= m[1] < per_sender)]
            assert not bad, f"corrupted messages, e.g. {bad[:3]}"
            want = self.min_delivery * senders * per_sender
            assert len(got) >= want, f"only {len(got)} of {senders * per_sender} arrived"
            return
        by: dict[int, list[int]] = {}
        for s, i in got:
            by.setdefault(s, []).append(i)
        assert sorted(by) == list(range(senders)), f"senders seen: {sorted(by)[:10]}"
        for s, seqs in by.items():
            if seqs != list(range(per_sender)):
                at = next((k for k, v in enumerate(seqs) if v != k), len(seqs))
                raise AssertionError(f"sender {s}: {len(seqs)} of {per_sender} messages, first "
                                     f"wrong at index {at}: {seqs[at:at + 3]}")

    def message_sizes(self) -> list[int]:
        """Payload sizes the size test sends (raw codec): 0 and 1 byte, around 64 KiB, 1 MiB,
        and ``max_message_size`` (and one below). Override to drop sizes a transport cannot
        carry (e.g. an empty datagram)."""
        top = self.max_message_size
        wanted = {0, 1, 2, 255, 4096, 65535, 65536, 65537, 1 << 20, top - 1, top}
        return sorted(s for s in wanted if 0 <= s <= top)

    def _sizes(self) -> list[int]:
        return self.message_sizes()


# ------------------------------------------------------------------------------------------
# Blocking suite
# ------------------------------------------------------------------------------------------

class SyncConformance(_Config):
    """The conformance suite over the blocking API (``procwire.connect`` / ``listen``).

    Subclass it in a module named ``test_*.py`` under a class named ``Test*`` and define
    ``url(tmp_path)`` (or, for a pair-only transport, ``supports_listener = False`` and
    ``make_pair``). Example for a pair-only transport::

        import procwire
        from procwire.testing import SyncConformance

        class TestPipe(SyncConformance):
            supports_listener = False
            supports_reconnect = False

            def make_pair(self, tmp_path, codec, **options):
                return procwire.pipe(codec=codec, **options)

    Every test bounds each blocking call by ``timeout`` and closes what it opened (channels,
    listeners, threads) even when it fails.
    """

    _stack: contextlib.ExitStack | None = None

    # -- hooks -------------------------------------------------------------------------------
    def open_listener(self, url: str, codec: str, **options: Any) -> Listener:
        """Listen at ``url``; default ``procwire.listen`` with ``listen_kwargs``."""
        return listen(url, codec=codec, **{**options, **self.listen_kwargs})

    def open_client(self, url: str, codec: str, *, retry: bool = False,
                    **options: Any) -> Channel:
        """Connect to ``url``; default ``procwire.connect`` with ``connect_kwargs``."""
        return connect(url, codec=codec, retry=retry, timeout=self.timeout,
                       **{**options, **self.connect_kwargs})

    def make_pair(self, tmp_path: Path, codec: str, **options: Any) -> tuple[Channel, Channel]:
        """Two connected channels ``(client, server)``. ``options`` (``max_frame_size``,
        ``write_buffer``) must reach both ends. The default listens at ``url(tmp_path)``,
        connects and accepts; the listener stays open until the test ends."""
        if not self.supports_listener:
            raise NotImplementedError("a transport without a listener must define make_pair")
        listener = self.open_listener(self.url(tmp_path), codec, **options)
        self.defer(listener.close)
        accepting = self.worker(listener.accept, timeout=self.timeout)
        client = self.open_client(listener.address, codec, **options)
        self.defer(client.close, 1.0)
        server: Channel = accepting.finish(self.timeout + 1)
        self.defer(server.close, 1.0)
        return client, server

    # -- utilities for tests -----------------------------------------------------------------
    def defer(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` when the current test ends (last registered runs first)."""
        assert self._stack is not None, "defer() outside a conformance test"
        self._stack.callback(self._quietly, fn, *args)

    @staticmethod
    def _quietly(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            pass  # cleanup of something already broken must not hide the test's own error

    def worker(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> _Worker:
        """Start ``fn(*args, **kwargs)`` in a daemon thread; ``.finish(timeout)`` joins it and
        returns its result or re-raises its exception."""
        w = _Worker(fn, args, kwargs)
        w.start()
        return w

    def pair(self, tmp_path: Path, codec: str = "json",
             **options: Any) -> tuple[Channel, Channel]:
        a, b = self.make_pair(tmp_path, codec, **self._pair_options(options))
        self.defer(a.close, 1.0)
        self.defer(b.close, 1.0)
        return a, b

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            self._stack = stack
            try:
                yield
            finally:
                self._stack = None if stack is self._stack else self._stack

    def _send_seq(self, ch: Channel, codec: str, sender: int, count: int) -> None:
        for i in range(count):
            ch.send(_msg(codec, sender, i), timeout=self.timeout)
            if not self.reliable and i % 64 == 63:
                time.sleep(0.001)  # give an unreliable receiver a chance to keep up

    def _collect(self, ch: Channel, codec: str, total: int) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + self.test_timeout
        while len(got) < total:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"only {len(got)} of {total} messages in time")
            try:
                msg = ch.recv(timeout=min(left, self.timeout if self.reliable else 2.0))
            except Timeout:
                if self.reliable:
                    raise AssertionError(f"stalled after {len(got)} of {total} messages") \
                        from None
                break
            got.append(_unmsg(codec, msg))
        return got

    def _roundtrip(self, a: Channel, b: Channel, data: Any) -> None:
        """Send ``data`` from a to b and check b gets it intact (resending, if unreliable)."""
        for _ in range(1 if self.reliable else 3):
            sending = self.worker(a.send, data, timeout=self.timeout)
            try:
                got = b.recv(timeout=self.timeout if self.reliable else 2.0)
            except Timeout:
                sending.finish(self.timeout)
                if self.reliable:
                    raise
                continue
            sending.finish(self.timeout)
            assert type(got) is type(data) and got == data, \
                f"message corrupted ({len(data)} bytes sent)" if isinstance(data, bytes) \
                else f"sent {data!r}, received {got!r}"
            return
        raise AssertionError("message lost three times in a row")

    # -- tests -------------------------------------------------------------------------------
    def test_ordering(self, tmp_path: Path) -> None:
        """10000 messages per codec arrive complete and in order."""
        with self._session():
            for codec in self.codecs:
                a, b = self.pair(tmp_path, codec)
                sending = self.worker(self._send_seq, a, codec, 0, self.ordering_count)
                got = self._collect(b, codec, self.ordering_count)
                sending.finish(self.test_timeout)
                self._check_streams(got, 1, self.ordering_count)

    def test_message_sizes(self, tmp_path: Path) -> None:
        """Raw messages from 0 bytes to ``max_message_size`` arrive intact."""
        with self._session():
            a, b = self.pair(tmp_path, "raw")
            rnd = random.Random(1234)
            for size in self._sizes():
                self._roundtrip(a, b, rnd.randbytes(size))
            self._roundtrip(b, a, rnd.randbytes(self.max_message_size))

    def test_too_large_refused(self, tmp_path: Path) -> None:
        """One byte over the limit is refused with nothing sent; the channel keeps working."""
        with self._session():
            a, b = self.pair(tmp_path, "raw")
            _expect((FrameTooLarge, MessageTooLarge), a.send,
                    bytes(self.max_message_size + 1), timeout=self.timeout)
            self._roundtrip(a, b, b"still works")
            self._roundtrip(b, a, b"both ways")

    def test_many_senders_one_channel(self, tmp_path: Path) -> None:
        """4 threads send on one channel at once; each one's order is kept."""
        codec = self.codecs[0]
        with self._session():
            a, b = self.pair(tmp_path, codec)
            senders = [self.worker(self._send_seq, a, codec, s, 2000) for s in range(4)]
            got = self._collect(b, codec, 4 * 2000)
            for w in senders:
                w.finish(self.test_timeout)
            self._check_streams(got, 4, 2000)

    def test_many_clients(self, tmp_path: Path) -> None:
        """4 clients connect to one listener at once; each channel keeps its order."""
        self._require_listener()
        codec, per = self.codecs[0], 1000
        with self._session():
            listener = self.open_listener(self.url(tmp_path), codec,
                                          max_frame_size=self.max_message_size)
            self.defer(listener.close)

            def client(sender: int) -> None:
                ch = self.open_client(listener.address, codec)
                try:
                    self._send_seq(ch, codec, sender, per)
                finally:
                    ch.close(self.timeout)

            clients = [self.worker(client, s) for s in range(4)]
            servers = []
            for _ in range(4):
                ch = listener.accept(timeout=self.timeout)
                self.defer(ch.close, 1.0)
                servers.append(ch)
            seen = set()
            for ch in servers:
                got = self._collect(ch, codec, per)
                senders = {s for s, _ in got}
                assert len(senders) == 1, f"one channel carried messages of senders {senders}"
                sender = senders.pop()
                seen.add(sender)
                self._check_streams([(0, i) for _, i in got], 1, per)
                if self.reliable:
                    _expect(ConnectionClosed, ch.recv, timeout=self.timeout)
            assert seen == {0, 1, 2, 3}
            for w in clients:
                w.finish(self.test_timeout)

    def test_close_delivers_everything(self, tmp_path: Path) -> None:
        """Messages sent before close() all arrive, then ConnectionClosed (and again after)."""
        self._require_reliable()
        with self._session():
            a, b = self.pair(tmp_path, "json")
            # The reader runs meanwhile: close() may wait for the peer to take what the
            # kernel buffer could not hold.
            reading = self.worker(self._read_until_closed, b)
            for i in range(1000):
                a.send(i, timeout=self.timeout)
            a.close(self.timeout)
            got, exc = reading.finish(self.timeout)
            assert got == list(range(1000)), f"{len(got)} of 1000 messages before EOF"
            assert isinstance(exc, ConnectionClosed) and exc.reason
            _expect(ConnectionClosed, b.recv, timeout=self.timeout)

    def _read_until_closed(self, ch: Channel) -> tuple[list[Any], BaseException]:
        got: list[Any] = []
        for _ in range(100_000):
            try:
                got.append(ch.recv(timeout=self.timeout))
            except ConnectionClosed as exc:
                return got, exc
        raise AssertionError("no end of stream after 100000 messages")

    def test_iteration_stops_at_close(self, tmp_path: Path) -> None:
        """``for msg in channel`` yields everything the peer sent, then stops."""
        self._require_reliable()
        with self._session():
            a, b = self.pair(tmp_path, "json")
            iterating = self.worker(list, b)
            for i in range(100):
                a.send({"i": i}, timeout=self.timeout)
            a.close(self.timeout)
            got = iterating.finish(self.timeout)
            assert got == [{"i": i} for i in range(100)]

    def test_peer_close_wakes_receiver(self, tmp_path: Path) -> None:
        """A recv() waiting with no timeout ends with ConnectionClosed when the peer closes."""
        self._require_reliable()
        with self._session():
            a, b = self.pair(tmp_path, "json")
            waiting = self.worker(_expect, ConnectionClosed, b.recv)
            time.sleep(0.1)
            a.close(self.timeout)
            waiting.finish(self.timeout)

    def test_local_close_wakes_receiver(self, tmp_path: Path) -> None:
        """A recv() waiting in another thread ends when this side closes the channel."""
        with self._session():
            _a, b = self.pair(tmp_path, "json")
            waiting = self.worker(_expect, (ChannelClosed, ConnectionClosed), b.recv,
                                  timeout=self.timeout * 2)
            time.sleep(0.1)
            b.close(self.timeout)
            waiting.finish(self.timeout)

    def test_recv_timeout(self, tmp_path: Path) -> None:
        """recv(timeout=) raises procwire.Timeout (a TimeoutError); the channel still works."""
        with self._session():
            a, b = self.pair(tmp_path, "json")
            start = time.monotonic()
            exc = _expect(Timeout, b.recv, timeout=0.2)
            assert isinstance(exc, TimeoutError)
            assert time.monotonic() - start < self.timeout
            _expect(Timeout, b.recv, timeout=0)
            self._roundtrip(a, b, {"after": "timeout"})
            self._roundtrip(b, a, {"back": True})

    def test_send_after_close(self, tmp_path: Path) -> None:
        """send()/recv() on a channel this side closed raise ChannelClosed; close is
        idempotent."""
        with self._session():
            a, _b = self.pair(tmp_path, "json")
            a.close(self.timeout)
            a.close(self.timeout)
            assert a.closed
            _expect(ChannelClosed, a.send, "late", timeout=self.timeout)
            _expect(ChannelClosed, a.recv, timeout=0.1)

    def test_ping_pong(self, tmp_path: Path) -> None:
        """500 request/reply round trips (both directions in use)."""
        self._require_reliable()
        with self._session():
            a, b = self.pair(tmp_path, self.codecs[0])
            codec = self.codecs[0]

            def echo() -> None:
                for _ in range(500):
                    b.send(b.recv(timeout=self.timeout), timeout=self.timeout)

            echoing = self.worker(echo)
            for i in range(500):
                a.send(_msg(codec, 0, i), timeout=self.timeout)
                assert _unmsg(codec, a.recv(timeout=self.timeout)) == (0, i)
            echoing.finish(self.timeout)

    def test_burst(self, tmp_path: Path) -> None:
        """A burst of 50000 small messages arrives complete (no timing asserted)."""
        codec = self.codecs[0]
        with self._session():
            a, b = self.pair(tmp_path, codec)
            sending = self.worker(self._send_seq, a, codec, 0, self.burst_count)
            got = self._collect(b, codec, self.burst_count)
            sending.finish(self.test_timeout)
            self._check_streams(got, 1, self.burst_count)

    def test_backpressure(self, tmp_path: Path) -> None:
        """With a reader that does not read, send() eventually raises Timeout (the buffers are
        bounded); once the reader catches up, everything sent arrives in order."""
        self._require_reliable()
        chunk = 16 * 1024
        with self._session():
            a, b = self.pair(tmp_path, "raw", write_buffer=64 * 1024)
            sent = 0
            for i in range(4096):  # 64 MiB: far above any socket buffer
                try:
                    a.send(_SEQ.pack(i) + bytes(chunk), timeout=0.05)
                except Timeout:
                    break
                sent += 1
            else:
                raise AssertionError("send() never blocked: the write buffer is unbounded")
            finishing = self.worker(a.send, b"END", timeout=self.test_timeout)
            seqs = []
            for _ in range(sent + 2):
                msg = b.recv(timeout=self.timeout)
                if msg == b"END":
                    break
                seqs.append(_SEQ.unpack_from(msg)[0])
            finishing.finish(self.timeout)
            # The send that timed out may or may not have been delivered, never in part.
            assert seqs in (list(range(sent)), list(range(sent + 1))), \
                f"{len(seqs)} messages after {sent} sends"

    def test_reconnect(self, tmp_path: Path) -> None:
        """connect(retry=True) started before the listener exists connects once it appears."""
        self._require_listener()
        if not self.supports_reconnect:
            _skip("transport does not support reconnect")
        with self._session():
            url = self.url(tmp_path)
            connecting = self.worker(self.open_client, url, "json", retry=True,
                                     max_frame_size=self.max_message_size)
            time.sleep(0.3)
            listener = self.open_listener(url, "json", max_frame_size=self.max_message_size)
            self.defer(listener.close)
            server = listener.accept(timeout=self.timeout)
            self.defer(server.close, 1.0)
            client: Channel = connecting.finish(self.timeout + 1)
            self.defer(client.close, 1.0)
            self._roundtrip(client, server, "hello")
            self._roundtrip(server, client, "welcome")

    def test_connect_refused(self, tmp_path: Path) -> None:
        """connect() where nothing listens raises ConnectionRefused (without retry)."""
        self._require_listener()
        if not self.supports_reconnect:
            _skip("transport does not report refused connections")
        with self._session():
            _expect(ConnectionRefused, self.open_client, self.url(tmp_path), "json")

    def test_accept_timeout(self, tmp_path: Path) -> None:
        """accept(timeout=) raises Timeout; the listener then still accepts."""
        self._require_listener()
        with self._session():
            listener = self.open_listener(self.url(tmp_path), "json",
                                          max_frame_size=self.max_message_size)
            self.defer(listener.close)
            exc = _expect(Timeout, listener.accept, timeout=0.2)
            assert isinstance(exc, TimeoutError)
            accepting = self.worker(listener.accept, timeout=self.timeout)
            client = self.open_client(listener.address, "json")
            self.defer(client.close, 1.0)
            server: Channel = accepting.finish(self.timeout + 1)
            self.defer(server.close, 1.0)
            self._roundtrip(client, server, [1, 2, 3])

    def test_second_client(self, tmp_path: Path) -> None:
        """The listener serves a second client after the first one disconnects."""
        self._require_listener()
        with self._session():
            listener = self.open_listener(self.url(tmp_path), "json",
                                          max_frame_size=self.max_message_size)
            self.defer(listener.close)
            for n in range(2):
                accepting = self.worker(listener.accept, timeout=self.timeout)
                client = self.open_client(listener.address, "json")
                self.defer(client.close, 1.0)
                server: Channel = accepting.finish(self.timeout + 1)
                self.defer(server.close, 1.0)
                self._roundtrip(client, server, {"client": n})
                self._roundtrip(server, client, {"reply": n})
                client.close(self.timeout)
                if self.reliable:
                    _expect(ConnectionClosed, server.recv, timeout=self.timeout)
                server.close(self.timeout)

    def test_listener_close(self, tmp_path: Path) -> None:
        """After close(), accept raises ChannelClosed and the address can be listened on
        again."""
        self._require_listener()
        with self._session():
            listener = self.open_listener(self.url(tmp_path), "json")
            self.defer(listener.close)
            address = listener.address
            listener.close()
            listener.close()
            _expect(ChannelClosed, listener.accept, timeout=0.1)
            again = self.open_listener(address, "json")
            self.defer(again.close)

    def test_address_in_use(self, tmp_path: Path) -> None:
        """Listening where a listener is already open raises AddressInUse, and leaves the
        first listener working."""
        self._require_listener()
        with self._session():
            listener = self.open_listener(self.url(tmp_path), "json")
            self.defer(listener.close)
            _expect(AddressInUse, self.open_listener, listener.address, "json")
            accepting = self.worker(listener.accept, timeout=self.timeout)
            client = self.open_client(listener.address, "json")
            self.defer(client.close, 1.0)
            server: Channel = accepting.finish(self.timeout + 1)
            self.defer(server.close, 1.0)
            self._roundtrip(client, server, "still listening")


# ------------------------------------------------------------------------------------------
# asyncio suite
# ------------------------------------------------------------------------------------------

class AsyncConformance(_Config):
    """The conformance suite over ``procwire.aio``; the same tests as ``SyncConformance``.

    Each test is a plain function that runs its coroutine with ``asyncio.run`` (bounded by
    ``test_timeout``), so no pytest plugin is needed. Hooks are the async spellings:
    ``aopen_listener``, ``aopen_client``, ``amake_pair``. Example for a pair-only transport::

        import procwire.aio as aio
        from procwire.testing import AsyncConformance

        class TestPipeAsync(AsyncConformance):
            supports_listener = False
            supports_reconnect = False

            async def amake_pair(self, tmp_path, codec, **options):
                return await aio.pipe(codec=codec, **options)
    """

    _astack: contextlib.AsyncExitStack | None = None

    # -- hooks -------------------------------------------------------------------------------
    async def aopen_listener(self, url: str, codec: str, **options: Any) -> AsyncListener:
        """Listen at ``url``; default ``procwire.aio.listen`` with ``listen_kwargs``."""
        return await alisten(url, codec=codec, **{**options, **self.listen_kwargs})

    async def aopen_client(self, url: str, codec: str, *, retry: bool = False,
                           **options: Any) -> AsyncChannel:
        """Connect to ``url``; default ``procwire.aio.connect`` with ``connect_kwargs``."""
        return await aconnect(url, codec=codec, retry=retry, timeout=self.timeout,
                              **{**options, **self.connect_kwargs})

    async def amake_pair(self, tmp_path: Path, codec: str,
                         **options: Any) -> tuple[AsyncChannel, AsyncChannel]:
        """Two connected channels ``(client, server)``; see ``SyncConformance.make_pair``."""
        if not self.supports_listener:
            raise NotImplementedError("a transport without a listener must define amake_pair")
        listener = await self.aopen_listener(self.url(tmp_path), codec, **options)
        self.adefer(listener.close)
        accepting = self.task(listener.accept(timeout=self.timeout))
        client = await self.aopen_client(listener.address, codec, **options)
        self.adefer(client.close, 1.0)
        server = await self.finish(accepting)
        self.adefer(server.close, 1.0)
        return client, server

    # -- utilities for tests -----------------------------------------------------------------
    def adefer(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Await ``fn(*args)`` when the current test ends (last registered runs first)."""
        assert self._astack is not None, "adefer() outside a conformance test"
        self._astack.push_async_callback(self._aquietly, fn, *args)

    def defer(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` (not a coroutine) when the current test ends."""
        assert self._astack is not None, "defer() outside a conformance test"
        self._astack.callback(SyncConformance._quietly, fn, *args)

    @staticmethod
    async def _aquietly(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            async with asyncio.timeout(5):
                await fn(*args)
        except Exception:
            pass

    def task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start ``coro`` as a task, cancelled at the end of the test if still running."""
        t = asyncio.ensure_future(coro)
        self.defer(t.cancel)
        return t

    async def finish(self, task: asyncio.Task[Any], timeout: float | None = None) -> Any:
        """Wait for ``task`` (up to ``timeout``, default ``self.timeout + 1``) and return its
        result or raise its exception."""
        limit = self.timeout + 1 if timeout is None else timeout
        done, _ = await asyncio.wait({task}, timeout=limit)
        if not done:
            task.cancel()
            raise AssertionError(f"task {task!r} still running after {limit} s")
        return task.result()

    async def pair(self, tmp_path: Path, codec: str = "json",
                   **options: Any) -> tuple[AsyncChannel, AsyncChannel]:
        a, b = await self.amake_pair(tmp_path, codec, **self._pair_options(options))
        self.adefer(a.close, 1.0)
        self.adefer(b.close, 1.0)
        return a, b

    def _run(self, fn: Callable[[Path], Coroutine[Any, Any, None]], tmp_path: Path) -> None:
        async def main() -> None:
            async with contextlib.AsyncExitStack() as stack:
                self._astack = stack
                try:
                    async with asyncio.timeout(self.test_timeout):
                        await fn(tmp_path)
                finally:
                    self._astack = None if stack is self._astack else self._astack

        asyncio.run(main())

    async def _send_seq(self, ch: AsyncChannel, codec: str, sender: int, count: int) -> None:
        for i in range(count):
            await ch.send(_msg(codec, sender, i), timeout=self.timeout)
            if not self.reliable and i % 64 == 63:
                await asyncio.sleep(0.001)
            elif i % 256 == 255:
                await asyncio.sleep(0)  # let other senders interleave

    async def _collect(self, ch: AsyncChannel, codec: str,
                       total: int) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + self.test_timeout
        while len(got) < total:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"only {len(got)} of {total} messages in time")
            try:
                msg = await ch.recv(timeout=min(left, self.timeout if self.reliable else 2.0))
            except Timeout:
                if self.reliable:
                    raise AssertionError(f"stalled after {len(got)} of {total} messages") \
                        from None
                break
            got.append(_unmsg(codec, msg))
        return got

    async def _roundtrip(self, a: AsyncChannel, b: AsyncChannel, data: Any) -> None:
        for _ in range(1 if self.reliable else 3):
            sending = self.task(a.send(data, timeout=self.timeout))
            try:
                got = await b.recv(timeout=self.timeout if self.reliable else 2.0)
            except Timeout:
                await self.finish(sending)
                if self.reliable:
                    raise
                continue
            await self.finish(sending)
            assert type(got) is type(data) and got == data, \
                f"message corrupted ({len(data)} bytes sent)" if isinstance(data, bytes) \
                else f"sent {data!r}, received {got!r}"
            return
        raise AssertionError("message lost three times in a row")

    # -- tests -------------------------------------------------------------------------------
    def test_ordering(self, tmp_path: Path) -> None:
        """10000 messages per codec arrive complete and in order."""
        self._run(self._t_ordering, tmp_path)

    async def _t_ordering(self, tmp_path: Path) -> None:
        for codec in self.codecs:
            a, b = await self.pair(tmp_path, codec)
            sending = self.task(self._send_seq(a, codec, 0, self.ordering_count))
            got = await self._collect(b, codec, self.ordering_count)
            await self.finish(sending, self.test_timeout)
            self._check_streams(got, 1, self.ordering_count)

    def test_message_sizes(self, tmp_path: Path) -> None:
        """Raw messages from 0 bytes to ``max_message_size`` arrive intact."""
        self._run(self._t_message_sizes, tmp_path)

    async def _t_message_sizes(self, tmp_path: Path) -> None:
        a, b = await self.pair(tmp_path, "raw")
        rnd = random.Random(1234)
        for size in self._sizes():
            await self._roundtrip(a, b, rnd.randbytes(size))
        await self._roundtrip(b, a, rnd.randbytes(self.max_message_size))

    def test_too_large_refused(self, tmp_path: Path) -> None:
        """One byte over the limit is refused with nothing sent; the channel keeps working."""
        self._run(self._t_too_large_refused, tmp_path)

    async def _t_too_large_refused(self, tmp_path: Path) -> None:
        a, b = await self.pair(tmp_path, "raw")
        await _aexpect((FrameTooLarge, MessageTooLarge),
                       a.send(bytes(self.max_message_size + 1), timeout=self.timeout))
        await self._roundtrip(a, b, b"still works")
        await self._roundtrip(b, a, b"both ways")

    def test_many_senders_one_channel(self, tmp_path: Path) -> None:
        """4 tasks send on one channel at once; each one's order is kept."""
        self._run(self._t_many_senders_one_channel, tmp_path)

    async def _t_many_senders_one_channel(self, tmp_path: Path) -> None:
        codec = self.codecs[0]
        a, b = await self.pair(tmp_path, codec)
        senders = [self.task(self._send_seq(a, codec, s, 2000)) for s in range(4)]
        got = await self._collect(b, codec, 4 * 2000)
        for t in senders:
            await self.finish(t, self.test_timeout)
        self._check_streams(got, 4, 2000)

    def test_many_clients(self, tmp_path: Path) -> None:
        """4 clients connect to one listener at once; each channel keeps its order."""
        self._require_listener()
        self._run(self._t_many_clients, tmp_path)

    async def _t_many_clients(self, tmp_path: Path) -> None:
        codec, per = self.codecs[0], 1000
        listener = await self.aopen_listener(self.url(tmp_path), codec,
                                             max_frame_size=self.max_message_size)
        self.adefer(listener.close)

        async def client(sender: int) -> None:
            ch = await self.aopen_client(listener.address, codec)
            try:
                await self._send_seq(ch, codec, sender, per)
            finally:
                await ch.close(self.timeout)

        clients = [self.task(client(s)) for s in range(4)]
        servers = []
        for _ in range(4):
            ch = await listener.accept(timeout=self.timeout)
            self.adefer(ch.close, 1.0)
            servers.append(ch)
        seen = set()
        for ch in servers:
            got = await self._collect(ch, codec, per)
            senders = {s for s, _ in got}
            assert len(senders) == 1, f"one channel carried messages of senders {senders}"
            seen.add(senders.pop())
            self._check_streams([(0, i) for _, i in got], 1, per)
            if self.reliable:
                await _aexpect(ConnectionClosed, ch.recv(timeout=self.timeout))
        assert seen == {0, 1, 2, 3}
        for t in clients:
            await self.finish(t, self.test_timeout)

    def test_close_delivers_everything(self, tmp_path: Path) -> None:
        """Messages sent before close() all arrive, then ConnectionClosed (and again after)."""
        self._require_reliable()
        self._run(self._t_close_delivers_everything, tmp_path)

    async def _t_close_delivers_everything(self, tmp_path: Path) -> None:
        a, b = await self.pair(tmp_path, "json")
        reading = self.task(self._read_until_closed(b))
        for i in range(1000):
            await a.send(i, timeout=self.timeout)
        await a.close(self.timeout)
        got, exc = await self.finish(reading)
        assert got == list(range(1000)), f"{len(got)} of 1000 messages before EOF"
        assert isinstance(exc, ConnectionClosed) and exc.reason
        await _aexpect(ConnectionClosed, b.recv(timeout=self.timeout))

    async def _read_until_closed(self, ch: AsyncChannel) -> tuple[list[Any], BaseException]:
        got: list[Any] = []
        for _ in range(100_000):
            try:
                got.append(await ch.recv(timeout=self.timeout))
            except ConnectionClosed as exc:
                return got, exc
        raise AssertionError("no end of stream after 100000 messages")

    def test_iteration_stops_at_close(self, tmp_path: Path) -> None:
        """``async for msg in channel`` yields everything the peer sent, then stops."""
        self._require_reliable()
        self._run(self._t_iteration_stops_at_close, tmp_path)

    async def _t_iteration_stops_at_close(self, tmp_path: Path) -> None:
        a, b = await self.pair(tmp_path, "json")

        async def drain() -> list[Any]:
            return [m async for m in b]

        iterating = self.task(drain())
        for i in range(100):
            await a.send({"i": i}, timeout=self.timeout)
        await a.close(self.timeout)
        got = await self.finish(iterating)
        assert got == [{"i": i} for i in range(100)]

    def test_peer_close_wakes_receiver(self, tmp_path: Path) -> None:
        """A recv() waiting with no timeout ends with ConnectionClosed when the peer closes."""
        self._require_reliable()
        self._run(self._t_peer_close_wakes_receiver, tmp_path)

    async def _t_peer_close_wakes_receiver(self, tmp_path: Path) -> None:
        a, b = await self.pair(tmp_path, "json")
        waiting = self.task(_aexpect(ConnectionClosed, b.recv()))
        await asyncio.sleep(0.1)
        await a.close(self.timeout)
        await self.finish(waiting)

    def test_local_close_wakes_receiver(self, tmp_path: Path) -> None:
        """A recv() waiting in another task ends when this side closes the channel."""
        self._run(self._t_local_close_wakes_receiver, tmp_path)

    async def _t_local_close_wakes_receiver(self, tmp_path: Path) -> None:
        _a, b = await self.pair(tmp_path, "json")
        waiting = self.task(_aexpect((ChannelClosed, ConnectionClosed),
                                     b.recv(timeout=self.timeout * 2)))
        await asyncio.sleep(0.1)
        await b.close(self.timeout)
        await self.finish(waiting)

    def test_recv_timeout(self, tmp_path: Path) -> None:
        """recv(timeout=) raises procwire.Timeout (a TimeoutError); the channel still works."""
        self._run(self._t_recv_timeout, tmp_path)

    async def _t_recv_timeout(self, tmp_path: Path) -> None:
        a, b = await self.pair(tmp_path, "json")
        start = time.monotonic()
        exc = await _aexpect(Timeout, b.recv(timeout=0.2))
        assert isinstance(exc, TimeoutError)
        assert time.monotonic() - start < self.timeout
        await _aexpect(Timeout, b.recv(timeout=0))
        await self._roundtrip(a, b, {"after": "timeout"})
        await self._roundtrip(b, a, {"back": True})

    def test_send_after_close(self, tmp_path: Path) -> None:
        """send()/recv() on a channel this side closed raise ChannelClosed; close is
        idempotent."""
        self._run(self._t_send_after_close, tmp_path)

    async def _t_send_after_close(self, tmp_path: Path) -> None:
        a, _b = await self.pair(tmp_path, "json")
        await a.close(self.timeout)
        await a.close(self.timeout)
        assert a.closed
        await _aexpect(ChannelClosed, a.send("late", timeout=self.timeout))
        await _aexpect(ChannelClosed, a.recv(timeout=0.1))

    def test_ping_pong(self, tmp_path: Path) -> None:
        """500 request/reply round trips (both directions in use)."""
        self._require_reliable()
        self._run(self._t_ping_pong, tmp_path)

    async def _t_ping_pong(self, tmp_path: Path) -> None:
        codec = self.codecs[0]
        a, b = await self.pair(tmp_path, codec)

        async def echo() -> None:
            for _ in range(500):
                await b.send(await b.recv(timeout=self.timeout), timeout=self.timeout)

        echoing = self.task(echo())
        for i in range(500):
            await a.send(_msg(codec, 0, i), timeout=self.timeout)
            assert _unmsg(codec, await a.recv(timeout=self.timeout)) == (0, i)
        await self.finish(echoing)

    def test_burst(self, tmp_path: Path) -> None:
        """A burst of 50000 small messages arrives complete (no timing asserted)."""
        self._run(self._t_burst, tmp_path)

    async def _t_burst(self, tmp_path: Path) -> None:
        codec = self.codecs[0]
        a, b = await self.pair(tmp_path, codec)
        sending = self.task(self._send_seq(a, codec, 0, self.burst_count))
        got = await self._collect(b, codec, self.burst_count)
        await self.finish(sending, self.test_timeout)
        self._check_streams(got, 1, self.burst_count)

    def test_backpressure(self, tmp_path: Path) -> None:
        """With a reader that does not read, send() eventually raises Timeout (the buffers are
        bounded); once the reader catches up, everything sent arrives in order."""
        self._require_reliable()
        self._run(self._t_backpressure, tmp_path)

    async def _t_backpressure(self, tmp_path: Path) -> None:
        chunk = 16 * 1024
        a, b = await self.pair(tmp_path, "raw", write_buffer=64 * 1024)
        sent = 0
        for i in range(4096):
            try:
                await a.send(_SEQ.pack(i) + bytes(chunk), timeout=0.05)
            except Timeout:
                break
            sent += 1
        else:
            raise AssertionError("send() never blocked: the write buffer is unbounded")
        finishing = self.task(a.send(b"END", timeout=self.test_timeout))
        seqs = []
        for _ in range(sent + 2):
            msg = await b.recv(timeout=self.timeout)
            if msg == b"END":
                break
            seqs.append(_SEQ.unpack_from(msg)[0])
        await self.finish(finishing)
        assert seqs in (list(range(sent)), list(range(sent + 1))), \
            f"{len(seqs)} messages after {sent} sends"

    def test_reconnect(self, tmp_path: Path) -> None:
        """connect(retry=True) started before the listener exists connects once it appears."""
        self._require_listener()
        if not self.supports_reconnect:
            _skip("transport does not support reconnect")
        self._run(self._t_reconnect, tmp_path)

    async def _t_reconnect(self, tmp_path: Path) -> None:
        url = self.url(tmp_path)
        connecting = self.task(self.aopen_client(url, "json", retry=True,
                                                 max_frame_size=self.max_message_size))
        await asyncio.sleep(0.3)
        listener = await self.aopen_listener(url, "json", max_frame_size=self.max_message_size)
        self.adefer(listener.close)
        server = await listener.accept(timeout=self.timeout)
        self.adefer(server.close, 1.0)
        client: AsyncChannel = await self.finish(connecting)
        self.adefer(client.close, 1.0)
        await self._roundtrip(client, server, "hello")
        await self._roundtrip(server, client, "welcome")

    def test_connect_refused(self, tmp_path: Path) -> None:
        """connect() where nothing listens raises ConnectionRefused (without retry)."""
        self._require_listener()
        if not self.supports_reconnect:
            _skip("transport does not report refused connections")
        self._run(self._t_connect_refused, tmp_path)

    async def _t_connect_refused(self, tmp_path: Path) -> None:
        await _aexpect(ConnectionRefused, self.aopen_client(self.url(tmp_path), "json"))

    def test_accept_timeout(self, tmp_path: Path) -> None:
        """accept(timeout=) raises Timeout; the listener then still accepts."""
        self._require_listener()
        self._run(self._t_accept_timeout, tmp_path)

    async def _t_accept_timeout(self, tmp_path: Path) -> None:
        listener = await self.aopen_listener(self.url(tmp_path), "json",
                                             max_frame_size=self.max_message_size)
        self.adefer(listener.close)
        exc = await _aexpect(Timeout, listener.accept(timeout=0.2))
        assert isinstance(exc, TimeoutError)
        accepting = self.task(listener.accept(timeout=self.timeout))
        client = await self.aopen_client(listener.address, "json")
        self.adefer(client.close, 1.0)
        server: AsyncChannel = await self.finish(accepting)
        self.adefer(server.close, 1.0)
        await self._roundtrip(client, server, [1, 2, 3])

    def test_second_client(self, tmp_path: Path) -> None:
        """The listener serves a second client after the first one disconnects."""
        self._require_listener()
        self._run(self._t_second_client, tmp_path)

    async def _t_second_client(self, tmp_path: Path) -> None:
        listener = await self.aopen_listener(self.url(tmp_path), "json",
                                             max_frame_size=self.max_message_size)
        self.adefer(listener.close)
        for n in range(2):
            accepting = self.task(listener.accept(timeout=self.timeout))
            client = await self.aopen_client(listener.address, "json")
            self.adefer(client.close, 1.0)
            server: AsyncChannel = await self.finish(accepting)
            self.adefer(server.close, 1.0)
            await self._roundtrip(client, server, {"client": n})
            await self._roundtrip(server, client, {"reply": n})
            await client.close(self.timeout)
            if self.reliable:
                await _aexpect(ConnectionClosed, server.recv(timeout=self.timeout))
            await server.close(self.timeout)

    def test_listener_close(self, tmp_path: Path) -> None:
        """After close(), accept raises ChannelClosed and the address can be listened on
        again."""
        self._require_listener()
        self._run(self._t_listener_close, tmp_path)

    async def _t_listener_close(self, tmp_path: Path) -> None:
        listener = await self.aopen_listener(self.url(tmp_path), "json")
        self.adefer(listener.close)
        address = listener.address
        await listener.close()
        await listener.close()
        await _aexpect(ChannelClosed, listener.accept(timeout=0.1))
        again = await self.aopen_listener(address, "json")
        self.adefer(again.close)

    def test_address_in_use(self, tmp_path: Path) -> None:
        """Listening where a listener is already open raises AddressInUse, and leaves the
        first listener working."""
        self._require_listener()
        self._run(self._t_address_in_use, tmp_path)

    async def _t_address_in_use(self, tmp_path: Path) -> None:
        listener = await self.aopen_listener(self.url(tmp_path), "json")
        self.adefer(listener.close)
        await _aexpect(AddressInUse, self.aopen_listener(listener.address, "json"))
        accepting = self.task(listener.accept(timeout=self.timeout))
        client = await self.aopen_client(listener.address, "json")
        self.adefer(client.close, 1.0)
        server: AsyncChannel = await self.finish(accepting)
        self.adefer(server.close, 1.0)
        await self._roundtrip(client, server, "still listening")
