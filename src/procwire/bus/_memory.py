"""``memory://name``: buses in one process (threads, tests). Every bus opened on the same name
sees the others' events. Data travels as JSON (encoded once per emit, decoded once per emit), so
what works here works across processes, and a receiver cannot mutate the sender's object.

Delivery happens in the emitting thread: when ``emit`` returns, the event sits in every
matching subscription's buffer (or the emit waited for room, under the ``block`` policy).
A request goes to exactly one of the buses handling its name, in turn (as on the broker).
"""

from __future__ import annotations

import itertools
import threading
import uuid
from typing import Any

import msgspec

from .._errors import AddressError, ChannelClosed, MessageTooLarge
from ..codecs import JsonCodec
from ._backend import Backend, Sink

__all__ = ["MemoryBackend"]

_lock = threading.Lock()
_hubs: dict[str, _Hub] = {}
_json = JsonCodec()
_decode = msgspec.json.decode


class _Hub:
    def __init__(self) -> None:
        self.buses: list[MemoryBackend] = []
        self.responders: dict[str, list[MemoryBackend]] = {}
        self.by_reply: dict[str, MemoryBackend] = {}
        self.turn = itertools.count()  # round robin among a name's responders


class MemoryBackend(Backend):
    """In-process backend; see the module docstring."""

    def __init__(self, url: str, *, max_message_size: int = 1 << 20, **_: Any) -> None:
        name = url.split("://", 1)[1] if "://" in url else ""
        if not name:
            raise AddressError(f"{url!r}: no name (use memory://NAME)")
        self.url = url
        self.name = name
        self.max_message_size = max_message_size
        self.reply_to = uuid.uuid4().hex
        self._sink: Sink | None = None
        self._hub: _Hub | None = None

    def _copy(self, obj: Any) -> Any:
        data = _json.encode(obj)
        if len(data) > self.max_message_size:
            raise MessageTooLarge(f"{len(data)} bytes of JSON exceed max_message_size="
                                  f"{self.max_message_size}")
        return _decode(data)

    def _hub_or_raise(self) -> _Hub:
        if self._hub is None:
            raise ChannelClosed("this bus is closed")
        return self._hub

    def start(self, sink: Sink, timeout: float | None) -> None:
        self._sink = sink
        with _lock:
            hub = _hubs.setdefault(self.name, _Hub())
            hub.buses = [*hub.buses, self]  # copy on write: publishers iterate lock-free
            hub.by_reply[self.reply_to] = self
            self._hub = hub

    def publish(self, name: str, data: Any, timeout: float | None) -> int:
        hub = self._hub_or_raise()
        data = self._copy(data)
        buses = hub.buses
        for bus in buses:
            if bus._sink is not None:
                bus._sink.on_event(name, data)
        return len(buses)

    def request(self, name: str, request: dict[str, Any], timeout: float | None) -> int:
        hub = self._hub_or_raise()
        request = self._copy(request)
        targets = hub.responders.get(name)
        if not targets:
            return 0
        start = next(hub.turn)
        for k in range(len(targets)):  # exactly one, skipping one that is closing
            sink = targets[(start + k) % len(targets)]._sink
            if sink is not None:
                sink.on_request(name, request)
                return 1
        return 0

    def reply(self, reply_to: str, reply: dict[str, Any], timeout: float | None) -> None:
        hub = self._hub_or_raise()
        reply = self._copy(reply)
        target = hub.by_reply.get(reply_to)
        if target is not None and target._sink is not None:
            target._sink.on_reply(reply)

    def add_responder(self, name: str, timeout: float | None) -> None:
        hub = self._hub_or_raise()
        with _lock:
            hub.responders[name] = [*hub.responders.get(name, []), self]

    def remove_responder(self, name: str, timeout: float | None) -> None:
        hub = self._hub
        if hub is None:
            return
        with _lock:
            left = [b for b in hub.responders.get(name, []) if b is not self]
            if left:
                hub.responders[name] = left
            else:
                hub.responders.pop(name, None)

    def close(self, timeout: float | None) -> None:
        with _lock:
            hub, self._hub = self._hub, None
            if hub is None:
                return
            hub.buses = [b for b in hub.buses if b is not self]
            hub.by_reply.pop(self.reply_to, None)
            for name in list(hub.responders):
                left = [b for b in hub.responders[name] if b is not self]
                if left:
                    hub.responders[name] = left
                else:
                    del hub.responders[name]
            if not hub.buses and _hubs.get(self.name) is hub:
                del _hubs[self.name]
        self._sink = None
