"""Group rules across dead letters (both backends): at most one job of a group is leased at a
time, also after a dead job of the group is requeued while a later one is leased."""

from __future__ import annotations

from collections.abc import Callable

from procwire.queue import Queue

MakeQueue = Callable[..., Queue]


def test_requeued_dead_job_waits_while_its_group_is_leased(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.put("a1", group="a")
    q.put("a2", group="a")
    first = q.get(timeout=0)
    assert first is not None and first.data == "a1"
    first.fail("broken")  # a1 dead: a2's turn
    second = q.get(timeout=0)
    assert second is not None and second.data == "a2"
    assert q.requeue_dead() == 1
    # a2 is still leased: a1 must not be handed out next to it.
    assert q.get(timeout=0) is None
    assert q.get_many(5, timeout=0) == []
    assert q.stats().leased == 1
    second.ack()
    again = q.get(timeout=2)
    assert again is not None and again.data == "a1"
    again.ack()
    assert q.get(timeout=0) is None


def test_requeued_dead_job_does_not_hold_other_groups(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.put("a1", group="a")
    q.put("a2", group="a")
    q.put("b1", group="b")
    first = q.get(timeout=0)
    assert first is not None and first.data == "a1"
    first.fail("broken")
    jobs = q.get_many(5, timeout=0)
    assert sorted(j.data for j in jobs) == ["a2", "b1"]
    assert q.requeue_dead() == 1
    assert q.get_many(5, timeout=0) == []
    q.ack_many(jobs)
    again = q.get(timeout=2)
    assert again is not None and again.data == "a1"
    again.ack()
