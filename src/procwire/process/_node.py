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
* Anything else (``NODE_CLUSTER``, ``NODE_SOCKET_*``...) is dropped here: procwire speaks none of
  Node's cluster or socket-list sub-protocols.

``HandleProtocol`` decides what to do with each decoded message; the blocking and asyncio
channels do the I/O it asks for.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
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


class HandleProtocol:
    """Per-channel state for handle passing: sent handles awaiting their ACK.

    ``receive(msg, take_fd)`` classifies one decoded message; ``take_fd()`` returns the next
    descriptor the wire received (or None).
    """

    def __init__(self) -> None:
        self._unacked: deque[_Unacked] = deque()

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
        return Action()  # Node's cluster / socket-list messages: not ours to answer

    def close(self) -> None:
        while self._unacked:
            _close(self._unacked.popleft().fd)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
