"""A private local broker socket per test, and the guarantee that every broker process a test
causes is killed and reaped at its end."""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from procwire.bus import Bus

_PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on: bool) -> None:
    # Detached brokers are orphans by design (their starter exits at once); as a subreaper
    # this test process adopts them, so it can reap them rather than leave zombies to PID 1.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class Brokers:
    """The broker files of one test (``.path``: the socket) and the broker processes seen."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: set[int] = set()

    def url(self, **query: Any) -> str:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"broker://{self.path}" + (f"?{q}" if q else "")

    def pid(self) -> int | None:
        """The running broker's pid (from its pid file), remembered for the cleanup."""
        try:
            with open(self.path + ".pid") as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        self.seen.add(pid)
        return pid

    def running(self) -> list[int]:
        """Live (not zombie) broker processes serving this socket, from /proc."""
        found = []
        needle = self.path.encode()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            cmd = _cmdline(pid)
            args = cmd.split(b"\0")
            if b"broker" in args or b"procwire.bus._broker" in args:
                if needle in args and _state(pid) not in (None, "Z"):
                    found.append(pid)
        self.seen.update(found)
        return found

    def alive(self, pid: int) -> bool:
        return _state(pid) not in (None, "Z")

    def wait_gone(self, pid: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._reap(pid)
            if not self.alive(pid):
                return True
            time.sleep(0.02)
        return False

    def kill(self, pid: int) -> None:
        self.seen.add(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        assert self.wait_gone(pid), f"broker {pid} survived SIGKILL"

    @staticmethod
    def _reap(pid: int) -> None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not ours: its parent (or PID 1) reaps it

    def cleanup(self) -> None:
        self.pid()
        self.running()
        for pid in self.seen:
            if self.alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid in self.seen:
            self.wait_gone(pid, 5.0)
            self._reap(pid)


@pytest.fixture(autouse=True)
def brokers(monkeypatch: pytest.MonkeyPatch) -> Iterator[Brokers]:
    """A private broker socket in a short temp folder, also exported as ``PROCWIRE_BROKER``
    (so ``Bus()`` here and in child processes uses it). Autouse: no bus test ever starts, or
    leaves behind, a broker on this user's real socket."""
    folder = tempfile.mkdtemp(prefix="pwb-")
    b = Brokers(os.path.join(folder, "b.sock"))
    monkeypatch.setenv("PROCWIRE_BROKER", b.path)
    _subreaper(True)
    try:
        yield b
    finally:
        try:
            b.cleanup()
        finally:
            _subreaper(False)
            shutil.rmtree(folder, ignore_errors=True)


_memory_names = itertools.count()


@pytest.fixture
def url() -> str:
    """A memory:// bus of this test's own."""
    return f"memory://test-{next(_memory_names)}"


@pytest.fixture
def pair(url: str) -> Iterator[tuple[Bus, Bus]]:
    """Two buses on one memory:// bus, closed at the end."""
    a, b = Bus(url), Bus(url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()
