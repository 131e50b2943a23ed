"""The ``procwire`` command line.

``procwire demo`` tours the local transports; ``procwire send`` / ``procwire recv`` move JSON
messages over any URL. Run ``procwire --help`` for the list.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Annotated, Any

import typer

from . import _errors
from ._version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="procwire: every way processes talk.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"procwire {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False
          ) -> None:
    """procwire: message channels, children, clusters, an event bus and queues."""


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}") from exc


def _dump(msg: Any) -> str:
    if isinstance(msg, bytes | bytearray):
        return json.dumps({"bytes": msg.hex()})
    return json.dumps(msg, ensure_ascii=False, separators=(",", ":"))


@app.command()
def send(url: Annotated[str, typer.Argument(help="Where to send, e.g. unix:///tmp/app.sock")],
         message: Annotated[str | None, typer.Argument(
             help="The message as JSON. Omit to send one JSON value per line of stdin.")] = None,
         codec: Annotated[str, typer.Option(help="json, msgpack or raw")] = "json",
         timeout: Annotated[float, typer.Option(help="Seconds to connect and flush.")] = 10.0,
         retry: Annotated[bool, typer.Option(help="Keep retrying while nothing listens.")]
         = False,
         auth: Annotated[str | None, typer.Option(envvar="PROCWIRE_AUTH",
                                                  help="Shared key (or $PROCWIRE_AUTH).")]
         = None) -> None:
    """Connect to URL and send one message (or each JSON line of stdin)."""
    from . import connect

    obj = _parse_json(message) if message is not None else None
    try:
        with connect(url, codec=codec, timeout=timeout, retry=retry, auth=auth) as ch:
            if message is not None:
                ch.send(obj, timeout=timeout)
            else:
                for n, line in enumerate(sys.stdin, 1):
                    if line.strip():
                        try:
                            ch.send(json.loads(line), timeout=timeout)
                        except json.JSONDecodeError as exc:
                            raise typer.BadParameter(f"stdin line {n}: {exc}") from exc
            ch.flush(timeout)
    except _errors.ProcwireError as exc:
        typer.echo(f"procwire send: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def recv(url: Annotated[str, typer.Argument(help="Where to listen, e.g. tcp://127.0.0.1:5000")],
         count: Annotated[int, typer.Option("--count", "-n",
                                            help="Exit after this many messages (0: never).")]
         = 0,
         timeout: Annotated[float | None, typer.Option(
             help="Exit with status 1 after this many seconds without a message.")] = None,
         codec: Annotated[str, typer.Option(help="json, msgpack or raw")] = "json",
         auth: Annotated[str | None, typer.Option(envvar="PROCWIRE_AUTH",
                                                  help="Shared key (or $PROCWIRE_AUTH).")]
         = None) -> None:
    """Listen at URL and print every message from every client as one JSON line."""
    from . import listen

    lock = threading.Lock()
    done = threading.Event()
    state = {"seen": 0, "last": time.monotonic()}

    def serve(ch: Any) -> None:
        with ch:
            try:
                for msg in ch:
                    with lock:
                        if done.is_set():
                            return
                        print(_dump(msg), flush=True)
                        state["seen"] += 1
                        state["last"] = time.monotonic()
                        if count and state["seen"] >= count:
                            done.set()
                            return
            except _errors.ProcwireError as exc:
                print(f"procwire recv: {ch.remote_address}: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)

    try:
        server = listen(url, codec=codec, auth=auth)
    except _errors.ProcwireError as exc:
        typer.echo(f"procwire recv: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    print(f"listening on {server.address}", file=sys.stderr, flush=True)
    with server:
        while not done.is_set():
            if timeout is not None and time.monotonic() - state["last"] > timeout:
                typer.echo(f"procwire recv: no message for {timeout} s", err=True)
                raise typer.Exit(1)
            try:
                ch = server.accept(timeout=0.2 if timeout is None else min(timeout, 0.2))
            except _errors.Timeout:
                continue
            threading.Thread(target=serve, args=(ch,), daemon=True).start()
        # Accept is polled in short slices so --count and --timeout end it promptly.


@app.command()
def demo(json_out: Annotated[bool, typer.Option("--json", help="Print results as JSON.")]
         = False,
         messages: Annotated[int, typer.Option(help="Messages in each burst.")] = 20000) -> None:
    """Show messages flowing to a child process over each local transport, then a spawned
    child, a two-worker cluster, the event bus (local broker) and a SQLite work queue."""
    from ._demo import run_demo

    ok = run_demo(json_out=json_out, burst=messages)
    if not ok:
        raise typer.Exit(1)


bench_app = typer.Typer(
    name="bench", invoke_without_command=True,
    help="Measure procwire against the usual alternatives, in the same run. Without a suite "
    "name: the channel suite (procwire bench --quick). Suites: channels, children, bus, "
    "queues (benchmarks/README.md).")

# The options every suite shares, and the channel suite's, declared once (typer reads the
# Annotated metadata of each command's parameters).
_Quick = Annotated[bool, typer.Option("--quick", help="Fewer messages, 1 repetition.")]
_Reps = Annotated[int | None, typer.Option(help="Repetitions (default 3; 1 with --quick).")]
_Json = Annotated[str | None, typer.Option("--json", help="Write every measurement here as JSON.")]
_ChannelOnly = Annotated[list[str] | None, typer.Option(
    "--only", help="Glob of a method or test to run (repeatable), e.g. 'procwire_*'.")]
_Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No progress lines.")]


@bench_app.callback()
def _bench(ctx: typer.Context,
           quick: _Quick = False, reps: _Reps = None, json_path: _Json = None,
           only: _ChannelOnly = None, quiet: _Quiet = False) -> None:
    """Measure procwire against the usual alternatives in one run and print the tables and
    ratios. Without a suite name, runs the channel suite with these options."""
    if ctx.invoked_subcommand is not None:
        if quick or reps is not None or json_path or only or quiet:
            raise typer.BadParameter(
                f"put the options after the suite name: procwire bench "
                f"{ctx.invoked_subcommand} [OPTIONS]")
        return
    _run_channels(quick, reps, json_path, only, quiet)


def _common(quick: bool, reps: int | None, json_path: str | None) -> list[str]:
    argv: list[str] = []
    if quick:
        argv.append("--quick")
    if reps is not None:
        argv += ["--reps", str(reps)]
    if json_path:
        argv += ["--json", json_path]
    return argv


def _run_channels(quick: bool, reps: int | None, json_path: str | None,
                  only: list[str] | None, quiet: bool) -> None:
    from .bench import channels

    argv = _common(quick, reps, json_path)
    if only:
        argv += ["--only", *only]
    if quiet:
        argv.append("-q")
    raise typer.Exit(channels.main(argv))


@bench_app.command("channels")
def _bench_channels(
        quick: _Quick = False, reps: _Reps = None, json_path: _Json = None,
        only: _ChannelOnly = None, quiet: _Quiet = False) -> None:
    """Channels (unix, tcp, tls, udp) against raw sockets, pipes, multiprocessing, pyzmq and
    Node fork() IPC (the default suite)."""
    _run_channels(quick, reps, json_path, only, quiet)


@bench_app.command("children")
def _bench_children(
        quick: _Quick = False, reps: _Reps = None, json_path: _Json = None,
        only: Annotated[list[str] | None, typer.Option(
            "--only", help="Run only this method (repeatable): 'procwire py<->py', "
            "'mp.Pipe', 'node fork', 'procwire py<->node', 'raw socket py<->py', "
            "'procwire cluster relay', 'node cluster relay'.")] = None,
        paired: Annotated[int, typer.Option(
            "--paired", metavar="BATCHES", help="Instead: RTT of procwire py<->py, node fork "
            "and mp.Pipe in this many alternating batches of 1000 round trips.")] = 0) -> None:
    """Child processes and cluster relay: procwire py<->py and py<->node children and a
    two-worker Cluster against multiprocessing.Pipe, Node fork() and Node's cluster, plus a
    raw-socket floor (benchmarks/processes.md)."""
    from .bench import processes

    argv = _common(quick, reps, json_path)
    for name in only or []:
        argv += ["--only", name]
    if paired:
        argv += ["--paired", str(paired)]
    raise typer.Exit(processes.main(argv, prog="procwire bench children"))


@bench_app.command("bus")
def _bench_bus(
        quick: _Quick = False, reps: _Reps = None, json_path: _Json = None,
        only: Annotated[list[str] | None, typer.Option(
            "--only", help="Run only this method (repeatable): raw_redis, procwire_many, "
            "procwire_emit, broker_many, broker_emit, node_ioredis.")] = None,
        subs: Annotated[list[int] | None, typer.Option(
            "--subs", help="Subscriber count (repeatable; default 1, 4 and 16).")] = None
        ) -> None:
    """Event bus: procwire on Redis and on its local broker against redis-py and Node
    ioredis, 1 publisher to N subscriber processes, and request/reply. Starts its own
    redis-server (on PATH) on a free loopback port; the Node row needs the npm package
    ioredis (PROCWIRE_BENCH_NODE_MODULES=DIR/node_modules) (benchmarks/bus.md)."""
    from .bench import bus

    argv = _common(quick, reps, json_path)
    if only:
        argv += ["--only", *only]
    if subs:
        argv += ["--subs", *map(str, subs)]
    raise typer.Exit(bus.main(argv, prog="procwire bench bus"))


@bench_app.command("queues")
def _bench_queues(
        quick: _Quick = False, reps: _Reps = None, json_path: _Json = None,
        only: Annotated[str | None, typer.Option(
            "--only", help="Run one store's cases: sqlite or redis.")] = None,
        match: Annotated[str | None, typer.Option(
            "--match", help="Run only the rows whose system contains this text, e.g. "
            "'procwire sqlite FULL'.")] = None,
        single: Annotated[int | None, typer.Option(
            "--single", help="Jobs for one-at-a-time cases (default 3000; --quick: 1/10).")
            ] = None,
        batched: Annotated[int | None, typer.Option(
            "--batched", help="Jobs for batched cases (default 50000; --quick: 1/10).")] = None,
        rq_jobs: Annotated[int | None, typer.Option(
            "--rq-jobs", help="Jobs for RQ's workers (default 1000; --quick: 1/10).")] = None,
        redis: Annotated[str | None, typer.Option(
            "--redis", metavar="URL", help="Use this Redis (FLUSHDB before each case) instead "
            "of a private redis-server.")] = None,
        no_redis: Annotated[bool, typer.Option(
            "--no-redis", help="Skip the Redis cases.")] = False) -> None:
    """Work queues: procwire's SQLite and Redis queues against persist-queue, huey and RQ
    (optional: pip install huey persist-queue rq; a missing one is a skipped row with the
    hint). Starts its own redis-server (on PATH) on a free loopback port (benchmarks/queue.md)."""
    from .bench import queues

    argv = _common(quick, reps, json_path)
    for flag, value in (("--only", only), ("--match", match), ("--single", single),
                        ("--batched", batched), ("--rq-jobs", rq_jobs), ("--redis", redis)):
        if value is not None:
            argv += [flag, str(value)]
    if no_redis:
        argv.append("--no-redis")
    raise typer.Exit(queues.main(argv, prog="procwire bench queues"))


def _mount() -> None:
    from .bus import cli as bus_cli
    from .cluster.cli import cluster as cluster_command
    from .queue.cli import app as queue_app

    app.add_typer(queue_app, name="queue")
    app.add_typer(bench_app, name="bench")
    for command in (bus_cli.emit, bus_cli.listen, bus_cli.request, bus_cli.broker):
        app.command()(command)
    # Arguments after "--" belong to the workers' command line.
    app.command(context_settings={"allow_interspersed_args": False})(cluster_command)


_mount()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
