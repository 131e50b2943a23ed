"""JSON-lines framing: any split of a stream of JSON values gives the same payloads."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procwire import DecodeError, EncodeError, FrameTooLarge, ProtocolError
from procwire.codecs import JsonCodec
from procwire.protocol import lines
from procwire.protocol.lines import JsonLines, JsonLinesDecoder, StrictLinesDecoder

scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(alphabet=st.characters(codec="utf-8"), max_size=20))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                      | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
# Between two values: a newline (maybe CRLF, maybe blank lines), spaces, or nothing at all.
separators = st.sampled_from(["\n", "\r\n", "\n\n", " ", "", "\t", " \n "])


def encode(v: object) -> bytes:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()


def split_feed(dec: JsonLinesDecoder, data: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        if cut > pos:
            out += dec.feed(data[pos:cut])
            pos = cut
    return out


def stream(items: list[tuple[object, str]]) -> tuple[bytes, list[bytes]]:
    """The bytes of ``items`` (value, separator after it) and the payloads expected."""
    data = b""
    expected = []
    for i, (v, sep) in enumerate(items):
        enc = encode(v)
        expected.append(enc)
        data += enc
        nxt = encode(items[i + 1][0]) if i + 1 < len(items) else b""
        # A top-level number or literal ends only at a delimiter: "12" is one value.
        scalar_end = enc[-1:] not in (b"}", b"]", b'"')
        if scalar_end and not sep.strip(" \t") and (not nxt or nxt[:1] not in b'{["'):
            sep = sep or " "
        if scalar_end and i + 1 == len(items) and "\n" not in sep:
            sep += "\n"  # the last scalar needs its newline (or the stream end is a cut)
        data += sep.encode()
    return data, expected


@settings(max_examples=250, deadline=None)
@given(st.lists(st.tuples(values, separators), max_size=25),
       st.lists(st.integers(min_value=0, max_value=100_000), max_size=30),
       st.sampled_from([64, 100, 1024, 256 * 1024]))
def test_any_split_gives_same_payloads(items: list[tuple[object, str]], cuts: list[int],
                                       bufsize: int) -> None:
    data, expected = stream(items)
    dec = JsonLinesDecoder(buffer_size=bufsize)
    assert split_feed(dec, data, cuts) == expected
    assert dec.pending() == 0
    dec.check_eof()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(values, separators), max_size=25),
       st.lists(st.integers(min_value=0, max_value=100_000), max_size=30),
       st.sampled_from([(0, 0), (0, 40), (16, 200), (8, 10**9)]))
def test_any_split_with_every_strategy(items: list[tuple[object, str]], cuts: list[int],
                                       limits: tuple[int, int]) -> None:
    # Small limits push short texts through each path the decoder has for long ones: the
    # "re-check whole when it ends like a value" path and the resumable scanner.
    data, expected = stream(items)
    saved = lines._SCAN_SMALL, lines._RETRY_LIMIT
    lines._SCAN_SMALL, lines._RETRY_LIMIT = limits
    try:
        dec = JsonLinesDecoder(buffer_size=64)
        assert split_feed(dec, data, cuts) == expected
    finally:
        lines._SCAN_SMALL, lines._RETRY_LIMIT = saved
    assert dec.pending() == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(values, separators), max_size=10), st.integers(1, 7))
def test_byte_by_byte(items: list[tuple[object, str]], chunk: int) -> None:
    data, expected = stream(items)
    dec = JsonLinesDecoder(buffer_size=64)
    out: list[bytes] = []
    for i in range(0, len(data), chunk):
        out += dec.feed(data[i:i + chunk])
    assert out == expected


def test_value_without_newline_is_delivered_when_complete() -> None:
    dec = JsonLinesDecoder()
    assert dec.feed(b'{"id":1}') == [b'{"id":1}']
    assert dec.feed(b'[1,{"a":"}"}]') == [b'[1,{"a":"}"}]']
    assert dec.feed(b'"x\\"y"') == [b'"x\\"y"']
    assert dec.feed(b'{"a":') == []
    assert dec.feed(b'"b"}{"c":3}') == [b'{"a":"b"}', b'{"c":3}']
    assert dec.pending() == 0


def test_back_to_back_and_scalars() -> None:
    dec = JsonLinesDecoder()
    assert dec.feed(b'{"a":1}{"b":2}\n[1][2]"x"\n') == \
        [b'{"a":1}', b'{"b":2}', b"[1]", b"[2]", b'"x"']
    assert dec.feed(b"1 2.5 -3e4 true") == [b"1", b"2.5", b"-3e4"]
    assert dec.pending() == 4  # "true" might go on ("truex"): it waits for a delimiter
    assert dec.feed(b"\r\n") == [b"true"]
    assert dec.feed(b'null{"a":1}') == [b"null", b'{"a":1}']


def test_blank_lines_crlf_and_unicode() -> None:
    dec = JsonLinesDecoder()
    line = encode({"s": "a\u2028b\nc", "k": "\u00e9\U0001f600"})
    assert b"\n" not in line
    assert dec.feed(b"\n\r\n  \n" + line + b"\r\n\n") == [line]


def test_garbage_line_is_one_payload_and_next_line_arrives() -> None:
    dec = JsonLinesDecoder()
    got = dec.feed(b"Traceback (most recent call last):\n{oops\n"
                   b'  File "x.py", line 1\n{"ok":1}\n')
    assert got == [b"Traceback (most recent call last):", b"{oops",
                   b'File "x.py", line 1', b'{"ok":1}']
    assert dec.feed(b"hello") == []
    assert dec.feed(b' "world"\n[1]\n') == [b'hello "world"', b"[1]"]


def test_line_too_large() -> None:
    dec = JsonLinesDecoder(max_frame_size=100, buffer_size=64)
    assert dec.feed(b'"' + b"x" * 98 + b'"\n') == [b'"' + b"x" * 98 + b'"']
    with pytest.raises(FrameTooLarge):
        dec.feed(b"[" + b"1," * 200)
    with pytest.raises(FrameTooLarge):
        dec.get_buffer()  # unusable afterwards
    dec = JsonLinesDecoder(max_frame_size=10)
    with pytest.raises(FrameTooLarge):
        dec.feed(b'"' + b"x" * 20 + b'"\n')


def test_long_value_grows_the_buffer() -> None:
    dec = JsonLinesDecoder(buffer_size=64)
    big = encode({"data": "x" * 300_000, "n": list(range(1000))})
    out: list[bytes] = []
    for i in range(0, len(big), 4096):
        out += dec.feed(big[i:i + 4096])
    assert out == [big]
    assert dec.feed(b"\n[1]\n") == [b"[1]"]


def test_truncated_at_eof() -> None:
    dec = JsonLinesDecoder()
    dec.feed(b'{"a":')
    with pytest.raises(ProtocolError):
        dec.check_eof()


def test_framing() -> None:
    f = JsonLines(max_frame_size=10)
    assert f.frame(b"[1]") == b"[1]\n"
    assert f.frame(memoryview(b"[1]")) == b"[1]\n"
    assert f.frame_parts(b"[1]") == [b"[1]", b"\n"]
    with pytest.raises(EncodeError):
        f.frame(b"[1,\n2]")
    with pytest.raises(EncodeError):
        f.frame_parts(memoryview(b"[1,\n2]"))
    with pytest.raises(FrameTooLarge):
        f.frame(b"[" + b"1," * 10 + b"1]")
    assert isinstance(f.decoder(), JsonLinesDecoder)


# -- StrictLinesDecoder: Node's IPC channel, one value per newline-terminated line -------------

line_pads = st.sampled_from(["", " ", "\t", "\r", " \r", "  \t "])
blank_lines = st.sampled_from(["", "\n", "\r\n", " \n", "\n\n\t\n"])


def strict_stream(items: list[tuple[object, str, str, str]]) -> tuple[bytes, list[bytes]]:
    """Each value on its own line, maybe padded with whitespace and preceded by blank lines."""
    data = b""
    expected = []
    for v, blank, lead, trail in items:
        enc = encode(v)
        expected.append(enc)
        data += (blank + lead).encode() + enc + (trail + "\n").encode()
    return data, expected


@settings(max_examples=250, deadline=None)
@given(st.lists(st.tuples(values, blank_lines, line_pads, line_pads), max_size=25),
       st.lists(st.integers(min_value=0, max_value=100_000), max_size=30),
       st.sampled_from([64, 100, 1024, 256 * 1024]))
def test_strict_any_split_gives_same_payloads(items: list[tuple[object, str, str, str]],
                                              cuts: list[int], bufsize: int) -> None:
    data, expected = strict_stream(items)
    dec = StrictLinesDecoder(buffer_size=bufsize)
    assert split_feed(dec, data, cuts) == expected
    assert dec.pending() == 0
    dec.check_eof()
    # On newline-terminated lines of one value each, both decoders agree.
    assert split_feed(JsonLinesDecoder(buffer_size=bufsize), data, cuts) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(values, blank_lines, line_pads, line_pads), max_size=10),
       st.integers(1, 7))
def test_strict_byte_by_byte(items: list[tuple[object, str, str, str]], chunk: int) -> None:
    data, expected = strict_stream(items)
    dec = StrictLinesDecoder(buffer_size=64)
    out: list[bytes] = []
    for i in range(0, len(data), chunk):
        out += dec.feed(data[i:i + chunk])
    assert out == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(values.map(encode),
                          st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))),
                max_size=20),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=10))
def test_strict_bad_lines_fail_alone(lines_: list[bytes], cuts: list[int]) -> None:
    # Any bytes at all between newlines: every non-blank line is delivered (stripped) as one
    # payload, which the codec decodes or reports as DecodeError; the others are unaffected.
    data = b"".join(line + b"\n" for line in lines_)
    expected = [line.strip(b" \t\r\n") for line in lines_ if line.strip(b" \t\r\n")]
    got = split_feed(StrictLinesDecoder(buffer_size=64), data, cuts)
    assert got == expected
    codec = JsonCodec()
    for payload in got:
        try:
            codec.decode(payload)
        except DecodeError:
            pass  # the typed error, and nothing else


def test_strict_waits_for_the_newline() -> None:
    dec = StrictLinesDecoder()
    assert dec.feed(b'{"id":1}') == []  # Node always ends a message with "\n"
    assert dec.pending() == 8
    with pytest.raises(ProtocolError):
        dec.check_eof()
    assert dec.feed(b"\n") == [b'{"id":1}']
    assert dec.feed(b"  \r\n\n \t") == []  # blank lines, and whitespace pending
    assert dec.pending() == 0
    dec.check_eof()
    assert dec.feed(b"7\n") == [b"7"]


def test_strict_two_values_or_garbage_is_one_bad_message() -> None:
    codec = JsonCodec()
    dec = StrictLinesDecoder()
    got = dec.feed(b'{"a":1}{"b":2}\n1 2\nnot json\n{"a":\n"\xff"\n{"ok":true}\n')
    assert got == [b'{"a":1}{"b":2}', b"1 2", b"not json", b'{"a":', b'"\xff"', b'{"ok":true}']
    for bad in got[:-1]:
        with pytest.raises(DecodeError):
            codec.decode(bad)
    assert codec.decode(got[-1]) == {"ok": True}
    assert dec.feed(b"[1]\n") == [b"[1]"]  # and the decoder goes on


def test_strict_line_too_large() -> None:
    # Exactly the limit passes (both the one-line fast path and the general loop)...
    dec = StrictLinesDecoder(max_frame_size=100, buffer_size=64)
    line = b'"' + b"x" * 98 + b'"'
    assert dec.feed(line + b"\n") == [line]
    assert dec.feed(b"[1]\n" + line + b" \r\n") == [b"[1]", line]
    # ... one byte more does not, complete or not, and the decoder is unusable afterwards.
    assert StrictLinesDecoder(max_frame_size=100).feed(line + b"\n") == [line]  # one read
    for data in (b'"' + b"x" * 99 + b'"\n', b'"' + b"x" * 200):
        for bufsize in (64, 4096):
            dec = StrictLinesDecoder(max_frame_size=100, buffer_size=bufsize)
            with pytest.raises(FrameTooLarge):
                dec.feed(data)
            with pytest.raises(FrameTooLarge):
                dec.get_buffer()
    # The lines before it in the same read are returned; the next call raises.
    for tail in (b'"' + b"x" * 99 + b'"\n[3]\n', b'"' + b"x" * 200):
        dec = StrictLinesDecoder(max_frame_size=100)
        mv = dec.get_buffer()
        data = b"[1]\n[2]\n" + tail
        mv[:len(data)] = data
        assert [bytes(f) for f in dec.buffer_updated(len(data))] == [b"[1]", b"[2]"]
        with pytest.raises(FrameTooLarge):
            dec.get_buffer()
    # Whitespace around a line does not count.
    dec = StrictLinesDecoder(max_frame_size=3)
    assert dec.feed(b"  [1]  \r\n") == [b"[1]"]


def test_strict_long_line_grows_the_buffer() -> None:
    dec = StrictLinesDecoder(buffer_size=64)
    big = encode({"data": "x\u2028" * 300_000})
    out: list[bytes] = []
    for i in range(0, len(big), 4096):
        out += dec.feed(big[i:i + 4096])
    assert out == []
    assert dec.feed(b"\n[1]\n") == [big, b"[1]"]


def test_values_before_a_too_large_one_are_delivered() -> None:
    # Values completed before an oversized one in the same read are returned; the next
    # get_buffer() raises. Complete and unfinished oversized tails, with and without newlines.
    for tail in (b'"' + b"x" * 99 + b'"\n[3]\n', b'"' + b"x" * 200, b"[" + b"1," * 80):
        for head in (b"[1]\n[2]\n", b"[1][2]"):
            dec = JsonLinesDecoder(max_frame_size=100)
            mv = dec.get_buffer()
            data = head + tail
            mv[:len(data)] = data
            assert [bytes(f) for f in dec.buffer_updated(len(data))] == [b"[1]", b"[2]"]
            with pytest.raises(FrameTooLarge):
                dec.get_buffer()
