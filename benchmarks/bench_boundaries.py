"""Issue 13 targets: does the time model hold across subgraph boundaries on CNNs?

For each CNN, the whole pass runs twice from an empty cache - with boundary states (cut
tensors timed in the state the plan gives them, design.md §3) and without (every cut
timed in high precision: the paper's model) - with the closed loop off (``repair_rounds=0``)
so the solver's own prediction is compared with the measured speed-up of the model it
wrote, and once more with the loop on (the default) to see what is shipped.

Run: .venv/bin/python benchmarks/bench_boundaries.py [cnn] [corpus:NAME ...]  -> benchmarks/results/boundaries.md

- cnn: the repo's residual CNN (benchmarks/bench_models.py::resnet_cnn, random init), 64 random images.
- corpus:NAME: a model of benchmarks/corpus with its calib.npz (build it with benchmarks/corpus/build.py).

Prediction error = |predicted - measured| / measured of the speed-up over fp32, both from
the pass's own report (the measured one: interleaved end-to-end timing of the written
model against the input on held-out samples). The load average is recorded per model:
above ~2 on this 2-core machine the timings are not trustworthy.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.append(str(Path(__file__).parent.parent))

from common import header, write  # noqa: E402

from ampq_pass.pipeline import PassOptions, run_pass  # noqa: E402

CORPUS = Path(__file__).parent / "corpus"


def repo_cnn(tmp: Path) -> tuple[str, Path, Path]:
    from bench_models import resnet_cnn

    model = resnet_cnn()
    path = tmp / "cnn.onnx"
    onnx.save(model, path)
    name = model.graph.input[0].name
    rng = np.random.default_rng(0)
    np.savez(tmp / "cnn_calib.npz", **{name: rng.standard_normal((64, 3, 64, 64)).astype(np.float32)})
    return "repo residual CNN (random init)", path, tmp / "cnn_calib.npz"


def corpus_model(name: str) -> tuple[str, Path, Path]:
    manifest = json.loads((CORPUS / "corpus.json").read_text())
    entry = next(m for m in (manifest["models"] if "models" in manifest else manifest) if m["name"] == name)
    return f"{name} ({entry['exporter']}, {entry['source']})", CORPUS / entry["file"], CORPUS / entry["calib"]


def one_run(path: Path, calib: Path, out: Path, *, states: bool, rounds: int) -> dict:
    opts = PassOptions(max_loss_rmse=0.05, cache_dir=None, progress=False, boundary_states=states,
                       repair_rounds=rounds)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    res = run_pass(path, out, calib=calib, options=opts, log=lambda s: None)
    r = res.report
    first = r["rounds"][0] if r.get("rounds") else {}
    return {"states": states, "rounds": rounds, "seconds": time.perf_counter() - t0,
            "load": (load0 + os.getloadavg()[0]) / 2,
            "predicted": first.get("predicted_speedup"), "measured": first.get("measured_speedup"),
            "shipped_measured": r["measured"].get("speedup"), "shipped_layers": len(res.solution.plan.formats),
            "layers": len(r["layers"]), "first_layers": first.get("layers_quantized"),
            "configs": r.get("boundaries", {}).get("configs"), "derived": r.get("boundaries", {}).get("configs_derived"),
            "cuts_int8": len(r.get("boundaries", {}).get("cuts", {})), "timing_s": r["stages_seconds"].get("timing"),
            "rejected": bool(r.get("rejected_plan")), "anchor": (r.get("boundaries", {}).get("format_anchors") or {}).get("int8"),
            "is_anchor": _is_anchor(first.get("formats") or {},
                                    (r.get("boundaries", {}).get("format_anchors") or {}).get("int8"))}


def _is_anchor(formats: dict, anchor: dict | None) -> bool:
    """Whether the solver's plan is the int8 anchor plan (every int8-capable layer int8): its
    prediction is then fitted to its own measurement and says nothing about the time model."""
    return bool(anchor) and len(formats) == anchor["layers"] and set(formats.values()) == {"int8"}


def err(p, m):
    return abs(p - m) / m if p and m else None


def main(argv: list[str]) -> None:
    targets = argv or ["cnn", "corpus:mtcnn_onet", "corpus:mtcnn_rnet", "corpus:mtcnn_pnet"]
    rows, errs, fresh = [], {True: [], False: []}, []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for target in targets:
            title, path, calib = repo_cnn(tmp) if target == "cnn" else corpus_model(target.split(":", 1)[1])
            for states in (False, True):
                r = one_run(path, calib, tmp / "o.onnx", states=states, rounds=0)
                e = err(r["predicted"], r["measured"])
                if e is not None:
                    errs[states].append(e)
                    if states and not r["is_anchor"]:
                        fresh.append(e)
                rows.append((title, r, e))
                print(title, r, e, flush=True)
            r = one_run(path, calib, tmp / "o.onnx", states=True, rounds=2)
            rows.append((title, r, None))
            print(title, r, flush=True)
    fmt = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
    lines = [header("Boundary states: predicted vs measured speed-up on CNNs (issue 13)"),
             "Whole pass, `--max-loss-rmse 0.05`, empty cache, ORT CPU EP, 2 threads. `loop` = repair rounds "
             "(0: the solver's plan as predicted; 2: the default closed loop, what is shipped). speed-ups are over the "
             "input model (fp32), measured interleaved by the pass's verify stage.\n",
             "`int8 anchor`: the whole model with every int8-capable layer in int8, speed-up from the parts before "
             "the fit -> measured, and the factor applied to int8 configurations (`timing.fit_formats_to_model`; "
             "`=plan`: the solver's plan is that plan, so its prediction is fitted to its own measurement).\n",
             "| model | boundary states | loop | layers quantized (plan / shipped) | configs (derived) | int8 cuts "
             "| int8 anchor | predicted | measured | error | shipped measured | timing s | whole s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for title, r, e in rows:
        lines.append(f"| {title} | {'yes' if r['states'] else 'no'} | {r['rounds']} | "
                     f"{r['first_layers']} / {r['shipped_layers']} of {r['layers']} | {r['configs']} ({r['derived']}) | "
                     f"{r['cuts_int8']} | {_anchor(r)} | {fmt(r['predicted'])} | {fmt(r['measured'])} | "
                     f"{fmt(e, '.1%') if e is not None else '-'} | {fmt(r['shipped_measured'])}"
                     f"{' (rejected plan: hp)' if r['rejected'] else ''} | {fmt(r['timing_s'], '.0f')} | "
                     f"{r['seconds']:.0f} | {r['load']:.1f} |")
    lines.append("")
    for states in (False, True):
        if errs[states]:
            lines.append(f"- boundary states {'on' if states else 'off'}: median prediction error "
                         f"{statistics.median(errs[states]):.1%}, max {max(errs[states]):.1%} over {len(errs[states])} models "
                         f"(target: median <= 5%, max <= 10%)")
    if fresh:
        lines.append(f"- boundary states on, plans other than the int8 anchor: median prediction error "
                     f"{statistics.median(fresh):.1%}, max {max(fresh):.1%} over {len(fresh)} models")
    write("boundaries.md", "\n".join(lines) + "\n")


def _anchor(r: dict) -> str:
    a = r["anchor"]
    if not a:
        return "-"
    what = f"x{a['factor']:.3f}" if a["applied"] else "not applied"
    return (f"{a['predicted_speedup']:.3f} -> {a['measured_speedup']:.3f} ({what})"
            f"{' =plan' if r['is_anchor'] else ''}")


if __name__ == "__main__":
    main(sys.argv[1:])
