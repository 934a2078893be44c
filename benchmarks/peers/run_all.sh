#!/bin/sh
# Produces every model of the peers benchmark for one model (default minilm), each peer in its
# own venv and each configuration in its own process (its wall time and peak RSS are its own),
# all under nice -n 15 (shared machine). Then score them:
#   benchmarks/run_snapshot.sh benchmarks/peers/score.py MODEL
# Set PEERS to a subset, e.g. PEERS="inc aimet" benchmarks/peers/run_all.sh minilm
set -u
MODEL="${1:-minilm}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
P="$ROOT/benchmarks/peers"
V="$P/.venvs"
cd "$ROOT"
N="nice -n 15"
[ -f "benchmarks/out/peers/$MODEL/fp32.onnx" ] || $N .venv/bin/python "$P/prepare.py" "$MODEL" || exit 1
# knobs per model: MiniLM's search metric is the mean cosine (1 = fp32); the classifier's is
# top-1 agreement - relative logit error, for which a 1% loss is below int8's error, so 5%
case "$MODEL" in
  minilm) TL=0.01; DROP=0.005; QTH=0.005 ;;
  *)      TL=0.05; DROP=0.05; QTH=0.005 ;;
esac
# the decoder LM (a decode step, int4 weight-only offered): each peer's LLM recipe for CPU - int4
# weight-only MatMulNBits (ORT RTN, INC RTN/GPTQ/AWQ, Quark, ModelOpt RTN/AWQ) - and int8
if [ "$MODEL" = llama ]; then
  for peer in ${PEERS:-ours ours_ov ort modelopt quark inc aimet}; do
    case "$peer" in
      # 0.05/0.07/0.04 after the first four: a denser front between the 0.03 plan and the int4 one;
      # 0.035 and 0.033 between 0.03 and 0.04 (the int4 group-32 recipes), 0.003 under ORT's dynamic int8
      ours)     "$P/ours.sh" "$MODEL" 0.03 0.005 0.01 0.1 0.05 0.07 0.04 0.003 0.035 0.033; "$P/ours_rejected.sh" "$MODEL" ;;
      # the plans made for OpenVINO (int8, int8_sym, int4, int4_b128 offered there)
      ours_ov)  AMPQ_BACKEND=openvino:cpu "$P/ours.sh" "$MODEL" 0.03 0.005 0.01 0.1 0.05 0.003 0.035 0.04; "$P/ours_rejected.sh" "$MODEL" ;;
      ort)      $N "$V/ort/bin/python" "$P/ort.py" "$MODEL" ;;
      modelopt) for c in int8_matmul int4_rtn int4_awq_clip; do $N "$V/modelopt/bin/python" "$P/modelopt.py" "$MODEL" --configs $c; done ;;
      quark)    $N "$V/quark/bin/python" "$P/quark.py" "$MODEL" --matmul-nbits ;;
      inc)      $N "$V/inc/bin/python" "$P/inc.py" "$MODEL" --weight-only ;;
      aimet)    $N "$V/aimet/bin/python" "$P/aimet.py" "$MODEL" --w8a8-only ;;
    esac
  done
  exit 0
fi
for peer in ${PEERS:-ours ours_ov ours_ov_int8 ort modelopt quark inc aimet}; do
  case "$peer" in
    ours)     "$P/ours.sh" "$MODEL" 0.1 0.03 0.05 0.15
              # more budgets where a peer's point sat between ours (the scorings of 2026-11-27/28)
              case "$MODEL" in
                minilm)   "$P/ours.sh" "$MODEL" 0.3; "$P/ours_metric.sh" 0.01 ;;
                resnet50) "$P/ours.sh" "$MODEL" 0.07 0.06 0.065 ;;  # between the 0.05 plan and all-int8
              esac
              "$P/ours_rejected.sh" "$MODEL" ;;
    ours_ov)  AMPQ_BACKEND=openvino:cpu "$P/ours.sh" "$MODEL" 0.1   # the plans made for OpenVINO (its column)
              # more budgets where a peer's OpenVINO point sat between ours (2026-11-27 scoring)
              case "$MODEL" in
                minilm)   AMPQ_BACKEND=openvino:cpu "$P/ours.sh" "$MODEL" 0.15 0.2 0.25 0.3 0.4
                          AMPQ_BACKEND=openvino:cpu "$P/ours_metric.sh" 0.01
                          # the attention's activation x activation MatMuls too (OpenVINO runs them in int8)
                          AMPQ_BACKEND=openvino:cpu AMPQ_FLAGS=--activation-matmuls AMPQ_TAG=actmm "$P/ours.sh" "$MODEL" 0.4 0.2 0.3 ;;
                resnet50) AMPQ_BACKEND=openvino:cpu "$P/ours.sh" "$MODEL" 0.05 0.07 0.03 0.04 0.055 0.06 ;;
                yolov8n)  AMPQ_BACKEND=openvino:cpu "$P/ours.sh" "$MODEL" 0.03 0.05 0.02 0.01 0.007 0.005 ;;
              esac
              "$P/ours_rejected.sh" "$MODEL" ;;
    # the same with ONNX Runtime's uint8 asymmetric activations (OpenVINO's int8 on request): slower, more accurate
    ours_ov_int8) AMPQ_BACKEND=openvino:cpu AMPQ_FORMATS=int8 "$P/ours.sh" "$MODEL" 0.1 ;;
    ort)      $N "$V/ort/bin/python" "$P/ort.py" "$MODEL" ;;
    modelopt) for c in int8_default int8_matmul; do $N "$V/modelopt/bin/python" "$P/modelopt.py" "$MODEL" --configs $c; done ;;
    quark)    $N "$V/quark/bin/python" "$P/quark.py" "$MODEL" --threshold $QTH ;;
    inc)      $N "$V/inc/bin/python" "$P/inc.py" "$MODEL" --tolerable-loss $TL
              # ResNet-50: INC's dynamic tuning configs crash on Conv with bias (recorded); its static set
              # alone never reached 0.05 in 16 trials, so the static set with 0.1
              [ "$MODEL" = minilm ] || $N "$V/inc/bin/python" "$P/inc.py" "$MODEL" --tolerable-loss 0.1 --config-set static ;;
    aimet)    $N "$V/aimet/bin/python" "$P/aimet.py" "$MODEL" --drop $DROP
              $N "$V/aimet/bin/python" "$P/aimet.py" "$MODEL" --w8a8-only
              if [ "$MODEL" != minilm ]; then  # CNN: also AIMET's default config, every quantizer on
                $N "$V/aimet/bin/python" "$P/aimet.py" "$MODEL" --w8a8-only --all-quantizers
                $N "$V/aimet/bin/python" "$P/aimet.py" "$MODEL" --drop $DROP --all-quantizers
              fi ;;
  esac
done
