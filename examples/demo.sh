#!/usr/bin/env bash
# README's first command: install what is needed (cached), then run the demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash .ci/setup | tail -n 1)
# The repo root goes on sys.path last, only for examples/: kiln itself is the installed copy.
exec "$VENV/bin/python" -P -c 'import sys; sys.path.append("."); from examples.demo import main; sys.exit(main())'
