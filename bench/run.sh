#!/usr/bin/env bash
# Runs one benchmark with the project's environment: bash bench/run.sh coldstart --models mlp
# (python -P keeps the repo root off the front of sys.path, so kiln is the installed copy;
# the root is appended for the bench/ and examples/ packages.)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash .ci/setup | tail -n 1)
name=$1; shift
exec "$VENV/bin/python" -P -c 'import runpy, sys; sys.path.append("."); sys.argv[0] = sys.argv[1]; del sys.argv[1]; runpy.run_module("bench." + sys.argv[0], run_name="__main__")' "$name" "$@"
