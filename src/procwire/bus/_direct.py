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
does not answer ``name`` (any more), is closing, or serves ``MAX_CONNECTIONS`` requesters
already: nothing ran, and the requester goes through the broker.

Only in a folder that is this user's alone (a shared sticky folder such as ``/tmp`` holding the
broker's socket: no direct path), so that a route cannot lead to another user's socket.

This module is the handling side (``DirectServer``); the requesting side is in ``_local``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time
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

MAX_CONNECTIONS = 32  # requesters served straight at once; more are told "moved"
MAX_FRAME = 1 << 26  # the frame ceiling of a broker connection: the same on this path
_ACCEPT_SLICE = 0.5  # the accept thread's wait between checks for close
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


# (name, request) -> the reply, or None when this bus does not answer name (now).
Answer = Callable[[str, dict[str, Any]], "dict[str, Any] | None"]


def private_folder(folder: str) -> bool:
    """Is ``folder`` this user's and closed to others (no group/other write)?"""
    try:
        st = os.stat(folder)
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class DirectServer:
    """Serves requests for the names a bus handles, one thread per requester connection."""

    def __init__(self, folder: str, answer: Answer, limit: int) -> None:
        if not private_folder(folder):
            raise ValueError(f"{folder} is not this user's alone")
        self.path = os.path.join(folder, f"{DIRECT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
                                 ".sock")
        if len(os.fsencode(self.path)) > 104:
            raise ValueError(f"{self.path!r} is too long for a UNIX socket")
        self._answer = answer
        self._limit = limit
        self._cond = threading.Condition()
        self._conns: set[Channel] = set()
        self._threads: set[threading.Thread] = set()
        self._busy = 0  # requests being answered now
        self._mine = threading.local()  # a serving thread's own connection
        self._closed = False
        self._stopping = False  # close() began: the accept thread ends
        self.draining = False  # closing: every request is answered "moved"
        self._pid = os.getpid()
        self.served = 0
        self.moved = 0
        self.refused = 0
        self._listener: Listener = sync_listen("unix://" + self.path, codec=WireCodec(),
                                               max_frame_size=MAX_FRAME)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="procwire-bus-direct")
        self._thread.start()

    def _accept_loop(self) -> None:
        try:
            self._accept_until_closed()
        except BaseException:
            if not self._stopping:
                log.exception("procwire bus: the direct request socket's accept thread failed")
            raise
        finally:
            if not self._stopping:
                # No more connections here: close the listener (and remove its file), so that
                # requesters' connects fail and they go through the broker, not into a backlog
                # nobody accepts from.
                log.warning("procwire bus: direct requests to this bus go through the broker "
                            "from now on")
                self.draining = True
                try:
                    self._listener.close()
                except (ProcwireError, OSError):
                    pass

    def _accept_until_closed(self) -> None:
        pause = 0.05
        while not self._stopping:
            try:
                ch = self._listener.accept(timeout=_ACCEPT_SLICE)
            except Timeout:
                continue
            except OSError as exc:
                if self._stopping:
                    return
                if exc.errno in _TRANSIENT:  # out of descriptors or memory: try again soon
                    log.warning("procwire bus: the direct request socket cannot accept: %s; "
                                "retrying", exc)
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                log.error("procwire bus: the direct request socket failed: %s", exc)
                return
            except ProcwireError as exc:
                if self._stopping:
                    return
                log.error("procwire bus: the direct request socket failed: %s", exc)
                return
            pause = 0.05
            with self._cond:
                full = len(self._conns) >= MAX_CONNECTIONS or self._stopping
                if not full:
                    self._conns.add(ch)
                t = threading.Thread(target=self._serve, args=(ch, full), daemon=True,
                                     name="procwire-bus-direct-conn")
                self._threads.add(t)
            try:
                t.start()
            except RuntimeError as exc:  # no more threads
                log.warning("procwire bus: no thread for a direct request connection: %s", exc)
                with self._cond:
                    self._conns.discard(ch)
                    self._threads.discard(t)
                _close(ch)

    def _serve(self, ch: Channel, full: bool) -> None:
        """One requester: read a request, run the handler here, write its reply; until the
        requester closes (or this server does). ``full``: answer its first request "moved"
        (it goes through the broker) and close."""
        self._mine.ch = ch
        try:
            while not self._closed:
                try:
                    f: ClientFrame = ch.recv(5.0 if full else None)
                except ProcwireError as exc:
                    if type(exc).__name__ == "DecodeError":
                        log.warning("procwire bus: a bad frame on a direct request "
                                    "connection: %s; closing it", exc)
                    return  # closed, broken, garbage or silent: the requester falls back
                body = f.body
                if f.kind != "req" or not isinstance(body, dict) or "id" not in body:
                    log.warning("procwire bus: a direct request connection sent %r; closing "
                                "it", f.kind)
                    return
                cid = body["id"]
                with self._cond:
                    go = not (full or self.draining or self._closed)
                    if go:
                        self._busy += 1
                try:
                    reply = self._answer(f.name, body) if go else None
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
                finally:
                    if go:
                        with self._cond:
                            self._busy -= 1
                            self._cond.notify_all()
                if full:
                    self.refused += 1
                    return
        except (ProcwireError, OSError) as exc:
            log.debug("procwire bus: a direct request connection ended: %s", exc)
        finally:
            with self._cond:
                self._conns.discard(ch)
                self._threads.discard(threading.current_thread())
            _close(ch)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            n = len(self._conns)
        return {"direct_connections": n, "direct_served": self.served,
                "direct_moved": self.moved, "direct_refused": self.refused}

    def close(self, timeout: float | None) -> None:
        """Answer "moved" from now on; let the requests being answered finish (up to 1 s, or
        ``timeout``); stop each connection's input (a requester's next send fails: it goes
        through the broker) and answer "moved" to what already came; then close them all and
        remove the socket file."""
        if self._stopping:
            return
        self._stopping = True
        self.draining = True
        if self._pid != os.getpid():
            self._closed = True
            return  # a forked child: the socket and threads are the parent's
        me = threading.current_thread()
        own = getattr(self._mine, "ch", None)  # a handler closing its own bus
        end = time.monotonic() + (1.0 if timeout is None else min(timeout, 1.0))
        with self._cond:
            while self._busy > (1 if own is not None else 0):
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            conns = [ch for ch in self._conns if ch is not own]
            threads = [t for t in self._threads if t is not me]
        try:
            self._listener.close()
        except (ProcwireError, OSError):
            pass
        for ch in conns:
            _stop_input(ch)  # its thread answers what is buffered, then sees the end
        end = time.monotonic() + (1.0 if timeout is None else min(timeout, 1.0))
        for t in [self._thread, *threads]:
            if t is not me:
                t.join(max(0.0, end - time.monotonic()))
        self._closed = True  # (a handler's own connection: closed after its reply)
        with self._cond:
            conns = [ch for ch in self._conns if ch is not own]
        for ch in conns:
            _close(ch)


def _stop_input(ch: Channel) -> None:
    """``shutdown(SHUT_RD)`` on the connection's socket: what was sent is still read, and
    the requester's next send fails (EPIPE: "not sent", it goes through the broker)."""
    wire = getattr(getattr(ch, "_stream", None), "_wire", None)
    if wire is None:
        _close(ch)
    else:
        wire.shutdown(socket.SHUT_RD)


def _close(ch: Channel) -> None:
    try:
        ch.close(0)
    except (ProcwireError, OSError):
        pass
