"""``stdio://``: a channel over this process's own stdin and stdout, speaking JSON lines.

For a program started by another one (``procwire.spawn(cmd, channel="stdio")``, a shell
pipeline, any language's ``subprocess``): ``procwire.connect("stdio://")`` reads messages from
stdin and writes them to stdout, one compact JSON value per line (see
``procwire.protocol.lines`` for what is accepted from naive writers).

Taking stdio over: the channel gets private duplicates of fd 0 and fd 1; then fd 0 is pointed
at ``/dev/null`` (a stray ``input()`` sees end of file instead of eating messages) and fd 1 at
stderr, and ``sys.stdout`` is set to ``sys.stderr``, so a stray ``print()`` (or a library
writing to stdout, or a child process inheriting fd 1) cannot corrupt the message stream: it
shows up on stderr. Output Python had buffered for stdout before ``connect`` goes to stderr as
well. This lasts for the life of the process; one ``stdio://`` channel per process.

``open_pipes(read_fd, write_fd, opts)`` (and ``aopen_pipes``) give the same stream over any
pair of fds, e.g. a child's stdout and stdin pipes in the parent.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, cast

from .._errors import AddressError
from .._url import Address
from ..protocol.lines import JsonLines
from ._pipewire import PipePairTransport, PipeWire
from ._sockstream import AsyncFramedStream, FramedStream, SocketWire
from .base import TransportOptions

__all__ = ["aopen_pipes", "open_pipes"]

LOCAL_ONLY = True
#: Codecs that fit a text line protocol (binary msgpack/pickle payloads may hold a newline).
#: For the channel layer to check; this module never sees the codec.
CODECS = ("json", "raw")

_take_lock = threading.Lock()
_taken = False


def open_pipes(read_fd: int, write_fd: int, opts: TransportOptions | None = None, *,
               local_address: str = "stdio://", remote_address: str = "stdio://"
               ) -> FramedStream:
    """A blocking JSON-lines message stream reading ``read_fd`` and writing ``write_fd``.

    Takes ownership of both fds (the stream closes them). They may be pipes, a tty or a
    socket, and the same fd for both ways. In a parent talking to a child::

        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        stream = open_pipes(os.dup(proc.stdout.fileno()), os.dup(proc.stdin.fileno()))
        ch = procwire.Channel(stream, procwire.codecs.get_codec("json"))
    """
    opts = opts or TransportOptions()
    wire = PipeWire(read_fd, write_fd)
    # FramedStream is typed for SocketWire; PipeWire has the same methods.
    return FramedStream(cast(SocketWire, wire), opts, local_address=local_address,
                        remote_address=remote_address, framing=JsonLines(opts.max_frame_size))


async def aopen_pipes(read_fd: int, write_fd: int, opts: TransportOptions | None = None, *,
                      local_address: str = "stdio://", remote_address: str = "stdio://"
                      ) -> AsyncFramedStream:
    """The asyncio twin of ``open_pipes`` (pipes, a tty or a socket; not a regular file)."""
    opts = opts or TransportOptions()
    stream = AsyncFramedStream(opts, framing=JsonLines(opts.max_frame_size))
    transport = await PipePairTransport.open(read_fd, write_fd, stream.protocol())
    stream.attach(transport, local_address, remote_address)
    return stream


def _take_stdio() -> tuple[int, int]:
    """Private duplicates of fd 0 and 1; fd 0 then reads /dev/null and fd 1 goes to stderr."""
    global _taken
    with _take_lock:
        if _taken:
            raise AddressError("stdin/stdout already carry a stdio:// channel in this process")
        try:
            rfd = os.dup(0)
        except OSError as exc:
            raise AddressError(f"stdio://: no stdin to read ({exc.strerror})") from exc
        try:
            wfd = os.dup(1)
        except OSError as exc:
            os.close(rfd)
            raise AddressError(f"stdio://: no stdout to write ({exc.strerror})") from exc
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, 0)
            try:
                os.dup2(2, 1)
            except OSError:
                os.dup2(null, 1)  # no stderr either: stray output goes nowhere
        finally:
            os.close(null)
        # Whatever Python still buffers for stdout now drains to fd 1, i.e. to stderr.
        for f in (sys.stdout, sys.__stdout__):
            try:
                if f is not None:
                    f.flush()
            except (OSError, ValueError):
                pass
        if sys.stderr is not None:
            sys.stdout = sys.stderr
        _taken = True
    return rfd, wfd


def _check(addr: Address) -> None:
    if addr.path:
        raise AddressError(f"{addr.url!r}: stdio:// takes no path (it is this process's "
                           f"stdin and stdout)")


def connect(addr: Address, opts: TransportOptions, timeout: float | None) -> FramedStream:
    _check(addr)
    rfd, wfd = _take_stdio()
    return open_pipes(rfd, wfd, opts, local_address="stdio://", remote_address="stdio://")


async def aconnect(addr: Address, opts: TransportOptions,
                   timeout: float | None) -> AsyncFramedStream:
    _check(addr)
    rfd, wfd = _take_stdio()
    return await aopen_pipes(rfd, wfd, opts, local_address="stdio://",
                             remote_address="stdio://")


def listen(addr: Address, opts: TransportOptions) -> Any:
    raise AddressError("stdio:// is this process's own stdin/stdout: connect() to it; "
                       "there is nothing to listen on")


async def alisten(addr: Address, opts: TransportOptions) -> Any:
    listen(addr, opts)
