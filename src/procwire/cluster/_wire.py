"""The cluster's messages on each primary/worker channel, sans-IO.

Every message the primary and a procwire worker exchange is one JSON object whose ``"procwire"``
key names its kind, so that the channel stays Node's plain IPC protocol (a Node worker can take
part by sending and reading these objects)::

    primary -> worker   {"procwire": "hello", "id": 2, "workers": 4}   first, once; the shared
                                                                       listening socket, if any,
                                                                       travels with it
                        {"procwire": "msg", "from": 0, "data": ...}    0: the primary; else the
                                                                       worker that sent it
    worker -> primary   {"procwire": "online"}                         worker() was called
                        {"procwire": "ready"}                          the worker serves
                        {"procwire": "msg", "data": ...}               to the primary
                        {"procwire": "to", "to": 3, "data": ...}       relayed to worker 3
                        {"procwire": "all", "data": ...}               relayed to every other one

A worker message that is not such an object (a Node worker's plain ``process.send(42)``) is a
message to the primary. Objects of an unknown kind are dropped (and logged), so that a newer
peer may add kinds.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["COUNT_ENV", "ID_ENV", "KEY", "Message", "check_worker_id", "from_worker", "to_worker"]

KEY = "procwire"
#: Environment of every worker: its id (1..N) and the number of workers.
ID_ENV = "PROCWIRE_WORKER_ID"
COUNT_ENV = "PROCWIRE_WORKERS"

HELLO, MSG, ONLINE, READY, TO, ALL = "hello", "msg", "online", "ready", "to", "all"
PRIMARY = 0


class Message(NamedTuple):
    """One message and who sent it: ``sender`` is a worker id (1..N), or 0 for the primary.

    >>> sender, data = Message(2, {"hi": 1})
    """

    sender: int
    data: Any


def to_worker(sender: int, data: Any) -> dict[str, Any]:
    return {KEY: MSG, "from": sender, "data": data}


def hello(worker_id: int, workers: int) -> dict[str, Any]:
    return {KEY: HELLO, "id": worker_id, "workers": workers}


def from_worker(obj: Any) -> tuple[str, Any, Any]:
    """``(kind, to, data)`` of a message a worker sent; a plain value is ``("msg", None, v)``,
    a malformed envelope ``("", None, obj)``."""
    if type(obj) is not dict or KEY not in obj:
        return MSG, None, obj
    kind = obj[KEY]
    if kind == MSG or kind == ALL:
        return kind, None, obj.get("data")
    if kind == TO:
        return kind, obj.get("to"), obj.get("data")
    if kind == ONLINE or kind == READY:
        return kind, None, None
    return "", None, obj


def check_worker_id(worker_id: Any, workers: int) -> int:
    """``worker_id`` when it names a worker (1..workers), else ``ValueError``."""
    if type(worker_id) is not int or not 1 <= worker_id <= workers:
        raise ValueError(f"no worker {worker_id!r}: worker ids are 1..{workers}")
    return worker_id
