"""AMD Quark for ONNX (`amd-quark` 0.13): `AutoMixprecisionConfig`, its automatic mixed precision
(per-layer sensitivity, then greedy promotion of the most sensitive layers to a higher precision
until its metric meets the threshold). Runs in benchmarks/peers/.venvs/quark
(benchmarks/peers/setup.sh quark; Quark imports torch without declaring it, so the CPU torch
goes in first; its first run compiles a custom-op library).

    benchmarks/peers/.venvs/quark/bin/python benchmarks/peers/quark.py minilm [--threshold 0.005]

Configuration (the one fit for ORT's CPU EP): global A8W8 (UInt8 activations, Int8 weights; the
layout ORT fuses into integer kernels), only MatMul/Gemm/Conv quantized (OpTypesToQuantize; with
every op quantized, as ORT's defaults, MiniLM loses its quality); AMP with
metric_optimize_object='quality' (start from all-A8W8 and promote layers to A16W16, Int16, the
precision Quark's AMP promotes to, until the metric is met), Quark's built-in metric 'cosine'
(mean cosine distance of the model output to the float model's) on the calibration samples it is
given (calib.npz, the same as our pass), metric_threshold = --threshold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peerlib  # noqa: E402

# this script is named like the peer's package: keep its folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != peerlib.HERE]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threshold", type=float, nargs="+", default=[0.005])
    ap.add_argument("--matmul-nbits", action="store_true",
                    help="the decoder LM: Quark's int4 weight-only MatMulNBits instead of its AMP")
    a = ap.parse_args()
    if a.matmul_nbits:
        return matmul_nbits(a.model)
    m = peerlib.meta(a.model)
    fp32 = peerlib.model_dir(a.model) / "fp32.onnx"
    calib = peerlib.batches(peerlib.load(a.model, "calib"), m["batch"])
    for th in a.threshold:
        def produce(out: Path, th=th):
            from quark.onnx import ModelQuantizer
            from quark.onnx.quantization.config.algorithm import AutoMixprecisionConfig
            from quark.onnx.quantization.config.config import QConfig
            from quark.onnx.quantization.config.spec import Int8Spec, Int16Spec, QLayerConfig, UInt8Spec

            amp = AutoMixprecisionConfig(target_layer_config=QLayerConfig(activation=Int16Spec(), weight=Int16Spec()),
                                         target_op_type=("MatMul", "Gemm", "Conv"), metric_default="cosine",
                                         metric_threshold=th, metric_optimize_object="quality")
            cfg = QConfig(global_config=QLayerConfig(activation=UInt8Spec(), weight=Int8Spec()), algo_config=[amp],
                          OpTypesToQuantize=["MatMul", "Gemm", "Conv"])
            import os

            os.chdir(out.parent)  # Quark writes quantized_info.csv into the working directory
            ModelQuantizer(cfg).quantize_model(str(fp32), str(out), calibration_data_reader=peerlib.Reader(calib))
            import onnx

            q = onnx.load(str(out), load_external_data=False)
            types = {}
            for n in q.graph.node:
                if n.op_type == "QuantizeLinear":
                    types[n.domain or "ai.onnx"] = types.get(n.domain or "ai.onnx", 0) + 1
            return {"search_metric": peerlib.SearchMetric(a.model)(out), "quantize_linear_by_domain": types}

        peerlib.record(a.model, "quark", f"amp_cosine{th:g}", produce,
                       knobs={"knob": f"metric_threshold={th:g} (cosine distance)", "metric_threshold": th,
                              "metric_default": "cosine", "metric_optimize_object": "quality",
                              "global_config": "A8W8 (UInt8 act, Int8 weight)", "promote_to": "A16W16 (Int16)",
                              "OpTypesToQuantize": ["MatMul", "Gemm", "Conv"], "calibration": m["calib"],
                              "metric_data": "the calibration samples (Quark's AMP evaluates on its data reader)"},
                       packages=("amd-quark", "onnxruntime", "onnx", "torch"))


def matmul_nbits(model: str) -> None:
    """Quark's int4 weight-only path (its MATMUL_NBITS default config, group 32 as ours,
    symmetric, accuracy level 4 as ORT's and INC's here)."""
    m = peerlib.meta(model)
    fp32 = peerlib.model_dir(model) / "fp32.onnx"
    calib = peerlib.batches(peerlib.load(model, "calib"), m["batch"])
    params = {"GroupSize": 32, "Symmetric": True, "Bits": 4, "AccuracyLevel": 4}

    def produce(out: Path):
        import os

        from quark.onnx import ModelQuantizer
        from quark.onnx.quantization.config.config import Config
        from quark.onnx.quantization.config.custom_config import get_default_config

        cfg = get_default_config("MATMUL_NBITS")
        cfg.extra_options["MatMulNBitsParams"] = dict(params)
        os.chdir(out.parent)
        ModelQuantizer(Config(global_quant_config=cfg)).quantize_model(str(fp32), str(out),
                                                                       calibration_data_reader=peerlib.Reader(calib))
        return {"search_metric": peerlib.SearchMetric(model)(out)}

    peerlib.record(model, "quark", "matmul_nbits_g32", produce,
                   knobs={"config": "MATMUL_NBITS (UseMatMulNBits)", "MatMulNBitsParams": params},
                   packages=("amd-quark", "onnxruntime", "onnx", "torch"))


if __name__ == "__main__":
    main()
