"""Errors of the cluster layer (defined in ``procwire._errors``)."""

from __future__ import annotations

from .._errors import CrashLoop

__all__ = ["CrashLoop"]
