"""Newline-delimited JSON framing ("JSON lines"), sans-IO.

Wire format: each message is one compact JSON value followed by ``\\n``. That is what programs
that know nothing of procwire read and write (``json.dumps(x) + "\\n"``, ``JSON.stringify``,
``jq -c``), so the stdio transport uses it.

The decoder is lenient in what it accepts, because naive peers are:

* empty lines and a trailing ``\\r`` (CRLF) are skipped;
* values written back to back with no newline (``{"a":1}{"b":2}``, ``[1][2]"x"``) are split;
* a value with no newline after it is delivered as soon as it is complete, so a child that
  writes ``{"id":1}`` and flushes is heard without waiting for a newline that never comes.
  (Exactly so when the text since the last newline is under 4 KiB, or ends with that value;
  in a longer run of back-to-back values with no newline, one followed by the start of the
  next is delivered when more bytes come.)
  Top-level numbers, ``true``, ``false`` and ``null`` have no closing character: they are
  complete only when followed by whitespace, a newline or another value (``1 2`` is two
  messages; ``12`` is one).

(``StrictLinesDecoder``, for Node's IPC channel, reads as Node does instead: one value per
newline-terminated line, nothing delivered before its newline; see its docstring.)

A newline always ends a message: a value never spans lines (so pretty-printed, multi-line JSON
is not understood, and one garbage line cannot swallow the lines after it). Text that is not
JSON is delivered, up to the end of its line, as one payload, which the json codec then reports
as ``DecodeError``; the next line is unaffected.

Speed: lines are split with ``bytearray.find``, and each line is checked to hold exactly one
value by msgspec skipping it as ``msgspec.Raw`` (C speed, nothing built). Only text with no
newline yet, and the rare line holding several values or garbage, goes through a small scanner
that tracks nesting depth and strings with regular-expression jumps; it resumes where it
stopped, so a large value arriving in many reads is scanned once.
"""

from __future__ import annotations

import re

import msgspec

from .._errors import EncodeError, FrameTooLarge, ProtocolError
from .framing import DEFAULT_MAX_FRAME_SIZE, DEFAULT_READ_BUFFER, feed

__all__ = ["JsonLines", "JsonLinesDecoder", "StrictLinesDecoder"]

_NL = 0x0A
_WS = frozenset(b" \t\r\n")
_OPEN = frozenset(b"{[")
_QUOTE = 0x22
_BACKSLASH = 0x5C
_SCALAR_START = frozenset(b"-0123456789tfn")
_JSON_START = _SCALAR_START | _OPEN | {0x22}
_VALUE_END = frozenset(b'}]"')
# Up to this size, text with no newline is re-checked whole (at C speed) when more arrives;
# beyond it, the resumable Python scanner keeps the cost linear.
_RETRY_LIMIT = 1024 * 1024
# Text with no newline up to this size is always scanned, so every value it completes (even a
# number followed by a space) is delivered at once.
_SCAN_SMALL = 4096

_NON_WS = re.compile(rb"[^ \t\r\n]")
_NEWLINE = re.compile(rb"\n")
_STR_STOP = re.compile(rb'["\\]')
# Skips plain bytes and whole strings up to the next bracket (or an unterminated string).
_TO_BRACKET = re.compile(rb'[^"{}\[\]]*(?:"[^"\\]*(?:\\.[^"\\]*)*"[^"{}\[\]]*)*', re.DOTALL)
_SCALAR_END = re.compile(rb"[^0-9A-Za-z.+\-]")
# Loose on purpose: it only decides where a token ends; the codec judges the number.
_SCALAR = re.compile(rb"-?[0-9][0-9.eE+\-]*|true|false|null")
# Validates and skips one JSON value without building it (msgspec.Raw): the exact, C-speed
# answer to "is this line one value?"; "trailing characters" means there are several.
_skip = msgspec.json.Decoder(msgspec.Raw).decode

# Scanner states.
_IDLE, _CONTAINER, _STR, _SCALAR_TOKEN, _GARBAGE = range(5)


class JsonLines:
    """Framing for JSON lines: ``payload + b"\\n"``.

    >>> JsonLines().frame(b'{"a":1}')
    b'{"a":1}\\n'

    A payload holding a raw newline is refused with ``EncodeError`` (compact JSON never has
    one; inside strings JSON escapes it as ``\\n``), and one over ``max_frame_size`` with
    ``FrameTooLarge``: in both cases nothing is sent.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size

    def decoder(self) -> JsonLinesDecoder:
        return JsonLinesDecoder(self.max_frame_size)

    def _check(self, payload: bytes | bytearray | memoryview) -> None:
        if len(payload) > self.max_frame_size:
            raise FrameTooLarge(len(payload), self.max_frame_size)
        if isinstance(payload, memoryview):
            found = _NEWLINE.search(payload) is not None
        else:
            found = payload.find(b"\n") >= 0
        if found:
            raise EncodeError("a JSON-lines message cannot contain a raw newline "
                              "(send compact JSON: the json codec never writes one)")

    def frame(self, payload: bytes | bytearray | memoryview) -> bytes:
        self._check(payload)
        return b"".join((payload, b"\n"))

    def frame_parts(self, payload: bytes | bytearray | memoryview
                    ) -> list[bytes | bytearray | memoryview]:
        self._check(payload)
        return [payload, b"\n"]


class JsonLinesDecoder:
    """Splits a byte stream into JSON values (see the module docstring for what it accepts).

    >>> d = JsonLinesDecoder()
    >>> [bytes(f) for f in d.feed(b'{"a":1}\\n[2][3]\\r\\n"x"{"b"')]
    [b'{"a":1}', b'[2]', b'[3]', b'"x"']
    >>> [bytes(f) for f in d.feed(b':4}')]
    [b'{"b":4}']

    Same shape as ``FrameDecoder``: payloads returned by ``buffer_updated`` are memoryviews into
    the decoder's buffer, valid until the next ``get_buffer()``. The buffer grows for a long
    line, up to ``max_frame_size``; a line or value longer than that raises ``FrameTooLarge``
    and leaves the decoder unusable.
    """

    __slots__ = ("_buf", "_depth", "_end", "_error", "_in_str", "_kind", "_max", "_mv",
                 "_nl_from", "_size", "_spos", "_start")

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
        self._start = 0  # first byte not yet delivered (start of the value being scanned)
        self._end = 0
        self._nl_from = 0  # no newline in [_start, _nl_from): resume the search there
        self._kind = _IDLE
        self._depth = 0
        self._in_str = False
        self._spos = 0  # where the scanner resumes inside the current value
        self._error: ProtocolError | None = None

    @property
    def max_frame_size(self) -> int:
        return self._max

    def pending(self) -> int:
        """Bytes received that do not yet form a whole value (whitespace already skipped)."""
        return self._end - self._start

    def get_buffer(self) -> memoryview:
        """Where the next bytes go. Invalidates payloads returned earlier."""
        if self._error is not None:
            raise self._error
        start, end, size = self._start, self._end, self._size
        if start == end:
            self._start = self._end = self._nl_from = self._spos = 0
        elif size - end < (size >> 2):
            n = end - start
            if start:
                self._mv[:n] = self._mv[start:end]
                self._start = 0
                self._end = n
                self._nl_from -= start
                self._spos -= start
            if size - n < (size >> 2):
                # A long line: grow (never in place, since payload views may still exist).
                cap = self._max + 64
                new_size = max(min(size * 2, cap), n + 64)
                if new_size > size:
                    buf = bytearray(new_size)
                    buf[:n] = self._mv[:n]
                    self._buf = buf
                    self._mv = memoryview(buf)
                    self._size = new_size
        return self._mv[self._end:]

    def buffer_updated(self, nbytes: int) -> list[memoryview]:
        """``nbytes`` were written into the last buffer; returns the values completed.

        A value over ``max_frame_size`` raises ``FrameTooLarge``; when values completed before
        it in the same read, they are returned first and the next ``get_buffer()`` raises.
        """
        out: list[memoryview] = []
        try:
            self._updated(nbytes, out)
        except FrameTooLarge:
            if not out:
                raise
            # self._error is set (by _fail): the next get_buffer() raises it.
        return out

    def _updated(self, nbytes: int, out: list[memoryview]) -> None:
        self._end = end = self._end + nbytes
        buf = self._buf
        mv = self._mv
        limit = self._max
        ws = _WS
        pos = self._start
        nl_from = self._nl_from
        find = buf.find
        while pos < end:
            nl = find(10, pos if pos > nl_from else nl_from, end)
            if nl < 0:
                self._nl_from = end
                pos = self._partial(pos, end, out)
                break
            if self._kind == _IDLE:
                a = pos
                c = buf[a]
                if c in ws:
                    m = _NON_WS.search(buf, a, nl)
                    if m is None:
                        pos = nl + 1
                        continue
                    a = m.start()
                    c = buf[a]
                b = nl
                while buf[b - 1] in ws:
                    b -= 1
                if c not in _JSON_START or _is_one_value(mv[a:b]):
                    # One value, or no JSON at all (then it goes whole, to fail decoding).
                    if b - a > limit:
                        self._fail(FrameTooLarge(b - a, limit))
                    out.append(mv[a:b])
                    pos = nl + 1
                    continue
            self._scan(pos, nl, True, out)
            pos = nl + 1
        self._start = pos
        if end - pos > limit + 2:  # + room for the "\r\n" that may end it
            self._fail(FrameTooLarge(end - pos, limit))

    def _partial(self, pos: int, end: int, out: list[memoryview]) -> int:
        """Text with no newline yet: deliver the values it completes; returns the new start."""
        if self._kind != _IDLE or end - pos > _RETRY_LIMIT:
            return self._scan(pos, end, False, out)
        if end - pos <= _SCAN_SMALL:
            # Small (a naive writer's message): exact, and cheap to redo with the next bytes.
            pos = self._scan(pos, end, False, out)
            self._kind = _IDLE
            return pos
        buf = self._buf
        b = end
        while b > pos and buf[b - 1] in _WS:
            b -= 1
        if b == pos:
            return end
        if buf[b - 1] not in _VALUE_END:
            # Nothing can have just ended (scalars wait for a delimiter anyway). In a long text,
            # values that ended earlier come out with the next bytes, which a writer in the
            # middle of a value is about to send.
            return pos
        try:
            _skip(self._mv[pos:b])
        except msgspec.DecodeError as exc:
            if "truncated" in str(exc):
                return pos  # the value goes on; retried with the next bytes
            return self._scan(pos, end, False, out)  # several values, or garbage
        m = _NON_WS.search(buf, pos, b)
        assert m is not None
        self._emit(out, m.start(), b)
        return end

    def _fail(self, exc: ProtocolError) -> None:
        self._error = exc
        raise exc

    def _emit(self, out: list[memoryview], a: int, b: int) -> None:
        if b - a > self._max:
            self._fail(FrameTooLarge(b - a, self._max))
        out.append(self._mv[a:b])

    def _scan(self, pos: int, seg_end: int, line_end: bool, out: list[memoryview]) -> int:
        """Split ``[pos, seg_end)`` into values; ``line_end``: a newline follows ``seg_end``.

        Returns where undelivered bytes start; an unfinished value keeps its state in ``self``.
        """
        buf = self._buf
        kind, depth, in_str, spos = self._kind, self._depth, self._in_str, self._spos
        while True:
            if kind == _IDLE:
                m = _NON_WS.search(buf, pos, seg_end)
                if m is None:
                    pos = seg_end
                    break
                pos = spos = m.start()
                c = buf[pos]
                if c in _OPEN:
                    kind, depth, in_str, spos = _CONTAINER, 1, False, pos + 1
                elif c == _QUOTE:
                    kind, depth, in_str, spos = _STR, 0, True, pos + 1
                elif c in _SCALAR_START:
                    kind = _SCALAR_TOKEN
                else:
                    kind = _GARBAGE
            if kind == _CONTAINER or kind == _STR:
                done = False
                while spos < seg_end:
                    if in_str:
                        m = _STR_STOP.search(buf, spos, seg_end)
                        if m is None:
                            spos = seg_end
                            break
                        i = m.start()
                        if buf[i] == _BACKSLASH:
                            if i + 1 >= seg_end:
                                spos = i  # the escaped byte has not arrived: look again
                                break
                            spos = i + 2
                            continue
                        spos = i + 1
                        in_str = False
                        if depth == 0:
                            done = True
                            break
                    else:
                        i = _TO_BRACKET.match(buf, spos, seg_end).end()  # type: ignore[union-attr]
                        if i >= seg_end:
                            spos = seg_end
                            break
                        c = buf[i]
                        spos = i + 1
                        if c == _QUOTE:
                            in_str = True  # a string that does not end in this text
                        elif c in _OPEN:
                            depth += 1
                        else:
                            depth -= 1
                            if depth == 0:
                                done = True
                                break
                if done:
                    self._emit(out, pos, spos)
                    pos = spos
                    kind = _IDLE
                    continue
                if not line_end:
                    break
                kind = _GARBAGE  # unterminated when the line ended
            if kind == _SCALAR_TOKEN:
                m = _SCALAR_END.search(buf, spos, seg_end)
                if m is None and not line_end:
                    spos = seg_end
                    break
                stop = seg_end if m is None else m.start()
                if _SCALAR.fullmatch(buf, pos, stop):
                    self._emit(out, pos, stop)
                    pos = stop
                    kind = _IDLE
                    continue
                kind = _GARBAGE
            # Not JSON: everything up to the end of the line is one (undecodable) payload.
            if not line_end:
                spos = seg_end
                break
            b = seg_end
            while b > pos and buf[b - 1] in _WS:
                b -= 1
            self._emit(out, pos, b)
            pos = seg_end
            kind = _IDLE
            break
        self._kind, self._depth, self._in_str, self._spos = kind, depth, in_str, spos
        return pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Convenience: copy ``data`` in and return every completed value as ``bytes``."""
        return feed(self, data)

    def check_eof(self) -> None:
        """Call at end of stream: raises ProtocolError when a value was cut off."""
        if self.pending():
            raise ProtocolError(f"stream ended in the middle of a JSON value "
                                f"({self.pending()} bytes of it received)")


class StrictLinesDecoder(JsonLinesDecoder):
    """One JSON value per newline-terminated line, as Node's IPC channel reads and writes them
    (``JSON.stringify(msg) + "\\n"``): a line is delivered whole when its newline arrives,
    without checking that it holds exactly one value (the codec's decode reports a line that
    does not as ``DecodeError``, and the next line is unaffected); blank lines and surrounding
    whitespace are skipped. Text with no newline yet waits (``pending()``), whatever it holds.

    A line longer than ``max_frame_size`` raises ``FrameTooLarge`` and leaves the decoder
    unusable, as in ``JsonLinesDecoder``; the lines completed before it in the same read are
    still returned, and the error is raised by the next call.

    Speed: a read that holds exactly one line with no padding (every hop of a request/reply)
    is one ``find`` and one slice; about 0.4 µs here against 0.8 µs for the lenient decoder,
    which must also prove each line is a single value.

    >>> d = StrictLinesDecoder()
    >>> [bytes(f) for f in d.feed(b'{"a":1}\\n\\n [2] \\r\\n"x')]
    [b'{"a":1}', b'[2]']
    >>> [bytes(f) for f in d.feed(b'"\\n')]
    [b'"x"']
    """

    __slots__ = ()

    def get_buffer(self) -> memoryview:
        """Where the next bytes go. Invalidates payloads returned earlier."""
        if self._start == self._end and self._error is None:
            # Everything was delivered (the usual case): the whole buffer, no new view.
            self._start = self._end = self._nl_from = 0
            return self._mv
        return super().get_buffer()

    def buffer_updated(self, nbytes: int) -> list[memoryview]:
        """``nbytes`` were written into the last buffer; returns the lines completed."""
        self._end = end = self._end + nbytes
        buf = self._buf
        pos = self._start
        nl = buf.find(10, pos if pos > self._nl_from else self._nl_from, end)
        if nl == end - 1 and nl > pos and buf[pos] not in _WS and buf[nl - 1] not in _WS \
                and nl - pos <= self._max:
            # The common case of a request/reply: the read ends with the one line it holds.
            self._start = self._nl_from = end
            return [self._mv[pos:nl]]
        out: list[memoryview] = []
        if nl >= 0:
            mv = self._mv
            limit = self._max
            ws = _WS
            find = buf.find
            while nl >= 0:
                a, b = pos, nl
                if b > a and buf[b - 1] in ws:
                    while b > a and buf[b - 1] in ws:
                        b -= 1
                if b > a and buf[a] in ws:
                    m = _NON_WS.search(buf, a, b)
                    a = b if m is None else m.start()
                if b > a:
                    if b - a > limit:
                        return self._too_large(out, b - a)
                    out.append(mv[a:b])
                pos = nl + 1
                nl = find(10, pos, end)
            self._start = pos
        self._nl_from = end
        if end - pos > self._max + 2:  # + room for the "\r\n" that may end it
            return self._too_large(out, end - pos)
        return out

    def _too_large(self, out: list[memoryview], size: int) -> list[memoryview]:
        exc = FrameTooLarge(size, self._max)
        if not out:
            self._fail(exc)
        self._error = exc  # raised by the next get_buffer(), after these lines are used
        return out

    def buffered(self) -> int:
        """Bytes received and not yet delivered or skipped (whitespace included)."""
        return self._end - self._start

    def pending(self) -> int:
        """Bytes received after the last newline that are not whitespace."""
        n = self._end - self._start
        if n and _NON_WS.search(self._buf, self._start, self._end) is None:
            return 0
        return n


def _is_one_value(line: memoryview) -> bool:
    try:
        _skip(line)
    except msgspec.DecodeError:
        return False
    return True
