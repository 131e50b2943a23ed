"""Fixtures for the cluster tests: every cluster is stopped, and no process is left behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import procwire.cluster as pc

SRC = str(Path(__file__).resolve().parent.parent.parent / "src")


def children_of(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (zombies included: they were not reaped)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(entry))
    return out


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
        deadline = time.monotonic() + 5
        left = children_of(os.getpid()) - self.before
        while left and time.monotonic() < deadline:  # processes still being reaped elsewhere
            time.sleep(0.05)
            left = children_of(os.getpid()) - self.before
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        return sorted(left)


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
