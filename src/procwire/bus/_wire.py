"""The local broker's wire format, shared by the broker (``_broker.py``) and its client
(``_local.py``); sans-IO: no sockets here.

Every message is one length-prefixed frame (procwire's channel framing over ``unix://``) holding
a JSON array of four items: ``[kind, seq, name, body]``.

========  =========  ===========================================  ==============================
kind      direction  name / body                                  answer
========  =========  ===========================================  ==============================
hello     c -> b     client name / {pid, reply_to, channel,        ``welcome`` (same seq)
                     patterns, handles, queue, policy, version}
sub       c -> b     a glob pattern / null                         ``ok`` when seq > 0
unsub     c -> b     a glob pattern / null                         ``ok`` when seq > 0
handle    c -> b     a request name / null                         ``ok`` when seq > 0
unhandle  c -> b     a request name / null                         ``ok`` when seq > 0
pub       c -> b     event name / data                             ``ok`` with the receiver count
                                                                   when seq > 0
pubs      c -> b     "" / [[name, data], ...] (emit_many)          ``ok`` when seq > 0
req       c -> b     request name / {id, reply_to, data}           none: the reply, or a reply
                                                                   ``{id, no_responder: true}``
rep       c -> b     the requester's reply_to / {id, data|error}   none
stats     c -> b     "" / null                                     ``ok`` with the broker's stats
pub       b -> c     the publisher's frame, byte for byte
pubs      b -> c     the publisher's frame, or the part of it for this client
req       b -> c     the requester's frame, byte for byte (to one handler)
rep       b -> c     the responder's frame, byte for byte
ok / err  b -> c     "" / result, or {type, message}
notice    b -> c     ``procwire.gap`` / {reason, dropped...}
bye       b -> c     the reason / null; the broker then closes the connection
========  =========  ===========================================  ==============================

The broker decodes only ``kind``, ``seq`` and ``name`` (the body stays raw bytes) and forwards a
publisher's frame unchanged to every matching subscriber: one encode in the publisher, one
decode in each subscriber, none in the broker.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .._errors import DecodeError, EncodeError, MessageTooLarge
from ..codecs import _has_nonfinite
from ._core import Event

__all__ = ["VERSION", "BrokerFrame", "ClientFrame", "WireCodec", "batch_frame", "encode_batch",
           "encode_frame", "encode_item"]

VERSION = 1


class BrokerFrame(msgspec.Struct, array_like=True):
    """What the broker reads: the body is left as raw JSON bytes."""

    kind: str
    seq: int
    name: str = ""
    body: msgspec.Raw = msgspec.Raw(b"null")


class ClientFrame(msgspec.Struct, array_like=True):
    """What a client reads: the body decoded."""

    kind: str
    seq: int
    name: str = ""
    body: Any = None


_encoder = msgspec.json.Encoder()
decode_broker_frame = msgspec.json.Decoder(BrokerFrame).decode
_decode_client = msgspec.json.Decoder(ClientFrame).decode
# A ``pubs`` frame as the broker writes it, its items decoded straight into Events (in C: no
# list per item and no Event built in Python).
_decode_pubs = msgspec.json.Decoder(tuple[str, int, str, list[Event]]).decode
_PUBS = b'["pubs",'


def decode_client_frame(data: bytes | bytearray | memoryview) -> ClientFrame:
    """A frame from the broker; a ``pubs`` frame's body is a list of ``Event``. A ``pubs``
    frame whose items are not all ``[str, data]`` pairs keeps its raw lists (the reader
    counts it as bad)."""
    if data[:8] == _PUBS:
        try:
            kind, seq, name, events = _decode_pubs(data)
            return ClientFrame(kind, seq, name, events)
        except msgspec.ValidationError:
            pass
    return _decode_client(data)


def encode_frame(kind: str, seq: int, name: str, body: Any, limit: int | None = None) -> bytes:
    """One frame's payload; ``EncodeError`` for data JSON cannot carry (NaN included),
    ``MessageTooLarge`` past ``limit`` bytes (nothing is sent then)."""
    try:
        data = _encoder.encode((kind, seq, name, body))
    except RecursionError as exc:
        raise EncodeError("json cannot encode data nested this deeply") from exc
    except (TypeError, msgspec.EncodeError, OverflowError) as exc:
        raise EncodeError(f"json cannot encode {type(body).__name__}: {exc}") from exc
    # msgspec writes NaN/inf as null; a silent change of value is worse than an error.
    if b"null" in data and _has_nonfinite(body):
        raise EncodeError("json cannot encode NaN or infinity (use null)")
    if limit is not None and len(data) > limit:
        raise MessageTooLarge(f"{len(data)} bytes of JSON exceed the limit of {limit} "
                              "(nothing was sent)")
    return data


def encode_item(name: str, data: Any, limit: int | None = None) -> bytes:
    """One ``[name, data]`` item of a ``pubs`` batch (checked like ``encode_frame``)."""
    try:
        out = _encoder.encode((name, data))
    except RecursionError as exc:
        raise EncodeError("json cannot encode data nested this deeply") from exc
    except (TypeError, msgspec.EncodeError, OverflowError) as exc:
        raise EncodeError(f"json cannot encode {type(data).__name__}: {exc}") from exc
    if b"null" in out and _has_nonfinite(data):
        raise EncodeError("json cannot encode NaN or infinity (use null)")
    if limit is not None and len(out) > limit:
        raise MessageTooLarge(f"{len(out)} bytes of JSON exceed the limit of {limit} "
                              "(nothing was sent)")
    return out


def encode_batch(events: list[tuple[str, Any]], limit: int) -> bytes | None:
    """All of ``events`` as one JSON array of ``[name, data]`` pairs (one encoder call, not one
    per event), or None when that is not possible in one frame: over ``limit`` bytes, or some
    event that JSON cannot carry (the caller then encodes item by item with ``encode_item``,
    which splits the batch into frames or raises the precise error)."""
    try:
        out = _encoder.encode(events)
    except (TypeError, msgspec.EncodeError, OverflowError, RecursionError):
        return None
    if len(out) > limit or (b"null" in out and any(_has_nonfinite(d) for _, d in events)):
        return None
    return out


def batch_frame(seq: int, items: list[bytes]) -> bytes:
    """A ``pubs`` frame from items made by ``encode_item``."""
    return b'["pubs",%d,"",[' % seq + b",".join(items) + b"]]"


class WireCodec:
    """The client's codec: frames go out as bytes made by ``encode_frame``; frames come in
    decoded into ``ClientFrame``."""

    name = "json"
    safe = True
    fast_encode = memoryview
    fast_decode = staticmethod(decode_client_frame)

    def encode(self, obj: Any) -> bytes | bytearray | memoryview:
        if isinstance(obj, bytes | bytearray | memoryview):
            return obj
        raise EncodeError(f"broker frames are bytes, not {type(obj).__name__}")

    def decode(self, data: bytes | bytearray | memoryview) -> ClientFrame:
        try:
            return decode_client_frame(data)
        except RecursionError as exc:
            raise DecodeError("not a broker frame: JSON nested too deeply", bytes(data)) from exc
        except (msgspec.DecodeError, ValueError) as exc:
            raise DecodeError(f"not a broker frame: {exc}", bytes(data)) from exc
