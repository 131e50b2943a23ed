"""Errors of the children layer (``ChildExited`` and ``NoParentChannel`` are defined in
``procwire._errors``; ``StartFailed`` here, below ``ChildExited`` in the tree)."""

from __future__ import annotations

from .._errors import ChildExited, NoParentChannel

__all__ = ["ChildExited", "NoParentChannel", "StartFailed"]


class StartFailed(ChildExited):
    """A child started with a Python function (``spawn(fn)``, ``spawn("pkg.mod:func")``, a
    cluster worker) ended before running it: its target could not be imported or found.

    ``target`` names it (``"pkg.mod:func"``), ``error`` is the exception as text
    (``"ModuleNotFoundError: No module named 'pkg'"``; the traceback went to the child's
    stderr), ``returncode`` is ``START_FAILED`` (122). ``worker_id`` is the cluster worker's id,
    or None for a plain child.
    """

    def __init__(self, message: str, *, returncode: int, pid: int, target: str, error: str,
                 worker_id: int | None = None) -> None:
        super().__init__(message, returncode=returncode, pid=pid)
        self.target = target
        self.error = error
        self.worker_id = worker_id
