"""Issue 6: the whole pass on MiniLM, cold and warm, and three budgets verified end to end.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_pass.py   -> benchmarks/results/pass.md
Cold = empty cache; warm = the same cache (ranges, sensitivity and gain table are reused;
verification is always re-measured). Each run verifies its plan: the rewritten model and
fp32 timed interleaved on the backend, loss MSE measured on 32 held-out sentences.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import OUT, header, minilm_path, write  # noqa: E402

from ampq_pass.core.samples import Samples  # noqa: E402
from ampq_pass.cli.minilm import english_sentences, tokenize  # noqa: E402
from ampq_pass.pipeline import run_pass  # noqa: E402

BUDGETS = (0.05, 0.1, 0.2)


def main() -> None:
    src = minilm_path()
    samples = Samples(tokenize(english_sentences(96)), source="Python docs sentences")
    cache = OUT / "pass-cache"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for i, budget in enumerate((BUDGETS[0],) + BUDGETS):
        label = "cold" if i == 0 else "warm"
        t0 = time.perf_counter()
        res = run_pass(src, OUT / f"minilm_mp_{budget}.onnx", samples=samples, holdout=32, max_loss_rmse=budget,
                       cache_dir=str(cache), progress=False, log=lambda s: None)
        wall = time.perf_counter() - t0
        r = res.report
        p, m = r["predicted"], r["measured"]
        rows.append((label, budget, wall, len(res.solution.plan.formats), p["speedup"], m["speedup"],
                     p["loss_mse"], m["loss_mse"], r["budget"]["binding"], r["stages_seconds"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = os.getloadavg()
    text = header("The whole pass on all-MiniLM-L6-v2 (issue 6)")
    from ampq_pass.backends import get_backend

    offered = ", ".join(get_backend("ort:cpu").capabilities().formats)
    text += ("Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_pass.py`. 64 calibration + 32 held-out "
             f"sentences, batch 8 x sequence 128, ORT CPU EP (formats {offered}), budget = relative RMS change of "
             "the projection loss (`--max-loss-rmse`).\n\n")
    text += ("| run | budget | wall s | layers quantized | predicted speed-up | measured speed-up | speed-up error "
             "| predicted loss MSE | measured loss MSE | measured/predicted | binding |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|\n")
    for label, b, wall, n, ps, ms, pl, ml, binding, _ in rows:
        err = abs(ps - ms) / ms if ps and ms else float("nan")
        ratio = ml / pl if pl else float("nan")
        text += (f"| {label} | {b:g} | {wall:.1f} | {n}/36 | {ps:.3f}x | {ms:.3f}x | {err * 100:.1f}% | {pl:.3g} | "
                 f"{ml:.3g} | {ratio:.2f} | {binding} |\n")
    text += "\nStage seconds (cold run): " + ", ".join(f"{k} {v:.1f}" for k, v in rows[0][-1].items())
    text += "\n\nStage seconds (first warm run): " + ", ".join(f"{k} {v:.1f}" for k, v in rows[1][-1].items())
    text += f"\n\nPeak RSS of the process: {peak:.0f} MB. Load average at end: {load[0]:.2f}.\n"
    text += ("\nTargets: cold < 600 s, warm < 60 s; speed-up error <= 5% and loss-MSE ratio in [0.5, 2] "
             "for three budgets.\n")
    write("pass.md", text)


if __name__ == "__main__":
    main()
