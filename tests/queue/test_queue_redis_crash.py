"""Crash tests on Redis with real processes: consumers SIGKILLed mid-run lose nothing; Redis
restarted mid-run: consumers reconnect and carry on."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from procwire.queue import Queue

# Logs "G <tag>" when it got a job and "A <tag>" after the ack; store errors (Redis down or
# restarted under it) are logged as "E <type>" and it carries on.
CONSUMER = r"""
import os, sys, time
import procwire
from procwire.queue import Queue, LeaseLost
url, log, stop, lease = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
q = Queue("crash", url, lease=lease, timeout=2)
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, b"S\n")
while True:
    try:
        job = q.get(timeout=0.2)
        if job is None:
            if os.path.exists(stop):
                break
            continue
        tag = ("%s-%s" % (job.data["b"], job.data["i"])).encode()
        os.write(fd, b"G %s\n" % tag)
        time.sleep(job.data.get("work", 0.003))
        job.ack()
        os.write(fd, b"A %s\n" % tag)
    except (LeaseLost, procwire.QueueError, procwire.Timeout) as exc:
        os.write(fd, b"E %s\n" % type(exc).__name__.encode())
q.close()
"""


def _wait_started(log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().startswith(b"S\n"):
            return
        time.sleep(0.02)
    raise AssertionError(f"consumer did not start ({log})")


def _read_logs(logs: dict[int, Path]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    got: dict[str, list[int]] = defaultdict(list)
    acked: dict[str, list[int]] = defaultdict(list)
    for k, log in logs.items():
        for line in log.read_text().splitlines():
            if line.startswith("G "):
                got[line[2:]].append(k)
            elif line.startswith("A "):
                acked[line[2:]].append(k)
    return got, acked


class _Consumers:
    def __init__(self, children: Any, tmp_path: Path, url: str, lease: float) -> None:
        self.children = children
        self.tmp = tmp_path
        self.url = url
        self.lease = lease
        self.stop = tmp_path / "stop"
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}
        self.seq = 0

    def start(self) -> int:
        self.seq += 1
        log = self.tmp / f"c{self.seq}.log"
        self.procs[self.seq] = self.children.python(CONSUMER, self.url, str(log),
                                                    str(self.stop), str(self.lease))
        self.logs[self.seq] = log
        return self.seq

    def finish(self, killed: set[int]) -> None:
        self.stop.touch()
        for k, p in self.procs.items():
            if k not in killed:
                assert p.wait(10) == 0, f"consumer {k} failed"


def test_consumers_killed_lose_nothing(children: Any, redis_server: Any,
                                       tmp_path: Path) -> None:
    url = redis_server.url
    n = 5000  # the run: 4 consumers, 5,000 jobs, one SIGKILLed every second
    with Queue("crash", url) as q:
        q.put_many({"b": 0, "i": i, "work": 0.003} for i in range(n))
    cs = _Consumers(children, tmp_path, url, lease=0.8)
    killed: set[int] = set()
    deadline = time.monotonic() + 25
    for _ in range(4):
        cs.start()
    for k in list(cs.procs):
        _wait_started(cs.logs[k], deadline)
    with Queue("crash", url) as q:
        while len(killed) < 6 and time.monotonic() < deadline:
            time.sleep(1.0)
            if q.stats().ready == 0:
                break
            started = [k for k in cs.procs if k not in killed and cs.logs[k].exists()]
            if not started:
                continue
            victim = random.choice(started)
            cs.procs[victim].send_signal(signal.SIGKILL)
            cs.procs[victim].wait(10)
            killed.add(victim)
            cs.start()
        assert len(killed) >= 3, f"the run ended after {len(killed)} kills: make work slower"
        while time.monotonic() < deadline and q.stats().total:
            time.sleep(0.05)
        cs.finish(killed)
        s = q.stats()
    assert s.total == 0, f"jobs left: {s}"
    assert s.put == n and s.acked == n and s.dead == 0
    got, acked = _read_logs(cs.logs)
    assert len(got) == n, f"{n - len(got)} jobs never delivered"
    dup = 0
    for tag, holders in got.items():
        # (0 logged acks: its holder was killed between the ack and the log line.)
        assert len(acked[tag]) <= 1, f"job {tag} acked {len(acked[tag])} times"
        for h in holders:  # every holder but the one that acked was killed
            assert h in acked[tag] or h in killed, f"job {tag}: holder {h} lived, no ack"
        dup += len(holders) > 1
    assert dup <= len(killed)  # a consumer holds one job at a time


def test_redis_restart_consumers_carry_on(children: Any, redis_server: Any,
                                          tmp_path: Path) -> None:
    url = redis_server.url
    cs = _Consumers(children, tmp_path, url, lease=5.0)
    deadline = time.monotonic() + 25
    for _ in range(3):
        cs.start()
    for k in list(cs.procs):
        _wait_started(cs.logs[k], deadline)
    with Queue("crash", url, timeout=5) as q:
        q.put_many({"b": 1, "i": i, "work": 0.002} for i in range(600))
        while time.monotonic() < deadline and q.stats().acked < 50:
            time.sleep(0.02)
        # The test server keeps nothing on disk: what was in the queue is gone with it.
        redis_server.restart()
        # Jobs put after the restart all get done by the same consumer processes.
        q.put_many({"b": 2, "i": i} for i in range(300))
        while time.monotonic() < deadline and q.stats().acked < 300:
            time.sleep(0.05)
        s = q.stats()
    cs.finish(set())
    assert (s.put, s.acked, s.total) == (300, 300, 0), s
    _got, acked = _read_logs(cs.logs)
    after = {t for t in acked if t.startswith("2-")}
    assert after == {f"2-{i}" for i in range(300)}
    assert all(len(acked[t]) == 1 for t in after)
    assert sum(1 for t in acked if t.startswith("1-")) >= 50  # it was mid-run
