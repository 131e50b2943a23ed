"""Fixtures for the children tests: every spawned child is killed and reaped at teardown."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import procwire.process as pp

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE.parent / "node"
SRC = str(HERE.parent.parent / "src")


class Spawned:
    """Wraps ``spawn`` / ``aio.spawn`` and remembers every child (and stray pid) to kill."""

    def __init__(self) -> None:
        self.children: list[Any] = []
        self.pids: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> pp.Child:
        child = pp.spawn(*args, **kwargs)
        self.children.append(child)
        return child

    async def aspawn(self, *args: Any, **kwargs: Any) -> Any:
        import procwire.process.aio as pa

        child = await pa.spawn(*args, **kwargs)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            proc: subprocess.Popen[bytes] = child._proc
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            ch = child.channel
            try:
                if isinstance(child, pp.Child):
                    ch.close(0)
                else:
                    asyncio.run(ch.close(0))
            except Exception:
                pass
        for pid in self.pids:  # grandchildren a test learned about
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


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


def kill_left_behind(before: set[int], grace: float = 5.0) -> list[int]:
    """Children of this process that are not in ``before`` once ``grace`` seconds have let
    any exit in progress be reaped: each is killed and reaped; returns their pids."""
    deadline = time.monotonic() + grace
    left = children_of(os.getpid()) - before
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = children_of(os.getpid()) - before
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    return sorted(left)


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """After each test (and the teardown of its other fixtures): no child of this process is
    left running or unreaped. A leftover is killed and reaped, and reported as an error."""
    before = children_of(os.getpid())
    yield
    left = kill_left_behind(before)
    if left:
        pytest.fail(f"processes left behind (killed now): {left}")


@pytest.fixture
def spawned() -> Iterator[Spawned]:
    s = Spawned()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.fail("node is not installed: install Node.js 20 (Debian: apt-get install nodejs, "
                    "or run scripts/test.sh, which sets it up)")
    return path


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
