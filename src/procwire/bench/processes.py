"""Parent/child channel benchmark: round-trip latency and one-way throughput, 64 B messages.

    procwire bench children            # 3 repetitions, about a minute
    procwire bench children --quick    # 1 repetition, shorter runs
    procwire bench children --json out.json
    procwire bench children --paired 60   # RTT only, alternating batches

(``python benchmarks/processes.py`` in a checkout takes the same options.)

Methods, measured in the same run:

* ``procwire py<->py``: ``procwire.process.spawn(fn)``, a Python child on Node's IPC protocol
  (JSON lines on a socketpair), ``child.send`` / ``child.recv``.
* ``mp.Pipe``: ``multiprocessing.Pipe()`` to a ``multiprocessing`` child (spawn method),
  ``conn.send`` / ``conn.recv`` (pickle).
* ``node fork``: Node parent, Node child, ``child_process.fork()`` with ``process.send`` /
  ``on('message')`` (``src/procwire/bench/node_fork_bench.js``, which forks its own child).
* ``procwire py<->node``: ``procwire.process.spawn(["node", ...])``: a Python parent with that
  same Node child script.
* ``raw socket py<->py``: the floor, no library and no JSON: a socketpair to a Python child
  that echoes (latency) or counts (throughput) the bytes of newline-terminated lines with
  ``socket.recv`` / ``send``; the parent sends each message with one ``send`` (no coalescing).

Cluster relay (worker 1 -> primary -> worker 2), measured in the same run:

* ``procwire cluster relay``: ``procwire.cluster.Cluster`` of two Python workers; worker 1 sends
  with ``worker().send_to(2, msg)``, the primary relays, worker 2 reads ``worker().recv``.
* ``node cluster relay``: Node's ``cluster`` module, two workers; worker 1 sends
  ``process.send({to: 2, data})``, the primary's ``cluster.on('message')`` relays it with
  ``workers[2].send(...)`` (the Node script is written to a temporary file, see
  ``NODE_CLUSTER_JS``).

Relay throughput: the primary tells worker 1 to go; worker 1 sends as fast as its API allows
(time-bounded), then an end marker with its count; worker 2 checks the count and tells the
primary; messages per second from the go to that answer. Relay latency: worker 1 sends one
message to worker 2, which sends it back to worker 1 (two relays per round trip); p50/p99 as
above. The direct one-hop figure to compare with is ``procwire py<->py`` throughput above.

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
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import procwire.cluster as pc
import procwire.process as pp
from procwire.bench.channels import run_node_json

NODE_SCRIPT = Path(__file__).with_name("node_fork_bench.js")
SIZE = 64
MSG = {"event": "task", "data": "x" * SIZE}
END = {"event": "end"}
_now = time.perf_counter_ns


def _node() -> str:
    """The Node binary: ``PROCWIRE_BENCH_NODE``, else ``node`` on ``PATH``."""
    node = os.environ.get("PROCWIRE_BENCH_NODE") or shutil.which("node")
    if node is None:
        raise RuntimeError("node not found on PATH (set PROCWIRE_BENCH_NODE)")
    return node


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


def burst(send: Callable[[Any], None], count: int, seconds: float) -> int:
    """Send ``MSG`` as fast as ``send`` goes, ``count`` times or for ``seconds``; the count."""
    deadline = time.monotonic() + seconds
    sent = 0
    for sent in range(1, count + 1):
        send(MSG)
        if sent % 1024 == 0 and time.monotonic() > deadline:
            break
    return sent


def throughput(send: Callable[[Any], None], recv: Callable[[], Any], count: int,
               seconds: float) -> float:
    t0 = _now()
    sent = burst(send, count, seconds)
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
    node = _node()
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


#: The floor: a Python child echoing (``lat``) or counting (``tput``) raw newline-terminated
#: lines on a socketpair, no JSON, no library; ``sys.argv[1]`` is the mode, ``[2]`` the fd.
RAW_CHILD = r"""
import socket, sys
s = socket.socket(fileno=int(sys.argv[2]))
recv, send = s.recv, s.send
if sys.argv[1] == "lat":
    while True:
        data = recv(65536)
        if not data or data.startswith(b'{"event":"end"'):
            break
        send(data)
else:
    n = 0
    while True:
        data = recv(65536)
        if not data:
            break
        n += data.count(b"\n")
        if data.endswith(b'{"event":"end"}\n'):
            s.sendall(b'{"event":"done","received":%d}\n' % (n - 1))
            break
"""


def run_raw_socket(settings: dict[str, Any]) -> dict[str, float]:
    import socket

    line = json.dumps(MSG, separators=(",", ":")).encode() + b"\n"
    end = json.dumps(END, separators=(",", ":")).encode() + b"\n"
    out: dict[str, float] = {}
    for mode in ("lat", "tput"):
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-c", RAW_CHILD, mode, str(theirs.fileno())],
                                pass_fds=[theirs.fileno()])
        theirs.close()
        try:
            ours.settimeout(60)
            out.update(_raw_run(ours, mode, line, end, settings))
        finally:
            ours.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out


def _raw_run(sock: Any, mode: str, line: bytes, end: bytes,
             settings: dict[str, Any]) -> dict[str, float]:
    def send(_msg: Any) -> None:
        sock.sendall(line)

    def recv() -> bytes:
        data: bytes = sock.recv(65536)
        return data

    if mode == "lat":
        result = latency(send, recv, settings["warmup"], settings["lat_count"],
                         settings["seconds"])
        sock.sendall(end)
        return result
    t0 = _now()
    sent = burst(send, settings["count"], settings["seconds"])
    sock.sendall(end)
    done = json.loads(sock.recv(65536))
    if done["received"] != sent:
        raise RuntimeError(f"sent {sent}, child received {done['received']}")
    return {"msgs_per_s": sent / ((_now() - t0) / 1e9)}


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


def _node_json(node: str, args: list[str], timeout: float,
               script: Path = NODE_SCRIPT) -> dict[str, Any]:
    return run_node_json([node, str(script), *args], timeout)


def run_node_fork(settings: dict[str, Any]) -> dict[str, float]:
    node = _node()
    limit = 60 + 3 * settings["seconds"]
    lat = _node_json(node, ["lat", str(SIZE), str(settings["warmup"]),
                            str(settings["lat_count"]), str(settings["seconds"])], limit)
    tput = _node_json(node, ["tput", str(SIZE), str(settings["count"]),
                             str(settings["seconds"])], limit)
    elapsed = (int(tput["t_end_ns"]) - int(tput["t0_ns"])) / 1e9
    return {"p50_us": lat["p50_ns"] / 1000, "p99_us": lat["p99_ns"] / 1000,
            "msgs_per_s": tput["received"] / elapsed}


# -- cluster relay ----------------------------------------------------------------------------
def pw_relay_worker(mode: str, settings: dict[str, Any]) -> None:
    """Worker 2 answers (``lat``: sends each message back to worker 1) or counts (``tput``);
    worker 1 measures when the primary says go, and reports to the primary."""
    w = pc.worker()
    if w.id == 2:
        n = 0
        for _sender, data in w:
            if mode == "lat":
                w.send_to(1, data)
            elif data.get("event") == "task":
                n += 1
            else:
                w.send({"event": "done", "received": n, "sent": data.get("sent")})
                n = 0
        return
    for sender, _data in w:
        if sender != 0:
            continue
        if mode == "lat":
            w.send(latency(lambda m: w.send_to(2, m), lambda: w.recv(timeout=30),
                           settings["warmup"], settings["lat_count"], settings["seconds"]))
        else:
            sent = burst(lambda m: w.send_to(2, m), settings["count"], settings["seconds"])
            w.send_to(2, {"event": "end", "sent": sent})


def run_procwire_relay(settings: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    limit = 60 + 3 * settings["seconds"]
    with pc.Cluster(pw_relay_worker, "lat", settings, workers=2, restart="never",
                    stop_timeout=2.0) as cluster:
        cluster.send(1, "go")
        out.update(cluster.recv(timeout=limit).data)
    with pc.Cluster(pw_relay_worker, "tput", settings, workers=2, restart="never",
                    stop_timeout=2.0) as cluster:
        t0 = _now()
        cluster.send(1, "go")
        done = cluster.recv(timeout=limit).data
        elapsed = (_now() - t0) / 1e9
    if done.get("received") != done.get("sent"):
        raise RuntimeError(f"worker 1 sent {done.get('sent')}, worker 2 received "
                           f"{done.get('received')}")
    out["msgs_per_s"] = done["received"] / elapsed
    return out


#: Node's own cluster doing the same relay (the primary relays with ``worker.send``).
NODE_CLUSTER_JS = r"""
'use strict';
// node relay.js lat|tput <payload bytes> <warm-up> <round trips> <messages> <seconds>
const cluster = require('cluster');
const now = () => process.hrtime.bigint();
const MAX_INFLIGHT = 1000;  // bounded send queue in worker 1, as in node_fork_bench.js
const [mode, ...nums] = process.argv.slice(2);
const [size, warmup, latCount, count, seconds] = nums.map(Number);
const nanos = BigInt(Math.round(seconds * 1e9));
function fail(why) { process.stderr.write(`node cluster relay: ${why}\n`); process.exit(2); }

if (cluster.isPrimary) {
  cluster.setupPrimary({ serialization: 'json', stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  const ws = { 1: cluster.fork({ RELAY_ID: '1' }), 2: cluster.fork({ RELAY_ID: '2' }) };
  const all = () => Object.values(ws);
  const watchdog = setTimeout(() => {
    all().forEach((w) => w.process.kill('SIGKILL'));
    fail('timed out');
  }, 1000 * (30 + 3 * seconds));
  let ready = 0;
  let t0 = 0n;
  let result = null;
  for (const [id, w] of Object.entries(ws)) {
    const from = Number(id);
    w.on('message', (m) => {
      if (m.to !== undefined) { ws[m.to].send({ from, data: m.data }); return; }
      if (m.event === 'ready') {
        if (++ready === 2) { t0 = now(); ws[1].send({ go: true }); }
        return;
      }
      result = { ...m, elapsed_ns: String(now() - t0) };
      clearTimeout(watchdog);
      process.stdout.write(JSON.stringify(result) + '\n');
      all().forEach((x) => x.kill());
    });
    w.on('exit', (code, sig) => {
      if (result === null) fail(`worker ${from} exited early (${code}, ${sig})`);
    });
  }
} else {
  const me = Number(process.env.RELAY_ID);
  process.on('disconnect', () => process.exit(0));
  const msg = { event: 'task', data: 'x'.repeat(size) };
  if (me === 2) {
    let n = 0;
    process.on('message', (m) => {
      if (mode === 'lat') { process.send({ to: 1, data: m.data }); return; }
      if (m.data.event === 'task') { n++; return; }
      process.send({ event: 'done', received: n, sent: m.data.sent });
      n = 0;
    });
  } else if (mode === 'lat') {
    const rtts = [];
    let i = 0;
    let warm = warmup > 0;
    let tSend = 0n;
    let deadline = 0n;
    const next = () => { tSend = now(); process.send({ to: 2, data: msg }); };
    process.on('message', (m) => {
      if (m.go) { deadline = now() + nanos; next(); return; }
      const t = now();
      i++;
      if (warm) {
        if (i >= warmup) { warm = false; i = 0; deadline = now() + nanos; }
        next();
        return;
      }
      rtts.push(Number(t - tSend));
      if (i < latCount && t < deadline) { next(); return; }
      rtts.sort((a, b) => a - b);
      const q = (p) => rtts[Math.min(rtts.length - 1, Math.floor(rtts.length * p))];
      process.send({ p50_us: q(0.5) / 1000, p99_us: q(0.99) / 1000, n: rtts.length });
    });
  } else {
    let sent = 0;
    let inflight = 0;
    let limit = count;
    let deadline = 0n;
    let finished = false;
    let pumping = false;
    const onSent = (err) => {
      if (err) fail(`send failed: ${err}`);
      inflight--;
      if (!finished && !pumping && inflight <= MAX_INFLIGHT / 2) pump();
    };
    const pump = () => {
      pumping = true;
      while (sent < limit && inflight < MAX_INFLIGHT) {
        if (sent % 256 === 0 && now() >= deadline) { limit = sent; break; }
        inflight++;
        sent++;
        process.send({ to: 2, data: msg }, onSent);
      }
      pumping = false;
      if (sent >= limit && !finished) {
        finished = true;
        process.send({ to: 2, data: { event: 'end', sent } });
      }
    };
    process.on('message', (m) => { if (m.go) { deadline = now() + nanos; pump(); } });
  }
  process.send({ event: 'ready' });
}
"""


def run_node_relay(settings: dict[str, Any]) -> dict[str, float]:
    node = _node()
    limit = 60 + 3 * settings["seconds"]
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "relay.js"
        script.write_text(NODE_CLUSTER_JS)

        def run(mode: str) -> dict[str, Any]:
            return _node_json(node, [mode, str(SIZE), str(settings["warmup"]),
                                     str(settings["lat_count"]), str(settings["count"]),
                                     str(settings["seconds"])], limit, script)

        lat = run("lat")
        tput = run("tput")
    if tput["received"] != tput["sent"]:
        raise RuntimeError(f"worker 1 sent {tput['sent']}, worker 2 received "
                           f"{tput['received']}")
    return {"p50_us": lat["p50_us"], "p99_us": lat["p99_us"],
            "msgs_per_s": tput["received"] / (int(tput["elapsed_ns"]) / 1e9)}


#: Paired latency: a Node parent that forks a Node echo child, then runs one batch of round
#: trips per line read on stdin ("<n>"; "0" ends it) and answers each with the batch's
#: round-trip times in ns as one JSON line.
NODE_PAIRED_JS = r"""
'use strict';
const { fork } = require('child_process');
if (process.argv[2] === 'child') {
  process.on('disconnect', () => process.exit(0));
  process.on('message', (m) => process.send(m));
  return;
}
const size = Number(process.argv[2]);
const msg = { event: 'task', data: 'x'.repeat(size) };
const child = fork(__filename, ['child'], { serialization: 'json',
                                            stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
const watchdog = setTimeout(() => { child.kill('SIGKILL'); process.exit(2); }, 600000);
let onReply = null;
child.on('message', () => onReply());
const lines = require('readline').createInterface({ input: process.stdin });
lines.on('line', (line) => {
  const n = Number(line);
  if (!n) { clearTimeout(watchdog); child.disconnect(); lines.close(); return; }
  const rtts = [];
  let t = 0n;
  const next = () => { t = process.hrtime.bigint(); child.send(msg); };
  onReply = () => {
    rtts.push(Number(process.hrtime.bigint() - t));
    if (rtts.length < n) next(); else process.stdout.write(JSON.stringify(rtts) + '\n');
  };
  next();
});
"""


def paired_latency(batches: int, batch: int) -> None:
    """RTT p50 of procwire py<->py, Node fork and mp.Pipe in alternating batches of ``batch``
    round trips (the order rotated each time), all three channels open at once: each method
    is measured in the same seconds as the others, which a shared, busy machine needs. Prints
    the p50 of all round trips and the per-batch p50 ratios, median [min-max]."""
    import select

    node = _node()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, pp.spawn(pw_echo) as child:
        script = Path(tmp) / "paired.js"
        script.write_text(NODE_PAIRED_JS)
        proc = subprocess.Popen([node, str(script), str(SIZE)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, start_new_session=True)
        a, b = ctx.Pipe()
        mp_child = ctx.Process(target=mp_echo, args=(b,), daemon=True)
        mp_child.start()
        b.close()
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        def node_batch(n: int) -> list[int]:
            stdin.write(f"{n}\n".encode())
            stdin.flush()
            if not select.select([stdout], [], [], 60)[0]:
                raise RuntimeError("the Node parent did not answer within 60 s")
            rtts: list[int] = json.loads(stdout.readline())
            return rtts

        def timed(send: Callable[[Any], None], recv: Callable[[], Any], n: int) -> list[int]:
            out = []
            for _ in range(n):
                t = _now()
                send(MSG)
                recv()
                out.append(_now() - t)
            return out

        runs: dict[str, Callable[[int], list[int]]] = {
            "procwire py<->py": lambda n: timed(child.send, lambda: child.recv(timeout=30), n),
            "node fork": node_batch,
            "mp.Pipe": lambda n: timed(a.send, lambda: _recv_within(a, 30), n),
        }
        try:
            for run in runs.values():
                run(500)  # warm-up
            samples: dict[str, list[int]] = {k: [] for k in runs}
            p50s: dict[str, list[float]] = {k: [] for k in runs}
            names = list(runs)
            for i in range(batches):
                for name in names[i % 3:] + names[:i % 3]:
                    rtts = sorted(runs[name](batch))
                    samples[name] += rtts
                    p50s[name].append(rtts[len(rtts) // 2])
        finally:
            with contextlib.suppress(OSError):
                stdin.write(b"0\n")
                stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            a.send(END)
            a.close()
            mp_child.join(10)
            if mp_child.is_alive():
                mp_child.kill()
                mp_child.join()
            child.send(END)
    print(f"| paired RTT, {batches} x {batch} round trips each, alternating | RTT p50 (µs) | "
          "RTT p99 (µs) | p50 ratio to node fork, per batch |")
    print("| --- | ---: | ---: | ---: |")
    for name in names:
        xs = sorted(samples[name])
        ratios = [x / y for x, y in zip(p50s[name], p50s["node fork"], strict=True)]
        ratio = "1" if name == "node fork" else _spread(ratios)
        print(f"| {name} | {xs[len(xs) // 2] / 1000:.1f} | "
              f"{xs[min(len(xs) - 1, int(len(xs) * 0.99))] / 1000:.1f} | {ratio} |")
    print()


METHODS: dict[str, Callable[[dict[str, Any]], dict[str, float]]] = {
    "procwire py<->py": run_procwire_py,
    "mp.Pipe": run_mp_pipe,
    "node fork": run_node_fork,
    "procwire py<->node": run_procwire_node,
    "raw socket py<->py": run_raw_socket,
    "procwire cluster relay": run_procwire_relay,
    "node cluster relay": run_node_relay,
}
RELAY = ("procwire cluster relay", "node cluster relay")


#: Each method's ratios are taken against this one, repetition by repetition.
BASELINE = {name: ("node cluster relay" if name in RELAY else "node fork") for name in METHODS}


def print_ratios(results: dict[str, list[dict[str, float]]]) -> None:
    """Per repetition, each method against its Node baseline measured in that repetition:
    RTT p50 ratio (below 1: faster than Node) and throughput ratio (above 1: more than Node);
    median [min-max] over the repetitions where both ran."""
    rows = []
    for name, runs in results.items():
        base = BASELINE[name]
        if name == base or base not in results:
            continue
        pairs = list(zip(runs, results[base], strict=False))
        if len(runs) != len(results[base]) or not pairs:
            continue  # a failed run: the repetitions no longer line up
        rtt = [r["p50_us"] / b["p50_us"] for r, b in pairs]
        tput = [r["msgs_per_s"] / b["msgs_per_s"] for r, b in pairs]
        rows.append(f"| {name} / {base} | {_spread(rtt)} | {_spread(tput)} |")
    if rows:
        print("| ratio, same repetition | RTT p50 (< 1: faster) | throughput (> 1: more) |")
        print("| --- | ---: | ---: |")
        print("\n".join(rows))
        print()


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``python benchmarks/processes.py [--quick] [--reps N] [--json out.json] [--only NAME]
    [--paired BATCHES]``: prints the markdown tables; 1 when a measurement failed."""
    ap = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, shorter runs")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--only", action="append", choices=list(METHODS), default=None,
                    help="run only this method (repeatable)")
    ap.add_argument("--paired", type=int, default=0, metavar="BATCHES",
                    help="instead: RTT of procwire py<->py, node fork and mp.Pipe in this "
                         "many alternating batches of 1000 round trips")
    args = ap.parse_args(argv)
    if args.paired:
        paired_latency(args.paired, 1000)
        return 0
    reps = args.reps or (1 if args.quick else 3)
    settings = {"warmup": 500, "lat_count": 5000 if args.quick else 20000,
                "count": 200_000 if args.quick else 1_000_000,
                "seconds": 1.0 if args.quick else 3.0}
    names = args.only or list(METHODS)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in names}
    failed = False
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate the order
        for name in order:
            print(f"rep {rep + 1}/{reps}: {name}", file=sys.stderr, flush=True)
            try:
                results[name].append(METHODS[name](settings))
            except Exception as exc:
                failed = True
                print(f"  failed: {exc}", file=sys.stderr)
    for title, names_ in ((f"method (64 B messages, median of {reps})",
                           [n for n in results if n not in RELAY]),
                          (f"relay worker 1 -> primary -> worker 2 (64 B, median of {reps})",
                           [n for n in results if n in RELAY])):
        if not names_:
            continue
        print(f"| {title} | RTT p50 (µs) | RTT p99 (µs) | throughput (msgs/s) |")
        print("| --- | ---: | ---: | ---: |")
        for name in names_:
            runs = results[name]
            if not runs:
                print(f"| {name} | failed | failed | failed |")
                continue
            med = {k: statistics.median(r[k] for r in runs) for k in ("p50_us", "p99_us",
                                                                      "msgs_per_s")}
            print(f"| {name} | {med['p50_us']:.1f} | {med['p99_us']:.1f} | "
                  f"{med['msgs_per_s']:,.0f} |")
        print()
    print_ratios(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
