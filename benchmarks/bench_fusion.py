"""Issue 13 item 2: every convolution int8, rewritten with and without ONNX Runtime's fusion
rules (backends/ort_rules.py), against fp32 and ORT's own ``quantize_static`` (QDQ, per-channel,
U8S8), timed interleaved in one process on the ORT CPU EP with 2 threads.

Run: .venv/bin/python benchmarks/bench_fusion.py [resnet50] [cnn] [corpus:NAME ...]   -> benchmarks/results/fusion.md
     (corpus:NAME: any model of benchmarks/corpus, its calib.npz split as for resnet50;
     --timer=openvino:cpu times the same models on OpenVINO, plus the rewrite with OpenVINO's own table
     (backends/openvino_rules.py); --out=NAME.md names the result)

- resnet50: the corpus ResNet-50 (benchmarks/corpus/models/resnet50_classic, torch.onnx classic
  export of transformers' ResNetForImageClassification, random init), its calib.npz: the first
  32 samples calibrate, the last 16 (two batches of 8) are timed and compared.
- cnn: the repo's ResNet-18-shaped residual CNN (benchmarks/bench_models.py::resnet_cnn, random
  init), 64 random images calibrate, 16 others are timed and compared.

Quality: relative L2 error of the output to fp32 and top-1 agreement on the timed samples
(random weights: no task accuracy).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.append(str(Path(__file__).parent.parent))

from common import OUT, header, write  # noqa: E402

from ampq_pass.backends import get_backend  # noqa: E402
from ampq_pass.backends.ort import OrtBackend  # noqa: E402
from ampq_pass.backends.ort_rules import ORT_CPU_RULES  # noqa: E402
from ampq_pass.core.errors import AmpqError  # noqa: E402
from ampq_pass.core.fusion import FusionRules  # noqa: E402
from ampq_pass.core.measure import Protocol  # noqa: E402
from ampq_pass.core.model import load_model, save_model  # noqa: E402
from ampq_pass.core.ort import make_session  # noqa: E402
from ampq_pass.core.samples import Samples, load_samples  # noqa: E402
from ampq_pass.stages.calibrate import compute_ranges  # noqa: E402
from ampq_pass.stages.layers import find_layers  # noqa: E402
from ampq_pass.stages.plan import Plan  # noqa: E402
from ampq_pass.stages.rewrite import rewrite  # noqa: E402

CORPUS = Path(__file__).parent / "corpus"
#: --timer=SPEC times the same models on another backend (e.g. openvino:cpu); quality and node
#: counts stay ONNX Runtime's
TIMER: str | None = None
PROTOCOL = Protocol(warmup=2, min_repeats=12, max_repeats=40, rel_ci=0.01, max_seconds=300.0)
SHOWN = ("QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QLinearConcat", "MaxPool", "Relu", "Add",
         "QuantizeLinear", "DequantizeLinear")


def resnet50():
    path = CORPUS / "models/resnet50_classic/model.onnx"
    model = load_model(path)
    samples = load_samples(CORPUS / "models/resnet50_classic/calib.npz", model)
    calib, held = samples.split(16)
    return "ResNet-50 (corpus resnet50_classic, random init, 8 x 3 x 224 x 224)", path, model, calib, held


def corpus(name: str):
    path = CORPUS / f"models/{name}/model.onnx"
    model = load_model(path)
    samples = load_samples(CORPUS / f"models/{name}/calib.npz", model)
    calib, held = samples.split(16)
    return f"{name} (corpus)", path, model, calib, held


def cnn():
    from bench_models import resnet_cnn

    path = OUT / "resnet_cnn.onnx"
    if not path.exists():
        OUT.mkdir(exist_ok=True)
        save_model(resnet_cnn(0), path)
    model = load_model(path)
    rng = np.random.default_rng(10)
    calib = Samples({"image": rng.standard_normal((64, 3, 64, 64)).astype(np.float32)}, source="random")
    held = Samples({"image": np.random.default_rng(20).standard_normal((16, 3, 64, 64)).astype(np.float32)},
                   source="random")
    return "Residual CNN (bench_models.resnet_cnn, ResNet-18-shaped, random init, 8 x 3 x 64 x 64)", path, model, calib, held


def ort_quantize_static(path: Path, calib: Samples, out: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib.batches(8))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(out))


def optimized_ops(model: onnx.ModelProto, tag: str, tmp: Path) -> Counter:
    p = tmp / f"{tag}.opt.onnx"
    make_session(model, threads=2, spinning=False, optimized_path=str(p))
    return Counter(n.op_type for n in onnx.load(str(p)).graph.node)


def run_all(session, batches):
    return np.concatenate([session.run(None, b)[0] for b in batches])


def one(which: str) -> str:
    title, path, model, calib, held = ({"resnet50": resnet50, "cnn": cnn}[which]() if ":" not in which
                                       else corpus(which.split(":", 1)[1]))
    layers = find_layers(model)
    timer = OrtBackend(threads=2, protocol=PROTOCOL) if TIMER is None else get_backend(TIMER, protocol=PROTOCOL, threads=2)
    # the timing backend's own table, when it has one other than ONNX Runtime's
    own = timer.capabilities().rules if TIMER is not None else None
    own = own if own is not None and own.rules != ORT_CPU_RULES.rules else None
    # calibration once, for every tensor either table may quantize
    both = ORT_CPU_RULES if own is None else FusionRules("both", {**ORT_CPU_RULES.rules, **own.rules})
    t0 = time.perf_counter()
    ranges = compute_ranges(model, layers, calib, rules=both)
    calib_s = time.perf_counter() - t0
    plan = Plan({l.name: "int8" for l in layers if l.op_type == "Conv"})
    t0 = time.perf_counter()
    plain = rewrite(model, layers, plan, ranges)
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused = rewrite(model, layers, plan, ranges, rules=ORT_CPU_RULES)
    fused_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="ampq-bench-fusion-") as tmp:
        tmp = Path(tmp)
        ortq = ort_quantize_static(path, calib, tmp / "ort_qdq.onnx")
        models = {"fp32": model, "int8 convs (layers only)": plain, "int8 convs + ORT rules": fused}
        if own is not None:
            models[f"int8 convs + {own.name} rules"] = rewrite(model, layers, plan, ranges, rules=own)
        models["ORT quantize_static QDQ U8S8 per-channel"] = ortq
        ops = {k: optimized_ops(m, f"m{i}", tmp) for i, (k, m) in enumerate(models.items())}
    batches = list(held.batches(8))
    backend = OrtBackend(threads=2, protocol=PROTOCOL)
    sessions = {k: backend.session(m) for k, m in models.items()}  # quality: ORT's numerics
    ref = run_all(sessions["fp32"], batches)
    quality = {}
    for k, s in sessions.items():
        y = run_all(s, batches)
        quality[k] = (float(np.linalg.norm(y - ref) / np.linalg.norm(ref)),
                      float((y.reshape(len(y), -1).argmax(-1) == ref.reshape(len(ref), -1).argmax(-1)).mean()))
    del sessions
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    timings = timer.time(models, batches)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    n = len(timings["fp32"].samples)
    text = f"## {title}\n\n"
    text += f"Timed on {timer.name} ({timer.capabilities().device}).\n" if TIMER is not None else ""
    text += (f"{len(plan.formats)} Conv layers int8 (Gemm head fp32 in our plans; quantize_static quantizes every op "
             f"its registry knows, the head included); calibration: {len(calib)} samples, MinMax "
             f"({calib_s:.0f} s, rule tensors included); rewrite {plain_s:.1f} s without rules, {fused_s:.1f} s with.\n"
             f"Timing: {n} interleaved rounds over {len(batches)} batches of 8 ({wall:.0f} s); load average "
             f"(1/5/15 min) {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} before, "
             f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after.\n\n")
    text += "| model | median ms | 95% CI ms | speed-up vs fp32 | vs layers only | rel. error | top-1 agree |\n"
    text += "|---|---|---|---|---|---|---|\n"
    hp, lay = timings["fp32"].median, timings["int8 convs (layers only)"].median
    for k, t in timings.items():
        err, top = quality[k]
        text += (f"| {k} | {t.median * 1e3:.1f} | {t.ci_low * 1e3:.1f}-{t.ci_high * 1e3:.1f} | {hp / t.median:.2f}x | "
                 f"{lay / t.median:.2f}x | {err:.4f} | {top:.3f} |\n")
    # the ratio of the two rewrites round by round (same round, same batch: drift cancels)
    from ampq_pass.core.measure import median_ci

    a = np.asarray(timings["int8 convs (layers only)"].samples)
    text += "\n"
    for k in [k for k in timings if k.startswith("int8 convs + ")]:
        b = np.asarray(timings[k].samples)
        lo, hi = median_ci(a / b)
        text += f"Per-round ratio layers-only / {k[len('int8 convs + '):]}: median {np.median(a / b):.3f}x (95% CI {lo:.3f}-{hi:.3f}).\n"
    if own is not None:
        b, c = (np.asarray(timings[k].samples) for k in ("int8 convs + ORT rules", f"int8 convs + {own.name} rules"))
        lo, hi = median_ci(b / c)
        text += f"Per-round ratio ORT rules / {own.name} rules: median {np.median(b / c):.3f}x (95% CI {lo:.3f}-{hi:.3f}).\n"
    text += "\n"
    text += "ONNX Runtime's optimized graph (ORT_ENABLE_ALL, CPU EP), node counts:\n\n"
    text += "| model | " + " | ".join(SHOWN) + " |\n|---|" + "---|" * len(SHOWN) + "\n"
    for k, c in ops.items():
        text += f"| {k} | " + " | ".join(str(c.get(o, 0)) for o in SHOWN) + " |\n"
    return text + "\n"


def main(which: list[str], out: str = "fusion.md") -> None:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
    text = header("ORT fusion rules: every conv int8, with and without the rules (issue 13 item 2)")
    text += f"`lscpu` Model name: {name}. ORT CPU EP, 2 intra-op threads, spinning off.\n\n"
    for w in which:
        try:
            text += one(w)
        except AmpqError as e:  # e.g. a model the timing backend cannot load at all, fp32 included
            text += f"## {w}\n\nNot timed: {e}\n\n"
        write(out, text)


if __name__ == "__main__":
    args = sys.argv[1:]
    out = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), "fusion.md")
    TIMER = next((a.split("=", 1)[1] for a in args if a.startswith("--timer=")), None)
    main([a for a in args if not a.startswith("--")] or ["cnn", "resnet50"], out)
