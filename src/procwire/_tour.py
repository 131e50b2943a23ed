"""The second half of ``procwire demo``: children, a cluster, the event bus and a work queue,
each on the embedded default (no server to install or start).

Every part runs real processes: a child started with ``spawn()``, two cluster workers, a child
that emits events and answers requests through a local broker, and two consumer processes
sharing a SQLite queue. The broker is a private one in the demo's temporary folder (not this
user's shared one), and the demo stops it at the end, so nothing is left running.

The functions named ``_..._main`` run inside those processes; the parent imports this module by
name to start them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMEOUT = 20.0


# -- code that runs in the child processes ------------------------------------------------------

def _child_main() -> None:
    """A spawned child: echo every message until the parent closes the channel."""
    import procwire

    ch = procwire.parent()
    for msg in ch:
        ch.send(msg)


def _cluster_main() -> None:
    """A cluster worker: answer broadcasts, relay to worker 2 when the primary asks."""
    import procwire

    w = procwire.worker()
    w.send({"online": w.id, "pid": os.getpid()})
    for sender, data in w:
        if data == "relay to 2":
            w.send_to(2, f"hello from worker {w.id}")
        else:
            w.send({"worker": w.id, "from": sender, "got": data})


def _bus_main(url: str, events: int) -> None:
    """A second process on the bus: answers ``add`` requests, then emits ``events`` events."""
    import procwire

    with procwire.Bus(url) as bus:
        bus.handle("add", lambda d: d["x"] + d["y"])
        bus.emit("demo.ready", {"pid": os.getpid()})
        ch = procwire.parent()
        ch.recv(timeout=TIMEOUT)                  # "go": the parent subscribed and asked
        bus.emit_many(("demo.tick", {"n": n}) for n in range(events))
        bus.emit("demo.done", {"sent": events})
        ch.recv(timeout=TIMEOUT)                  # "bye": keep answering requests until then


def _queue_main(url: str) -> None:
    """A consumer process: work the demo queue until it stays empty, report what it acked."""
    import procwire

    done: list[int] = []
    failed_once: list[int] = []
    last = [0.0]

    def work(job: Any) -> None:
        if job.data["n"] == 7 and job.attempts == 1:
            failed_once.append(job.data["n"])
            raise RuntimeError("job 7 fails on its first attempt, to show a retry")
        done.append(job.data["n"])
        last[0] = time.monotonic()              # one clock for every process on this machine

    with procwire.Queue("demo", url=url, backoff=0.05) as q:
        q.process(work, with_job=True, idle_timeout=0.5)
    procwire.parent().send({"pid": os.getpid(), "done": done, "failed": failed_once,
                            "last": last[0]})


# -- the parent side ----------------------------------------------------------------------------

def tour_child(folder: str) -> dict[str, Any]:
    import procwire

    with procwire.spawn(_child_main) as child:
        rtts = []
        for n in range(300):
            t0 = time.perf_counter()
            child.send({"n": n})
            if child.recv(timeout=TIMEOUT) != {"n": n}:
                raise RuntimeError("the child echoed something else")
            rtts.append(time.perf_counter() - t0)
        n_burst = 5000
        t0 = time.perf_counter()
        for n in range(n_burst):
            child.send({"n": n})
        for n in range(n_burst):
            if child.recv(timeout=TIMEOUT) != {"n": n}:
                raise RuntimeError("the burst came back out of order")
        elapsed = time.perf_counter() - t0
        pid = child.pid
    return {
        "what": f"spawn(fn): a fresh interpreter (pid {pid}) echoing over Node's fork() IPC "
                f"protocol; {n_burst} messages there and back",
        "timing": f"round trip p50 {statistics.median(rtts) * 1e6:.0f} µs, "
                  f"{2 * n_burst / elapsed:,.0f} msgs/s",
        "ok": child.returncode == 0,
    }


def tour_cluster(folder: str) -> dict[str, Any]:
    import procwire

    with procwire.Cluster(f"{__name__}:_cluster_main", workers=2) as cluster:
        online = sorted(cluster.recv(timeout=TIMEOUT).sender for _ in range(2))
        t0 = time.perf_counter()
        cluster.broadcast("hello everyone")
        answered = sorted(cluster.recv(timeout=TIMEOUT).sender for _ in range(2))
        cluster.send(1, "relay to 2")
        relayed = cluster.recv(timeout=TIMEOUT)
        elapsed = time.perf_counter() - t0
        pids = [w.pid for w in cluster.workers]
    ok = (online == [1, 2] and answered == [1, 2] and relayed.sender == 2
          and relayed.data == {"worker": 2, "from": 1, "got": "hello from worker 1"})
    return {
        "what": f"Cluster: workers 1 and 2 (pids {pids[0]}, {pids[1]}) answered a broadcast; "
                "worker 1 -> primary -> worker 2 relay arrived",
        "timing": f"{elapsed * 1e3:.1f} ms for all three",
        "ok": ok,
    }


def tour_bus(folder: str) -> dict[str, Any]:
    import procwire

    sock = Path(folder) / "broker.sock"
    url = f"broker://{sock}?idle=2"
    events = 1000
    got = 0
    try:
        with procwire.Bus(url) as bus:           # starts the broker: none runs there yet
            with bus.subscribe("demo.*", timeout=TIMEOUT) as sub, \
                    procwire.spawn(_bus_main, url, events) as child:
                ready = next(iter(sub))
                rtts = []
                for i in range(200):
                    t0 = time.perf_counter()
                    if bus.request("add", {"x": i, "y": 1}, timeout=TIMEOUT) != i + 1:
                        raise RuntimeError("wrong answer from the other process")
                    rtts.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                child.send("go")
                for ev in sub:
                    if ev.name == "demo.tick":
                        got += 1
                    elif ev.name == "demo.done":
                        break
                elapsed = time.perf_counter() - t0
                child.send("bye")
    finally:
        _stop_broker(sock)
    return {
        "what": f"Bus: process {ready.data['pid']} answered 200 requests (bus.request -> "
                f"bus.handle) and emitted {events} events; received {got}/{events} through "
                "an auto-started local broker",
        "timing": f"request p50 {statistics.median(rtts) * 1e6:.0f} µs, "
                  f"{events / elapsed:,.0f} events/s",
        "ok": got == events,
    }


def _stop_broker(sock: Path) -> None:
    """The broker the demo started outlives its clients (until idle): stop it now."""
    pidfile = Path(f"{sock}.pid")
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            os.kill(pid, 0)                   # raises once it is gone
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)


def tour_queue(folder: str) -> dict[str, Any]:
    import procwire

    url = f"sqlite:///{folder}/queue.db"
    jobs = 300
    with procwire.Queue("demo", url=url) as q:
        q.put_many({"n": n} for n in range(jobs))
        t0 = time.monotonic()
        children = [procwire.spawn(_queue_main, url) for _ in range(2)]
        try:
            reports = [c.recv(timeout=TIMEOUT * 3) for c in children]
        finally:
            for c in children:
                c.stop(timeout=5)
        elapsed = max(r["last"] for r in reports) - t0
        stats = q.stats()
    done = sorted(n for r in reports for n in r["done"])
    retried = [n for r in reports for n in r["failed"]]
    ok = done == list(range(jobs)) and retried == [7] and stats.ready == 0
    per = ", ".join(f"{len(r['done'])} by pid {r['pid']}" for r in reports)
    return {
        "what": f"Queue (SQLite): {jobs} jobs put; two consumer processes acked each exactly "
                f"once ({per}); job 7 failed once and was retried",
        "timing": f"all acked {elapsed * 1e3:.0f} ms after the consumers were started",
        "ok": ok,
    }


TOURS: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
    ("child", tour_child),
    ("cluster", tour_cluster),
    ("bus", tour_bus),
    ("queue", tour_queue),
]
