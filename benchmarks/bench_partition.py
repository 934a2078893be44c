"""Partition benchmark: subgraph counts and times on MiniLM and a Llama-style decoder.

    .venv/bin/python benchmarks/bench_partition.py [--minilm PATH] [--llama-layers N]

Prints a Markdown report and writes it to ``benchmarks/results/partition.md``. For each
model: subgraphs by kind, partition time (median of 5), extraction of every subgraph,
capture of their inputs over the calibration set (one ORT pass per batch), and a check
that the extracted subgraphs run in order reproduce the model's output.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, repeat: int = 1):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def max_error(model, part, subs, captured, samples, batch_size) -> float:
    """Largest |difference| between the model's output and the subgraphs run in order."""
    import onnxruntime as ort

    def session(m):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    names = [o.name for o in model.graph.output]
    full, worst = session(model), 0.0
    sessions = [session(s) for s in subs]
    for b, batch in enumerate(samples.batches(batch_size)):
        values = dict(batch)
        for sg, sess in zip(part.subgraphs, sessions):
            feeds = {t: values[t] if t in values else captured[sg.index][b][t] for t in sg.inputs}
            values.update(zip(sg.outputs, sess.run(sg.outputs, feeds)))
        for name, ref in zip(names, full.run(names, batch)):
            worst = max(worst, float(np.abs(values[name] - ref).max()))
    return worst


def bench(label: str, model, samples, batch_size: int = 8) -> dict:
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.stages.partition import configs, partition
    from ampq_pass.stages.subgraphs import capture_inputs, extract_all

    layers = find_layers(model)
    part, t_part = timed(lambda: partition(model, layers), repeat=5)
    subs, t_extract = timed(lambda: extract_all(model, part))
    captured, t_capture = timed(lambda: capture_inputs(model, part, samples, batch_size=batch_size))
    formats = {l.name: list(l.formats) for l in layers}
    kinds: dict[str, int] = {}
    for sg in part.subgraphs:
        kinds[sg.kind] = kinds.get(sg.kind, 0) + 1
    return {
        "model": label, "ops": len(model.graph.node), "layers": len(layers), "subgraphs": len(part.subgraphs),
        "kinds": ", ".join(f"{v} {k}" for k, v in kinds.items()), "side": len(part.side_nodes),
        "cuts": len(part.cuts), "configs": sum(len(configs(s, formats)) for s in part.subgraphs),
        "tied": sum(1 for s in part.subgraphs if "tied" in s.note),
        "t_part": t_part, "t_extract": t_extract, "t_capture": t_capture, "samples": len(samples),
        "batch": batch_size, "error": max_error(model, part, subs, captured, samples, batch_size),
        "part": part,
    }


def report(results: list[dict], notes: list[str]) -> str:
    import onnx
    import onnxruntime as ort

    lines = ["# Partition benchmark", "",
             f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
             f"Python {platform.python_version()}, onnx {onnx.__version__}, onnxruntime {ort.__version__}",
             "- partition time: median of 5 runs of `partition()` on a loaded, shape-inferred model;"
             " extraction: every subgraph through `extract_all`; capture: `capture_inputs`, one ORT pass"
             " per batch over the whole calibration set; error: max |output of subgraphs run in order"
             " - output of the model| (0.0 = bit-exact).", "",
             "| model | ops | layers | subgraphs | kinds | side ops | cuts | configs (default formats, cap 64) "
             "| partition | extract all | capture (samples, batch) | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['ops']} | {r['layers']} | {r['subgraphs']} | {r['kinds']} | {r['side']} "
                     f"| {r['cuts']} | {r['configs']} ({r['tied']} subgraphs with tied q/k/v or gate/up) "
                     f"| {r['t_part'] * 1e3:.0f} ms | {r['t_extract'] * 1e3:.0f} ms "
                     f"| {r['t_capture'] * 1e3:.0f} ms ({r['samples']}, {r['batch']}) | {r['error']:.1g} |")
    for r in results:
        lines += ["", f"## {r['model']}: subgraphs", "", "| # | kind | ops | layers | inputs | note |",
                  "|---|---|---|---|---|---|"]
        from ampq_pass.stages.partition import short_name

        for sg in r["part"].subgraphs:
            groups = " \\| ".join(",".join(short_name(l) for l in g) for g in sg.groups)
            lines.append(f"| {sg.index} | {sg.kind} | {len(sg.nodes)} | {groups} | {len(sg.inputs)} | {sg.note or '-'} |")
    lines += [""] + notes
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minilm", help="an existing MiniLM export (default: export one to a temp folder)")
    ap.add_argument("--llama-layers", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "partition.md"))
    args = ap.parse_args()

    from ampq_pass.core.samples import Samples
    from ampq_pass.cli.minilm import english_sentences, export_minilm, tokenize
    from ampq_pass.core.proto import infer_shapes_safe
    from ampq_pass.core.model import load_model

    import models

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.minilm) if args.minilm and Path(args.minilm).is_file() else export_minilm(Path(tmp) / "minilm.onnx")
        model, t_load = timed(lambda: load_model(path))
        samples = Samples(tokenize(english_sentences(16)))
        results.append(bench("all-MiniLM-L6-v2 (seq 128)", model, samples))
    llama = infer_shapes_safe(models.llama_decoder(layers=args.llama_layers, hidden=256))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (16, 64)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[:4, -8:] = 0
    results.append(bench(f"Llama-style decoder ({args.llama_layers} layers, hidden 256, seq 64)", llama,
                         Samples({"input_ids": ids, "attention_mask": mask})))
    notes = ["Notes:",
             "- MiniLM: the embeddings (no quantizable layer) merge into the first attention subgraph;"
             " the attention-mask arithmetic and all Shape->Gather->Concat chains are side chains fed to"
             " each attention subgraph as inputs.",
             "- Llama: the final RMSNorm merges into the last MLP subgraph; lm_head is a subgraph of its"
             " own (kind mlp), hence 2 per layer + 1. Causal mask, position ids and rotary cos/sin are"
             " side chains.",
             f"- MiniLM load (onnx.load + checker + shape inference): {t_load * 1e3:.0f} ms, not included above."]
    text = report(results, notes)
    print(text)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".md.tmp")
    tmp_out.write_text(text)
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
