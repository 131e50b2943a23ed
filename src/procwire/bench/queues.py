"""Queue benchmark: procwire's SQLite and Redis queues against huey (SqliteHuey and RedisHuey
storage), RQ (SimpleWorker) and persist-queue (SQLiteAckQueue).

    procwire bench queues [--quick] [--reps 3] [--single N] [--batched N] [--rq-jobs N]
                          [--only sqlite|redis] [--match TEXT] [--json out.json]
                          [--redis redis://127.0.0.1:6379/0 | --no-redis]

(``python benchmarks/queues.py`` in a checkout takes the same options; ``--rounds`` is another
name for ``--reps``.) Jobs/s for put and for get+ack, one at a time and in batches of 100, with
1 and 4 consumer processes. Each case runs in a fresh database file in a temporary folder on the
same disk as the system's temp dir. Every case runs ``--reps`` times (default 3, 1 with
``--quick``, which also takes 10x fewer jobs), interleaved (all cases, then all again), so a
noisy minute hits all of them; the table gives the median and [min-max] of the rounds, and the
ratios to the comparisons are taken within each round. Prints markdown on stdout, progress on
stderr; see benchmarks/queue.md for results.

The comparisons are not dependencies of procwire: ``pip install huey persist-queue rq``. A
comparison that is not installed, redis-py missing (``pip install 'procwire[redis]'``) or no
``redis-server`` on ``PATH`` is reported as a ``skipped`` row with the install hint, never left
out. The Redis cases start a private ``redis-server`` (no persistence) on a free loopback port
unless ``--redis URL`` names one (its database is FLUSHed before each case). A case that fails
is an ``error`` row; the exit status is then 1 (also when nothing could be measured).
Every consumer process is joined, and killed if still alive, after each case, also on errors.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def _mod(name: str) -> Any:
    """Import an optional package (redis-py, huey, rq, persist-queue); typed as Any since none
    of them is a procwire dependency."""
    return importlib.import_module(name)


PAYLOAD = {"id": 0, "user": "someone@example.com", "action": "resize", "size": [640, 480]}


def _payload(i: int) -> dict[str, Any]:
    return dict(PAYLOAD, id=i)


# -- procwire ------------------------------------------------------------------------------------

def pw_put(url: str, n: int, batch: int) -> float:
    from procwire.queue import Queue

    with Queue("bench", url) as q:
        q.stats()  # open + create the schema outside the timing
        t0 = time.perf_counter()
        if batch == 1:
            for i in range(n):
                q.put(_payload(i))
        else:
            for start in range(0, n, batch):
                q.put_many([_payload(i) for i in range(start, min(n, start + batch))])
        return time.perf_counter() - t0


def _pw_consumer(url: str, batch: int, mode: str, barrier: Any, conn: Any) -> None:
    from procwire.queue import Queue

    q = Queue("bench", url)
    q.stats()
    done = 0
    barrier.wait()
    t0 = time.time()
    if mode == "process":
        done = q.process(lambda data: None, idle_timeout=0.2).acked
    elif batch == 1:
        while (job := q.get(timeout=0)) is not None:
            job.ack()
            done += 1
    else:
        while jobs := q.get_many(batch, timeout=0):
            q.ack_many(jobs)
            done += len(jobs)
    t1 = time.time()
    if mode == "process":
        t1 -= 0.2  # the idle timeout that ended it
    conn.send((t0, t1, done))
    q.close()


def pw_get_ack(url: str, n: int, batch: int, procs: int, mode: str = "loop") -> float:
    from procwire.queue import Queue

    with Queue("bench", url) as q:
        for start in range(0, n, 1000):
            q.put_many([_payload(i) for i in range(start, min(n, start + 1000))])
    return _run_consumers(_pw_consumer, (url, batch, mode), procs, n)


def _run_consumers(target: Callable[..., None], args: tuple[Any, ...], procs: int,
                   n: int | None) -> float:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs)
    pipes = [ctx.Pipe(duplex=False) for _ in range(procs)]
    ps = [ctx.Process(target=target, args=(*args, barrier, w)) for _r, w in pipes]
    for p in ps:
        p.start()
    try:
        results = [r.recv() for r, _w in pipes]
    finally:
        for p in ps:
            p.join(60)
            if p.is_alive():
                p.kill()
    total = sum(r[2] for r in results)
    if n is not None and total != n:
        raise RuntimeError(f"consumers got {total} of {n} jobs")
    return float(max(r[1] for r in results) - min(r[0] for r in results))


# -- huey (its SQLite storage: enqueue / dequeue; dequeue deletes, there is no ack) --------------

def huey_put(path: str, n: int, batch: int) -> float:
    SqliteStorage = _mod("huey.storage").SqliteStorage
    s = SqliteStorage("bench", filename=path)
    data = [json.dumps(_payload(i)).encode() for i in range(n)]
    t0 = time.perf_counter()
    for d in data:
        s.enqueue(d)
    return time.perf_counter() - t0


def _huey_consumer(where: str, batch: int, mode: str, barrier: Any, conn: Any) -> None:
    """Dequeue until empty from huey's SQLite storage (a path) or Redis storage (a URL)."""
    if where.startswith("redis"):
        s = _huey_redis(where)
    else:
        s = _mod("huey.storage").SqliteStorage("bench", filename=where)
    done = 0
    barrier.wait()
    t0 = time.time()
    while s.dequeue() is not None:
        done += 1
    conn.send((t0, time.time(), done))


def huey_get(path: str, n: int, batch: int, procs: int) -> float:
    SqliteStorage = _mod("huey.storage").SqliteStorage
    s = SqliteStorage("bench", filename=path)
    for i in range(n):
        s.enqueue(json.dumps(_payload(i)).encode())
    return _run_consumers(_huey_consumer, (path, 1, "loop"), procs, n)


# -- persist-queue SQLiteAckQueue (one process: it is not meant for several) --------------------

def pq_put(path: str, n: int, batch: int) -> float:
    SQLiteAckQueue = _mod("persistqueue").SQLiteAckQueue
    q = SQLiteAckQueue(path, auto_commit=True, multithreading=True)
    t0 = time.perf_counter()
    for i in range(n):
        q.put(_payload(i))
    return time.perf_counter() - t0


def pq_get_ack(path: str, n: int, batch: int, procs: int) -> float:
    SQLiteAckQueue = _mod("persistqueue").SQLiteAckQueue
    q = SQLiteAckQueue(path, auto_commit=True, multithreading=True)
    for i in range(n):
        q.put(_payload(i))
    t0 = time.perf_counter()
    for _ in range(n):
        item = q.get(block=False)
        q.ack(item)
    return time.perf_counter() - t0


# -- Redis: a private server, RQ, huey RedisStorage ------------------------------------------------

class SetupError(RuntimeError):
    """A tool the benchmark needs is missing; the message says how to install it."""


REDIS_SERVER_HINT = ("redis-server not found on PATH: install Redis (e.g. `sudo apt-get install "
                     "redis-server`; the benchmark starts its own on a free loopback port), or "
                     "name a server with --redis URL")


class _RedisServer:
    """A private ``redis-server`` without persistence on a free loopback port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SetupError(REDIS_SERVER_HINT)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="pw-qbench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        redis = _mod("redis")
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.close()
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# RQ's job: a function its workers can import by name (RQ refuses ``__main__`` functions).
RQ_JOB = "builtins.len"


def rq_put(url: str, n: int, batch: int) -> float:
    redis, RQueue = _mod("redis"), _mod("rq").Queue
    q = RQueue("bench", connection=redis.Redis.from_url(url))
    t0 = time.perf_counter()
    if batch == 1:
        for i in range(n):
            q.enqueue(RQ_JOB, _payload(i), result_ttl=0)
    else:
        for start in range(0, n, batch):
            q.enqueue_many([RQueue.prepare_data(RQ_JOB, (_payload(i),), result_ttl=0)
                            for i in range(start, min(n, start + batch))])
    return time.perf_counter() - t0


def _rq_consumer(url: str, batch: int, mode: str, barrier: Any, conn: Any) -> None:
    redis, rq = _mod("redis"), _mod("rq")
    SimpleWorker: Any = rq.SimpleWorker

    class TimedWorker(SimpleWorker):  # type: ignore[misc]
        # Without RQ's command channel (a pub/sub thread for remote kill/shutdown commands,
        # nothing to do with jobs): with redis-py 8, stopping that thread on the way out
        # hangs for a minute. The run ends at the last job's success.
        last_done = 0.0

        def subscribe(self) -> None:
            pass

        def unsubscribe(self) -> None:
            pass

        def handle_job_success(self, *args: Any, **kwargs: Any) -> None:
            super().handle_job_success(*args, **kwargs)
            self.last_done = time.time()

    r = redis.Redis.from_url(url)
    q = rq.Queue("bench", connection=r)
    w = TimedWorker([q], connection=r)
    barrier.wait()
    t0 = time.time()
    w.work(burst=True, logging_level="ERROR")
    conn.send((t0, w.last_done or time.time(), 0))  # its counts live in Redis: checked after


def rq_get_ack(url: str, n: int, batch: int, procs: int) -> float:
    redis, RQueue = _mod("redis"), _mod("rq").Queue
    rq_put(url, n, 100)
    secs = _run_consumers(_rq_consumer, (url, 1, "loop"), procs, None)
    q = RQueue("bench", connection=redis.Redis.from_url(url))
    if q.count or q.failed_job_registry.count:
        raise RuntimeError(f"RQ: {q.count} jobs left, {q.failed_job_registry.count} failed")
    return secs


def _huey_redis(url: str) -> Any:
    redis, RedisStorage = _mod("redis"), _mod("huey.storage").RedisStorage
    # blocking=False: a blocking dequeue waits its read timeout (1 s) once the queue is empty
    return RedisStorage("bench", connection_pool=redis.ConnectionPool.from_url(url),
                        blocking=False)


def huey_redis_put(url: str, n: int, batch: int) -> float:
    s = _huey_redis(url)
    data = [json.dumps(_payload(i)).encode() for i in range(n)]
    t0 = time.perf_counter()
    for d in data:
        s.enqueue(d)
    return time.perf_counter() - t0


def huey_redis_get(url: str, n: int, batch: int, procs: int) -> float:
    s = _huey_redis(url)
    for i in range(n):
        s.enqueue(json.dumps(_payload(i)).encode())
    return _run_consumers(_huey_consumer, (url, 1, "loop"), procs, n)


# -- runner -------------------------------------------------------------------------------------

class Case:
    """One row of the table: ``fn(path)`` runs it once and returns seconds for ``n`` jobs."""

    def __init__(self, system: str, op: str, batch: int, procs: int, n: int,
                 fn: Callable[[str], float], note: str = "", redis: bool = False) -> None:
        self.system, self.op, self.batch, self.procs, self.n = system, op, batch, procs, n
        self.fn, self.note, self.redis = fn, note, redis
        self.rates: list[float] = []
        #: why the row has no figures: a missing package or tool (with the install hint) ...
        self.skipped = ""
        #: ... or the failure of one of its runs
        self.error = ""

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.system, self.op, self.batch, self.procs)


def sqlite_cases(single: int, batched: int) -> list[Case]:
    """The SQLite rows, each comparison next to the procwire row it is compared with (the
    disk's fsync time drifts within minutes)."""
    full, normal = "sqlite:///{}", "sqlite:///{}?synchronous=normal"
    no_ack = "dequeue deletes: no lease, no ack"

    def pw(label: str, tmpl: str, op: str, batch: int, procs: int, note: str = "") -> Case:
        n = single if batch == 1 else batched
        if op == "put":
            return Case(label, op, batch, procs, n,
                        lambda p: pw_put(tmpl.format(p), n, batch))
        mode = "process" if op == "process" else "loop"
        return Case(label, op, batch, procs, n,
                    lambda p: pw_get_ack(tmpl.format(p), n, batch, procs, mode), note)

    proc_note = "q.process(): the ack rides on the next get's commit"
    cases = [
        pw("procwire sqlite FULL", full, "put", 1, 1),
        Case("persist-queue SQLiteAckQueue", "put", 1, 1, single,
             lambda p: pq_put(p, single, 1)),
        Case("huey SqliteStorage", "put", 1, 1, single, lambda p: huey_put(p, single, 1)),
        pw("procwire sqlite FULL", full, "get+ack", 1, 1),
        pw("procwire sqlite FULL", full, "process", 1, 1, proc_note),
        Case("persist-queue SQLiteAckQueue", "get+ack", 1, 1, single,
             lambda p: pq_get_ack(p, single, 1, 1)),
        Case("huey SqliteStorage", "get (no ack)", 1, 1, single,
             lambda p: huey_get(p, single, 1, 1), no_ack),
        pw("procwire sqlite FULL", full, "get+ack", 1, 4),
        Case("huey SqliteStorage", "get (no ack)", 1, 4, single,
             lambda p: huey_get(p, single, 1, 4), no_ack),
        pw("procwire sqlite FULL", full, "put", 100, 1),
        pw("procwire sqlite FULL", full, "get+ack", 100, 1),
        pw("procwire sqlite FULL", full, "get+ack", 100, 4),
    ]
    for op, batch, procs in (("put", 1, 1), ("put", 100, 1), ("get+ack", 1, 1),
                             ("get+ack", 100, 1), ("get+ack", 1, 4), ("get+ack", 100, 4),
                             ("process", 1, 1)):
        cases.append(pw("procwire sqlite NORMAL", normal, op, batch, procs,
                        proc_note if op == "process" else ""))
    return cases


class RedisTarget:
    """The Redis URL the Redis cases run against, known once the server is up."""

    url = ""


def redis_case_list(target: RedisTarget, single: int, batched: int,
                    rq_jobs: int) -> list[Case]:
    """The Redis rows, each comparison next to the procwire row it is compared with; they run
    against ``target.url`` as it is when they run."""
    def c(system: str, op: str, batch: int, procs: int, n: int, fn: Callable[[str], float],
          note: str = "") -> Case:
        return Case(system, op, batch, procs, n, lambda _p: fn(target.url), note, redis=True)

    label = "procwire redis"
    rq_note = "work(burst=True), worker start-up included"
    no_ack = "dequeue is an RPOP: no lease, no ack"
    cases = [c(label, "put", 1, 1, single, lambda u: pw_put(u, single, 1)),
             c("RQ", "put", 1, 1, single, lambda u: rq_put(u, single, 1)),
             c("huey RedisStorage", "put", 1, 1, single, lambda u: huey_redis_put(u, single, 1)),
             c(label, "put", 100, 1, batched, lambda u: pw_put(u, batched, 100)),
             c("RQ", "put", 100, 1, single, lambda u: rq_put(u, single, 100), "enqueue_many")]
    for procs in (1, 4):
        cases += [
            c(label, "get+ack", 1, procs, single, partial(pw_get_ack, n=single, batch=1,
                                                          procs=procs)),
            c("RQ SimpleWorker", "get+ack", 1, procs, rq_jobs,
              partial(rq_get_ack, n=rq_jobs, batch=1, procs=procs), rq_note),
            c("huey RedisStorage", "get (no ack)", 1, procs, single,
              partial(huey_redis_get, n=single, batch=1, procs=procs), no_ack),
            c(label, "get+ack", 100, procs, batched,
              partial(pw_get_ack, n=batched, batch=100, procs=procs))]
    cases.append(c(label, "process", 1, 1, single,
                   lambda u: pw_get_ack(u, single, 1, 1, "process"),
                   "q.process(): the ack rides on the next get's script"))
    return cases


# (procwire row, comparison row): their jobs/s ratio is taken within each round.
RATIOS = [
    (("procwire sqlite FULL", "put", 1, 1), ("persist-queue SQLiteAckQueue", "put", 1, 1)),
    (("procwire sqlite FULL", "get+ack", 1, 1),
     ("persist-queue SQLiteAckQueue", "get+ack", 1, 1)),
    (("procwire sqlite FULL", "process", 1, 1),
     ("persist-queue SQLiteAckQueue", "get+ack", 1, 1)),
    (("procwire sqlite FULL", "put", 1, 1), ("huey SqliteStorage", "put", 1, 1)),
    (("procwire sqlite FULL", "get+ack", 1, 1), ("huey SqliteStorage", "get (no ack)", 1, 1)),
    (("procwire sqlite FULL", "get+ack", 100, 1), ("huey SqliteStorage", "get (no ack)", 1, 1)),
    (("procwire sqlite FULL", "get+ack", 100, 4), ("huey SqliteStorage", "get (no ack)", 1, 4)),
    (("procwire redis", "put", 1, 1), ("RQ", "put", 1, 1)),
    (("procwire redis", "get+ack", 1, 1), ("RQ SimpleWorker", "get+ack", 1, 1)),
    (("procwire redis", "get+ack", 1, 4), ("RQ SimpleWorker", "get+ack", 1, 4)),
    (("procwire redis", "get+ack", 1, 1), ("huey RedisStorage", "get (no ack)", 1, 1)),
    (("procwire redis", "get+ack", 1, 4), ("huey RedisStorage", "get (no ack)", 1, 4)),
]


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2


# What each system needs beyond procwire: (module, install hint), by prefix of its name.
REQUIREMENTS: list[tuple[str, str, str]] = [
    ("persist-queue", "persistqueue", "pip install persist-queue"),
    ("huey", "huey", "pip install huey"),
    ("RQ", "rq", "pip install rq"),
]
REDIS_PY_HINT = "pip install 'procwire[redis]'"


def missing_requirement(system: str) -> str:
    """Why ``system`` cannot run here (the package that does not import and how to install
    it), or "" when it can."""
    for prefix, module, hint in REQUIREMENTS:
        if system.startswith(prefix):
            try:
                _mod(module)
            except ImportError as exc:
                return f"{module} is not installed ({exc}): `{hint}`"
    return ""


def _versions() -> list[str]:
    found = []
    for dist in ("redis", "huey", "rq", "persist-queue"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return found


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``python benchmarks/queues.py [OPTIONS]`` / ``procwire bench queues [OPTIONS]``: runs the
    cases, prints the markdown tables; 1 when a case failed or nothing could be measured."""
    ap = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--single", type=int, default=3000, help="jobs for one-at-a-time cases")
    ap.add_argument("--batched", type=int, default=50_000, help="jobs for batched cases")
    ap.add_argument("--rq-jobs", type=int, default=1000,
                    help="jobs for RQ's workers (about 100/s each: kept short)")
    ap.add_argument("--reps", "--rounds", dest="rounds", type=int, default=None,
                    help="runs of every case, interleaved (case A, B, ... then again); "
                    "default 3, 1 with --quick")
    ap.add_argument("--quick", action="store_true", help="10x fewer jobs, one round")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--redis", help="use this Redis (FLUSHDB before each case) instead of a "
                    "private redis-server")
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis cases")
    ap.add_argument("--only", choices=("sqlite", "redis"), help="run one store's cases")
    ap.add_argument("--match", help="run only the rows whose system contains this text")
    args = ap.parse_args(argv)
    single, batched, rq_jobs = args.single, args.batched, args.rq_jobs
    if args.quick:
        single, batched, rq_jobs = single // 10, batched // 10, rq_jobs // 10
    rounds: int = args.rounds or (1 if args.quick else 3)

    cases: list[Case] = [] if args.only == "redis" else sqlite_cases(single, batched)
    target = RedisTarget()
    if not args.no_redis and args.only != "sqlite":
        cases += redis_case_list(target, single, batched, rq_jobs)
    if args.match:
        cases = [c for c in cases if args.match in c.system]
    for c in cases:
        c.skipped = missing_requirement(c.system)

    server: _RedisServer | None = None
    client: Any = None
    redis_cases = [c for c in cases if c.redis and not c.skipped]
    if redis_cases:
        why = ""
        try:
            redis = _mod("redis")
        except ImportError as exc:
            why = f"redis-py is not installed ({exc}): `{REDIS_PY_HINT}`"
        url = args.redis
        if not why and url is None:
            try:
                server = _RedisServer()
                url = server.url
            except SetupError as exc:
                why = str(exc)
        if why:
            for c in redis_cases:
                c.skipped = why
        else:
            target.url = url
            client = redis.Redis.from_url(url)
    for c in cases:
        if c.skipped:
            print(f"skip {c.system} {c.op}: {c.skipped}", file=sys.stderr)

    try:
        for r in range(rounds):
            for c in cases:
                if c.skipped or c.error:
                    continue
                try:
                    if c.redis:
                        client.flushdb()
                    with tempfile.TemporaryDirectory(prefix="pw-qbench-") as d:
                        secs = c.fn(os.path.join(d, "q.db"))
                except Exception as exc:
                    # Reported as an error row, not dropped; its other rounds are not run.
                    c.error, c.rates = repr(exc)[:300], []
                    print(f"round {r + 1}: {c.system} {c.op}: failed: {c.error}",
                          file=sys.stderr)
                    continue
                c.rates.append(c.n / secs)
                print(f"round {r + 1}: {c.system:28} {c.op:12} batch={c.batch:<4}"
                      f" procs={c.procs} {c.n / secs:>10,.0f} jobs/s", file=sys.stderr)
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.close()

    done = [c for c in cases if c.rates]
    by_key = {c.key: c for c in done}
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
          f" SQLite {sqlite3.sqlite_version}; {', '.join(_versions())}; {rounds} round(s)\n")
    print("| system | op | batch | consumer procs | jobs | jobs/s (median) | [min-max] | note |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for c in cases:
        if c.rates:
            figures = f"{_median(c.rates):,.0f} | [{min(c.rates):,.0f}-{max(c.rates):,.0f}]"
            note = c.note
        else:
            figures = "skipped | -" if c.skipped else "error | -"
            note = c.skipped or c.error
        print(f"| {c.system} | {c.op} | {c.batch} | {c.procs} | {c.n:,} | {figures} | {note} |")
    ratio_rows = []
    for a, b in RATIOS:
        ca, cb = by_key.get(a), by_key.get(b)
        if ca is None or cb is None:
            continue
        ratios = [x / y for x, y in zip(ca.rates, cb.rates, strict=False)]
        ratio_rows.append((a, b, ratios))
    if ratio_rows:
        print("\n| procwire | vs | ratio (median of rounds) | [min-max] |")
        print("|---|---|---:|---|")
        for a, b, ratios in ratio_rows:
            print(f"| {a[0]} {a[1]} batch={a[2]} procs={a[3]} | {b[0]} {b[1]} procs={b[3]} |"
                  f" {_median(ratios):.2f}x | [{min(ratios):.2f}-{max(ratios):.2f}] |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"system": c.system, "op": c.op, "batch": c.batch, "procs": c.procs, "jobs": c.n,
              "jobs_per_s": [round(x) for x in c.rates], "note": c.note,
              **({"skipped": c.skipped} if c.skipped else {}),
              **({"error": c.error} if c.error else {})} for c in cases],
            indent=1))
    return 1 if any(c.error for c in cases) or not done else 0
