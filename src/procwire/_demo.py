"""``procwire demo``: a second process, and messages flowing over each local transport.

For each transport the parent starts a child (``python -m procwire._demo URL``) that connects
back and echoes; the parent shows the child's pid, the round-trip time of a small request/reply
and the rate of a burst of one-way messages. Then ``_tour`` shows a spawned child, a cluster,
the event bus and a work queue. Nothing needs to be installed or started by hand.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

CHILD_TIMEOUT = 20.0


# -- child side ---------------------------------------------------------------------------------

def child_main(url: str) -> int:
    """Connect to ``url`` and serve the demo protocol until the parent closes."""
    import procwire

    ch = procwire.connect(url, timeout=CHILD_TIMEOUT, retry=True)
    # The child speaks first: a UDP listener only learns of a peer from its first datagram.
    ch.send({"kind": "ready"})
    count = 0
    try:
        while True:
            try:
                msg = ch.recv(timeout=CHILD_TIMEOUT)
            except procwire.ConnectionClosed:
                return 0
            kind = msg.get("kind") if isinstance(msg, dict) else None
            if kind == "hello":
                ch.send({"kind": "hello", "pid": os.getpid(), "python": sys.version.split()[0]})
            elif kind == "ping":
                ch.send({"kind": "pong", "n": msg["n"]})
            elif kind == "burst":
                count += 1
            elif kind == "count":
                ch.send({"kind": "count", "received": count})
                count = 0
            elif kind == "bye":
                ch.send({"kind": "bye"})
                ch.flush(CHILD_TIMEOUT)
                return 0
    finally:
        ch.close()


# -- parent side --------------------------------------------------------------------------------

def _exercise(ch: Any, burst: int) -> dict[str, Any]:
    ready = ch.recv(timeout=CHILD_TIMEOUT)
    if ready != {"kind": "ready"}:
        raise RuntimeError(f"unexpected first message {ready!r}")
    ch.send({"kind": "hello"})
    hello = ch.recv(timeout=CHILD_TIMEOUT)
    rtts = []
    for n in range(200):
        t0 = time.perf_counter()
        ch.send({"kind": "ping", "n": n})
        reply = ch.recv(timeout=CHILD_TIMEOUT)
        rtts.append(time.perf_counter() - t0)
        if reply != {"kind": "pong", "n": n}:
            raise RuntimeError(f"unexpected reply {reply!r}")
    msg = {"kind": "burst", "data": {"id": 123, "name": "doSomething"}}
    t0 = time.perf_counter()
    for _ in range(burst):
        ch.send(msg)
    ch.send({"kind": "count"})
    counted = ch.recv(timeout=CHILD_TIMEOUT)
    elapsed = time.perf_counter() - t0
    ch.send({"kind": "bye"})
    ch.recv(timeout=CHILD_TIMEOUT)
    return {
        "child_pid": hello.get("pid"),
        "rtt_p50_us": statistics.median(rtts) * 1e6,
        "sent": burst,
        "received": counted.get("received"),
        "msgs_per_s": burst / elapsed,
    }


def _spawn(url: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "procwire._demo", url], **kwargs)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _via_listener(url: str, burst: int, *, codec: str = "json") -> dict[str, Any]:
    import procwire

    with procwire.listen(url, codec=codec) as server:
        proc = _spawn(server.address)
        try:
            with server.accept(timeout=CHILD_TIMEOUT) as ch:
                row = _exercise(ch, burst)
            row["url"] = server.address
            return row
        finally:
            _reap(proc)


def demo_unix(folder: str, burst: int) -> dict[str, Any]:
    return _via_listener(f"unix://{folder}/demo.sock", burst)


def demo_tcp(folder: str, burst: int) -> dict[str, Any]:
    return _via_listener("tcp://127.0.0.1:0", burst)


def demo_udp(folder: str, burst: int) -> dict[str, Any]:
    # Datagrams can be lost when a burst outruns the receiver: the demo shows the count.
    return _via_listener("udp://127.0.0.1:0", min(burst, 2000))


def demo_spool(folder: str, burst: int) -> dict[str, Any]:
    return _via_listener(f"spool://{folder}/spool", min(burst, 500))


def demo_pipe(folder: str, burst: int) -> dict[str, Any]:
    import procwire

    mine, theirs = socket.socketpair()
    try:
        proc = _spawn(f"fd://{theirs.fileno()}", pass_fds=[theirs.fileno()])
    finally:
        theirs.close()
    try:
        with procwire.connect(f"fd://{mine.detach()}") as ch:
            row = _exercise(ch, burst)
        row["url"] = "fd:// (socketpair)"
        return row
    finally:
        _reap(proc)


def demo_stdio(folder: str, burst: int) -> dict[str, Any]:
    import procwire
    from procwire.transports import stdio

    proc = _spawn("stdio://", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        # The stream owns (and closes) the fds it is given: hand it duplicates.
        stream = stdio.open_pipes(os.dup(proc.stdout.fileno()), os.dup(proc.stdin.fileno()),
                                  stdio_options())
        ch = procwire.Channel(stream, procwire.get_codec("json"))
        with ch:
            row = _exercise(ch, burst)
        row["url"] = "stdio:// (JSON lines)"
        return row
    finally:
        proc.stdin.close()
        proc.stdout.close()
        _reap(proc)


def stdio_options() -> Any:
    from procwire.transports.base import TransportOptions

    return TransportOptions()


def demo_memory(folder: str, burst: int) -> dict[str, Any]:
    import procwire

    # In-process: the "second process" is a thread here, which is what memory:// is for.
    with procwire.listen("memory://demo") as server:
        t = threading.Thread(target=_memory_child, daemon=True)
        t.start()
        with server.accept(timeout=CHILD_TIMEOUT) as ch:
            row = _exercise(ch, burst)
        t.join(CHILD_TIMEOUT)
        row["child_pid"] = f"{os.getpid()} (thread)"
        row["url"] = server.address
        return row


def _memory_child() -> None:
    child_main("memory://demo")


DEMOS: list[tuple[str, Callable[[str, int], dict[str, Any]]]] = [
    ("unix", demo_unix),
    ("tcp", demo_tcp),
    ("pipe", demo_pipe),
    ("stdio", demo_stdio),
    ("udp", demo_udp),
    ("spool", demo_spool),
    ("memory", demo_memory),
]


def run_demo(json_out: bool = False, burst: int = 20000) -> bool:
    from rich.console import Console
    from rich.table import Table

    from ._tour import TOURS

    console = Console(stderr=json_out)
    if not console.is_terminal:
        console = Console(stderr=json_out, width=120)  # logs and CI: do not squeeze the table
    rows = []
    console.print(f"[bold]procwire demo[/bold]: parent pid {os.getpid()}; each transport starts "
                  "a child process that connects back and echoes.\n")
    parts = []
    with tempfile.TemporaryDirectory(prefix="procwire-demo-") as folder:
        for name, fn in DEMOS:
            row = _attempt(console, name, functools.partial(fn, folder, burst))
            if "error" not in row:
                row["ok"] = row.get("received") == row.get("sent") or name == "udp"
            row["transport"] = name
            rows.append(row)
        if not json_out:
            _print_transports(console, rows)
        for name, tour_fn in TOURS:
            part = _attempt(console, name, functools.partial(tour_fn, folder))
            part["part"] = name
            parts.append(part)
    if json_out:
        print(json.dumps({"transports": rows, "tour": parts}, indent=2, default=str))
    elif parts:
        table = Table(title="beyond channels: children, a cluster, the bus, a queue "
                            "(no server needed)")
        for col in ("part", "what happened", "measured", "status"):
            table.add_column(col)
        for p in parts:
            status = "[green]ok[/green]" if p["ok"] else "[red]failed[/red]"
            table.add_row(p["part"], p.get("what") or f"[red]{p.get('error')}[/red]",
                          p.get("timing", ""), status)
        console.print(table)
        console.print("The bus used a local broker that Bus() started on demand (a private "
                      "one here, stopped at the end); the queue is one SQLite file. Read "
                      "docs/processes.md, cluster.md, bus.md and queue.md.")
    return all(r["ok"] for r in rows) and all(p["ok"] for p in parts)


def _attempt(console: Any, name: str, call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part of the demo; a failure becomes that part's row, the others still run."""
    with console.status(f"{name} ..."):
        try:
            return call()
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _print_transports(console: Any, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="messages over each local transport")
    for col in ("transport", "address", "child pid", "round trip p50",
                "burst msgs/s", "received", "status"):
        table.add_column(col, justify="right" if col[0] in "rbc" else "left")
    for r in rows:
        if "error" in r:
            table.add_row(r["transport"], "", "", "", "", "", f"[red]{r['error']}[/red]")
            continue
        table.add_row(r["transport"], r["url"], str(r["child_pid"]),
                      f"{r['rtt_p50_us']:.0f} µs", f"{r['msgs_per_s']:,.0f}",
                      f"{r['received']}/{r['sent']}",
                      "[green]ok[/green]" if r["ok"] else "[red]lost messages[/red]")
    console.print(table)
    console.print("Every message above was JSON, sent with ch.send() and read with "
                  "ch.recv(timeout=...). UDP may drop datagrams under a burst: that is "
                  "UDP. Read docs/ for each transport.\n")


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
