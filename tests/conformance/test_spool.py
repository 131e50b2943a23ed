"""``spool://``: the conformance suite over a watched folder (one file per message).

Every message is a file, so the bulk tests send fewer messages than over a socket, and fsync is
off here to keep the suite quick (it changes durability across power loss, not behaviour).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from procwire.testing import AsyncConformance, SyncConformance


class SpoolHooks:
    ordering_count = 500
    burst_count = 1_000
    connect_kwargs: dict[str, Any] = {"fsync": "0"}
    listen_kwargs: dict[str, Any] = {"fsync": "0"}

    def url(self, tmp_path: Path) -> str:
        return f"spool://{tmp_path}/{uuid.uuid4().hex[:8]}"


class TestSpool(SpoolHooks, SyncConformance):
    pass


class TestSpoolAsync(SpoolHooks, AsyncConformance):
    pass
