"""``procwire cluster -n 4 pkg.mod:func``: run a supervised cluster in the foreground.

The main CLI mounts the ``cluster`` command function; ``app`` runs it alone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Annotated, Any

import typer

from .._errors import ProcwireError, Timeout

app = typer.Typer(add_completion=False)


def _status(cluster: Any, rate: float) -> str:
    workers = cluster.workers
    running = sum(w.state == "running" for w in workers)
    restarts = sum(w.restarts for w in workers)
    odd = [f"{w.id}:{w.state}" for w in workers if w.state != "running"]
    extra = f" ({', '.join(odd)})" if odd else ""
    return (f"workers {running}/{len(workers)} running{extra} · restarts {restarts} · "
            f"{rate:.1f} msg/s")


@app.command()
def cluster(
    target: Annotated[list[str], typer.Argument(
        help="'pkg.module:function' (run in each worker), or a command: put it after '--' "
             "(e.g. -- node worker.js).")],
    workers: Annotated[int, typer.Option("-n", "--workers", min=1,
                                         help="Number of workers.")] = os.cpu_count() or 1,
    restart: Annotated[str, typer.Option(help="on-failure | always | never")] = "on-failure",
    listen: Annotated[str | None, typer.Option(
        help="Share one port: tcp://127.0.0.1:8000 (workers get it as worker().listener).")]
        = None,
    ready: Annotated[str | None, typer.Option(
        help="spawn | online | ready: when a worker counts as running.")] = None,
    max_restarts: Annotated[int, typer.Option(help="Crash-loop limit per worker...")] = 5,
    restart_window: Annotated[float, typer.Option(help="...within this many seconds.")] = 60.0,
    stop_timeout: Annotated[float, typer.Option(
        help="Seconds between SIGTERM and SIGKILL when stopping.")] = 5.0,
    duration: Annotated[float | None, typer.Option(
        help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="Do not print worker messages.")] = False,
) -> None:
    """Run a cluster in the foreground: workers are supervised and restarted, their messages
    print as JSON lines on stdout, a status line (workers, restarts, messages/s) on stderr.
    Ctrl-C (or SIGTERM) stops it gracefully; SIGHUP reloads the workers one by one."""
    from ._cluster import Cluster
    from ._errors import CrashLoop

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current folder
    tgt: Any = target[0] if len(target) == 1 and ":" in target[0] else list(target)
    try:
        cl = Cluster(tgt, workers=workers, restart=restart,  # type: ignore[arg-type]
                     listen=listen, ready=ready,  # type: ignore[arg-type]
                     max_restarts=max_restarts, restart_window=restart_window,
                     stop_timeout=stop_timeout)
    except (ValueError, TypeError, ProcwireError) as exc:
        raise typer.BadParameter(str(exc)) from exc

    reload_wanted = [False]

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def on_hup(signum: int, frame: Any) -> None:
        reload_wanted[0] = True

    old_term = signal.signal(signal.SIGTERM, on_term)
    old_hup = signal.signal(signal.SIGHUP, on_hup)
    tty = sys.stderr.isatty()
    code = 0
    try:
        cl.start(timeout=60)
        where = f" on {listen.rsplit(':', 1)[0]}:{cl.address[1]}" if cl.address and listen \
            else ""
        pids = " ".join(f"{w.id}:{w.pid}" for w in cl.workers)
        typer.echo(f"procwire cluster: {workers} workers{where} (pids {pids}); "
                   "Ctrl-C stops, SIGHUP reloads", err=True)
        end = None if duration is None else time.monotonic() + duration
        last_status, last_count, last_t, shown = 0.0, 0, time.monotonic(), ""
        while end is None or time.monotonic() < end:
            if reload_wanted[0]:
                reload_wanted[0] = False
                cl.reload()
                typer.echo("procwire cluster: reloaded", err=True)
            try:
                msg = cl.recv(timeout=0.25)
                if not quiet:
                    sys.stdout.write(json.dumps({"worker": msg.sender, "data": msg.data},
                                                ensure_ascii=False) + "\n")
                    sys.stdout.flush()
            except Timeout:
                pass
            now = time.monotonic()
            if now - last_status >= 0.5:
                count = cl.stats()["received"]
                line = _status(cl, (count - last_count) / (now - last_t))
                last_status, last_count, last_t = now, count, now
                if tty:
                    sys.stderr.write("\r\033[K" + line)
                    sys.stderr.flush()
                elif line != shown:
                    typer.echo(line, err=True)
                shown = line
            if cl.error is not None or all(w.state == "stopped" for w in cl.workers):
                cl.wait(timeout=30)  # raises CrashLoop if that is why
                break
    except KeyboardInterrupt:
        pass
    except CrashLoop as exc:
        typer.echo(f"\nprocwire cluster: {exc}", err=True)
        code = 1
    except ProcwireError as exc:
        typer.echo(f"\nprocwire cluster: {type(exc).__name__}: {exc}", err=True)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
        if tty:
            sys.stderr.write("\n")
        typer.echo("procwire cluster: stopping", err=True)
        try:
            cl.stop()
        except KeyboardInterrupt:  # a second Ctrl-C: stop harder
            cl.stop(timeout=0)
        typer.echo("procwire cluster: stopped", err=True)
    if code:
        raise typer.Exit(code)


if __name__ == "__main__":
    app()
