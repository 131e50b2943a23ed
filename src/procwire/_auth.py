"""Run the shared-key handshake (``procwire.protocol.handshake``) over a message stream.

The stream's converter is still the identity during the handshake, so ``receive`` yields bytes.
The peer may send user messages right behind its last handshake frame; they can arrive in the
same read as that frame, so whatever follows it is pushed back with ``unreceive`` for the channel.
"""

from __future__ import annotations

import os
from typing import Any

from ._errors import ConnectionClosed, ProcwireError, Timeout
from .protocol.handshake import MAX_FRAME, NONCE_SIZE, Done, Handshake, Role
from .protocol.handshake import Failed as HandshakeFailed
from .transports._sockstream import deadline_of, remaining
from .transports.base import AsyncMessageStream, MessageStream

__all__ = ["aclient_handshake", "aserver_handshake", "client_handshake", "server_handshake"]

# Time granted to push a FAILURE frame out before the caller closes the connection.
_FAILURE_FLUSH = 1.0


def _new(role: Role, key: bytes) -> Handshake:
    return Handshake(role, key, os.urandom(NONCE_SIZE))


def _timeout_error(role: Role, timeout: float) -> Timeout:
    peer = "server" if role == "client" else "client"
    return Timeout(f"auth handshake with the {peer} not finished within {timeout:.3g} s")


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    # A converter other than the identity was set too early: nothing a handshake can read.
    raise TypeError(f"handshake needs raw frames, got {type(item).__name__}")


# -- blocking -------------------------------------------------------------------------------
#
# A failed send does not end the handshake at once: the peer may have rejected us and closed
# while our next frame was on its way, and its FAILURE verdict is still there to read. That
# verdict (AuthenticationError) is the truer error; the ConnectionClosed is raised only if none
# comes.

class _Driver:
    def __init__(self, hs: Handshake, timeout: float) -> None:
        self.hs = hs
        self.timeout = timeout
        self.deadline = deadline_of(timeout)
        self.broken: ConnectionClosed | None = None

    def left(self) -> float | None:
        return remaining(self.deadline)

    def flush_budget(self) -> float:
        left = self.left()
        return _FAILURE_FLUSH if left is None else min(left, _FAILURE_FLUSH)

    def timed_out(self) -> Timeout:
        return _timeout_error(self.hs.role, self.timeout)


def _drive(stream: MessageStream, hs: Handshake, timeout: float) -> None:
    d = _Driver(hs, timeout)

    def send(frames: list[bytes]) -> None:
        for frame in frames:
            if d.broken is not None:
                return
            try:
                stream.send(frame, d.left())
            except ConnectionClosed as exc:
                d.broken = exc

    try:
        send(hs.initial())
        while True:
            try:
                items = stream.receive(d.left())
            except ConnectionClosed:
                if d.broken is not None:
                    raise d.broken from None
                raise
            for i, item in enumerate(items):
                step = hs.receive(_as_bytes(item))
                send(step.send)
                if isinstance(step.event, HandshakeFailed):
                    if step.send and d.broken is None:
                        try:
                            stream.flush(d.flush_budget())
                        except (ProcwireError, OSError):
                            pass  # the verdict is ours either way
                    raise step.event.error
                if isinstance(step.event, Done):
                    if d.broken is not None:
                        raise d.broken
                    if i + 1 < len(items):
                        stream.unreceive(items[i + 1:])
                    return
    except Timeout as exc:
        raise d.timed_out() from exc


def client_handshake(stream: MessageStream, key: bytes, timeout: float) -> None:
    """Prove ``key`` to the server and check that it knows it too (blocking).

    Raises ``AuthenticationError`` (different key), ``ProtocolError`` (the server does not
    speak the handshake), ``ConnectionClosed`` or ``Timeout``. The caller closes the stream.
    """
    _drive(stream, _new("client", key), timeout)


def server_handshake(stream: MessageStream, key: bytes, timeout: float) -> None:
    """Challenge a newly accepted client and prove ``key`` back to it (blocking).

    Raises like ``client_handshake``; only this connection is affected. Until the client has
    proved the key, frames over ``MAX_FRAME`` bytes are refused as soon as their header
    arrives, so an unauthenticated peer cannot make the server read a large frame.
    """
    limit = getattr(stream, "limit_frames", None)
    if limit is not None:
        limit(MAX_FRAME)
    try:
        _drive(stream, _new("server", key), timeout)
    finally:
        if limit is not None:
            limit(None)


# -- asyncio (the same steps, awaited) ------------------------------------------------------

async def _adrive(stream: AsyncMessageStream, hs: Handshake, timeout: float) -> None:
    d = _Driver(hs, timeout)

    async def send(frames: list[bytes]) -> None:
        for frame in frames:
            if d.broken is not None:
                return
            try:
                await stream.send(frame, d.left())
            except ConnectionClosed as exc:
                d.broken = exc

    try:
        await send(hs.initial())
        while True:
            try:
                items = await stream.receive(d.left())
            except ConnectionClosed:
                if d.broken is not None:
                    raise d.broken from None
                raise
            for i, item in enumerate(items):
                step = hs.receive(_as_bytes(item))
                await send(step.send)
                if isinstance(step.event, HandshakeFailed):
                    if step.send and d.broken is None:
                        try:
                            await stream.flush(d.flush_budget())
                        except (ProcwireError, OSError):
                            pass
                    raise step.event.error
                if isinstance(step.event, Done):
                    if d.broken is not None:
                        raise d.broken
                    if i + 1 < len(items):
                        stream.unreceive(items[i + 1:])
                    return
    except Timeout as exc:
        raise d.timed_out() from exc


async def aclient_handshake(stream: AsyncMessageStream, key: bytes, timeout: float) -> None:
    """The asyncio twin of ``client_handshake``."""
    await _adrive(stream, _new("client", key), timeout)


async def aserver_handshake(stream: AsyncMessageStream, key: bytes, timeout: float) -> None:
    limit = getattr(stream, "limit_frames", None)
    if limit is not None:
        limit(MAX_FRAME)
    try:
        await _aserver_handshake(stream, key, timeout)
    finally:
        if limit is not None:
            limit(None)


async def _aserver_handshake(stream: AsyncMessageStream, key: bytes, timeout: float) -> None:
    """The asyncio twin of ``server_handshake``."""
    await _adrive(stream, _new("server", key), timeout)
