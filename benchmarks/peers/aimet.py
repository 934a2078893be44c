"""Qualcomm AIMET for ONNX (`aimet-onnx` 2.42): `aimet_onnx.mixed_precision.choose_mixed_precision`,
its automatic mixed precision (phase 1: per-quantizer-group sensitivity at each candidate;
phase 2: search along the bit-ops / accuracy Pareto curve until `allowed_accuracy_drop`).
Runs in benchmarks/peers/.venvs/aimet (benchmarks/peers/setup.sh aimet).

    benchmarks/peers/.venvs/aimet/bin/python benchmarks/peers/aimet.py minilm [--drop 0.005 0.01]

Setup, as issue 15 found necessary:
- QuantizationSimModel(min_max, W8A8) on CPUExecutionProvider. Its default config quantizes
  every op output (the attention-mask Add included: MiniLM's cosine falls to 0.34), so every
  quantizer whose tensor does not feed a MatMul/Gemm/Conv (as an activation input or weight)
  is disabled: what is left is the quantization ORT can run as integer kernels.
- candidates: W8A8 int and W16A16 float. ORT's CPU EP has no fast int16 or fp16 kernels, so
  a group AIMET leaves in float16 is exported in fp32 (its quantizers disabled before
  `to_onnx_qdq`); the W8A8 groups become QDQ pairs that ORT fuses into integer kernels.
- callbacks: CallbackFunc; encodings from calib.npz (the same samples as our pass); AIMET's eval
  (both phases): peerlib.SearchMetric on search.npz (MiniLM: mean cosine to fp32; classifier: top-1 - rel.
  error; detector: 1 - rel. error).
- `--w8a8-only`: no search, every remaining quantizer W8A8 (AIMET's plain PTQ).
- `--all-quantizers`: AIMET's default config kept (no quantizer disabled). On a CNN, ORT fuses
  DQ->Conv->Q into QLinearConv only when the conv's output is quantized as well, which the
  MatMul/Conv-input rule above disables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peerlib  # noqa: E402

FEEDS_OPS = {"MatMul", "Gemm", "Conv"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--drop", type=float, nargs="+", default=[0.005])
    ap.add_argument("--w8a8-only", action="store_true")
    ap.add_argument("--all-quantizers", action="store_true",
                    help="keep AIMET's default config (every quantizer on): for CNNs, where ORT fuses "
                         "Q->Conv->Relu->Q chains only when the conv outputs are quantized too")
    a = ap.parse_args()
    import numpy as np
    import onnx
    from aimet_onnx.common.defs import CallbackFunc, QuantizationDataType, QuantScheme
    from aimet_onnx.mixed_precision import choose_mixed_precision
    from aimet_onnx.quantsim import QuantizationSimModel

    m = peerlib.meta(a.model)
    fp32_path = peerlib.model_dir(a.model) / "fp32.onnx"
    calib = peerlib.batches(peerlib.load(a.model, "calib"), m["batch"])
    metric = peerlib.SearchMetric(a.model)
    names_in = None

    def run_session(sess, feeds):
        nonlocal names_in
        names_in = names_in or {i.name for i in sess.get_inputs()}
        return [sess.run(None, {k: v for k, v in f.items() if k in names_in})[0] for f in feeds]

    def forward(sess, _args):
        run_session(sess, calib)

    def evaluate(sess, _args):
        metric.calls += 1
        return metric.score(run_session(sess, metric.feeds))

    def make_sim(tmp):
        model = onnx.load(str(fp32_path))
        consumers: dict[str, set] = {}
        for n in model.graph.node:
            for t in n.input:
                consumers.setdefault(t, set()).add(n.op_type)
        sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme=QuantScheme.min_max,
                                   providers=["CPUExecutionProvider"], path=tmp)
        kept, off = 0, 0
        for name, q in sim.qc_quantize_op_dict.items():
            if not a.all_quantizers and not consumers.get(name, set()) & FEEDS_OPS:
                if q.enabled:
                    q.enabled = False
                    off += 1
            elif q.enabled:
                kept += 1
        return sim, {"quantizers_kept": kept, "quantizers_disabled": off}

    def export(sim, out: Path):
        nfloat = 0
        for q in sim.qc_quantize_op_dict.values():
            if q.enabled and q.data_type == QuantizationDataType.float:
                q.enabled = False  # AIMET's float16 candidate: fp32 on ORT CPU (no fast fp16 kernels)
                nfloat += 1
        qdq = sim.to_onnx_qdq()
        onnx.save_model(qdq, str(out))
        nq = sum(1 for n in qdq.graph.node if n.op_type == "QuantizeLinear")
        return {"float_quantizers_exported_fp32": nfloat, "quantize_linear_nodes": nq}

    knobs_common = {"quant_scheme": "min_max", "calibration": m["calib"],
                    "disabled": "none (AIMET's default config)" if a.all_quantizers
                    else "quantizers whose tensor feeds no MatMul/Gemm/Conv",
                    "eval": peerlib.SearchMetric.DESCRIBED[m["kind"]]}
    pkgs = ("aimet-onnx", "onnxruntime", "onnx", "torch")
    if a.w8a8_only:
        def produce_w8a8(out: Path):
            with tempfile.TemporaryDirectory() as tmp:
                sim, info = make_sim(tmp)
                sim.compute_encodings(forward, None)
                info["search_metric"] = evaluate(sim.session, None)
                info.update(export(sim, out))
                return info
        peerlib.record(a.model, "aimet", "w8a8_all" if a.all_quantizers else "w8a8_matmul", produce_w8a8, knobs={**knobs_common, "search": "none (PTQ)"},
                       packages=pkgs)
        return
    candidates = [((16, QuantizationDataType.float), (16, QuantizationDataType.float)),
                  ((8, QuantizationDataType.int), (8, QuantizationDataType.int))]
    for drop in a.drop:
        def produce(out: Path, drop=drop):
            with tempfile.TemporaryDirectory() as tmp:
                sim, info = make_sim(tmp)
                sim.compute_encodings(forward, None)
                pareto = choose_mixed_precision(
                    sim, candidates, CallbackFunc(evaluate, None), CallbackFunc(evaluate, None),
                    allowed_accuracy_drop=drop, results_dir=str(Path(tmp) / "amp"), clean_start=True,
                    forward_pass_callback=CallbackFunc(forward, None), use_all_amp_candidates=True)
                info["search_metric"] = evaluate(sim.session, None)
                info["pareto_points"] = len(pareto) if pareto else 0
                info["evaluations"] = metric.calls
                info.update(export(sim, out))
                return info
        peerlib.record(a.model, "aimet", f"amp_drop{drop:g}" + ("_all" if a.all_quantizers else ""), produce,
                       knobs={**knobs_common, "allowed_accuracy_drop": drop,
                              "candidates": "W16A16 float (exported fp32), W8A8 int",
                              "amp_search_algo": "Binary (default)", "phase1_optimize": True},
                       packages=pkgs)


if __name__ == "__main__":
    main()
