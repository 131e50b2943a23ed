"""Errors of the children layer (defined in ``procwire._errors``)."""

from __future__ import annotations

from .._errors import ChildExited, NoParentChannel

__all__ = ["ChildExited", "NoParentChannel"]
