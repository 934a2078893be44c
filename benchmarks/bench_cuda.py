"""ONNX Runtime's CUDA EP on a lent GPU: which formats, as the rewrite writes them, run fast,
and the whole pass timing on it.

    python benchmarks/bench_cuda.py --out DIR [--offer int4] [--skip-pass]

Run by benchmarks/gpu_check.sh on the device machine (onnxruntime-gpu carried as a wheel;
no GPU on the project's own machines). Writes DIR/cuda.md.

1. Probe: every format on two MatMuls at two shapes, timed interleaved on ``ort:cuda`` (inputs
   and outputs bound in GPU memory) next to ``ort:cpu``: 8 x 128 tokens through 384x1536 /
   1536x384 (the CPU probe's shape, compute-bound) and one token through 4096x4096 twice (a
   decode step, weight-bound). For each format the ops ONNX Runtime actually ran on CUDA are
   read from the optimised graph (is int4 fused into MatMulNBits, int8 into anything?).
2. The pass: a BERT encoder with all-MiniLM-L6-v2's shape (transformers ``BertModel``, RANDOM
   init: no download) exported by the classic torch exporter, then ``ampq-pass --backend
   ort:cuda``. ``--offer`` names formats the CUDA EP is asked to offer for this run beyond
   what ``PROVIDERS`` lists, so the pass's own measurements decide (labelled in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from common import two_matmuls  # noqa: E402

from ampq_pass.backends import get_backend  # noqa: E402
from ampq_pass.core.measure import Protocol  # noqa: E402

PROTOCOL = Protocol(warmup=10, min_repeats=30, max_repeats=200, rel_ci=0.01, max_seconds=8)
FORMATS = ("int8", "int8_dyn", "int4", "fp16", "bf16", "fp8_e4m3")


def cuda_ops(model: onnx.ModelProto) -> str:
    """Op types in ONNX Runtime's optimised graph for the CUDA EP (what really ran)."""
    from ampq_pass.core.ort import make_session

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opt.onnx")
        make_session(model, provider="CUDAExecutionProvider", optimized_path=path)
        ops = [n.op_type for n in onnx.load(path).graph.node]
    return ", ".join(f"{op}x{ops.count(op)}" if ops.count(op) > 1 else op for op in dict.fromkeys(ops))


def fp16_compute(model: onnx.ModelProto, *, chain: bool) -> onnx.ModelProto:
    """``model`` with its MatMuls computing in fp16 (weights stored in fp16, no Cast on them): what
    a 16-bit *compute* format would write, which the rewrite does not (its fp16/bf16 formats cast
    around an fp32 op). ``chain=False``: each MatMul casts its input down and its output up (a
    per-layer format with fp32 between layers); ``chain=True``: one Cast down at the model input and
    one up at its output, everything between in fp16 (fp16 cut states)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    weights = {t.name for t in g.initializer}
    for t in g.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    x, y = g.input[0].name, g.output[0].name
    nodes = []
    if chain:
        nodes.append(helper.make_node("Cast", [x], [x + "_h"], to=TensorProto.FLOAT16))
        for n in g.node:
            n.input[:] = [i if i in weights else i + "_h" for i in n.input]
            n.output[:] = [o + "_h" for o in n.output]
            nodes.append(n)
        nodes.append(helper.make_node("Cast", [y + "_h"], [y], to=TensorProto.FLOAT))
    else:
        for n in g.node:
            if n.op_type == "MatMul":
                a, out = n.input[0], n.output[0]
                nodes.append(helper.make_node("Cast", [a], [a + "_h"], to=TensorProto.FLOAT16))
                n.input[0], n.output[0] = a + "_h", out + "_h"
                nodes += [n, helper.make_node("Cast", [out + "_h"], [out], to=TensorProto.FLOAT)]
            else:
                nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


def probe(tokens: tuple[int, int], d: int, hidden: int) -> list[str]:
    from ampq_pass.core.samples import Samples
    from ampq_pass.stages.calibrate import compute_ranges
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite

    model = two_matmuls("batch", tokens[1], d, hidden)  # calibration batches samples along axis 0
    layers = find_layers(model)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, *tokens, d)).astype(np.float32)
    ranges = compute_ranges(model, layers, Samples({"x": x.reshape(-1, *tokens[1:], d)}, source="random"))
    models = {"fp32": model}
    for fmt in FORMATS:
        try:
            models[fmt] = rewrite(model, layers, Plan({l.name: fmt for l in layers}), ranges)
        except Exception as e:  # a format a layer does not accept
            print(f"skip {fmt}: {e}", flush=True)
    models["fp16 compute, per layer (not a format yet)"] = fp16_compute(model, chain=False)
    models["fp16 compute, chain (not a format yet)"] = fp16_compute(model, chain=True)
    inputs = [{"x": x[i]} for i in range(4)]
    res, refused = {}, {}
    for spec in ("ort:cuda", "ort:cpu"):
        backend = get_backend(spec, protocol=PROTOCOL)
        runnable = {}
        for k, m in models.items():  # a format one provider cannot load is reported, the rest timed
            try:
                backend.session(m)
                runnable[k] = m
            except Exception as e:
                refused[(spec, k)] = str(e).split("(", 1)[-1][:90]
        res[spec] = backend.time(runnable, inputs)
    lines = [f"### {tokens[0]} x {tokens[1]} tokens, MatMuls {d}x{hidden} / {hidden}x{d}\n",
             "| format | CUDA EP ms (95% CI) | x fp32 | ops run on CUDA | CPU EP ms (2 threads) | x fp32 |",
             "|---|---|---|---|---|---|"]
    def cell(spec, k, digits):
        t, t0 = res[spec].get(k), res[spec]["fp32"]
        if t is None:
            return f"refused: {refused[(spec, k)]} | -"
        ci = f" ({t.ci_low * 1e3:.{digits}f}-{t.ci_high * 1e3:.{digits}f})" if digits == 3 else ""
        return f"{t.median * 1e3:.{digits}f}{ci} | {t0.median / t.median:.2f}x"

    for k, m in models.items():
        try:
            ops = cuda_ops(m)
        except Exception as e:  # reported, not fatal: the timing above ran
            ops = f"(not read: {str(e).splitlines()[0][:60]})"
        lines.append(f"| {k} | {cell('ort:cuda', k, 3)} | {ops} | {cell('ort:cpu', k, 2)} |")
    return lines + [""]


def export_minilm_shape(path: Path) -> None:
    """A BertModel with all-MiniLM-L6-v2's configuration, RANDOM init, classic exporter."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)
    bert = BertModel(cfg).eval()

    class Encoder(torch.nn.Module):  # keyword call: BertModel's positional order changes between releases
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = Encoder().eval()
    ids = torch.randint(0, 30522, (8, 128))
    mask = torch.ones(8, 128, dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                        "last_hidden_state": {0: "batch", 1: "seq"}})


def run_pass(out: Path, offer: tuple[str, ...], budget: float) -> list[str]:
    from ampq_pass.backends import ort as ort_backend
    from ampq_pass.cli.main import main as cli

    src = out / "bert_minilm_shape.onnx"
    t = time.time()
    export_minilm_shape(src)
    lines = [f"## The pass on ort:cuda: BERT with all-MiniLM-L6-v2's shape (RANDOM init, classic exporter, "
             f"exported in {time.time() - t:.0f} s)\n"]
    full, fast, hp = ort_backend.PROVIDERS["cuda"]
    if offer:
        # this run only: the pass's own subgraph timings decide whether the offered format helps
        ort_backend.PROVIDERS["cuda"] = (full, tuple(dict.fromkeys(fast + offer)), hp)
        lines.append(f"Formats offered for this run: {', '.join(ort_backend.PROVIDERS['cuda'][1])} "
                     f"(PROVIDERS lists: {', '.join(fast) or 'hp only'}).\n")
    dst, report = out / "bert_cuda_plan.onnx", out / "bert_cuda_report.json"
    t = time.time()
    rc = cli([str(src), "-o", str(dst), "--backend", "ort:cuda", "--max-loss-rmse", str(budget),
              "--time-budget", "200", "--report", str(report), "--no-progress"])
    lines.append(f"`ampq-pass bert_minilm_shape.onnx -o bert_cuda_plan.onnx --backend ort:cuda --max-loss-rmse "
                 f"{budget} --time-budget 200`: exit {rc} in {time.time() - t:.0f} s\n")
    if report.exists():
        r = json.loads(report.read_text())
        keep = {k: r.get(k) for k in ("backend", "numerics", "predicted", "measured", "rejected_plan", "time_budget", "seconds")}
        keep["rounds"] = [{k: v for k, v in rd.items() if not isinstance(v, (dict, list))} for rd in r.get("rounds", [])]
        counts: dict[str, int] = {}
        for layer in r.get("layers", []):
            counts[layer.get("format")] = counts.get(layer.get("format"), 0) + 1
        lines += ["```", json.dumps(keep, indent=1, default=str)[:6000], "```", f"plan formats: {counts}", ""]
    return lines


def environment() -> list[str]:
    import onnxruntime as ort
    import torch

    smi = (subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else "no nvidia-smi")
    return [f"# ONNX Runtime CUDA EP on a lent GPU ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
            f"GPU: {smi}; onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}); "
            f"onnx {onnx.__version__}; torch {torch.__version__}; Python {platform.python_version()}; "
            f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
            f"load {os.getloadavg()[0]:.2f}\n"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--offer", default="", help="comma-separated formats the CUDA EP offers in the pass run")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--skip-pass", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    doc = args.out / "cuda.md"
    lines = environment() + ["## Probe: every format as the rewrite writes it, interleaved, "
                             f"protocol {PROTOCOL.key()}\n"]
    doc.write_text("\n".join(lines))
    for shape in (((8, 128), 384, 1536), ((1, 1), 4096, 4096)):
        lines += probe(*shape)
        doc.write_text("\n".join(lines))
        print("\n".join(lines[-12:]), flush=True)
    if not args.skip_pass:
        lines += run_pass(args.out, tuple(f for f in args.offer.split(",") if f), args.budget)
        doc.write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
