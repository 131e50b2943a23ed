#!/usr/bin/env python
"""Event bus benchmark runner: procwire's Redis backend and local broker against redis-py and
Node ioredis, 1 publisher to 1, 4 and 16 subscriber processes; request/reply latency.

    python benchmarks/bus.py [--quick] [--reps N] [--only NAME...] [--subs N...]
                             [--json out.json]

The same as ``procwire bench bus``, except that the JSON goes to
benchmarks/results/tmp/bus.json unless ``--json`` says otherwise. Starts its own redis-server
(on ``PATH``) on a free loopback port. The implementation is ``procwire.bench.bus`` (see its
docstring and benchmarks/bus.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Measure the checkout this script belongs to, installed or not: the bus benchmark's child
# processes get the folder of the imported procwire package on their path.
sys.path.insert(0, str(ROOT / "src"))

from procwire.bench import bus  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(
        bus.main(default_json=ROOT / "benchmarks" / "results" / "tmp" / "bus.json",
                 prog="bus.py")
    )
