"""Issue 13's front target on the corpus CNNs: our front against every ORT ``quantize_static`` configuration.

    benchmarks/run_snapshot.sh benchmarks/bench_cnn_fronts.py [NAME ...]   (default: every CNN below)
    benchmarks/run_snapshot.sh benchmarks/bench_cnn_fronts.py --report-only

For each corpus CNN (``benchmarks/corpus/models/NAME``, built by ``benchmarks/corpus/build.py``):
- ours: the whole pass at several ``--max-loss-rmse`` budgets and with none (the first run cold, the others
  reading its cache: they re-solve and verify), on the corpus calibration file (48 samples; the
  pass holds the last 16 out to verify itself);
- ONNX Runtime's ``quantize_static``: its defaults, then QDQ and QOperator x U8S8 and S8S8,
  per-channel, with and without ``quant_pre_process`` (``front.ort_baselines``), calibrated on
  the same first 32 samples (MinMax);
- fp32.
Quality: relative L2 error of all float outputs to fp32, ||y_q - y|| / ||y||, on 32 evaluation
inputs made by the corpus's own generator with another seed (seen by no calibration).
Timing: every model interleaved round-robin in one process (``ampq_pass.backends.ort.
time_interleaved``, ORT CPU EP, 2 intra-op threads, batch 8, two evaluation batches);
speed-up = median over rounds of the paired ratio t_fp32 / t_model, CI = 95% CI of that median.
Each model's result goes to ``benchmarks/results/cnn_fronts/NAME.json`` as soon as it is
measured (a partial run keeps what it finished); ``benchmarks/results/cnn_fronts.md`` is
rewritten from every JSON there. Front check: each ORT point against the fastest of our plans
(or fp32) with equal or lower error.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "corpus"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import front  # noqa: E402
from common import OUT, RESULTS, cpu_name, wait_for_quiet  # noqa: E402

from ampq_pass.backends.ort import time_interleaved  # noqa: E402
from ampq_pass.core.errors import AmpqError  # noqa: E402
from ampq_pass.core.model import finish_loading, read_model  # noqa: E402
from ampq_pass.core.measure import median_ci  # noqa: E402
from ampq_pass.core.ort import make_session  # noqa: E402
from ampq_pass.core.samples import Samples  # noqa: E402
from ampq_pass.pipeline import run_pass  # noqa: E402
from ampq_pass.stages.verify import run_batches  # noqa: E402

MODELS = HERE / "corpus" / "models"
RESULT_DIR = RESULTS / "cnn_fronts"
#: the CNNs of issue 13's target list that the corpus holds, in the order run: MobileNetV3 is PaddleOCR's
#: text detector (a MobileNetV3-large x0.5 backbone with its FPN and DB head, real weights, paddle2onnx);
#: MobileNetV2 is the transformers class (its classic export has a TensorFlow-style Pad before every
#: convolution, the dynamo one none)
CNNS = ("resnet50_classic", "nudenet_yolov8n", "mobilenetv2_dynamo", "mobilenetv2_classic", "efficientnet_b0_classic",
        "mtcnn_onet", "mtcnn_rnet", "mtcnn_pnet", "convnext_tiny_classic", "ppocr_det_mobilenetv3")
#: the last, no budget at all (``front.NO_BUDGET``): the fastest plan the pass finds, whatever its loss, so that
#: the front reaches as far into the error axis as ORT's points do (MobileNetV2's are at 27% output error)
BUDGETS = (0.02, 0.05, 0.1, 0.3, front.NO_BUDGET)
HOLDOUT = 16
BATCH = 8


def eval_inputs(name: str) -> tuple[str, np.ndarray, str]:
    """(input name, 32 evaluation inputs, how they were made): the corpus's generator, another seed."""
    from build import IMAGENET_MEAN, IMAGENET_STD, smooth_images, text_images

    seed = 2000 + sum(map(ord, name)) % 1000
    if name == "ppocr_det_mobilenetv3":  # PaddleOCR's DB preprocessing: BGR, ImageNet mean/std
        x = ((text_images(32, 320, 320, seed)[:, ::-1] - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
        return "x", x, f"text_images seed {seed} (rendered text pages), BGR, ImageNet normalisation"
    if name == "nudenet_yolov8n":
        return "images", smooth_images(32, 320, 320, seed).astype(np.float32), f"smooth_images seed {seed}, 0..1"
    if name.startswith("mtcnn_"):
        h, w = {"mtcnn_onet": (48, 48), "mtcnn_rnet": (24, 24), "mtcnn_pnet": (120, 160)}[name]
        x = ((smooth_images(32, h, w, seed) * 255 - 127.5) * 0.0078125).astype(np.float32)
        return "input", x, f"smooth_images seed {seed}, MTCNN normalisation"
    x = ((smooth_images(32, 224, 224, seed) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    return "pixel_values", x, f"smooth_images seed {seed}, ImageNet normalisation"


def rel_error(ref: list[dict], outs: list[dict]) -> float:
    num = sum(float(((o[k].astype(np.float64) - r[k]) ** 2).sum()) for r, o in zip(ref, outs) for k in r
              if r[k].dtype.kind == "f")
    den = sum(float((r[k].astype(np.float64) ** 2).sum()) for r in ref for k in r if r[k].dtype.kind == "f")
    return math.sqrt(num / den) if den > 0 else 0.0


def bench(name: str) -> dict:
    model_path = MODELS / name / "model.onnx"
    work = OUT / "cnn_fronts" / name
    work.mkdir(parents=True, exist_ok=True)
    with np.load(MODELS / name / "calib.npz") as z:
        calib = {k: z[k] for k in z.files}
    key, ev, ev_note = eval_inputs(name)
    if list(calib) != [key]:
        raise AmpqError(f"{name}: expected one input {key!r}, calib.npz has {list(calib)}")
    n = len(calib[key])
    entries: list[dict] = [{"name": "fp32", "method": "fp32", "path": str(model_path)}]
    # the pass measures and predicts over the model as it normalises it (checked on calibration samples); where that is
    # faster than the file (a Pad folded into its conv that ONNX Runtime does not fold itself), its
    # predictions are checked against speed-ups over this model, timed in the same run
    normalized = work / "normalized.onnx"
    work.mkdir(parents=True, exist_ok=True)
    onnx.save(finish_loading(read_model(model_path), model_path, feeds={key: calib[key][:2]}), normalized)
    entries.append({"name": "fp32, normalized by the pass", "method": "normalized", "path": str(normalized)})

    cache_dir = work / "pass-cache"
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)
    for i, b in enumerate(BUDGETS):
        label = "ours, no budget" if b == front.NO_BUDGET else f"ours rmse<={b:g}"
        out = work / f"ours_rmse_{b:g}.onnx"
        print(f"[{name}] pass, --max-loss-rmse {b:g} ({'cold' if i == 0 else 'warm cache'})", flush=True)
        t0 = time.perf_counter()
        try:
            res = run_pass(model_path, out, samples=Samples(dict(calib), source=str(MODELS / name / "calib.npz")),
                           holdout=HOLDOUT, max_loss_rmse=b, cache_dir=str(cache_dir), progress=False,
                           log=lambda s: None)
        except AmpqError as e:
            entries.append({"name": label, "method": "ours", "path": "", "note": f"refused: {e}"})
            continue
        r = res.report
        formats = list(res.solution.plan.formats.values())
        entries.append({"name": label, "method": "ours", "path": str(out), "budget": b,
                        "wall_s": time.perf_counter() - t0, "cold": i == 0,
                        "low_precision_layers": sum(f != "hp" for f in formats), "layers": len(r["layers"]),
                        "predicted_speedup": r["predicted"]["speedup"],
                        "pass_measured_speedup": r["measured"].get("speedup")})

    print(f"[{name}] ONNX Runtime quantize_static grid", flush=True)
    calib_batches = [{key: calib[key][s:s + BATCH]} for s in range(0, n - HOLDOUT, BATCH)]
    for ort_name, (path, msg) in front.ort_baselines(model_path, calib_batches, work / "ort").items():
        if "static" in ort_name:
            entries.append({"name": ort_name, "method": "ort static", "path": path, "note": msg})

    evs = Samples({key: ev}, source="eval")
    ref = run_batches(str(model_path), evs, BATCH)  # a path: the outputs as written, no logits added
    live = []
    for e in entries:
        if not e.get("path"):
            continue
        try:
            e["error"] = 0.0 if e["method"] == "fp32" else rel_error(ref, run_batches(e["path"], evs, BATCH))
            if e["method"] == "normalized":
                e["error"] = 0.0 if e["error"] < 1e-5 else e["error"]  # exact up to float reordering
            live.append(e)
        except Exception as ex:  # a baseline ORT cannot run is reported, not dropped
            e["note"] = f"{e.get('note', '')} run failed: {type(ex).__name__}: {str(ex).splitlines()[0][:100]}"

    print(f"[{name}] timing {len(live)} models interleaved", flush=True)
    sessions = {e["name"]: make_session(e["path"], threads=2, spinning=False) for e in live}
    batches = [{key: ev[s:s + BATCH]} for s in (0, BATCH)]
    busy = wait_for_quiet(limit=0.25, patience=90.0)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    timings = time_interleaved(sessions, batches, protocol=front.E2E_PROTOCOL)
    seconds, load_after = time.perf_counter() - t0, os.getloadavg()
    del sessions
    ref_t = np.asarray(timings["fp32"].samples)
    for e in live:
        ratios = ref_t / np.asarray(timings[e["name"]].samples)
        lo, hi = median_ci(ratios)
        e.update(ms=timings[e["name"]].median * 1e3, speedup=float(np.median(ratios)), ci=[float(lo), float(hi)])
    return {"model": name, "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "cpu": cpu_name(), "code": os.environ.get("AMPQ_CODE_COMMIT", "working tree"), "eval": ev_note,
            "timing": {"models": len(live), "rounds": len(ref_t), "seconds": seconds, "busy_before": busy,
                       "load_before": load_before, "load_after": load_after},
            "entries": entries}


def front_check(entries: list[dict]) -> list[str]:
    """Each ORT point against the fastest of our points (or fp32, or what the pass writes at 0 layers: the
    normalised model) with equal or lower error."""
    ours = [e for e in entries if e["method"] in ("ours", "fp32", "normalized") and "speedup" in e]
    lines = []
    for e in entries:
        if e["method"] != "ort static" or "speedup" not in e:
            continue
        best = max((o for o in ours if o["error"] <= e["error"]), key=lambda o: o["speedup"])
        verdict = "above ours" if e["speedup"] > best["speedup"] else "at or below ours"
        overlap = e["ci"][0] <= best["ci"][1] if verdict == "above ours" else False
        lines.append(f"  - {e['name']}: {e['speedup']:.2f}x at error {e['error']:.4f}; best of ours at equal or "
                     f"lower error: {best['name']} {best['speedup']:.2f}x -> **{verdict}**"
                     + (" (CIs overlap)" if overlap else ""))
    return lines


def report() -> str:
    parts = ["# Corpus CNNs: our front against every ONNX Runtime `quantize_static` configuration (issue 13)", "",
             "Produced by `benchmarks/run_snapshot.sh benchmarks/bench_cnn_fronts.py` (protocol in its docstring). "
             "Weights: ResNet-50, MobileNetV2, EfficientNet-B0, ConvNeXt-T are RANDOM (seeded `transformers` "
             "classes); YOLOv8n (nudenet) and MTCNN ONet are real weights from their wheels. Error = relative L2 "
             "error of all float outputs to fp32 on 32 evaluation inputs; speed-up over fp32 (the file), paired, with its "
             "95% CI. The pass predicts and measures over the model as it loads it (normalised: a zero Pad before a "
             "convolution folded into it, which ONNX Runtime does not always do itself); the prediction error "
             "compares its prediction with speed-up over the `fp32, normalized by the pass` row of the same run "
             "(rows before that row existed: over the file).",
             ""]
    summary = []
    for path in sorted(RESULT_DIR.glob("*.json")):
        res = json.loads(path.read_text())
        t = res["timing"]
        parts += [f"## {res['model']}", "",
                  f"- {res['date']}, CPU {res['cpu']} (2 cores), code {res['code']}; evaluation inputs: {res['eval']}",
                  f"- {t['models']} models interleaved, {t['rounds']} rounds, {t['seconds']:.0f} s; CPU busy before "
                  f"{t['busy_before']:.0%}; load average before {'/'.join(f'{x:.2f}' for x in t['load_before'])}, "
                  f"after {'/'.join(f'{x:.2f}' for x in t['load_after'])}", "",
                  "| model | speed-up [95% CI] | median ms | error | note |", "|---|---|---|---|---|"]
        for e in res["entries"]:
            if "speedup" in e:
                note = e.get("note", "")
                if e["method"] == "ours":
                    note = (f"{e['low_precision_layers']}/{e['layers']} layers low precision; pass predicted "
                            f"{e['predicted_speedup']:.2f}x, measured {e['pass_measured_speedup'] or 0:.2f}x; "
                            f"{e['wall_s']:.0f} s ({'cold' if e['cold'] else 'warm cache'})")
                parts.append(f"| {e['name']} | **{e['speedup']:.2f}x** [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}] | "
                             f"{e['ms']:.1f} | {e['error']:.4f} | {note} |")
            else:
                parts.append(f"| {e['name']} | - | - | - | {e.get('note', '')} |")
        lines = front_check(res["entries"])
        above = sum("**above ours**" in line for line in lines)
        base = next((e["speedup"] for e in res["entries"] if e["method"] == "normalized" and "speedup" in e), 1.0)
        errs = [abs(e["predicted_speedup"] - e["speedup"] / base) / (e["speedup"] / base) for e in res["entries"]
                if e["method"] == "ours" and "speedup" in e]
        fastest = max((e for e in res["entries"] if e["method"] == "ours" and "speedup" in e),
                      key=lambda e: e["speedup"], default=None)
        summary.append(f"| {res['model']} | {above} of {len(lines)} | "
                       + (f"{fastest['speedup']:.2f}x at {fastest['error']:.4f} | " if fastest else "- | ")
                       + (f"{np.median(errs):.1%} / {max(errs):.1%} | " if errs else "- | ") + f"{res['cpu']} |")
        parts += ["", f"Front check: {above} of {len(lines)} ORT points above our front.", "", *lines, ""]
    return "\n".join(parts[:4] + ["| model | ORT points above our front | our fastest point (speed-up at error) | our prediction "
                                  "error vs this run, median / max | CPU |", "|---|---|---|---|---|", *summary, ""]
                     + parts[4:]) + "\n"


def main() -> int:
    args = sys.argv[1:]
    RESULT_DIR.mkdir(parents=True, exist_ok=True)
    if args != ["--report-only"]:
        for name in args or CNNS:
            res = bench(name)
            (RESULT_DIR / f"{name}.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
            (RESULTS / "cnn_fronts.md").write_text(report())
            print(f"[{name}] written", flush=True)
    (RESULTS / "cnn_fronts.md").write_text(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
