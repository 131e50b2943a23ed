"""Codecs: how a Python object becomes the bytes of one message.

``json`` is the default so that any language can join; ``msgpack`` is smaller and binary-safe;
``raw`` passes bytes through untouched; ``pickle`` handles any Python object but runs code on
decode, so it is opt-in only and refused on a TCP channel without an auth key.

>>> get_codec("json").decode(get_codec("json").encode({"a": 1}))
{'a': 1}
"""

from __future__ import annotations

import pickle as _pickle
from typing import Any, Protocol, runtime_checkable

import msgspec

from ._errors import DecodeError, EncodeError

__all__ = ["Codec", "JsonCodec", "MsgpackCodec", "PickleCodec", "RawCodec", "get_codec"]

Buffer = bytes | bytearray | memoryview

# What msgspec's C encoders raise for an object they cannot carry; RecursionError: nested deeper
# than the interpreter's recursion limit (then "nested too deeply"), for encoding and decoding.
_ENCODE_ERRORS = (TypeError, ValueError, msgspec.EncodeError, OverflowError, RecursionError)
_DECODE_ERRORS = (ValueError, RecursionError)  # msgspec.DecodeError is a ValueError


def _why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return f"nested too deeply ({exc})"
    return str(exc)


@runtime_checkable
class Codec(Protocol):
    """What a codec provides. ``safe`` is False when decoding can run arbitrary code.

    A codec may also have ``fast_decode`` / ``fast_encode``: callables (often C) used on the
    hot paths; when one raises, ``decode`` / ``encode`` runs to produce the typed error.
    """

    name: str
    safe: bool

    def encode(self, obj: Any) -> bytes | bytearray | memoryview: ...

    def decode(self, data: Buffer) -> Any: ...


class JsonCodec:
    """JSON via msgspec (about 10x the stdlib ``json`` here). Bytes are not JSON: use msgpack.

    NaN and infinities are refused, since other languages' JSON parsers reject them.
    """

    name = "json"
    safe = True

    def __init__(self) -> None:
        self._enc = msgspec.json.Encoder()
        self._dec = msgspec.json.Decoder()
        self.fast_decode = self._dec.decode

    def encode(self, obj: Any) -> bytes:
        try:
            data = self._enc.encode(obj)
        except _ENCODE_ERRORS as exc:
            raise EncodeError(f"json cannot encode {type(obj).__name__}: {_why(exc)}") from exc
        # msgspec writes NaN/inf as null; a silent change of value is worse than an error.
        if b"null" in data and _has_nonfinite(obj):
            raise EncodeError("json cannot encode NaN or infinity (use null, or the msgpack codec)")
        return data

    def decode(self, data: Buffer) -> Any:
        try:
            return self._dec.decode(data)
        except _DECODE_ERRORS as exc:
            raise DecodeError(f"invalid JSON: {_why(exc)}", bytes(data)) from exc


def _has_nonfinite(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, float):
        return obj != obj or obj in (float("inf"), float("-inf"))
    if depth > 64:
        return False
    if isinstance(obj, dict):
        return any(_has_nonfinite(v, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_has_nonfinite(v, depth + 1) for v in obj)
    return False


class MsgpackCodec:
    """MessagePack via msgspec: binary-safe, compact, cross-language."""

    name = "msgpack"
    safe = True

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder()
        self.fast_decode = self._dec.decode
        self.fast_encode = self._enc.encode

    def encode(self, obj: Any) -> bytes:
        try:
            return self._enc.encode(obj)
        except _ENCODE_ERRORS as exc:
            raise EncodeError(f"msgpack cannot encode {type(obj).__name__}: {_why(exc)}"
                              ) from exc

    def decode(self, data: Buffer) -> Any:
        try:
            return self._dec.decode(data)
        except _DECODE_ERRORS as exc:
            raise DecodeError(f"invalid msgpack: {_why(exc)}", bytes(data)) from exc


class RawCodec:
    """Bytes in, bytes out; ``recv()`` returns ``bytes``."""

    name = "raw"
    safe = True
    fast_decode = bytes
    # memoryview() accepts exactly the bytes-like objects, in C; the channel turns its
    # TypeError into EncodeError via encode().
    fast_encode = memoryview

    def encode(self, obj: Any) -> bytes | bytearray | memoryview:
        if isinstance(obj, bytes | bytearray | memoryview):
            return obj
        raise EncodeError(f"the raw codec sends bytes-like objects, not {type(obj).__name__}")

    def decode(self, data: Buffer) -> bytes:
        return bytes(data)


class PickleCodec:
    """Any picklable object. Decoding runs code chosen by the sender: trusted peers only."""

    name = "pickle"
    safe = False

    def encode(self, obj: Any) -> bytes:
        try:
            return _pickle.dumps(obj, protocol=_pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise EncodeError(f"pickle cannot encode {type(obj).__name__}: {_why(exc)}"
                              ) from exc

    def decode(self, data: Buffer) -> Any:
        try:
            return _pickle.loads(data)
        except Exception as exc:
            raise DecodeError(f"invalid pickle: {_why(exc)}", bytes(data)) from exc


_CODECS: dict[str, type[JsonCodec | MsgpackCodec | RawCodec | PickleCodec]] = {
    "json": JsonCodec,
    "msgpack": MsgpackCodec,
    "raw": RawCodec,
    "pickle": PickleCodec,
}


def get_codec(codec: str | Codec) -> Codec:
    """A codec instance from its name (``json``, ``msgpack``, ``raw``, ``pickle``) or itself."""
    if isinstance(codec, str):
        try:
            cls = _CODECS[codec]
        except KeyError:
            raise ValueError(f"unknown codec {codec!r} (known: {', '.join(_CODECS)})") from None
        made: Codec = cls()
        return made
    if isinstance(codec, Codec):
        return codec
    raise TypeError(f"codec must be a name or a Codec, not {type(codec).__name__}")
