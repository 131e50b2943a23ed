#!/usr/bin/env python
"""Channel benchmark runner: procwire against raw sockets, pipes, multiprocessing, pyzmq, Node.

    python benchmarks/channels.py [--quick] [--reps N] [--json out.json] [--only NAME...]

Prints markdown tables (medians, ratios, targets) on stdout, progress on stderr, and writes every
measurement as JSON (default: benchmarks/results/tmp/channels.json). See benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Measure the checkout this script belongs to, installed or not; spawned children inherit
# sys.path, so they import the same code.
sys.path.insert(0, str(ROOT / "src"))

from procwire.bench import channels  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(
        channels.main(default_json=ROOT / "benchmarks" / "results" / "tmp" / "channels.json")
    )
