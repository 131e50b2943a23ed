"""Child-side bootstrap of ``spawn(fn, *args)``: import ``fn`` by name and call it.

Run as ``python -c <stub> <sys.path json> <spec json>`` where spec is ``{"module", "qualname",
"args"}`` (plus ``"file"`` when the function lives in the parent's ``__main__`` script, which is
then run as ``__mp_main__``, as multiprocessing does: keep its top-level work under
``if __name__ == "__main__":``). ``fn`` opens the parent channel with ``procwire.parent()``
(or its asyncio twin); what it queued is flushed at exit. Exit status: 0 when
``fn`` returns, 1 with the traceback on stderr when it raises, or whatever ``SystemExit`` says.

When ``fn`` cannot be had (its module fails to import, the name is missing or not callable),
the child exits with ``START_FAILED`` (122), the traceback on stderr, after writing one
``START_FAILED_CMD`` line on the Node IPC channel (``{"cmd": ..., "target", "error"}``): the
parent then raises ``StartFailed`` naming the target and the error, and a cluster fails
``start()`` at once instead of restarting a worker that can never run.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import traceback
import types
from typing import Any


def _resolve(spec: dict[str, Any]) -> Any:
    if "file" in spec:
        ns = runpy.run_path(spec["file"], run_name="__mp_main__")
        mod = types.ModuleType("__mp_main__")
        mod.__dict__.update(ns)
        sys.modules["__mp_main__"] = mod
        obj: Any = mod
    else:
        obj = importlib.import_module(spec["module"])
    for part in spec["qualname"].split("."):
        obj = getattr(obj, part)
    return obj


def target_name(spec: dict[str, Any]) -> str:
    return f"{spec.get('file') or spec.get('module')}:{spec.get('qualname')}"


def _report_start_failure(raw_fd: str, spec: dict[str, Any], exc: BaseException) -> None:
    from ._node import START_FAILED_CMD

    if not raw_fd.isdigit():
        return  # the stdio channel: the exit status and stderr tell
    error = f"{type(exc).__name__}: {exc}"[:2000]
    line = json.dumps({"cmd": START_FAILED_CMD, "target": target_name(spec), "error": error},
                      separators=(",", ":")).encode() + b"\n"
    try:
        os.write(int(raw_fd), line)  # a few hundred bytes into an empty socket buffer
    except OSError:
        pass


def main() -> None:
    spec = json.loads(sys.argv[2])
    sys.argv = [sys.argv[0]]
    from ._launch import CHANNEL_ENV, START_FAILED

    raw = os.environ.get(CHANNEL_ENV, "")
    if raw.isdigit():
        # Not inherited by grandchildren, whichever API (blocking or asyncio) fn opens it with.
        try:
            os.set_inheritable(int(raw), False)
        except OSError:
            pass
    try:
        fn = _resolve(spec)
        if not callable(fn):
            raise TypeError(f"{target_name(spec)} is a {type(fn).__name__}, not a function")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        traceback.print_exc()
        _report_start_failure(raw, spec, exc)
        sys.exit(START_FAILED)
    try:
        fn(*spec.get("args", []))
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
