from __future__ import annotations

import math

import pytest

from procwire import DecodeError, EncodeError, get_codec


@pytest.mark.parametrize("name", ["json", "msgpack", "pickle"])
def test_round_trip(name: str) -> None:
    c = get_codec(name)
    obj = {"a": [1, 2.5, "é\u2028\n", None, True], "b": {"c": -1}}
    assert c.decode(c.encode(obj)) == obj


def test_json_refuses_nan_and_infinity() -> None:
    c = get_codec("json")
    for bad in (math.nan, math.inf, -math.inf, {"x": [math.nan]}):
        with pytest.raises(EncodeError, match="NaN"):
            c.encode(bad)
    assert c.encode({"x": None}) == b'{"x":null}'


def test_json_refuses_unencodable() -> None:
    with pytest.raises(EncodeError):
        get_codec("json").encode(object())
    with pytest.raises(EncodeError):
        get_codec("json").encode({1j})


def test_invalid_json_is_a_decode_error() -> None:
    with pytest.raises(DecodeError) as info:
        get_codec("json").decode(b"{not json")
    assert info.value.payload == b"{not json"


def test_raw_is_bytes_only() -> None:
    c = get_codec("raw")
    assert c.decode(memoryview(b"abc")) == b"abc"
    assert c.encode(b"x") == b"x"
    with pytest.raises(EncodeError):
        c.encode("text")


def test_pickle_is_marked_unsafe_and_others_safe() -> None:
    assert not get_codec("pickle").safe
    assert all(get_codec(n).safe for n in ("json", "msgpack", "raw"))


def test_unknown_codec() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("yaml")


def _nested(depth: int) -> list[object]:
    obj: list[object] = []
    for _ in range(depth):
        obj = [obj]
    return obj


@pytest.mark.parametrize("name", ["json", "msgpack", "pickle"])
def test_deep_nesting_is_an_encode_error(name: str) -> None:
    # RecursionError inside the C encoder must come out typed, like any unencodable object
    with pytest.raises(EncodeError, match="nested"):
        get_codec(name).encode({"a": _nested(100_000)})


@pytest.mark.parametrize("name, data", [
    ("json", b'{"event":"x","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("json", b"[" * 100_000),                      # unterminated as well
    ("msgpack", b"\x91" * 100_000 + b"\xc0"),      # fixarray of fixarray of ... nil
])
def test_deep_nesting_is_a_decode_error(name: str, data: bytes) -> None:
    c = get_codec(name)
    with pytest.raises(DecodeError, match="nested too deeply") as info:
        c.decode(data)
    assert info.value.payload == data[:len(info.value.payload)] and info.value.payload
    # the fast path (what channels call first) fails too, and the codec is still usable
    with pytest.raises(RecursionError):
        c.fast_decode(data)  # type: ignore[attr-defined]
    assert c.decode(c.encode({"ok": [[1]]})) == {"ok": [[1]]}
