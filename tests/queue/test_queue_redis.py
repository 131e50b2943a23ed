"""Redis-only queue tests (the shared behaviour suite runs on Redis too, see conftest.py):
key layout and retention, corrupt entries, the script cache, outages and restarts, Redis
Cluster (a real one-node and two-node cluster)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

import procwire
from _servers import RedisServer, free_port
from procwire.queue import Item, Queue
from procwire.queue._redis import RedisBackend


@pytest.fixture
def r(redis_server: Any) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()


def test_one_hash_tag_and_nothing_kept_after_ack(redis_server: Any, r: redis.Redis) -> None:
    with Queue("jobs", redis_server.url, max_attempts=1, backoff=0) as q:
        q.put_many([Item(i, key=f"k{i}", group=f"g{i % 3}", delay=0.01 * (i % 2))
                    for i in range(30)])
        job = q.get(timeout=0)
        assert job is not None
        job.nack()  # max_attempts=1: dead
        names = [k.decode() for k in r.scan_iter(count=1000)]
        assert names and all(n.startswith("procwire:{jobs}:") for n in names), names
        assert len({key_slot(n.encode()) for n in names}) == 1  # one Redis Cluster slot
        assert q.purge(dead_only=True) == 1
        while q.stats().total:
            for j in q.get_many(10, timeout=1):
                j.ack()
        # Acked jobs leave nothing behind: their records, keys and groups are gone.
        left = sorted(k.decode() for k in r.scan_iter(count=1000))
        assert left == ["procwire:{jobs}:seq", "procwire:{jobs}:stats"], left
        # Times come from Redis's clock.
        q.put("t")
        job = q.get(timeout=0)
        assert job is not None
        secs, micros = r.time()
        assert abs(job.enqueued_at - (secs + micros / 1e6)) < 5
        job.ack()


def test_odd_queue_and_group_names(redis_server: Any, r: redis.Redis) -> None:
    names = ["a}b", "{x}", "a}:g:x", "a"]
    queues = [Queue(n, redis_server.url) for n in names]
    try:
        for i, q in enumerate(queues):
            q.put_many([Item(i, group="x}:ready"), Item(i, group="")])
        for i, q in enumerate(queues):
            assert q.stats().ready == 2, q.name
            jobs = q.get_many(5, timeout=0)
            assert [j.data for j in jobs] == [i, i]
            q.ack_many(jobs)
            assert q.stats().total == 0
    finally:
        for q in queues:
            q.close()


def test_corrupt_entries_go_to_dead_letters(redis_server: Any, r: redis.Redis) -> None:
    with Queue("jobs", redis_server.url) as q:
        ids = q.put_many(["payload", "fields", "missing", "string", "fine"])
        q.put_many([Item("g1", group="g"), Item("g2", group="g"), Item("g3", group="g")])
        p = "procwire:{jobs}:j:"
        r.hset(f"{p}{ids[0]}", "d", b"\xff{not json")
        r.hset(f"{p}{ids[1]}", "at", "many")
        r.delete(f"{p}{ids[2]}")
        r.delete(f"{p}{ids[3]}")
        r.set(f"{p}{ids[3]}", b"junk")
        got = []
        while (job := q.get(timeout=0)) is not None:
            got.append(job.data)
            if job.data == "g1":
                r.delete(f"{p}{job.id + 1}")  # g2's record vanishes while g1 is held
            job.ack()
        assert got == ["fine", "g1", "g3"]
        dead = {d.id: d for d in q.dead_letters()}
        assert len(dead) == 5
        assert dead[ids[0]].error is not None and dead[ids[0]].error.startswith(
            "corrupt payload")
        assert dead[ids[0]].raw == b"\xff{not json" and dead[ids[0]].data is None
        assert "lacks fields or holds bad values" in (dead[ids[1]].error or "")
        assert dead[ids[1]].data == "fields"  # what could be read is kept
        assert "missing" in (dead[ids[2]].error or "")
        assert "is a string" in (dead[ids[3]].error or "") and dead[ids[3]].raw == b"junk"
        assert "missing" in (dead[ids[3] + 3].error or "")  # g2
        s = q.stats()
        assert (s.dead, s.ready, s.leased) == (5, 0, 0)
        assert q.purge() == 5


def test_script_cache_flushed(redis_server: Any, r: redis.Redis) -> None:
    shas = procwire.queue._redis.SHAS
    with Queue("jobs", redis_server.url, max_attempts=1) as q:
        q.put(1)
        r.script_flush()
        q.put(2)  # NOSCRIPT: sent again as EVAL, which caches it again
        assert r.script_exists(shas["put"]) == [True]
        assert [j.data for j in q.get_many(5, timeout=0)] == [1, 2]
        # Every operation has a script of its own: each finds its way back after a flush.
        q.put_many([3, 4, 5, 6])

        def flushed(call: Any) -> Any:
            r.script_flush()
            return call()

        a, b, c, d = flushed(lambda: q.get_many(4, timeout=0))
        flushed(a.ack)
        flushed(lambda: b.extend(30))
        flushed(c.release)
        flushed(lambda: d.fail("why"))
        assert flushed(q.stats).dead == 1
        assert [x.data for x in flushed(q.dead_letters)] == [6]
        assert flushed(q.requeue_dead) == 1
        job = flushed(lambda: q.get(timeout=0))
        assert job is not None
        flushed(job.nack)  # max_attempts=1: dead
        assert flushed(q.purge) == 5  # 1, 2 and b leased, c dead, d ready
        assert r.script_exists(shas["purge"], shas["put"]) == [True, False]
        with pytest.raises(procwire.queue.LeaseLost):
            b.ack()


def test_fork_child_uses_own_connection(redis_server: Any, r: redis.Redis,
                                        fork_takes_the_parents_job: Any) -> None:
    with Queue("jobs", redis_server.url) as q:
        q.put("parent")
        assert q.stats().ready == 1  # the parent has a pooled connection before the fork
        q.backend.wake_generation()  # and a subscriber thread
        parent_ids = {c["id"] for c in r.client_list()}

        def no_inherited_connections(child_q: Queue) -> None:
            backend = child_q.backend
            assert isinstance(backend, RedisBackend) and backend._free == []

        fork_takes_the_parents_job(q, no_inherited_connections)
        assert {c["id"] for c in r.client_list()} & parent_ids == parent_ids


def test_redis_down_times_out_then_recovers(redis_server: Any) -> None:
    with Queue("jobs", redis_server.url, timeout=0.3) as q:
        q.put("before")
        redis_server.stop()
        assert q.get(timeout=0.2) is None  # get: nothing came (Redis unreachable)
        with pytest.raises(procwire.Timeout):
            q.put("during")
        with pytest.raises(procwire.Timeout):
            q.stats()
        redis_server.start()  # the test server keeps nothing on disk: an empty Redis
        q.put("after")
        job = q.get(timeout=5)
        assert job is not None and job.data == "after"
        job.ack()


def test_blocking_get_carries_on_after_restart(redis_server: Any) -> None:
    consumer = Queue("jobs", redis_server.url)
    producer = Queue("jobs", redis_server.url)
    try:
        got: list[Any] = []
        assert consumer.get(timeout=0) is None  # subscribed
        t = threading.Thread(target=lambda: got.append(consumer.get(timeout=20)))
        t.start()
        time.sleep(0.1)
        redis_server.restart()
        time.sleep(0.2)
        producer.put("after restart")
        t.join(25)
        assert got and got[0] is not None and got[0].data == "after restart"
        got[0].ack()
        backend = consumer.backend
        assert isinstance(backend, RedisBackend)
        waker = backend._waker
        assert waker is not None
        deadline = time.monotonic() + 5
        while waker.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert waker.connects >= 2  # the subscriber connection came back
    finally:
        consumer.close()
        producer.close()


def test_url_errors() -> None:
    with pytest.raises(procwire.AddressError):
        Queue("jobs", "redis://127.0.0.1:notaport/0").stats()
    with pytest.raises(procwire.AddressError):
        Queue("jobs", "mysql://x").stats()


def _cluster_node() -> RedisServer:
    server = RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", "2000")
    for _ in range(10):
        # A cluster node also listens on port + 10000 (its cluster bus): pick a port where
        # that fits below 65536 and is free too.
        while server.port > 55000:
            server.port = free_port()
        try:
            server.start()
            return server
        except RuntimeError:
            server.port = free_port()
    server.close()
    raise AssertionError("could not start a cluster-mode redis-server in 10 tries")


def _wait_cluster_ok(*clients: redis.Redis) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(c.execute_command("CLUSTER", "INFO").decode().count("cluster_state:ok")
               for c in clients):
            return
        time.sleep(0.05)
    raise AssertionError("the test cluster did not reach cluster_state:ok")


def test_redis_cluster_follows_moved() -> None:
    # Two real cluster-mode nodes; the queue's slot is on the one we did not connect to.
    a, b = _cluster_node(), _cluster_node()
    try:
        ca = redis.Redis(host="127.0.0.1", port=a.port)
        cb = redis.Redis(host="127.0.0.1", port=b.port)
        slot = key_slot(b"procwire:{jobs}:ready")
        # b serves the queue's slot, a every other one; the queue is opened on a.
        ca.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, slot - 1)
        ca.execute_command("CLUSTER", "ADDSLOTSRANGE", slot + 1, 16383)
        cb.execute_command("CLUSTER", "ADDSLOTS", slot)
        ca.execute_command("CLUSTER", "MEET", "127.0.0.1", b.port)
        _wait_cluster_ok(ca, cb)
        with Queue("jobs", a.url, backoff=0, max_attempts=1) as q:
            q.put("moved")
            backend = q.backend
            assert isinstance(backend, RedisBackend)
            assert backend.moved_to == ("127.0.0.1", b.port)
            assert cb.exists("procwire:{jobs}:ready") == 1
            job = q.get(timeout=5)
            assert job is not None and job.data == "moved"
            job.ack()
            # Cluster mode refuses a script that touches keys of several slots (or of a slot
            # another node serves): every operation works, so all keys share the one slot.
            q.put_many([Item(1, key="a", group="g"), Item(2, group="g"), Item(3, delay=0.1)])
            first = q.get(timeout=0)
            assert first is not None and first.data == 1
            first.nack()  # max_attempts=1: dead, and the group moves on
            assert [d.data for d in q.dead_letters()] == [1]
            assert sorted(j.data for j in q.get_many(5, timeout=5)) == [2]
            assert q.requeue_dead() == 1
            assert q.stats().total == 3
            assert q.purge() == 3
        ca.close()
        cb.close()
    finally:
        a.close()
        b.close()


P = "procwire:{jobs}:"


def _drain(q: Queue, limit: int = 100) -> list[Any]:
    got = []
    for _ in range(limit):
        job = q.get(timeout=0)
        if job is None:
            break
        got.append(job.data)
        job.ack()
    return got


def test_stray_set_members_go_to_dead_letters(redis_server: Any, r: redis.Redis) -> None:
    # Members we never wrote, in every sorted set a script walks: none wedges the queue.
    with Queue("jobs", redis_server.url) as q:
        ids = q.put_many(["a", "b", Item("d", delay=0.05), Item("g1", group="g"),
                          Item("g2", group="g")])
        r.zadd(P + "ready", {"garbage": -100, "1": -100, "-3": -100, "1.5e0": -100})
        r.zadd(P + "delayed", {"junk": 0, "nan": 1})
        r.zadd(P + "leased", {"x": 0})  # an expired "lease"
        r.zadd(P + "g:" + hashlib.sha1(b"g").hexdigest(), {"zzz": 0})
        r.zadd(P + "dead", {"nope": 0})
        time.sleep(0.06)
        got = _drain(q)
        assert sorted(got) == ["a", "b", "d", "g1", "g2"]
        dead = q.dead_letters()
        raws = sorted(d.raw for d in dead)
        assert raws == sorted([b"garbage", b"1", b"-3", b"1.5e0", b"junk", b"nan", b"x",
                               b"zzz", b"nope"])
        for d in dead:
            assert d.error is not None and d.error.startswith("corrupt entry: a member of the")
            assert "is not a job id" in d.error
            assert d.id > max(ids)  # a dead letter of its own: no real job was touched
        assert "ready set" in next(d.error or "" for d in dead if d.raw == b"garbage")
        assert "delayed set" in next(d.error or "" for d in dead if d.raw == b"junk")
        assert "leased set" in next(d.error or "" for d in dead if d.raw == b"x")
        assert "group set" in next(d.error or "" for d in dead if d.raw == b"zzz")
        assert "dead set" in next(d.error or "" for d in dead if d.raw == b"nope")
        s = q.stats()
        assert (s.ready, s.delayed, s.leased, s.dead) == (0, 0, 0, 9)
        assert s.acked == 5
        # The queue carries on, and the stubs can be purged like any dead letter.
        q.put("after")
        assert _drain(q) == ["after"]
        assert q.purge(dead_only=True) == 9
        left = sorted(k.decode() for k in r.scan_iter(count=1000))
        assert left == [P + "seq", P + "stats"], left


def test_misplaced_member_is_not_leased_twice(redis_server: Any, r: redis.Redis) -> None:
    with Queue("jobs", redis_server.url) as q:
        q.put_many(["held", "lost", "next"])
        held = q.get(timeout=0)
        assert held is not None and held.data == "held"
        # A second entry for a leased job in the ready set: it must not be handed out again.
        r.zadd(P + "ready", {f"{held.id:016d}": -100})
        # A leased job whose record says leased but which sits only in the ready set: it is
        # in no index of its own, so it goes to the dead letters with a reason.
        lost = q.get(timeout=0)
        assert lost is not None and lost.data == "lost"
        r.zrem(P + "leased", f"{lost.id:016d}")
        r.zadd(P + "ready", {f"{lost.id:016d}": -100})
        nxt = q.get(timeout=0)
        assert nxt is not None and nxt.data == "next"
        nxt.ack()
        assert q.get(timeout=0) is None
        held.ack()  # untouched: its holder still acks it
        with pytest.raises(procwire.queue.LeaseLost):
            lost.ack()
        dead = {d.raw: d for d in q.dead_letters()}
        assert set(dead) == {f"{held.id:016d}".encode(), b'"lost"'}
        assert dead[b'"lost"'].id == lost.id and dead[b'"lost"'].data == "lost"
        assert dead[b'"lost"'].error == ("corrupt entry: its record says leased but it was "
                                         "in the ready set")
        stub = dead[f"{held.id:016d}".encode()]
        assert stub.error == (f"corrupt entry: the ready set also listed job {held.id}, which "
                              f"is leased (the entry was removed)")
        s = q.stats()
        assert (s.ready, s.leased, s.dead) == (0, 0, 2)


def test_bad_fields_and_counters(redis_server: Any, r: redis.Redis) -> None:
    with Queue("jobs", redis_server.url, backoff=0) as q:
        ids = q.put_many(["nan", "inf", "pr", "ma", "fine"])
        r.hset(f"{P}j:{ids[0]}", "vis", "nan")
        r.hset(f"{P}j:{ids[1]}", "at", "inf")
        r.hset(f"{P}j:{ids[2]}", "pr", "1.5")
        r.hset(f"{P}j:{ids[3]}", "ma", "2.5")
        # Counters and the id sequence overwritten; dedup and group heads pointing nowhere.
        r.hset(P + "stats", "acked", "lots")
        r.hset(P + "keys", "k", "garbage")
        r.hset(P + "heads", "g", "garbage")
        r.hset(f"{P}j:{ids[4]}", "k", b"\xff\xfe")  # a key that is not UTF-8
        r.set(P + "seq", "abc")
        more = q.put_many([Item("keyed", key="k"), Item("grouped", group="g")])
        assert len(set(more)) == 2 and min(more) > max(ids)  # no id reused
        got = []
        for _ in range(20):
            job = q.get(timeout=0)
            if job is None:
                break
            got.append((job.data, job.key))
            job.ack()
        assert sorted(got, key=str) == sorted([("fine", "\ufffd\ufffd"), ("keyed", "k"),
                                               ("grouped", None)], key=str)
        dead = {d.id: d for d in q.dead_letters()}
        assert sorted(dead) == ids[:4]
        for i in ids[:4]:
            assert "lacks fields or holds bad values" in (dead[i].error or "")
        assert q.stats().acked == 3  # the counter started again
        assert q.put("dup", key="k") != q.put("dup2", key="k2")


def test_big_batches_and_a_job_acked_twice_in_one_call(redis_server: Any,
                                                       r: redis.Redis) -> None:
    # Scripts apply a batch's index changes in commands of up to 1000 members each.
    with Queue("jobs", redis_server.url) as q:
        ids = q.put_many(list(range(2500)))
        assert r.zcard(P + "ready") == 2500
        jobs = q.get_many(2500, timeout=0)
        assert [j.data for j in jobs] == list(range(2500))
        assert r.zcard(P + "leased") == 2500 and r.zcard(P + "ready") == 0
        q.ack_many(jobs)
        assert q.stats().acked == 2500
        assert sorted(k.decode() for k in r.scan_iter(count=5000)) == [P + "seq", P + "stats"]
        q.put("once")
        job = q.get(timeout=0)
        assert job is not None and job.id == ids[-1] + 1
        with pytest.raises(procwire.queue.LeaseLost) as info:
            q.ack_many([job, job])
        assert info.value.ids == [job.id]
        assert q.stats().acked == 2501
