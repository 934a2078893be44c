"""ONNX Runtime's own quantizers (`quantize_static` / `quantize_dynamic`), the settings
benchmarks/front.py found best on these models, with the same calibration samples, and, for
the decoder LM, its int4 weight-only quantizer (`MatMulNBitsQuantizer`, round-to-nearest: what
onnxruntime-genai's CPU models use). Runs in benchmarks/peers/.venvs/ort (setup.sh ort:
onnxruntime 1.32, onnx, onnx-ir, which the int4 quantizer needs; it does not import ampq_pass).
Each configuration runs in its own child process, so its wall time and peak RSS are its own.

    benchmarks/peers/.venvs/ort/bin/python benchmarks/peers/ort.py minilm [config ...]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peerlib  # noqa: E402

CONFIGS = {
    "dynamic_defaults": "quantize_dynamic, defaults",
    "dynamic_perchannel_matmul": "quant_pre_process, then quantize_dynamic per_channel=True, op_types MatMul/Gemm/Conv",
    "static_qdq_u8s8_perchannel": "quant_pre_process, then quantize_static QDQ, U8S8, per_channel, MinMax, "
                                  "reduce_range=False (ORT's default op types)",
    "static_qdq_u8s8_perchannel_matmul": "as static_qdq_u8s8_perchannel, op_types MatMul/Gemm/Conv only",
    # ORT's own advice for x86 CPUs without VNNI, whose u8s8 kernels saturate int16 pair sums:
    # 7-bit weights (the decoder LM's defaults hold both, so a CPU of either kind gets its best)
    "dynamic_perchannel_matmul_reduce_range": "as dynamic_perchannel_matmul with reduce_range=True (7-bit weights)",
    "static_qdq_u8s8_perchannel_matmul_reduce_range": "as static_qdq_u8s8_perchannel_matmul with reduce_range=True",
}
#: int4 weight-only (MatMul weights only, activations stay float): the decoder LM's configurations
INT4 = {
    "int4_rtn_block32": "MatMulNBitsQuantizer, 4 bits, block 32, symmetric, RTN, accuracy_level 4 (int8 "
                        "activations inside the kernel), QOperator (MatMulNBits)",
    "int4_rtn_block128": "as int4_rtn_block32 with ORT's default block 128",
}
CONFIGS.update(INT4)
#: the configurations run by default, per model kind
DEFAULT = {"lm": ["dynamic_perchannel_matmul", "static_qdq_u8s8_perchannel_matmul", *INT4,
                  "dynamic_perchannel_matmul_reduce_range", "static_qdq_u8s8_perchannel_matmul_reduce_range"]}


def produce(model: str, name: str) -> None:
    import logging

    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.ERROR)
    m = peerlib.meta(model)
    fp32 = peerlib.model_dir(model) / "fp32.onnx"
    calib = peerlib.batches(peerlib.load(model, "calib"), m["batch"])

    def run(out: Path):
        if name in INT4:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=int(name.rsplit("block", 1)[1]),
                                     is_symmetric=True, accuracy_level=4)
            q.process()
            q.model.save_model_to_file(str(out), False)
            return {"search_metric": peerlib.SearchMetric(model)(out)}
        pre = out.with_suffix(".pre.onnx")
        if name != "dynamic_defaults":
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        ops = {"op_types_to_quantize": ["MatMul", "Gemm", "Conv"]} if "_matmul" in name else {}
        reduce_range = name.endswith("_reduce_range")
        if name == "dynamic_defaults":
            quantize_dynamic(str(fp32), str(out))
        elif name.startswith("dynamic"):
            quantize_dynamic(str(pre), str(out), per_channel=True, reduce_range=reduce_range, **ops)
        else:
            quantize_static(str(pre), str(out), peerlib.Reader(calib), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=reduce_range, calibrate_method=CalibrationMethod.MinMax, **ops)
        pre.unlink(missing_ok=True)
        return {"search_metric": peerlib.SearchMetric(model)(out)}

    peerlib.record(model, "ort", name, run, knobs={"settings": CONFIGS[name], "calibration": m["calib"]},
                   packages=("onnxruntime", "onnx"))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        produce(sys.argv[2], sys.argv[3])
    else:
        for c in sys.argv[2:] or DEFAULT.get(peerlib.meta(sys.argv[1])["kind"], [c for c in CONFIGS if c not in INT4]):
            subprocess.run([sys.executable, __file__, "--one", sys.argv[1], c], check=False)
