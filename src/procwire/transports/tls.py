"""``tls://host:port``: TCP with TLS (certificates verified by default).

Options (keyword arguments of ``procwire.listen`` / ``procwire.connect``):

``certfile``, ``keyfile``
    This side's certificate chain and key (PEM). Required to listen; on a client they are the
    client certificate for mutual TLS.
``cafile``
    CA bundle (PEM) to verify the peer. On a client it replaces the system CAs; on a listener it
    turns on mutual TLS: every client must then present a certificate signed by it.
``ssl_context``
    A ready ``ssl.SSLContext`` used as is (the options above are then not allowed).
``server_hostname``
    Client only: the name the server certificate must carry (default: the URL's host).
``tls_confirm``
    Client only, default True: under TLS 1.3 wait for the server's verdict (see below).
``tls_timeout``
    Seconds a TLS handshake may take (default 10). A listener handshakes each client inside
    ``accept``, one at a time, so a silent client holds the next ones back for at most this long.

A client whose handshake fails (unknown CA, wrong name, no client certificate for a mutual-TLS
listener) gets ``AuthenticationError``; the listener logs and drops it and keeps serving.

The blocking stream runs TLS as a sans-IO layer (``ssl.MemoryBIO`` + ``SSLObject``): one lock
guards the TLS state while the socket reads and writes happen outside it, so the framed
stream's reader and its flusher thread can work at the same time (an ``SSLSocket`` cannot be
used by two threads at once). The asyncio stream uses asyncio's own TLS support.

With TLS 1.3 a server checks the client certificate only after the client considers the
handshake finished. So that a refusal (no or wrong client certificate) fails ``connect`` with
``AuthenticationError`` rather than the first ``recv``, a TLS 1.3 client then waits for the
server's first record: a session ticket, which OpenSSL-based servers (procwire's included) send
at once, or the alert. For a server that sends no tickets (``num_tickets = 0``) and does not
speak first, pass ``tls_confirm=False``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import select
import socket
import ssl
import threading
from typing import Any, cast

from .._errors import (
    AddressError,
    AuthenticationError,
    ChannelClosed,
    ConnectionClosed,
    ProcwireError,
    Timeout,
)
from .._url import Address, format_inet
from ._sockets import aconnect_socket, attach_async, connect_socket
from ._sockstream import (
    AsyncFramedStream,
    FramedStream,
    SocketWire,
    closed_error,
    deadline_of,
    remaining,
)
from .base import Buffer, TransportOptions
from .tcp import bind, configure, describe, family_of

__all__ = ["TLSWire", "aconnect", "alisten", "connect", "listen", "peer_authenticated"]

LOCAL_ONLY = False
SCHEME = "tls"
DEFAULT_TLS_TIMEOUT = 10.0

log = logging.getLogger("procwire")

_OPTIONS = {"certfile", "keyfile", "cafile", "ssl_context", "server_hostname", "tls_timeout",
            "tls_confirm", "reuse_port"}
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_DONTWAIT = _SEND_FLAGS | getattr(socket, "MSG_DONTWAIT", 0)
# Plaintext encrypted per step: bounds the ciphertext held in user space to about this much
# (plus what the reader side produces), whatever the message size.
_CHUNK = 256 * 1024
_RECV = 256 * 1024


# -- contexts -------------------------------------------------------------------------------

def _check(opts: TransportOptions, *, server: bool) -> None:
    unknown = set(opts.extra) - _OPTIONS
    if unknown:
        raise AddressError(f"unknown option(s) for tls://: {', '.join(sorted(unknown))}")
    ctx = opts.extra.get("ssl_context")
    if ctx is not None:
        if not isinstance(ctx, ssl.SSLContext):
            raise AddressError(f"ssl_context must be an ssl.SSLContext, not {type(ctx).__name__}")
        clash = {"certfile", "keyfile", "cafile"} & set(opts.extra)
        if clash:
            raise AddressError(f"ssl_context= and {', '.join(sorted(clash))}= are exclusive: "
                               "load them into the context")
    for name in ("server_hostname", "tls_confirm"):
        if server and name in opts.extra:
            raise AddressError(f"{name}= is a client option")


def _load_error(what: str, exc: BaseException) -> AddressError:
    err = AddressError(f"tls://: cannot load {what}: {exc}")
    err.__cause__ = exc
    return err


def server_context(opts: TransportOptions) -> ssl.SSLContext:
    """The listener's context: ``ssl_context=``, or one built from the file options."""
    ctx = opts.extra.get("ssl_context")
    if isinstance(ctx, ssl.SSLContext):
        return ctx
    certfile = opts.extra.get("certfile")
    if not certfile:
        raise AddressError("tls:// listen needs certfile= (and keyfile= unless the key is in "
                           "the same file), or ssl_context=")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(certfile, opts.extra.get("keyfile"))
    except (OSError, ssl.SSLError) as exc:
        raise _load_error(f"certificate {certfile}", exc) from exc
    cafile = opts.extra.get("cafile")
    if cafile:
        try:
            ctx.load_verify_locations(cafile)
        except (OSError, ssl.SSLError) as exc:
            raise _load_error(f"CA file {cafile}", exc) from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(opts: TransportOptions) -> ssl.SSLContext:
    """The client's context: ``ssl_context=``, or verification against ``cafile`` (default:
    the system CAs) plus an optional client certificate."""
    ctx = opts.extra.get("ssl_context")
    if isinstance(ctx, ssl.SSLContext):
        return ctx
    cafile = opts.extra.get("cafile")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise _load_error(f"CA file {cafile}", exc) from exc
    certfile = opts.extra.get("certfile")
    if certfile:
        try:
            ctx.load_cert_chain(certfile, opts.extra.get("keyfile"))
        except (OSError, ssl.SSLError) as exc:
            raise _load_error(f"certificate {certfile}", exc) from exc
    return ctx


def peer_authenticated(opts: TransportOptions) -> bool:
    """True when mutual TLS is configured: the peer must prove itself with a certificate.

    With ``ssl_context=``: the context requires the peer's certificate. Otherwise: both a
    ``cafile`` (to check the peer) and a ``certfile`` (to be checked) are given.
    """
    ctx = opts.extra.get("ssl_context")
    if isinstance(ctx, ssl.SSLContext):
        return ctx.verify_mode == ssl.CERT_REQUIRED
    return bool(opts.extra.get("cafile")) and bool(opts.extra.get("certfile"))


def _tls_timeout(opts: TransportOptions) -> float:
    value = opts.extra.get("tls_timeout", DEFAULT_TLS_TIMEOUT)
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise AddressError(f"tls_timeout must be a number of seconds, not {value!r}") from None
    if not t > 0:
        raise AddressError("tls_timeout must be > 0")
    return t


def _handshake_error(exc: BaseException, peer: str) -> AuthenticationError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = f"TLS: cannot verify the {peer}'s certificate: {exc.verify_message or exc}"
    elif isinstance(exc, ssl.SSLEOFError):
        msg = f"TLS handshake failed: the {peer} closed the connection (not speaking TLS?)"
    elif isinstance(exc, ssl.SSLError):
        msg = f"TLS handshake failed: {exc.reason or exc}"
    else:
        msg = f"TLS handshake failed: {exc}"
    err = AuthenticationError(msg)
    err.__cause__ = exc
    return err


# -- the blocking wire ----------------------------------------------------------------------

class TLSWire(SocketWire):
    """TLS over a connected socket, for ``FramedStream``: the ``SocketWire`` methods, thread
    safe between one reader and one writer.

    ``_lock`` guards the ``SSLObject``, its BIOs and the ciphertext queue ``_out``; socket I/O
    happens outside it. ``_wlock`` is held by the one thread writing ``_out`` to the socket,
    so ciphertext leaves in the order TLS produced it. When ``try_send`` had to leave part of a
    chunk's ciphertext queued it reports that chunk unsent and remembers its length in
    ``_skip``: the caller offers those bytes again (to ``send_all``), which skips them, since
    they are already encrypted, and pushes the queued ciphertext first.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        super().__init__(sock)
        self._in = ssl.MemoryBIO()
        self._outbio = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._in, self._outbio, server_side=server_side,
                                 server_hostname=None if server_side else server_hostname)
        self._server_side = server_side
        self._lock = threading.Lock()
        self._wlock = threading.Lock()
        self._out = bytearray()
        self._skip = 0
        self._plain = bytearray()  # application data read while confirming the handshake
        self._rbuf = bytearray(_RECV)
        self._wpoller = select.poll()
        self._wpoller.register(sock.fileno(), select.POLLOUT)
        self._close_sent = False

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._ssl

    # -- internals (callers hold _lock where noted) ---------------------------------------
    def _collect(self) -> None:
        # _lock held: move what TLS produced to the ordered ciphertext queue.
        if self._outbio.pending:
            self._out += self._outbio.read()

    def _push_nowait(self) -> bool:
        """Write queued ciphertext without blocking; True when none is left."""
        if not self._wlock.acquire(blocking=False):
            return False
        try:
            while True:
                with self._lock:
                    if not self._out:
                        return True
                    chunk = bytes(self._out[:_RECV * 4])
                try:
                    n = self.sock.send(chunk, _DONTWAIT)
                except BlockingIOError:
                    n = 0
                with self._lock:
                    del self._out[:n]
                if n < len(chunk):
                    return False
        finally:
            self._wlock.release()

    def _push_blocking(self) -> None:
        while True:
            with self._wlock:
                while True:
                    with self._lock:
                        if not self._out:
                            break
                        chunk = bytes(self._out[:_RECV * 4])
                    self.sock.sendall(chunk, _SEND_FLAGS)
                    with self._lock:
                        del self._out[:len(chunk)]
            # The reader may have queued bytes after our last look and failed to take _wlock.
            with self._lock:
                if not self._out:
                    return

    def _fill(self, deadline: float | None, what: str) -> None:
        """Read ciphertext from the socket into TLS (handshake time only)."""
        left = remaining(deadline)
        if left is not None and not self._poller.poll(math.ceil(left * 1000)):
            raise Timeout(what)
        try:
            n = self.sock.recv_into(self._rbuf)
        except OSError as exc:
            raise closed_error(exc) from exc
        with self._lock:
            if n:
                self._in.write(memoryview(self._rbuf)[:n])
            else:
                self._in.write_eof()

    def _push_until(self, deadline: float | None, what: str) -> None:
        while not self._push_nowait():
            left = remaining(deadline)
            if not self._wpoller.poll(-1 if left is None else math.ceil(left * 1000)):
                raise Timeout(what)

    # -- handshake ------------------------------------------------------------------------
    def handshake(self, timeout: float, *, confirm: bool = False) -> None:
        """Run the TLS handshake; ``AuthenticationError`` when it fails, ``Timeout``.

        ``confirm`` (client): under TLS 1.3 also wait for the server's first record after the
        handshake, which is an alert if the server rejected our certificate.
        """
        deadline = deadline_of(timeout)
        what = f"TLS handshake not finished within {timeout:.3g} s"
        peer = "client" if self._server_side else "server"
        while True:
            failure: ssl.SSLError | None = None
            with self._lock:
                try:
                    self._ssl.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLError as exc:
                    failure = exc
                    done = False
                self._collect()
            try:
                self._push_until(deadline, what)
            except (OSError, Timeout):
                if failure is None:
                    raise
            if failure is not None:
                raise _handshake_error(failure, peer)
            if done:
                break
            self._fill(deadline, what)
        if confirm and not self._server_side and self._ssl.version() == "TLSv1.3":
            self._confirm(deadline, what)

    def _confirm(self, deadline: float | None, what: str) -> None:
        while True:
            with self._lock:
                try:
                    self._plain += self._ssl.read(_CHUNK)
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError) as exc:
                    raise AuthenticationError("the server closed the connection right after "
                                              "the TLS handshake (certificate refused?)") from exc
                except ssl.SSLError as exc:
                    raise _handshake_error(exc, "server") from exc
                finally:
                    self._collect()
                session = self._ssl.session
                if self._plain or (session is not None and session.has_ticket):
                    return
            self._fill(deadline, what)

    # -- SocketWire interface -------------------------------------------------------------
    def try_send(self, data: Buffer) -> int:
        return self.try_send_parts([data])

    def try_send_parts(self, parts: list[Buffer]) -> int:
        with self._lock:
            if self._skip:
                return 0  # the caller still owes send_all() the bytes we reported unsent
            busy = bool(self._out)
        if busy and not self._push_nowait():
            return 0
        sent = 0
        for chunk in _chunks(parts):
            with self._lock:
                self._ssl.write(chunk)
                self._collect()
            if not self._push_nowait():
                with self._lock:
                    self._skip = len(chunk)
                return sent
            sent += len(chunk)
        return sent

    def send_all(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        with self._lock:
            skip = min(self._skip, len(view))
            self._skip -= skip
        self._push_blocking()
        for start in range(skip, len(view), _CHUNK):
            with self._lock:
                self._ssl.write(view[start:start + _CHUNK])
                self._collect()
            self._push_blocking()

    def recv_into(self, view: memoryview, timeout: float | None) -> int:
        deadline = deadline_of(timeout)
        while True:
            with self._lock:
                if self._plain:
                    n = min(len(view), len(self._plain))
                    view[:n] = self._plain[:n]
                    del self._plain[:n]
                    return n
                try:
                    # With a buffer, read() returns a count (typeshed says bytes).
                    n = cast(int, self._ssl.read(len(view), view))  # type: ignore[arg-type]
                except ssl.SSLWantReadError:
                    n = -1
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    n = 0  # close_notify, or the socket ended without one: EOF either way
                produced = bool(self._outbio.pending)
                self._collect()
            if produced:
                # A post-handshake reply (a TLS 1.3 key update): never block the reader on it;
                # if the writer is busy, it sends these bytes after its own.
                self._push_nowait()
            if n >= 0:
                return n
            left = remaining(deadline)
            if left is not None and not self._poller.poll(math.ceil(left * 1000)):
                raise Timeout(f"no message within {timeout} s")
            got = self.sock.recv_into(self._rbuf)
            with self._lock:
                if got:
                    self._in.write(memoryview(self._rbuf)[:got])
                else:
                    self._in.write_eof()

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and not self._close_sent:
            self._close_sent = True
            with self._lock:
                try:
                    self._ssl.unwrap()  # queues close_notify; the peer's is not awaited
                except (ssl.SSLError, ValueError):
                    pass
                self._collect()
            try:
                self._push_nowait()
            except OSError:
                pass
        super().shutdown(how)


def _chunks(parts: list[Buffer]) -> Any:
    """Split the concatenation of ``parts`` into chunks of at most ``_CHUNK`` bytes, joining
    small pieces (a frame header) to the next one so they share a TLS record."""
    acc = bytearray()
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            if not acc and len(view) >= _CHUNK:
                yield view[:_CHUNK]
                view = view[_CHUNK:]
                continue
            take = _CHUNK - len(acc)
            acc += view[:take]
            view = view[take:]
            if len(acc) == _CHUNK:
                yield acc
                acc = bytearray()
    if acc:
        yield acc


# -- blocking listener and client -----------------------------------------------------------

class TLSListener:
    """Accepts TCP connections and completes each TLS handshake inside ``accept``; a client
    that fails it is logged and dropped, and ``accept`` goes on with the next."""

    def __init__(self, sock: socket.socket, opts: TransportOptions, address: str,
                 ctx: ssl.SSLContext) -> None:
        self._sock = sock
        self._opts = opts
        self.address = address
        self._ctx = ctx
        self._tls_timeout = _tls_timeout(opts)
        self._describe = describe(SCHEME)
        self._closed = False
        self._lock = threading.Lock()
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None = None) -> FramedStream:
        deadline = deadline_of(timeout)
        while True:
            if self._closed:
                raise ChannelClosed("listener is closed")
            left = remaining(deadline)
            if not self._poller.poll(-1 if left is None else math.ceil(left * 1000)):
                raise Timeout(f"no connection within {timeout} s")
            if self._closed:
                raise ChannelClosed("listener is closed")
            try:
                conn, peer = self._sock.accept()
            except BlockingIOError:
                continue  # another thread took it
            except OSError as exc:
                if self._closed:
                    raise ChannelClosed("listener is closed") from exc
                raise
            remote = self._describe(peer)
            left = remaining(deadline)
            try:
                configure(conn)
                wire = TLSWire(conn, self._ctx, server_side=True)
            except BaseException:
                conn.close()
                raise
            try:
                wire.handshake(self._tls_timeout if left is None
                               else max(min(left, self._tls_timeout), 0.001))
            except (ProcwireError, OSError) as exc:
                log.warning("procwire: dropped TLS client %s: %s", remote, exc)
                wire.shutdown(socket.SHUT_RDWR)
                wire.close()
                continue
            except BaseException:
                wire.close()
                raise
            return FramedStream(wire, self._opts, local_address=self.address,
                                remote_address=remote)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept
        except OSError:
            pass
        self._sock.close()


def listen(addr: Address, opts: TransportOptions) -> TLSListener:
    """Listen for TLS clients (blocking API)."""
    _check(opts, server=True)
    ctx = server_context(opts)
    _tls_timeout(opts)
    sock = bind(addr, opts)
    host, port = sock.getsockname()[:2]
    return TLSListener(sock, opts, format_inet(SCHEME, host, port), ctx)


def _client_setup(addr: Address, opts: TransportOptions) -> tuple[ssl.SSLContext, str, bool]:
    _check(opts, server=False)
    ctx = client_context(opts)
    hostname = str(opts.extra.get("server_hostname") or addr.host)
    return ctx, hostname, bool(opts.extra.get("tls_confirm", True))


def connect(addr: Address, opts: TransportOptions, timeout: float | None) -> FramedStream:
    """Connect and complete the TLS handshake (blocking API)."""
    ctx, hostname, confirm = _client_setup(addr, opts)
    tls_timeout = _tls_timeout(opts)
    deadline = deadline_of(timeout)
    sock = connect_socket(family_of(addr.host), (addr.host, addr.port), timeout, configure)
    try:
        wire = TLSWire(sock, ctx, server_side=False, server_hostname=hostname)
    except BaseException:
        sock.close()
        raise
    try:
        left = remaining(deadline)
        wire.handshake(tls_timeout if left is None else min(left, tls_timeout), confirm=confirm)
        local = sock.getsockname()
    except BaseException:
        wire.shutdown(socket.SHUT_RDWR)
        wire.close()
        raise
    return FramedStream(wire, opts, local_address=format_inet(SCHEME, *local[:2]),
                        remote_address=format_inet(SCHEME, addr.host, addr.port or 0))


# -- asyncio --------------------------------------------------------------------------------

class AsyncTLSListener:
    """asyncio twin of ``TLSListener`` (asyncio's TLS support does the handshake)."""

    def __init__(self, sock: socket.socket, opts: TransportOptions, address: str,
                 ctx: ssl.SSLContext) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._opts = opts
        self.address = address
        self._ctx = ctx
        self._tls_timeout = _tls_timeout(opts)
        self._describe = describe(SCHEME)
        self._closed = False

    async def accept(self, timeout: float | None = None) -> AsyncFramedStream:
        loop = asyncio.get_running_loop()
        deadline = deadline_of(timeout)
        while True:
            if self._closed:
                raise ChannelClosed("listener is closed")
            try:
                async with asyncio.timeout(remaining(deadline)):
                    conn, peer = await loop.sock_accept(self._sock)
            except TimeoutError:
                raise Timeout(f"no connection within {timeout} s") from None
            except OSError as exc:
                if self._closed:
                    raise ChannelClosed("listener is closed") from exc
                raise
            remote = self._describe(peer)
            left = remaining(deadline)
            hs = self._tls_timeout if left is None else max(min(left, self._tls_timeout), 0.001)
            try:
                configure(conn)
                return await attach_async(conn, self._opts, self.address, remote,
                                          ssl_context=self._ctx, server_side=True, timeout=hs)
            except (OSError, ProcwireError) as exc:  # ssl.SSLError and TimeoutError included
                log.warning("procwire: dropped TLS client %s: %s", remote, exc or type(exc))
                conn.close()
            except BaseException:
                conn.close()
                raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()


async def alisten(addr: Address, opts: TransportOptions) -> AsyncTLSListener:
    """Listen for TLS clients (asyncio API)."""
    _check(opts, server=True)
    ctx = server_context(opts)
    _tls_timeout(opts)
    sock = bind(addr, opts)
    host, port = sock.getsockname()[:2]
    return AsyncTLSListener(sock, opts, format_inet(SCHEME, host, port), ctx)


async def aconnect(addr: Address, opts: TransportOptions,
                   timeout: float | None) -> AsyncFramedStream:
    """Connect and complete the TLS handshake (asyncio API)."""
    ctx, hostname, confirm = _client_setup(addr, opts)
    tls_timeout = _tls_timeout(opts)
    deadline = deadline_of(timeout)
    sock = await aconnect_socket(family_of(addr.host), (addr.host, addr.port), timeout,
                                 configure)
    left = remaining(deadline)
    hs = tls_timeout if left is None else max(min(left, tls_timeout), 0.001)
    local = format_inet(SCHEME, *sock.getsockname()[:2])
    try:
        stream = await attach_async(sock, opts, local,
                                    format_inet(SCHEME, addr.host, addr.port or 0),
                                    ssl_context=ctx, server_hostname=hostname, timeout=hs)
    except ssl.SSLError as exc:
        sock.close()
        raise _handshake_error(exc, "server") from exc
    except (ConnectionAbortedError, TimeoutError) as exc:
        sock.close()
        raise Timeout(f"TLS handshake not finished within {hs:.3g} s") from exc
    except OSError as exc:
        sock.close()
        err = AuthenticationError(f"TLS handshake failed: {exc} (not a TLS server?)")
        raise err from exc
    except BaseException:
        sock.close()
        raise
    if confirm:
        try:
            await _aconfirm(stream, deadline_of(hs))
        except BaseException:
            await stream.close(0)
            raise
    return stream


async def _aconfirm(stream: AsyncFramedStream, deadline: float | None) -> None:
    # asyncio reports no event for a TLS 1.3 session ticket: look for it every few ms, bounded
    # by the handshake deadline.
    transport = stream._transport
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None or sslobj.version() != "TLSv1.3":
        return
    while True:
        session = sslobj.session
        if session is not None and session.has_ticket:
            return
        if transport.is_closing():
            try:
                items = await stream.receive(0)
            except ConnectionClosed as exc:
                cause = exc.__cause__ or exc
                raise _handshake_error(cause, "server") from exc
            except Timeout:
                items = []
            if items:
                stream.unreceive(items)
                return
            raise AuthenticationError("the server closed the connection right after the TLS "
                                      "handshake (client certificate rejected?)")
        left = remaining(deadline)
        if left == 0.0:
            raise Timeout("TLS handshake not confirmed by the server in time")
        await asyncio.sleep(0.002)
