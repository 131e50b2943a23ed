"""Queue test fixtures: ``make_queue`` builds a queue on each backend in ``BACKENDS``.

A backend joins the behaviour suite by adding its name here and a branch in ``queue_url``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from procwire.queue import Queue

BACKENDS = ["sqlite", "redis"]


@pytest.fixture(params=BACKENDS)
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queues.db"
    if request.param == "redis":
        # A real redis-server of its own for each test (started by the fixture).
        server = request.getfixturevalue("redis_server")
        return str(server.url)
    raise AssertionError(request.param)  # pragma: no cover


@pytest.fixture
def make_queue(queue_url: str) -> Iterator[Callable[..., Queue]]:
    made: list[Queue] = []

    def make(name: str = "jobs", **kwargs: Any) -> Queue:
        kwargs.setdefault("backoff", 0)
        q = Queue(name, queue_url, **kwargs)
        made.append(q)
        return q

    try:
        yield make
    finally:
        for q in made:
            q.close()


def _fork_takes_the_parents_job(q: Queue,
                               child_check: Callable[[Queue], None] | None = None) -> None:
    """Fork: the child (after ``child_check``) takes the parent's job "parent", acks it and
    puts "child"; the parent then gets "child" on its own connections, which still work."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            if child_check is not None:
                child_check(q)
            job = q.get(timeout=5)
            if job is not None and job.data == "parent":
                job.ack()
                q.put("child")
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    job = q.get(timeout=5)  # the parent's connection is still in step
    assert job is not None and job.data == "child"
    job.ack()


@pytest.fixture
def fork_takes_the_parents_job() -> Callable[..., None]:
    return _fork_takes_the_parents_job
