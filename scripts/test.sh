#!/usr/bin/env bash
# Set up everything (Python venv, system tools, npm packages) and run the full check:
# ruff, the unasync freshness check, mypy (strict on src/procwire), then pytest.
# Stops at the first failing step and exits with its code. Arguments go to pytest:
#   bash scripts/test.sh                         # everything
#   bash scripts/test.sh tests/test_codecs.py -k json
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

header() { printf '\n==> %s\n' "$*"; }

step=0
run_step() {  # run_step "title" cmd args...
    local title="$1"; shift
    step=$((step + 1))
    header "[$step] $title"
    printf '    $ %s\n' "$*"
    local rc=0
    "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        printf '\n==> FAILED at step %d (%s): exit code %d\n' "$step" "$title" "$rc" >&2
        exit "$rc"
    fi
}

run_step "setup (venv, system tools, npm packages)" bash scripts/setup.sh --system
run_step "ruff check" .venv/bin/ruff check src tests benchmarks
if [ -f scripts/unasync.py ]; then
    run_step "unasync: generated sync code is up to date" .venv/bin/python scripts/unasync.py --check
else
    header "unasync check skipped (no scripts/unasync.py)"
fi
run_step "mypy (strict on src/procwire)" .venv/bin/mypy

step=$((step + 1))
header "[$step] pytest"
printf '    $ %s\n' ".venv/bin/python -m pytest -q $*"
rc=0
.venv/bin/python -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    # pytest's 5 means "no tests collected": a suite that ran nothing has not passed.
    printf '\n==> FAILED at step %d (pytest): no tests were collected (exit code 5)\n' "$step" >&2
    exit 5
elif [ "$rc" -ne 0 ]; then
    printf '\n==> FAILED at step %d (pytest): exit code %d\n' "$step" "$rc" >&2
    exit "$rc"
fi
header "all checks passed"
