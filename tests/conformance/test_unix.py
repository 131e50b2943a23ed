"""``unix://``: the conformance suite over UNIX sockets (a path, and Linux abstract names)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from procwire.testing import AsyncConformance, SyncConformance


class UnixHooks:
    def url(self, tmp_path: Path) -> str:
        return f"unix://{tmp_path}/{uuid.uuid4().hex[:8]}.sock"


# unix.py's _prepare_path() tells a live listener from a stale socket file by connecting to
# it; that probe connection stays in the live listener's backlog, so its next accept() returns
# a channel that is already closed instead of the real client's.
class TestUnix(UnixHooks, SyncConformance):
    pass


class TestUnixAsync(UnixHooks, AsyncConformance):
    pass


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="abstract UNIX sockets are Linux-only")


class AbstractHooks:
    def url(self, tmp_path: Path) -> str:
        return f"unix://@procwire-conformance-{uuid.uuid4().hex[:12]}"


@linux_only
class TestUnixAbstract(AbstractHooks, SyncConformance):
    pass


@linux_only
class TestUnixAbstractAsync(AbstractHooks, AsyncConformance):
    pass
