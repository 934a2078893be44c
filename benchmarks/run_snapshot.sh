#!/bin/sh
# Run a benchmark against a clean snapshot of the committed code (git HEAD, benchmarks/snapshot.sh),
# not the working tree: other engineers edit ampq_pass in this checkout while benchmarks run, and
# a pass whose cache keys change mid-run is not a benchmark. The snapshot is put first on
# PYTHONPATH; the commit is recorded in the results (AMPQ_CODE_COMMIT).
# Usage: benchmarks/run_snapshot.sh benchmarks/bench_minilm_front.py [args]
set -e
cd "$(dirname "$0")/.."
rev=$(git rev-parse --short=10 HEAD)
snap=$(benchmarks/snapshot.sh "$rev")
AMPQ_CODE_COMMIT=$rev PYTHONPATH="$snap" HF_HUB_OFFLINE=1 exec .venv/bin/python "$@"
