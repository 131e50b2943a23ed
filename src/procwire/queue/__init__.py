"""Reliable work queues: at-least-once delivery with leases, retries, dead letters, delays,
priorities, dedup keys and FIFO groups; durable on SQLite by default.

>>> from procwire.queue import Queue
>>> # q = Queue("jobs"); q.put({"n": 1}); job = q.get(timeout=5); job.ack()

See ``docs/queue.md`` for the semantics.
"""

from __future__ import annotations

from ._aio import AsyncJob, AsyncQueue
from ._backend import Backend
from ._errors import LeaseLost, QueueError
from ._queue import DeadLetter, Item, Job, ProcessResult, Queue, QueueStats

__all__ = [
    "AsyncJob",
    "AsyncQueue",
    "Backend",
    "DeadLetter",
    "Item",
    "Job",
    "LeaseLost",
    "ProcessResult",
    "Queue",
    "QueueError",
    "QueueStats",
]
