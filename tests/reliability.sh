#!/usr/bin/env bash
# The long reliability run (docs/reliability.md): every fault injected many times (KILN_LONG=1).
#   bash tests/reliability.sh            # about an hour on a 2-core machine
# Prints the table rows at the end and writes them to docs/results/reliability-long.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export KILN_LONG=1
export KILN_RELIABILITY_JSON="${KILN_RELIABILITY_JSON:-$PWD/docs/results/reliability-long.json}"
exec bash tests/run.sh tests/reliability tests/runtime/test_hostile_http.py tests/unit/test_unpack.py "$@"
