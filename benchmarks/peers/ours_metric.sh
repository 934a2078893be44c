#!/bin/sh
# Our pass's metric-driven search (--metric/--max-metric-drop, README "A budget in your own metric")
# on MiniLM with the metric INC and AIMET search with (ours_metric.py: cosine on search.npz), the
# same cache as ours.sh, under /usr/bin/time -v.
#   benchmarks/peers/ours_metric.sh 0.01
# AMPQ_BACKEND=openvino:cpu: the search timing on OpenVINO (its cache, as ours.sh's)
# The code: the commit in ours/<backend prefix>metric_commit, else HEAD (written there and beside
# the run's files as <name>.commit, which score.py shows): the search changes more often than the
# loss-budget plans, so it keeps its own commit while sharing their subgraph-timing cache.
set -e
DROP="$1"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
D="$ROOT/benchmarks/out/peers/minilm"
OUTD="$D/ours"
BACKEND="${AMPQ_BACKEND:-ort:cpu}"
case "$BACKEND" in ort:cpu) PRE="" ;; *) PRE="$(echo "$BACKEND" | cut -d: -f1)_" ;; esac
if [ -n "$PRE" ]; then CACHE="$OUTD/cache_$PRE"; else CACHE="$OUTD/cache"; fi
COMMIT="$OUTD/${PRE}metric_commit"
if [ -f "$COMMIT" ]; then REV=$(cat "$COMMIT"); else REV=$(cd "$ROOT" && git rev-parse --short=10 HEAD); fi
SNAP=$("$ROOT/benchmarks/snapshot.sh" "$REV")
echo "$REV" > "$COMMIT"
N="${PRE}metric_drop$DROP"
echo "$REV" > "$OUTD/$N.commit"
uptime > "$OUTD/$N.uptime"
PYTHONHASHSEED=0 PYTHONPATH="$SNAP" HF_HUB_OFFLINE=1 nice -n 15 /usr/bin/time -v -o "$OUTD/$N.time" "$ROOT/.venv/bin/python" -P \
    -c "import sys; from ampq_pass.cli import main; sys.argv[0] = 'ampq-pass'; sys.exit(main())" "$D/fp32.onnx" \
    -o "$OUTD/$N.onnx" --calib "$D/pass_calib.npz" --holdout 32 \
    --metric "$ROOT/benchmarks/peers/ours_metric.py:search_cosine" --max-metric-drop "$DROP" \
    --backend "$BACKEND" --cache-dir "$CACHE" --report "$OUTD/$N.report.json" --no-progress > "$OUTD/$N.log" 2>&1 \
    || echo "failed: see $OUTD/$N.log"
uptime >> "$OUTD/$N.uptime"
tail -3 "$OUTD/$N.log"
