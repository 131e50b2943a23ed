"""The sans-IO length-prefixed framing: any split of any stream gives the same messages."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procwire import FrameTooLarge, ProtocolError
from procwire.protocol.framing import FrameDecoder, LengthPrefixed, encode_frame, frame_header


def split_feed(dec: FrameDecoder, data: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        if cut > pos:
            out += dec.feed(data[pos:cut])
            pos = cut
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=40),
       st.lists(st.integers(min_value=0, max_value=100_000), max_size=30),
       st.sampled_from([64, 100, 1024, 256 * 1024]))
def test_any_split_gives_same_messages(payloads: list[bytes], cuts: list[int],
                                       bufsize: int) -> None:
    data = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder(buffer_size=bufsize)
    assert split_feed(dec, data, cuts) == payloads
    assert dec.pending() == 0
    dec.check_eof()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=5000), max_size=10), st.integers(1, 97))
def test_byte_by_byte_and_chunks_with_small_buffer(payloads: list[bytes], chunk: int) -> None:
    data = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder(buffer_size=64)  # most payloads are larger than the buffer
    out: list[bytes] = []
    for i in range(0, len(data), chunk):
        out += dec.feed(data[i:i + chunk])
    assert out == payloads


def test_header_bytes() -> None:
    assert frame_header(0) == b"\0\0\0\0"
    assert frame_header(64) == b"\0\0\0\x40"
    assert encode_frame(b"hi") == b"\0\0\0\x02hi"
    big = 0xFFFFFFFF
    assert frame_header(big, max_frame_size=1 << 40) == b"\xff" * 4 + struct.pack(">Q", big)


def test_announced_2_pow_40_is_refused_without_allocating() -> None:
    dec = FrameDecoder()
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(b"\xff\xff\xff\xff" + struct.pack(">Q", 1 << 40))
    assert info.value.size == 1 << 40
    # The decoder is unusable afterwards: the stream has no trustworthy boundary left.
    with pytest.raises(FrameTooLarge):
        dec.get_buffer()


def test_over_max_refused_on_send_and_receive() -> None:
    with pytest.raises(FrameTooLarge):
        frame_header(11, max_frame_size=10)
    dec = FrameDecoder(max_frame_size=10)
    assert dec.feed(encode_frame(b"x" * 10, 10)) == [b"x" * 10]
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack(">I", 11))


def test_truncated_frame_detected_at_eof() -> None:
    dec = FrameDecoder()
    assert dec.feed(encode_frame(b"hello")[:-2]) == []
    with pytest.raises(ProtocolError, match="middle of a frame"):
        dec.check_eof()
    dec2 = FrameDecoder()
    dec2.feed(b"\0\0")  # half a header
    with pytest.raises(ProtocolError):
        dec2.check_eof()


def test_many_frames_from_one_read_share_the_buffer() -> None:
    dec = FrameDecoder()
    data = b"".join(encode_frame(b"%05d" % i) for i in range(1000))
    buf = dec.get_buffer()
    buf[:len(data)] = data
    frames = dec.buffer_updated(len(data))
    assert len(frames) == 1000
    assert all(f.obj is frames[0].obj for f in frames)  # views into one buffer, no copies
    assert bytes(frames[999]) == b"00999"


def test_large_frame_gets_its_own_buffer() -> None:
    dec = FrameDecoder(buffer_size=1024)
    payload = bytes(range(256)) * 40  # 10 KiB > buffer
    data = encode_frame(payload)
    assert dec.feed(data[:100]) == []
    view = dec.get_buffer()
    assert len(view) == len(payload) - 96  # exactly the rest of the frame
    view[:] = data[100:]
    [frame] = dec.buffer_updated(len(view))
    assert bytes(frame) == payload


def test_length_prefixed_framing_parts() -> None:
    f = LengthPrefixed(100)
    assert f.frame(b"ab") == b"\0\0\0\x02ab"
    assert f.frame_parts(b"ab") == [b"\0\0\0\x02", b"ab"]
    with pytest.raises(FrameTooLarge):
        f.frame(b"x" * 101)
