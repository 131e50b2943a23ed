"""The SQLite backend: one file, many queues, many processes.

WAL journal (readers never block the writer), ``BEGIN IMMEDIATE`` for every state change (the
write lock is taken up front, so two writers never deadlock upgrading a read lock), a busy
timeout for waiting on that lock, ``synchronous=FULL`` by default (a committed put survives a
power loss; ``?synchronous=normal`` trades that for speed: still safe against process crashes).
One connection per thread and process; after a fork the child opens its own (an SQLite
connection must not cross a fork) and leaves the inherited ones untouched.

Time is SQLite's ``julianday('now')``, read once per transaction, so delays and leases from
every process agree (they share the machine's clock through SQLite).
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .._errors import AddressError, Timeout
from ._backend import Backend, ClaimResult, DeadRow, NewJob, RawJob, StatsRow
from ._errors import QueueError
from ._notify import Notifier

__all__ = ["SqliteBackend", "default_path", "open_backend"]

READY, DELAYED, LEASED, DEAD = 0, 1, 2, 3

NOW_SQL = "(julianday('now') - 2440587.5) * 86400.0"
NOW = f"SELECT {NOW_SQL}"

# Every wait for the write lock is cut into slices of this many seconds (each connection's fixed
# busy_timeout): a slice that ends without the lock is tried again until the caller's deadline.
# Setting busy_timeout to each call's own timeout instead costs a statement on most calls (a
# get and an ack have different timeouts); a deadline is kept to within one slice.
BUSY_SLICE_MS = 20

# How long opening a file may wait for the locks that creating or upgrading it needs.
OPEN_TIMEOUT = 30.0

# The layout version this code writes (the ``procwire_schema`` table). 1 was the first layout
# (two indexes over every job: a claim moved each job within both); 2 keeps one small partial
# index per state, so a claim moves a job from the ready index to the leased one and an ack
# deletes it from the leased one only: fewer b-tree steps and fewer pages per commit.
LAYOUT = 2

TABLES = """
CREATE TABLE IF NOT EXISTS procwire_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: ids stay unique forever
    queue TEXT NOT NULL,
    state INTEGER NOT NULL,         -- 0 ready, 1 delayed, 2 leased, 3 dead
    priority INTEGER NOT NULL,
    visible_at REAL NOT NULL,       -- delayed: due time, leased: lease end
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    token INTEGER,                  -- the current lease grant, NULL when nobody holds it
    dkey TEXT,
    grp TEXT,
    data BLOB NOT NULL,
    error TEXT,
    dead_at REAL
);
CREATE TABLE IF NOT EXISTS procwire_counters (
    queue TEXT PRIMARY KEY,
    put INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0,
    retried INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS procwire_schema (
    only INTEGER PRIMARY KEY CHECK (only = 0),
    version INTEGER NOT NULL
);
"""

# Layout 2's indexes (procwire_jobs_group_leased came later; every open creates what is
# missing, and code without it ignores it, so the layout version stayed 2). Every query that
# uses one names its state as a literal (``state = 0``), which is what lets SQLite pick a
# partial index.
INDEXES = f"""
CREATE INDEX IF NOT EXISTS procwire_jobs_ready
    ON procwire_jobs(queue, priority DESC, id) WHERE state = {READY};
CREATE INDEX IF NOT EXISTS procwire_jobs_delayed
    ON procwire_jobs(queue, visible_at) WHERE state = {DELAYED};
CREATE INDEX IF NOT EXISTS procwire_jobs_leased
    ON procwire_jobs(queue, visible_at) WHERE state = {LEASED};
CREATE INDEX IF NOT EXISTS procwire_jobs_dead
    ON procwire_jobs(queue, id) WHERE state = {DEAD};
CREATE INDEX IF NOT EXISTS procwire_jobs_group
    ON procwire_jobs(queue, grp, id) WHERE grp IS NOT NULL;
CREATE INDEX IF NOT EXISTS procwire_jobs_group_leased
    ON procwire_jobs(queue, grp) WHERE grp IS NOT NULL AND state = {LEASED};
CREATE UNIQUE INDEX IF NOT EXISTS procwire_jobs_key
    ON procwire_jobs(queue, dkey) WHERE dkey IS NOT NULL;
"""

# Layout 1's indexes over every job, dropped by the upgrade (and again if a process still
# running the old code re-created them when it opened the file).
OLD_INDEXES = ("procwire_jobs_claim", "procwire_jobs_due")

# Only a group's oldest live job may be leased, and only when none of the group is leased:
# the first subquery finds that oldest job (dead ones do not hold the group up); the second
# is needed once a dead job is requeued while a later job of its group is leased (the
# requeued one is then the oldest, and waits for the leased one: its own small index).
CLAIM = f"""
UPDATE procwire_jobs SET state = {LEASED}, token = :token, attempts = attempts + 1,
    visible_at = :now + :lease
WHERE id IN (
    SELECT id FROM procwire_jobs AS j
    WHERE queue = :q AND state = {READY}
      AND (grp IS NULL OR (id = (SELECT min(id) FROM procwire_jobs
                                 WHERE queue = :q AND grp = j.grp AND state < {DEAD})
                           AND NOT EXISTS (SELECT 1 FROM procwire_jobs
                                           WHERE queue = :q AND grp = j.grp
                                             AND state = {LEASED})))
    ORDER BY priority DESC, id LIMIT :n)
RETURNING id, data, attempts, enqueued_at, priority, dkey, grp, visible_at
"""

# A claim's first statement: the time, and when the next delayed job and lease are due (each an
# index seek), so the sweeps run only when something is due.
CLAIM_START = f"""
SELECT {NOW_SQL},
    (SELECT min(visible_at) FROM procwire_jobs WHERE queue = :q AND state = {DELAYED}),
    (SELECT min(visible_at) FROM procwire_jobs WHERE queue = :q AND state = {LEASED})
"""

# When the next delayed job or lease is due (each half walks its own index).
NEXT_DUE = f"""
SELECT min(visible_at) FROM procwire_jobs WHERE queue = ? AND state = {DELAYED}
UNION ALL
SELECT min(visible_at) FROM procwire_jobs WHERE queue = ? AND state = {LEASED}
"""

STATS = f"""
SELECT 'ready', count(*) FROM procwire_jobs WHERE queue = ? AND state = {READY}
UNION ALL
SELECT 'ready', count(*) FROM procwire_jobs WHERE queue = ? AND state = {DELAYED}
    AND visible_at <= ?
UNION ALL
SELECT 'delayed', count(*) FROM procwire_jobs WHERE queue = ? AND state = {DELAYED}
    AND visible_at > ?
UNION ALL
SELECT 'leased', count(*) FROM procwire_jobs WHERE queue = ? AND state = {LEASED}
UNION ALL
SELECT 'dead', count(*) FROM procwire_jobs WHERE queue = ? AND state = {DEAD}
"""

# Transactions that only take or extend leases (a claim without acks, a lease renewal) commit
# without their own fsync under FULL/EXTRA: a lease matters only while its holder lives, and a
# power loss kills every holder on this machine. Losing such a commit to a power cut makes
# the job ready at once with that delivery not counted; a job whose put returned is never
# lost, and an ack never comes back. The WAL is a sequence: the next fsynced commit (an ack,
# a put) makes the earlier lease commits durable too, and a crash can only cut off a tail.
# Process crashes lose nothing either way (the written pages are in the OS already).
LEASE_SYNC = {"FULL": "NORMAL", "EXTRA": "NORMAL"}

T = TypeVar("T")

# Connections inherited across a fork: kept referenced so that garbage collection never
# closes them in the child (closing could disturb the parent's locks).
_ABANDONED: list[sqlite3.Connection] = []


def default_path() -> str:
    """``$XDG_DATA_HOME/procwire/queues.db``, else ``~/.local/share/procwire/queues.db``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(base, "procwire", "queues.db")


def parse_url(url: str | None) -> tuple[str, dict[str, str]]:
    if url is None:
        return default_path(), {}
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "sqlite":
        raise AddressError(f"{url!r}: not an sqlite:// url")
    # sqlite:///abs/path (empty host) or sqlite://relative/path
    path = urllib.parse.unquote(parts.netloc + parts.path)
    if not path:
        raise AddressError(f"{url!r}: no file path (e.g. sqlite:///var/lib/app/queues.db)")
    if path.startswith("//"):
        path = "/" + path.lstrip("/")  # f"sqlite:///{abs_path}" gives three or four slashes
    query = dict(urllib.parse.parse_qsl(parts.query))
    unknown = set(query) - {"synchronous"}
    if unknown:
        raise AddressError(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}")
    sync = query.get("synchronous", "full").lower()
    if sync not in ("full", "normal", "extra"):
        raise AddressError(f"{url!r}: synchronous must be full, normal or extra")
    return path, query


def open_backend(url: str | None, name: str) -> SqliteBackend:
    path, query = parse_url(url)
    return SqliteBackend(path, name, synchronous=query.get("synchronous", "full"))


class SqliteBackend(Backend):
    """One queue in one SQLite file. See the module docstring."""

    def __init__(self, path: str, name: str, *, synchronous: str = "full") -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        self.name = name
        self.synchronous = synchronous.upper()
        self._lease_sync = LEASE_SYNC.get(self.synchronous, self.synchronous)
        self.description = f"sqlite://{self.path}"
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._ready = False
        self._closed = False
        self.notifier = Notifier(self.path + "-wake", name)

    # -- connections ----------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise QueueError("the queue is closed")
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    _ABANDONED.extend(self._conns)
                    self._conns = []
                    self._local = threading.local()
                    self._pid = os.getpid()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            self._local.sync = self.synchronous  # what _open set
            with self._lock:
                self._conns.append(conn)
        return conn

    def _open(self) -> sqlite3.Connection:
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=OPEN_TIMEOUT)
            # WAL is a property of the file (set once, kept); synchronous is per connection.
            mode = _set_wal(conn, OPEN_TIMEOUT)
            if str(mode).lower() != "wal":
                raise QueueError(f"{self.path}: cannot use WAL journal mode (got {mode!r}); "
                                 "is it on a network file system?")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            if not self._ready:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._prepare(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                self._ready = True
            conn.execute(f"PRAGMA busy_timeout = {BUSY_SLICE_MS}")
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise _translate(exc, self.path) from exc
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Create or upgrade the layout, inside the caller's IMMEDIATE transaction: a file is
        upgraded by one process while the others wait for the write lock, and a crash part
        way leaves the old layout whole (the transaction rolls back)."""
        for stmt in TABLES.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        row = conn.execute("SELECT version FROM procwire_schema").fetchone()
        version = LAYOUT if row is None else int(row[0])
        if version > LAYOUT:
            raise QueueError(
                f"{self.path}: the queue file has layout version {version}, written by a newer"
                f" procwire; this one reads up to version {LAYOUT}. Upgrade procwire in every"
                " process that uses this file.")
        # No version row: a new file, or one written by the first layout (which had no
        # version table). Either way: drop the old indexes if present, create the new ones.
        for name in OLD_INDEXES:
            conn.execute(f"DROP INDEX IF EXISTS {name}")
        for stmt in INDEXES.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        if row is None:
            conn.execute("INSERT INTO procwire_schema(only, version) VALUES (0, ?)", (LAYOUT,))
        conn.execute("INSERT OR IGNORE INTO procwire_counters(queue) VALUES (?)", (self.name,))

    @contextlib.contextmanager
    def _write(self, timeout: float, *, lease_only: bool = False) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: committed when the block ends, rolled back on error.
        Waits up to ``timeout`` for the write lock (then ``Timeout``). ``lease_only``: the
        transaction only takes or extends leases (see LEASE_SYNC)."""
        conn = self._conn()
        level = self._lease_sync if lease_only else self.synchronous
        if self._local.sync != level:  # only between transactions; a C call of ~2 us
            conn.execute(f"PRAGMA synchronous = {level}")
            self._local.sync = level
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.Error as exc:
                if not _busy(exc) or time.monotonic() >= deadline:
                    raise _translate(exc, self.path) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc, self.path) from exc
            raise

    def _read(self, fn: Callable[[sqlite3.Connection, float], T], timeout: float) -> T:
        """``fn(conn, now)`` in a read transaction, tried again while the file is busy (WAL
        readers rarely are) until ``timeout``."""
        conn = self._conn()
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.execute("BEGIN")
                try:
                    return fn(conn, _now(conn))
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if not _busy(exc) or time.monotonic() >= deadline:
                    raise _translate(exc, self.path) from exc

    # -- state changes --------------------------------------------------------------------
    def put_many(self, items: list[NewJob], timeout: float) -> list[int]:
        ids: list[int] = []
        inserted = 0
        with self._write(timeout) as conn:
            now = _now(conn)
            for it in items:
                cur = conn.execute(
                    "INSERT INTO procwire_jobs(queue, state, priority, visible_at, enqueued_at,"
                    " attempts, max_attempts, dkey, grp, data) VALUES (?,?,?,?,?,0,?,?,?,?)"
                    " ON CONFLICT DO NOTHING",
                    (self.name, DELAYED if it.delay > 0 else READY, it.priority,
                     now + it.delay, now, it.max_attempts, it.key, it.group, it.data))
                if cur.rowcount == 1:
                    inserted += 1
                    ids.append(int(cur.lastrowid or 0))
                else:
                    row = conn.execute("SELECT id FROM procwire_jobs WHERE queue=? AND dkey=?",
                                       (self.name, it.key)).fetchone()
                    ids.append(int(row[0]))
            if inserted:
                conn.execute("UPDATE procwire_counters SET put = put + ? WHERE queue = ?",
                             (inserted, self.name))
        if inserted:
            self.notifier.notify()
        return ids

    def _sweep(self, conn: sqlite3.Connection, now: float, delayed: float | None,
               leased: float | None) -> bool:
        """Make due delayed jobs ready and expired leases ready (or dead on their last
        attempt). ``delayed`` and ``leased``: the earliest due times (None: none). Returns
        whether anything was due."""
        q = self.name
        swept = False
        if delayed is not None and delayed <= now:
            conn.execute(f"UPDATE procwire_jobs SET state = {READY} WHERE queue = ? AND "
                         f"state = {DELAYED} AND visible_at <= ?", (q, now))
            swept = True
        if leased is not None and leased <= now:
            dead = conn.execute(
                f"UPDATE procwire_jobs SET state = {DEAD}, dead_at = ?, token = NULL,"
                f" error = 'lease expired on the last attempt (' || attempts || ')'"
                f" WHERE queue = ? AND state = {LEASED} AND visible_at <= ?"
                f" AND attempts >= max_attempts", (now, q, now)).rowcount
            # The token stays: the late holder may still ack (nobody else has the job yet).
            back = conn.execute(
                f"UPDATE procwire_jobs SET state = {READY}, error = 'lease expired'"
                f" WHERE queue = ? AND state = {LEASED} AND visible_at <= ?", (q, now)).rowcount
            if dead or back:
                conn.execute("UPDATE procwire_counters SET expired = expired + ?,"
                             " failed = failed + ? WHERE queue = ?", (dead + back, dead, q))
            swept = True
        return swept

    def claim(self, n: int, lease: float, token: int, timeout: float,
              ack: list[tuple[int, int]] | None = None) -> ClaimResult:
        result = ClaimResult([])
        notify = False
        with self._write(timeout, lease_only=not ack) as conn:
            if ack:
                result.lost, notify = self._ack(conn, ack)
            if n > 0:
                now, delayed, leased = conn.execute(CLAIM_START, {"q": self.name}).fetchone()
                swept = self._sweep(conn, now, delayed, leased)
                rows = conn.execute(CLAIM, {"token": token, "now": now, "lease": lease,
                                            "q": self.name, "n": n}).fetchall()
                rows.sort(key=lambda r: (-r[4], r[0]))
                result.jobs = [RawJob(r[0], r[1], r[2], r[3], r[4], r[5], r[6], token, r[7])
                               for r in rows]
                if not rows:
                    if swept:  # the due times moved
                        delayed, leased = (d for (d,) in conn.execute(
                            NEXT_DUE, (self.name, self.name)))
                    dues = [d for d in (delayed, leased) if d is not None]
                    if dues:
                        result.next_due = max(0.0, min(dues) - now)
        if notify:
            self.notifier.notify()
        return result

    def _ack(self, conn: sqlite3.Connection,
             pairs: list[tuple[int, int]]) -> tuple[list[int], bool]:
        grouped = False
        by_token: dict[int, list[int]] = {}
        for id_, token in pairs:
            by_token.setdefault(token, []).append(id_)
        deleted: set[int] = set()
        for token, ids in by_token.items():  # a batch from one get_many shares its token
            rows: list[Any] = []
            for i in range(0, len(ids), 500):  # under SQLite's limit on bound variables
                chunk = ids[i:i + 500]
                rows += conn.execute(
                    f"DELETE FROM procwire_jobs WHERE id IN ({','.join('?' * len(chunk))})"
                    # "+queue": look rows up by id; with a plain "queue = ?" the planner
                    # may walk the queue's whole index instead.
                    " AND token = ? AND +queue = ? RETURNING id, grp",
                    (*chunk, token, self.name)).fetchall()
            for id_, grp in rows:
                deleted.add(id_)
                grouped = grouped or grp is not None  # the group's next job is ready now
        lost = [id_ for id_, _t in pairs if id_ not in deleted]
        done = len(deleted)
        if done:
            conn.execute("UPDATE procwire_counters SET acked = acked + ? WHERE queue = ?",
                         (done, self.name))
        return lost, grouped

    def ack_many(self, pairs: list[tuple[int, int]], timeout: float) -> list[int]:
        with self._write(timeout) as conn:
            lost, notify = self._ack(conn, pairs)
        if notify:
            self.notifier.notify()
        return lost

    def nack(self, id: int, token: int, delay: float, error: str | None,
             timeout: float) -> bool:
        with self._write(timeout) as conn:
            now = _now(conn)
            row = conn.execute(
                f"UPDATE procwire_jobs SET token = NULL, error = ?,"
                f" state = CASE WHEN attempts >= max_attempts THEN {DEAD}"
                f"   WHEN ? > 0 THEN {DELAYED} ELSE {READY} END,"
                f" dead_at = CASE WHEN attempts >= max_attempts THEN ? END,"
                f" visible_at = ? + ? WHERE id = ? AND token = ? AND queue = ? RETURNING state",
                (error, delay, now, now, delay, id, token, self.name)).fetchone()
            if row is not None:
                dead = int(row[0] == DEAD)
                conn.execute("UPDATE procwire_counters SET retried = retried + ?,"
                             " failed = failed + ? WHERE queue = ?", (1 - dead, dead,
                                                                       self.name))
        if row is not None and row[0] == READY:
            self.notifier.notify()
        return row is not None

    def extend_many(self, pairs: list[tuple[int, int]], seconds: float,
                    timeout: float) -> list[int]:
        lost: list[int] = []
        with self._write(timeout, lease_only=True) as conn:
            now = _now(conn)
            for id_, token in pairs:
                # Still ours even if the lease ran out, as long as nobody was granted it since.
                cur = conn.execute(
                    f"UPDATE procwire_jobs SET state = {LEASED}, visible_at = ? WHERE id = ?"
                    f" AND token = ? AND queue = ? AND state < {DEAD}",
                    (now + seconds, id_, token, self.name))
                if cur.rowcount != 1:
                    lost.append(id_)
        return lost

    def fail(self, id: int, token: int | None, reason: str, timeout: float) -> bool:
        with self._write(timeout) as conn:
            now = _now(conn)
            cur = conn.execute(
                f"UPDATE procwire_jobs SET state = {DEAD}, token = NULL, error = ?,"
                f" dead_at = ? WHERE id = ? AND queue = ? AND state < {DEAD}"
                f" AND (? IS NULL OR token = ?)",
                (reason, now, id, self.name, token, token))
            ok = cur.rowcount == 1
            if ok:
                conn.execute("UPDATE procwire_counters SET failed = failed + 1"
                             " WHERE queue = ?", (self.name,))
        return ok

    def release(self, id: int, token: int, timeout: float) -> bool:
        with self._write(timeout) as conn:
            cur = conn.execute(
                f"UPDATE procwire_jobs SET state = {READY}, token = NULL,"
                f" attempts = max(attempts - 1, 0) WHERE id = ? AND token = ? AND queue = ?"
                f" AND state < {DEAD}", (id, token, self.name))
            ok = cur.rowcount == 1
        if ok:
            self.notifier.notify()
        return ok

    # -- inspection and maintenance --------------------------------------------------------
    def stats(self, timeout: float) -> StatsRow:
        def run(conn: sqlite3.Connection, now: float) -> StatsRow:
            counts = dict.fromkeys(("ready", "delayed", "leased", "dead"), 0)
            q = self.name
            for what, n in conn.execute(STATS, (q, q, now, q, now, q, q)):
                counts[what] += n  # a delayed job already due counts as ready
            row = conn.execute("SELECT put, acked, retried, expired, failed FROM"
                               " procwire_counters WHERE queue = ?", (self.name,)).fetchone()
            row = row or (0, 0, 0, 0, 0)
            return StatsRow(counts["ready"], counts["delayed"], counts["leased"],
                            counts["dead"], *row)

        return self._read(run, timeout)

    def dead_letters(self, limit: int, timeout: float) -> list[DeadRow]:
        def run(conn: sqlite3.Connection, _now: float) -> list[DeadRow]:
            return [DeadRow(*r) for r in conn.execute(
                "SELECT id, data, attempts, enqueued_at, coalesce(dead_at, 0), error, dkey, grp"
                f" FROM procwire_jobs WHERE queue = ? AND state = {DEAD} ORDER BY id LIMIT ?",
                (self.name, limit))]

        return self._read(run, timeout)

    def requeue_dead(self, ids: list[int] | None, timeout: float) -> int:
        with self._write(timeout) as conn:
            now = _now(conn)
            sql = (f"UPDATE procwire_jobs SET state = {READY}, attempts = 0, dead_at = NULL,"
                   f" token = NULL, visible_at = ? WHERE queue = ? AND state = {DEAD}")
            if ids is None:
                n = conn.execute(sql, (now, self.name)).rowcount
            else:
                n = sum(conn.execute(sql + " AND id = ?", (now, self.name, i)).rowcount
                        for i in ids)
        if n:
            self.notifier.notify()
        return n

    def purge(self, dead_only: bool, timeout: float) -> int:
        with self._write(timeout) as conn:
            # One statement per state: each walks its own index, not the whole table.
            states = (DEAD,) if dead_only else (READY, DELAYED, LEASED, DEAD)
            n = sum(int(conn.execute(f"DELETE FROM procwire_jobs WHERE queue = ? AND"
                                     f" state = {state}", (self.name,)).rowcount)
                    for state in states)
            if not dead_only:
                # A row with a state no code writes (edited by hand, or a damaged file) is in
                # no index: a full purge still removes it (one walk over the table).
                n += int(conn.execute(
                    f"DELETE FROM procwire_jobs WHERE queue = ? AND state NOT IN"
                    f" ({READY}, {DELAYED}, {LEASED}, {DEAD})", (self.name,)).rowcount)
            return n

    def execute(self, sql: str, params: Any = ()) -> list[Any]:
        """Run one statement in a write transaction (tests and repairs)."""
        with self._write(30.0) as conn:
            return conn.execute(sql, params).fetchall()

    # -- wake-ups -------------------------------------------------------------------------
    def wake_generation(self) -> int:
        return self.notifier.waker().generation

    def wait(self, generation: int, timeout: float) -> None:
        self.notifier.waker().wait(generation, timeout)

    async def await_wake(self, generation: int, timeout: float) -> None:
        await self.notifier.waker().await_wake(generation, timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.notifier.close()
        with self._lock:
            conns, self._conns = self._conns, []
        if self._pid == os.getpid():
            for c in conns:
                with contextlib.suppress(sqlite3.Error):
                    c.close()
        else:
            _ABANDONED.extend(conns)


def _set_wal(conn: sqlite3.Connection, timeout: float) -> str:
    """Switch the file to WAL (a no-op when it is already) and return the journal mode.
    Switching a new or rollback-journal file needs an exclusive lock that SQLite takes without
    its busy handler (two openers that both read the file would otherwise deadlock), so
    processes racing to open a fresh file get an immediate "database is locked": try again,
    with a short random pause, until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(random.uniform(0.001, 0.01))


def _now(conn: sqlite3.Connection) -> float:
    """The store's clock (UNIX seconds), as every process sees it."""
    return float(conn.execute(NOW).fetchone()[0])


def _busy(exc: sqlite3.Error) -> bool:
    """The lock stayed taken for a whole busy_timeout (SQLITE_BUSY or SQLITE_LOCKED)."""
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _translate(exc: sqlite3.Error, path: str) -> Exception:
    text = str(exc)
    if _busy(exc):
        return Timeout(f"{path}: the database stayed locked for the whole timeout ({text})")
    return QueueError(f"{path}: {type(exc).__name__}: {text}")
