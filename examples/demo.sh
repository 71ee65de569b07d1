#!/usr/bin/env bash
# README's first command: install what is needed (cached), then run the demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash .ci/setup | tail -n 1)
# The repo root is put on sys.path through the script's folder, never as PYTHONPATH:
# a PYTHONPATH holding operator/ would shadow the standard library's `operator`.
exec "$VENV/bin/python" -c 'import sys; sys.path.append("."); from examples.demo import main; sys.exit(main())'
