#!/usr/bin/env bash
# Set up ./.venv (see scripts/setup.sh) and run the procwire tour. Arguments go to `procwire demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/procwire" demo "$@"
