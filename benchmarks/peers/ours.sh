#!/bin/sh
# Our pass (main venv) on one prepared model at several --max-loss-rmse budgets, each run under
# /usr/bin/time -v (wall time and peak RSS of that run). The first budget runs cold (empty cache:
# calibration, sensitivity, subgraph timing); later budgets reuse its cache, as a user re-running
# the pass would. Both costs are recorded (cold = the search time to compare with a peer's).
#   benchmarks/peers/ours.sh minilm 0.1 0.03 0.05 0.15
set -e
MODEL="$1"; shift
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
D="$ROOT/benchmarks/out/peers/$MODEL"
OUTD="$D/ours"
mkdir -p "$OUTD"
# The pass runs from a clean snapshot of the committed code (git HEAD, as run_snapshot.sh does):
# other engineers edit ampq_pass in this checkout; the commit is written to ours/commit.
# (later budgets reuse the commit of the first run, recorded in ours/commit, so that one cache
# and one code version serve them all)
# AMPQ_BACKEND=openvino:cpu: plans made by timing on OpenVINO (named openvino_rmse_B, own cache and commit);
# AMPQ_FORMATS=int8: only those formats offered (--formats; named openvino_int8_rmse_B)
BACKEND="${AMPQ_BACKEND:-ort:cpu}"
case "$BACKEND" in ort:cpu) PRE="" ;; *) PRE="$(echo "$BACKEND" | cut -d: -f1)_" ;; esac
FORMATS_ARG=""
if [ -n "${AMPQ_FORMATS:-}" ]; then PRE="${PRE}$(echo "$AMPQ_FORMATS" | tr ',' '_')_"; FORMATS_ARG="--formats $AMPQ_FORMATS"; fi
# AMPQ_FLAGS="--activation-matmuls" AMPQ_TAG=actmm: more pass flags (named TAG_..., own cache and commit;
# the flags are written to <name>.flags, which score.py adds to the row's knob)
if [ -n "${AMPQ_FLAGS:-}" ]; then
  [ -n "${AMPQ_TAG:-}" ] || { echo "AMPQ_FLAGS needs AMPQ_TAG (the name prefix of those runs)" >&2; exit 2; }
  PRE="${PRE}${AMPQ_TAG}_"
fi
if [ -n "$PRE" ]; then CACHE="$OUTD/cache_$PRE"; else CACHE="$OUTD/cache"; fi
COMMIT="$OUTD/${PRE}commit"
if [ -f "$COMMIT" ]; then REV=$(cat "$COMMIT"); else REV=$(cd "$ROOT" && git rev-parse --short=10 HEAD); fi
SNAP=$("$ROOT/benchmarks/snapshot.sh" "$REV")
echo "$REV" > "$COMMIT"
HOLD=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['pass_holdout'])" "$D/meta.json")
# what the model needs besides (the decoder LM: its formats and the decode shape to time at)
FLAGS=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('pass_flags', ''))" "$D/meta.json")
for B in "$@"; do
  N="${PRE}rmse_$B"
  echo "[ours] $MODEL --max-loss-rmse $B --backend $BACKEND $FORMATS_ARG ${AMPQ_FLAGS:-}"
  uptime > "$OUTD/$N.uptime"
  if [ -n "${AMPQ_FLAGS:-}" ]; then echo "$AMPQ_FLAGS" > "$OUTD/$N.flags"; else rm -f "$OUTD/$N.flags"; fi
  rm -f "$OUTD/$N.cold"; [ -d "$CACHE" ] || touch "$OUTD/$N.cold"   # cold: the cache did not exist yet
  PYTHONHASHSEED=0 PYTHONPATH="$SNAP" HF_HUB_OFFLINE=1 nice -n 15 /usr/bin/time -v -o "$OUTD/$N.time" "$ROOT/.venv/bin/python" -P \
      -c "import sys; from ampq_pass.cli import main; sys.argv[0] = 'ampq-pass'; sys.exit(main())" "$D/fp32.onnx" \
      -o "$OUTD/$N.onnx" --calib "$D/pass_calib.npz" --holdout "$HOLD" --max-loss-rmse "$B" $FLAGS \
      --backend "$BACKEND" $FORMATS_ARG ${AMPQ_FLAGS:-} --cache-dir "$CACHE" --report "$OUTD/$N.report.json" --no-progress > "$OUTD/$N.log" 2>&1 \
      || echo "failed: see $OUTD/$N.log"
  uptime >> "$OUTD/$N.uptime"
  tail -3 "$OUTD/$N.log"
done
