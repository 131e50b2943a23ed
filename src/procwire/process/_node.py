"""Node's IPC message conventions, sans-IO: internal messages and handle passing.

On Node's IPC channel every message is one JSON value per line. An object whose ``cmd`` is a
string longer than 5 characters starting with ``NODE_`` is *internal*: Node hands it to its own
machinery ('internalMessage'), never to ``process.on('message')``. The ones that matter here:

* ``{"cmd": "NODE_HANDLE", "type": "net.Server" | "net.Socket" | ..., "msg": <user message>}``
  travels with one file descriptor (SCM_RIGHTS). The receiver answers
  ``{"cmd": "NODE_HANDLE_ACK"}``, or ``{"cmd": "NODE_HANDLE_NACK"}`` when no descriptor came;
  a NACK makes the sender retransmit (up to 3 times). Node's sender queues *every* later message
  until the ACK arrives, so a receiver that never answers stalls the channel.
* ``{"cmd": "NODE_PROCWIRE_START_FAILED", "target": ..., "error": ...}`` is procwire's own: the
  last line of a ``spawn(fn)`` child whose function could not be imported. It is named in
  Node's internal namespace so that every receiver, procwire's or Node's, keeps it from user
  code; the channel records it (``start_error``) for the ``StartFailed`` it raises at exit.
* Node's socket list (``lib/internal/socket_list.js``): a connection a Node ``net.Server``
  accepted and passed on carries ``"key"`` (the server's connection key) in its ``NODE_HANDLE``
  line, and the sender keeps asking the receiver about such sockets: ``NODE_SOCKET_GET_COUNT``
  (answered ``{"cmd": "NODE_SOCKET_COUNT", "key": k, "count": n}`` with how many of them are still
  open here; this is what the parent's ``server.getConnections()`` adds up) and
  ``NODE_SOCKET_NOTIFY_CLOSE`` (answered ``NODE_SOCKET_ALL_CLOSED`` once none is open any more;
  the parent's ``server.close()`` callback waits for it). A received socket counts as open until
  it is closed, detached or garbage-collected.
* Anything else (``NODE_CLUSTER``...) is dropped here: procwire does not speak Node's cluster
  sub-protocol.

``HandleProtocol`` decides what to do with each decoded message; the blocking and asyncio
channels do the I/O it asks for.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._errors import EncodeError, MessageTooLarge

__all__ = ["MAX_HANDLE_MESSAGE", "START_FAILED_CMD", "HandleProtocol", "is_internal",
           "make_handle_message"]

log = logging.getLogger("procwire.process")

START_FAILED_CMD = "NODE_PROCWIRE_START_FAILED"
ACK: dict[str, Any] = {"cmd": "NODE_HANDLE_ACK"}
NACK: dict[str, Any] = {"cmd": "NODE_HANDLE_NACK"}
#: A message sent with a handle must arrive in the same read as its descriptor (Node reads at
#: most 64 KiB at a time and drops a descriptor whose line is cut off); past this size,
#: ``send(msg, handle=)`` is refused with ``MessageTooLarge``.
MAX_HANDLE_MESSAGE = 16 * 1024
#: Handles sent and not yet acknowledged whose descriptor is kept for a retransmission.
MAX_UNACKED = 16
_MAX_RETRANSMISSIONS = 3


def is_internal(msg: Any) -> bool:
    """Node's rule for messages it keeps to itself."""
    if type(msg) is not dict:
        return False
    cmd = msg.get("cmd")
    return isinstance(cmd, str) and len(cmd) > 5 and cmd.startswith("NODE_")


def handle_type(sock: socket.socket) -> dict[str, Any]:
    """The ``type`` fields Node needs to rebuild ``sock`` on its side."""
    if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6,
                                                          socket.AF_UNIX):
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        return {"type": "net.Server" if listening else "net.Socket"}
    if sock.type == socket.SOCK_DGRAM and sock.family in (socket.AF_INET, socket.AF_INET6):
        return {"type": "dgram.Socket",
                "dgramType": "udp4" if sock.family == socket.AF_INET else "udp6"}
    raise EncodeError(f"cannot pass a {sock.family.name}/{sock.type.name} socket as a handle "
                      "(Node accepts TCP or UNIX stream sockets and UDP sockets)")


def make_handle_message(msg: Any, handle: Any) -> tuple[dict[str, Any], int]:
    """The ``NODE_HANDLE`` envelope for ``msg`` and the descriptor of ``handle`` (a socket or
    anything with ``fileno()``); raises ``EncodeError`` for what cannot be passed."""
    if isinstance(handle, socket.socket):
        sock = handle
        fd = sock.fileno()
        if fd < 0:
            raise EncodeError("cannot pass a closed socket as a handle")
        envelope = handle_type(sock)
    else:
        fileno = getattr(handle, "fileno", None)
        if fileno is None:
            raise EncodeError(f"a handle must be a socket (or have fileno()), "
                              f"not {type(handle).__name__}")
        fd = int(fileno())
        probe = socket.socket(fileno=fd)
        try:
            envelope = handle_type(probe)
        finally:
            probe.detach()
    return {"cmd": "NODE_HANDLE", **envelope, "msg": msg}, fd


def check_handle_size(payload_len: int) -> None:
    if payload_len > MAX_HANDLE_MESSAGE:
        raise MessageTooLarge(f"a message sent with a handle is limited to "
                              f"{MAX_HANDLE_MESSAGE} bytes (got {payload_len}): send the data "
                              "in a separate message")


@dataclass
class _Unacked:
    message: dict[str, Any]
    fd: int  # our own duplicate, kept for a retransmission
    retransmissions: int = 0


@dataclass
class Action:
    """What the channel must do for one received message.

    ``deliver``: hand ``message`` (and ``handle``) to the user. ``reply``: send ``reply`` (an
    ACK/NACK). ``resend``: send ``reply`` again with descriptor ``fd`` attached.
    ``start_error``: the peer could not start (``(target, error)``), keep it for its exit.
    """

    deliver: bool = False
    message: Any = None
    handle: socket.socket | None = None
    reply: dict[str, Any] | None = None
    resend_fd: int | None = None
    start_error: tuple[str, str] | None = None


class _CountedSocket(socket.socket):
    """A connection a Node server passed on, counted in Node's socket list until it closes."""

    __slots__ = ("_pw_release",)

    _pw_release: Callable[[], None] | None

    def _real_close(self) -> None:  # type: ignore[override]
        try:
            super()._real_close()  # type: ignore[misc]
        finally:
            self._pw_released()

    def detach(self) -> int:
        # The descriptor leaves our sight: count the socket as gone from here.
        try:
            return super().detach()
        finally:
            self._pw_released()

    def _pw_released(self) -> None:
        release, self._pw_release = self._pw_release, None
        if release is not None:
            release()


class HandleProtocol:
    """Per-channel state for handle passing: sent handles awaiting their ACK, and the received
    sockets Node's socket list asks about.

    ``receive(msg, take_fd)`` classifies one decoded message; ``take_fd()`` returns the next
    descriptor the wire received (or None). ``later(msg)``, given by the channel, sends an
    internal message at any time from any thread (the ``NODE_SOCKET_ALL_CLOSED`` that a socket's
    close owes a waiting Node parent); it must not block on the channel's send lock when called
    from a garbage collection, so that path hands it to a short thread.
    """

    def __init__(self, later: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._unacked: deque[_Unacked] = deque()
        self._later = later
        self._lock = threading.Lock()
        self._open: dict[str | int, int] = {}     # socket-list key -> received sockets open
        self._waiting: dict[str | int, int] = {}  # key -> NODE_SOCKET_NOTIFY_CLOSE unanswered

    def _count(self, key: str | int, fd: int) -> socket.socket:
        sock = _CountedSocket(fileno=fd)
        done = threading.Event()  # set once: close, detach and finalizer race harmlessly

        def release(from_gc: bool = False) -> None:
            with self._lock:
                if done.is_set():
                    return
                done.set()
                left = self._open[key] = self._open.get(key, 1) - 1
                owed = self._waiting.pop(key, 0) if left <= 0 else 0
                if left <= 0:
                    del self._open[key]
            if owed and self._later is not None:
                msgs = [{"cmd": "NODE_SOCKET_ALL_CLOSED", "key": key}] * owed
                if from_gc:
                    threading.Thread(target=self._send_all, args=(msgs,), daemon=True,
                                     name="procwire-socket-list").start()
                else:
                    self._send_all(msgs)

        sock._pw_release = release
        weakref.finalize(sock, release, True)
        with self._lock:
            self._open[key] = self._open.get(key, 0) + 1
        return sock

    def _send_all(self, msgs: list[dict[str, Any]]) -> None:
        assert self._later is not None
        for msg in msgs:
            self._later(msg)

    def open_sockets(self, key: str | int) -> int:
        """How many sockets received under socket-list ``key`` are still open."""
        with self._lock:
            return self._open.get(key, 0)

    def sent(self, message: dict[str, Any], fd: int) -> None:
        """A handle went out: keep a duplicate of its descriptor until the ACK."""
        if len(self._unacked) >= MAX_UNACKED:
            # The peer does not answer (or is not read): give up the oldest retransmission.
            _close(self._unacked.popleft().fd)
        self._unacked.append(_Unacked(message, os.dup(fd)))

    def receive(self, msg: Any, take_fd: Any) -> Action:
        if not is_internal(msg):
            return Action(deliver=True, message=msg)
        cmd = msg["cmd"]
        if cmd == "NODE_HANDLE":
            fd = take_fd()
            if fd is None:
                log.warning("procwire: a NODE_HANDLE message came without its descriptor; "
                            "asking the sender to retransmit")
                return Action(reply=NACK)
            try:
                key = _list_key(msg)
                if key is not None and msg.get("type") == "net.Socket":
                    handle = self._count(key, fd)
                else:
                    handle = socket.socket(fileno=fd)
            except OSError as exc:
                _close(fd)
                log.warning("procwire: received descriptor is not a socket: %s", exc)
                return Action(reply=NACK)
            return Action(deliver=True, message=msg.get("msg"), handle=handle, reply=ACK)
        if cmd == "NODE_HANDLE_ACK":
            if self._unacked:
                _close(self._unacked.popleft().fd)
            return Action()
        if cmd == "NODE_HANDLE_NACK":
            if not self._unacked:
                return Action()
            item = self._unacked[0]
            item.retransmissions += 1
            if item.retransmissions > _MAX_RETRANSMISSIONS:
                self._unacked.popleft()
                _close(item.fd)
                log.warning("procwire: the peer refused a handle %d times; dropped it",
                            _MAX_RETRANSMISSIONS)
                return Action()
            return Action(reply=item.message, resend_fd=item.fd)
        if cmd == START_FAILED_CMD:
            return Action(start_error=(str(msg.get("target")), str(msg.get("error"))))
        if cmd == "NODE_SOCKET_GET_COUNT":
            key = _list_key(msg)
            if key is None:
                return Action()
            return Action(reply={"cmd": "NODE_SOCKET_COUNT", "key": key,
                                 "count": self.open_sockets(key)})
        if cmd == "NODE_SOCKET_NOTIFY_CLOSE":
            key = _list_key(msg)
            if key is None:
                return Action()
            with self._lock:
                if self._open.get(key, 0) > 0:
                    self._waiting[key] = self._waiting.get(key, 0) + 1
                    return Action()
            return Action(reply={"cmd": "NODE_SOCKET_ALL_CLOSED", "key": key})
        return Action()  # Node's cluster messages: not ours to answer

    def close(self) -> None:
        while self._unacked:
            _close(self._unacked.popleft().fd)


def _list_key(msg: dict[str, Any]) -> str | int | None:
    """The socket-list key of a message (Node's is a string), None when absent or unusable."""
    key = msg.get("key")
    return key if isinstance(key, (str, int)) and not isinstance(key, bool) else None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
