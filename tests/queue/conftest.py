"""Queue test fixtures: ``make_queue`` builds a queue on each backend in ``BACKENDS``.

A backend joins the behaviour suite by adding its name here and a branch in ``queue_url``.
"""

from __future__ import annotations

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
