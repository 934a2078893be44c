"""Two real backends side by side: ONNX Runtime's CPU EP and OpenVINO's CPU plugin.

    .venv/bin/python benchmarks/bench_backends.py --probe          # which formats each runs fast
    .venv/bin/python benchmarks/bench_backends.py [--resnet] [--detector] [--no-minilm]
                                                       # + MiniLM (ResNet-50, YOLOv8n) plans

Probe: two MatMuls 384x1536 / 1536x384 on 8 x 128 tokens, every format as the rewrite writes
it, timed interleaved on both backends (this is what ``MEASURED_FAST`` in
backends/openvino.py and ``PROVIDERS`` in backends/ort.py rest on).

Plans: the whole pass is run twice at the same budget, once timing on ``ort:cpu`` and once on
``openvino:cpu``; both written models and the fp32 model are then timed on both backends in
one process (each backend's three models interleaved in the same rounds), with speed-ups
over ORT fp32, and (MiniLM) the sentence-embedding cosine to fp32 on held-out sentences as
each backend computes it. Writes benchmarks/results/backends.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, header, minilm_path, two_matmuls, write  # noqa: E402

from ampq_pass.backends import get_backend  # noqa: E402
from ampq_pass.core.measure import Protocol  # noqa: E402

PROTOCOL = Protocol(warmup=5, min_repeats=15, max_repeats=60, rel_ci=0.01, max_seconds=60)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


#: the probe's shapes (batch, tokens, d, hidden): many tokens (compute-bound: MiniLM's MLP at
#: batch 8) and one token through 4096x4096 twice (a decode step: reading the weights is the cost)
PROBE_SHAPES = ((8, 128, 384, 1536), (1, 1, 4096, 4096))


def probe() -> str:
    return "\n".join(probe_shape(*shape) for shape in PROBE_SHAPES)


def probe_shape(batch: int, tokens: int, d: int, hidden: int) -> str:
    from ampq_pass.core.samples import Samples
    from ampq_pass.stages.calibrate import compute_ranges
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite

    model = two_matmuls(batch, tokens, d, hidden)
    layers = find_layers(model)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, batch, tokens, d)).astype(np.float32)
    samples = Samples({"x": x.reshape(4 * batch, tokens, d)[:batch]}, source="random")  # the model's fixed batch
    ranges = compute_ranges(model, layers, samples)
    models = {"fp32": model}
    for fmt in ("int8", "int8_sym", "int8_dyn", "int4", "int4_b128", "fp16", "bf16", "fp8_e4m3"):
        try:
            models[fmt] = rewrite(model, layers, Plan({l.name: fmt for l in layers}), ranges)
        except Exception as e:  # a format a layer does not accept
            print(f"skip {fmt}: {e}")
    inputs = [{"x": x[i]} for i in range(4)]
    lines = [f"## Probe: formats as written, two MatMuls {d}x{hidden} / {hidden}x{d}, {batch} x {tokens} tokens, "
             f"2 threads\n",
             f"load average before (1/5/15 min): {load()}\n",
             "| format | ORT CPU EP ms | x fp32 | OpenVINO CPU ms | x fp32 |", "|---|---|---|---|---|"]
    res = {}
    for spec in ("ort:cpu", "openvino:cpu"):
        b = get_backend(spec, protocol=PROTOCOL)
        res[spec] = b.time(models, inputs)
    for k in models:
        o, v = res["ort:cpu"].get(k), res["openvino:cpu"].get(k)
        cell = lambda t, base: (f"{t.median * 1e3:.2f} | {base.median / t.median:.2f}x" if t else "- | -")
        lines.append(f"| {k} | {cell(o, res['ort:cpu']['fp32'])} | {cell(v, res['openvino:cpu']['fp32'])} |")
    lines.append(f"\nload average after: {load()}\n")
    return "\n".join(lines)


SPECS = ("ort:cpu", "openvino:cpu")

CONVENTIONS = """## OpenVINO's QDQ conventions (CPU plugin, what its low-precision transformations run in int8)

Sources: the LPT guide (docs.openvino.ai, "OpenVINO Low Precision Transformations", "Low Precision
IR (INT8 Inference)", "ConvolutionTransformation") and the CPU plugin's LPT configuration
(openvinotoolkit/openvino, src/plugins/intel_cpu/src/transformations/transformation_pipeline.cpp,
`Transformations::Lpt`); checked on this machine in the compiled graph's runtime precisions.

- The ONNX frontend turns QuantizeLinear->DequantizeLinear into FakeQuantize; an op runs in int8
  only when *every* quantized input (data and weights) has one: Q/DQ belong on the inputs of
  Conv/MatMul, the dequantization is then propagated down through precision-preserving ops.
- MatMul: input 0 u8 or i8, input 1 **i8 only**. Weights: i8 (symmetric, per output channel is
  fine). An activation-by-activation MatMul (attention scores) needs its *second* input
  quantized to signed int8; with the project's uint8 activation Q/DQ it stays in f32.
- Convolution / GroupConvolution: activations u8; i8 only on AMX or AVX2-VNNI-2 CPUs; weights i8.
  Activation quantization must be per-tensor (granularity restriction on port 0; the
  ConvolutionTransformation page: "Dequantization on activations must be per-tensor").
- ConvTranspose (ConvolutionBackpropData): skipped by the CPU plugin when the activation or the
  weight quantization is asymmetric, so a uint8 activation with a non-zero zero point stays f32.
- The project's int8 (uint8 per-tensor activation Q->DQ, int8 symmetric per-output-channel weight
  DQ) matches Conv and MatMul-with-weight: compiled as u8 x i8 FullyConnected / Convolution.
- DynamicQuantizeLinear + MatMulInteger (the `int8_dyn` format, ORT's dynamic quantization) is not
  fused: it runs as Reduce/Convert/i32 FullyConnected nodes, slower than fp32 (probe below).
- 16-bit Cast pairs (`fp16`, `bf16`) are not 16-bit kernels: with the f32 inference precision the
  fp16 pair is folded away (fp32 kernel, no rounding), the bf16 pair stays as a separate op.
- The CPU plugin's default inference precision on AMX/AVX512_BF16 CPUs is bf16 (read here), so
  the adapter pins `INFERENCE_PRECISION_HINT=f32` for an fp32 "hp".
"""


def plans_for(name: str, src: Path, samples, holdout: int, bound: dict) -> tuple[dict[str, Path], dict[str, dict]]:
    """The pass run once per backend with the same bound (``run_pass`` keywords: a loss budget,
    or a metric and its drop): written model and report per backend."""
    from ampq_pass.pipeline import run_pass

    out, reports = {}, {}
    for spec in SPECS:
        dst = OUT / f"{name}_{spec.replace(':', '_')}_plan.onnx"
        t0 = time.perf_counter()
        result = run_pass(src, dst, samples=samples, holdout=holdout, backend=spec,
                          cache_dir=str(OUT / "cache_backends"), **bound)
        r = result.report
        n = sum(1 for l in r["layers"] if l["format"] != "hp")
        print(f"{name} plan for {spec}: {n} layers quantized, predicted {r.get('predicted')}, measured "
              f"{r.get('measured')} in {time.perf_counter() - t0:.0f} s (load {load()})")
        out[spec] = dst
        reports[spec] = dict(r, seconds=time.perf_counter() - t0)
        # the whole report beside the plan: its rounds say which plan shipped and why
        (OUT / f"{name}_{spec.replace(':', '_')}_report.json").write_text(json.dumps(reports[spec], default=str))
    return out, reports


def ort_static(src: Path, samples, holdout: int, batch: int) -> Path | None:
    """ONNX Runtime's ``quantize_static`` QDQ U8S8 per-channel on the calibration samples (the
    reference issue 14's ResNet-50 target names); None when it fails."""
    from front import ort_baselines

    calib = {k: v[:-holdout] for k, v in samples.inputs.items()}
    n = len(next(iter(calib.values())))
    batches = [{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n, batch)]
    name = "ort static: raw, QDQ, U8S8, per-channel"
    made = ort_baselines(src, batches, OUT / f"backends_{src.parent.name}_ort_static", skip=())
    path, note = made.get(name, ("", "not run"))
    print(f"{name}: {note}")
    return Path(path) if path else None


def prediction_rows(reports: dict[str, dict]) -> list[str]:
    """Each backend's own plan: predicted against measured speed-up inside its pass (issue 14's
    prediction-error target), with the pass's wall time."""
    rows = ["| plan made on | layers quantized | formats | predicted | measured in the pass | error | pass s |",
            "|---|---|---|---|---|---|---|"]
    for spec, r in reports.items():
        counts: dict[str, int] = {}
        for l in r["layers"]:
            counts[l["format"]] = counts.get(l["format"], 0) + 1
        pred, meas = (r.get("predicted") or {}).get("speedup"), (r.get("measured") or {}).get("speedup")
        err = abs(pred - meas) / meas if pred and meas else None
        rows.append(f"| {spec} | {sum(v for k, v in counts.items() if k != 'hp')} of {len(r['layers'])} | "
                    f"{', '.join(f'{v} {k}' for k, v in sorted(counts.items()))} | "
                    f"{'-' if pred is None else f'{pred:.3f}x'} | {'-' if meas is None else f'{meas:.3f}x'} | "
                    f"{'-' if err is None else f'{100 * err:.1f}%'} | {r['seconds']:.0f} |")
    return rows


def cross_time(models: dict[str, Path], batches: list[dict[str, np.ndarray]]):
    """Every model on every backend, all runners interleaved in the same rounds."""
    from ampq_pass.core.measure import interleave

    runners, outputs = {}, {}
    for spec in SPECS:
        b = get_backend(spec, protocol=PROTOCOL)
        for key, path in models.items():
            m = onnx.load(str(path))
            if spec.startswith("ort"):
                sess = b.session(m)
                names = [i.name for i in sess.get_inputs()]
                prep = [{k: np.ascontiguousarray(v[k]) for k in names} for v in batches]
                runners[(spec, key)] = (lambda i, s=sess, p=prep: s.run(None, p[i]))
                outputs[(spec, key)] = np.concatenate([sess.run(None, p)[0] for p in prep])
            else:
                runners[(spec, key)] = b.runner(m, batches)
                outputs[(spec, key)] = np.concatenate([_first_output(b, m, p) for p in batches])
    timings = interleave({f"{s}|{k}": r for (s, k), r in runners.items()}, PROTOCOL, n_inputs=len(batches))
    return {tuple(k.split("|")): t for k, t in timings.items()}, outputs


def _first_output(backend, model: onnx.ModelProto, feeds):
    out = backend.run(model, feeds)
    return out[model.graph.output[0].name]


def section(title: str, name: str, src: Path, samples, holdout: int, budget: float, quality, quality_name: str,
            batch: int = 8, reference: bool = False, metric=None, max_drop: float | None = None) -> str:
    """Both plans and fp32, on both backends, timed in the same rounds; ``quality(out, held)`` ->
    (mean, min) of a per-sample score against ORT fp32's output. ``reference``: ORT's
    ``quantize_static`` model too. ``metric`` and ``max_drop``: both passes search their front
    for the fastest plan within that drop of the metric (``budget`` unused)."""
    before = load()
    if metric is not None:
        bound = dict(metric=metric, max_metric_drop=max_drop)
        bound_text = f"metric {metric.name}, drop <= {max_drop:g}"
    else:
        bound = dict(max_loss_rmse=budget)
        bound_text = f"budget --max-loss-rmse {budget}"
    plans, reports = plans_for(name, src, samples, holdout, bound)
    held = {k: v[-holdout:] for k, v in samples.inputs.items()}
    batches = [{k: v[i:i + batch] for k, v in held.items()} for i in range(0, holdout, batch)]
    models = {"fp32": src, "ORT plan": plans["ort:cpu"], "OpenVINO plan": plans["openvino:cpu"]}
    if reference:
        static = ort_static(src, samples, holdout, batch)
        if static is not None:
            models["ORT quantize_static QDQ U8S8 per-channel"] = static
    load_timing = load()
    timings, outputs = cross_time(models, batches)
    base = timings[("ort:cpu", "fp32")].median
    ref = outputs[("ort:cpu", "fp32")]
    lines = [f"## {title}, {bound_text}\n",
             f"Calibration: {len(samples) - holdout} samples, held out: {holdout} (timing, batch {batch}, and quality). "
             f"Load average (1/5/15 min): {before} before the passes, {load_timing} before cross-timing, {load()} after.\n",
             f"| model | runs on | median ms (95% CI) | x ORT fp32 | x fp32 on same backend | {quality_name} |",
             "|---|---|---|---|---|---|"]
    for spec in SPECS:
        own = timings[(spec, "fp32")].median
        for key in models:
            t = timings[(spec, key)]
            mean, low = quality(outputs[(spec, key)], ref, held)
            lines.append(f"| {key} | {spec} | {t.median * 1e3:.1f} ({t.ci_low * 1e3:.1f}-{t.ci_high * 1e3:.1f}) | "
                         f"{base / t.median:.2f}x | {own / t.median:.2f}x | {mean:.4f} / {low:.4f} |")
    lines += ["", "Each plan as its own pass predicted and verified it (held-out timing inside the pass):", ""]
    lines += prediction_rows(reports)
    return "\n".join(lines) + "\n"


def minilm_section(budget: float, max_drop: float | None = None) -> str:
    """``max_drop``: both plans by the metric search instead, mean embedding cosine to fp32 on
    32 more sentences (neither calibration nor the held-out ones), computed by ONNX Runtime."""
    from ampq_pass.cli.metrics import EmbeddingCosine
    from ampq_pass.cli.minilm import english_sentences, mean_pool, tokenize
    from ampq_pass.core.samples import Samples

    calib, holdout, search = 64, 32, 32
    sentences = english_sentences(calib + holdout + search)
    samples = Samples(tokenize(sentences[:calib + holdout], 128), source="Python documentation sentences")
    metric = None
    if max_drop is not None:
        metric = EmbeddingCosine(minilm_path(), tokenize(sentences[calib + holdout:], 128))

    def cosine(out, ref, held):
        a, b = mean_pool(out, held["attention_mask"]), mean_pool(ref, held["attention_mask"])
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return float(cos.mean()), float(cos.min())

    return section("all-MiniLM-L6-v2, batch 8 x 128 tokens", "minilm", minilm_path(), samples, holdout, budget,
                   cosine, "mean / min embedding cosine to ORT fp32", metric=metric, max_drop=max_drop)


def resnet_section(budget: float) -> str:
    from ampq_pass.core.samples import Samples

    folder = Path(__file__).parent / "corpus" / "models" / "resnet50_classic"
    data = np.load(folder / "calib.npz")
    samples = Samples({k: data[k] for k in data.files}, source="corpus calib.npz")

    def agreement(out, ref, held):
        top = (out.argmax(1) == ref.argmax(1)).astype(float)
        rel = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
        return float(top.mean()), float(1.0 - rel.max())

    return section("ResNet-50 (corpus resnet50_classic), batch 4 x 3 x 224 x 224", "resnet50", folder / "model.onnx",
                   samples, 16, budget, agreement, "top-1 agreement with ORT fp32 / 1 - max relative logit error",
                   batch=4, reference=True)


def detector_section(budget: float) -> str:
    """nudenet's YOLOv8n (real weights, from the corpus): quality is the relative error of the
    raw head output (boxes and class scores) to ORT fp32, per image."""
    from ampq_pass.core.samples import Samples

    folder = Path(__file__).parent / "corpus" / "models" / "nudenet_yolov8n"
    data = np.load(folder / "calib.npz")
    samples = Samples({k: data[k] for k in data.files}, source="corpus calib.npz")
    n = len(next(iter(samples.inputs.values())))

    def closeness(out, ref, held):
        rel = np.linalg.norm((out - ref).reshape(len(out), -1), axis=1) / np.linalg.norm(ref.reshape(len(ref), -1), axis=1)
        return float(1.0 - rel.mean()), float(1.0 - rel.max())

    return section(f"YOLOv8n detector (corpus nudenet_yolov8n, real weights), batch 4", "yolov8n",
                   folder / "model.onnx", samples, min(16, n // 3), budget, closeness,
                   "1 - mean / 1 - max relative output error to ORT fp32", batch=4, reference=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", action="store_true", help="only the per-format probe")
    ap.add_argument("--resnet", action="store_true", help="also ResNet-50 from benchmarks/corpus (slow)")
    ap.add_argument("--detector", action="store_true", help="also the YOLOv8n detector from benchmarks/corpus (slow)")
    ap.add_argument("--no-minilm", action="store_true", help="leave MiniLM out")
    ap.add_argument("--budget", type=float, default=0.1, help="--max-loss-rmse of both passes (default 0.1, as the demo)")
    ap.add_argument("--max-metric-drop", type=float, default=None,
                    help="MiniLM: both plans by the metric search (embedding cosine on 32 more sentences) "
                         "within this drop, instead of --budget")
    ap.add_argument("--out", default="backends.md",
                    help="file under benchmarks/results (default backends.md; a partial run: a file of its own)")
    args = ap.parse_args()
    if args.probe:
        print(probe())
        return 0
    import openvino

    cmd = "benchmarks/bench_backends.py " + " ".join(sys.argv[1:])
    text = header("Backends: ONNX Runtime CPU EP vs OpenVINO CPU") + f"- openvino {openvino.get_version()}\n"
    text += f"- command: `.venv/bin/python {cmd.strip()}`\n\n"
    text += CONVENTIONS + "\n" + probe() + "\n"
    if not args.no_minilm:
        text += minilm_section(args.budget, args.max_metric_drop)
    if args.resnet:
        text += "\n" + resnet_section(args.budget)
    if args.detector:
        text += "\n" + detector_section(args.budget)
    write(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
