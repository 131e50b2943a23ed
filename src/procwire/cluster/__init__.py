"""Supervised worker clusters: Node's ``cluster`` (and PM2's fork mode) for Python.

>>> import procwire.cluster as pc
>>> with pc.Cluster("myapp.worker:main", workers=4) as cluster:   # doctest: +SKIP
...     cluster.broadcast({"config": 1})
...     cluster.send(1, "only for worker 1")
...     sender, data = cluster.recv(timeout=5)

In a worker::

    w = procwire.cluster.worker()     # w.id (1..N), w.send(msg), w.send_to(2, msg),
    for sender, data in w: ...        # w.broadcast(msg), w.recv(timeout=), w.listener

The primary supervises (restarts with backoff under a crash-loop limit, graceful stop, rolling
reload) and relays worker-to-worker messages over each worker's Node-compatible IPC channel;
workers can share one listening port. ``procwire.cluster.aio`` is the asyncio twin.
See docs/cluster.md.
"""

from __future__ import annotations

from ._cluster import Cluster, WorkerInfo
from ._errors import CrashLoop, StartFailed
from ._wire import Message
from ._worker import Worker, worker

__all__ = ["Cluster", "CrashLoop", "Message", "StartFailed", "Worker", "WorkerInfo", "worker"]
