"""Errors of the event bus's request/reply (defined in ``procwire._errors``)."""

from __future__ import annotations

from .._errors import NoResponder, RemoteError

__all__ = ["NoResponder", "RemoteError"]
