#!/usr/bin/env bash
# README's test command: set up (cached), check style and layers, then run the tests.
#   bash tests/run.sh [pytest args]        every test (what CI runs)
#   bash tests/run.sh fast [pytest args]   the inner loop: no control plane (unit and runtime
#                                          tests: real compiles, real sockets), a few minutes
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash .ci/setup | tail -n 1)
export PATH="$VENV/bin:$PATH"
lane=()
if [ "${1:-}" = fast ]; then
  shift
  lane=(-m "not cluster")
fi
echo "== ruff"
ruff check .
echo "== import layers (.importlinter)"
bash .ci/lint-imports
echo "== mypy --strict (shared core, operator, serve path)"
mypy
echo "== pytest ${lane[*]:-(every test)}"
exec pytest -q -rs "${lane[@]}" "$@"
