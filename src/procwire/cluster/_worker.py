"""The worker side of a cluster: ``worker()``."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from .._errors import ChannelClosed, ConnectionClosed, NoParentChannel, ProtocolError
from ..process import IpcChannel, parent
from . import _wire
from ._wire import KEY, Message

__all__ = ["Worker", "worker"]

#: How often a worker checks that its primary still runs (see ``worker``).
ORPHAN_CHECK = 0.5


class Worker:
    """This process as a worker of a ``procwire.Cluster`` (what ``worker()`` returns).

    ``id`` (1..N, the same after a restart), ``workers`` (N), ``listener`` (the cluster's shared
    listening socket, or None), ``send(msg)`` to the primary, ``send_to(other_id, msg)`` and
    ``broadcast(msg)`` (relayed by the primary), ``recv(timeout=)`` -> ``Message(sender, data)``
    (sender 0 is the primary), iteration until the primary goes away, ``ready()``.
    Thread-safe: any thread may send while another receives.
    """

    def __init__(self, channel: IpcChannel, worker_id: int, workers: int,
                 listener: socket.socket | None) -> None:
        self.channel = channel
        self.id = worker_id
        self.workers = workers
        self.listener = listener

    def send(self, msg: Any, *, timeout: float | None = None) -> None:
        """Send one JSON value to the primary (its ``recv`` / ``on_message`` get it).
        Waits only while the channel's write buffer is full, up to ``timeout``: ``Timeout``."""
        self.channel.send({KEY: _wire.MSG, "data": msg}, timeout=timeout)

    def send_to(self, worker_id: int, msg: Any, *, timeout: float | None = None) -> None:
        """Send one JSON value to worker ``worker_id`` (1..N; itself included), through the
        primary. A worker that is being restarted gets it once it is back (the primary keeps
        a bounded backlog); one that has stopped for good never does."""
        _wire.check_worker_id(worker_id, self.workers)
        self.channel.send({KEY: _wire.TO, "to": worker_id, "data": msg}, timeout=timeout)

    def broadcast(self, msg: Any, *, timeout: float | None = None) -> None:
        """Send one JSON value to every other worker, through the primary."""
        self.channel.send({KEY: _wire.ALL, "data": msg}, timeout=timeout)

    def ready(self, *, timeout: float | None = None) -> None:
        """Tell the primary this worker is ready (serving): ``Cluster(ready="ready")`` waits
        for this before it counts the worker as running, and ``reload()`` before it stops the
        worker this one replaces."""
        self.channel.send({KEY: _wire.READY}, timeout=timeout)

    def recv(self, timeout: float | None = None) -> Message:
        """The next message: ``Message(sender, data)``, sender 0 for the primary, else the
        worker that sent it. ``Timeout``; ``ConnectionClosed`` when the primary is gone."""
        while True:
            msg = decode(self.channel.recv(timeout))
            if msg is not None:
                return msg

    def __iter__(self) -> Iterator[Message]:
        """Messages until the primary closes the channel or goes away."""
        while True:
            try:
                yield self.recv()
            except (ConnectionClosed, ChannelClosed):
                return

    def __repr__(self) -> str:
        return f"<Worker {self.id}/{self.workers} pid={os.getpid()}>"


_lock = threading.Lock()
_worker: Worker | None = None
_worker_pid = 0


def worker(*, timeout: float = 10.0) -> Worker:
    """This process's place in its cluster (the same object on every call).

    Raises ``NoParentChannel`` in a process that a ``procwire.Cluster`` did not start. The
    first call reads the primary's greeting (the worker's id and the shared listening socket,
    waiting up to ``timeout``) and tells the primary the worker is online.

    When the primary dies without stopping its workers, a worker gets SIGTERM (its parent is
    checked every 0.5 s): nothing is left running.

    >>> w = worker()                              # doctest: +SKIP
    >>> w.send({"hello from": w.id})              # doctest: +SKIP
    """
    global _worker, _worker_pid
    with _lock:
        if _worker is not None and _worker_pid == os.getpid():
            return _worker
        raw = worker_env()
        ch = parent()
        obj, handle = ch.recv_with_handle(timeout)
        worker_id, workers = check_hello(obj, handle, raw)
        w = Worker(ch, worker_id, workers, handle)
        ch.send({KEY: _wire.ONLINE})
        watch_parent()
        _worker, _worker_pid = w, os.getpid()
        return w


def decode(obj: Any) -> Message | None:
    """A message from the primary as ``Message``; None for a control message (skipped)."""
    if type(obj) is dict and KEY in obj:
        if obj[KEY] == _wire.MSG:
            sender = obj.get("from", 0)
            return Message(sender if type(sender) is int else 0, obj.get("data"))
        return None  # a control message this version does not know
    return Message(_wire.PRIMARY, obj)


def worker_env() -> str:
    raw = os.environ.get(_wire.ID_ENV)
    if raw is None:
        raise NoParentChannel(f"this process is not a cluster worker ({_wire.ID_ENV} is "
                              "not set): start it with procwire.Cluster")
    return raw


def check_hello(obj: Any, handle: socket.socket | None, raw: str) -> tuple[int, int]:
    """``(id, workers)`` from the primary's greeting, else ``ProtocolError``."""
    worker_id = obj.get("id") if type(obj) is dict else None
    workers = obj.get("workers") if type(obj) is dict else None
    if (type(obj) is not dict or obj.get(KEY) != _wire.HELLO or type(worker_id) is not int
            or type(workers) is not int or str(worker_id) != raw):
        if handle is not None:
            handle.close()
        raise ProtocolError(f"the primary's first message is not a cluster greeting for "
                            f"{_wire.ID_ENV}={raw}: {obj!r:.200}")
    return worker_id, workers


def watch_parent() -> None:
    ppid = os.getppid()

    def watch() -> None:
        # A primary killed with SIGKILL cannot stop its workers; and a worker busy serving
        # sockets may never read its channel to notice. Re-parenting tells.
        while os.getppid() == ppid:
            time.sleep(ORPHAN_CHECK)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="procwire-orphan-check", daemon=True).start()
