#!/usr/bin/env python
"""Queue benchmark: procwire's SQLite and Redis queues against huey (SqliteHuey and RedisHuey
storage), RQ (SimpleWorker) and persist-queue (SQLiteAckQueue), when those are installed.

    python benchmarks/queues.py [--quick] [--single N] [--batched N] [--json out.json]
                               [--redis redis://127.0.0.1:6379/0 | --no-redis]

Jobs/s for put and for get+ack, one at a time and in batches of 100, with 1 and 4 consumer
processes. Each case runs in a fresh database file in a temporary folder on the same disk as
the system's temp dir. Prints a markdown table; see benchmarks/queue.md for results.
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

    r = redis.Redis.from_url(url)
    q = RQueue("bench", connection=r)
    w = SimpleWorker([q], connection=r)
    barrier.wait()
    t0 = time.time()
    w.work(burst=True, logging_level="ERROR")
    conn.send((t0, time.time(), 0))  # its counts live in Redis: checked after the run


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

def redis_cases(case: Callable[..., None], url: str | None, single: int, batched: int) -> None:
    import redis

    server = None
    if url is None:
        try:
            server = _RedisServer()
        except RuntimeError as exc:
            print(f"skip Redis: {exc}", file=sys.stderr)
            return
        url = server.url
    client = redis.Redis.from_url(url)

    def rcase(system: str, op: str, batch: int, procs: int, n: int,
              fn: Callable[[str], float], note: str = "") -> None:
        client.flushdb()
        assert url is not None
        case(system, op, batch, procs, n, lambda _p: fn(url), note)

    try:
        label = "procwire redis"
        rcase(label, "put", 1, 1, single, lambda u: pw_put(u, single, 1))
        rcase(label, "put", 100, 1, batched, lambda u: pw_put(u, batched, 100))
        for procs in (1, 4):
            rcase(label, "get+ack", 1, procs, single,
                  lambda u, k=procs: pw_get_ack(u, single, 1, k))
            rcase(label, "get+ack", 100, procs, batched,
                  lambda u, k=procs: pw_get_ack(u, batched, 100, k))
        rcase(label, "process", 1, 1, single,
              lambda u: pw_get_ack(u, single, 1, 1, "process"),
              "q.process(): the ack rides on the next get's script")
        rcase("RQ", "put", 1, 1, single, lambda u: rq_put(u, single, 1))
        rcase("RQ", "put", 100, 1, single, lambda u: rq_put(u, single, 100), "enqueue_many")
        for procs in (1, 4):
            rcase("RQ SimpleWorker", "get+ack", 1, procs, single,
                  lambda u, k=procs: rq_get_ack(u, single, 1, k), "work(burst=True)")
        rcase("huey RedisStorage", "put", 1, 1, single, lambda u: huey_redis_put(u, single, 1))
        for procs in (1, 4):
            rcase("huey RedisStorage", "get", 1, procs, single,
                  lambda u, k=procs: huey_redis_get(u, single, 1, k), "dequeue: no ack")
    finally:
        client.close()
        if server is not None:
            server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--single", type=int, default=3000, help="jobs for one-at-a-time cases")
    ap.add_argument("--batched", type=int, default=50_000, help="jobs for batched cases")
    ap.add_argument("--quick", action="store_true", help="10x fewer jobs")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--redis", help="use this Redis (FLUSHDB before each case) instead of a "
                    "private redis-server")
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis cases")
    ap.add_argument("--only", choices=("sqlite", "redis"), help="run one store's cases")
    args = ap.parse_args()
    single, batched = args.single, args.batched
    if args.quick:
        single, batched = single // 10, batched // 10

    rows: list[dict[str, Any]] = []

    def case(system: str, op: str, batch: int, procs: int, n: int,
             fn: Callable[[str], float], note: str = "") -> None:
        with tempfile.TemporaryDirectory(prefix="pw-qbench-") as d:
            path = os.path.join(d, "q.db")
            try:
                secs = fn(path)
            except ImportError as exc:
                print(f"skip {system}: {exc}", file=sys.stderr)
                return
        rate = n / secs
        rows.append({"system": system, "op": op, "batch": batch, "procs": procs, "jobs": n,
                     "seconds": round(secs, 4), "jobs_per_s": round(rate), "note": note})
        print(f"{system:28} {op:8} batch={batch:<4} procs={procs} {rate:>10,.0f} jobs/s",
              file=sys.stderr)

    full = "sqlite:///{}"
    normal = "sqlite:///{}?synchronous=normal"
    sqlite_stores = [] if args.only == "redis" else [("procwire sqlite FULL", full),
                                                     ("procwire sqlite NORMAL", normal)]
    for label, tmpl in sqlite_stores:
        case(label, "put", 1, 1, single, lambda p, t=tmpl: pw_put(t.format(p), single, 1))
        case(label, "put", 100, 1, batched,
             lambda p, t=tmpl: pw_put(t.format(p), batched, 100))
        for procs in (1, 4):
            case(label, "get+ack", 1, procs, single,
                 lambda p, t=tmpl, k=procs: pw_get_ack(t.format(p), single, 1, k))
            case(label, "get+ack", 100, procs, batched,
                 lambda p, t=tmpl, k=procs: pw_get_ack(t.format(p), batched, 100, k))
        case(label, "process", 1, 1, single,
             lambda p, t=tmpl: pw_get_ack(t.format(p), single, 1, 1, "process"),
             "q.process(): the ack rides on the next get's commit")
    if args.only != "redis":
        case("huey SqliteStorage", "put", 1, 1, single, lambda p: huey_put(p, single, 1))
        for procs in (1, 4):
            case("huey SqliteStorage", "get", 1, procs, single,
                 lambda p, k=procs: huey_get(p, single, 1, k), "dequeue deletes: no ack")
        case("persist-queue SQLiteAckQueue", "put", 1, 1, single,
             lambda p: pq_put(p, single, 1))
        case("persist-queue SQLiteAckQueue", "get+ack", 1, 1, single,
             lambda p: pq_get_ack(p, single, 1, 1))
    if not args.no_redis and args.only != "sqlite":
        redis_cases(case, args.redis, single, batched)

    import redis

    print(f"\nredis-py {redis.__version__}", file=sys.stderr)
    print(f"\n{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
          f" SQLite {sqlite3.sqlite_version}\n")
    print("| system | op | batch | consumer procs | jobs/s | note |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['system']} | {r['op']} | {r['batch']} | {r['procs']} |"
              f" {r['jobs_per_s']:,} | {r['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
