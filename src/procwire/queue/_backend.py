"""The backend interface: what a queue store provides. One module per store (``_sqlite``,
``_redis``), picked by the URL's scheme.

A backend instance serves ONE queue name. Every state change is one atomic step in the store
(an SQLite transaction, a Redis Lua script), so a crash never leaves anything half-done. Time
(delays, leases, backoff) is read from the store's clock inside that step, never from the
client. Payloads arrive already encoded (bytes); decoding is the Queue's job.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from .._errors import AddressError

__all__ = ["Backend", "ClaimResult", "DeadRow", "NewJob", "RawJob", "StatsRow", "backend_for"]


@dataclass(frozen=True, slots=True)
class NewJob:
    """One job to insert. ``delay`` in seconds from the store's now."""

    data: bytes
    delay: float = 0.0
    priority: int = 0
    key: str | None = None
    group: str | None = None
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class RawJob:
    """A leased job as the store returns it (``data`` still encoded)."""

    id: int
    data: Any  # bytes normally; whatever a corrupt row holds otherwise
    attempts: int
    enqueued_at: float
    priority: int
    key: str | None
    group: str | None
    token: int
    lease_until: float


@dataclass(slots=True)
class ClaimResult:
    """What ``claim`` returns: the jobs leased, the ids of ``ack`` pairs that were stale,
    and (when nothing was leased) seconds until the next delayed job or lease is due."""

    jobs: list[RawJob]
    lost: list[int] = field(default_factory=list)
    next_due: float | None = None


@dataclass(frozen=True, slots=True)
class DeadRow:
    id: int
    data: Any
    attempts: int
    enqueued_at: float
    died_at: float
    error: str | None
    key: str | None
    group: str | None


@dataclass(frozen=True, slots=True)
class StatsRow:
    ready: int
    delayed: int
    leased: int
    dead: int
    put: int
    acked: int
    retried: int
    expired: int
    failed: int


class Backend(ABC):
    """One queue in one store. Methods may be called from many threads at once; after a fork
    the backend must notice (pid check) and reopen its connections."""

    @abstractmethod
    def put_many(self, items: list[NewJob], timeout: float) -> list[int]:
        """Insert all items atomically (all or none); an item whose ``key`` is held by a job
        not yet acked is not inserted, and its id is the holder's."""

    @abstractmethod
    def claim(self, n: int, lease: float, token: int, timeout: float,
              ack: list[tuple[int, int]] | None = None) -> ClaimResult:
        """Atomically: ack the ``(id, token)`` pairs in ``ack``, make due delayed jobs ready,
        return expired leases to ready (or dead after their last attempt), then lease up to
        ``n`` ready jobs (priority, then FIFO; only a group's oldest live job) under ``token``.
        ``n`` may be 0 (ack only)."""

    @abstractmethod
    def ack_many(self, pairs: list[tuple[int, int]], timeout: float) -> list[int]:
        """Delete the jobs whose token matches; return the ids that did not (stale)."""

    @abstractmethod
    def nack(self, id: int, token: int, delay: float, error: str | None,
             timeout: float) -> bool:
        """Back to the queue after ``delay`` s, or to the dead letters if that was the last
        attempt. False when the token is stale."""

    @abstractmethod
    def extend_many(self, pairs: list[tuple[int, int]], seconds: float,
                    timeout: float) -> list[int]:
        """Lease until now + ``seconds``; return the stale ids."""

    @abstractmethod
    def fail(self, id: int, token: int | None, reason: str, timeout: float) -> bool:
        """Straight to the dead letters (``token=None``: whatever its state, for corrupt
        rows found by a reader that holds them under ``token``)."""

    @abstractmethod
    def release(self, id: int, token: int, timeout: float) -> bool:
        """Give the job back at once without counting the attempt."""

    @abstractmethod
    def stats(self, timeout: float) -> StatsRow: ...

    @abstractmethod
    def dead_letters(self, limit: int, timeout: float) -> list[DeadRow]: ...

    @abstractmethod
    def requeue_dead(self, ids: list[int] | None, timeout: float) -> int: ...

    @abstractmethod
    def purge(self, dead_only: bool, timeout: float) -> int: ...

    # Wake-ups: a waiter reads the generation, tries to claim, and if nothing came waits for
    # the generation to move. Whatever a put does after the read bumps it, so no wake-up is
    # lost between the claim and the wait.
    @abstractmethod
    def wake_generation(self) -> int: ...

    @abstractmethod
    def wait(self, generation: int, timeout: float) -> None: ...

    @abstractmethod
    async def await_wake(self, generation: int, timeout: float) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    description: str = ""


# scheme -> module in this package with a ``open_backend(url, name) -> Backend`` function.
_SCHEMES = {"sqlite": "_sqlite", "redis": "_redis", "rediss": "_redis"}


def backend_for(url: str | None, name: str) -> Backend:
    """The backend for ``url`` (None: the default SQLite file), serving queue ``name``."""
    if url is None:
        from ._sqlite import open_backend

        return open_backend(None, name)
    if not isinstance(url, str):
        raise AddressError(f"a queue url is a string, not {type(url).__name__}")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    try:
        module = _SCHEMES[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise AddressError(f"{url!r}: no queue backend for this scheme (known: {known})") from None
    mod = importlib.import_module(f"procwire.queue.{module}")
    backend: Backend = mod.open_backend(url, name)
    return backend
