"""Probe (issue 15, YOLOv8n on OpenVINO): NVIDIA ModelOpt's file dequantizes an activation once for
the conv and the Add/Concat beside it; ours feeds each DQ to convs only. This rewires our plan's
Add/Concat inputs to the DQ of the same tensor, as ModelOpt's file does, and times fp32, ours, the
rewired plan and ModelOpt's int8_matmul interleaved in one OpenVINO run on 8 evaluation images
(the project's OpenVINO adapter), printing each one's output error on OpenVINO too.

    .venv/bin/python benchmarks/peers/dq_sharing_probe.py   # after run_all.sh yolov8n
"""
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from ampq_pass.backends import get_backend
from ampq_pass.core import ort

Y = ROOT / "benchmarks/out/peers/yolov8n"


def share_dq(model: onnx.ModelProto, ops=("Add", "Concat")) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose ``ops`` read the DQ output of any float tensor that a Q/DQ pair
    reproduces, in place of the tensor itself; and how many inputs were rewired."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    prod = {o: n for n in out.graph.node for o in n.output}
    dq_of = {}  # float tensor -> the DQ output that reproduces it
    for n in out.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in prod and prod[n.input[0]].op_type == "QuantizeLinear":
            dq_of.setdefault(prod[n.input[0]].input[0], n.output[0])
    changed = 0
    for n in out.graph.node:
        if n.op_type in ops:
            for i, x in enumerate(n.input):
                if x in dq_of:
                    n.input[i] = dq_of[x]
                    changed += 1
    return out, changed


def main() -> None:
    ours = onnx.load(Y / "ours/openvino_rmse_0.3.onnx")
    variant, k = share_dq(ours)
    print("rewired inputs", k)
    feeds = {"images": np.load(Y / "eval.npz")["images"][:8]}
    fp32 = onnx.load(Y / "fp32.onnx")
    backend = get_backend("openvino:cpu")
    ref = ort.run_batches(fp32, [feeds])[0]
    models = {"hp": fp32, "ours": ours, "variant": variant, "modelopt": onnx.load(Y / "modelopt/int8_matmul.onnx")}
    for name in ("ours", "variant", "modelopt"):
        got = backend.outputs(models[name], [feeds])[0]
        err = np.sqrt(sum(float(np.sum((got[k] - ref[k]) ** 2)) for k in ref) / sum(float(np.sum(ref[k] ** 2)) for k in ref))
        print(name, "relative output error on OpenVINO", round(err, 4))
    t = backend.time(models, [feeds])
    for name, timing in t.items():
        print(name, round(timing.median * 1e3, 2), "ms, speed-up over fp32", round(t["hp"].median / timing.median, 3))


if __name__ == "__main__":
    main()
