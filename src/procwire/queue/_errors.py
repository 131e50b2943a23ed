"""Queue errors (defined in ``procwire._errors``, re-exported here)."""

from __future__ import annotations

from .._errors import LeaseLost, QueueError

__all__ = ["LeaseLost", "QueueError"]
