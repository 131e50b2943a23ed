"""The event bus: EventEmitter-style events and request/reply across threads, processes and
machines.

>>> from procwire.bus import Bus
>>> with Bus("memory://demo") as bus:
...     _ = bus.handle("add", lambda d: d["x"] + d["y"])
...     bus.request("add", {"x": 1, "y": 2}, timeout=1)
3

Backends by URL: none (the default) or ``broker://[/path.sock]``: this user's local broker, a
process started on demand that routes events by pattern between the processes of one machine;
``memory://NAME`` (one process); ``redis://HOST:PORT/DB`` / ``rediss://`` (JSON
``{"event": name, "data": data}`` on a Redis channel, so Node with ioredis can join).
See docs/bus.md.
"""

from __future__ import annotations

from ._backend import Backend, Sink, backend_for
from ._bus import AsyncBus, AsyncSubscription, Bus
from ._core import DEFAULT_MAXSIZE, DEFAULT_POLICY, POLICIES, Event, Subscription
from ._errors import NoResponder, RemoteError

__all__ = [
    "DEFAULT_MAXSIZE",
    "DEFAULT_POLICY",
    "POLICIES",
    "AsyncBus",
    "AsyncSubscription",
    "Backend",
    "Bus",
    "Event",
    "NoResponder",
    "RemoteError",
    "Sink",
    "Subscription",
    "backend_for",
]
