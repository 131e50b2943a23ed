"""Event names and glob patterns (``fnmatch`` style: ``*``, ``?``, ``[abc]``).

Names under ``procwire.`` are reserved for the bus's own notices (``procwire.gap``,
``procwire.bad_message``): a pattern matches them only when it starts with ``procwire.``
itself, so ``*`` never sees a notice by surprise, and no one can emit one.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

__all__ = ["MAX_NAME", "RESERVED_PREFIX", "Matcher", "check_name", "check_pattern"]

RESERVED_PREFIX = "procwire."
MAX_NAME = 1024

_GLOB_CHARS = frozenset("*?[")


def check_name(name: object, what: str = "event name") -> str:
    """A valid event/request name, or TypeError/ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"an {what} is a str, not {type(name).__name__}")
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"an {what} has 1 to {MAX_NAME} characters (got {len(name)})")
    return name


def check_pattern(pattern: object) -> str:
    return check_name(pattern, "event pattern")


class Matcher:
    """Does an event name match ``pattern``? Exact names skip the regex."""

    __slots__ = ("_match", "exact", "pattern", "reserved")

    def __init__(self, pattern: str) -> None:
        self.pattern = check_pattern(pattern)
        self.exact = not (_GLOB_CHARS & set(pattern))
        self.reserved = pattern.startswith(RESERVED_PREFIX)
        self._match: Callable[[str], object] | None = (
            None if self.exact else re.compile(fnmatch.translate(pattern), re.S).match)

    def matches(self, name: str) -> bool:
        if self._match is None:
            return name == self.pattern
        if name.startswith(RESERVED_PREFIX) and not self.reserved:
            return False
        return self._match(name) is not None
