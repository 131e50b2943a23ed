"""A claim that went through must not be thrown away because a later step of the same call
(parking a corrupt payload in the dead letters) met a locked store: the jobs it leased are
returned and the ack it carried is counted. Real SQLite store; the lock is taken by another
connection from inside the codec's decode, between the claim's commit and the park."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from procwire.codecs import JsonCodec
from procwire.queue import Item, Queue

POISON = "poison"


class LockingCodec(JsonCodec):
    """JSON, except that decoding the string "poison" takes the store's write lock from
    another connection (held for ``hold`` s) and then fails, as a corrupt payload does."""

    def __init__(self, path: Path, hold: float) -> None:
        super().__init__()
        self.fast_decode = None  # type: ignore[assignment]
        self.other = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                     timeout=10)
        self.hold = hold
        self.timers: list[threading.Timer] = []

    def decode(self, data: Any) -> Any:
        value = super().decode(data)
        if value == POISON:
            self.other.execute("BEGIN IMMEDIATE")
            timer = threading.Timer(self.hold, self.other.execute, ("ROLLBACK",))
            self.timers.append(timer)
            timer.start()
            raise ValueError("unreadable payload")
        return value

    def close(self) -> None:
        for t in self.timers:
            t.join()
        self.other.close()


def test_get_many_keeps_the_jobs_it_claimed_when_parking_a_corrupt_one_times_out(
        tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with Queue("x", f"sqlite:///{path}", lease=60) as q0:
        q0.put_many([Item("good", priority=1), Item(POISON)])
    codec = LockingCodec(path, hold=1.5)
    try:
        with Queue("x", f"sqlite:///{path}", lease=60, codec=codec) as q:
            jobs = q.get_many(2, timeout=0.3)
            assert [j.data for j in jobs] == ["good"]  # not dropped with the corrupt one
            jobs[0].ack(timeout=10)  # waits out the other connection's lock
            stats = q.stats()
            # The corrupt job could not be parked: it stays leased until its lease ends and
            # is then met (and parked) again; nothing is lost.
            assert (stats.acked, stats.leased, stats.ready, stats.dead) == (1, 1, 0, 0)
    finally:
        codec.close()


def test_process_counts_the_ack_of_a_claim_that_went_through(tmp_path: Path) -> None:
    """q.process() acks a job in the next claim's transaction. When that claim commits but
    parking a corrupt job it met then times out, the ack was applied: counted as acked (it
    was counted as lost, from the ack sent again), once."""
    path = tmp_path / "q.db"
    with Queue("x", f"sqlite:///{path}", lease=60) as q0:
        q0.put_many([Item("first", priority=2), Item(POISON, priority=1), Item("last")])
    codec = LockingCodec(path, hold=1.0)
    try:
        with Queue("x", f"sqlite:///{path}", lease=60, codec=codec) as q:
            seen: list[str] = []
            result = q.process(seen.append, idle_timeout=3)
            assert seen == ["first", "last"]
            assert (result.acked, result.lost, result.failed) == (2, 0, 0)
            stats = q.stats(timeout=10)
            assert (stats.acked, stats.leased, stats.ready) == (2, 1, 0)
    finally:
        codec.close()
