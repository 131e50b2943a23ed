"""The interface every transport implements: streams of whole messages (payload bytes).

A *message stream* carries opaque payloads; the channel above it applies the codec. Byte-stream
transports (UNIX, TCP, TLS, pipes) add framing from ``procwire.protocol.framing``; datagram and
file transports carry one message per datagram or file.

Conversion: ``receive()`` returns items already passed through the stream's *converter* (the
channel sets it to the codec's decode), because a frame is a view into a reused buffer and must
be decoded before the next read. A converter that raises yields a ``Failed`` item in place, so one
bad message does not lose its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..protocol.framing import DEFAULT_MAX_FRAME_SIZE

Buffer = bytes | bytearray | memoryview
Converter = Callable[[Buffer], Any]

DEFAULT_WRITE_BUFFER = 4 * 1024 * 1024
DEFAULT_INBOX = 4 * 1024 * 1024


class Failed:
    """Stands in the received list for a message whose conversion raised."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def convert_all(frames: Sequence[Buffer], convert: Converter,
                safe: Converter | None = None) -> list[Any]:
    """Convert each frame; a frame that fails becomes a ``Failed`` in its place.

    ``convert`` is the fast path (e.g. msgspec's decoder itself); when it raises, every frame
    of the batch is converted again with ``safe`` (the codec's ``decode``, which raises
    procwire's typed errors), so the bad frame gets a clear error and the others are kept.
    """
    try:
        return [convert(f) for f in frames]
    except Exception:
        pass
    slow = safe or convert
    out: list[Any] = []
    for f in frames:
        try:
            out.append(slow(f))
        except Exception as exc:
            out.append(Failed(exc))
    return out


@dataclass
class TransportOptions:
    """Options common to every transport; transport-specific ones are in ``extra``.

    ``write_buffer``: bytes a sender may queue in user space before ``send`` blocks (and then
    times out). ``inbox``: bytes of received, not yet consumed messages an asyncio stream keeps
    before it stops reading from the socket (the kernel buffer then pushes back on the sender).
    """

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    auth: bytes | None = None
    insecure: bool = False
    write_buffer: int = DEFAULT_WRITE_BUFFER
    inbox: int = DEFAULT_INBOX
    backlog: int = 128
    extra: dict[str, Any] = field(default_factory=dict)


class MessageStream(Protocol):
    """Blocking, thread-safe stream of whole messages."""

    reliable: bool
    local_address: str
    remote_address: str

    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None: ...

    def unreceive(self, items: list[Any]) -> None: ...

    def send(self, payload: Buffer, timeout: float | None = None) -> None: ...

    def receive(self, timeout: float | None = None) -> list[Any]: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class AsyncMessageStream(Protocol):
    """The asyncio twin of ``MessageStream``."""

    reliable: bool
    local_address: str
    remote_address: str

    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None: ...

    def unreceive(self, items: list[Any]) -> None: ...

    async def send(self, payload: Buffer, timeout: float | None = None) -> None: ...

    async def receive(self, timeout: float | None = None) -> list[Any]: ...

    async def flush(self, timeout: float | None = None) -> None: ...

    async def close(self, timeout: float | None = None) -> None: ...


class ListenerBackend(Protocol):
    address: str

    def accept(self, timeout: float | None = None) -> MessageStream: ...

    def close(self) -> None: ...


class AsyncListenerBackend(Protocol):
    address: str

    async def accept(self, timeout: float | None = None) -> AsyncMessageStream: ...

    async def close(self) -> None: ...
