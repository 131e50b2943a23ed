"""Requests straight from one bus to another, past the broker (the local broker's fast path).

A blocking ``Bus`` that handles requests listens on a socket of its own next to the broker's
(``<broker folder>/.pw-rr-<pid>-<random>.sock``, 0600) and tells the broker its path. When a
requester's request goes through the broker to a name that exactly ONE bus handles, the broker
also sends that requester the path ("route"); the requester's next requests for that name go
straight to the handling bus, whose connection thread runs the handler and writes the reply back
on the same connection: two processes and no thread hand-off, instead of three processes and
two broker passes. When a second bus starts handling the name, or the bus stops, the broker
withdraws the route, and the requester goes back through the broker.

Frames are the broker's (``_wire``): ``["req", 0, name, {"id", "data"}]`` in,
``["rep", 0, "", {"id", "data" | "error"}]`` out, or ``{"id", "moved": true}`` when this bus
does not answer ``name`` (any more): nothing ran, and the requester goes through the broker.

This module is the handling side (``DirectServer``); the requesting side is in ``_local``.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

from .._errors import EncodeError, MessageTooLarge, ProcwireError, Timeout
from .._sync.channel import Channel, Listener
from .._sync.channel import listen as sync_listen
from ._paths import DIRECT_PREFIX
from ._wire import ClientFrame, WireCodec, encode_frame

__all__ = ["DirectServer"]

log = logging.getLogger("procwire.bus")

MAX_CONNECTIONS = 32  # requesters served straight at once; more are refused (they use the broker)
_ACCEPT_SLICE = 0.5  # the accept thread's wait between checks for close


# (name, request) -> the reply, or None when this bus does not answer name (now).
Answer = Callable[[str, dict[str, Any]], "dict[str, Any] | None"]


class DirectServer:
    """Serves requests for the names a bus handles, one thread per requester connection."""

    def __init__(self, folder: str, answer: Answer, limit: int) -> None:
        self.path = os.path.join(folder, f"{DIRECT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
                                 ".sock")
        if len(os.fsencode(self.path)) > 104:
            raise ValueError(f"{self.path!r} is too long for a UNIX socket")
        self._answer = answer
        self._limit = limit
        self._lock = threading.Lock()
        self._conns: set[Channel] = set()
        self._closed = False
        self.draining = False  # closing: every request is answered "moved"
        self._pid = os.getpid()
        self.served = 0
        self.moved = 0
        self.refused = 0
        self._listener: Listener = sync_listen("unix://" + self.path, codec=WireCodec(),
                                               max_frame_size=limit)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="procwire-bus-direct")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                ch = self._listener.accept(timeout=_ACCEPT_SLICE)
            except Timeout:
                continue
            except (ProcwireError, OSError):
                if self._closed:
                    return
                log.warning("procwire bus: the direct request socket failed; requests go "
                            "through the broker", exc_info=True)
                return
            with self._lock:
                full = len(self._conns) >= MAX_CONNECTIONS
                if not full and not self._closed:
                    self._conns.add(ch)
            if full or self._closed:
                self.refused += 1
                _close(ch)
                continue
            threading.Thread(target=self._serve, args=(ch,), daemon=True,
                             name="procwire-bus-direct-conn").start()

    def _serve(self, ch: Channel) -> None:
        """One requester: read a request, run the handler here, write its reply; until the
        requester closes (or this server does)."""
        try:
            while not self._closed:
                try:
                    f: ClientFrame = ch.recv()
                except ProcwireError as exc:
                    if type(exc).__name__ == "DecodeError":
                        log.warning("procwire bus: a bad frame on a direct request "
                                    "connection: %s; closing it", exc)
                    return  # closed, broken or garbage: the requester falls back
                body = f.body
                if f.kind != "req" or not isinstance(body, dict) or "id" not in body:
                    log.warning("procwire bus: a direct request connection sent %r; closing "
                                "it", f.kind)
                    return
                cid = body["id"]
                reply = None if self.draining else self._answer(f.name, body)
                if reply is None:
                    self.moved += 1
                    reply = {"id": cid, "moved": True}
                else:
                    self.served += 1
                try:
                    data = encode_frame("rep", 0, "", reply, self._limit)
                except (EncodeError, MessageTooLarge) as exc:
                    data = encode_frame("rep", 0, "", {"id": cid, "error": {
                        "type": type(exc).__name__, "message": str(exc)}}, self._limit)
                ch.send(data, timeout=10.0)
        except (ProcwireError, OSError) as exc:
            log.debug("procwire bus: a direct request connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(ch)
            _close(ch)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            n = len(self._conns)
        return {"direct_connections": n, "direct_served": self.served,
                "direct_moved": self.moved, "direct_refused": self.refused}

    def close(self, timeout: float | None) -> None:
        """Stop accepting, close every connection (a requester waiting on one falls back or
        is told its responder went away), remove the socket file."""
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            return  # a forked child: the socket and threads are the parent's
        try:
            self._listener.close()
        except (ProcwireError, OSError):
            pass
        with self._lock:
            conns = list(self._conns)
        for ch in conns:
            _close(ch)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def _close(ch: Channel) -> None:
    try:
        ch.close(0)
    except (ProcwireError, OSError):
        pass
