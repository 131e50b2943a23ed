"""``procwire emit / listen / request / broker``: the bus from the command line (a typer app
the main CLI mounts). Events print as JSON lines: ``{"event": name, "data": data}``. Without
``--url`` the commands use this user's local broker (started in the background if none runs).

    procwire listen 'user.*'
    procwire emit user.created '{"id": 1}'
    procwire request add '{"x": 1, "y": 2}' --url redis://127.0.0.1:6379/0
    procwire broker --status
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import deque
from typing import Annotated, Any

import typer

from .._errors import ConnectionRefused, ProcwireError, Timeout
from ._bus import Bus
from ._core import Event
from ._patterns import RESERVED_PREFIX, Matcher

__all__ = ["app"]

app = typer.Typer(help="The event bus: emit, listen, request.", no_args_is_help=True)

UrlOpt = Annotated[str | None, typer.Option(
    "--url", envvar="PROCWIRE_BUS_URL",
    help="bus URL (redis://..., broker:///path.sock; default: the local broker)")]
ChannelOpt = Annotated[str, typer.Option("--channel", help="Redis channel name")]


def _data(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}") from exc


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@app.command()
def emit(event: str, data: Annotated[str | None, typer.Argument(help="JSON")] = None,
         url: UrlOpt = None, channel: ChannelOpt = "procwire",
         timeout: float = 5.0) -> None:
    """Publish one event."""
    value = _data(data)
    try:
        with Bus(url, channel=channel, timeout=timeout) as bus:
            n = bus.emit(event, value, timeout=timeout, confirm=True)
    except (ProcwireError, ValueError, TypeError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"delivered to {n} bus(es)", err=True)


class _Merged:
    """The events of several handler subscriptions in one bounded buffer (the oldest dropped
    when it is full, like the ``drop_oldest`` subscriptions feeding it)."""

    def __init__(self, maxsize: int) -> None:
        self._buf: deque[Event] = deque(maxlen=maxsize)
        self._cond = threading.Condition()

    def put(self, name: str, data: Any) -> None:
        with self._cond:
            self._buf.append(Event(name, data))
            self._cond.notify()

    def get(self, timeout: float | None) -> Event:
        with self._cond:
            if not self._cond.wait_for(lambda: self._buf, timeout):
                raise Timeout(f"no event in {timeout} s")
            return self._buf.popleft()


@app.command()
def listen(patterns: Annotated[list[str] | None, typer.Argument(
               help="glob patterns (default: *); the bus's own notices (procwire.gap, "
                    "procwire.bad_message) only match patterns that start with procwire.")
           ] = None,
           url: UrlOpt = None, channel: ChannelOpt = "procwire",
           count: Annotated[int, typer.Option(
               min=0, help="stop after this many (0: never)")] = 0,
           timeout: Annotated[float | None, typer.Option(
               help="stop after this many idle seconds")] = None) -> None:
    """Print matching events as JSON lines (default pattern: everything)."""
    try:
        with Bus(url, channel=channel) as bus:
            wanted = patterns or ["*"]
            sub: Any
            if len(wanted) == 1:
                sub, keep = bus.subscribe(wanted[0], policy="drop_oldest"), None
            else:
                # Several patterns: everything, filtered here. "*" never matches a notice
                # (procwire.*), so the notices come from a "procwire.*" subscription of their
                # own when a pattern asks for them; the two never see the same event.
                keep = [Matcher(p) for p in wanted]
                groups = sorted({"procwire.*" if p.startswith(RESERVED_PREFIX) else "*"
                                 for p in wanted})
                if len(groups) == 1:
                    sub = bus.subscribe(groups[0], policy="drop_oldest")
                else:  # both: one buffer fed by two handlers
                    sub = _Merged(bus.maxsize)
                    for group in groups:
                        bus.on(group, sub.put, policy="drop_oldest", with_event=True)
            sys.stderr.write("listening\n")
            sys.stderr.flush()
            seen = 0
            while count == 0 or seen < count:
                try:
                    ev = sub.get(timeout=timeout)
                except Timeout:
                    break
                if keep is not None and not any(m.matches(ev.name) for m in keep):
                    continue
                sys.stdout.write(json.dumps({"event": ev.name, "data": ev.data}) + "\n")
                sys.stdout.flush()
                seen += 1
    except (ProcwireError, ValueError, TypeError) as exc:
        raise _fail(exc) from exc


@app.command()
def request(name: str, data: Annotated[str | None, typer.Argument(help="JSON")] = None,
            url: UrlOpt = None, channel: ChannelOpt = "procwire",
            timeout: float = 5.0) -> None:
    """Send a request and print the reply as JSON."""
    value = _data(data)
    try:
        with Bus(url, channel=channel, timeout=timeout) as bus:
            reply = bus.request(name, value, timeout=timeout)
    except (ProcwireError, ValueError, TypeError) as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps(reply))


def _status(path: str, as_json: bool, timeout: float) -> None:
    from urllib.parse import quote

    try:
        with Bus(f"broker://{quote(path)}?autostart=0", timeout=timeout) as bus:
            backend: Any = bus._backend
            info = backend.broker_stats(timeout)
    except ConnectionRefused as exc:
        typer.echo(f"no broker runs on {path} ({exc})", err=True)
        raise typer.Exit(1) from exc
    except ProcwireError as exc:
        raise _fail(exc) from exc
    me = os.getpid()
    info["clients"] = [c for c in info.get("clients", []) if c.get("pid") != me]
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    tot, rates = info["totals"], info["rates"]
    idle = info["idle_exit"]
    typer.echo(f"broker pid {info['pid']} on {info['socket']}, up {info['uptime']:.0f} s, "
               f"idle exit {f'after {idle:g} s' if idle > 0 else 'never'}, policy "
               f"{info['policy']} (queue {info['max_queue']})")
    typer.echo(f"rates (last ~5 s): {rates['events_in']:g} events/s in, "
               f"{rates['deliveries']:g} deliveries/s, {rates['requests']:g} requests/s")
    typer.echo("totals: " + ", ".join(f"{k} {v}" for k, v in tot.items()))
    clients = info["clients"]
    typer.echo(f"{len(clients)} client(s)")
    if clients:
        head = ("id", "pid", "name", "channel", "patterns", "handles", "queued", "dropped",
                "events_in", "delivered")
        rows = [(str(c["id"]), str(c["pid"]), c["name"][:28], str(c["channel"]),
                 ",".join(c["patterns"])[:30], ",".join(c["handles"])[:20], str(c["queued"]),
                 str(c["dropped"]), str(c["events_in"]), str(c["delivered"]))
                for c in clients]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        for r in (head, *rows):
            typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def broker(
        status: Annotated[bool, typer.Option("--status", help="show the running broker's "
                                             "clients, counters and rates")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="with --status: JSON")] = False,
        socket: Annotated[str | None, typer.Option(
            "--socket", envvar="PROCWIRE_BROKER",
            help="socket path (default: $XDG_RUNTIME_DIR/procwire/broker.sock or "
                 "/tmp/procwire-UID/broker.sock)")] = None,
        idle: Annotated[float, typer.Option(
            help="exit after this many seconds without clients (0: never)")] = 0.0,
        max_queue: Annotated[int, typer.Option(help="frames queued per client")] = 10_000,
        policy: Annotated[str, typer.Option(
            help="a slow client's full queue: drop_oldest or disconnect")] = "drop_oldest",
        timeout: Annotated[float, typer.Option(
            help="with --status: seconds to wait for the running broker (connecting, then "
                 "its answer)")] = 5.0) -> None:
    """Run the local bus broker in the foreground (or --status: report on the running one)."""
    import logging

    from ._broker import BROKER_POLICIES, LOCK_TAKEN, serve
    from ._paths import BrokerFiles, default_socket_path

    try:
        files = BrokerFiles(os.path.abspath(socket) if socket else default_socket_path())
    except ProcwireError as exc:
        raise _fail(exc) from exc
    if status:
        _status(files.socket, as_json, timeout)
        return
    if policy not in BROKER_POLICIES:
        raise typer.BadParameter(f"policy must be one of {', '.join(BROKER_POLICIES)}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        rc = serve(files.socket, idle=idle, max_queue=max_queue, policy=policy)
    except ProcwireError as exc:
        raise _fail(exc) from exc
    if rc == LOCK_TAKEN:
        pid = files.read_pid()
        typer.echo(f"error: a broker already runs on {files.socket}"
                   + (f" (pid {pid})" if pid else ""), err=True)
    if rc:
        raise typer.Exit(rc)


app.command()(broker)


if __name__ == "__main__":
    app()
