"""Errors of the cluster layer (``CrashLoop`` is defined in ``procwire._errors``,
``StartFailed`` in ``procwire.process``)."""

from __future__ import annotations

from .._errors import CrashLoop
from ..process._errors import StartFailed

__all__ = ["CrashLoop", "StartFailed"]
