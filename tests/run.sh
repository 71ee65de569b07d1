#!/usr/bin/env bash
# README's test command: set up (cached), check style and layers, then run every test.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash .ci/setup | tail -n 1)
export PATH="$VENV/bin:$PATH"
echo "== ruff"
ruff check .
echo "== import layers (.importlinter)"
bash .ci/lint-imports
echo "== mypy (shared core)"
mypy
echo "== pytest"
exec pytest -q -rs "$@"
