"""Tiny I/O helpers with a blocking and an asyncio spelling, so ``scripts/unasync.py`` can turn
the asyncio code into the blocking twin by renaming (``asleep`` -> ``sleep``)."""

from __future__ import annotations

import asyncio
import time

__all__ = ["asleep", "sleep"]


async def asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def sleep(seconds: float) -> None:
    time.sleep(seconds)
