"""Issue 2: all-int8 MiniLM vs fp32 in ONNX Runtime's CPU EP (batch 8, sequence 128).

Run: .venv/bin/python benchmarks/bench_rewrite_int8.py   -> benchmarks/results/rewrite_int8.md
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import OUT, header, minilm_path, write  # noqa: E402

from ampq_pass.core.ort import make_session, run  # noqa: E402
from ampq_pass.backends.ort import time_interleaved  # noqa: E402
from ampq_pass.core.samples import Samples  # noqa: E402
from ampq_pass.stages.layers import find_layers  # noqa: E402
from ampq_pass.cli.minilm import english_sentences, mean_pool, tokenize  # noqa: E402
from ampq_pass.core.model import load_model  # noqa: E402
from ampq_pass.stages.plan import Plan  # noqa: E402
from ampq_pass.stages.rewrite import rewrite  # noqa: E402
from ampq_pass.stages.calibrate import compute_ranges  # noqa: E402


def main(repeats: int = 30) -> None:
    model = load_model(minilm_path())
    layers = find_layers(model)
    calib = Samples(tokenize(english_sentences(64)))
    evalset = tokenize(english_sentences(64, offset=1000))
    batch = {k: v[:8] for k, v in evalset.items()}
    rows = []
    sessions = {"fp32": make_session(model, threads=2, spinning=False)}
    for method in ("minmax", "percentile"):
        ranges = compute_ranges(model, layers, calib, method=method)
        for fmt in ("int8", "int4"):
            if fmt == "int4" and method != "minmax":
                continue  # weight-only: activation ranges do not matter
            q = rewrite(model, layers, Plan.uniform(layers, fmt), ranges)
            opt = OUT / f"minilm_{fmt}_{method}.opt.onnx"
            sessions[f"{fmt} ({method})"] = make_session(q, threads=2, spinning=False, optimized_path=str(opt))
            ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
            rows.append((f"{fmt} ({method})", ops.get("MatMulIntegerToFloat", 0) + ops.get("MatMulNBits", 0)))
    timing = time_interleaved(sessions, batch, repeats=repeats, warmup=3)
    ref = run(sessions["fp32"], evalset)[0]
    emb = mean_pool(ref, evalset["attention_mask"])
    text = header("all-int8 MiniLM vs fp32 (issue 2)")
    text += (f"all-MiniLM-L6-v2, {len(layers)} weight MatMuls; calibration: 64 Python-docs sentences; "
             f"timing: batch 8 x sequence 128, ORT CPU EP, 2 intra-op threads, {repeats} interleaved repeats; "
             f"quality: 64 held-out sentences, cosine of mean-pooled embeddings to fp32.\n\n")
    text += "| model | fused integer kernels | median ms | p10-p90 ms | speed-up vs fp32 | mean cosine | min cosine |\n"
    text += "|---|---|---|---|---|---|---|\n"
    t32 = timing["fp32"].median
    for name, sess in sessions.items():
        out = run(sess, evalset)[0]
        e = mean_pool(out, evalset["attention_mask"])
        cos = (e * emb).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(emb, axis=1))
        fused = dict(rows).get(name, "-")
        t = timing[name]
        text += (f"| {name} | {fused} | {t.median * 1e3:.1f} | {t.p10 * 1e3:.1f}-{t.p90 * 1e3:.1f} | "
                 f"{t32 / t.median:.2f}x | {cos.mean():.4f} | {cos.min():.4f} |\n")
    write("rewrite_int8.md", text)


if __name__ == "__main__":
    main()
