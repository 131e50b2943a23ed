"""Children with a message channel: Node's ``fork()`` for Python, and across languages.

>>> import procwire.process as pp
>>> echo = "process.on('message', m => process.send(m))"
>>> child = pp.spawn(["node", "-e", echo])                  # doctest: +SKIP
>>> child.send({"hi": 1}); child.recv(timeout=5)           # doctest: +SKIP
{'hi': 1}

The channel is Node's own IPC protocol (a socketpair on the descriptor named by
``NODE_CHANNEL_FD``, one compact JSON value per line), so a Python child works under Node's
``child_process.fork()`` and a Node child under ``spawn()``; sockets pass either way
(``send(msg, handle=sock)``, Node's ``NODE_HANDLE`` format). ``channel="stdio"`` talks JSON
lines over the child's stdin/stdout instead. ``procwire.process.aio`` is the asyncio twin.
See docs/processes.md.
"""

from __future__ import annotations

from ._channel import IpcChannel
from ._child import Child, parent, spawn
from ._errors import ChildExited, NoParentChannel, StartFailed
from ._node import MAX_HANDLE_MESSAGE, is_internal

__all__ = [
    "MAX_HANDLE_MESSAGE",
    "Child",
    "ChildExited",
    "IpcChannel",
    "NoParentChannel",
    "StartFailed",
    "is_internal",
    "parent",
    "spawn",
]
