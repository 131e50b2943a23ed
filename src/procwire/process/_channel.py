"""The parent/child message channel (blocking): Node's IPC protocol, or JSON lines on stdio."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import msgspec

from .._errors import (
    ChannelClosed,
    ConnectionClosed,
    EncodeError,
    FrameTooLarge,
    ProtocolError,
    Timeout,
)
from ..codecs import JsonCodec
from ..protocol.framing import DEFAULT_MAX_FRAME_SIZE
from ..protocol.lines import JsonLines, StrictLinesDecoder
from ..transports._sockstream import FramedStream, deadline_of, remaining
from ..transports.base import Failed, TransportOptions, convert_all
from ._node import HandleProtocol, check_handle_size, make_handle_message
from ._wire import _ANC_SIZE, _DONTWAIT, _RECV_FLAGS, HandleWire

__all__ = ["IpcChannel", "node_stream"]

log = logging.getLogger("procwire.process")
_monotonic = time.monotonic
_perf = time.perf_counter
# Larger payloads go out with gather writes and no copy (``FramedStream._send_large``).
_SMALL_LINE = 16 * 1024
_READ_SIZE = 64 * 1024  # a read that bypasses the decoder (NodeStream.receive)


class CodecLines(JsonLines):
    """JSON lines whose payloads all come from procwire's json codec, which never writes a raw
    newline (JSON escapes it inside strings): framing skips that check, a cost paid on every
    message of a request/reply. Received lines are split by ``StrictLinesDecoder``: on Node's
    IPC channel every message ends with a newline (Node writes ``JSON.stringify(m) + "\\n"``
    and reads the same way), so the lenient decoder's search for values without one is
    wasted; a line that is not exactly one JSON value is that message's ``DecodeError``."""

    def decoder(self) -> StrictLinesDecoder:  # type: ignore[override]
        return StrictLinesDecoder(self.max_frame_size)

    def frame(self, payload: bytes | bytearray | memoryview) -> bytes:
        if len(payload) > self.max_frame_size:
            raise FrameTooLarge(len(payload), self.max_frame_size)
        return bytes(payload) + b"\n"

    def frame_parts(self, payload: bytes | bytearray | memoryview
                    ) -> list[bytes | bytearray | memoryview]:
        if len(payload) > self.max_frame_size:
            raise FrameTooLarge(len(payload), self.max_frame_size)
        return [payload, b"\n"]


class NodeStream(FramedStream):
    """``FramedStream`` on a ``HandleWire``, with the short paths of a plain socket.

    A request/reply over a parent/child channel pays the library's per-message cost on every
    hop, and right after a wake-up (cold caches) each Python call costs several times its warm
    price. So: a blocking ``receive`` with nothing pending is one ``recvmsg`` and, when it
    returns exactly one line, one decode of those bytes; otherwise they go through the
    decoder (several lines, part of a line, blank lines, a line that is not JSON), and while
    it holds part of a line the next reads go straight into its buffer. End of file, a fork
    or a poll (``timeout=0``) take ``FramedStream``'s general path. ``send_reply`` sends a
    reply (the first send after a receive) with one encode and one write; ``send`` (bursts,
    queueing, large messages) is ``FramedStream``'s, which here writes to the socket
    directly as for a plain socket (a ``HandleWire`` is one, with descriptor passing on
    top).
    """

    def __init__(self, wire: HandleWire, opts: TransportOptions, *, local_address: str,
                 remote_address: str) -> None:
        super().__init__(wire, opts, local_address=local_address,
                         remote_address=remote_address,
                         framing=CodecLines(opts.max_frame_size))
        self._hwire = wire
        self._recvmsg = wire.sock.recvmsg
        self._recvmsg_into = wire.sock.recvmsg_into
        self._clean = True  # the decoder holds no byte: the next read may bypass it
        lines = self._dec
        assert isinstance(lines, StrictLinesDecoder)
        self._lines = lines
        self._line_limit = opts.max_frame_size + 1  # a whole line read as bytes, "\n" included
        self._sock_send = self._send_now = wire.sock.send
        # JSON only (the framing's premise): the fast path encodes with msgspec itself and
        # leaves errors, and the NaN check, to the codec.
        self._json = msgspec.json.Encoder().encode
        self._checked_encode = JsonCodec().encode
        self.set_encoder(self._checked_encode)

    def send_reply(self, obj: Any, timeout: float | None = None) -> None:
        """``send`` of a reply, for a caller that saw ``_last_send == 0.0`` (a receive came
        since the last send) and ``_idle`` (nothing queued): encoded and written here in one
        go, with ``send``'s semantics (a send right after it starts a burst; what the kernel
        does not take is queued)."""
        try:
            payload = self._json(obj)
        except Exception:
            payload = self._checked_encode(obj)  # raises the codec's EncodeError
        if b"null" in payload:
            payload = self._checked_encode(obj)  # refuses NaN and infinities (msgspec: null)
        self._messages += 1
        n = len(payload)
        if n > _SMALL_LINE or n > self._max:
            return self._send_large(payload, timeout)
        data = payload + b"\n"
        with self._wlock:
            if self._idle:
                self._last_send = _perf()  # a send right after this one starts a burst
                try:
                    sent = self._send_now(data, _DONTWAIT)
                    self._writes += 1
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise self._fail_write(exc) from exc
                if sent == len(data):
                    return None
                self._append(memoryview(data)[sent:], timeout)
            else:
                self._append(data, timeout)  # another thread queued meanwhile: behind it
        return None

    def receive(self, timeout: float | None = None) -> list[Any]:
        """At least one message (converted), or raises ConnectionClosed / Timeout."""
        if not self._idle:
            self._flush_before_wait()
        with self._rlock:
            if self._pending or self._eof is not None or self._forked:
                return self._slow(timeout)
            wire = self._hwire
            if timeout != wire.asked_timeout:
                if timeout is not None and timeout <= 0:
                    return self._slow(timeout)  # a poll, no read
                wire.set_rcvtimeo(timeout)  # a syscall only when it changes by over 1%
            if not self._clean:
                return self._read_more(timeout)
            # The decoder holds nothing: read as bytes; when they are one whole line (every
            # hop of a request/reply), decode them as they are (JSON allows the whitespace
            # around a value, "\n" included) and leave the decoder out.
            try:
                data, anc, _flags, _addr = self._recvmsg(_READ_SIZE, _ANC_SIZE, _RECV_FLAGS)
            except BlockingIOError:
                raise Timeout(f"no message within {timeout} s") from None
            except OSError as exc:
                raise self._read_failed(exc) from exc
            if anc:
                wire.fds.take_anc(anc)
            n = len(data)
            if n == 0:
                return self._at_eof()
            if data[-1] == 10 and n <= self._line_limit and data.find(b"\n", 0, n - 1) < 0:
                try:
                    item = self._convert(data)
                except Exception:
                    pass  # a blank line, or not one value: the decoder says which
                else:
                    # Something arrived: the next send answers it, so it is written at once
                    # even if it follows our previous send closely (a reply is no burst).
                    self._last_send = 0.0
                    return [item]
            return self._take(data, timeout)

    def _take(self, data: bytes, timeout: float | None) -> list[Any]:
        # _rlock held: bytes read past the decoder that were not one whole line.
        dec = self._lines
        out: list[Any] = []
        view = memoryview(data)
        try:
            while view:
                buf = dec.get_buffer()
                k = min(len(buf), len(view))
                buf[:k] = view[:k]
                view = view[k:]
                frames = dec.buffer_updated(k)
                if frames:  # converted now: the next get_buffer() may move the bytes
                    out += convert_all(frames, self._convert, self._safe_convert)
        except ProtocolError as exc:
            self._bad_input(exc)  # a line too long: after the lines before it, if any
            if not out:
                raise
            return out
        self._clean = dec.buffered() == 0
        if not out:
            return self._read_more(timeout)  # blank lines, or part of a line
        self._last_send = 0.0
        return out

    def _read_more(self, timeout: float | None) -> list[Any]:
        # _rlock held; the decoder holds part of a line (or nothing yet): read into it.
        dec = self._lines
        try:
            n, anc, _flags, _addr = self._recvmsg_into([dec.get_buffer()], _ANC_SIZE,
                                                       _RECV_FLAGS)
        except BlockingIOError:
            raise Timeout(f"no message within {timeout} s") from None
        except OSError as exc:
            raise self._read_failed(exc) from exc
        except ProtocolError as exc:  # a line too long, after the lines before it
            raise self._bad_input(exc) from None
        if anc:
            self._hwire.fds.take_anc(anc)
        if n == 0:
            return self._at_eof()
        try:
            frames = dec.buffer_updated(n)
        except ProtocolError as exc:
            raise self._bad_input(exc) from None
        self._clean = dec.buffered() == 0
        if not frames:
            return self._slow(timeout)  # part of a line: wait for the rest
        self._last_send = 0.0
        convert = self._convert
        try:
            return [convert(f) for f in frames]
        except Exception:
            return convert_all(frames, convert, self._safe_convert)

    def _slow(self, timeout: float | None) -> list[Any]:
        try:
            return self._receive_slow(timeout)
        except ProtocolError as exc:
            if self._eof is None:  # the decoder's, raised by its get_buffer()
                self._bad_input(exc)
            raise
        finally:
            self._clean = self._lines.buffered() == 0

    def _bad_input(self, exc: ProtocolError) -> ProtocolError:
        # _rlock held. The stream cannot be resynchronised: every later call raises this.
        self._eof = exc
        self._fast_read = False
        self._abort()
        return exc


def node_stream(sock: socket.socket, opts: TransportOptions, *, local_address: str,
                remote_address: str) -> tuple[NodeStream, HandleWire]:
    """A JSON-lines stream over a Node IPC socket whose wire keeps received descriptors.
    Only for payloads of procwire's json codec (see ``CodecLines``)."""
    wire = HandleWire(sock)
    stream = NodeStream(wire, opts, local_address=local_address, remote_address=remote_address)
    return stream, wire


class IpcChannel:
    """A parent/child message channel: JSON values, one per line.

    On Node's IPC socket (``spawn()``'s default, and what ``parent()`` returns under Node's
    ``fork()``) it also passes handles: ``send(msg, handle=sock)``, ``recv_with_handle()``; and
    keeps Node's internal messages (``cmd`` starting with ``NODE_``) to itself.

    Thread-safe: any thread may send while another receives.
    """

    def __init__(self, stream: FramedStream, wire: HandleWire | None, *,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        codec = JsonCodec()
        self._framing = JsonLines(max_frame_size)
        self._stream = stream
        self._receive = stream.receive
        self._node_stream = stream if isinstance(stream, NodeStream) else None
        self._wire = wire
        self._codec = codec
        stream.set_converter(codec.fast_decode, codec.decode)
        stream.set_encoder(codec.encode)
        self._node = HandleProtocol(self._send_internal) if wire is not None else None
        self._inbox: deque[Any] = deque()
        self._rlock = threading.Lock()
        # Ordinary sends and handle sends must not interleave on the wire: a handle's
        # descriptor has to travel with the first byte of its own line.
        self._slock = threading.Lock()
        self._closed = False
        #: ``(target, error)`` when the peer said it could not start (see ``StartFailed``).
        self.start_error: tuple[str, str] | None = None

    @property
    def local_address(self) -> str:
        return self._stream.local_address

    @property
    def remote_address(self) -> str:
        return self._stream.remote_address

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def passes_handles(self) -> bool:
        """True on Node's IPC socket; False on stdio (pipes cannot carry descriptors)."""
        return self._wire is not None

    # -- sending ----------------------------------------------------------------------------
    def send(self, msg: Any, *, handle: Any = None, timeout: float | None = None) -> None:
        """Send one JSON value (NaN and infinities are refused with ``EncodeError``).

        ``handle``: a socket (listening or connected, TCP or UNIX; or UDP) passed along with
        the message; the peer gets its own copy (yours stays open: close it when you no longer
        need it). A Node peer receives it as ``net.Server`` / ``net.Socket`` /
        ``dgram.Socket`` in ``process.on('message', (msg, handle) => ...)``.

        Waits only when ``write_buffer`` bytes are queued (the peer is not reading), up to
        ``timeout``: then ``Timeout``. ``ConnectionClosed`` when the peer is gone.
        """
        if handle is not None:
            self._send_handle(msg, handle, timeout)
            return
        ns = self._node_stream
        with self._slock:
            # A reply (see NodeStream.send_reply); checked here, not in a call: this
            # runs for every message of a burst.
            if ns is not None and ns._last_send == 0.0 and ns._idle:
                ns.send_reply(msg, timeout)
            else:
                self._stream.send(msg, timeout)

    def _send_handle(self, msg: Any, handle: Any, timeout: float | None) -> None:
        if self._wire is None or self._node is None:
            raise EncodeError("this channel cannot pass handles (stdio pipes carry no file "
                              "descriptors): spawn the child with the default channel")
        envelope, fd = make_handle_message(msg, handle)
        payload = self._codec.encode(envelope)
        check_handle_size(len(payload))
        line = self._framing.frame(payload)
        deadline = deadline_of(timeout)
        with self._slock:
            if self._closed:
                raise ChannelClosed("channel is closed")
            self._stream.flush(remaining(deadline))
            try:
                self._wire.send_with_fds(line, [fd], remaining(deadline))
            except (Timeout, ChannelClosed):
                raise
            except OSError as exc:
                raise ConnectionClosed(f"connection closed by peer ({exc})",
                                       reason="broken pipe") from exc
            self._node.sent(envelope, fd)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued message is handed to the operating system."""
        self._stream.flush(timeout)

    # -- receiving --------------------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Any:
        """The next message. Raises ``Timeout``, ``ConnectionClosed`` once the peer is gone and
        everything it sent was received, or ``DecodeError`` for one bad line (the next call
        goes on). A handle that comes with the message is closed (with a warning): use
        ``recv_with_handle`` where handles are expected."""
        deadline = None if timeout is None else _monotonic() + timeout
        with self._rlock:
            # The common case, kept short (it runs on every hop of a request/reply): one user
            # message read from the stream.
            inbox = self._inbox
            if inbox:
                item = inbox.popleft()
            elif self._closed:
                raise ChannelClosed("channel is closed")
            else:
                items = self._receive(timeout)
                item = items[0]
                if len(items) > 1:
                    inbox.extend(items)
                    inbox.popleft()
            if type(item) is not dict or self._node is None or "cmd" not in item:
                if type(item) is Failed:
                    raise item.exc
                return item
            msg, handle = self._handle_item(item, deadline)
        if handle is not None:
            log.warning("procwire: recv() dropped a handle that came with a message; "
                        "use recv_with_handle() to receive handles")
            handle.close()
        return msg

    def recv_with_handle(self, timeout: float | None = None) -> tuple[Any, socket.socket | None]:
        """The next message and the socket that came with it (``None`` for most messages).

        Node's internal messages are answered (a received handle is acknowledged with
        ``NODE_HANDLE_ACK``, without which a Node sender would queue everything after it) and
        never returned.
        """
        deadline = deadline_of(timeout)
        with self._rlock:
            return self._handle_item(self._next(timeout), deadline)

    def _next(self, timeout: float | None) -> Any:
        # _rlock held.
        if self._inbox:
            return self._inbox.popleft()
        if self._closed:
            raise ChannelClosed("channel is closed")
        items = self._stream.receive(timeout)
        if len(items) > 1:
            self._inbox.extend(items)
            return self._inbox.popleft()
        return items[0]

    def _handle_item(self, item: Any, deadline: float | None
                     ) -> tuple[Any, socket.socket | None]:
        # _rlock held. Internal messages are answered and skipped, up to the next user one.
        while True:
            if type(item) is Failed:
                raise item.exc
            node = self._node
            if node is None or type(item) is not dict:
                return item, None
            assert self._wire is not None
            action = node.receive(item, self._wire.fds.pop)
            if action.start_error is not None:
                self.start_error = action.start_error
            if action.reply is not None:
                self._reply(action.reply, action.resend_fd)
            if action.deliver:
                return action.message, action.handle
            item = self._next(remaining(deadline))

    def _send_internal(self, msg: dict[str, Any]) -> None:
        # From any thread (a received socket being closed): Node's socket-list answers.
        if not self._closed:
            self._reply(msg, None)

    def _reply(self, reply: dict[str, Any], fd: int | None) -> None:
        # An ACK must not fail the user's recv(): a peer that is gone shows up on the next call.
        try:
            if fd is None:
                self.send(reply, timeout=5.0)
                return
            payload = self._codec.encode(reply)
            line = self._framing.frame(payload)
            assert self._wire is not None
            with self._slock:
                self._stream.flush(5.0)
                self._wire.send_with_fds(line, [fd], 5.0)
        except (ConnectionClosed, ChannelClosed, Timeout, OSError) as exc:
            log.debug("procwire: could not answer %s: %s", reply.get("cmd"), exc)

    # -- closing ----------------------------------------------------------------------------
    def close(self, timeout: float | None = 10.0) -> None:
        """Flush queued messages (up to ``timeout``), then close; the peer sees end of file
        (a Node child gets 'disconnect'). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._node is not None:
            self._node.close()
        self._stream.close(timeout)

    def __iter__(self) -> Iterator[Any]:
        """Messages until the peer closes the channel (or exits)."""
        recv = self.recv
        while True:
            try:
                yield recv()
            except (ConnectionClosed, ChannelClosed):
                return

    def __enter__(self) -> IpcChannel:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except Timeout:
            if et is None:
                raise

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<IpcChannel {self.remote_address} {state}>"
