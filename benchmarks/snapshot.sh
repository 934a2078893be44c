#!/bin/sh
# A clean snapshot of committed code in /tmp (ampq_pass with backends inside, tests beside),
# made once per commit; prints its path. Benchmarks run from it, not from the working tree:
# other engineers edit ampq_pass in this checkout, and a pass whose cache keys change mid-run
# is not a benchmark.
#   snap=$(benchmarks/snapshot.sh [REV])      (REV: a commit, default HEAD)
set -e
cd "$(dirname "$0")/.."
rev=$(git rev-parse --short=10 "${1:-HEAD}")
snap=/tmp/ampq-snapshot-$rev
if [ ! -d "$snap" ]; then
  tmp=$(mktemp -d /tmp/ampq-snapshot-XXXXXX)
  git archive "$rev" ampq_pass backends tests | tar -x -C "$tmp"
  mv "$tmp/backends" "$tmp/ampq_pass/backends"
  mv -T "$tmp" "$snap" 2>/dev/null || rm -rf "$tmp"  # another run made it first
fi
echo "$snap"
