"""procwire: every way processes talk.

Blocking API here; the asyncio twin with the same names is ``procwire.aio``.

>>> import procwire
>>> a, b = procwire.pipe()
>>> a.send({"hello": "world"})
>>> b.recv(timeout=5)
{'hello': 'world'}
>>> a.close(); b.close()
"""

from __future__ import annotations

from ._errors import (
    AddressError,
    AddressInUse,
    AuthenticationError,
    ChannelClosed,
    ChildExited,
    ConnectionClosed,
    ConnectionRefused,
    CrashLoop,
    DecodeError,
    EncodeError,
    FrameTooLarge,
    InsecureError,
    LeaseLost,
    MessageTooLarge,
    NoParentChannel,
    NoResponder,
    ProcwireError,
    ProtocolError,
    QueueError,
    RemoteError,
    Timeout,
)
from ._sync.channel import Channel, Listener, connect, listen, pipe
from ._version import __version__
from .bus import Bus
from .cluster import Cluster, Message, WorkerInfo, worker
from .codecs import Codec, get_codec
from .process import Child, IpcChannel, parent, spawn
from .queue import Job, Queue

__all__ = [
    "AddressError",
    "AddressInUse",
    "AuthenticationError",
    "Bus",
    "Channel",
    "ChannelClosed",
    "Child",
    "ChildExited",
    "Cluster",
    "Codec",
    "ConnectionClosed",
    "ConnectionRefused",
    "CrashLoop",
    "DecodeError",
    "EncodeError",
    "FrameTooLarge",
    "InsecureError",
    "IpcChannel",
    "Job",
    "LeaseLost",
    "Listener",
    "Message",
    "MessageTooLarge",
    "NoParentChannel",
    "NoResponder",
    "ProcwireError",
    "ProtocolError",
    "Queue",
    "QueueError",
    "RemoteError",
    "Timeout",
    "WorkerInfo",
    "__version__",
    "connect",
    "get_codec",
    "listen",
    "parent",
    "pipe",
    "spawn",
    "worker",
]
