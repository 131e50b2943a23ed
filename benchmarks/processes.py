"""Parent/child channel benchmark: round-trip latency and one-way throughput, 64 B messages.

    .venv/bin/python benchmarks/processes.py            # 3 repetitions, about a minute
    .venv/bin/python benchmarks/processes.py --quick    # 1 repetition, shorter runs
    .venv/bin/python benchmarks/processes.py --json out.json

Methods, measured in the same run:

* ``procwire py<->py``: ``procwire.process.spawn(fn)``, a Python child on Node's IPC protocol
  (JSON lines on a socketpair), ``child.send`` / ``child.recv``.
* ``mp.Pipe``: ``multiprocessing.Pipe()`` to a ``multiprocessing`` child (spawn method),
  ``conn.send`` / ``conn.recv`` (pickle).
* ``node fork``: Node parent, Node child, ``child_process.fork()`` with ``process.send`` /
  ``on('message')`` (``src/procwire/bench/node_fork_bench.js``, which forks its own child).
* ``procwire py<->node``: ``procwire.process.spawn(["node", ...])``: a Python parent with that
  same Node child script.

The message is ``{"event": "task", "data": <64 x "x">}`` everywhere. Latency: one message out,
the echo back, the next one; p50/p99 of the round trip after a warm-up. Throughput: the parent
sends as fast as its API allows (time-bounded), then an end marker; the child answers with its
count; messages per second from the first send to that answer. Every child is reaped, also on
errors; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import procwire.process as pp  # noqa: E402

NODE_SCRIPT = ROOT / "src" / "procwire" / "bench" / "node_fork_bench.js"
SIZE = 64
MSG = {"event": "task", "data": "x" * SIZE}
END = {"event": "end"}
_now = time.perf_counter_ns


# -- children ---------------------------------------------------------------------------------
def pw_echo() -> None:
    ch = pp.parent()
    for m in ch:
        if m.get("event") == "end":
            return
        ch.send(m)


def pw_sink() -> None:
    ch = pp.parent()
    n = 0
    for m in ch:
        if m.get("event") == "task":
            n += 1
        else:
            ch.send({"event": "done", "received": n})
            return


def mp_echo(conn: Any) -> None:
    while True:
        m = conn.recv()
        if m.get("event") == "end":
            return
        conn.send(m)


def mp_sink(conn: Any) -> None:
    n = 0
    while True:
        m = conn.recv()
        if m.get("event") == "task":
            n += 1
        else:
            conn.send({"event": "done", "received": n})
            return


# -- measuring --------------------------------------------------------------------------------
def latency(send: Callable[[Any], None], recv: Callable[[], Any], warmup: int, count: int,
            seconds: float) -> dict[str, float]:
    for _ in range(warmup):
        send(MSG)
        recv()
    rtts: list[int] = []
    deadline = time.monotonic() + seconds
    for i in range(count):
        t = _now()
        send(MSG)
        recv()
        rtts.append(_now() - t)
        if i % 256 == 0 and time.monotonic() > deadline:
            break
    rtts.sort()
    return {"p50_us": rtts[len(rtts) // 2] / 1000,
            "p99_us": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] / 1000}


def throughput(send: Callable[[Any], None], recv: Callable[[], Any], count: int,
               seconds: float) -> float:
    t0 = _now()
    deadline = time.monotonic() + seconds
    sent = 0
    for sent in range(1, count + 1):
        send(MSG)
        if sent % 1024 == 0 and time.monotonic() > deadline:
            break
    send(END)
    done = recv()
    elapsed = (_now() - t0) / 1e9
    if done.get("received") != sent:
        raise RuntimeError(f"sent {sent}, child received {done.get('received')}")
    return sent / elapsed


def run_procwire_py(settings: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    with pp.spawn(pw_echo) as child:
        out.update(latency(child.send, lambda: child.recv(timeout=30), settings["warmup"],
                           settings["lat_count"], settings["seconds"]))
        child.send(END)
    with pp.spawn(pw_sink) as child:
        out["msgs_per_s"] = throughput(child.send, lambda: child.recv(timeout=60),
                                       settings["count"], settings["seconds"])
    return out


def run_procwire_node(settings: dict[str, Any]) -> dict[str, float]:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node not found on PATH")
    out: dict[str, float] = {}
    with pp.spawn([node, str(NODE_SCRIPT), "child-echo"]) as child:
        assert child.recv(timeout=30) == {"event": "ready"}
        out.update(latency(child.send, lambda: child.recv(timeout=30), settings["warmup"],
                           settings["lat_count"], settings["seconds"]))
        child.send(END)
    with pp.spawn([node, str(NODE_SCRIPT), "child-sink"]) as child:
        assert child.recv(timeout=30) == {"event": "ready"}
        out["msgs_per_s"] = throughput(child.send, lambda: child.recv(timeout=60),
                                       settings["count"], settings["seconds"])
    return out


def _mp_run(target: Callable[[Any], None], body: Callable[[Any], Any]) -> Any:
    ctx = multiprocessing.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=target, args=(b,), daemon=True)
    proc.start()
    b.close()
    try:
        return body(a)
    finally:
        a.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _recv_within(conn: Any, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"no reply within {timeout} s")
    return conn.recv()


def run_mp_pipe(settings: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}

    def lat(conn: Any) -> None:
        out.update(latency(conn.send, lambda: _recv_within(conn, 30), settings["warmup"],
                           settings["lat_count"], settings["seconds"]))
        conn.send(END)

    def tput(conn: Any) -> None:
        out["msgs_per_s"] = throughput(conn.send, lambda: _recv_within(conn, 60),
                                       settings["count"], settings["seconds"])

    _mp_run(mp_echo, lat)
    _mp_run(mp_sink, tput)
    return out


def _node_json(node: str, args: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.Popen([node, str(NODE_SCRIPT), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"node exited {proc.returncode}: {err.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def run_node_fork(settings: dict[str, Any]) -> dict[str, float]:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node not found on PATH")
    limit = 60 + 3 * settings["seconds"]
    lat = _node_json(node, ["lat", str(SIZE), str(settings["warmup"]),
                            str(settings["lat_count"]), str(settings["seconds"])], limit)
    tput = _node_json(node, ["tput", str(SIZE), str(settings["count"]),
                             str(settings["seconds"])], limit)
    elapsed = (int(tput["t_end_ns"]) - int(tput["t0_ns"])) / 1e9
    return {"p50_us": lat["p50_ns"] / 1000, "p99_us": lat["p99_ns"] / 1000,
            "msgs_per_s": tput["received"] / elapsed}


METHODS: dict[str, Callable[[dict[str, Any]], dict[str, float]]] = {
    "procwire py<->py": run_procwire_py,
    "mp.Pipe": run_mp_pipe,
    "node fork": run_node_fork,
    "procwire py<->node": run_procwire_node,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, shorter runs")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json", default=None, help="write every measurement here")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    settings = {"warmup": 500, "lat_count": 5000 if args.quick else 20000,
                "count": 200_000 if args.quick else 1_000_000,
                "seconds": 1.0 if args.quick else 3.0}
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    failed = False
    names = list(METHODS)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate the order
        for name in order:
            print(f"rep {rep + 1}/{reps}: {name}", file=sys.stderr, flush=True)
            try:
                results[name].append(METHODS[name](settings))
            except Exception as exc:
                failed = True
                print(f"  failed: {exc}", file=sys.stderr)
    print(f"| method (64 B messages, median of {reps}) | RTT p50 (µs) | RTT p99 (µs) | "
          "throughput (msgs/s) |")
    print("| --- | ---: | ---: | ---: |")
    for name, runs in results.items():
        if not runs:
            print(f"| {name} | failed | failed | failed |")
            continue
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {med['p50_us']:.1f} | {med['p99_us']:.1f} | "
              f"{med['msgs_per_s']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
