#!/bin/sh
# Run a benchmark against a clean snapshot of the committed code (git HEAD), not the
# working tree: other engineers edit ampq_pass in this checkout while benchmarks run, and
# a pass whose cache keys change mid-run is not a benchmark. The snapshot goes to /tmp and
# is put first on PYTHONPATH; the commit is recorded in the results (AMPQ_CODE_COMMIT).
# Usage: benchmarks/run_snapshot.sh benchmarks/bench_minilm_front.py [args]
set -e
cd "$(dirname "$0")/.."
rev=$(git rev-parse --short=10 HEAD)
snap=/tmp/ampq-snapshot-$rev
if [ ! -d "$snap" ]; then
  tmp=$(mktemp -d /tmp/ampq-snapshot-XXXXXX)
  git archive HEAD ampq_pass backends tests | tar -x -C "$tmp"
  mv "$tmp/backends" "$tmp/ampq_pass/backends"
  mv -T "$tmp" "$snap" 2>/dev/null || rm -rf "$tmp"  # another run made it first
fi
AMPQ_CODE_COMMIT=$rev PYTHONPATH="$snap" HF_HUB_OFFLINE=1 exec .venv/bin/python "$@"
