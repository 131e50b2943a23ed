"""``procwire emit / listen / request``: the bus from the command line (a typer app the main CLI
mounts). Events print as JSON lines: ``{"event": name, "data": data}``.

    procwire listen 'user.*' --url redis://127.0.0.1:6379/0
    procwire emit user.created '{"id": 1}' --url redis://127.0.0.1:6379/0
    procwire request add '{"x": 1, "y": 2}' --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from .._errors import ProcwireError, Timeout
from ._bus import Bus
from ._patterns import Matcher

__all__ = ["app"]

app = typer.Typer(help="The event bus: emit, listen, request.", no_args_is_help=True)

UrlOpt = Annotated[str | None, typer.Option("--url", envvar="PROCWIRE_BUS_URL",
                                            help="bus URL (memory://, redis://...)")]
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
            n = bus.emit(event, value, timeout=timeout)
    except (ProcwireError, ValueError, TypeError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"delivered to {n} bus(es)", err=True)


@app.command()
def listen(patterns: Annotated[list[str] | None, typer.Argument()] = None,
           url: UrlOpt = None, channel: ChannelOpt = "procwire",
           count: Annotated[int, typer.Option(help="stop after this many (0: never)")] = 0,
           timeout: Annotated[float | None, typer.Option(
               help="stop after this many idle seconds")] = None) -> None:
    """Print matching events as JSON lines (default pattern: everything)."""
    try:
        with Bus(url, channel=channel) as bus:
            wanted = patterns or ["*"]
            if len(wanted) == 1:
                sub, keep = bus.subscribe(wanted[0], policy="drop_oldest"), None
            else:  # several patterns: everything, filtered here
                sub = bus.subscribe("*", policy="drop_oldest")
                keep = [Matcher(p) for p in wanted]
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


if __name__ == "__main__":
    app()
