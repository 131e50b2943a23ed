#!/usr/bin/env python
"""Queue benchmark: procwire's SQLite and Redis queues against huey (SqliteHuey and RedisHuey
storage), RQ (SimpleWorker) and persist-queue (SQLiteAckQueue), when those are installed.

    python benchmarks/queues.py [--quick] [--rounds 3] [--single N] [--batched N]
                               [--only sqlite|redis] [--match TEXT] [--json out.json]
                               [--redis redis://127.0.0.1:6379/0 | --no-redis]

Jobs/s for put and for get+ack, one at a time and in batches of 100, with 1 and 4 consumer
processes. Each case runs in a fresh database file in a temporary folder on the same disk as
the system's temp dir. Every case runs ``--rounds`` times, interleaved (all cases, then all
again), so a noisy minute hits all of them; the table gives the median and [min-max] of the
rounds, and the ratios to the comparisons are taken within each round. Prints markdown;
see benchmarks/queue.md for results.
Comparisons: ``pip install huey persist-queue rq`` (not dependencies of procwire).
Redis cases start a private ``redis-server`` (no persistence) on a free loopback port unless
``--redis URL`` names one (its database is FLUSHed before each case).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Measure this checkout's code. (This file is not named queue.py: beside the other benchmark
# scripts that name would shadow the standard library's ``queue``.)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

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
    return max(r[1] for r in results) - min(r[0] for r in results)


# -- huey (its SQLite storage: enqueue / dequeue; dequeue deletes, there is no ack) --------------

def huey_put(path: str, n: int, batch: int) -> float:
    from huey.storage import SqliteStorage

    s = SqliteStorage("bench", filename=path)
    data = [json.dumps(_payload(i)).encode() for i in range(n)]
    t0 = time.perf_counter()
    for d in data:
        s.enqueue(d)
    return time.perf_counter() - t0


def _huey_consumer(path: str, batch: int, mode: str, barrier: Any, conn: Any) -> None:
    from huey.storage import SqliteStorage

    s = SqliteStorage("bench", filename=path)
    done = 0
    barrier.wait()
    t0 = time.time()
    while s.dequeue() is not None:
        done += 1
    conn.send((t0, time.time(), done))


def huey_get(path: str, n: int, batch: int, procs: int) -> float:
    from huey.storage import SqliteStorage

    s = SqliteStorage("bench", filename=path)
    for i in range(n):
        s.enqueue(json.dumps(_payload(i)).encode())
    return _run_consumers(_huey_consumer, (path, 1, "loop"), procs, n)


# -- persist-queue SQLiteAckQueue (one process: it is not meant for several) --------------------

def pq_put(path: str, n: int, batch: int) -> float:
    from persistqueue import SQLiteAckQueue

    q = SQLiteAckQueue(path, auto_commit=True, multithreading=True)
    t0 = time.perf_counter()
    for i in range(n):
        q.put(_payload(i))
    return time.perf_counter() - t0


def pq_get_ack(path: str, n: int, batch: int, procs: int) -> float:
    from persistqueue import SQLiteAckQueue

    q = SQLiteAckQueue(path, auto_commit=True, multithreading=True)
    for i in range(n):
        q.put(_payload(i))
    t0 = time.perf_counter()
    for _ in range(n):
        item = q.get(block=False)
        q.ack(item)
    return time.perf_counter() - t0


# -- Redis: a private server, RQ, huey RedisStorage ------------------------------------------------

class _RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (sudo apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="pw-qbench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

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
    import redis
    from rq import Queue as RQueue

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
    import redis
    from rq import Queue as RQueue
    from rq import SimpleWorker

    class TimedWorker(SimpleWorker):
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
    q = RQueue("bench", connection=r)
    w = TimedWorker([q], connection=r)
    barrier.wait()
    t0 = time.time()
    w.work(burst=True, logging_level="ERROR")
    conn.send((t0, w.last_done or time.time(), 0))  # its counts live in Redis: checked after


def rq_get_ack(url: str, n: int, batch: int, procs: int) -> float:
    import redis
    from rq import Queue as RQueue

    rq_put(url, n, 100)
    secs = _run_consumers(_rq_consumer, (url, 1, "loop"), procs, None)
    q = RQueue("bench", connection=redis.Redis.from_url(url))
    if q.count or q.failed_job_registry.count:
        raise RuntimeError(f"RQ: {q.count} jobs left, {q.failed_job_registry.count} failed")
    return secs


def _huey_redis(url: str) -> Any:
    import redis
    from huey.storage import RedisStorage

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


def _huey_redis_consumer(url: str, batch: int, mode: str, barrier: Any, conn: Any) -> None:
    s = _huey_redis(url)
    done = 0
    barrier.wait()
    t0 = time.time()
    while s.dequeue() is not None:
        done += 1
    conn.send((t0, time.time(), done))


def huey_redis_get(url: str, n: int, batch: int, procs: int) -> float:
    s = _huey_redis(url)
    for i in range(n):
        s.enqueue(json.dumps(_payload(i)).encode())
    return _run_consumers(_huey_redis_consumer, (url, 1, "loop"), procs, n)


# -- runner -------------------------------------------------------------------------------------

class Case:
    """One row of the table: ``fn(path)`` runs it once and returns seconds for ``n`` jobs."""

    def __init__(self, system: str, op: str, batch: int, procs: int, n: int,
                 fn: Callable[[str], float], note: str = "", redis: bool = False) -> None:
        self.system, self.op, self.batch, self.procs, self.n = system, op, batch, procs, n
        self.fn, self.note, self.redis = fn, note, redis
        self.rates: list[float] = []

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


def redis_case_list(url: str, single: int, batched: int, rq_jobs: int) -> list[Case]:
    def c(system: str, op: str, batch: int, procs: int, n: int, fn: Callable[[str], float],
          note: str = "") -> Case:
        return Case(system, op, batch, procs, n, lambda _p: fn(url), note, redis=True)

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
            c(label, "get+ack", 1, procs, single,
              lambda u, k=procs: pw_get_ack(u, single, 1, k)),
            c("RQ SimpleWorker", "get+ack", 1, procs, rq_jobs,
              lambda u, k=procs: rq_get_ack(u, rq_jobs, 1, k), rq_note),
            c("huey RedisStorage", "get (no ack)", 1, procs, single,
              lambda u, k=procs: huey_redis_get(u, single, 1, k), no_ack),
            c(label, "get+ack", 100, procs, batched,
              lambda u, k=procs: pw_get_ack(u, batched, 100, k))]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--single", type=int, default=3000, help="jobs for one-at-a-time cases")
    ap.add_argument("--batched", type=int, default=50_000, help="jobs for batched cases")
    ap.add_argument("--rq-jobs", type=int, default=1000,
                    help="jobs for RQ's workers (about 100/s each: kept short)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of every case, interleaved (case A, B, ... then again)")
    ap.add_argument("--quick", action="store_true", help="10x fewer jobs, one round")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--redis", help="use this Redis (FLUSHDB before each case) instead of a "
                    "private redis-server")
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis cases")
    ap.add_argument("--only", choices=("sqlite", "redis"), help="run one store's cases")
    ap.add_argument("--match", help="run only the rows whose system contains this text")
    args = ap.parse_args()
    single, batched, rq_jobs, rounds = args.single, args.batched, args.rq_jobs, args.rounds
    if args.quick:
        single, batched, rq_jobs, rounds = single // 10, batched // 10, rq_jobs // 10, 1

    cases: list[Case] = [] if args.only == "redis" else sqlite_cases(single, batched)
    server: _RedisServer | None = None
    client: Any = None
    url = args.redis
    if not args.no_redis and args.only != "sqlite":
        import redis

        if url is None:
            try:
                server = _RedisServer()
                url = server.url
            except RuntimeError as exc:
                print(f"skip Redis: {exc}", file=sys.stderr)
        if url is not None:
            client = redis.Redis.from_url(url)
            cases += redis_case_list(url, single, batched, rq_jobs)
    if args.match:
        cases = [c for c in cases if args.match in c.system]

    skipped: set[str] = set()
    try:
        for r in range(rounds):
            for c in cases:
                if c.system in skipped:
                    continue
                if c.redis:
                    client.flushdb()
                with tempfile.TemporaryDirectory(prefix="pw-qbench-") as d:
                    try:
                        secs = c.fn(os.path.join(d, "q.db"))
                    except ImportError as exc:
                        print(f"skip {c.system}: {exc}", file=sys.stderr)
                        skipped.add(c.system)
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
    versions = []
    for mod, dist in (("redis", "redis"), ("huey", "huey"), ("rq", "rq"),
                      ("persistqueue", "persist-queue")):
        try:
            from importlib.metadata import version

            __import__(mod)
            versions.append(f"{dist} {version(dist)}")
        except ImportError:
            pass
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
          f" SQLite {sqlite3.sqlite_version}; {', '.join(versions)}; {rounds} round(s)\n")
    print("| system | op | batch | consumer procs | jobs | jobs/s (median) | [min-max] | note |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for c in done:
        print(f"| {c.system} | {c.op} | {c.batch} | {c.procs} | {c.n:,} |"
              f" {_median(c.rates):,.0f} | [{min(c.rates):,.0f}-{max(c.rates):,.0f}] |"
              f" {c.note} |")
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
              "jobs_per_s": [round(x) for x in c.rates], "note": c.note} for c in done],
            indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
