"""Builds ``layout1.db``: a queue file written by procwire's first SQLite layout (before the
``procwire_schema`` table), for the upgrade test in ``test_queue_sqlite_layout.py``.

It was run once against the code of commit 90c5445 (the last with layout 1):

    git archive 90c5445 src/procwire | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src python tests/queue/data/make_layout1.py tests/queue/data/layout1.db

Kept so that the file can be rebuilt and read; the test only reads the committed file.
"""

from __future__ import annotations

import os
import sqlite3
import sys

from procwire.queue import Item, Queue

path = os.path.abspath(sys.argv[1])
if os.path.exists(path):
    os.remove(path)
url = f"sqlite:///{path}"
FAR = 10**9  # seconds: still ahead when the test runs (about 31 years)

with Queue("jobs", url, backoff=0) as q:
    # Ready jobs: two priorities, FIFO within each; one with a dedup key; a group of three.
    q.put_many([{"n": 1}, {"n": 2}, Item({"n": 3}, priority=5), Item({"n": 4}, key="k4")])
    q.put_many([Item({"g": i}, group="g") for i in range(3)])
    q.put({"n": "delayed"}, delay=FAR)
    # A job leased for a long time (a live holder); one whose lease runs out at once below.
    q.put({"n": "held"}, priority=9)
    held = q.get(timeout=0, lease=FAR)
    assert held is not None and held.data == {"n": "held"}
    # A dead letter.
    q.put({"n": "dead"}, priority=7)
    job = q.get(timeout=0)
    assert job is not None and job.data == {"n": "dead"}
    job.fail("broken on purpose")
    # An acked job (gone; counted).
    q.put({"n": "acked"}, priority=6)
    job = q.get(timeout=0)
    assert job is not None and job.data == {"n": "acked"}
    job.ack()
    # Last: once its lease is out it is the first ready job.
    q.put({"n": "expired"}, priority=8)
    expiring = q.get(timeout=0, lease=0.001)
    assert expiring is not None and expiring.data == {"n": "expired"}
    print("held token", held._token)

with Queue("other", url) as q:
    q.put({"other": 1})

conn = sqlite3.connect(path)
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
conn.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
conn.execute("VACUUM")
print(conn.execute("SELECT id, queue, state, priority, attempts, token, dkey, grp, data"
                   " FROM procwire_jobs ORDER BY id").fetchall())
conn.close()
