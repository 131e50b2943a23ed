"""Local broker fan-out: CPU time per delivered event, in the broker and in the subscribers.

On a shared 2-core machine events/s swing by 2-3x from one run to the next (other processes
take the CPU); the CPU time each process spends on a fixed amount of work is much steadier, so
this is how two versions of the broker and its client are compared.

One foreground broker, S subscriber processes (``Bus(url).subscribe("*")``, counting), one
publisher sending N events as ``emit_many`` batches of 100 (``{"id": 123, "name":
"doSomething"}``, like ``benchmarks/bus.py``), then an end marker. Reported per run: wall time,
events/s, and CPU microseconds (user + system, from ``/proc/<pid>/stat``) per delivery in the
broker and in all subscribers together, per event in the publisher, and the subscribers'
context switches (voluntary + involuntary, all threads, from ``/proc/<pid>/task/*/status``)
per 100 deliveries, i.e. how often they sleep and wake per batch. ``--src A B`` runs each
procwire source tree (e.g. a copy of an earlier commit's ``src``), repetitions interleaved.

    .venv/bin/python benchmarks/broker_fanout.py --subs 4 16
    .venv/bin/python benchmarks/broker_fanout.py --src /tmp/old/src src --reps 3

Every child process is killed and reaped at the end of its measurement, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from broker_rtt import ROOT, Procs, readline

SUB = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from procwire.bus import Bus
bus = Bus(sys.argv[1], channel="fan", maxsize=10_000_000)
sub = bus.subscribe("*", timeout=120)
print("ready", flush=True)
n = 0
for ev in sub:
    if ev.name == "end":
        break
    n += 1
print(json.dumps({"n": n}), flush=True)
sys.stdin.read()
"""

PUB = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from procwire.bus import Bus
n = int(sys.argv[3])
bus = Bus(sys.argv[1], channel="fan")
data = {"id": 123, "name": "doSomething"}
batch = [("tick", data)] * 100
t0 = time.monotonic()
for _ in range(n // 100):
    bus.emit_many(batch)
bus.emit("end", {})
print(json.dumps({"t0": t0}), flush=True)
sys.stdin.read()
"""

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of ``pid``'s threads so far (wake-ups)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if "ctxt_switches" in line:
                    total += int(line.split()[1])
    return total


def measure(src: str, subs: int, n: int) -> dict[str, Any]:
    py = sys.executable
    with Procs() as ps:
        path = os.path.join(ps.dir, "s.sock")
        broker = ps.broker(src, path, "--max-queue", "10000000")
        url = f"broker://{path}?autostart=0&queue=10000000"
        subscribers = [ps.start([py, "-c", SUB, url, src]) for _ in range(subs)]
        base = {p.pid: cpu_s(p.pid) for p in [broker, *subscribers]}
        base_cs = {p.pid: ctx_switches(p.pid) for p in subscribers}
        pub = ps.start([py, "-c", PUB, url, src, str(n)], ready=False)
        t0 = json.loads(readline(pub, 300))["t0"]
        got = [json.loads(readline(p, 300))["n"] for p in subscribers]
        wall = time.monotonic() - t0
        if got != [n] * subs:
            raise RuntimeError(f"subscribers missed events: {got}")
        broker_cpu = cpu_s(broker.pid) - base[broker.pid]
        subs_cpu = sum(cpu_s(p.pid) - base[p.pid] for p in subscribers)
        subs_cs = sum(ctx_switches(p.pid) - base_cs[p.pid] for p in subscribers)
        pub_cpu = cpu_s(pub.pid)  # includes its start-up: an upper bound
    deliveries = n * subs
    return {"wall_s": wall, "events_per_s": n / wall,
            "broker_us_per_delivery": broker_cpu / deliveries * 1e6,
            "subs_us_per_delivery": subs_cpu / deliveries * 1e6,
            "pub_us_per_event": pub_cpu / n * 1e6,
            "subs_switches_per_100": subs_cs / deliveries * 100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-n", type=int, default=100_000, help="events per measurement")
    ap.add_argument("--subs", nargs="*", type=int, default=[4, 16])
    ap.add_argument("--src", nargs="*", default=[str(ROOT / "src")])
    args = ap.parse_args()
    srcs = [os.path.abspath(s) for s in args.src]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rep in range(args.reps):
        for subs in args.subs:
            for src in srcs:
                r = measure(src, subs, args.n)
                results.setdefault((src, subs), []).append(r)
                print(f"rep {rep + 1}: {subs:2d} subs {src[-40:]:40s} "
                      + " ".join(f"{k} {v:.2f}" for k, v in r.items()), file=sys.stderr,
                      flush=True)
    keys = ["events_per_s", "broker_us_per_delivery", "subs_us_per_delivery",
            "pub_us_per_event", "subs_switches_per_100"]
    print(f"\nmedians of {args.reps} repetitions, {args.n} events each [min-max]\n")
    print("| subs | source | events/s | broker CPU µs/delivery | subscribers CPU µs/delivery "
          "| publisher CPU µs/event | subscriber context switches per 100 deliveries |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for (src, subs), rs in results.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rs]
            fmt = "{:.0f}" if k == "events_per_s" else "{:.2f}"
            cells.append(f"{fmt.format(statistics.median(vals))} "
                         f"[{fmt.format(min(vals))}-{fmt.format(max(vals))}]")
        print(f"| {subs} | {src} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
