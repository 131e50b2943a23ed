#!/usr/bin/env python
"""Queue benchmark runner: procwire's SQLite and Redis queues against huey, RQ and persist-queue
(optional: ``pip install huey persist-queue rq``; missing ones are reported as skipped rows).

    python benchmarks/queues.py [--quick] [--rounds 3] [--single N] [--batched N]
                               [--only sqlite|redis] [--match TEXT] [--json out.json]
                               [--redis redis://127.0.0.1:6379/0 | --no-redis]

The same as ``procwire bench queues`` (``--reps`` is another name for ``--rounds``); prints
markdown tables on stdout, progress on stderr. The implementation is ``procwire.bench.queues``
(see its docstring and benchmarks/queue.md). This file is not named queue.py: beside the other
benchmark scripts that name would shadow the standard library's ``queue``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Measure the checkout this script belongs to, installed or not; the forked consumer processes
# share its imports.
sys.path.insert(0, str(ROOT / "src"))

from procwire.bench import queues  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(queues.main(prog="queues.py"))
