"""Child-side bootstrap of ``spawn(fn, *args)``: import ``fn`` by name and call it.

Run as ``python -c <stub> <sys.path json> <spec json>`` where spec is ``{"module", "qualname",
"args"}`` (plus ``"file"`` when the function lives in the parent's ``__main__`` script, which is
then run as ``__mp_main__``, as multiprocessing does: keep its top-level work under
``if __name__ == "__main__":``). ``fn`` opens the parent channel with ``procwire.parent()``
(or its asyncio twin); what it queued is flushed at exit. Exit status: 0 when
``fn`` returns, 1 with the traceback on stderr when it raises, or whatever ``SystemExit`` says.
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


def main() -> None:
    spec = json.loads(sys.argv[2])
    sys.argv = [sys.argv[0]]
    from ._launch import CHANNEL_ENV

    raw = os.environ.get(CHANNEL_ENV, "")
    if raw.isdigit():
        # Not inherited by grandchildren, whichever API (blocking or asyncio) fn opens it with.
        try:
            os.set_inheritable(int(raw), False)
        except OSError:
            pass
    try:
        fn = _resolve(spec)
        fn(*spec.get("args", []))
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
