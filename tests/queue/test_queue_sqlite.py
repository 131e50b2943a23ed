"""What only the SQLite backend has: its URL, default file, lock timeouts, corrupt rows,
wake-ups from other processes, forks."""

from __future__ import annotations

import gc
import sqlite3
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

import procwire
from procwire.queue import Queue
from procwire.queue._sqlite import SqliteBackend, default_path, parse_url


def test_url_forms(tmp_path: Path) -> None:
    assert parse_url("sqlite:///var/lib/q.db") == ("/var/lib/q.db", {})
    assert parse_url(f"sqlite:///{tmp_path}/q.db")[0] == f"{tmp_path}/q.db"
    assert parse_url("sqlite://rel/q.db")[0] == "rel/q.db"
    assert parse_url("sqlite:///q.db?synchronous=normal")[1] == {"synchronous": "normal"}
    for bad in ("sqlite://", "sqlite:///q.db?sync=1", "sqlite:///q.db?synchronous=off"):
        with pytest.raises(procwire.AddressError):
            parse_url(bad)
    with pytest.raises(procwire.AddressError):
        Queue("x", "postgres://h/db").stats()


def test_default_file_under_xdg_data_home(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_path() == f"{tmp_path}/procwire/queues.db"
    with Queue("default") as q:
        q.put(1)
    assert (tmp_path / "procwire" / "queues.db").exists()
    assert (tmp_path / "procwire").stat().st_mode & 0o777 == 0o700
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_path().endswith("/.local/share/procwire/queues.db")


def test_wal_and_synchronous(tmp_path: Path) -> None:
    with Queue("x", f"sqlite:///{tmp_path}/q.db?synchronous=normal") as q:
        q.put(1)
        backend = q.backend
        assert isinstance(backend, SqliteBackend)
        conn = backend._conn()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with Queue("x", f"sqlite:///{tmp_path}/q.db") as q:
        q.stats()
        assert q.backend._conn().execute(  # type: ignore[attr-defined]
            "PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_locked_store_raises_timeout(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with Queue("x", f"sqlite:///{path}") as q:
        q.put("before")
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(procwire.Timeout):
                q.put("blocked", timeout=0.2)
            assert q.get(timeout=0.2) is None  # a get with a deadline just finds nothing
            other.execute("ROLLBACK")
        finally:
            other.close()
        job = q.get(timeout=1)
        assert job is not None and job.data == "before"
        job.ack()



def test_waits_for_the_lock_longer_than_one_busy_slice(tmp_path: Path) -> None:
    """A connection's busy_timeout is one short slice (BUSY_SLICE_MS); a call with a longer
    timeout keeps trying, so a lock held for many slices delays it but does not fail it."""
    from procwire.queue._sqlite import BUSY_SLICE_MS

    path = tmp_path / "q.db"
    with Queue("x", f"sqlite:///{path}") as q:
        q.put("first")
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        hold = 10 * BUSY_SLICE_MS / 1000
        try:
            other.execute("BEGIN IMMEDIATE")
            timer = threading.Timer(hold, other.execute, ("ROLLBACK",))
            timer.start()
            t0 = time.monotonic()
            q.put("second", timeout=30)
            waited = time.monotonic() - t0
            timer.join()
        finally:
            other.close()
        assert waited >= hold * 0.9  # it really waited for the lock, over many slices
        for want in ("first", "second"):
            job = q.get(timeout=5)
            assert job is not None and job.data == want
            job.ack()

def test_processes_racing_to_open_a_new_file_all_succeed(children, tmp_path: Path) -> None:
    """A new file is switched to WAL by its first opener, which needs an exclusive lock that
    SQLite takes without its busy handler: a process that opened the file at the same moment
    got "database is locked" at once (a get then returned None, a put raised Timeout).
    Opening tries again until the lock is free. Six processes open the same new file at one
    instant, ten times over (before the fix most rounds had a failure)."""
    rounds = 10
    start = time.time() + 1.5  # after every child has imported procwire
    code = ("import sys, time\nfrom procwire.queue import Queue\n"
            "folder, start, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])\n"
            "for r in range(rounds):\n"
            "    while time.time() < start + 0.3 * r:\n"
            "        time.sleep(0.0005)\n"
            "    with Queue('x', f'sqlite:///{folder}/q{r}.db') as q:\n"
            "        q.put(r)\n")
    procs = [children.python(code, str(tmp_path), str(start), str(rounds), stderr=-1)
             for _ in range(6)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    for r in range(rounds):
        with Queue("x", f"sqlite:///{tmp_path}/q{r}.db") as q:
            assert q.stats().ready == 6


def test_corrupt_row_goes_to_dead_letters(tmp_path: Path) -> None:
    with Queue("x", f"sqlite:///{tmp_path}/q.db") as q:
        bad = q.put({"ok": False})
        q.put({"ok": True})
        q.backend.execute(  # type: ignore[attr-defined]
            "UPDATE procwire_jobs SET data = x'ff00fe' WHERE id = ?", (bad,))
        job = q.get(timeout=1)  # the consumer carries on with the next job
        assert job is not None and job.data == {"ok": True}
        job.ack()
        [dead] = q.dead_letters()
        assert dead.id == bad and dead.data is None and dead.raw == b"\xff\x00\xfe"
        assert (dead.error or "").startswith("corrupt payload: DecodeError")
        q.backend.execute(  # type: ignore[attr-defined]
            "UPDATE procwire_jobs SET data = 42, state = 0 WHERE id = ?", (bad,))
        assert q.get(timeout=0) is None
        assert "stored payload is int" in (q.dead_letters()[0].error or "")
        # A row in a state no code writes is never handed out, and a full purge removes it.
        odd = q.put({"odd": True})
        q.backend.execute(  # type: ignore[attr-defined]
            "UPDATE procwire_jobs SET state = 7 WHERE id = ?", (odd,))
        assert q.get(timeout=0) is None
        assert q.purge() == 2  # the dead letter and the odd row
        assert q.backend.execute(  # type: ignore[attr-defined]
            "SELECT count(*) FROM procwire_jobs") == [(0,)]


def test_wakeup_from_another_process(children, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    with Queue("x", url) as q:
        backend = q.backend
        gen = backend.wake_generation()  # binds this process's socket
        p = children.python("import sys\nfrom procwire.queue import Queue\n"
                            "Queue('x', sys.argv[1]).put('hi')", url)
        assert p.wait(20) == 0
        backend.wait(gen, 10)
        # A datagram arrived (not the 1 s safety poll): the generation moved.
        assert backend.wake_generation() > gen
        job = q.get(timeout=0)
        assert job is not None and job.data == "hi"
        job.ack()
        other = Queue("other-queue", url)
        gen = backend.wake_generation()
        other.put("not for x")  # another queue's put does not wake this one
        other.close()
        backend.wait(gen, 0.2)
        assert backend.wake_generation() == gen


def test_long_path_wakeups(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    url = f"sqlite:///{deep}/q.db"
    with Queue("x", url) as q, Queue("x", url) as producer:
        gen = q.backend.wake_generation()
        producer.put(1)
        q.backend.wait(gen, 10)
        assert q.backend.wake_generation() > gen


def test_fork_child_uses_own_connection(tmp_path: Path,
                                        fork_takes_the_parents_job: Any) -> None:
    with Queue("x", f"sqlite:///{tmp_path}/q.db") as q:
        q.put("parent")
        q.backend.wake_generation()  # a waker thread and socket exist before the fork
        fork_takes_the_parents_job(q)


def test_unclosed_queue_warns(tmp_path: Path) -> None:
    q = Queue("x", f"sqlite:///{tmp_path}/q.db")
    q.put(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del q
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)


def test_many_processes_share_one_file(children, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    code = ("import sys\nfrom procwire.queue import Queue\n"
            "q = Queue('x', sys.argv[1])\n"
            "for i in range(50): q.put({'p': sys.argv[2], 'i': i})\n")
    procs = [children.python(code, url, str(k)) for k in range(4)]
    with Queue("x", url) as q:
        seen = []
        for _ in range(200):
            job = q.get(timeout=20)
            assert job is not None
            seen.append((job.data["p"], job.data["i"]))
            job.ack()
        for p in procs:
            assert p.wait(20) == 0
    assert len(set(seen)) == 200
    for k in range(4):  # each producer's jobs come out in its order
        mine = [i for p, i in seen if p == str(k)]
        assert mine == sorted(mine)




def test_fsynced_commits_under_full(tmp_path: Path) -> None:
    # Under synchronous=FULL every commit that stores or removes a job (put, ack, nack, fail,
    # requeue) is fsynced; a claim without acks and a lease renewal are not (a lease only
    # matters while its holder lives). Which level was in force at each COMMIT is read from
    # SQLite's statement trace of this thread's connection.
    with Queue("x", f"sqlite:///{tmp_path}/q.db", backoff=0) as q:
        q.stats()
        conn = q.backend._conn()  # type: ignore[attr-defined]
        trace: list[str] = []
        conn.set_trace_callback(trace.append)
        try:
            q.put_many([1, 2, 3])
            jobs = q.get_many(2, timeout=0)
            jobs[0].extend(10)
            q.ack_many(jobs)
            job = q.get(timeout=0)
            assert job is not None
            job.nack()
            job = q.get(timeout=0)
            assert job is not None
            job.fail("no")
            q.requeue_dead()
            job = q.get(timeout=0)
            assert job is not None
            q.put(4)
            # What process() does: the ack rides on the next claim (this thread's connection).
            res = q.backend.claim(1, 30, 7, 5, ack=[(job.id, job._token)])  # type: ignore
            assert res.lost == [] and len(res.jobs) == 1
        finally:
            conn.set_trace_callback(None)
    kinds = {  # statement text -> what it does
        "UPDATE procwire_jobs SET state = 2, token =": "claim",
        "UPDATE procwire_jobs SET state = 2, visible_at =": "extend",
        "INSERT INTO procwire_jobs": "put",
        "DELETE FROM procwire_jobs WHERE id IN": "ack",
        "UPDATE procwire_jobs SET token = NULL, error =": "nack",
        "UPDATE procwire_jobs SET state = 3, token = NULL, error =": "fail",
        "UPDATE procwire_jobs SET state = 0, attempts = 0": "requeue",
    }
    level, txn, commits = "FULL", set(), []
    for sql in trace:
        if sql.startswith("PRAGMA synchronous"):
            level = sql.split("=")[1].strip()
        elif sql == "COMMIT":
            commits.append((level, frozenset(txn)))
            txn = set()
        else:
            norm = " ".join(sql.split())
            txn.update(kind for start, kind in kinds.items() if norm.startswith(start))
    seen = set()
    for lvl, what in commits:
        if what and what <= {"claim", "extend"}:
            assert lvl == "NORMAL", (lvl, what)
        elif what:
            assert lvl == "FULL", (lvl, what)
        seen.add(what)
    assert {frozenset({"claim"}), frozenset({"extend"}), frozenset({"put"}),
            frozenset({"ack"}), frozenset({"nack"}), frozenset({"fail"}),
            frozenset({"requeue"}), frozenset({"ack", "claim"})} <= seen, seen


def test_process_acks_again_when_the_store_stayed_locked(tmp_path: Path) -> None:
    """q.process() acks a job in the next claim's transaction; when the store stays locked
    past that claim's wait, the ack was not applied: it is sent again, counted once, and the
    job does not stay leased."""
    path = tmp_path / "q.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    timers: list[threading.Timer] = []
    try:
        with Queue("x", f"sqlite:///{path}", lease=60) as q:
            q.put("only")

            def fn(data: str) -> None:
                # Take the write lock as fn returns and hold it past the next claim's wait
                # (0.5 s), so the claim carrying this job's ack times out.
                other.execute("BEGIN IMMEDIATE")
                timer = threading.Timer(1.5, other.execute, ("ROLLBACK",))
                timers.append(timer)
                timer.start()

            result = q.process(fn, idle_timeout=3)
            assert (result.acked, result.lost, result.failed) == (1, 0, 0)
            stats = q.stats()
            assert (stats.leased, stats.ready, stats.acked) == (0, 0, 1)
    finally:
        for t in timers:
            t.join()
        other.close()
