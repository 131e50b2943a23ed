"""The procwire exception tree.

Every error procwire raises derives from one root, named for what happened::

    ProcwireError
     +-- ConnectionClosed          the peer went away (EOF, reset, killed); carries .reason
     |    +-- ConnectionRefused    nothing listens at the address (and retry gave up)
     |    +-- ChildExited          a spawned child ended (.returncode, .pid)
     +-- Timeout                   a blocking call ran out of time (also a builtin TimeoutError)
     +-- ProtocolError             the bytes on the wire do not follow the protocol
     |    +-- FrameTooLarge        a frame bigger than max_frame_size (sent or announced)
     |    +-- DecodeError          one message could not be decoded; the channel stays usable
     +-- EncodeError               an object the codec cannot encode (also a TypeError-like misuse)
     +-- AuthenticationError       the shared-key challenge failed, or TLS verification failed
     +-- AddressError              a URL procwire cannot use (bad scheme, missing part)
     |    +-- AddressInUse         something already listens there
     +-- InsecureError             a configuration refused for safety (pickle without auth,
     |                             non-loopback TCP without auth or TLS)
     +-- MessageTooLarge           a message over a datagram transport's size limit
     +-- ChannelClosed             this side already closed the channel
     +-- NoParentChannel           parent() in a process that has no parent channel
     +-- CrashLoop                 a cluster worker crashed too often; the cluster stopped
     +-- NoResponder               bus.request(): nobody handles that name
     +-- RemoteError               bus.request(): the remote handler raised (.type, .message)
     +-- QueueError                a queue's store failed (SQLite or Redis error)
          +-- LeaseLost            ack/nack/extend from a holder whose lease is gone

Foreign exceptions (``OSError``, ``ssl.SSLError``, ``msgspec.DecodeError``) are translated at
the boundary; the original is kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "AddressInUse",
    "AuthenticationError",
    "ChannelClosed",
    "ChildExited",
    "ConnectionClosed",
    "ConnectionRefused",
    "CrashLoop",
    "DecodeError",
    "EncodeError",
    "FrameTooLarge",
    "InsecureError",
    "LeaseLost",
    "MessageTooLarge",
    "NoParentChannel",
    "NoResponder",
    "ProcwireError",
    "ProtocolError",
    "QueueError",
    "RemoteError",
    "Timeout",
]


class ProcwireError(Exception):
    """Root of every error procwire raises."""


class ConnectionClosed(ProcwireError):
    """The connection ended: the peer closed it, reset it, or died.

    ``reason`` says how (``"eof"``, ``"reset"``, ``"broken pipe"``...). Messages that arrived
    before the end were all delivered before this is raised.
    """

    def __init__(self, message: str = "connection closed", *, reason: str = "eof") -> None:
        super().__init__(message)
        self.reason = reason


class ConnectionRefused(ConnectionClosed):
    """Nothing accepted the connection (and ``retry=`` gave up, if it was on)."""

    def __init__(self, message: str = "connection refused") -> None:
        super().__init__(message, reason="refused")


class Timeout(ProcwireError, TimeoutError):
    """A blocking call ran out of time. Also a builtin ``TimeoutError``."""


class ProtocolError(ProcwireError):
    """The bytes received do not follow the protocol; the connection is closed."""


class FrameTooLarge(ProtocolError):
    """A frame larger than ``max_frame_size``: announced by the peer, or about to be sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds max_frame_size={limit}")
        self.size = size
        self.limit = limit


class DecodeError(ProtocolError):
    """One message could not be decoded by the codec.

    The framing is intact, so the channel stays open: the next ``recv()`` returns the next
    message. ``payload`` holds (up to 1 KiB of) the undecodable bytes.
    """

    def __init__(self, message: str, payload: bytes = b"") -> None:
        super().__init__(message)
        self.payload = payload[:1024]


class EncodeError(ProcwireError, TypeError):
    """The codec cannot encode this object (nothing was sent)."""


class AuthenticationError(ProcwireError):
    """The peer failed the shared-key challenge, or TLS verification failed."""


class AddressError(ProcwireError, ValueError):
    """A URL procwire cannot use."""


class AddressInUse(AddressError):
    """Something already listens at this address."""


class InsecureError(ProcwireError):
    """Refused for safety; the message says what to pass to do it anyway."""


class MessageTooLarge(ProcwireError, ValueError):
    """A message larger than a datagram transport can carry (nothing was sent)."""


class ChannelClosed(ProcwireError):
    """This side already closed the channel or listener."""


class QueueError(ProcwireError):
    """The queue's store failed (an SQLite or Redis error); the original is ``__cause__``."""


class LeaseLost(QueueError):
    """An ack, nack, extend or fail from a holder whose lease was granted to someone else
    (or whose job was acked, failed or purged meanwhile). Nothing was changed.

    ``ids`` lists the jobs concerned (one for ``Job.ack()``, possibly several for
    ``Queue.ack_many()``).
    """

    def __init__(self, message: str, ids: list[int] | None = None) -> None:
        super().__init__(message)
        self.ids = list(ids or [])


class NoResponder(ProcwireError):
    """``request()`` found no bus that handles this name (nothing will answer, so no waiting)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no responder handles {name!r}")
        self.name = name


class RemoteError(ProcwireError):
    """The remote handler raised. ``type`` is its exception's class name, ``message`` its text.

    >>> str(RemoteError("add", "ValueError", "x must be positive"))
    "handler for 'add' raised ValueError: x must be positive"
    """

    def __init__(self, name: str, type: str, message: str) -> None:
        super().__init__(f"handler for {name!r} raised {type}: {message}")
        self.name = name
        self.type = type
        self.message = message


class ChildExited(ConnectionClosed):
    """The child process ended, which closed its channel.

    ``returncode`` is its exit status as ``subprocess`` reports it (negative: killed by that
    signal); ``pid`` its process id. Every message it sent before exiting was delivered first.
    """

    def __init__(self, message: str, *, returncode: int, pid: int) -> None:
        super().__init__(message, reason="exit")
        self.returncode = returncode
        self.pid = pid


class NoParentChannel(ProcwireError, RuntimeError):
    """``parent()`` was called in a process that has no parent channel (it was not started by
    ``procwire.spawn`` or Node's ``child_process.fork``), or whose channel cannot be used."""


class CrashLoop(ProcwireError):
    """A worker crashed more than ``max_restarts`` times within ``restart_window`` seconds, so
    the cluster stopped all its workers. ``worker_id`` is the worker that tripped the limit,
    ``returncode`` its last exit status, ``restarts`` how many restarts the window held."""

    def __init__(self, message: str, *, worker_id: int, returncode: int | None,
                 restarts: int) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.returncode = returncode
        self.restarts = restarts
