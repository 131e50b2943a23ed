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

from typing import TYPE_CHECKING, Any

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
from .codecs import Codec, get_codec

if TYPE_CHECKING:
    from .bus import Bus
    from .cluster import Cluster, Message, WorkerInfo, worker
    from .process import Child, IpcChannel, parent, spawn
    from .queue import Job, Queue

# The patterns load on first use: a process that only needs a channel (or a worker that only
# needs its parent's) does not pay for importing the bus, queue and cluster packages.
_LAZY = {
    "Bus": "bus",
    "Cluster": "cluster", "Message": "cluster", "WorkerInfo": "cluster", "worker": "cluster",
    "Child": "process", "IpcChannel": "process", "parent": "process", "spawn": "process",
    "Job": "queue", "Queue": "queue",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'procwire' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

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
