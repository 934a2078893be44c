"""NVIDIA ModelOpt (`nvidia-modelopt` 0.47) ONNX PTQ, on CPU. Runs in
benchmarks/peers/.venvs/modelopt (benchmarks/peers/setup.sh modelopt: without the [onnx] extra,
which pulls GPU onnxruntime and a CUDA torch; CPU onnxruntime instead).

    benchmarks/peers/.venvs/modelopt/bin/python benchmarks/peers/modelopt.py minilm

ModelOpt has no accuracy-driven mixed-precision search for ONNX on CPU: its latency autotune
needs TensorRT and AutoQuantize is PyTorch only. So this is its ONNX INT8 PTQ, as a point:
- `int8_default`: quantize_mode='int8', its default op types and calibration method,
  high_precision_dtype='fp32' (its default fp16 would put Casts everywhere: no fast fp16 on CPU),
  calibration_eps=['cpu'];
- `int8_matmul`: the same, only MatMul/Gemm/Conv quantized (what ORT's CPU EP runs in int8) and
  no QDQ in the attention (disable_mha_qdq);
- `int4_rtn` / `int4_awq_clip` (the decoder LM): quantize_mode='int4', its weight-only int4
  (round-to-nearest DQ, or AWQ with clipping, calibrated), block 32 as ours, MatMul weights only;
  ONNX Runtime fuses its DQ -> MatMul into MatMulNBits.
Calibration: calib.npz, the same samples as our pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peerlib  # noqa: E402

# this script is named like the peer's package: keep its folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != peerlib.HERE]

CONFIGS = {
    "int8_default": {},
    "int8_matmul": {"op_types_to_quantize": ["MatMul", "Gemm", "Conv"], "disable_mha_qdq": True},
    "int4_rtn": {"quantize_mode": "int4", "calibration_method": "rtn_dq", "block_size": 32},
    "int4_awq_clip": {"quantize_mode": "int4", "calibration_method": "awq_clip", "block_size": 32},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    a = ap.parse_args()
    m = peerlib.meta(a.model)
    fp32 = peerlib.model_dir(a.model) / "fp32.onnx"
    calib = peerlib.load(a.model, "calib")
    for name in a.configs:
        kw = dict({"quantize_mode": "int8"}, high_precision_dtype="fp32", calibration_eps=["cpu"], **CONFIGS[name])

        def produce(out: Path, kw=kw):
            from modelopt.onnx.quantization import quantize

            quantize(str(fp32), calibration_data=calib, output_path=str(out), **kw)
            metric = peerlib.SearchMetric(a.model)
            return {"search_metric": metric(out)}

        peerlib.record(a.model, "modelopt", name, produce,
                       knobs={**kw, "calibration": m["calib"], "calibration_method": kw.get("calibration_method",
                              "ModelOpt's default for int8")},
                       packages=("nvidia-modelopt", "onnxruntime", "onnx", "torch"))


if __name__ == "__main__":
    main()
