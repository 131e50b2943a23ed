"""Crash tests with real processes: consumers SIGKILLed mid-run, a producer killed mid
``put_many``. Nothing is lost, nothing is half-done."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from procwire.queue import Queue

CONSUMER = r"""
import os, sys, time
from procwire.queue import Queue
url, log, stop = sys.argv[1:4]
q = Queue("crash", url, lease=2.0)
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, b"S\n")
while True:
    job = q.get(timeout=0.2)
    if job is None:
        if os.path.exists(stop):
            break
        continue
    os.write(fd, b"G %d\n" % job.id)
    time.sleep(0.003)  # the work
    job.ack()
    os.write(fd, b"A %d\n" % job.id)
q.close()
"""

PRODUCER = r"""
import sys
from procwire.queue import Queue
url, run = sys.argv[1], int(sys.argv[2])
q = Queue("batches", url)
for b in range(10_000):
    q.put_many([{"run": run, "batch": b, "i": i} for i in range(500)])
    if b == 0:
        print("ready", flush=True)
"""


def _wait_started(log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().startswith(b"S\n"):
            return
        time.sleep(0.02)
    raise AssertionError(f"consumer did not start ({log})")


@pytest.mark.timeout(120)
def test_consumers_killed_lose_nothing(children, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    n = 5000
    with Queue("crash", url) as q:
        q.put_many(range(n))
    stop = tmp_path / "stop"
    procs: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
    killed: set[int] = set()
    seq = 0

    def start() -> None:
        nonlocal seq
        seq += 1
        log = tmp_path / f"c{seq}.log"
        p = children.python(CONSUMER, url, str(log), str(stop))
        procs[seq] = (p, log)

    # About 5 s on a quiet machine; 12 to 30 s were seen while other suites loaded both cores.
    deadline = time.monotonic() + 60
    for _ in range(4):
        start()
    for k in list(procs):
        _wait_started(procs[k][1], deadline)
    with Queue("crash", url) as q:
        kills = 0
        while kills < 5 and time.monotonic() < deadline:
            time.sleep(1.0)
            if q.stats().ready == 0:
                break
            victim = random.choice([k for k in procs if k not in killed])
            procs[victim][0].send_signal(signal.SIGKILL)
            procs[victim][0].wait(10)
            killed.add(victim)
            kills += 1
            start()
        assert kills >= 3, f"the run ended after {kills} kills: make the work slower"
        while time.monotonic() < deadline:
            s = q.stats()
            if s.total == 0:
                break
            time.sleep(0.1)
        stop.touch()
        for k, (p, _log) in procs.items():
            if k not in killed:
                assert p.wait(10) == 0, f"consumer {k} failed"
        s = q.stats()
    assert s.total == 0, f"jobs left: {s}"
    assert s.put == n and s.acked == n and s.dead == 0

    got: dict[int, list[int]] = defaultdict(list)
    acked: dict[int, list[int]] = defaultdict(list)
    for k, (_p, log) in procs.items():
        for line in log.read_text().splitlines():
            if line.startswith("G "):
                got[int(line[2:])].append(k)
            elif line.startswith("A "):
                acked[int(line[2:])].append(k)
    assert len(got) == n, f"{n - len(got)} jobs never delivered"
    dup = 0
    for job_id, holders in got.items():
        assert len(acked[job_id]) <= 1, f"job {job_id} acked twice: {acked[job_id]}"
        if len(holders) > 1:
            dup += 1
            # Every holder but the one that acked must be a consumer that was killed.
            others = [h for h in holders if h not in acked[job_id]]
            assert len(others) >= len(holders) - 1
            for h in (others if acked[job_id] else others[:-1]):
                assert h in killed, f"job {job_id} redelivered though holder {h} lived"
    for k, (_p, _log) in procs.items():
        if k not in killed:  # a consumer that lived acked everything it got
            mine = {j for j, hs in got.items() if k in hs}
            assert mine == {j for j, hs in acked.items() if k in hs}
    print(f"kills={len(killed)} redelivered={dup}")
    assert dup <= len(killed)  # a consumer holds one job at a time
    # The killed consumers' wake-up sockets are removed by the next notification.
    with Queue("crash", url) as q:
        q.put("tidy")
        live = {name for name in os.listdir(f"{tmp_path}/q.db-wake")}
        assert not live, live


def test_producer_killed_mid_put_many_is_all_or_nothing(children, queue_url: str,
                                                        tmp_path: Path) -> None:
    # On both stores (queue_url: SQLite and a real redis-server): one put_many is one
    # transaction / one Lua script, so a SIGKILL at any moment leaves whole batches only.
    url = queue_url
    for run in range(4):
        p = children.python(PRODUCER, url, str(run), stdout=subprocess.PIPE)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(random.uniform(0.05, 0.3))
        p.kill()
        p.wait(10)
    if url.startswith("sqlite:"):
        db = sqlite3.connect(f"{tmp_path}/queues.db")
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
    counts: dict[tuple[int, int], int] = defaultdict(int)
    with Queue("batches", url, lease=600) as q:  # the store is fine afterwards
        stats = q.stats()
        assert stats.put == stats.ready, stats  # no half-counted batch either
        first = True
        for _ in range(stats.ready // 1000 + 2):  # read every job (leased, not acked)
            jobs = q.get_many(1000, timeout=0)
            if not jobs:
                break
            if first:  # FIFO: the oldest batch comes out first
                assert (jobs[0].data["run"], jobs[0].data["batch"]) == (0, 0)
                first = False
            for job in jobs:
                counts[job.data["run"], job.data["batch"]] += 1
        assert sum(counts.values()) == stats.ready
        assert q.stats().leased == stats.ready
    runs = {r for r, _b in counts}
    assert runs == {0, 1, 2, 3}
    for (run, batch), count in counts.items():
        assert count == 500, f"run {run} batch {batch}: {count} of 500 jobs"
    for run in runs:  # batches are complete and consecutive: none missing in between
        batches = sorted(b for r, b in counts if r == run)
        assert batches == list(range(len(batches)))
