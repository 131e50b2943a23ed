"""``procwire.pipe()``: the conformance suite over a connected socket pair (no listener)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import procwire
import procwire.aio as aio
from procwire.testing import AsyncConformance, SyncConformance


class TestPipe(SyncConformance):
    supports_listener = False
    supports_reconnect = False

    def make_pair(self, tmp_path: Path, codec: str,
                  **options: Any) -> tuple[procwire.Channel, procwire.Channel]:
        return procwire.pipe(codec=codec, **options)


class TestPipeAsync(AsyncConformance):
    supports_listener = False
    supports_reconnect = False

    async def amake_pair(self, tmp_path: Path, codec: str,
                         **options: Any) -> tuple[aio.Channel, aio.Channel]:
        return await aio.pipe(codec=codec, **options)
