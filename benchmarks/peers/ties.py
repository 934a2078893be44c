"""Head-to-head timing of the peer points a scoring left above our front (issue 15).

    benchmarks/run_snapshot.sh benchmarks/peers/ties.py resnet50 [minilm llama] [--rounds 150]

score.py times every model of a table in one run (20-40 rounds of 15-50 models on a loaded
2-core machine), so a peer point a hair above ours by point estimate, with overlapping 95%
CIs, is a tie it cannot call. This script takes each such pair from the committed scores
(``benchmarks/results/peers/<model>.json``: a peer point and the fastest of our shipped plans
at equal or better quality, on ONNX Runtime or on OpenVINO), re-measures the quality of both
files on the evaluation data, and times fp32, the peer's model and ours alone, interleaved,
for many rounds, twice: once with ours created and listed before the peer, once after it.
Two models with the same optimised graph differed by about 5% by their place in one run
(benchmarks/peers/README.md), so a head-to-head in one order only would carry that bias; the
two orders' per-round ratios t_peer / t_ours are pooled. Verdict: ours faster, peer faster,
or a tie (the 95% CI of the pooled median ratio holds 1). Writes
``benchmarks/results/peers_ties.md`` and ``benchmarks/results/peers/ties/<model>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peerlib  # noqa: E402
import score  # noqa: E402
from common import RESULTS, cpu_isa, cpu_name, wait_for_quiet  # noqa: E402

COLUMNS = {"speedup": "ONNX Runtime CPU EP", "ov_speedup": "OpenVINO CPU plugin"}
#: each model's head-to-head results (a folder of their own: score.py reads every JSON of SCORES as a model's score)
TIES = score.SCORES / "ties"


def tied_pairs(res: dict, key: str) -> list[tuple[dict, dict]]:
    """Each peer entry of a score whose speed-up ``key`` is above the fastest of our shipped
    plans (or fp32) at equal or better quality, with that plan: the pairs score.front_lines
    marks 'above ours'."""
    pairs = []
    for e in res["entries"]:
        if e["method"] in ("ours", "fp32") or not e.get(key):
            continue
        best = score.best_of_ours(res, e, key)
        if best is not None and best[key] < e[key]:
            pairs.append((e, best))
    return pairs


def _timings(key: str, paths: dict[str, str], feeds: list[dict], protocol) -> dict:
    """Every model of ``paths`` timed interleaved by ``protocol`` on ONNX Runtime (2 threads,
    IOBinding, as score.py) or OpenVINO (the project's adapter), created in the order of ``paths``."""
    import onnx

    if key == "speedup":
        from ampq_pass.backends.ort import time_interleaved
        from ampq_pass.core.ort import make_session

        sessions = {k: make_session(p, threads=2, spinning=False) for k, p in paths.items()}
        return time_interleaved(sessions, feeds, protocol=protocol)
    from ampq_pass.backends import get_backend
    from ampq_pass.core.measure import interleave

    backend = get_backend("openvino:cpu", protocol=protocol)
    runners = {k: backend.runner(onnx.load(p), feeds) for k, p in paths.items()}
    return interleave(runners, protocol, n_inputs=len(feeds))


def _outputs(key: str, path: str, ev: list[dict]) -> list[np.ndarray]:
    import onnx

    if key == "speedup":
        return peerlib.run_model(Path(path), ev)
    from ampq_pass.backends import get_backend

    model = onnx.load(path)
    first = model.graph.output[0].name
    return [o[first] for o in get_backend("openvino:cpu").outputs(model, ev)]


def head_to_head(model: str, key: str, peer: dict, ours: dict, rounds: int, m: dict, ev: list[dict],
                 ref: list[np.ndarray]) -> dict:
    from ampq_pass.backends import Protocol
    from ampq_pass.core.measure import median_ci

    out = {"column": COLUMNS[key], "peer": f"{peer['method']}/{peer['config']}", "ours": ours["config"],
           "peer_path": peer["path"], "ours_path": ours["path"]}
    # quality now, of the files timed now (a peer re-run since the scoring may have made another model)
    out["peer_quality"] = peerlib.quality(m["kind"], ref, _outputs(key, peer["path"], ev), ev)
    out["ours_quality"] = (peerlib.quality(m["kind"], ref, _outputs(key, ours["path"], ev), ev)
                           if ours["method"] != "fp32" else {"note": "fp32"})
    feeds = ev[:2]
    protocol = Protocol(warmup=3, min_repeats=rounds, max_repeats=rounds, max_seconds=None)
    legs, ratios, vs_fp32 = [], [], {"peer": [], "ours": []}
    for first in ("ours", "peer"):
        order = {"fp32": fp32_path(model), first: out[f"{first}_path"]}
        other = "peer" if first == "ours" else "ours"
        order[other] = out[f"{other}_path"]
        up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        t0 = time.perf_counter()
        t = _timings(key, order, feeds, protocol)
        r = np.asarray(t["peer"].samples) / np.asarray(t["ours"].samples)  # > 1: ours faster
        lo, hi = median_ci(r)
        legs.append({"first": first, "rounds": len(r), "seconds": time.perf_counter() - t0, "uptime_before": up,
                     "peer_over_ours": float(np.median(r)), "ci": [lo, hi],
                     "ms": {k: v.median * 1e3 for k, v in t.items()}})
        ratios.append(r)
        base = np.asarray(t["fp32"].samples)
        for who in ("peer", "ours"):
            vs_fp32[who].append(base / np.asarray(t[who].samples))
    pooled = np.concatenate(ratios)
    lo, hi = median_ci(pooled)
    out.update(legs=legs, peer_over_ours=float(np.median(pooled)), ci=[lo, hi],
               verdict="ours faster" if lo > 1 else "peer faster" if hi < 1 else "tie (CI holds 1)")
    for who in ("peer", "ours"):
        s = np.concatenate(vs_fp32[who])
        a, b = median_ci(s)
        out[f"{who}_speedup"] = float(np.median(s))
        out[f"{who}_ci"] = [a, b]
    return out


def fp32_path(model: str) -> str:
    """The prepared fp32 model of the peers benchmark for ``model``."""
    return str(peerlib.model_dir(model) / "fp32.onnx")


def run(model: str, rounds: int, ours_config: str | None = None, columns: list[str] | None = None) -> dict:
    """The head-to-heads of ``model``'s tied pairs; ``ours_config``: time each peer point against
    that plan of ours instead (it must have equal or better quality: checked), written to
    ``ties/<model>_<config>.json``; ``columns``: only these (``speedup``, ``ov_speedup``)."""
    res = json.loads((score.SCORES / f"{model}.json").read_text())
    m = peerlib.meta(model)
    ev = peerlib.batches(peerlib.load(model, "eval"), m["batch"])
    ref = peerlib.run_model(Path(fp32_path(model)), ev)
    busy = wait_for_quiet(limit=0.25, patience=90.0)
    out = {"model": model, "title": m["model"], "scored": res["date"], "date": datetime.datetime.now().isoformat(
        timespec="minutes"), "cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(), "busy_before": busy,
        "code": os.environ.get("AMPQ_CODE_COMMIT", "working tree"), "rounds": rounds, "pairs": []}
    if ours_config:
        out["ours_config"] = ours_config
    for key in columns or list(COLUMNS):
        for peer, ours in tied_pairs(res, key):
            if ours_config:
                ours = next(e for e in res["entries"] if e["method"] == "ours" and e["config"] == ours_config)
                q = score.primary(res, peer, key)
                if score.primary(res, ours, key) < q - score.QUALITY_TIE * abs(q):
                    raise SystemExit(f"--ours {ours_config}: its quality is below {peer['method']}/{peer['config']}'s")
            if not (Path(peer["path"]).exists() and Path(ours["path"]).exists()):
                out["pairs"].append({"column": COLUMNS[key], "peer": f"{peer['method']}/{peer['config']}",
                                     "ours": ours["config"], "error": "model file missing (not produced here)"})
                continue
            print(f"[ties] {model} {COLUMNS[key]}: {peer['method']}/{peer['config']} vs ours {ours['config']}",
                  flush=True)
            out["pairs"].append(head_to_head(model, key, peer, ours, rounds, m, ev, ref))
    TIES.mkdir(parents=True, exist_ok=True)
    (TIES / f"{model}{'_' + ours_config if ours_config else ''}.json").write_text(
        json.dumps(out, indent=1, default=str) + "\n")
    return out


def _qual(kind: str, q: dict) -> str:
    if "note" in q:
        return q["note"]
    return f"cosine {q['cos_mean']:.4f}" if kind == "embedding" else f"rel. err {q['rel_err']:.4f}"


def report() -> str:
    s = ("# Head-to-head timing of the peer points left above our front (issue 15)\n\n"
         "Written by `benchmarks/peers/ties.py` (its docstring says how). Each pair: a peer point that "
         "`peers.md`'s scoring put above the fastest of our plans at equal or better quality by point estimate, "
         "timed alone against that plan (and fp32), interleaved, in two runs, ours created first and then the "
         "peer first; ratio = median over the pooled rounds of t_peer / t_ours (> 1: ours faster), [95% CI]. "
         "Quality re-measured on the evaluation data for the files timed here.\n\n")
    for f in sorted(TIES.glob("*.json")):
        r = json.loads(f.read_text())
        kind = peerlib.meta(r["model"])["kind"] if (peerlib.model_dir(r["model"]) / "meta.json").exists() else ""
        chosen = (f" Each peer point against our `{r['ours_config']}` plan (equal or better quality), not the "
                  f"fastest of ours by the scoring's point estimate." if r.get("ours_config") else "")
        s += (f"## {r['title']}{' (against ' + r['ours_config'] + ')' if r.get('ours_config') else ''}\n\n"
              f"- date {r['date']} (pairs from the scoring of {r['scored']}); CPU {r['cpu']} "
              f"({r['isa']}), {r['cores']} cores; {r['rounds']} rounds per run, two runs per pair; code at git "
              f"{r['code']}; CPU busy before: {r['busy_before']:.0%}.{chosen}\n\n")
        if not r["pairs"]:
            s += "No peer point above our front in that scoring.\n\n"
            continue
        s += ("| backend | peer | ours | quality (peer / ours) | speed-up over fp32, peer / ours [95% CI] | "
              "t_peer / t_ours, ours first; peer first | pooled [95% CI] | verdict | load before each run |\n"
              "|---|---|---|---|---|---|---|---|---|\n")
        for p in r["pairs"]:
            if "error" in p:
                s += f"| {p['column']} | {p['peer']} | {p['ours']} | - | - | - | - | {p['error']} | - |\n"
                continue
            legs = "; ".join(f"{g['peer_over_ours']:.3f} [{g['ci'][0]:.3f}, {g['ci'][1]:.3f}]" for g in p["legs"])
            loads = "; ".join(g["uptime_before"].split("load average:")[-1].strip() for g in p["legs"])
            s += (f"| {p['column']} | {p['peer']} | {p['ours']} | {_qual(kind, p['peer_quality'])} / "
                  f"{_qual(kind, p['ours_quality'])} | {p['peer_speedup']:.3f}x [{p['peer_ci'][0]:.3f}, "
                  f"{p['peer_ci'][1]:.3f}] / {p['ours_speedup']:.3f}x [{p['ours_ci'][0]:.3f}, {p['ours_ci'][1]:.3f}] | "
                  f"{legs} | {p['peer_over_ours']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}] | **{p['verdict']}** | "
                  f"{loads} |\n")
        s += "\n"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="minilm, resnet50, yolov8n, llama (scored by score.py)")
    ap.add_argument("--rounds", type=int, default=150, help="rounds per run (two runs per pair)")
    ap.add_argument("--ours", help="time every tied peer point against this plan of ours (e.g. rmse_0.2) instead")
    ap.add_argument("--column", choices=list(COLUMNS), action="append",
                    help="only this backend's column (speedup: ONNX Runtime, ov_speedup: OpenVINO); repeatable")
    ap.add_argument("--report-only", action="store_true", help="rewrite peers_ties.md from the JSON files")
    a = ap.parse_args()
    if a.rounds < 10:
        ap.error(f"--rounds: at least 10 rounds for a median's CI, got {a.rounds}")
    for model in a.models if not a.report_only else []:
        run(model, a.rounds, a.ours, a.column)
    (RESULTS / "peers_ties.md").write_text(report())
    print(f"wrote {RESULTS / 'peers_ties.md'}")


if __name__ == "__main__":
    main()
