"""Local broker request/reply round trip, next to its floors, in one run.

Rows (``--only`` names):
  raw_pingpong  two processes, one UNIX socket, 4-byte length + small JSON, blocking
                ``send``/``recv_into``: the floor of one round trip between two processes
  raw_relay     requester -> relay process -> responder -> relay -> requester over UNIX sockets,
                the relay a minimal asyncio ``Protocol`` that forwards bytes: the floor of a
                brokered round trip (four socket hops, two relay passes)
  bus           ``Bus("broker://...").request("echo", {"i": i})`` against a responder process
                with ``bus.handle("echo", lambda d: d)``, through a foreground broker

Each row: a responder (or peer) process, a requester process making 200 warm-up then N
sequential round trips; p50/p99 of the requester's ``perf_counter_ns`` per round trip.
``--src A B ...`` measures the ``bus`` row once per procwire source tree (e.g. a copy of the
previous commit's ``src``, to compare before/after in one run); repetitions are interleaved.

    .venv/bin/python benchmarks/broker_rtt.py                       # 3 repetitions
    .venv/bin/python benchmarks/broker_rtt.py --src /tmp/old/src src --reps 5

Every child process is killed and reaped at the end of its measurement, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# An echo peer: it listens (``listen``) or connects to a relay (``connect``), then sends
# back every byte it gets.
RAW_PEER = r"""
import socket, sys
path, mode = sys.argv[1:3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
if mode == "listen":
    s.bind(path)
    s.listen(1)
    print("ready", flush=True)
    s, _ = s.accept()
else:
    s.connect(path)
    print("ready", flush=True)
buf = bytearray(65536)
while True:
    n = s.recv_into(buf)
    if not n:
        break
    s.sendall(bytes(buf[:n]))
"""

RAW_REQUESTER = r"""
import json, socket, struct, sys, time
path, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
buf = bytearray(65536)
lats = []
clock = time.perf_counter_ns
for i in range(200 + n):
    t = clock()
    body = json.dumps(["req", 0, "echo", {"id": "x", "data": {"i": i}}]).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    got = 0
    while got < 4 or got < 4 + struct.unpack_from(">I", buf)[0]:
        got += s.recv_into(memoryview(buf)[got:])
    json.loads(bytes(buf[4:got]))
    if i >= 200:
        lats.append(clock() - t)
print(json.dumps({"lats": lats}), flush=True)
"""

# A minimal relay: the first client to connect is the responder, the second the requester;
# bytes from one go to the other as they come (the floor of any broker hop in asyncio).
RAW_RELAY = r"""
import asyncio, sys
path = sys.argv[1]
peers = []
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        peers.append(self)
    def data_received(self, data):
        other = peers[1] if self is peers[0] else peers[0]
        other.t.write(data)
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_unix_server(P, path)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

BUS_RESPONDER = r"""
import sys
sys.path.insert(0, sys.argv[2])
from procwire.bus import Bus
bus = Bus(sys.argv[1], channel="rtt")
bus.handle("echo", lambda d: d)
print("ready", flush=True)
sys.stdin.read()
bus.close()
"""

BUS_REQUESTER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from procwire.bus import Bus
n = int(sys.argv[3])
bus = Bus(sys.argv[1], channel="rtt")
for i in range(200):
    bus.request("echo", {"i": i}, timeout=10)
lats = []
clock = time.perf_counter_ns
for i in range(n):
    t = clock()
    bus.request("echo", {"i": i}, timeout=10)
    lats.append(clock() - t)
print(json.dumps({"lats": lats}), flush=True)
bus.close()
"""


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("a child did not answer in time")
    return proc.stdout.readline()


class Procs:
    """Children of one measurement, all killed and reaped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.dir = tempfile.mkdtemp(prefix="pw-rtt-")

    def start(self, args: list[str], env: dict[str, str] | None = None,
              ready: bool = True) -> subprocess.Popen[str]:
        p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=env, stderr=subprocess.DEVNULL if env else None)
        self.procs.append(p)
        if ready and readline(p, 30).strip() != "ready":
            raise RuntimeError(f"{args[:3]} did not start")
        return p

    def broker(self, src: str, path: str, *extra: str) -> subprocess.Popen[str]:
        """A foreground broker from the procwire in ``src`` on ``path``, once it listens."""
        p = self.start([sys.executable, "-m", "procwire.bus._broker", "--socket", path,
                        "--idle", "0", *extra], env=dict(os.environ, PYTHONPATH=src),
                       ready=False)
        deadline = time.monotonic() + 20
        while not os.path.exists(path + ".pid"):
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError("the broker did not start")
            time.sleep(0.02)
        return p

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            if p.stdin is not None:
                p.stdin.close()
            if p.poll() is None:
                p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def lats_of(proc: subprocess.Popen[str]) -> list[float]:
    return sorted(x / 1000 for x in json.loads(readline(proc, 120))["lats"])


def measure(row: str, n: int, src: str) -> list[float]:
    py = sys.executable
    with Procs() as ps:
        path = os.path.join(ps.dir, "s.sock")
        if row == "raw_pingpong":
            ps.start([py, "-c", RAW_PEER, path, "listen"])
            return lats_of(ps.start([py, "-c", RAW_REQUESTER, path, str(n)], ready=False))
        if row == "raw_relay":
            ps.start([py, "-c", RAW_RELAY, path])
            ps.start([py, "-c", RAW_PEER, path, "connect"])
            time.sleep(0.1)
            return lats_of(ps.start([py, "-c", RAW_REQUESTER, path, str(n)], ready=False))
        ps.broker(src, path)
        url = f"broker://{path}?autostart=0"
        ps.start([py, "-c", BUS_RESPONDER, url, src])
        return lats_of(ps.start([py, "-c", BUS_REQUESTER, url, src, str(n)], ready=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-n", type=int, default=2000, help="round trips per measurement")
    ap.add_argument("--only", nargs="*", default=["raw_pingpong", "raw_relay", "bus"])
    ap.add_argument("--src", nargs="*", default=[str(ROOT / "src")],
                    help="procwire source trees for the bus row (default: this checkout)")
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []
    for row in args.only:
        if row == "bus":
            rows += [("bus", os.path.abspath(s)) for s in args.src]
        else:
            rows.append((row, ""))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {r: [] for r in rows}
    for rep in range(args.reps):
        for r in rows:
            lats = measure(r[0], args.n, r[1])
            p50, p99 = lats[len(lats) // 2], lats[min(len(lats) - 1, int(len(lats) * 0.99))]
            results[r].append((p50, p99))
            print(f"rep {rep + 1}: {r[0]:13s} {r[1][-40:]:40s} p50 {p50:7.1f} us  "
                  f"p99 {p99:8.1f} us", file=sys.stderr, flush=True)
    print(f"\nround trip, medians of {args.reps} repetitions' p50 / p99 (min-max of p50)\n")
    print("| row | source | p50 µs | p99 µs | p50 range |")
    print("|---|---|---:|---:|---|")
    for r, vals in results.items():
        p50s = [v[0] for v in vals]
        p99s = [v[1] for v in vals]
        print(f"| {r[0]} | {r[1] or '-'} | {statistics.median(p50s):.0f} | "
              f"{statistics.median(p99s):.0f} | {min(p50s):.0f}-{max(p50s):.0f} |")
    out: dict[str, Any] = {f"{r[0]}:{r[1]}": v for r, v in results.items()}
    res = ROOT / "benchmarks" / "results" / "tmp"
    res.mkdir(parents=True, exist_ok=True)
    (res / "broker_rtt.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
