"""Children with a message channel (blocking API): ``spawn``, ``Child``, ``parent``."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from .._errors import ChannelClosed, ConnectionClosed, Timeout
from ..protocol.framing import DEFAULT_MAX_FRAME_SIZE
from ..transports.base import DEFAULT_INBOX, DEFAULT_WRITE_BUFFER, TransportOptions
from ..transports.stdio import _take_stdio, open_pipes
from ._channel import IpcChannel, node_stream
from ._errors import ChildExited, NoParentChannel, StartFailed
from ._launch import Target, adopt_parent_fd, build_argv, launch

__all__ = ["Child", "parent", "spawn"]

#: How long a receiver that saw the channel close waits for the child's exit status.
EXIT_GRACE = 1.0


def exited_error(proc: subprocess.Popen[bytes], exc: ConnectionClosed, returncode: int | None,
                 start_error: tuple[str, str] | None = None) -> ConnectionClosed:
    if returncode is None:
        return exc
    err: ChildExited
    if start_error is not None:
        err = start_failed(f"child {proc.pid}", start_error, returncode, proc.pid)
    else:
        how = (f"was killed by {_signame(-returncode)}" if returncode < 0
               else f"exited with code {returncode}")
        err = ChildExited(f"child {proc.pid} {how}", returncode=returncode, pid=proc.pid)
    err.__cause__ = exc
    return err


def start_failed(who: str, start_error: tuple[str, str], returncode: int, pid: int,
                 worker_id: int | None = None, tail: str = "") -> StartFailed:
    target, error = start_error
    return StartFailed(f"{who} could not start {target}: {error} (exit status {returncode}; "
                       f"the traceback is on its stderr){tail}", returncode=returncode,
                       pid=pid, target=target, error=error, worker_id=worker_id)


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class Child:
    """A child process and its message channel (what ``spawn`` returns).

    Messaging: ``send(msg, handle=None)``, ``recv(timeout=)``, ``recv_with_handle()``,
    iteration (until the child closes its channel or exits). When the child exits, ``recv``
    raises ``ChildExited`` (a ``ConnectionClosed``) carrying its ``returncode``, after every
    message it sent. Process: ``pid``, ``returncode``, ``wait(timeout=)``, ``terminate()``,
    ``kill()``; ``stop(timeout=)`` (also on leaving a ``with`` block) closes the channel,
    waits, then terminates and kills: no process and no zombie is left.
    """

    def __init__(self, proc: subprocess.Popen[bytes], channel: IpcChannel) -> None:
        self._proc = proc
        self.channel = channel

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has ended and was reaped (negative: the signal that
        killed it), else None. Reading it reaps an ended child."""
        return self._proc.poll()

    @property
    def args(self) -> Any:
        return self._proc.args

    # -- messaging ----------------------------------------------------------------------------
    def send(self, msg: Any, *, handle: Any = None, timeout: float | None = None) -> None:
        """Send one JSON value, optionally with a socket (see ``IpcChannel.send``)."""
        try:
            self.channel.send(msg, handle=handle, timeout=timeout)
        except ConnectionClosed as exc:
            raise self._exited(exc) from None

    def recv(self, timeout: float | None = None) -> Any:
        """The next message; ``ChildExited`` once the child has exited and everything it sent
        was received (``ConnectionClosed`` if it only closed its channel)."""
        try:
            return self.channel.recv(timeout)
        except ChannelClosed:
            raise
        except ConnectionClosed as exc:
            raise self._exited(exc) from None

    def recv_with_handle(self, timeout: float | None = None) -> tuple[Any, socket.socket | None]:
        """The next message and the socket passed with it, if any."""
        try:
            return self.channel.recv_with_handle(timeout)
        except ChannelClosed:
            raise
        except ConnectionClosed as exc:
            raise self._exited(exc) from None

    def _exited(self, exc: ConnectionClosed) -> ConnectionClosed:
        if isinstance(exc, ChildExited):
            return exc
        try:
            rc: int | None = self._proc.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            rc = None  # it closed the channel and goes on running
        return exited_error(self._proc, exc, rc, self.channel.start_error)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield self.recv()
            except (ConnectionClosed, ChannelClosed):
                return

    def close(self, timeout: float | None = 10.0) -> None:
        """Close the channel (flushing first, up to ``timeout``): a procwire child's ``recv``
        raises ``ConnectionClosed``, a Node child gets 'disconnect'. The process is not
        touched."""
        self.channel.close(timeout)

    # -- process ------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit (and reap it); returns its exit status. ``Timeout``."""
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Timeout(f"child {self.pid} still running after {timeout} s") from None

    def terminate(self) -> None:
        """SIGTERM (nothing happens if it already ended)."""
        if self._proc.poll() is None:
            self._proc.terminate()

    def kill(self) -> None:
        """SIGKILL (nothing happens if it already ended)."""
        if self._proc.poll() is None:
            self._proc.kill()

    def stop(self, timeout: float = 5.0) -> int:
        """End the child for sure: close the channel (a well-behaved child exits then), wait
        up to ``timeout``, SIGTERM, wait up to ``timeout`` again, SIGKILL. Returns its exit
        status; idempotent."""
        try:
            self.channel.close(timeout)
        except (Timeout, ConnectionClosed, OSError):
            pass
        for step in (None, self._proc.terminate, self._proc.kill):
            if self._proc.poll() is not None:
                break
            if step is not None:
                step()
            try:
                self._proc.wait(timeout if step is not self._proc.kill else None)
            except subprocess.TimeoutExpired:
                continue
        rc = self._proc.wait()
        return rc

    def __enter__(self) -> Child:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        rc = self._proc.poll()
        state = "running" if rc is None else f"exited {rc}"
        return f"<Child pid={self.pid} {state} {self._proc.args!r}>"


def spawn(target: Target, *args: Any, channel: str = "node", env: dict[str, str] | None = None,
          cwd: Any = None, executable: str | None = None,
          max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
          write_buffer: int = DEFAULT_WRITE_BUFFER, **popen_kwargs: Any) -> Child:
    """Start a child process with a message channel.

    ``target`` is a command list (``["node", "worker.js"]``, ``["python", "w.py"]``), a
    module-level Python function (run as ``fn(*args)`` in a fresh interpreter: ``args`` travel
    as JSON; no ``os.fork``), or ``"pkg.module:function"``.

    ``channel="node"`` (default): Node's IPC protocol on a socketpair named by
    ``NODE_CHANNEL_FD``, so a Node child's ``process.send`` / ``process.on('message')`` work,
    and a Python child calls ``procwire.parent()``; sockets can be passed (``handle=``).
    ``channel="stdio"``: JSON lines on the child's stdin/stdout, for any program.

    ``env`` replaces the environment (default: this process's); ``stderr`` (and for the
    node channel ``stdin``/``stdout``) pass through unless given, like any other
    ``subprocess.Popen`` keyword. Raises ``OSError`` when the program cannot be started.

    >>> child = spawn(["node", "-e", "process.on('message', m => process.send(m))"])
    ... # doctest: +SKIP
    """
    argv = build_argv(target, args, executable)
    launched = launch(argv, channel=channel, env=env, cwd=cwd, popen_kwargs=popen_kwargs)
    opts = TransportOptions(max_frame_size=max_frame_size, write_buffer=write_buffer,
                            inbox=DEFAULT_INBOX)
    name = f"child://{launched.proc.pid}"
    try:
        if launched.sock is not None:
            stream, wire = node_stream(launched.sock, opts, local_address="parent://",
                                       remote_address=name)
            ch = IpcChannel(stream, wire, max_frame_size=max_frame_size)
        else:
            assert launched.read_fd is not None and launched.write_fd is not None
            pstream = open_pipes(launched.read_fd, launched.write_fd, opts,
                                 local_address="parent://", remote_address=name)
            ch = IpcChannel(pstream, None, max_frame_size=max_frame_size)
    except BaseException:
        launched.proc.kill()
        launched.proc.wait()
        raise
    return Child(launched.proc, ch)


_parent_lock = threading.Lock()
_parent: IpcChannel | None = None
_parent_pid = 0
_adopted = ""  # "", or which API took the channel ("blocking" / "asyncio")
_adopted_pid = 0


def claim_parent(api: str) -> tuple[str, socket.socket | None]:
    """Take this process's parent channel for ``api``; once per process."""
    global _adopted, _adopted_pid
    if _adopted and _adopted_pid == os.getpid():
        raise NoParentChannel(f"the parent channel is already open with the {_adopted} API "
                              "in this process; use that one")
    kind, sock = adopt_parent_fd()
    _adopted, _adopted_pid = api, os.getpid()
    return kind, sock


def parent(*, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
           write_buffer: int = DEFAULT_WRITE_BUFFER) -> IpcChannel:
    """The channel to the parent process, inside a child started by ``procwire.spawn`` or
    Node's ``child_process.fork`` (the same channel on every call).

    Raises ``NoParentChannel`` in a process that has none. When the parent dies or closes the
    channel, ``recv`` raises ``ConnectionClosed`` and iteration ends: a child written as
    ``for msg in parent(): ...`` then returns from its loop and exits. Messages still queued
    when the interpreter exits are flushed (up to 5 s) first.

    >>> ch = parent()                                   # doctest: +SKIP
    >>> for msg in ch: ch.send({"echo": msg})           # doctest: +SKIP
    """
    global _parent, _parent_pid
    with _parent_lock:
        if _parent is not None and _parent_pid == os.getpid():
            return _parent
        if _parent is not None:
            raise NoParentChannel(f"the parent channel belongs to process {_parent_pid}, "
                                  "which forked this one; a forked process has no parent "
                                  "channel of its own")
        kind, sock = claim_parent("blocking")
        opts = TransportOptions(max_frame_size=max_frame_size, write_buffer=write_buffer)
        if kind == "stdio":
            rfd, wfd = _take_stdio()
            ch = IpcChannel(open_pipes(rfd, wfd, opts, local_address="stdio://",
                                       remote_address="parent://"), None,
                            max_frame_size=max_frame_size)
        else:
            assert sock is not None
            stream, wire = node_stream(sock, opts, local_address="child://",
                                       remote_address="parent://")
            ch = IpcChannel(stream, wire, max_frame_size=max_frame_size)
        _parent, _parent_pid = ch, os.getpid()
        atexit.register(_close_parent, ch)
        return ch


def _close_parent(ch: IpcChannel) -> None:
    # Daemon flusher threads die with the interpreter: deliver what is queued first.
    if os.getpid() != _parent_pid:
        return
    try:
        ch.close(5.0)
    except Exception:
        pass
