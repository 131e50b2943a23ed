"""Shared fixtures: child processes that are always reaped, short socket folders."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SRC = str(Path(__file__).resolve().parent.parent / "src")


class Children:
    """Starts Python child processes and kills and reaps every one at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def python(self, code: str, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                                **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="pw-") as d:
        yield d


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A real redis-server on a free loopback port, started for this test; ``.url``,
    ``.stop()``, ``.start()``, ``.restart()``. Fails (never skips) when redis-server is missing."""
    from _servers import RedisServer

    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
