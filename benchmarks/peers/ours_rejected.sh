#!/bin/sh
# Where our pass's verification rejected its plan (measured speed-up not beyond the noise of the
# hp model's: on this loaded machine the two 95% CIs overlapped) the pass wrote the input model.
# This writes the rejected plan itself (report["rejected_plan"]["formats"]) with `ampq-pass --plan`
# (same snapshot, calibration and cache), as <run>.rejected_plan.onnx, so that score.py can time
# it beside the shipped model. It is labelled as such in peers.md, never as the pass's output.
# A run made for another backend (openvino_rmse_B, openvino_metric_drop...) is written with that
# backend's rules and file form, from its own cache and commit, as the pass itself would have.
#   benchmarks/peers/ours_rejected.sh minilm
set -e
MODEL="$1"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
D="$ROOT/benchmarks/out/peers/$MODEL"
OUTD="$D/ours"
for REP in "$OUTD"/*.report.json; do
  N=$(basename "$REP" .report.json)
  # written already for this report (run_all calls this after each backend's runs)
  [ "$OUTD/$N.rejected_plan.onnx" -nt "$REP" ] && continue
  # the name's prefix before rmse_/metric_drop is ours.sh's PRE: backend, formats, tag
  PRE=$(echo "$N" | sed -E 's/(rmse_|metric_drop).*$//')
  case "$PRE" in openvino_*) BACKEND=openvino:cpu ;; *) BACKEND=ort:cpu ;; esac
  if [ -n "$PRE" ]; then CACHE="$OUTD/cache_$PRE"; else CACHE="$OUTD/cache"; fi
  if [ -f "$OUTD/$N.commit" ]; then REV=$(cat "$OUTD/$N.commit"); else REV=$(cat "$OUTD/${PRE}commit"); fi
  SNAP=/tmp/ampq-snapshot-$REV
  FLAGS=""; [ -f "$OUTD/$N.flags" ] && FLAGS=$(cat "$OUTD/$N.flags")
  python3 - "$REP" "$OUTD/$N.rejected_plan.json" <<'PY' || continue
import json, sys
r = json.load(open(sys.argv[1]))
rej = r.get("rejected_plan")
if not rej:
    sys.exit(1)
json.dump({"formats": rej["formats"]}, open(sys.argv[2], "w"), indent=1)
PY
  [ -d "$SNAP" ] || { echo "snapshot $SNAP missing for $N: run ours.sh first" >&2; continue; }
  echo "[ours] $MODEL $N: applying the rejected plan (--backend $BACKEND)"
  PYTHONHASHSEED=0 PYTHONPATH="$SNAP" HF_HUB_OFFLINE=1 nice -n 15 "$ROOT/.venv/bin/python" -P \
      -c "import sys; from ampq_pass.cli import main; sys.argv[0] = 'ampq-pass'; sys.exit(main())" "$D/fp32.onnx" \
      -o "$OUTD/$N.rejected_plan.onnx" --plan "$OUTD/$N.rejected_plan.json" --calib "$D/pass_calib.npz" \
      --backend "$BACKEND" $FLAGS --cache-dir "$CACHE" --no-progress > "$OUTD/$N.rejected_plan.log" 2>&1 || echo "failed: see $OUTD/$N.rejected_plan.log"
  tail -2 "$OUTD/$N.rejected_plan.log"
done
