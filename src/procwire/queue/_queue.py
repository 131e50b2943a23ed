"""The blocking Queue API (the asyncio twin in ``_aio.py`` runs the same calls in threads)."""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._errors import Timeout
from ..codecs import Codec, get_codec
from ._backend import Backend, NewJob, RawJob, backend_for
from ._errors import LeaseLost

__all__ = ["DeadLetter", "Item", "Job", "ProcessResult", "Queue", "QueueStats"]

# A waiter re-checks at least this often even without a wake-up (a lost datagram, a wake-up
# folder on a file system that drops sockets): the safety net, not the normal path.
SAFETY_POLL = 1.0
MAX_BACKOFF = 3600.0
_INT64 = 2**63


@dataclass(frozen=True, slots=True)
class Item:
    """One job for ``Queue.put_many`` with its own options (plain values use the defaults).

    >>> Item({"id": 1}, priority=5, key="order-1")
    Item(data={'id': 1}, delay=0.0, priority=5, key='order-1', group=None)
    """

    data: Any
    delay: float = 0.0
    priority: int = 0
    key: str | None = None
    group: str | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts by state now, and totals since the queue was created.

    ``ready`` can be taken now, ``delayed`` waits for its time (a delay or a retry backoff),
    ``leased`` is held by a consumer, ``dead`` sits in the dead letters. ``put`` counts jobs
    inserted, ``acked`` acks, ``retried`` nacks that put a job back, ``expired`` leases that ran
    out, ``failed`` jobs moved to the dead letters.
    """

    ready: int
    delayed: int
    leased: int
    dead: int
    put: int
    acked: int
    retried: int
    expired: int
    failed: int

    @property
    def total(self) -> int:
        """Jobs in the queue now, in any state."""
        return self.ready + self.delayed + self.leased + self.dead


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A job in the dead letters. ``data`` is None when the payload cannot be decoded (then
    ``raw`` holds what was stored); ``error`` is the last error or the reason it died."""

    id: int
    data: Any
    raw: Any
    attempts: int
    error: str | None
    enqueued_at: float
    died_at: float
    key: str | None
    group: str | None


@dataclass(slots=True)
class ProcessResult:
    """What ``Queue.process`` did: jobs acked, jobs whose ``fn`` raised (nacked or dead), and
    acks refused because the lease had been granted to someone else."""

    acked: int = 0
    failed: int = 0
    lost: int = 0


class Job:
    """A leased job. Nobody else gets it while the lease holds; finish it with ``ack()``
    (done), ``nack()`` (retry later), ``fail()`` (dead letters) or ``release()`` (give back).

    ``attempts`` counts deliveries including this one. ``enqueued_at`` and ``lease_until``
    are UNIX times on the store's clock. A call after the lease was granted to another
    consumer raises ``LeaseLost`` and changes nothing.
    """

    __slots__ = ("_queue", "_token", "attempts", "data", "enqueued_at", "group", "id", "key",
                 "lease_until", "priority")

    def __init__(self, queue: Queue, raw: RawJob, data: Any) -> None:
        self._queue = queue
        self._token = raw.token
        self.id = raw.id
        self.data = data
        self.attempts = raw.attempts
        self.enqueued_at = raw.enqueued_at
        self.priority = raw.priority
        self.key = raw.key
        self.group = raw.group
        self.lease_until = raw.lease_until

    def __repr__(self) -> str:
        return f"<Job {self.id} attempts={self.attempts} data={self.data!r:.60}>"

    def ack(self, timeout: float | None = None) -> None:
        """Done: the job is deleted (its dedup key is free again)."""
        q = self._queue
        if q._backend.ack_many([(self.id, self._token)], q._t(timeout)):
            raise LeaseLost(f"job {self.id}: lease lost (granted to another consumer, or the "
                            "job was acked, failed or purged)", [self.id])

    def nack(self, delay: float | None = None, *, error: str | None = None,
             timeout: float | None = None) -> None:
        """Retry later: after ``delay`` seconds (None: the queue's backoff for this attempt),
        or to the dead letters when this was the last attempt. ``error`` is kept as the
        job's last error."""
        q = self._queue
        d = q.backoff_for(self.attempts) if delay is None else _check_delay(delay)
        if not q._backend.nack(self.id, self._token, d, error, q._t(timeout)):
            raise LeaseLost(f"job {self.id}: lease lost", [self.id])

    def extend(self, seconds: float | None = None, timeout: float | None = None) -> None:
        """Hold the lease until ``seconds`` (None: the queue's lease) from now."""
        q = self._queue
        s = q.lease if seconds is None else _check_lease(seconds)
        if q._backend.extend_many([(self.id, self._token)], s, q._t(timeout)):
            raise LeaseLost(f"job {self.id}: lease lost", [self.id])

    def fail(self, reason: str, timeout: float | None = None) -> None:
        """Straight to the dead letters with ``reason``, whatever attempts remain."""
        q = self._queue
        if not q._backend.fail(self.id, self._token, str(reason), q._t(timeout)):
            raise LeaseLost(f"job {self.id}: lease lost", [self.id])

    def release(self, timeout: float | None = None) -> None:
        """Give the job back now without counting this attempt (e.g. on shutdown)."""
        q = self._queue
        if not q._backend.release(self.id, self._token, q._t(timeout)):
            raise LeaseLost(f"job {self.id}: lease lost", [self.id])


class Queue:
    """A durable work queue: at-least-once delivery with leases, retries, dead letters,
    delays, priorities, dedup keys and FIFO groups.

    ``url``: None for the default SQLite file (``$XDG_DATA_HOME/procwire/queues.db``),
    ``sqlite:///path/queues.db``, or ``redis://host:6379/0`` for a Redis server (consumers
    on several machines). ``lease``: seconds a ``get`` holds a job by default.
    ``max_attempts``: deliveries before a job goes to the dead letters (stored with each job
    at ``put``). ``backoff``: seconds before a nacked job is retried, a number (doubled each
    attempt: b, 2b, 4b..., capped at an hour) or a function of the attempt number.
    ``timeout``: default seconds any call may wait for the store (its write lock).

    Nothing is opened until the first call; the queue is safe to use from many threads and
    survives a fork (the child opens its own connections).

    Example (``tmp`` a folder)::

        q = Queue("emails", url=f"sqlite:///{tmp}/q.db")
        q.put({"to": "a@example.com"})
        job = q.get(timeout=5)          # Job, or None after 5 s
        send_email(job.data)
        job.ack()
    """

    def __init__(self, name: str, url: str | None = None, *, lease: float = 30.0,
                 max_attempts: int = 5, backoff: float | Callable[[int], float] = 1.0,
                 codec: str | Codec = "json", timeout: float = 30.0) -> None:
        if not isinstance(name, str) or not name or len(name) > 200 or "\0" in name:
            raise ValueError("a queue name is a non-empty string of at most 200 characters")
        self.name = name
        self.url = url
        self.lease = _check_lease(lease)
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) \
                or not 1 <= max_attempts < 2**31:
            raise ValueError("max_attempts must be an int >= 1")
        self.max_attempts = max_attempts
        if not callable(backoff):
            _check_delay(backoff)
        self._backoff = backoff
        self.codec = get_codec(codec)
        if not self.codec.safe:
            raise ValueError(f"the {self.codec.name} codec runs code on decode; a queue's "
                             "payloads come from any producer: use json or msgpack")
        self.timeout = _check_delay(timeout)
        self._backend_obj: Backend | None = None
        self._backend_lock = threading.Lock()
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def _backend(self) -> Backend:
        b = self._backend_obj
        if b is None:
            with self._backend_lock:
                if self._closed:
                    from ._errors import QueueError

                    raise QueueError(f"queue {self.name!r} is closed")
                if self._backend_obj is None:
                    self._backend_obj = backend_for(self.url, self.name)
                b = self._backend_obj
        return b

    @property
    def backend(self) -> Backend:
        """The store behind this queue (``SqliteBackend``...), opened on first use."""
        return self._backend

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else _check_delay(timeout)

    def backoff_for(self, attempts: int) -> float:
        """Seconds before retry number ``attempts`` (1 = after the first delivery failed)."""
        if callable(self._backoff):
            return _check_delay(self._backoff(attempts))
        return float(min(MAX_BACKOFF, self._backoff * 2.0 ** min(max(attempts - 1, 0), 40)))

    def _encode(self, item: Any) -> NewJob:
        it = item if isinstance(item, Item) else Item(item)
        data = self.codec.encode(it.data)
        if not isinstance(data, bytes):
            data = bytes(data)
        if isinstance(it.priority, bool) or not isinstance(it.priority, int) \
                or not -_INT64 <= it.priority < _INT64:
            raise ValueError(f"priority must be a 64-bit int, not {it.priority!r}")
        for label, v in (("key", it.key), ("group", it.group)):
            if v is not None and (not isinstance(v, str) or len(v) > 1000):
                raise ValueError(f"{label} must be a string of at most 1000 characters or None")
        return NewJob(data, _check_delay(it.delay), it.priority, it.key, it.group,
                      self.max_attempts)

    # -- producing --------------------------------------------------------------------------
    def put(self, data: Any, *, delay: float = 0, priority: int = 0, key: str | None = None,
            group: str | None = None, timeout: float | None = None) -> int:
        """Add one job; returns its id. ``delay``: seconds before it can be taken.
        ``priority``: higher first (then FIFO). ``key``: while a job with this key is in the
        queue (not yet acked), another put with it adds nothing and returns that job's id.
        ``group``: jobs of one group are handed out one at a time, in order.
        Raises ``EncodeError`` (nothing stored) when the codec cannot encode ``data``."""
        return self._backend.put_many([self._encode(Item(data, delay, priority, key, group))],
                                      self._t(timeout))[0]

    def put_many(self, items: Iterable[Any], *, timeout: float | None = None) -> list[int]:
        """Add many jobs in one transaction: all or none. An element is the job's data, or
        an ``Item`` with its own delay, priority, key and group. Returns the ids in order."""
        encoded = [self._encode(it) for it in items]
        if not encoded:
            return []
        return self._backend.put_many(encoded, self._t(timeout))

    # -- consuming --------------------------------------------------------------------------
    def get(self, timeout: float | None = None, lease: float | None = None) -> Job | None:
        """Lease the next job, waiting up to ``timeout`` seconds (None: forever, 0: don't
        wait). Returns None when nothing came. Wakes within milliseconds of a put in any
        process."""
        jobs = self._get(1, timeout, lease)
        return jobs[0] if jobs else None

    def get_many(self, n: int, timeout: float | None = None,
                 lease: float | None = None) -> list[Job]:
        """Lease up to ``n`` jobs in one transaction, waiting (like ``get``) for at least one.
        Returns [] when nothing came within ``timeout``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("n must be an int >= 1")
        return self._get(n, timeout, lease)

    def _claim_once(self, n: int, lease: float, lock_timeout: float,
                    ack: list[tuple[int, int]] | None = None
                    ) -> tuple[list[Job], float | None, list[int]]:
        token = secrets.randbits(62)
        res = self._backend.claim(n, lease, token, lock_timeout, ack)
        jobs: list[Job] = []
        for raw in res.jobs:
            try:
                payload = raw.data.encode() if isinstance(raw.data, str) else raw.data
                if not isinstance(payload, bytes):
                    raise TypeError(f"stored payload is {type(payload).__name__}, not bytes")
                data = self.codec.decode(payload)
            except Exception as exc:
                # A corrupt row must not crash every consumer that meets it: park it. The
                # claim has committed (its jobs are leased, the ack it carried is applied), so
                # a store that is locked or down now must not throw that away: the row stays
                # leased until its lease ends and is met (and parked) again.
                with contextlib.suppress(Exception):
                    self._backend.fail(raw.id, token, f"corrupt payload: "
                                       f"{type(exc).__name__}: {exc}"[:1000], lock_timeout)
                continue
            jobs.append(Job(self, raw, data))
        next_due = res.next_due
        if res.jobs and not jobs:
            next_due = 0.0  # all were corrupt: look again at once
        return jobs, next_due, res.lost

    def _get(self, n: int, timeout: float | None, lease: float | None,
             ack: list[tuple[int, int]] | None = None,
             acked_out: list[list[int]] | None = None) -> list[Job]:
        """``ack``: (id, token) pairs acked in the first claim's transaction; when that claim
        went through, the ids whose lease was lost are appended to ``acked_out`` as one list
        (nothing is appended when the store stayed locked: the ack was not applied)."""
        lease_s = self.lease if lease is None else _check_lease(lease)
        if timeout is not None:
            _check_delay(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        backend = self._backend
        while True:
            # Read the wake-up generation BEFORE looking, so a put in between is not missed.
            gen = backend.wake_generation() if timeout != 0 else 0
            remaining = None if deadline is None else deadline - time.monotonic()
            lock_timeout = self.timeout if remaining is None else max(remaining, 0.05)
            try:
                jobs, next_due, lost = self._claim_once(n, lease_s, lock_timeout, ack)
            except Timeout:
                if remaining is None:
                    raise
                return []  # the store stayed locked past our deadline: nothing came
            if ack and acked_out is not None:
                acked_out.append(lost)
            ack = None
            if jobs:
                return jobs
            if next_due == 0.0:
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            wait = SAFETY_POLL
            if next_due is not None:
                wait = min(wait, next_due + 0.001)
            if remaining is not None:
                wait = min(wait, remaining)
            backend.wait(gen, wait)

    def ack_many(self, jobs: Iterable[Job], timeout: float | None = None) -> None:
        """Ack many jobs in one transaction. Jobs still held are acked even when some are
        not; those raise ``LeaseLost`` (with their ids) afterwards."""
        pairs = [(j.id, j._token) for j in jobs]
        if not pairs:
            return
        lost = self._backend.ack_many(pairs, self._t(timeout))
        if lost:
            raise LeaseLost(f"{len(lost)} of {len(pairs)} jobs: lease lost", lost)

    # -- inspection and maintenance ---------------------------------------------------------
    def stats(self, timeout: float | None = None) -> QueueStats:
        """Counts by state and totals (see ``QueueStats``)."""
        s = self._backend.stats(self._t(timeout))
        return QueueStats(s.ready, s.delayed, s.leased, s.dead, s.put, s.acked, s.retried,
                          s.expired, s.failed)

    def dead_letters(self, limit: int = 100, timeout: float | None = None) -> list[DeadLetter]:
        """The oldest ``limit`` dead jobs with their last error."""
        out = []
        for r in self._backend.dead_letters(limit, self._t(timeout)):
            try:
                data = self.codec.decode(r.data)
            except Exception:
                data = None
            out.append(DeadLetter(r.id, data, r.data, r.attempts, r.error, r.enqueued_at,
                                  r.died_at, r.key, r.group))
        return out

    def requeue_dead(self, ids: Iterable[int] | None = None,
                     timeout: float | None = None) -> int:
        """Put dead jobs (all, or those ``ids``) back as ready with a fresh attempt count;
        returns how many moved."""
        return self._backend.requeue_dead(None if ids is None else [int(i) for i in ids],
                                          self._t(timeout))

    def purge(self, dead_only: bool = False, timeout: float | None = None) -> int:
        """Delete every job of this queue (or only the dead letters); returns how many.
        Holders of purged jobs get ``LeaseLost`` on ack."""
        return self._backend.purge(dead_only, self._t(timeout))

    # -- the worker loop --------------------------------------------------------------------
    def process(self, fn: Callable[[Any], Any], *, concurrency: int = 1,
                lease: float | None = None, max_jobs: int | None = None,
                idle_timeout: float | None = None, stop: threading.Event | None = None,
                with_job: bool = False,
                on_done: Callable[[ProcessResult], None] | None = None) -> ProcessResult:
        """Run ``fn(data)`` (or ``fn(job)`` with ``with_job=True``) on jobs from ``concurrency``
        threads until ``stop`` is set, ``max_jobs`` were taken, or no job came for
        ``idle_timeout`` seconds. A return acks the job; an exception nacks it with the
        backoff and its text as the error. A separate thread renews the leases of running
        jobs every lease/3 s, so a long ``fn`` keeps its job (a C extension holding the GIL
        for longer than the lease can still starve it: pick the lease to match).
        Ctrl-C stops taking jobs, lets running ones finish, then re-raises."""
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) \
                or concurrency < 1:
            raise ValueError("concurrency must be an int >= 1")
        lease_s = self.lease if lease is None else _check_lease(lease)
        runner = _Runner(self, fn, lease_s, max_jobs, idle_timeout,
                         stop or threading.Event(), with_job, on_done)
        return runner.run(concurrency)

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Close connections and the wake-up socket. Jobs held stay leased until their
        lease ends (ack or release them first)."""
        with self._backend_lock:
            self._closed = True
            b, self._backend_obj = self._backend_obj, None
        if b is not None:
            b.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_backend_obj", None) is not None and not self._closed:
            with contextlib.suppress(Exception):
                warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
                self.close()

    def __repr__(self) -> str:
        return f"<Queue {self.name!r} url={self.url!r}>"


class _Renewer:
    """Extends the leases of running jobs every lease/3 s from its own thread."""

    def __init__(self, queue: Queue, lease: float) -> None:
        self.queue = queue
        self.lease = lease
        self.jobs: dict[int, Job] = {}
        self.lost: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="procwire-queue-renew",
                                       daemon=True)

    def _run(self) -> None:
        interval = max(0.05, self.lease / 3)
        while not self.stop.wait(interval):
            with self.lock:
                pairs = [(j.id, j._token) for j in self.jobs.values()]
            if not pairs:
                continue
            try:
                lost = self.queue._backend.extend_many(pairs, self.lease,
                                                       min(self.queue.timeout, interval))
            except Exception:
                continue  # the store is busy or down: try again next round
            with self.lock:
                self.lost.update(lost)

    def add(self, job: Job) -> None:
        with self.lock:
            self.jobs[job.id] = job

    def remove(self, job: Job) -> None:
        with self.lock:
            self.jobs.pop(job.id, None)


class _Runner:
    def __init__(self, queue: Queue, fn: Callable[[Any], Any], lease: float,
                 max_jobs: int | None, idle_timeout: float | None, stop: threading.Event,
                 with_job: bool, on_done: Callable[[ProcessResult], None] | None) -> None:
        self.q = queue
        self.fn = fn
        self.lease = lease
        self.max_jobs = max_jobs
        self.idle = idle_timeout
        self.stop = stop
        self.with_job = with_job
        self.on_done = on_done
        self.taken = 0
        self.result = ProcessResult()
        self.lock = threading.Lock()
        self.renewer = _Renewer(queue, lease)
        self.errors: list[BaseException] = []

    def run(self, concurrency: int) -> ProcessResult:
        self.renewer.thread.start()
        threads = [threading.Thread(target=self._worker, name=f"procwire-queue-worker-{i}",
                                    daemon=True) for i in range(concurrency)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            self.stop.set()
            for t in threads:
                t.join()
            raise
        finally:
            self.stop.set()
            self.renewer.stop.set()
            self.renewer.thread.join(5)
        if self.errors:
            raise self.errors[0]
        return self.result

    def _reserve(self) -> bool:
        with self.lock:
            if self.max_jobs is not None and self.taken >= self.max_jobs:
                return False
            self.taken += 1
            return True

    def _count(self, field: str) -> None:
        with self.lock:
            setattr(self.result, field, getattr(self.result, field) + 1)
        if self.on_done is not None:
            self.on_done(self.result)

    def _worker(self) -> None:
        pending: Job | None = None  # acked together with the next claim: one commit, not two
        idle_since = time.monotonic()
        try:
            while not self.stop.is_set():
                if not self._reserve():
                    break
                acked: list[list[int]] = []
                ack = [(pending.id, pending._token)] if pending is not None else None
                wait = 0.5
                if self.idle is not None:
                    wait = max(0.0, min(wait, self.idle - (time.monotonic() - idle_since)))
                try:
                    jobs = self.q._get(1, wait, self.lease, ack, acked)
                except BaseException:
                    with self.lock:
                        self.taken -= 1
                    raise
                if pending is not None and acked:  # else the store stayed locked: ack again
                    self._count("lost" if acked[0] else "acked")
                    pending = None
                if not jobs:
                    with self.lock:
                        self.taken -= 1
                    if self.idle is not None and time.monotonic() - idle_since >= self.idle:
                        break
                    continue
                idle_since = time.monotonic()
                pending = self._run_one(jobs[0])
        except BaseException as exc:  # the store failed: stop everything, report
            self.errors.append(exc)
            self.stop.set()
        finally:
            if pending is not None:
                try:
                    pending.ack()
                    self._count("acked")
                except LeaseLost:
                    self._count("lost")
                except BaseException as exc:
                    self.errors.append(exc)

    def _run_one(self, job: Job) -> Job | None:
        self.renewer.add(job)
        try:
            self.fn(job if self.with_job else job.data)
        except Exception as exc:
            self.renewer.remove(job)
            err = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            try:
                job.nack(error=err[:2000])
            except LeaseLost:
                self._count("lost")
                return None
            self._count("failed")
            return None
        self.renewer.remove(job)
        return job


def _check_delay(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a finite number of seconds >= 0, not {value!r}")
    return float(value)


def _check_lease(value: float) -> float:
    v = _check_delay(value)
    if v <= 0:
        raise ValueError("a lease must be > 0 seconds")
    return v

