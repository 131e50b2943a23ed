"""Length-prefixed framing, sans-IO.

Wire format (see docs/protocol.md): each message is ``header + payload``. The header is a
4-byte big-endian unsigned length; the value ``0xFFFFFFFF`` means an 8-byte big-endian length
follows (for payloads of 4 GiB - 1 and more). So a 64 B message costs 4 bytes of header.

The decoder follows the shape of asyncio's ``BufferedProtocol``: the I/O layer asks
``get_buffer()`` for a place to read into (``recv_into``), then reports ``buffer_updated(n)``
and gets back every frame completed by those bytes. One large read yields many frames, split
inside one buffer with no per-frame copy; a frame larger than the buffer gets a buffer of its
own, and the rest of it is read straight into that.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

from .._errors import FrameTooLarge, ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FrameDecoder",
    "Framing",
    "LengthPrefixed",
    "encode_frame",
    "frame_header",
]

DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
DEFAULT_READ_BUFFER = 256 * 1024
_KEEP_BIG = 16 * 1024 * 1024  # a large-frame buffer up to this size is kept for reuse

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ESCAPE = 0xFFFFFFFF
_ESCAPE_BYTES = b"\xff\xff\xff\xff"
_u32_pack = _U32.pack
_u32_unpack_from = _U32.unpack_from
_u64_unpack_from = _U64.unpack_from


def frame_header(size: int, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """The header for a payload of ``size`` bytes; raises FrameTooLarge over the limit."""
    if size > max_frame_size:
        raise FrameTooLarge(size, max_frame_size)
    if size < _ESCAPE:
        return _u32_pack(size)
    return _ESCAPE_BYTES + _U64.pack(size)


def encode_frame(payload: bytes | bytearray | memoryview,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Header and payload as one ``bytes`` (the streams avoid this copy for big payloads)."""
    return frame_header(len(payload), max_frame_size) + payload


class Decoder(Protocol):
    """A sans-IO stream decoder in the shape of asyncio's BufferedProtocol."""

    def get_buffer(self) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> list[memoryview]: ...

    def pending(self) -> int: ...

    def check_eof(self) -> None: ...


def feed(decoder: Decoder, data: bytes | bytearray | memoryview) -> list[bytes]:
    """Drive any ``Decoder`` with ``data``: copy it in through ``get_buffer`` /
    ``buffer_updated`` and return every completed message as ``bytes`` (tests, slow paths)."""
    out: list[bytes] = []
    view = memoryview(data).cast("B")
    while view:
        buf = decoder.get_buffer()
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        out.extend(bytes(f) for f in decoder.buffer_updated(n))
    return out


class Framing(Protocol):
    """How a byte stream carries messages: a decoder, and how to frame one payload.

    ``frame(payload)`` returns header + payload (+ trailer) as one buffer, used for small
    payloads; ``frame_parts(payload)`` returns the pieces for a gather write, so a large
    payload is never copied.
    """

    max_frame_size: int

    def decoder(self) -> Decoder: ...

    def frame(self, payload: bytes | bytearray | memoryview) -> bytes | bytearray: ...

    def frame_parts(self, payload: bytes | bytearray | memoryview
                    ) -> list[bytes | bytearray | memoryview]: ...


class LengthPrefixed:
    """procwire's own framing: 4-byte big-endian length (escape to 8 bytes), then payload."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size

    def decoder(self) -> FrameDecoder:
        return FrameDecoder(self.max_frame_size)

    def frame(self, payload: bytes | bytearray | memoryview) -> bytes:
        return frame_header(len(payload), self.max_frame_size) + payload

    def frame_parts(self, payload: bytes | bytearray | memoryview
                    ) -> list[bytes | bytearray | memoryview]:
        return [frame_header(len(payload), self.max_frame_size), payload]


class FrameDecoder:
    """Splits a byte stream into frames.

    >>> d = FrameDecoder()
    >>> [bytes(f) for f in d.feed(encode_frame(b"hi") + encode_frame(b"there")[:3])]
    [b'hi']
    >>> [bytes(f) for f in d.feed(encode_frame(b"there")[3:])]
    [b'there']

    Frames returned by ``buffer_updated`` are memoryviews into the decoder's buffer, valid
    until the next ``get_buffer()`` call: consume (decode or copy) them first. ``feed`` returns
    copies and is for tests and slow paths.

    Errors: a frame announced larger than ``max_frame_size`` raises ``FrameTooLarge`` as soon as
    its header arrives (nothing is allocated for it); after that the decoder is unusable, as the
    stream has no trustworthy boundary left.
    """

    __slots__ = ("_big", "_big_filled", "_bigbuf", "_buf", "_end", "_error", "_max", "_mv",
                 "_size", "_start")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 buffer_size: int = DEFAULT_READ_BUFFER) -> None:
        if max_frame_size < 0:
            raise ValueError("max_frame_size must be >= 0")
        if buffer_size < 64:
            raise ValueError("buffer_size must be >= 64")
        self._max = max_frame_size
        self._size = buffer_size
        self._buf = bytearray(buffer_size)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._big: memoryview | None = None  # the large frame being read, if any
        self._big_filled = 0
        # Kept between large frames: fresh memory for each would cost a page fault per 4 KiB.
        self._bigbuf: bytearray | None = None
        self._error: ProtocolError | None = None

    @property
    def max_frame_size(self) -> int:
        return self._max

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        # Lowered while a peer is not yet authenticated (see procwire._auth).
        self._max = value

    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        if self._big is not None:
            return self._big_filled + 1  # at least the header was there
        return self._end - self._start

    def get_buffer(self) -> memoryview:
        """Where the next bytes go. Invalidates frames returned earlier."""
        start = self._start
        if start == self._end and self._big is None and self._error is None:
            self._start = self._end = 0
            return self._mv  # the common case: everything consumed, the whole buffer is free
        if self._error is not None:
            raise self._error
        big = self._big
        if big is not None:
            return big[self._big_filled:]
        if start and self._size - self._end < (self._size >> 2):
            # Move the partial frame to the front so the next read has room.
            n = self._end - start
            self._mv[:n] = self._mv[start:self._end]
            self._start = 0
            self._end = n
        return self._mv[self._end:]

    def buffer_updated(self, nbytes: int) -> list[memoryview]:
        """``nbytes`` were written into the last buffer; returns the frames completed."""
        big = self._big
        if big is not None:
            self._big_filled += nbytes
            if self._big_filled < len(big):
                return []
            self._big = None
            self._big_filled = 0
            return [big]
        pos = self._start
        end = self._end = self._end + nbytes
        if end - pos >= 4:
            # Fast path: the read holds exactly one whole frame (a request/reply exchange).
            (n,) = _u32_unpack_from(self._buf, pos)
            if pos + 4 + n == end and n <= self._max and n != _ESCAPE:
                self._start = end
                return [self._mv[pos + 4:end]]
        return self._split()

    def fill(self, read_into: Callable[[memoryview], int]) -> list[memoryview] | None:
        """``get_buffer``, ``read_into(buffer)`` and ``buffer_updated`` in one call.

        ``read_into`` is the caller's I/O (e.g. ``sock.recv_into``); this stays sans-IO. Returns
        the frames completed (possibly none), or None when ``read_into`` returned 0 (EOF).
        This is the receive hot path, so the common case (all consumed, one whole frame read)
        is handled inline.
        """
        if self._start == self._end and self._big is None and self._error is None:
            self._start = self._end = 0
            n = read_into(self._mv)
            if n >= 4:
                (size,) = _u32_unpack_from(self._buf, 0)
                if size + 4 == n and size <= self._max:
                    self._start = self._end = n
                    return [self._mv[4:n]]
            elif not n:
                return None
            self._end = n
            return self._split()
        n = read_into(self.get_buffer())
        if not n:
            return None
        return self.buffer_updated(n)

    def _split(self) -> list[memoryview]:
        out: list[memoryview] = []
        append = out.append
        mv = self._mv
        buf = self._buf
        pos = self._start
        end = self._end
        limit = self._max
        while end - pos >= 4:
            (n,) = _u32_unpack_from(buf, pos)
            hdr = 4
            if n == _ESCAPE:
                if end - pos < 12:
                    break
                (n,) = _u64_unpack_from(buf, pos + 4)
                hdr = 12
            if n > limit:
                self._start = pos
                self._error = FrameTooLarge(n, limit)
                raise self._error
            stop = pos + hdr + n
            if stop <= end:
                append(mv[pos + hdr:stop])
                pos = stop
                continue
            if hdr + n > self._size:
                # Too big for the shared buffer: read the rest straight into a buffer of its
                # own (reused for the next large frame unless it is huge).
                have = end - pos - hdr
                bigbuf = self._bigbuf
                if bigbuf is None or len(bigbuf) < n:
                    bigbuf = bytearray(n)
                self._bigbuf = bigbuf if len(bigbuf) <= _KEEP_BIG else None
                big = memoryview(bigbuf)[:n]
                big[:have] = mv[pos + hdr:end]
                self._big = big
                self._big_filled = have
                pos = end = 0
                self._end = 0
            break
        self._start = pos
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Convenience: copy ``data`` in and return every completed frame as ``bytes``."""
        return feed(self, data)

    def check_eof(self) -> None:
        """Call at end of stream: raises ProtocolError when a frame was cut off."""
        if self.pending():
            raise ProtocolError(f"connection closed in the middle of a frame "
                                f"({self.pending()} bytes of it received)")
