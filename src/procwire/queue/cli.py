"""``procwire queue ...``: put, get, stats, dead, requeue, purge and work from the shell.

Mounted by the main CLI as ``procwire queue``; every command takes ``--url`` (default: the
SQLite file under the user's data folder, or ``$PROCWIRE_QUEUE_URL``).
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
import time
from typing import Annotated, Any

import typer

from .._errors import ProcwireError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Durable work queues: put, get, inspect and work through jobs.")

UrlOpt = Annotated[str | None, typer.Option(
    "--url", envvar="PROCWIRE_QUEUE_URL",
    help="sqlite:///path[?synchronous=normal] (default: the user's file), or redis://host:port/db"
         " / rediss://... for a Redis store.")]
# How long a command waits for its store (Redis reachable, the SQLite write lock) before it
# gives up with exit status 1, instead of the library's 30 s default.
STORE_TIMEOUT = 10.0
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=0.01,
    help="Seconds to wait for the store (Redis reachable, the SQLite write lock); then exit 1.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _queue(name: str, url: str | None, timeout: float, **kwargs: Any) -> Any:
    from ._queue import Queue

    try:
        return Queue(name, url, timeout=timeout, **kwargs)
    except (ValueError, ProcwireError) as exc:
        raise typer.BadParameter(str(exc)) from exc


def _fail(cmd: str, exc: BaseException) -> typer.Exit:
    typer.echo(f"procwire queue {cmd}: {type(exc).__name__}: {exc}", err=True)
    return typer.Exit(1)


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@app.command()
def put(name: Annotated[str, typer.Argument(help="Queue name.")],
        data: Annotated[str | None, typer.Argument(
            help="The job as JSON. Omit to put one job per JSON line of stdin (one batch).")]
        = None,
        url: UrlOpt = None,
        delay: Annotated[float, typer.Option(help="Seconds before it can be taken.")] = 0.0,
        priority: Annotated[int, typer.Option(help="Higher first.")] = 0,
        key: Annotated[str | None, typer.Option(help="Dedup key.")] = None,
        group: Annotated[str | None, typer.Option(help="FIFO group.")] = None,
        timeout: TimeoutOpt = STORE_TIMEOUT) -> None:
    """Add a job (or one per stdin line, atomically); prints the ids."""
    from ._queue import Item

    try:
        if data is not None:
            items = [json.loads(data)]
        else:
            items = [json.loads(line) for line in sys.stdin if line.strip()]
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}") from exc
    with _queue(name, url, timeout) as q:
        try:
            ids = q.put_many([Item(d, delay, priority, key, group) for d in items])
        except (ValueError, ProcwireError) as exc:
            raise _fail("put", exc) from exc
    for i in ids:
        typer.echo(i)


@app.command()
def get(name: Annotated[str, typer.Argument(help="Queue name.")], url: UrlOpt = None,
        n: Annotated[int, typer.Option("-n", help="Up to this many jobs.")] = 1,
        timeout: Annotated[float, typer.Option(
            min=0, help=f"Seconds to wait for a job (the store is waited for up to this or"
                        f" {STORE_TIMEOUT:g} s, whichever is longer).")] = 0.0,
        ack: Annotated[bool, typer.Option(help="Ack what was taken (--no-ack: leave it "
                                               "leased until the lease ends).")] = True,
        lease: Annotated[float, typer.Option(
            min=0.001, help="Lease seconds of the jobs taken: with --no-ack, they go back to"
                            " the queue after this.")] = 30.0
        ) -> None:
    """Take jobs and print them as JSON lines ({"id", "data", "attempts"}); exit 1 if none
    came (or the store did not answer: then with a message on stderr)."""
    with _queue(name, url, max(timeout, STORE_TIMEOUT)) as q:
        try:
            jobs = q.get_many(n, timeout=timeout, lease=lease)
            for j in jobs:
                typer.echo(_dump({"id": j.id, "data": j.data, "attempts": j.attempts}))
            if ack and jobs:
                q.ack_many(jobs)
            if not jobs:
                # None came: say so only if the store answers (a get that could not reach it
                # returns nothing too, and "no job" must not hide "no store").
                q.stats()
        except (ValueError, ProcwireError) as exc:
            raise _fail("get", exc) from exc
    if not jobs:
        raise typer.Exit(1)


@app.command()
def stats(name: Annotated[str, typer.Argument(help="Queue name.")], url: UrlOpt = None,
          json_out: JsonOpt = False, timeout: TimeoutOpt = STORE_TIMEOUT) -> None:
    """Jobs by state and totals."""
    with _queue(name, url, timeout) as q:
        try:
            s = q.stats()
        except ProcwireError as exc:
            raise _fail("stats", exc) from exc
    fields = ["ready", "delayed", "leased", "dead", "put", "acked", "retried", "expired",
              "failed"]
    if json_out:
        typer.echo(_dump({f: getattr(s, f) for f in fields}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"queue {name}")
    for f in fields:
        table.add_column(f, justify="right")
    table.add_row(*(str(getattr(s, f)) for f in fields))
    Console().print(table)


@app.command()
def dead(name: Annotated[str, typer.Argument(help="Queue name.")], url: UrlOpt = None,
         limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
         json_out: JsonOpt = False, timeout: TimeoutOpt = STORE_TIMEOUT) -> None:
    """List the dead letters with their last error."""
    with _queue(name, url, timeout) as q:
        try:
            rows = q.dead_letters(limit)
        except ProcwireError as exc:
            raise _fail("dead", exc) from exc
    if json_out:
        for d in rows:
            raw = d.raw.decode("utf-8", "replace") if isinstance(d.raw, bytes) else str(d.raw)
            typer.echo(_dump({"id": d.id, "data": d.data if d.data is not None else raw,
                              "attempts": d.attempts, "error": d.error}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dead letters of {name}")
    for col in ("id", "attempts", "error", "data"):
        table.add_column(col)
    for d in rows:
        table.add_row(str(d.id), str(d.attempts), d.error or "", _dump(d.data)[:80])
    Console().print(table)


@app.command()
def requeue(name: Annotated[str, typer.Argument(help="Queue name.")], url: UrlOpt = None,
            ids: Annotated[list[int] | None, typer.Option("--id", help="Only these ids.")]
            = None, timeout: TimeoutOpt = STORE_TIMEOUT) -> None:
    """Put dead letters back as ready jobs; prints how many."""
    with _queue(name, url, timeout) as q:
        try:
            typer.echo(q.requeue_dead(ids or None))
        except ProcwireError as exc:
            raise _fail("requeue", exc) from exc


@app.command()
def purge(name: Annotated[str, typer.Argument(help="Queue name.")], url: UrlOpt = None,
          dead_only: Annotated[bool, typer.Option("--dead-only",
                                                  help="Only the dead letters.")] = False,
          yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
          timeout: TimeoutOpt = STORE_TIMEOUT) -> None:
    """Delete every job of the queue (or only its dead letters); prints how many."""
    what = "the dead letters" if dead_only else "EVERY job"
    if not yes and not typer.confirm(f"Delete {what} of queue {name!r}?"):
        raise typer.Exit(1)
    with _queue(name, url, timeout) as q:
        try:
            typer.echo(q.purge(dead_only))
        except ProcwireError as exc:
            raise _fail("purge", exc) from exc


def _load(target: str) -> Any:
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise typer.BadParameter(f"{target!r}: expected pkg.module:function")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise typer.BadParameter(f"{target!r}: {exc}") from exc
    if not callable(obj):
        raise typer.BadParameter(f"{target!r} is not callable")
    return obj


@app.command()
def work(name: Annotated[str, typer.Argument(help="Queue name.")],
         target: Annotated[str, typer.Argument(help="pkg.module:function, called with each "
                                                    "job's data.")],
         url: UrlOpt = None,
         concurrency: Annotated[int, typer.Option("-c", "--concurrency",
                                                  help="Worker threads.")] = 1,
         lease: Annotated[float, typer.Option(help="Lease seconds (renewed while running).")]
         = 30.0,
         max_jobs: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
         idle_timeout: Annotated[float | None, typer.Option(
             help="Stop after this many seconds without a job.")] = None,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress line.")]
         = False, timeout: TimeoutOpt = STORE_TIMEOUT) -> None:
    """Run a function on every job: ack on return, retry with backoff on exception. Exits 1
    if the store does not answer at the start; once running, waits out store outages."""
    if concurrency < 1:
        raise typer.BadParameter("-c must be >= 1")
    sys.path.insert(0, "")
    fn = _load(target)
    start = time.monotonic()
    last = [0.0]
    lock = threading.Lock()
    err = sys.stderr

    def show(r: Any, now: float) -> None:
        rate = r.acked / max(now - start, 1e-9)
        err.write(f"\r{name}: {r.acked} done, {r.failed} failed, {r.lost} lost"
                  f" ({rate:,.0f}/s)   ")
        err.flush()

    def progress(r: Any) -> None:
        now = time.monotonic()
        with lock:
            if now - last[0] < 0.25:
                return
            last[0] = now
            show(r, now)

    with _queue(name, url, timeout, lease=lease) as q:
        try:
            # A store that does not answer at the start is an error; once running, the
            # workers ride out an outage (a Redis restart) and carry on.
            q.stats()
            result = q.process(fn, concurrency=concurrency, max_jobs=max_jobs,
                               idle_timeout=idle_timeout,
                               on_done=None if quiet else progress)
        except KeyboardInterrupt:
            typer.echo("\ninterrupted", err=True)
            raise typer.Exit(130) from None
        except ProcwireError as exc:
            raise _fail("work", exc) from exc
    if not quiet:
        show(result, time.monotonic())  # the final tally (the last line shown may be older)
        err.write("\n")
    typer.echo(_dump({"acked": result.acked, "failed": result.failed, "lost": result.lost}))
