"""The interface between the Bus and a backend (memory, local broker, Redis), and the registry
that picks one by URL scheme.

A backend moves three kinds of messages: events (fan-out to every bus on the same bus name or
channel), requests (to exactly one of the buses that handle a name: every backend picks one,
never several) and replies (to one bus). It calls a
``Sink`` from its own thread when something arrives; the sink never runs user code there (it
only files items into bounded buffers), so a backend can rely on the sink returning quickly,
except under the ``block`` policy, whose very point is to hold the backend's delivery.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import urllib.parse
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import AddressError

if TYPE_CHECKING:
    from ._core import Event

__all__ = ["Backend", "Sink", "backend_for", "flush_at_exit"]

log = logging.getLogger("procwire.bus")

# scheme -> "module:Class" under procwire.bus; one line per backend.
_BACKENDS: dict[str, str] = {
    "broker": "_local:LocalBackend",
    "memory": "_memory:MemoryBackend",
    "redis": "_redis:RedisBackend",
    "rediss": "_redis:RedisBackend",
}


class Sink(Protocol):
    """What a backend calls (from any thread) when a message arrives."""

    def on_event(self, name: str, data: Any) -> None: ...

    def on_events(self, items: list[Event]) -> None:
        """Several events that arrived together, in order (cheaper than ``on_event`` for
        each)."""

    def on_request(self, name: str, request: dict[str, Any]) -> None:
        """``request`` has ``id`` (str), ``reply_to`` (str) and ``data``."""

    def on_reply(self, reply: dict[str, Any]) -> None:
        """``reply`` has ``id`` and either ``data`` or ``error`` ({type, message})."""

    def on_notice(self, name: str, info: dict[str, Any]) -> None:
        """A ``procwire.*`` notice: a gap after a reconnect, a bad message that was skipped."""


class Backend(ABC):
    """One bus's connection to the medium. Every blocking method takes ``timeout``."""

    url: str
    #: where replies to this bus's requests go (backend-specific address)
    reply_to: str

    @abstractmethod
    def start(self, sink: Sink, timeout: float | None) -> None:
        """Connect and begin delivering to ``sink``; events emitted after this returns arrive."""

    @abstractmethod
    def publish(self, name: str, data: Any, timeout: float | None) -> int:
        """Send one event; how many buses received it (-1: unknown, e.g. queued but not yet
        confirmed: Redis pipelines emits). ``timeout`` bounds the wait for the medium (or for
        room in an outbox); errors are raised, never swallowed."""

    def publish_nowait(self, name: str, data: Any, timeout: float | None) -> int | None:
        """``publish`` if it can be done without blocking (the asyncio bus calls it on the
        loop; ``timeout`` still bounds the delivery of a queued event); None: it cannot,
        call ``publish`` on a worker thread. Default: None."""
        return None

    def publish_confirmed(self, name: str, data: Any, timeout: float | None) -> int:
        """Send one event and wait for the medium's confirmation; how many buses received it.
        Default: ``publish`` (backends whose publish is already confirmed)."""
        return self.publish(name, data, timeout)

    def publish_many(self, events: list[tuple[str, Any]], timeout: float | None) -> None:
        """Send several events in order and return once they are confirmed; backends that
        can pipeline them override this."""
        for name, data in events:
            self.publish(name, data, timeout)
        self.flush(timeout)

    def flush(self, timeout: float | None) -> None:  # noqa: B027
        """Wait until every event published so far is confirmed, and raise what could not be
        published (``Timeout`` after ``timeout``). Default: nothing to wait for."""

    def flush_at_exit_pending(self) -> bool:
        """True when this backend, open in this process, holds events a ``flush`` would wait
        for (see ``flush_at_exit``). Default: never."""
        return False

    @abstractmethod
    def request(self, name: str, request: dict[str, Any], timeout: float | None) -> int:
        """Send a request to ONE bus that handles ``name``; 1 when one got it, 0 when none
        handles it (-1: the medium answers ``no_responder`` itself, in a reply)."""

    @abstractmethod
    def reply(self, reply_to: str, reply: dict[str, Any], timeout: float | None) -> None:
        """Send a reply to one bus."""

    @abstractmethod
    def add_responder(self, name: str, timeout: float | None) -> None:
        """From now on, requests for ``name`` reach this bus (confirmed before returning)."""

    @abstractmethod
    def remove_responder(self, name: str, timeout: float | None) -> None: ...

    def enable_inline(  # noqa: B027
            self, answer: Callable[[str, dict[str, Any]], dict[str, Any] | None]) -> None:
        """A blocking bus offers ``answer(name, request) -> reply`` (None: not answered that
        way), which runs the handler on the calling thread: a backend may call it from its
        own threads to answer requests without a hand-off (the local broker's direct path).
        Called before ``start``; default: not used."""

    def stop_responding(self, timeout: float | None) -> None:  # noqa: B027
        """Closing: stop requests from reaching this bus (confirmed) while its handlers still
        run, so that none arrives to be dropped; default: nothing to do."""

    def add_pattern(self, pattern: str, timeout: float | None) -> None:  # noqa: B027
        """A routing hint for backends that filter centrally (the broker); default: none."""

    def remove_pattern(self, pattern: str, timeout: float | None) -> None:  # noqa: B027
        """Undo ``add_pattern``."""

    def stats(self) -> dict[str, Any]:
        """Backend counters (reconnects, bad messages...)."""
        return {}

    @abstractmethod
    def close(self, timeout: float | None) -> None:
        """Flush what is queued (within ``timeout``), stop delivering and release connections
        and threads; idempotent. May raise, after releasing everything, what could not be
        published."""


def backend_for(url: str, **options: Any) -> Backend:
    """The backend for ``url`` (``memory://name``, ``redis://host:port/db``...)."""
    if not isinstance(url, str):
        raise AddressError(f"a bus URL is a string, not {type(url).__name__}")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    try:
        target = _BACKENDS[scheme]
    except KeyError:
        known = ", ".join(sorted(_BACKENDS))
        raise AddressError(f"{url!r}: no bus backend for scheme {scheme!r} "
                           f"(known: {known})") from None
    module_name, _, cls_name = target.partition(":")
    module = importlib.import_module(f"procwire.bus.{module_name}")
    cls: Callable[..., Backend] = getattr(module, cls_name)
    return cls(url, **options)


# Backends whose emit queues events for a daemon flusher thread (Redis, the local broker): at
# interpreter exit that thread dies with whatever it still holds, so what open buses still
# queue is flushed here. Failures are logged, not lost.
_live: weakref.WeakSet[Backend] = weakref.WeakSet()


def flush_at_exit(backend: Backend) -> None:
    """Flush ``backend`` at interpreter exit if ``backend.flush_at_exit_pending()`` then."""
    _live.add(backend)


@atexit.register
def _flush_at_exit() -> None:
    for backend in list(_live):
        if not backend.flush_at_exit_pending():
            continue
        timeout = getattr(backend, "emit_timeout", None)
        try:  # bounded even for emit_timeout=None: exit must not hang on a dead medium
            backend.flush(30.0 if timeout is None else timeout)
        except Exception as exc:
            log.error("procwire bus: at exit, %s", exc)
