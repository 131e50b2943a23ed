"""The SQLite file layout: the version table, the upgrade of a file written by the first
layout (``data/layout1.db``, built by that code: see ``data/make_layout1.py``), refusal of a
newer layout, and the query plans that make a claim walk the small per-state indexes."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from procwire.queue import LeaseLost, Queue, QueueError
from procwire.queue import _sqlite as S

LAYOUT1 = Path(__file__).parent / "data" / "layout1.db"
HELD_TOKEN = 3970463411842931530  # the token of job 9's lease in layout1.db (printed by make)
OLD_INDEX_SQL = [  # verbatim from the first layout
    "CREATE INDEX IF NOT EXISTS procwire_jobs_claim"
    " ON procwire_jobs(queue, state, priority DESC, id)",
    "CREATE INDEX IF NOT EXISTS procwire_jobs_due ON procwire_jobs(queue, state, visible_at)",
]


def _indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as c:
        return {r[0] for r in c.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'procwire%'")}


def _version(path: Path) -> list[tuple[int]]:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT version FROM procwire_schema").fetchall()


NEW_INDEXES = {"procwire_jobs_ready", "procwire_jobs_delayed", "procwire_jobs_leased",
               "procwire_jobs_dead", "procwire_jobs_group", "procwire_jobs_group_leased",
               "procwire_jobs_key"}


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    path = tmp_path / "queues.db"
    shutil.copyfile(LAYOUT1, path)
    assert "procwire_jobs_claim" in _indexes(path)  # really the old layout
    with sqlite3.connect(path) as c:
        assert not c.execute("SELECT 1 FROM sqlite_master WHERE name = 'procwire_schema'"
                             ).fetchall()
    return path


def test_layout1_file_is_upgraded_and_keeps_every_job(old_file: Path) -> None:
    url = f"sqlite:///{old_file}"
    with Queue("jobs", url, backoff=0) as q:
        s = q.stats()  # opening upgrades
        assert (s.ready, s.delayed, s.leased, s.dead) == (7, 1, 2, 1)
        assert (s.put, s.acked, s.failed) == (12, 1, 1)
        assert _indexes(old_file) == NEW_INDEXES
        assert _version(old_file) == [(S.LAYOUT,)]

        # The dedup key still holds: job 4 is not acked yet.
        assert q.put({"n": "again"}, key="k4") == 4
        jobs = q.get_many(20, timeout=0)
        # The expired lease first (priority 8, second delivery), then priority 5, then FIFO;
        # of group "g" only its oldest; not the held or the delayed job.
        assert [j.data for j in jobs] == [{"n": "expired"}, {"n": 3}, {"n": 1}, {"n": 2},
                                          {"n": 4}, {"g": 0}]
        assert jobs[0].attempts == 2
        q.ack_many(jobs)
        group = [q.get(timeout=0) for _ in range(2)]
        assert [j.data for j in group if j] == [{"g": 1}]  # FIFO: g2 waits for g1's ack
        group[0].ack()  # type: ignore[union-attr]
        last = q.get(timeout=0)
        assert last is not None and last.data == {"g": 2}
        last.ack()

        # The lease granted by the old code still holds: a wrong token is refused, the
        # holder's is accepted.
        backend = q.backend
        assert backend.ack_many([(9, HELD_TOKEN + 1)], 5) == [9]
        assert backend.ack_many([(9, HELD_TOKEN)], 5) == []

        [dead] = q.dead_letters()
        assert dead.data == {"n": "dead"} and dead.error == "broken on purpose"
        assert q.requeue_dead() == 1
        job = q.get(timeout=0)
        assert job is not None and job.data == {"n": "dead"}
        job.ack()
        s = q.stats()
        assert (s.ready, s.delayed, s.leased, s.dead) == (0, 1, 0, 0)
        assert q.purge() == 1
    with Queue("other", url) as other:  # another queue in the same file
        job = other.get(timeout=0)
        assert job is not None and job.data == {"other": 1}
        job.ack()


def test_racing_processes_upgrade_once(children, old_file: Path) -> None:
    url = f"sqlite:///{old_file}"
    code = ("import sys\nfrom procwire.queue import Queue\n"
            "with Queue('jobs', sys.argv[1]) as q:\n"
            "    job = q.get(timeout=10)\n"
            "    assert job is not None and job.id != 9, job\n"
            "    job.ack()\n")
    procs = [children.python(code, url) for _ in range(4)]
    for p in procs:
        assert p.wait(30) == 0
    assert _indexes(old_file) == NEW_INDEXES
    assert _version(old_file) == [(S.LAYOUT,)]
    with Queue("jobs", url) as q:
        assert q.stats().acked == 1 + 4


def test_old_indexes_recreated_by_an_old_process_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    url = f"sqlite:///{path}"
    with Queue("x", url) as q:
        q.put(1)
    with sqlite3.connect(path) as c:  # what the old code runs when it opens the file
        for sql in OLD_INDEX_SQL:
            c.execute(sql)
    assert {"procwire_jobs_claim", "procwire_jobs_due"} <= _indexes(path)
    with Queue("x", url) as q:
        job = q.get(timeout=0)
        assert job is not None and job.data == 1
        job.ack()
    assert _indexes(path) == NEW_INDEXES
    assert _version(path) == [(S.LAYOUT,)]


def test_newer_layout_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    url = f"sqlite:///{path}"
    with Queue("x", url) as q:
        q.put("kept")
    with sqlite3.connect(path) as c:
        c.execute("UPDATE procwire_schema SET version = ?", (S.LAYOUT + 1,))
        c.execute("CREATE INDEX procwire_future ON procwire_jobs(queue, id)")
    with Queue("x", url) as q:
        with pytest.raises(QueueError, match=rf"layout version {S.LAYOUT + 1}.*newer procwire"):
            q.put("refused")
        with pytest.raises(QueueError, match="newer procwire"):  # every call, not just the first
            q.get(timeout=0)
    assert _version(path) == [(S.LAYOUT + 1,)]
    assert "procwire_future" in _indexes(path)
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT count(*) FROM procwire_jobs").fetchone() == (1,)


def test_claim_and_sweep_walk_the_per_state_indexes(tmp_path: Path) -> None:
    # A partial index is only used when the query names the state as a literal; a plan that
    # falls back to a table scan would make every claim O(all jobs).
    with Queue("x", f"sqlite:///{tmp_path}/q.db") as q:
        q.put_many(range(50))
        conn = q.backend._conn()  # type: ignore[attr-defined]

        def plan(sql: str, params: object) -> str:
            return " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))

        claim = plan(S.CLAIM, {"token": 1, "now": 0, "lease": 1, "q": "x", "n": 10})
        assert "USING INDEX procwire_jobs_ready" in claim and "SCAN" not in claim
        due = plan(S.NEXT_DUE, ("x", "x"))
        assert "procwire_jobs_delayed" in due and "procwire_jobs_leased" in due
        stats = plan(S.STATS, ("x", "x", 0, "x", 0, "x", "x"))
        assert "SCAN" not in stats
        sweep = plan(f"UPDATE procwire_jobs SET state = {S.READY} WHERE queue = ? AND"
                     f" state = {S.LEASED} AND visible_at <= ?", ("x", 0))
        assert "procwire_jobs_leased" in sweep


def test_lease_lost_after_upgrade_for_a_regranted_job(old_file: Path) -> None:
    # Job 12's old lease ran out; once re-granted, the old holder's ack is refused.
    with Queue("jobs", f"sqlite:///{old_file}") as q:
        job = q.get(timeout=0)
        assert job is not None and job.id == 12
        with sqlite3.connect(old_file) as c:
            old_token = 3741880236271313851
            assert c.execute("SELECT token FROM procwire_jobs WHERE id = 12").fetchone()[0] \
                != old_token
        assert q.backend.ack_many([(12, old_token)], 5) == [12]
        job.ack()
        with pytest.raises(LeaseLost):
            job.ack()
