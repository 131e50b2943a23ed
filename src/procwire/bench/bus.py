"""Event bus benchmark: 1 publisher to 1, 4 and 16 subscriber processes, on one Redis channel
and on procwire's local broker; request/reply latency on both.

Methods (``--only`` names):
  raw_redis        redis-py used directly: a pipelining publisher (100 PUBLISH per round trip),
                   subscribers on ``PubSub.listen()`` decoding with ``json.loads``
  procwire_many    procwire ``Bus("redis://...")``: ``emit_many`` of 100 events per call,
                   subscribers iterating ``bus.subscribe("*")``
  procwire_emit    procwire on Redis, one ``emit()`` per event: queued, and pipelined by the
                   bus's background flusher (like ioredis's automatic pipelining)
  broker_many      procwire ``Bus("broker:///...")`` (the local broker, the default ``Bus()``):
                   ``emit_many`` of 100 events per call (one confirmation per call)
  broker_emit      the local broker, one ``emit()`` per event: queued, and pipelined by the
                   bus's flusher as batch frames (one confirmation per batch)
  node_ioredis     Node ioredis: publisher issuing PUBLISH without awaiting (ioredis pipelines
                   them by itself), subscribers with JSON.parse

Request/reply (test ``rr``, for procwire_emit = Redis and broker_emit = broker): a responder
process answers ``bus.handle("echo", ...)``; a requester process makes 200 warm-up then 2000
sequential ``bus.request("echo", {"i": i})`` calls; p50/p99 of the round trip.

Tests: ``tput`` (events/s: N events or 1 s of publishing, then an end marker; elapsed = the
last subscriber's monotonic clock at the end marker minus the publisher's before its first
send; every subscriber must count all N) and ``lat`` (one-way latency: 1000 events paced 1 ms
apart, each carrying the publisher's CLOCK_MONOTONIC; p50/p99 over every subscriber's samples).

    procwire bench bus                # 3 interleaved repetitions (~6 min)
    procwire bench bus --quick        # 1 repetition, smaller N (~1 min)
    procwire bench bus --only raw_redis --only procwire_many --subs 1 --subs 4

(``python benchmarks/bus.py`` in a checkout takes the same options; ``--only`` and ``--subs``
also take several values each.) The benchmark starts its own ``redis-server`` (which must be on
``PATH``) on a free loopback port and its own local broker. The Node row needs Node
(``PROCWIRE_BENCH_NODE`` or ``node`` on ``PATH``) and the npm package ``ioredis``, looked up in
the ``node_modules`` folder named by ``PROCWIRE_BENCH_NODE_MODULES`` when set, else in a
checkout's ``tests/node/node_modules``; without them that row is reported as an error with the
install hint.

Every child process is killed and reaped at the end of its measurement, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import procwire

#: The folder holding the imported ``procwire`` package: child processes get it first on their
#: path, so an installed procwire measures itself and a checkout measures its ``src``.
PKG_PARENT = str(Path(procwire.__file__).resolve().parent.parent)
#: ``tests/node/node_modules`` when this module runs from a checkout (src/procwire/bench).
_CHECKOUT_NODE_MODULES = Path(__file__).resolve().parents[3] / "tests" / "node" / "node_modules"
IOREDIS_HINT = ("the npm package ioredis was not found: `npm install --prefix DIR ioredis` and "
                "set PROCWIRE_BENCH_NODE_MODULES=DIR/node_modules (in a checkout: "
                "`npm install --prefix tests/node`)")

PY_SUB = r"""
import json, sys, time
url, channel, method = sys.argv[1:4]
lats = []
n = 0
if method == "raw_redis":
    import redis
    r = redis.Redis.from_url(url)
    ps = r.pubsub(ignore_subscribe_messages=True)
    ps.subscribe(channel)
    while ps.get_message(timeout=5) is None and not ps.subscribed:
        pass
    print("ready", flush=True)
    for m in ps.listen():
        env = json.loads(m["data"])
        if env["event"] == "end":
            break
        n += 1
        t = env["data"].get("t")
        if t is not None:
            lats.append(time.monotonic_ns() - t)
else:
    sys.path.insert(0, sys.argv[4])
    from procwire.bus import Bus
    bus = Bus(url, channel=channel, maxsize=1_000_000)
    sub = bus.subscribe("*", timeout=60)
    print("ready", flush=True)
    for ev in sub:
        if ev.name == "end":
            break
        n += 1
        t = ev.data.get("t")
        if t is not None:
            lats.append(time.monotonic_ns() - t)
print(json.dumps({"n": n, "t_end": time.monotonic_ns(), "lats": lats}), flush=True)
"""

PY_PUB = r"""
import json, sys, time
url, channel, method, mode, n_max = sys.argv[1:6]
n_max = int(n_max)
sys.path.insert(0, sys.argv[6])
data = {"id": 123, "name": "doSomething"}
sent = 0
if method == "raw_redis":
    import redis
    r = redis.Redis.from_url(url)
    def emit(name, d):
        r.publish(channel, json.dumps({"event": name, "data": d}))
    def emit_batch(k):
        p = r.pipeline(transaction=False)
        for _ in range(k):
            p.publish(channel, json.dumps({"event": "tick", "data": data}))
        p.execute()
else:
    from procwire.bus import Bus
    bus = Bus(url, channel=channel)
    emit = bus.emit
    if method.endswith("_many"):
        def emit_batch(k):
            bus.emit_many([("tick", data)] * k)
    else:
        def emit_batch(k):
            for _ in range(k):
                bus.emit("tick", data)
t0 = time.monotonic_ns()
if mode == "tput":
    stop = time.monotonic() + 1.0
    while sent < n_max and time.monotonic() < stop:
        emit_batch(100)
        sent += 100
else:
    for i in range(n_max):
        emit("tick", {"t": time.monotonic_ns()})
        sent += 1
        time.sleep(0.001)
emit("end", {})
if method != "raw_redis":
    bus.close()  # on Redis: returns once the flusher has published everything queued
print(json.dumps({"sent": sent, "t0": t0}), flush=True)
"""

NODE_SUB = r"""
const { Redis } = require("ioredis");
const [url, channel] = process.argv.slice(1);
const sub = new Redis(url);
let n = 0; const lats = [];
const now = () => Number(process.hrtime.bigint());
sub.on("message", (ch, text) => {
  const env = JSON.parse(text);
  if (env.event === "end") {
    process.stdout.write(JSON.stringify({ n, t_end: now(), lats }) + "\n", () => process.exit(0));
    return;
  }
  n++;
  if (env.data.t !== undefined) lats.push(now() - env.data.t);
});
sub.subscribe(channel).then(() => process.stdout.write("ready\n"));
"""

NODE_PUB = r"""
const { Redis } = require("ioredis");
const [url, channel, mode, nMaxS] = process.argv.slice(1);
const nMax = Number(nMaxS);
const pub = new Redis(url);
const data = { id: 123, name: "doSomething" };
const now = () => Number(process.hrtime.bigint());
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  await pub.ping();
  const t0 = now();
  let sent = 0;
  if (mode === "tput") {
    const stop = Date.now() + 1000;
    while (sent < nMax && Date.now() < stop) {
      let last;
      const msg = () => JSON.stringify({ event: "tick", data });
      for (let i = 0; i < 100; i++) last = pub.publish(channel, msg());
      await last;
      sent += 100;
    }
  } else {
    for (let i = 0; i < nMax; i++) {
      await pub.publish(channel, JSON.stringify({ event: "tick", data: { t: now() } }));
      sent++;
      await sleep(1);
    }
  }
  await pub.publish(channel, JSON.stringify({ event: "end", data: {} }));
  process.stdout.write(JSON.stringify({ sent, t0 }) + "\n", () => process.exit(0));
})();
"""
# process.hrtime is CLOCK_MONOTONIC on Linux, like Python's time.monotonic_ns(), so one-way
# latencies can be computed across Python and Node processes on one machine.

PY_RESPONDER = r"""
import sys
sys.path.insert(0, sys.argv[3])
from procwire.bus import Bus
bus = Bus(sys.argv[1], channel=sys.argv[2])
bus.handle("echo", lambda d: d)
print("ready", flush=True)
sys.stdin.read()
bus.close()
"""

PY_REQUESTER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
from procwire.bus import Bus
bus = Bus(sys.argv[1], channel=sys.argv[2])
for i in range(200):
    bus.request("echo", {"i": i}, timeout=10)
lats = []
clock = time.perf_counter_ns
for i in range(2000):
    t = clock()
    bus.request("echo", {"i": i}, timeout=10)
    lats.append(clock() - t)
print(json.dumps({"lats": lats}), flush=True)
bus.close()
"""

METHODS = ["raw_redis", "procwire_many", "procwire_emit", "broker_many", "broker_emit",
           "node_ioredis"]
RR_METHODS = ["procwire_emit", "broker_emit"]


class SetupError(RuntimeError):
    """What the benchmark needs is missing (redis-server, the broker); the message says how to
    get it."""


def node_modules() -> Path | None:
    """The ``node_modules`` folder holding ``ioredis``: ``PROCWIRE_BENCH_NODE_MODULES`` when set
    (and then only it), else a checkout's ``tests/node/node_modules``; None when it lacks
    ``ioredis``."""
    env = os.environ.get("PROCWIRE_BENCH_NODE_MODULES")
    folder = Path(env) if env else _CHECKOUT_NODE_MODULES
    return folder if (folder / "ioredis").is_dir() else None


def node_binary() -> str | None:
    """``PROCWIRE_BENCH_NODE``, else ``node`` on ``PATH``."""
    return shutil.which(os.environ.get("PROCWIRE_BENCH_NODE") or "node")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Redis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SetupError("redis-server not found on PATH: install Redis (e.g. "
                             "`sudo apt-get install redis-server`); the benchmark starts its "
                             "own on a free loopback port")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pw-bench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--client-output-buffer-limit",
             "pubsub 0 0 0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise SetupError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Broker:
    """A foreground local broker on a private socket (its queue large enough that no
    subscriber is dropped, like the Redis server's unlimited pubsub buffer)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pw-bench-broker-")
        self.path = os.path.join(self.dir, "b.sock")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [PKG_PARENT, *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "procwire.bus._broker", "--socket", self.path, "--idle", "0",
             "--max-queue", "10000000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.path + ".pid"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise SetupError("the local broker did not start (python -m "
                                 "procwire.bus._broker)")
            time.sleep(0.05)
        self.url = f"broker://{self.path}?queue=10000000&autostart=0"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def spawn(method: str, role: str, args: list[str]) -> subprocess.Popen[str]:
    if method == "node_ioredis":
        node, modules = node_binary(), node_modules()
        if node is None:
            raise RuntimeError("node not found on PATH (set PROCWIRE_BENCH_NODE)")
        if modules is None:
            raise RuntimeError(IOREDIS_HINT)
        env = dict(os.environ, NODE_PATH=str(modules))
        code = NODE_SUB if role == "sub" else NODE_PUB
        return subprocess.Popen([node, "-e", code, *args], stdout=subprocess.PIPE, text=True,
                                env=env)
    code = PY_SUB if role == "sub" else PY_PUB
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            text=True)


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("child did not answer in time")
    return proc.stdout.readline()


def measure_rr(url: str, method: str, run: int) -> dict[str, Any]:
    channel = f"rr{run}"
    src = PKG_PARENT
    procs: list[subprocess.Popen[str]] = []
    try:
        resp = subprocess.Popen([sys.executable, "-c", PY_RESPONDER, url, channel, src],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(resp)
        if readline(resp, 30).strip() != "ready":
            raise RuntimeError("the responder failed to start")
        req = subprocess.Popen([sys.executable, "-c", PY_REQUESTER, url, channel, src],
                               stdout=subprocess.PIPE, text=True)
        procs.append(req)
        lats = sorted(x / 1000 for x in json.loads(readline(req, 120))["lats"])
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            if p.poll() is None:
                p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
    return {"method": method, "subs": 0, "mode": "rr", "lost": 0,
            "rr_p50_us": lats[len(lats) // 2],
            "rr_p99_us": lats[min(len(lats) - 1, int(len(lats) * 0.99))]}


def measure(redis_url: str, method: str, subs: int, mode: str, quick: bool,
            run: int) -> dict[str, Any]:
    channel = f"bench{run}"
    src = PKG_PARENT
    n_max = (100_000 if quick else 300_000) if mode == "tput" else (300 if quick else 1000)
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(subs):
            args = [redis_url, channel, method, src]
            procs.append(spawn(method, "sub", args if method != "node_ioredis"
                               else [redis_url, channel]))
        for p in procs:
            if readline(p, 30).strip() != "ready":
                raise RuntimeError("a subscriber failed to start")
        pub_args = [redis_url, channel, method, mode, str(n_max), src]
        pub = spawn(method, "pub", pub_args if method != "node_ioredis"
                    else [redis_url, channel, mode, str(n_max)])
        procs.append(pub)
        pub_result = json.loads(readline(pub, 60))
        results = [json.loads(readline(p, 60)) for p in procs[:-1]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
    sent = pub_result["sent"]
    lost = sum(sent - r["n"] for r in results)
    out: dict[str, Any] = {"method": method, "subs": subs, "mode": mode, "sent": sent,
                           "lost": lost}
    if mode == "tput":
        elapsed = (max(r["t_end"] for r in results) - pub_result["t0"]) / 1e9
        out["events_per_s"] = sent / elapsed
        out["deliveries_per_s"] = sent * subs / elapsed
    else:
        lats = sorted(x / 1000 for r in results for x in r["lats"])
        out["p50_us"] = lats[len(lats) // 2]
        out["p99_us"] = lats[min(len(lats) - 1, int(len(lats) * 0.99))]
    return out


def fmt(x: float) -> str:
    return f"{x / 1000:.0f}k" if x >= 10_000 else f"{x:.0f}"


def main(argv: Sequence[str] | None = None, default_json: Path | None = None,
         prog: str | None = None) -> int:
    """``python benchmarks/bus.py [--quick] [--reps N] [--only NAME...] [--subs N...]
    [--json out.json]``: prints the tables; 1 when a measurement failed or lost events, 2 when
    redis-server or the broker could not be started."""
    ap = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, smaller N")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    ap.add_argument("--only", nargs="+", action="extend", default=None, choices=METHODS,
                    metavar="NAME", help="methods to run: " + ", ".join(METHODS))
    ap.add_argument("--subs", nargs="+", action="extend", type=int, default=None,
                    help="subscriber counts (default 1 4 16)")
    ap.add_argument("--json", type=Path, default=default_json,
                    help="write every measurement here")
    args = ap.parse_args(argv)
    args.subs = args.subs or [1, 4, 16]
    reps = args.reps or (1 if args.quick else 3)
    methods = [m for m in METHODS if not args.only or m in args.only]
    rows: list[dict[str, Any]] = []
    failed = False
    if "node_ioredis" in methods:
        # Reported as an error row, not dropped: the table says why Node is missing.
        why = ("node not found on PATH (set PROCWIRE_BENCH_NODE)" if node_binary() is None
               else IOREDIS_HINT if node_modules() is None else None)
        if why is not None:
            print(f"node_ioredis: {why}", file=sys.stderr)
            rows.append({"method": "node_ioredis", "subs": 0, "mode": "setup", "error": why,
                         "rep": 0})
            methods.remove("node_ioredis")
            failed = True
    try:
        server = Redis() if any(not m.startswith("broker") for m in methods) else None
        try:
            broker = Broker() if any(m.startswith("broker") for m in methods) else None
        except BaseException:
            if server is not None:
                server.close()
            raise
    except SetupError as exc:
        print(f"bus benchmark: {exc}", file=sys.stderr)
        return 2

    def url_of(method: str) -> str:
        started = broker if method.startswith("broker") else server
        assert started is not None  # started above for every method in ``methods``
        return started.url

    run = 0
    try:
        for rep in range(reps):
            for method in [m for m in RR_METHODS if m in methods]:
                run += 1
                print(f"rep {rep + 1}/{reps} request/reply {method}", file=sys.stderr,
                      flush=True)
                try:
                    r = measure_rr(url_of(method), method, run)
                except Exception as exc:
                    failed = True
                    r = {"method": method, "subs": 0, "mode": "rr", "error": repr(exc)}
                    print(f"  failed: {exc!r}", file=sys.stderr)
                r["rep"] = rep
                rows.append(r)
            for subs in args.subs if methods else []:
                for mode in ("tput", "lat"):
                    order = methods[rep % len(methods):] + methods[:rep % len(methods)]
                    for method in order:
                        run += 1
                        print(f"rep {rep + 1}/{reps} {mode} subs={subs} {method}",
                              file=sys.stderr, flush=True)
                        try:
                            r = measure(url_of(method), method, subs, mode, args.quick,
                                        run)
                        except Exception as exc:
                            failed = True
                            r = {"method": method, "subs": subs, "mode": mode,
                                 "error": repr(exc)}
                            print(f"  failed: {exc!r}", file=sys.stderr)
                        r["rep"] = rep
                        rows.append(r)
    finally:
        if server is not None:
            server.close()
        if broker is not None:
            broker.close()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"results written to {args.json}", file=sys.stderr)

    def med(method: str, subs: int, key: str) -> float | None:
        vals = [r[key] for r in rows if r["method"] == method and r["subs"] == subs
                and key in r]
        return statistics.median(vals) if vals else None

    print(f"\nmedians of {reps} repetition(s); events/s = events the publisher sent per "
          "second, each delivered to every subscriber\n")
    head = "| method | " + " | ".join(
        f"{s} sub events/s | p50 µs | p99 µs" for s in args.subs) + " |"
    print(head)
    print("|---|" + "---:|" * (3 * len(args.subs)))
    for m in methods:
        cells = []
        for s in args.subs:
            for key in ("events_per_s", "p50_us", "p99_us"):
                v = med(m, s, key)
                cells.append("-" if v is None else (fmt(v) if key == "events_per_s"
                                                    else f"{v:.0f}"))
        print(f"| {m} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["mode"] == "setup":
            print(f"| {r['method']} | " + " | ".join(["error"] * (3 * len(args.subs))) + " |")

    def ratios(a_m: str, b_m: str) -> str:
        """events/s of a_m / b_m inside each repetition: median [min-max], per subscriber
        count."""
        parts = []
        for s in args.subs:
            found = []
            for rep in range(reps):
                a = [r.get("events_per_s") for r in rows if r["method"] == a_m
                     and r["subs"] == s and r["rep"] == rep and r["mode"] == "tput"]
                b = [r.get("events_per_s") for r in rows if r["method"] == b_m
                     and r["subs"] == s and r["rep"] == rep and r["mode"] == "tput"]
                if a and b and a[0] and b[0]:
                    found.append(a[0] / b[0])
            parts.append(f"{s} sub: {statistics.median(found):.2f}x "
                         f"[{min(found):.2f}-{max(found):.2f}]" if found else f"{s} sub: -")
        return ", ".join(parts)

    sections = [
        ("ratios to raw_redis events/s", [(m, "raw_redis") for m in methods
                                          if m != "raw_redis"]),
        ("ratios to node_ioredis events/s", [(m, "node_ioredis") for m in
                                             ("procwire_emit", "procwire_many")]),
        ("local broker vs the Redis backend, events/s", [("broker_many", "procwire_many"),
                                                          ("broker_emit", "procwire_emit")]),
    ]
    for title, pairs in sections:
        pairs = [(a_m, b_m) for a_m, b_m in pairs if a_m in methods and b_m in methods]
        if pairs:
            print(f"\n{title} (median [min-max] of per-repetition ratios)\n")
            for a_m, b_m in pairs:
                print(f"- {a_m} / {b_m}: {ratios(a_m, b_m)}")
    rr = [m for m in RR_METHODS if m in methods]
    if rr:
        print("\nrequest/reply round trip (medians of the repetitions' p50 / p99)\n")
        print("| backend | p50 µs | p99 µs |\n|---|---:|---:|")
        for m in rr:
            p50, p99 = med(m, 0, "rr_p50_us"), med(m, 0, "rr_p99_us")
            name = "local broker" if m.startswith("broker") else "Redis"
            print(f"| {name} | {'-' if p50 is None else f'{p50:.0f}'} | "
                  f"{'-' if p99 is None else f'{p99:.0f}'} |")
    losses = [r for r in rows if r.get("lost")]
    for r in losses:
        print(f"- LOST {r['lost']} events: {r['method']} subs={r['subs']} {r['mode']}")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        where = "not run" if r["mode"] == "setup" else f"subs={r['subs']} {r['mode']}"
        print(f"- ERROR {r['method']} {where}: {r['error']}")
    return 1 if failed or losses else 0


if __name__ == "__main__":
    sys.exit(main())
