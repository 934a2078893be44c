"""Issue 3: sensitivity on the real MiniLM (all-MiniLM-L6-v2, sequence 128).

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sensitivity.py   -> benchmarks/results/sensitivity.md

1. executor parity with ONNX Runtime on the 64 calibration sentences (float32);
2. time and peak memory of the sensitivity pass (64 samples, batch 8), run in a fresh child
   process so that its peak RSS is its own (torch allocations are invisible to tracemalloc);
3. the metric predicts: random mixed plans are rewritten, run in ONNX Runtime on 64 held-out
   sentences, and their measured loss MSE is compared with the predicted M(plan) = Σ s;
4. additivity: measured MSE of two-layer plans vs the sum of their one-layer plans.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import header, minilm_path, write  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sensitivity_child(model_path: str, inputs: dict, ranges_json: dict, probes: int, threads: int, queue) -> None:
    """One sensitivity pass in its own process: (json, seconds, RSS before, peak RSS) back to the parent."""
    import onnx
    import torch

    from ampq_pass.stages.calibrate import Ranges
    from ampq_pass.core.samples import Samples
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.stages.sensitivity import sensitivity

    torch.set_num_threads(threads)
    model = onnx.load(model_path)
    layers = find_layers(model)
    samples = Samples(inputs)
    ranges = Ranges.from_json(ranges_json)
    before = rss_mb()
    start = time.perf_counter()
    sens = sensitivity(model, layers, ranges, samples, batch_size=8, probes=probes, progress=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((sens.to_json(), seconds, before, peak))


def run_child(model_path, samples, ranges, probes, threads):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_sensitivity_child, args=(str(model_path), samples.inputs, ranges.to_json(), probes,
                                                        threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def random_plans(layers, count, seed):
    rng = np.random.default_rng(seed)
    plans = []
    while len(plans) < count:
        share = rng.uniform(0.1, 1.0)
        plan = {l.name: (str(rng.choice(l.formats)) if rng.random() < share else "hp") for l in layers}
        if any(f != "hp" for f in plan.values()):
            plans.append(plan)
    return plans


def describe(plan: dict) -> str:
    counts: dict[str, int] = {}
    for f in plan.values():
        counts[f] = counts.get(f, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def relu_fp8_finding() -> str:
    """What ONNX Runtime's optimiser does to an fp8 Q/DQ pair right after a Relu (tests/models.cnn)."""
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    import models

    from ampq_pass.core.samples import Samples
    from ampq_pass.core.graph import ensure_node_names
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite
    from ampq_pass.stages.calibrate import compute_ranges

    model = ensure_node_names(models.cnn())
    layers = find_layers(model)
    samples = Samples(models.feeds_for(model, n=16, seed=3))
    q = rewrite(model, layers, Plan({"/block1/conv2/Conv": "fp8_e4m3"}), compute_ranges(model, layers, samples))
    outs, relus = {}, {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED"):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.optimized_model_filepath = str(Path(__file__).parent / "out" / f"cnn_fp8_{level}.onnx")
        sess = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs[level] = sess.run(None, {"image": samples.inputs["image"]})[0]
        optimized = onnx.load(so.optimized_model_filepath)
        relus[level] = sum(n.op_type == "Relu" for n in optimized.graph.node)
    ref = outs["ORT_DISABLE_ALL"]
    rows = "".join(f"| {lvl} | {relus[lvl]} | {np.abs(outs[lvl] - ref).max() / np.abs(ref).max():.2e} |\n"
                   for lvl in outs)
    return ("\n## 5. Finding: ONNX Runtime drops a Relu in front of an fp8 QuantizeLinear\n\n"
            "tests/models.cnn with only /block1/conv2/Conv in fp8_e4m3 (its input is the output of a Relu). "
            "Relu nodes left in ORT's optimised graph (FusedConv legitimately absorbs the Relus of stem/conv1 blocks; the output change is the evidence) and output change vs the unoptimised graph:\n\n"
            "| graph optimisation level | Relu nodes | max rel change of logits |\n|---|---|---|\n" + rows +
            "\nAt EXTENDED and above ORT removes the Relu before the fp8 Q/DQ pair (a removal that is exact "
            "only for an unsigned int8 zero point at the range minimum; fp8 is signed), so the optimised "
            "model is not the rewritten graph. During development, on that model, random plans with fp8 after "
            "a Relu measured 20-430x above the prediction with optimisations on, while every one-layer plan "
            "matched the unoptimised graph within 0.82-1.18x. "
            "MiniLM has no Relu (GELU), so section 3 is unaffected. tests/test_sensitivity.py measures the "
            "CNN with optimisations off for this reason. Fix belongs in the rewrite (e.g. no fp8 Q/DQ "
            "directly after a Relu) or in ONNX Runtime.\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--probes", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()

    import onnx
    import torch

    from ampq_pass.core.samples import Samples
    from ampq_pass.stages.sensitivity.executor import Executor
    from ampq_pass.core.graph import ensure_node_names
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.cli.minilm import english_sentences, tokenize
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite
    from ampq_pass.stages.sensitivity import Sensitivity, predicted_mse
    from ampq_pass.stages.verify import measured_loss_mse, run_batches
    from ampq_pass.stages.calibrate import compute_ranges

    torch.set_num_threads(args.threads)
    path = minilm_path()
    model = ensure_node_names(onnx.load(str(path)))
    layers = find_layers(model)
    calib = Samples(tokenize(english_sentences(64, offset=0), 128), source="pydoc sentences 0-63")
    held = Samples(tokenize(english_sentences(64, offset=64), 128), source="pydoc sentences 64-127")
    text = header("Sensitivity on MiniLM (issue 3)")
    text += (f"Model: all-MiniLM-L6-v2 exported by `ampq_pass.minilm.export_minilm` (opset 17), output "
             f"`last_hidden_state`; {len(layers)} quantizable MatMuls. Calibration: 64 English sentences, "
             f"held out: 64 other sentences, sequence 128, batch 8, torch threads {args.threads}.\n\n")

    # 1. parity
    ex = Executor(model)
    refs = run_batches(model, calib, 8)
    worst, start = 0.0, time.perf_counter()
    with torch.no_grad():
        for batch, ref in zip(calib.batches(8), refs):
            out = ex.run(batch)["last_hidden_state"].numpy().astype(np.float64)
            r = ref["last_hidden_state"]
            worst = max(worst, float(np.abs(out - r).max() / np.abs(r).max()))
    forward = (time.perf_counter() - start) / 8
    text += ("## 1. Executor parity with ONNX Runtime (float32)\n\n"
             f"max |torch - ORT| / max |ORT| over the 64 calibration sentences: **{worst:.2e}** (target <= 1e-4); "
             f"executor forward (no grad) {forward:.2f} s per batch of 8.\n\n")
    del ex

    # 2. time and memory
    ranges = compute_ranges(model, layers, calib)
    runs = {}
    text += "## 2. Time and peak memory of the sensitivity pass (64 samples, batch 8, seq 128)\n\n"
    text += ("| probes | wall time | RSS before pass | peak RSS | peak - before | load average (1 min) after |\n"
             "|---|---|---|---|---|---|\n")
    for probes in args.probes:
        data, seconds, before, peak = run_child(path, calib, ranges, probes, args.threads)
        runs[probes] = Sensitivity.from_json(data)
        text += (f"| {probes} | {seconds:.1f} s | {before:.0f} MB | {peak:.0f} MB | {peak - before:.0f} MB | "
                 f"{os.getloadavg()[0]:.1f} |\n")
    text += ("\nRSS is the child process's own (model, weights, torch); peak from `getrusage`. The machine is shared: a load average above 2 (2 cores) means other jobs ran at the same time and the wall time is inflated. One forward "
             "and `probes` backward passes per batch; per-sample inner products only, nothing kept across "
             "batches.\n\n")

    # 3. prediction
    hp = run_batches(model, held, 8)
    plans = random_plans(layers, args.plans, seed=0)
    measured, rows = [], []
    for plan in plans:
        q = rewrite(model, layers, Plan(plan), ranges)
        measured.append(measured_loss_mse(model, q, held, hp_outputs=hp))
    measured = np.array(measured)
    text += (f"## 3. The metric predicts: {len(plans)} random mixed plans\n\n"
             "Each plan quantizes a random share (10-100 %) of the layers, each to a random candidate "
             "format (int8, fp8_e4m3, fp16, bf16, int4). Measured: the plan rewritten by "
             "`ampq_pass.rewrite.rewrite`, run in ONNX Runtime (CPU EP, default graph optimisations, i.e. "
             "its fused integer kernels) on the 64 held-out sentences; loss MSE = mean ||f_q - f_hp||^2 "
             "(the exact expectation of the projection loss).\n\n")
    text += "| probes | Spearman | median measured/predicted | min ratio | max ratio |\n|---|---|---|---|---|\n"
    predicted = {}
    for probes, sens in runs.items():
        predicted[probes] = np.array([predicted_mse(sens, p) for p in plans])
        ratio = measured / predicted[probes]
        text += (f"| {probes} | **{spearman(predicted[probes], measured):.3f}** | **{np.median(ratio):.3f}** | "
                 f"{ratio.min():.3f} | {ratio.max():.3f} |\n")
    best = max(runs)
    text += f"\nPer plan (predicted with probes={best}):\n\n| plan (format:layers) | predicted | measured | ratio |\n|---|---|---|---|\n"
    for plan, pr, me in sorted(zip(plans, predicted[best], measured), key=lambda t: t[1]):
        text += f"| {describe(plan)} | {pr:.4g} | {me:.4g} | {me / pr:.2f} |\n"

    # 4. additivity
    names = [l.name for l in layers]
    pairs = [(names[2], "int8", names[4], "int8"), (names[7], "fp8_e4m3", names[16], "int8"),
             (names[0], "int4", names[35], "fp8_e4m3"), (names[10], "int8", names[11], "int8")]
    text += ("\n## 4. Additivity\n\nMeasured loss MSE of a two-layer plan vs the sum of its one-layer plans "
             f"(predicted with probes={best}).\n\n| layer a | layer b | measured a | measured b | measured a+b "
             "| (a+b)/(a)+(b) | predicted a+b | measured/predicted |\n|---|---|---|---|---|---|---|---|\n")
    sens = runs[best]
    for a, fa, b, fb in pairs:
        m = [measured_loss_mse(model, rewrite(model, layers, Plan(p), ranges), held, hp_outputs=hp)
             for p in ({a: fa}, {b: fb}, {a: fa, b: fb})]
        pr = predicted_mse(sens, {a: fa, b: fb})
        text += (f"| {a} {fa} | {b} {fb} | {m[0]:.4g} | {m[1]:.4g} | {m[2]:.4g} | {m[2] / (m[0] + m[1]):.3f} | "
                 f"{pr:.4g} | {m[2] / pr:.3f} |\n")
    text += "\nTarget (issue 3): Spearman >= 0.9, median ratio in [0.5, 2].\n"
    text += relu_fp8_finding()
    write("sensitivity.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
