"""Scores every model produced for the peers benchmark (issue 15), in one process.

    benchmarks/run_snapshot.sh benchmarks/peers/score.py minilm [resnet50]   (main venv, committed code)
    benchmarks/run_snapshot.sh benchmarks/peers/score.py --report-only      (rewrite peers.md from score.json)

For each model: fp32, every peer's model (benchmarks/out/peers/<model>/<peer>/<config>.onnx and
the JSON its script wrote: knobs, search wall time, peak RSS, or the error of a failed run) and
ours (ours/rmse_*.onnx from ours.sh, wall time and peak RSS from /usr/bin/time -v). Quality on
eval.npz (held out from every search): MiniLM = cosine of mean-pooled embeddings to fp32 (mean,
min); classifier = top-1 agreement with fp32 and relative L2 error of the logits. Timing: every
model interleaved round-robin in this one process with the project's measurer
(ampq_pass.backends.ort.time_interleaved, a Protocol of 20-40 rounds, up to PEERS_MAX_ROUNDS), ORT CPU EP, 2 intra-op
threads, two evaluation batches; speed-up = median over rounds of the paired ratio
t_fp32/t_model, CI = 95% CI of that median. Writes benchmarks/out/peers/<model>/score.json,
then benchmarks/results/peers.md (every scored model) and results/peers_<model>.png.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peerlib  # noqa: E402
from common import RESULTS, cpu_isa, cpu_name, wait_for_quiet  # noqa: E402

#: every model's score, committed (peers.md and its plots are drawn from these)
SCORES = RESULTS / "peers"

PEER_NAMES = {"inc": "Intel Neural Compressor", "aimet": "Qualcomm AIMET", "modelopt": "NVIDIA ModelOpt",
              "quark": "AMD Quark", "ort": "ONNX Runtime quantizer", "ours": "ours (ampq-pass)", "fp32": "fp32",
              "rejected": "ours: plan rejected by the pass's verification (not shipped)"}
ORDER = ["fp32", "ours", "inc", "aimet", "quark", "modelopt", "ort"]


def _gnu_time(path: Path) -> tuple[float | None, float | None]:
    if not path.exists():
        return None, None
    t = path.read_text()
    wall = rss = None
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", t)
    if m:
        parts = [float(x) for x in m.group(1).split(":")]
        wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)
    if m:
        rss = int(m.group(1)) / 1024
    return wall, rss


def _ours_knob(ours: Path, name: str) -> str:
    """The flags of our run ``name`` (ours.sh: PRE + rmse_B; ours_metric.sh: PRE + metric_dropD)."""
    knob = (f"--max-loss-rmse {name.split('rmse_')[1]}" if "rmse_" in name else
            f"--max-metric-drop {name.split('drop')[1]} (cosine on search.npz)")
    if (ours / f"{name}.flags").exists():  # more pass flags (ours.sh AMPQ_FLAGS)
        knob += " " + (ours / f"{name}.flags").read_text().strip()
    return knob


def entries_for(model: str) -> list[dict]:
    d = peerlib.model_dir(model)
    out = [{"method": "fp32", "config": "fp32", "knob": "-", "path": str(d / "fp32.onnx"), "status": "ok"}]
    ours = d / "ours"
    for tf in sorted(ours.glob("*.time"), key=lambda p: p.stat().st_mtime):
        name = tf.name[:-len(".time")]
        wall, rss = _gnu_time(tf)
        rep = ours / f"{name}.report.json"
        onnx_path = ours / f"{name}.onnx"
        e = {"method": "ours", "config": name, "knob": _ours_knob(ours, name), "search_s": wall,
             "peak_rss_mb": rss, "path": str(onnx_path),
             "search_note": "",
             "status": "ok" if onnx_path.exists() and rep.exists() else "failed"}
        if rep.exists():
            r = json.loads(rep.read_text())
            n_layers = len(r["layers"])
            n_q = sum(1 for l in r["layers"] if l.get("format") not in (None, "hp", "fp32"))
            e["detail"] = f"{n_q}/{n_layers} layers low precision"
            if r.get("backend", "ort:cpu") != "ort:cpu":
                e["detail"] = f"plan made by timing on {r['backend']}; " + e["detail"]
            rej = r.get("rejected_plan")
            if rej:
                e["detail"] += (f"; the pass's verification rejected its plan ({rej['predicted_speedup']:.2f}x "
                                f"predicted, {rej['measured']['speedup']:.2f}x measured, CIs overlapping under load) "
                                f"and wrote the input")
            e["predicted_speedup"] = r["predicted"]["speedup"]
            if (ours / f"{name}.commit").exists():  # a run with its own code version (ours_metric.sh)
                e["detail"] += f"; pass at git {(ours / f'{name}.commit').read_text().strip()}"
            if r.get("search"):
                srch = r["search"]
                tried = srch.get("plans") or srch.get("tried") or []
                e["detail"] += f"; metric search: {len(tried) if isinstance(tried, list) else tried} plans evaluated"
            e["stages"] = st = r.get("stages_seconds") or {}
            # cold = the run timed the subgraphs itself (its cache did not have them)
            e["search_note"] = (f"cold run (timing stage {st.get('timing', 0):.0f} s)" if st.get("timing", 0) > 30 else
                                f"warm run (subgraph timings from the cache; verification {st.get('verify', 0):.0f} s)")
        else:
            e["error"] = (ours / f"{name}.log").read_text()[-500:] if (ours / f"{name}.log").exists() else "no report"
        out.append(e)
    for plan in sorted(ours.glob("*.rejected_plan.onnx")):
        name = plan.name[:-len(".rejected_plan.onnx")]
        rep = json.loads((ours / f"{name}.report.json").read_text())
        rej = rep["rejected_plan"]
        n_q = sum(1 for f in rej["formats"].values() if f not in ("hp", "fp32"))
        out.append({"method": "ours", "config": f"{name} rejected plan", "rejected": True,
                    "knob": _ours_knob(ours, name), "path": str(plan), "status": "ok",
                    "search_note": "NOT the pass's output: the plan its verification rejected (written with --plan)",
                    "detail": (f"{n_q}/{len(rep['layers'])} layers low precision; pass predicted "
                               f"{rej['predicted_speedup']:.2f}x, its verification measured "
                               f"{rej['measured']['speedup']:.2f}x")})
    for peer in ORDER[2:]:
        for jf in sorted((d / peer).glob("*.json")) if (d / peer).exists() else []:
            r = json.loads(jf.read_text())
            knobs = r.get("knobs", {})
            e = {"method": peer, "config": r["config"], "status": r["status"], "search_s": r.get("search_s"),
                 "peak_rss_mb": r.get("peak_rss_mb"), "path": str(d / peer / f"{r['config']}.onnx"),
                 "knob": _knob(peer, r["config"], knobs), "versions": r.get("versions"), "error": r.get("error"),
                 "detail": _detail(r)}
            out.append(e)
    return out


def _knob(peer, config, knobs) -> str:
    if peer == "inc":
        if "algorithm" in knobs:  # its int4 weight-only quantizers (no search)
            return f"{knobs['algorithm']} int4, group {knobs['group_size']}"
        return f"tolerable_loss={knobs.get('tolerable_loss')}"
    if peer == "aimet":
        return (f"allowed_accuracy_drop={knobs['allowed_accuracy_drop']}" if "allowed_accuracy_drop" in knobs
                else "W8A8 PTQ (no search)")
    if peer == "quark":
        return knobs.get("knob", config)
    return config


def _detail(r) -> str:
    bits = []
    if r.get("peer") == "aimet" and r.get("pareto_points") == 0:
        bits.append("AMP exited early: the all-W8A8 candidate was already within the allowed drop")
    for k in ("trials", "goal_met", "pareto_points", "evaluations", "quantize_linear_nodes", "layers_promoted",
              "note"):
        if k in r:
            bits.append(f"{k} {r[k]}")
    return ", ".join(bits)


def qdq_summary(path: str) -> str:
    """What the written model runs in low precision: QuantizeLinear nodes by integer type,
    dynamic-quantization / integer-kernel nodes, and weight-only ones (MatMulNBits, and
    DequantizeLinear of int4 weights, which ORT fuses into it), counted from the file, no
    inference."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {i.name: i.data_type for i in m.graph.initializer}
    names = {2: "uint8", 3: "int8", 4: "uint16", 5: "int16"}
    q: dict[str, int] = {}
    other: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            t = names.get(inits.get(n.input[2]) if len(n.input) > 2 else 2, "?")
            q[t] = q.get(t, 0) + 1
        elif n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
                           "QLinearMatMul", "QLinearConv", "MatMulIntegerToFloat", "QAttention", "MatMulNBits"):
            other[n.op_type] = other.get(n.op_type, 0) + 1
        elif n.op_type == "DequantizeLinear" and inits.get(n.input[0]) in (22, 21):  # INT4, UINT4 weights
            other["DQ int4"] = other.get("DQ int4", 0) + 1
    parts = [f"Q {k} x{v}" for k, v in sorted(q.items())] + [f"{k} x{v}" for k, v in sorted(other.items())]
    return ", ".join(parts) or "no quantization nodes"


SMOKE = os.environ.get("PEERS_SMOKE") == "1"  # development: 2 eval batches, 3 rounds, nothing written to results/
# PEERS_MAX_ROUNDS=300: more rounds where a round is short (a Llama decode step: 40 rounds of 28 models took
# 7 s, and two scorings an hour apart moved its ratios by up to 25%); each row states the rounds it had
MAX_ROUNDS = int(os.environ.get("PEERS_MAX_ROUNDS", "40"))


def time_on_openvino(live: list[dict], feeds: list[dict], protocol, kind: str, ref: list, ev: list[dict]) -> dict | None:
    """Every model also on OpenVINO's CPU plugin (``openvino:cpu``, the project's adapter: 2
    threads, f32 inference precision), interleaved in one run of its own after ONNX Runtime's;
    each entry gets ``ov_speedup`` over OpenVINO's fp32 and its CI, and ``ov_quality``: its
    quality with OpenVINO computing it, against ORT's fp32 outputs ``ref`` on the evaluation
    batches ``ev`` (OpenVINO compiles a QDQ model its own way: on the AMD EPYC YOLOv8n with
    every conv int8_sym ran at error 0.207 there, 0.018 in ONNX Runtime). A model OpenVINO
    cannot compile gets ``ov_error``. Returns what ran (None without the openvino package)."""
    import onnx

    from ampq_pass.backends import get_backend
    from ampq_pass.core.errors import AmpqError
    from ampq_pass.core.measure import median_ci

    try:
        backend = get_backend("openvino:cpu", protocol=protocol)
    except AmpqError as ex:
        return {"skipped": str(ex)}
    runners = {}
    for e in live:
        try:
            model = onnx.load(e["path"])
            runners[f"{e['method']}/{e['config']}"] = backend.runner(model, feeds)
            first = model.graph.output[0].name
            e["ov_quality"] = peerlib.quality(kind, ref, [o[first] for o in backend.outputs(model, ev)], ev)
        except Exception as ex:  # noqa: BLE001 - a model OpenVINO cannot read or compile: named, not timed
            e["ov_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    from ampq_pass.core.measure import interleave

    timings = interleave(runners, protocol, n_inputs=len(feeds))
    del runners
    ref = np.asarray(timings["fp32/fp32"].samples)
    for e in live:
        t = timings.get(f"{e['method']}/{e['config']}")
        if t is None:
            continue
        ratios = ref / np.asarray(t.samples)
        lo, hi = median_ci(ratios)
        e.update(ov_ms=t.median * 1e3, ov_speedup=float(np.median(ratios)), ov_ci=[float(lo), float(hi)])
    import openvino

    return {"version": openvino.get_version(), "rounds": len(ref), "timing_s": time.perf_counter() - t0,
            "uptime_before": up, "fp32_ms": timings["fp32/fp32"].median * 1e3}


def score(model: str) -> dict:
    from ampq_pass.backends import Protocol
    from ampq_pass.backends.ort import time_interleaved
    from ampq_pass.core.measure import median_ci
    from ampq_pass.core.ort import make_session

    m = peerlib.meta(model)
    ents = entries_for(model)
    ev = peerlib.batches(peerlib.load(model, "eval"), m["batch"])
    if SMOKE:
        ev = ev[:2]
    ref = peerlib.run_model(Path(ents[0]["path"]), ev)
    for e in ents:
        if e["status"] != "ok":
            continue
        try:
            outs = ref if e["method"] == "fp32" else peerlib.run_model(Path(e["path"]), ev)
            e["quality"] = peerlib.quality(m["kind"], ref, outs, ev)
            e["qdq"] = qdq_summary(e["path"])
        except Exception as ex:
            e["status"] = "failed"
            e["error"] = f"scoring: {type(ex).__name__}: {str(ex)[:300]}"
        print(f"[score] {e['method']} {e['config']}: {e.get('quality', e.get('error'))}", flush=True)
    live = [e for e in ents if e["status"] == "ok"]
    sessions = {f"{e['method']}/{e['config']}": make_session(e["path"], threads=2, spinning=False) for e in live}
    feeds = ev[:2]
    busy = wait_for_quiet(limit=0.25, patience=0.0 if SMOKE else 90.0)
    up_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    protocol = (Protocol(warmup=1, min_repeats=3, max_repeats=3, max_seconds=None) if SMOKE else
                Protocol(warmup=2, min_repeats=min(20, MAX_ROUNDS), max_repeats=MAX_ROUNDS, rel_ci=0.01,
                         max_seconds=400, retries=0))
    timings = time_interleaved(sessions, feeds, protocol=protocol)
    t_e2e = time.perf_counter() - t0
    up_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    del sessions
    ref_t = np.asarray(timings["fp32/fp32"].samples)
    for e in live:
        t = timings[f"{e['method']}/{e['config']}"]
        ratios = ref_t / np.asarray(t.samples)
        lo, hi = median_ci(ratios)
        e.update(ms=t.median * 1e3, speedup=float(np.median(ratios)), ci=[float(lo), float(hi)])
    ov = time_on_openvino(live, feeds, protocol, m["kind"], ref, ev)
    import onnxruntime

    res = {"model": model, "meta": m, "entries": ents, "rounds": len(ref_t), "timing_s": t_e2e,
           "busy_before": busy, "uptime_before": up_before, "uptime_after": up_after,
           "cpu": cpu_name(),
           "isa": cpu_isa(), "cores": os.cpu_count(), "python": platform.python_version(),
           "onnxruntime": onnxruntime.__version__,
           "code": os.environ.get("AMPQ_CODE_COMMIT", "working tree"),
           "pass_code": ((peerlib.model_dir(model) / "ours" / "commit").read_text().strip()
                         if (peerlib.model_dir(model) / "ours" / "commit").exists() else "?"),
           # the plans made on OpenVINO run in their own snapshot (ours.sh: openvino_commit)
           "pass_code_openvino": ((peerlib.model_dir(model) / "ours" / "openvino_commit").read_text().strip()
                                  if (peerlib.model_dir(model) / "ours" / "openvino_commit").exists() else None),
           "date": datetime.datetime.now().isoformat(timespec="minutes"), "batch": m["batch"], "openvino": ov}
    (peerlib.model_dir(model) / ("score_smoke.json" if SMOKE else "score.json")).write_text(
        json.dumps(res, indent=1, default=str))
    if not SMOKE:  # committed beside peers.md: a fresh checkout rescoring one model keeps the others
        SCORES.mkdir(parents=True, exist_ok=True)
        (SCORES / f"{model}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    return res


# ----------------------------------------------------------------------------- report

def _q(res, e, key: str = "quality") -> str:
    q = e.get(key)
    if not q:
        return "-"
    if res["meta"]["kind"] == "embedding":
        return f"{q['cos_mean']:.4f} (min {q['cos_min']:.4f})"
    if res["meta"]["kind"] == "detector":
        kept = "-" if q.get("kept") is None else f"{q['kept']:.3f} of {q['detections']}"
        return f"rel. err {q['rel_err']:.4f}, detections kept {kept}"
    return f"top-1 {q['top1']:.3f}, rel. err {q['rel_err']:.4f}"


def primary(res, e, key: str = "speedup") -> float:
    """The quality the front check compares: on OpenVINO's column (``key`` ``ov_speedup``) the
    quality OpenVINO's outputs have, where measured."""
    q = (e.get("ov_quality") or e["quality"]) if key == "ov_speedup" else e["quality"]
    return q["cos_mean"] if res["meta"]["kind"] == "embedding" else -q["rel_err"]


def section(res) -> str:
    m = res["meta"]
    kind = res["meta"]["kind"]
    qname = {"embedding": "mean cosine to fp32 (min)", "detector": "relative output error, fp32 detections kept"}.get(
        kind, "top-1 agreement, relative logit error")
    s = (f"## {m['model']}\n\n"
         f"- date {res['date']}; CPU: {res['cpu']}{' (' + res['isa'] + ')' if res.get('isa') else ''}, "
         f"{res['cores']} cores; Python {res['python']}, onnxruntime "
         f"{res['onnxruntime']}; our pass ran at git {res.get('pass_code', '?')}"
         + (f" (its OpenVINO plans at git {res['pass_code_openvino']})" if res.get("pass_code_openvino") else "")
         + f" (clean snapshot), the scoring "
         f"(timing with the project's measurer) at git {res['code']}.\n"
         f"- data: calibration {m['calib']} (every method); a peer's own search evaluates on {m['search']} (the "
         f"samples our pass holds out to verify itself); quality below on {m['eval']} (seen by no search).\n"
         f"- timing: all {sum(1 for e in res['entries'] if e.get('speedup'))} models interleaved round-robin in one "
         f"process ({res['rounds']} rounds, {res['timing_s']:.0f} s), ORT CPU EP, 2 intra-op threads, batch "
         f"{res['batch']}, two evaluation batches; speed-up = median of the paired per-round ratio t_fp32/t_model, "
         f"[95% CI]. CPU busy just before timing: {res['busy_before']:.0%}.\n"
         f"- load: `uptime` before timing: `{res['uptime_before']}`; after: `{res['uptime_after']}`.\n"
         f"- search time = wall time of the method's run (quantization + its own search) in its own process, "
         f"peak RSS = that process's maximum resident set (ours: `/usr/bin/time -v`; peers: getrusage). Model "
         f"production ran under `nice -n 15` on the shared 2-core machine, beside other jobs: search times "
         f"are inflated by that load.\n\n")
    ov = res.get("openvino") if (res.get("openvino") or {}).get("rounds") else None
    if ov:
        s += (f"- OpenVINO column: the same models on OpenVINO {ov['version']}'s CPU plugin (the project's adapter, 2 "
              f"threads, f32 inference precision), interleaved in a run of their own after ONNX Runtime's "
              f"({ov['rounds']} rounds, {ov['timing_s']:.0f} s; `uptime` before: `{ov['uptime_before']}`); speed-up "
              f"over OpenVINO's fp32 ({ov['fp32_ms']:.1f} ms).\n\n")
    else:
        s += "- OpenVINO column: not run for this model (scored before the column existed).\n\n"
    s += ("| method | knob | speed-up over fp32 [95% CI] | median ms | on OpenVINO: over its fp32 [95% CI]; quality "
          "with OpenVINO computing it | " + qname +
          " | search time s | peak RSS MB | notes |\n|---|---|---|---|---|---|---|---|---|\n")
    for e in res["entries"]:
        name = PEER_NAMES[e["method"]] + ("" if e["method"] in ("fp32", "ours") else f" `{e['config']}`")
        if e.get("rejected"):
            name = "ours: the plan the pass rejected (not shipped)"
        if e["status"] != "ok" or not e.get("speedup"):
            err = (e.get("error") or "").replace("\n", " ").replace("|", "/")[:300]
            s += (f"| {name} | {e['knob']} | **failed** | - | - | - | {_f(e.get('search_s'))} | "
                  f"{_f(e.get('peak_rss_mb'))} | {err} |\n")
            continue
        lo, hi = e["ci"]
        notes = "; ".join(x for x in (e.get("search_note"), e.get("detail"), e.get("qdq")) if x)
        if e.get("predicted_speedup"):
            notes += f"; pass predicted {e['predicted_speedup']:.2f}x"
        s += (f"| {name} | {e['knob']} | **{e['speedup']:.2f}x** [{lo:.2f}, {hi:.2f}] | {e['ms']:.1f} | {_ov(res, e)} | "
              f"{_q(res, e)} | "
              f"{_f(e.get('search_s'))} | {_f(e.get('peak_rss_mb'))} | {notes} |\n")
    lines = front_lines(res, "speedup")
    above = sum("above ours**" in l for l in lines)
    if kind == "embedding":
        usable = [l for l, e in zip(lines, [e for e in res["entries"] if e["method"] not in ("ours", "fp32")
                                            and e.get("speedup")]) if e["quality"]["cos_mean"] >= 0.99]
        extra = (f" At mean cosine >= 0.99 (the project's MiniLM target): "
                 f"{sum('above ours**' in l for l in usable)} of {len(usable)} peer points above our front.")
    else:
        extra = ""
    same = [e["speedup"] for e in res["entries"] if e["method"] == "ours" and e.get("speedup")
            and e.get("qdq") == "no quantization nodes"]
    if same:
        extra += (f" Floor of this run: our pass's all-hp outputs (no quantization node; the input graph as the pass "
                  f"normalises it, e.g. Constant nodes moved into initializers) measured {min(same):.2f}-{max(same):.2f}x "
                  f"against the fp32 file: either the normalised graph runs that much faster or the run carries a "
                  f"bias of that size; gaps of that size between methods are not attributable to quantization.")
    s += (f"\nFront check (each peer point against the fastest of our plans, or fp32, with equal (within a "
          f"relative {QUALITY_TIE:g}: float summation order) or better "
          f"{'mean cosine' if kind == 'embedding' else 'relative error'}; point estimates, the CIs above say how "
          f"much of a gap is noise): {above} of {len(lines)} peer points above our front{_clear(lines)}.{extra}"
          f"{' Each point above ours is timed head to head against our plan in peers_ties.md (ties.py).' if above else ''}"
          f"\n\n"
          + "\n".join(lines) + "\n\n")
    if ov:
        ov_lines = front_lines(res, "ov_speedup")
        s += (f"On OpenVINO (same check with the OpenVINO column and the quality OpenVINO's outputs have, where "
              f"measured; our plans marked `openvino` were made by the pass "
              f"timing on OpenVINO, the others for ONNX Runtime): {sum('above ours**' in l for l in ov_lines)} of "
              f"{len(ov_lines)} peer points above our front{_clear(ov_lines)}.\n\n" + "\n".join(ov_lines) + "\n\n")
    s += f"![front](peers_{res['model']}.png)\n\n"
    return s


def _clear(lines: list[str]) -> str:
    """How many of the points above ours are so beyond both 95% CIs."""
    above = sum("above ours**" in l for l in lines)
    return f" ({sum('beyond both CIs' in l for l in lines)} of them beyond both 95% CIs)" if above else ""


#: qualities this close (relative) count as equal in the front check: models with the same
#: quantized weights differ by float summation order alone (the Llama decode step on OpenVINO,
#: every MatMul int4 block 32: ours 0.16033137, ORT's and Quark's 0.16033056)
QUALITY_TIE = 1e-4


def best_of_ours(res, e, key: str) -> dict | None:
    """The fastest (speed-up ``key``) of our shipped plans, or fp32, with quality equal (within
    :data:`QUALITY_TIE`) to or better than entry ``e``'s; None when there is none."""
    q = primary(res, e, key)
    ours = [o for o in res["entries"] if o["method"] in ("ours", "fp32") and o.get(key) and not o.get("rejected")
            and primary(res, o, key) >= q - QUALITY_TIE * abs(q)]
    return max(ours, key=lambda o: o[key], default=None)


def front_lines(res, key: str) -> list[str]:
    """Each peer point (speed-up ``key``) against :func:`best_of_ours`."""
    kind = res["meta"]["kind"]
    ci_key = "ci" if key == "speedup" else "ov_ci"
    lines = []
    for e in res["entries"]:
        if e["method"] in ("ours", "fp32") or not e.get(key):
            continue
        q = primary(res, e, key)
        o = best_of_ours(res, e, key)
        best = None if o is None else (o[key], o.get(ci_key) or [o[key], o[key]])
        verdict = "above ours**" if best is None or best[0] < e[key] else "at or below ours**"
        if best is not None and best[0] < e[key] and e.get(ci_key):
            # a point estimate above ours may be noise: say whether the two 95% CIs leave a gap
            clear = e[ci_key][0] > best[1][1]
            verdict += (f" ({'beyond both CIs' if clear else 'CIs overlap'}: [{e[ci_key][0]:.2f}, {e[ci_key][1]:.2f}] "
                        f"against ours [{best[1][0]:.2f}, {best[1][1]:.2f}])")
        lines.append(f"  - {PEER_NAMES[e['method']]} `{e['config']}`: {e[key]:.2f}x at "
                     f"{'cosine' if kind == 'embedding' else 'rel. err'} {abs(q):.4f}; best of ours at equal or better "
                     f"quality: {'none' if best is None else f'{best[0]:.2f}x'} -> **{verdict}")
    return lines


def _ov(res, e) -> str:
    if e.get("ov_error"):
        return "not compiled: " + e["ov_error"].replace("|", "/")[:80]
    if e.get("ov_speedup") is None:
        return "-"
    quality = f"; {_q(res, e, 'ov_quality')}" if e.get("ov_quality") else ""
    return f"{e['ov_speedup']:.2f}x [{e['ov_ci'][0]:.2f}, {e['ov_ci'][1]:.2f}]{quality}"


def _f(x) -> str:
    return "-" if x is None else f"{x:.0f}"


MARK = {"fp32": ("black", "*"), "ours": ("tab:red", "o"), "inc": ("tab:blue", "s"), "aimet": ("tab:green", "^"),
        "quark": ("tab:purple", "v"), "modelopt": ("olive", "P"), "ort": ("tab:orange", "D"),
        "rejected": ("tab:red", "o")}


def plot(res) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = res["meta"]["kind"]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    xf = (lambda e: 1 - e["quality"]["cos_mean"]) if kind == "embedding" else (lambda e: e["quality"]["rel_err"])
    for meth in ORDER + ["rejected"]:
        if meth == "rejected":
            pts = [e for e in res["entries"] if e.get("rejected") and e.get("speedup")]
        else:
            pts = [e for e in res["entries"] if e["method"] == meth and e.get("speedup") and not e.get("rejected")]
        if meth == "fp32" or not pts:
            continue
        c, mk = MARK[meth]
        x = [max(xf(e), 1e-6) for e in pts]
        y = [e["speedup"] for e in pts]
        err = [[e["speedup"] - e["ci"][0] for e in pts], [e["ci"][1] - e["speedup"] for e in pts]]
        ax.errorbar(x, y, yerr=err, fmt=mk, c=c, label=PEER_NAMES.get(meth, meth), ms=8 if meth == "ours" else 7,
                    capsize=2, zorder=3, mfc="none" if meth == "rejected" else c)
        if meth == "ours":  # our front: the fastest of our plans at each error or lower, as a staircase
            front, best = [], 0.0
            for xx, yy in sorted(zip(x, y)):
                if yy > best:
                    front.append((xx, yy))
                    best = yy
            ax.plot([p[0] for p in front], [p[1] for p in front], c=c, lw=1.2, alpha=0.7, drawstyle="steps-post")
        for e, xx, yy in zip(pts, x, y):
            ax.annotate(e["config"].replace("rmse_", "").replace(" rejected plan", ""), (xx, yy), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, c="black", lw=0.8, ls=":", label="fp32")
    ax.set_xscale("log")
    ax.set_xlabel("1 - mean cosine of mean-pooled embeddings to fp32 (log; lower is better)" if kind == "embedding"
                  else f"relative L2 error of the {'head output' if kind == 'detector' else 'logits'} to fp32 "
                       f"(log; lower is better)")
    ax.set_ylabel("measured speed-up over fp32 (x), 95% CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    short = {"minilm": "all-MiniLM-L6-v2", "resnet50": "ResNet-50 (random init)",
             "yolov8n": "YOLOv8n detector (nudenet, real weights)"}.get(res["model"], res["model"])
    ax.set_title(f"{short}: peers' own searches vs ours (ORT CPU EP, one interleaved run)", fontsize=9)
    fig.tight_layout()
    name = f"peers_{res['model']}.png"
    fig.savefig(Path("/tmp") / name if SMOKE else RESULTS / name, dpi=110)
    plt.close(fig)
    return name


def failures(results) -> str:
    s = ""
    for res in results:
        for e in res["entries"]:
            if e["status"] != "ok":
                s += f"- {res['model']}, {PEER_NAMES[e['method']]} `{e['config']}`: `{(e.get('error') or '')[:600]}`\n"
    return ("## Failed runs (exact errors)\n\n" + s + "\n") if s else ""


def legacy_sections(text: str, titles: set[str], models: set[str]) -> tuple[list[str], list[str], list[str]]:
    """From a peers.md written before the scores were committed (``SCORES``): the model sections
    whose title is not in ``titles``, the failed-run lines of models not in ``models`` and the
    version lines, to keep as they are (the runs behind them are not on this checkout)."""
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    kept, failed, versions = [], [], []
    for part in parts:
        title, _, body = part.partition("\n")
        if title.startswith("Failed runs"):
            failed = [ln for ln in body.splitlines() if ln.startswith("- ") and ln[2:].split(",")[0] not in models]
        elif title == "Versions":
            versions = [ln for ln in body.splitlines() if ln.startswith("- ")]
        elif title not in titles:
            kept.append("## " + part.rstrip() + "\n\n")
    return kept, failed, versions


def write_report() -> None:
    # by model: the committed scores (SCORES/<model>.json), then this checkout's runs (out/<model>/score.json)
    scored = {p.stem: p for p in sorted(SCORES.glob("*.json"))} if not SMOKE else {}
    scored.update({p.parent.name: p for p in sorted(peerlib.OUT.glob("*/score_smoke.json" if SMOKE else "*/score.json"))})
    results = [json.loads(p.read_text()) for p in scored.values()]
    order = ["minilm", "resnet50", "yolov8n", "llama"]
    results.sort(key=lambda r: order.index(r["model"]) if r["model"] in order else 9)
    text = ("# Peers' own automatic mixed-precision searches against ours (issue 15)\n\n"
            "Commands (each peer in its own virtualenv, `benchmarks/peers/setup.sh PEER`; see "
            "`benchmarks/peers/README.md`): `benchmarks/peers/run_all.sh MODEL` produces every model, then "
            "`benchmarks/run_snapshot.sh benchmarks/peers/score.py MODEL` scores and times them and writes this "
            "file. Every number below comes from those runs; a peer that failed is listed with its error.\n\n")
    old = RESULTS / "peers.md"
    kept, old_failed, old_versions = (legacy_sections(old.read_text(), {r["meta"]["model"] for r in results},
                                                      {r["model"] for r in results})
                                      if old.exists() and not SMOKE else ([], [], []))
    text += "".join(kept)  # sections of earlier runs first: the models' usual order, the newest last
    for res in results:
        text += section(res)
        plot(res)
    fail = failures(results)
    if old_failed:
        fail = (fail.rstrip("\n") + "\n" if fail else "## Failed runs (exact errors)\n\n") + "\n".join(old_failed) + "\n\n"
    text += fail
    versions = {}
    for res in results:
        for e in res["entries"]:
            if e.get("versions"):
                versions.setdefault(e["method"], e["versions"])
    lines = [f"- {PEER_NAMES[k]}: " + ", ".join(f"{a} {b}" for a, b in v.items()) for k, v in versions.items()]
    lines += [ln for ln in old_versions if ln not in lines]  # a peer's versions in the sections kept as they were
    text += "## Versions\n\n" + "".join(ln + "\n" for ln in lines)
    RESULTS.mkdir(exist_ok=True)
    (Path("/tmp/peers_smoke.md") if SMOKE else RESULTS / "peers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args != ["--report-only"]:
        for mdl in args or ["minilm"]:
            score(mdl)
    write_report()
