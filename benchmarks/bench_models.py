"""Issue 7: the same comparison on a Llama-style decoder and a residual CNN (random init).

Run: benchmarks/run_snapshot.sh benchmarks/bench_models.py llama   -> benchmarks/results/llama_front.md, llama_*.png
     benchmarks/run_snapshot.sh benchmarks/bench_models.py cnn     -> benchmarks/results/cnn_front.md, cnn_*.png
(no argument: both, one after the other)

Both models are randomly initialised (no trained weights are available offline): they
are here for timing, partition and the prediction checks, and their quality metric is
the relative error of the logits to fp32 (||logits_q - logits_fp32|| / ||logits_fp32||
over the evaluation set) with top-1 agreement beside it, not a task accuracy.
- Llama: `tests/models.py::llama_decoder` (transformers LlamaConfig + LlamaForCausalLM,
  4 layers, hidden 512, intermediate 1024, 4 heads / 2 KV heads, vocab 128), batch 8 x
  sequence 64 of random token ids (calibration and evaluation drawn with different seeds).
- CNN: a ResNet-18-shaped residual CNN (widths 64-128-256-512, two basic blocks per stage,
  BatchNorm folded by the exporter, 10 classes) on 8 x 3 x 64 x 64 random images.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.append(str(Path(__file__).parent.parent))  # tests.models; ampq_pass comes first from PYTHONPATH

import front  # noqa: E402
from common import OUT, header, write  # noqa: E402

from ampq_pass.core.samples import Samples  # noqa: E402
from ampq_pass.core.model import save_model  # noqa: E402

BATCH = 8
# max_loss_rmse budgets per model: spread so that the front runs from one layer to all of them
BUDGETS = {"llama": (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, math.inf),
           "cnn": (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, math.inf)}
RANDOM_BUDGETS = {"llama": (0.02, 0.1), "cnn": (0.001, 0.003)}


def resnet_cnn(seed: int = 0):
    import torch

    class Block(torch.nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = torch.nn.BatchNorm2d(cout)
            self.c2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = torch.nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                torch.nn.BatchNorm2d(cout))

        def forward(self, x):
            h = torch.relu(self.b1(self.c1(x)))
            h = self.b2(self.c2(h))
            return torch.relu(h + (x if self.down is None else self.down(x)))

    class Net(torch.nn.Module):
        def __init__(self, widths=(64, 128, 256, 512), classes=10):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                            torch.nn.BatchNorm2d(widths[0]), torch.nn.ReLU())
            blocks, cin = [], widths[0]
            for i, w in enumerate(widths):
                blocks += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
                cin = w
            self.blocks = torch.nn.Sequential(*blocks)
            self.head = torch.nn.Linear(cin, classes)

        def forward(self, x):
            h = self.blocks(self.stem(x))
            return self.head(torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))

    torch.manual_seed(seed)
    net = Net().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.3, 0.8)
    from tests.models import _export

    return _export(net, (torch.randn(2, 3, 64, 64),), ["image"], ["logits"],
                   {"image": {0: "batch"}, "logits": {0: "batch"}})


def logits_quality(ref, outs):
    a = np.concatenate([r["logits"] for r in ref])
    b = np.concatenate([o["logits"] for o in outs])
    rel = float(np.linalg.norm(b - a) / np.linalg.norm(a))
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    return {"rel_err": rel, "top1": top1}


def build(which: str):
    OUT.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    if which == "llama":
        from tests.models import llama_decoder

        path = OUT / "llama.onnx"
        if not path.exists():
            save_model(llama_decoder(seed=0, layers=4, hidden=512), path)
        seq = 64

        def data(n, seed):
            r = np.random.default_rng(seed)
            return {"input_ids": r.integers(0, 128, (n, seq), dtype=np.int64),
                    "attention_mask": np.ones((n, seq), dtype=np.int64)}
        title = "Llama-style decoder (random init; 4 layers, hidden 512, batch 8 x seq 64)"
    else:
        path = OUT / "resnet_cnn.onnx"
        if not path.exists():
            save_model(resnet_cnn(0), path)

        def data(n, seed):
            return {"image": np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)}
        title = "Residual CNN (ResNet-18-shaped, random init; batch 8 x 3 x 64 x 64)"
    del rng
    calib, ev = data(64 + 16, 10), data(128, 20)
    spec = front.Spec(
        name=which, model_path=path, pass_samples=Samples(calib, source="random"), holdout=16,
        eval_samples=Samples(ev, source="random"),
        timing_batches=[{k: v[i:i + BATCH] for k, v in ev.items()} for i in (0, BATCH)],
        quality=logits_quality, primary="rel_err", higher_better=False, budgets=BUDGETS[which],
        random_budgets=RANDOM_BUDGETS[which])
    return spec, title


def bench(which: str) -> None:
    spec, title = build(which)
    res = front.run(spec)
    entries = res["entries"]
    files = front.plots(res, spec, which, "relative error of the logits to fp32 (lower is better)", logx=True)
    pred_table, err_ours, err_naive = front.prediction_rows(entries)
    bad = front.front_check(entries, "rel_err", False, tol=0.0)
    bad_noise = front.front_check(entries, "rel_err", False, tol=0.02)
    fp32 = entries[0]
    text = header(f"Issue 7: {title}")
    text += (f"Command: `benchmarks/run_snapshot.sh benchmarks/bench_models.py {which}` (engine: `benchmarks/front.py`).\n\n"
             f"**Random initialisation**: no trained weights; quality = relative error of the logits to fp32 and "
             f"top-1 agreement on {len(spec.eval_samples)} random evaluation inputs (a different seed from the "
             f"calibration inputs). These rows check timing, partition and prediction, not task accuracy.\n\n"
             f"- code: {res['code']}.\n"
             f"- {res['layers']} quantizable layers, {res['subgraphs']} sequential subgraphs, {res['configs']} timed "
             f"configurations (ort:cpu formats: {', '.join(res['offered'])}).\n"
             f"- all {sum(1 for e in entries if e.speedup)} models timed interleaved in one process, ORT CPU EP, 2 "
             f"threads, batch {BATCH} ({res['e2e_s']:.0f} s); fp32 median {fp32.ms:.1f} ms; speed-up = median paired "
             f"ratio per round. CPU busy before timing {res['busy_before']:.0%}; load average before "
             f"{'/'.join(f'{x:.2f}' for x in res['load_before'])}, after {'/'.join(f'{x:.2f}' for x in res['load_after'])}.\n"
             f"- budgets (max_loss_rmse): {', '.join(f'{b:g}' for b in spec.budgets)}; random plans at "
             f"{', '.join(f'{b:g}' for b in spec.random_budgets)}. Methods as in `minilm_front.md`.\n\n")
    text += front.table_rows(entries, [("rel_err", "logits rel. error"), ("top1", "top-1 agreement")]) + "\n"
    text += f"![front]({which}_front.png)\n\n"
    text += (f"Front check (baseline models with a higher measured speed-up than any of our plans at equal or lower "
             f"error): strictly {len(bad)}, beyond 2% timing tolerance {len(bad_noise)}.\n")
    for e, b in bad:
        text += (f"- `{e.name}`: {e.speedup:.3f}x at error {e.quality['rel_err']:.4g}; ours at <= that error: "
                 f"{'none' if b is None else f'{b:.3f}x'}\n")
    text += ("\nAt equal predicted-loss budget, measured speed-up (logits relative error) of each plan-making "
             "method:\n\n" + front.budget_rows(entries, "rel_err", "logits rel. error"))
    text += (f"\nTime-gain prediction over {len(err_ours)} mixed plans: subgraph gains median error "
             f"{np.median(err_ours) * 100:.1f}% (max {max(err_ours) * 100:.1f}%); per-layer sum median "
             f"{np.median(err_naive) * 100:.1f}% (max {max(err_naive) * 100:.1f}%); per-layer timing took "
             f"{res['per_layer_s']:.0f} s.\n\n" + front.table_section(res) + "\n" + pred_table + "\n")
    ratios = [e.measured_mse / e.predicted_mse for e in entries if e.plan and e.predicted_mse and e.measured_mse]
    if ratios:
        text += (f"Loss MSE, measured/predicted over {len(ratios)} mixed plans: median {np.median(ratios):.2f} "
                 f"(min {min(ratios):.2f}, max {max(ratios):.2f}).\n\n")
    text += f"![speed-up prediction]({which}_speedup_prediction.png) ![loss prediction]({which}_loss_prediction.png)\n\n"
    text += "## The pass (budget max_loss_rmse 0.1), cold and warm\n\n" + front.pass_section(res)
    text += f"\n![pass runtime]({which}_pass_runtime.png)\n"
    write(f"{which}_front.md", text)


if __name__ == "__main__":
    for w in (sys.argv[1:] or ["llama", "cnn"]):
        bench(w)
