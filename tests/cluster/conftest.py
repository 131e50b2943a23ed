"""Fixtures for the cluster tests: every cluster is stopped, and no process is left behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import procwire.cluster as pc
from process.conftest import children_of, kill_left_behind  # tests/ is on sys.path

__all__ = ["SRC", "Clusters", "children_of"]

SRC = str(Path(__file__).resolve().parent.parent.parent / "src")


class Clusters:
    """Makes clusters; at teardown stops each one, then kills (and reports) any child process
    of this test process that the test left running or unreaped."""

    def __init__(self) -> None:
        self.made: list[pc.Cluster] = []
        self.before = children_of(os.getpid())

    def __call__(self, *args: Any, **kwargs: Any) -> pc.Cluster:
        kwargs.setdefault("backoff", 0.05)
        kwargs.setdefault("stop_timeout", 3.0)
        cluster = pc.Cluster(*args, **kwargs)
        self.made.append(cluster)
        return cluster

    def close(self) -> list[int]:
        for cluster in self.made:
            try:
                cluster.stop(timeout=2.0)
            except Exception:
                pass
        return kill_left_behind(self.before)


@pytest.fixture
def clusters() -> Iterator[Clusters]:
    made = Clusters()
    failed = True
    try:
        yield made
        failed = False
    finally:
        left = made.close()
        if left and not failed:
            pytest.fail(f"processes left behind (killed now): {left}")
