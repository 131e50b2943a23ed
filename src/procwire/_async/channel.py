"""Channels and listeners (asyncio). The blocking twin, ``procwire/_sync/channel.py``, is
generated from this file by ``scripts/unasync.py``: edit here, then run the script."""

from __future__ import annotations

import logging
from collections import deque
from types import TracebackType
from typing import Any

from .._backend import asleep
from .._errors import (
    AuthenticationError,
    ChannelClosed,
    ConnectionClosed,
    InsecureError,
    ProtocolError,
    Timeout,
)
from .._url import Address, transport_for
from ..codecs import Codec, get_codec
from ..protocol.framing import DEFAULT_MAX_FRAME_SIZE
from ..transports._sockstream import deadline_of, remaining
from ..transports.base import (
    DEFAULT_INBOX,
    DEFAULT_WRITE_BUFFER,
    AsyncListenerBackend,
    AsyncMessageStream,
    Failed,
    TransportOptions,
)

__all__ = ["AsyncChannel", "AsyncListener", "connect", "listen", "pipe"]

log = logging.getLogger("procwire")

DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class AsyncChannel:
    """A two-way, message-oriented connection.

    ``send(obj)`` encodes with the channel's codec and writes (or queues, when the peer is
    behind); ``recv(timeout=)`` returns the next message; iterating yields messages until the
    peer closes. ``close()`` flushes what is queued, then closes.
    """

    def __init__(self, stream: AsyncMessageStream, codec: Codec) -> None:
        self._stream = stream
        self._codec = codec
        self._encode = getattr(codec, "fast_encode", codec.encode)
        self._send = stream.send
        self._receive = stream.receive
        self._inbox: deque[Any] = deque()
        self._closed = False
        stream.set_converter(getattr(codec, "fast_decode", codec.decode), codec.decode)
        set_encoder = getattr(stream, "set_encoder", None)
        if set_encoder is not None:
            # The stream encodes, and its send becomes ours: one call less per message.
            set_encoder(self._encode, codec.encode)
            self.send = stream.send  # type: ignore[method-assign,assignment]

    @property
    def codec(self) -> str:
        """The codec's name."""
        return self._codec.name

    @property
    def local_address(self) -> str:
        return self._stream.local_address

    @property
    def remote_address(self) -> str:
        return self._stream.remote_address

    @property
    def reliable(self) -> bool:
        """False for datagram channels (UDP): messages may be lost or reordered."""
        return self._stream.reliable

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        """The transport's counters (e.g. UDP datagrams dropped); empty if it keeps none."""
        fn = getattr(self._stream, "stats", None)
        return dict(fn()) if fn is not None else {}

    async def send(self, obj: Any, *, timeout: float | None = None) -> None:
        """Send one message. Waits only when ``write_buffer`` bytes are already queued (the peer
        is not reading); raises ``Timeout`` if that lasts longer than ``timeout``,
        ``ConnectionClosed`` if the peer is gone, ``EncodeError`` if the codec refuses ``obj``."""
        try:
            payload = self._encode(obj)
        except Exception:
            payload = self._codec.encode(obj)  # raises the codec's typed EncodeError
        await self._send(payload, timeout)

    async def recv(self, timeout: float | None = None) -> Any:
        """The next message. ``timeout=None`` waits for as long as it takes.

        Raises ``Timeout``, ``ConnectionClosed`` once the peer closed and every message it sent
        was received, ``DecodeError`` for one undecodable message (the next call goes on with
        the next message), or ``ProtocolError`` when the byte stream is broken.
        """
        inbox = self._inbox
        if inbox:
            item = inbox.popleft()
        else:
            if self._closed:
                raise ChannelClosed("channel is closed")
            items = await self._receive(timeout)
            item = items[0]
            if len(items) > 1:
                inbox.extend(items)
                inbox.popleft()
        if type(item) is Failed:
            raise item.exc
        return item

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued message is handed to the operating system."""
        await self._stream.flush(timeout)

    async def close(self, timeout: float | None = 10.0) -> None:
        """Flush queued messages (up to ``timeout``), then close. Idempotent.

        Raises ``Timeout`` (the channel is closed all the same) when queued messages could not
        be handed over in time because the peer stopped reading; nothing is dropped silently.
        """
        if self._closed:
            return
        self._closed = True
        await self._stream.close(timeout)

    def __aiter__(self) -> AsyncChannel:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.recv()
        except (ConnectionClosed, ChannelClosed):
            raise StopAsyncIteration from None

    async def __aenter__(self) -> AsyncChannel:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.close()
        except Timeout:
            if et is None:
                raise  # otherwise the error already on its way matters more

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<{type(self).__name__} {self.local_address} -> {self.remote_address} "
                f"codec={self._codec.name} {state}>")


class AsyncListener:
    """Accepts channels: ``accept(timeout=)``, or iterate to accept forever.

    With ``auth=``, each client must pass the shared-key challenge within ``handshake_timeout``;
    a client that fails is logged and dropped, and the listener goes on with the next one.
    """

    def __init__(self, backend: AsyncListenerBackend, codec: Codec, auth: bytes | None,
                 handshake_timeout: float) -> None:
        self._backend = backend
        self._codec = codec
        self._auth = auth
        self._handshake_timeout = handshake_timeout
        self._closed = False

    @property
    def address(self) -> str:
        """The real bound address, e.g. ``tcp://127.0.0.1:54321`` after binding port 0."""
        return self._backend.address

    def stats(self) -> dict[str, Any]:
        """The transport's counters for this listener; empty if it keeps none."""
        fn = getattr(self._backend, "stats", None)
        return dict(fn()) if fn is not None else {}

    async def accept(self, timeout: float | None = None) -> AsyncChannel:
        """The next client's channel; raises ``Timeout`` or ``ChannelClosed``."""
        deadline = deadline_of(timeout)
        while True:
            stream = await self._backend.accept(remaining(deadline))
            if self._auth is None:
                return AsyncChannel(stream, self._codec)
            from .._auth import aserver_handshake

            try:
                await aserver_handshake(stream, self._auth, self._handshake_timeout)
            except (AuthenticationError, ConnectionClosed, ProtocolError, Timeout) as exc:
                log.warning("procwire: dropped client %s: %s", stream.remote_address, exc)
                await stream.close(0)
                continue
            return AsyncChannel(stream, self._codec)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._backend.close()

    def __aiter__(self) -> AsyncListener:
        return self

    async def __anext__(self) -> AsyncChannel:
        try:
            return await self.accept()
        except ChannelClosed:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> AsyncListener:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}>"


def _options(max_frame_size: int, auth: str | bytes | None, insecure: bool, write_buffer: int,
             inbox: int, backlog: int, extra: dict[str, Any]) -> TransportOptions:
    key = auth.encode() if isinstance(auth, str) else auth
    if key is not None and not key:
        raise ValueError("auth key must not be empty")
    return TransportOptions(max_frame_size=max_frame_size, auth=key, insecure=insecure,
                            write_buffer=write_buffer, inbox=inbox, backlog=backlog,
                            extra=extra)


def _check_codec(codec: Codec, module: Any, opts: TransportOptions, addr: Address) -> None:
    allowed = getattr(module, "CODECS", None)
    if allowed is not None and codec.name not in allowed:
        raise ValueError(f"{addr.scheme}:// carries only the {' or '.join(allowed)} codec, "
                         f"not {codec.name}")
    if codec.safe or opts.auth or getattr(module, "LOCAL_ONLY", False):
        return
    if getattr(module, "peer_authenticated", lambda o: False)(opts):
        return
    raise InsecureError(f"the {codec.name} codec runs code chosen by the sender; refused on "
                        f"{addr.scheme}:// without auth= (pass auth=KEY, or use json/msgpack)")


async def connect(url: str, *, codec: str | Codec = "json", timeout: float | None = None,
                  retry: bool = False, auth: str | bytes | None = None,
                  max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                  write_buffer: int = DEFAULT_WRITE_BUFFER, inbox: int = DEFAULT_INBOX,
                  handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                  **options: Any) -> AsyncChannel:
    """Connect to a listener at ``url``.

    ``timeout`` bounds the whole connect (with ``retry``, all attempts; ``retry=True`` with no
    timeout retries for 30 s). ``retry`` keeps trying with exponential backoff (10 ms to 1 s)
    while nothing listens yet. Transport options (``cafile=``, ``certfile=``...) pass through.
    """
    addr = Address.parse(url)
    module = transport_for(addr.scheme)
    cod = get_codec(codec)
    opts = _options(max_frame_size, auth, False, write_buffer, inbox, 0, options)
    _check_codec(cod, module, opts, addr)
    deadline = deadline_of(30.0 if timeout is None and retry else timeout)
    delay = 0.01
    attempts = 0
    while True:
        attempts += 1
        try:
            stream = await module.aconnect(addr, opts, remaining(deadline))
            break
        except ConnectionClosed as exc:
            if not retry or exc.reason != "refused":
                raise
            left = remaining(deadline)
            if left is not None and left <= 0:
                raise type(exc)(f"{exc} (gave up after {attempts} attempts)") from exc
            await asleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 1.0)
    if opts.auth is not None:
        from .._auth import aclient_handshake

        left = remaining(deadline)
        try:
            await aclient_handshake(stream, opts.auth,
                                    handshake_timeout if left is None else min(left,
                                                                               handshake_timeout))
        except BaseException:
            await stream.close(0)
            raise
    return AsyncChannel(stream, cod)


async def listen(url: str, *, codec: str | Codec = "json", auth: str | bytes | None = None,
                 insecure: bool = False, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 write_buffer: int = DEFAULT_WRITE_BUFFER, inbox: int = DEFAULT_INBOX,
                 backlog: int = 128, handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 **options: Any) -> AsyncListener:
    """Listen at ``url`` (``tcp://127.0.0.1:0`` picks a free port: see ``.address``).

    ``auth=KEY`` requires every client to prove it knows KEY (HMAC-SHA256 challenge, both
    ways). A non-loopback TCP address without ``auth`` or TLS is refused unless
    ``insecure=True``.
    """
    addr = Address.parse(url)
    module = transport_for(addr.scheme)
    cod = get_codec(codec)
    opts = _options(max_frame_size, auth, insecure, write_buffer, inbox, backlog, options)
    _check_codec(cod, module, opts, addr)
    backend = await module.alisten(addr, opts)
    return AsyncListener(backend, cod, opts.auth, handshake_timeout)


async def pipe(*, codec: str | Codec = "json", max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
               write_buffer: int = DEFAULT_WRITE_BUFFER,
               inbox: int = DEFAULT_INBOX) -> tuple[AsyncChannel, AsyncChannel]:
    """Two connected channels over a socketpair (hand one to a child process or a thread)."""
    from ..transports import fd

    cod = get_codec(codec)
    opts = _options(max_frame_size, None, False, write_buffer, inbox, 0, {})
    a, b = await fd.apair(opts)
    return AsyncChannel(a, cod), AsyncChannel(b, get_codec(codec))
