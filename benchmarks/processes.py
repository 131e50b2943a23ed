#!/usr/bin/env python
"""Children and cluster benchmark runner: procwire py<->py / py<->node children and cluster relay
against multiprocessing.Pipe, Node fork() and Node's cluster, plus a raw-socket floor.

    python benchmarks/processes.py [--quick] [--reps N] [--json out.json] [--only NAME]
                                   [--paired BATCHES]

The same as ``procwire bench children``; prints markdown tables on stdout, progress on stderr.
The implementation is ``procwire.bench.processes`` (see its docstring and
benchmarks/processes.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Measure the checkout this script belongs to, installed or not; spawned children inherit
# sys.path, so they import the same code.
sys.path.insert(0, str(ROOT / "src"))

from procwire.bench import processes  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(processes.main(prog="processes.py"))
