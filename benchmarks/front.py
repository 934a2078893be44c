"""The engine behind bench_minilm_front.py and bench_models.py (issue 7).

For one model it builds, in one process, every method's plans and models:
- fp32;
- ONNX Runtime's own quantizers: ``quantize_static`` (its defaults, then the grid QDQ and
  QOperator x U8S8 and S8S8, per-channel, with and without ``quant_pre_process``) and
  ``quantize_dynamic``;
- greedy by per-layer sensitivity per unit of per-layer gain (each layer timed alone);
- our integer program with the ``mac`` cost model (bit-ops proxy, HAWQ-style);
- random plans at (about) the same predicted loss as a budget;
- ours: integer program + measured subgraph gains, over several budgets (the front);
then times all of them interleaved in one process (same inputs, round-robin) and runs
every one on the evaluation set for its quality. The pass itself is run cold and warm
in child processes (``python front.py pass ...``) for its wall time, stage seconds and
peak memory; the parent then reads the stages from the pass's own cache.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import OUT, wait_for_quiet  # noqa: E402

from ampq_pass.backends import Protocol, get_backend  # noqa: E402
from ampq_pass.core.ort import make_session  # noqa: E402
from ampq_pass.backends.ort import time_interleaved  # noqa: E402
from ampq_pass.core.cache import Cache  # noqa: E402
from ampq_pass.core.samples import Samples, timing_batch  # noqa: E402
from ampq_pass.core.formats import HP  # noqa: E402
from ampq_pass.stages.layers import find_layers  # noqa: E402
from ampq_pass.core.model import load_model  # noqa: E402
from ampq_pass.stages.partition import partition  # noqa: E402
from ampq_pass.pipeline import PassOptions, build_options, cached_sensitivity, layer_formats, run_pass  # noqa: E402
from ampq_pass.stages.plan import Plan  # noqa: E402
from ampq_pass.stages.rewrite import rewrite  # noqa: E402
from ampq_pass.stages.sensitivity import cut_mse, predicted_mse  # noqa: E402
from ampq_pass.stages.verify import run_batches  # noqa: E402
from ampq_pass.stages.solve import loss_budget, solve  # noqa: E402
from ampq_pass.stages.calibrate import compute_ranges  # noqa: E402
from ampq_pass.stages.subgraphs import capture_inputs  # noqa: E402
from ampq_pass.stages.timing import gain_table, predict_speedup  # noqa: E402

E2E_PROTOCOL = Protocol(warmup=2, min_repeats=12, max_repeats=30, rel_ci=0.01, max_seconds=300, retries=0)
LAYER_PROTOCOL = Protocol(warmup=2, min_repeats=9, max_repeats=30, rel_ci=0.02, max_seconds=20)

METHODS = ("fp32", "ort static", "ort dynamic", "greedy per-layer", "IP + mac", "random", "solver alone", "ours")
#: the loss budget given to the pass for "no budget" (its parameter must be finite)
NO_BUDGET = 1e6


# ----------------------------------------------------------------------------- the pass, cold / warm

def run_pass_child(model_path: Path, samples_npz: Path, cache_dir: Path, holdout: int, budget: float,
                   result_json: Path) -> dict:
    """The whole pass in a fresh process: wall time, stage seconds and that process's peak RSS."""
    cmd = [sys.executable, str(Path(__file__)), "pass", str(model_path), str(samples_npz), str(cache_dir),
           str(holdout), str(budget), str(result_json)]
    subprocess.run(cmd, check=True)
    return json.loads(result_json.read_text())


def _pass_main(model_path, samples_npz, cache_dir, holdout, budget, result_json) -> None:
    t0 = time.perf_counter()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with np.load(samples_npz) as z:
        samples = Samples({k: z[k] for k in z.files}, source="benchmark")
    out = Path(cache_dir).parent / (Path(model_path).stem + "_pass.onnx")
    res = run_pass(model_path, out, samples=samples, holdout=int(holdout), max_loss_rmse=float(budget),
                   cache_dir=str(cache_dir), progress=False, log=lambda s: None)
    wall = time.perf_counter() - t0
    r = res.report
    Path(result_json).write_text(json.dumps({
        "wall": wall, "stages": res.stage_seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_at_start_mb": rss0, "predicted_speedup": r["predicted"]["speedup"],
        "measured_speedup": r["measured"].get("speedup"), "predicted_loss_mse": r["predicted"]["loss_mse"],
        "measured_loss_mse": r["measured"]["loss_mse"], "layers_quantized": len(res.solution.plan.formats),
        "load_avg_end": os.getloadavg()[0]}))


# ----------------------------------------------------------------------------- baselines

class _Reader:
    """ONNX Runtime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.batches)


def ort_baselines(model_path: Path, calib_batches: list[dict], workdir: Path, *, skip=()) -> dict[str, tuple[str, str]]:
    """ONNX Runtime's quantizers: name -> (path of the quantized model or "", error message)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs one warning per int tensor
    workdir.mkdir(parents=True, exist_ok=True)
    pre = workdir / "preprocessed.onnx"
    names = {i.name for i in load_model(model_path).graph.input}
    batches = [{k: v for k, v in b.items() if k in names} for b in calib_batches]
    out: dict[str, tuple[str, str]] = {}

    def attempt(name, fn):
        if name in skip:
            return
        path = workdir / (name.replace(" ", "_").replace(",", "").replace("/", "-") + ".onnx")
        t0 = time.perf_counter()
        try:
            fn(path)
            out[name] = (str(path), f"{time.perf_counter() - t0:.0f} s")
        except Exception as e:  # a baseline that fails is reported, not hidden
            out[name] = ("", f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        print(f"  {name}: {out[name][1]}", flush=True)

    attempt("ort static: defaults", lambda p: quantize_static(str(model_path), str(p), _Reader(batches)))
    try:
        quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        sources = {"raw": model_path, "pre-processed": pre}
    except Exception as e:
        print(f"  quant_pre_process failed ({e}); the pre-processed variants are left out", flush=True)
        sources = {"raw": model_path}
    src = sources.get("pre-processed", model_path)
    # The grid issue 13 asks for: QDQ and QOperator, U8S8 and S8S8, per-channel, with and
    # without quant_pre_process (minmax calibration, ORT's default op types).
    types = {"U8S8": QuantType.QUInt8, "S8S8": QuantType.QInt8}
    for source, path_in in sources.items():
        for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
            for tname, act in types.items():
                attempt(f"ort static: {source}, {fmt.name}, {tname}, per-channel", lambda p, path_in=path_in, fmt=fmt, act=act:
                        quantize_static(str(path_in), str(p), _Reader(batches), quant_format=fmt, activation_type=act,
                                        weight_type=QuantType.QInt8, per_channel=True, reduce_range=False,
                                        calibrate_method=CalibrationMethod.MinMax))
    attempt("ort dynamic: defaults", lambda p: quantize_dynamic(str(model_path), str(p)))
    attempt("ort dynamic: pre-processed, per-channel, MatMul/Conv", lambda p: quantize_dynamic(
        str(src), str(p), per_channel=True, op_types_to_quantize=["MatMul", "Gemm", "Conv"]))
    return out


def per_layer_gains(model, layers, batches, formats_of, ranges, backend) -> dict[str, dict[str, float]]:
    """Common practice: each layer cut out alone (one-node model) and timed hp vs each format."""
    acts = sorted({l.activation for l in layers})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for n in acts:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    sess = make_session(probe)
    wanted = {i.name for i in sess.get_inputs()}
    captured = [dict(zip(acts, sess.run(acts, {k: v for k, v in f.items() if k in wanted}))) for f in batches]
    out = {}
    for layer in layers:
        sub = onnx.utils.Extractor(model).extract_model([layer.activation], [layer.output])
        models = {HP: sub}
        for fmt in formats_of[layer.name]:
            models[fmt] = rewrite(sub, [layer], Plan({layer.name: fmt}), ranges)
        t = backend.time(models, [{layer.activation: c[layer.activation]} for c in captured])
        out[layer.name] = {f: t[HP].median - t[f].median for f in models if f != HP}
    return out


def units(part, formats: dict[str, list[str]]) -> list[tuple[tuple[str, ...], list[str]]]:
    """Decision units: the partition's groups (layers sharing an input, e.g. q/k/v, take one
    format, as in the pass) with the formats every layer of the group can take."""
    out = []
    for sg in part.subgraphs:
        for g in sg.groups:
            fs = [f for f in formats[g[0]] if all(f in formats[l] for l in g)]
            if fs:
                out.append((tuple(g), fs))
    return out


def greedy_plan(sens, gains: dict[str, dict[str, float]], unit_list, tau: float) -> dict[str, str]:
    """Common practice: rank (unit, format) by sensitivity per unit of gain measured on each
    layer alone (summed over a tied group); add in that order while the predicted loss stays
    within the budget (one format per unit)."""
    items = []
    for g, fs in unit_list:
        for f in fs:
            gain = sum(gains[l].get(f, 0.0) for l in g)
            s = sum(sens.values[l][f] for l in g)
            if gain > 0:
                items.append((s / gain, g, f, s))
    items.sort(key=lambda t: t[0])
    plan, used = {}, 0.0
    for _, g, f, s in items:
        if g[0] in plan or used + s > tau:
            continue
        plan.update({l: f for l in g})
        used += s
    return plan


def random_plan(sens, unit_list, tau: float, rng: random.Random) -> dict[str, str]:
    """Units in random order, each with a random candidate format, added while the predicted
    loss stays within ``tau``: a random plan at about the same predicted loss as the budget."""
    order = list(unit_list)
    rng.shuffle(order)
    plan, used = {}, 0.0
    for g, fs in order:
        f = rng.choice(fs)
        s = sum(sens.values[l][f] for l in g)
        if used + s <= tau:
            plan.update({l: f for l in g})
            used += s
    return plan


# ----------------------------------------------------------------------------- the experiment

@dataclass
class Entry:
    name: str
    method: str
    model: object  # onnx.ModelProto or a path
    plan: dict[str, str] | None = None
    budget: float | None = None
    predicted_mse: float | None = None
    over_budget: float | None = None  # predicted_mse / the budget's loss, when the plan as written exceeds it
    predicted_speedup: float | None = None
    predicted_speedup_sum: float | None = None
    per_layer_speedup: float | None = None
    mac_speedup: float | None = None
    note: str = ""
    quality: dict = field(default_factory=dict)
    measured_mse: float | None = None
    ms: float | None = None
    ci: float | None = None
    speedup: float | None = None


@dataclass
class Spec:
    name: str
    model_path: Path
    pass_samples: Samples  # calibration + the pass's held-out tail
    holdout: int
    eval_samples: Samples
    timing_batches: list[dict]
    quality: Callable[[list[dict], list[dict]], dict]  # (fp32 outputs, outputs) -> metrics
    primary: str  # quality metric for the front
    higher_better: bool
    budgets: tuple[float, ...]
    random_budgets: tuple[float, ...]
    random_per_budget: int = 2
    pass_budget: float = 0.1
    skip_ort: tuple[str, ...] = ()


def run(spec: Spec) -> dict:
    """Everything measured for ``spec``; kept in OUT/<name>/result.pkl so that a failure while
    writing the report can be fixed and the report rewritten from the same run
    (AMPQ_BENCH_REPORT_ONLY=1) instead of measuring again."""
    import pickle

    saved = OUT / spec.name / "result.pkl"
    if os.environ.get("AMPQ_BENCH_REPORT_ONLY") and saved.exists():
        return pickle.loads(saved.read_bytes())
    res = _run(spec)
    for e in res["entries"]:
        e.model = None
    saved.write_bytes(pickle.dumps(res))
    return res


def _run(spec: Spec) -> dict:
    work = OUT / spec.name
    work.mkdir(parents=True, exist_ok=True)
    npz = work / "pass_samples.npz"
    np.savez(npz, **spec.pass_samples.inputs)
    cache_dir = work / "pass-cache"
    import shutil

    if os.environ.get("AMPQ_BENCH_REUSE") and (work / "warm.json").exists():  # development only
        cold, warm = (json.loads((work / f"{n}.json").read_text()) for n in ("cold", "warm"))
    else:
        shutil.rmtree(cache_dir, ignore_errors=True)
        wait_for_quiet(limit=0.25, patience=90.0)
        print(f"[{spec.name}] pass, cold", flush=True)
        cold = run_pass_child(spec.model_path, npz, cache_dir, spec.holdout, spec.pass_budget, work / "cold.json")
        print(f"[{spec.name}] pass, warm", flush=True)
        warm = run_pass_child(spec.model_path, npz, cache_dir, spec.holdout, spec.pass_budget, work / "warm.json")

    # The same stages as the pass, read from its cache (nothing is recomputed).
    opts = PassOptions(holdout=spec.holdout, cache_dir=str(cache_dir), progress=False).validate()
    model = load_model(spec.model_path)
    backend = get_backend("ort:cpu")
    offered = backend.capabilities().formats
    layers = find_layers(model, offered=offered)
    formats = layer_formats(layers, offered)
    with np.load(npz) as z:
        samples = Samples({k: z[k] for k in z.files}, source="benchmark")
    calib_set, _ = samples.split(spec.holdout)
    cache = Cache(str(cache_dir))
    rules = backend.capabilities().rules  # the pass calibrates, times and rewrites with the backend's fusion rules
    ranges = compute_ranges(model, layers, calib_set, method=opts.calib_method, batch_size=opts.batch_size, cache=cache,
                            rules=rules)
    timing_inputs = list(calib_set.batches(opts.batch_size))[: opts.timing_batches]
    sens, hit = cached_sensitivity(model, layers, ranges, calib_set, offered, opts, cache,
                                   run_batch=timing_batch(timing_inputs, {}))
    assert hit, "sensitivity should come from the pass's cache"
    part = partition(model, layers, formats=formats, max_configs=opts.max_configs)
    captured = capture_inputs(model, part, Samples({k: np.concatenate([b[k] for b in timing_inputs])
                                                    for k in timing_inputs[0]}), batch_size=opts.batch_size)
    calls = {"n": 0}

    class Count:
        def __init__(self, inner):
            self.inner, self.name, self.unit = inner, inner.name, inner.unit

        def capabilities(self):
            return self.inner.capabilities()

        def key(self):
            return self.inner.key()

        def time(self, models, inputs):
            calls["n"] += 1
            return self.inner.time(models, inputs)

    table = gain_table(model, layers, part, ranges, captured, Count(backend), formats=offered, cache=cache,
                       progress=False, model_inputs=timing_inputs)
    print(f"[{spec.name}] gain table from cache: {calls['n']} timing calls", flush=True)
    options = build_options(table, sens)
    mac = get_backend("mac", formats=offered)
    mac_table = gain_table(model, layers, part, ranges, captured, mac, formats=offered, cache=None, progress=False,
                           model_inputs=timing_inputs)
    mac_options = build_options(mac_table, sens)

    print(f"[{spec.name}] per-layer timing (greedy baseline)", flush=True)
    t0 = time.perf_counter()
    layer_backend = get_backend("ort:cpu", protocol=LAYER_PROTOCOL)
    per_layer = per_layer_gains(model, layers, timing_inputs, formats, ranges, layer_backend)
    t_per_layer = time.perf_counter() - t0

    def taus(b):
        return math.inf if b == math.inf else loss_budget(max_loss_rmse=b, loss_sq_mean=sens.loss_sq_mean)

    entries: list[Entry] = [Entry("fp32", "fp32", model, plan={})]
    seen: dict[tuple, Entry] = {(): entries[0]}

    def add_plan(method, name, plan, budget):
        key = tuple(sorted(plan.items()))
        if key in seen:
            seen[key].note += f"{'; ' if seen[key].note else ''}also {name}"
            return
        e = Entry(name, method, None, plan=plan, budget=budget)
        seen[key] = e
        entries.append(e)

    # ours = what the pass ships at each budget (solver, repair rounds, the int8 anchor, never a
    # slow-down), from the same cache (nothing but the closed loop's verifications is measured anew);
    # "solver alone" = the integer program's plan on the table, before any whole-model measurement
    print(f"[{spec.name}] the pass at every budget (warm cache)", flush=True)
    for b in spec.budgets:
        shipped = run_pass(spec.model_path, work / f"shipped_rmse_{b:g}.onnx", samples=samples, holdout=spec.holdout,
                           max_loss_rmse=NO_BUDGET if b == math.inf else b, cache_dir=str(cache_dir), progress=False,
                           log=lambda s: None)
        add_plan("ours", f"ours rmse<={b:g}", dict(shipped.solution.plan.formats), b)
    for b in spec.budgets:
        add_plan("solver alone", f"solver rmse<={b:g}", solve(options, taus(b)).plan.formats, b)
    for b in spec.budgets:
        add_plan("IP + mac", f"IP+mac rmse<={b:g}", solve(mac_options, taus(b)).plan.formats, b)
    unit_list = units(part, formats)
    for b in spec.budgets:
        add_plan("greedy per-layer", f"greedy rmse<={b:g}", greedy_plan(sens, per_layer, unit_list, taus(b)), b)
    rng = random.Random(0)
    for b in spec.random_budgets:
        for i in range(spec.random_per_budget):
            add_plan("random", f"random #{i + 1} rmse<={b:g}", random_plan(sens, unit_list, taus(b), rng), b)

    hp_total = table.hp_total
    for e in entries:
        if e.plan is None:
            continue
        # as written: the cut states the formats give count too (what the integer program counts);
        # a baseline solved with other cut states can land over its budget here
        e.predicted_mse = predicted_mse(sens, e.plan) + cut_mse(sens, e.plan, table.plan(dict(e.plan)).cuts)
        if e.budget is not None and e.budget != math.inf and e.predicted_mse > taus(e.budget) * (1 + 1e-6):
            e.over_budget = e.predicted_mse / taus(e.budget)
        g = sum(per_layer[l].get(f, 0.0) for l, f in e.plan.items() if f != HP)
        e.per_layer_speedup = hp_total / (hp_total - g)
        try:
            e.predicted_speedup = predict_speedup(table, e.plan)
            h = sum(sg.hp_time for sg in table.subgraphs)
            e.predicted_speedup_sum = h / (h - table.total_gain(e.plan))
            e.mac_speedup = predict_speedup(mac_table, e.plan)
        except Exception as ex:  # a plan the gain table cannot price is reported, not dropped
            e.note += f" not priced by the gain table: {str(ex)[:80]}"
        if e.plan:
            # the written model as the pass writes it: cut states from the formats, fusion rules
            e.model = rewrite(model, layers, table.plan(dict(e.plan)), ranges, rules=rules)

    print(f"[{spec.name}] ONNX Runtime quantizers", flush=True)
    calib_batches = list(calib_set.batches(opts.batch_size))
    for name, (path, msg) in ort_baselines(spec.model_path, calib_batches, work / "ort", skip=spec.skip_ort).items():
        method = "ort static" if "static" in name else "ort dynamic"
        e = Entry(name, method, path or None, note=msg)
        entries.append(e)

    # quality on the evaluation set
    print(f"[{spec.name}] quality of {len(entries)} models on {len(spec.eval_samples)} eval samples", flush=True)
    ref = run_batches(model, spec.eval_samples, opts.batch_size)
    for e in entries:
        if e.model is None:
            continue
        try:
            outs = ref if e.method == "fp32" else run_batches(e.model, spec.eval_samples, opts.batch_size)
        except Exception as ex:
            e.note += f" run failed: {type(ex).__name__}: {str(ex).splitlines()[0][:100]}"
            e.model = None
            continue
        e.quality = spec.quality(ref, outs)
        # projection loss: E_x ||f_q(x) - f_hp(x)||^2 (sum over outputs), as the pass measures it
        sq = [sum(((o[k] - r[k]) ** 2).reshape(len(r[k]), -1).sum(1) for k in r if r[k].dtype.kind == "f")
              for r, o in zip(ref, outs)]
        e.measured_mse = float(np.concatenate(sq).mean())

    # end to end: every model, interleaved in one process
    live = [e for e in entries if e.model is not None]
    print(f"[{spec.name}] timing {len(live)} models interleaved", flush=True)
    sessions = {e.name: make_session(e.model if not isinstance(e.model, str) else e.model, threads=2, spinning=False) for e in live}
    busy = wait_for_quiet(limit=0.25, patience=90.0)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    timings = time_interleaved(sessions, spec.timing_batches, protocol=E2E_PROTOCOL)
    t_e2e = time.perf_counter() - t0
    load_after = os.getloadavg()
    del sessions
    # Speed-up = median over rounds of the paired ratio t_fp32[r] / t_model[r]: both ran in the
    # same round on the same batch, so a burst of load from another process cancels out of
    # most ratios (medians of times alone are far noisier on this shared machine).
    from ampq_pass.core.measure import median_ci

    ref_t = np.asarray(timings["fp32"].samples)
    for e in live:
        t = timings[e.name]
        ratios = ref_t / np.asarray(t.samples)
        lo, hi = median_ci(ratios)
        e.ms, e.speedup = t.median * 1e3, float(np.median(ratios))
        e.ci = (hi - lo) / 2 / e.speedup

    return {"entries": entries, "cold": cold, "warm": warm, "table": table, "sens": sens, "per_layer_s": t_per_layer,
            "e2e_s": t_e2e, "rounds": len(timings["fp32"].samples) if hasattr(timings["fp32"], "samples") else None,
            "load_before": load_before, "busy_before": busy, "load_after": load_after, "layers": len(layers),
            "subgraphs": len(part.subgraphs), "configs": table.n_configs, "offered": offered,
            "code": code_version()}


def code_version() -> str:
    import ampq_pass

    commit = os.environ.get("AMPQ_CODE_COMMIT")
    where = str(Path(ampq_pass.__file__).parent)
    return (f"ampq_pass at git {commit} (clean snapshot {where})" if commit
            else f"ampq_pass from the working tree {where} (may include uncommitted edits)")


_PREFIX = {"ours": "ours", "solver": "solver alone", "IP+mac": "IP + mac", "greedy": "greedy per-layer",
           "random": "random"}


def also_methods(e) -> set[str]:
    """Methods whose plan was identical to this entry's (measured once; see the note)."""
    return {_PREFIX[w.split()[1]] for w in e.note.split("; ") if w.startswith("also ") and w.split()[1] in _PREFIX}


# ----------------------------------------------------------------------------- analysis

def front_of(points, higher_better):
    """Upper envelope: points (quality, speed-up) not dominated by another of the same set."""
    def better_q(a, b):
        return a >= b if higher_better else a <= b
    return sorted([p for p in points if not any(better_q(q[0], p[0]) and q[1] >= p[1] and q != p for q in points)],
                  key=lambda p: p[0], reverse=not higher_better)


def front_check(entries, primary, higher_better, tol: float) -> list[str]:
    """For each baseline point: the best measured speed-up of our plans (or fp32) at equal or
    better quality. Returns one line per baseline point that beats it by more than ``tol``."""
    ours = [(e.quality[primary], e.speedup) for e in entries if e.method in ("ours", "fp32") and e.speedup]
    bad = []
    for e in entries:
        if e.method in ("ours", "fp32") or not e.speedup or primary not in e.quality:
            continue
        q = e.quality[primary]
        ok = [s for qq, s in ours if (qq >= q if higher_better else qq <= q)]
        best = max(ok) if ok else None
        if best is None or best < e.speedup * (1 - tol):
            bad.append((e, best))
    return bad


def budget_rows(entries, metric: str, label: str) -> str:
    """At equal predicted-loss budget: the measured speed-up (and quality) of each plan-making
    method. This is what the integer program maximises; the quality-ordered front check above
    also depends on how measured quality ranks plans of nearly equal predicted loss. A plan
    whose predicted loss as written (its layers and the cut states its formats give) exceeds
    the budget it was solved for says so: the baselines' integer programs may pick other cut
    states than the rewrite writes for their formats."""
    methods = ("ours", "solver alone", "IP + mac", "greedy per-layer")
    by = {}
    for e in entries:
        if e.budget is None or not e.speedup:
            continue
        for m in {e.method} | also_methods(e):
            if m in methods:
                for b in [e.budget] + _also_budgets(e, m):
                    by[(m, b)] = e
    budgets = sorted({b for (_, b) in by})
    rows = [f"| max_loss_rmse | " + " | ".join(f"{m}: speed-up ({label})" for m in methods) + " | best |",
            "|---|" + "---|" * (len(methods) + 1)]
    wins = 0
    for b in budgets:
        cells, best = [], None
        for m in methods:
            e = by.get((m, b))
            over = e is not None and e.budget == b and e.over_budget
            cells.append("-" if e is None else f"{e.speedup:.3f}x ±{e.ci * 100:.1f}% ({e.quality[metric]:.4f})"
                         + (f" over budget x{e.over_budget:.2f} as written" if over else ""))
            if e is not None and (best is None or e.speedup > best[1]):
                best = (m, e.speedup)
        wins += best is not None and best[0] == "ours"
        rows.append(f"| {b:g} | " + " | ".join(cells) + f" | {best[0] if best else '-'} |")
    return "\n".join(rows) + f"\n\nOurs has the highest measured speed-up at {wins} of {len(budgets)} budgets.\n"


def _also_budgets(e, method) -> list[float]:
    out = []
    for w in e.note.split("; "):
        parts = w.split()
        if len(parts) >= 3 and parts[0] == "also" and _PREFIX.get(parts[1]) == method and "rmse<=" in w:
            try:
                out.append(float(w.split("rmse<=")[1]))
            except ValueError:
                pass
    return out


def table_rows(entries, metrics: list[tuple[str, str]]) -> str:
    head = "| model | method | low-precision layers | median ms | speed-up (paired) | CI | " + " | ".join(
        m[1] for m in metrics) + " | predicted loss MSE | measured loss MSE | note |\n"
    head += "|" + "---|" * (9 + len(metrics)) + "\n"
    rows = []
    for e in entries:
        n = "-" if e.plan is None else fmt_counts(e.plan)
        q = " | ".join((f"{e.quality[m[0]]:.4f}" if m[0] in e.quality else "-") for m in metrics)
        rows.append(f"| {e.name} | {e.method} | {n} | {e.ms:.1f} | **{e.speedup:.2f}x** | ±{e.ci * 100:.1f}% | {q} | "
                    f"{_g(e.predicted_mse)} | {_g(e.measured_mse)} | {e.note} |" if e.speedup else
                    f"| {e.name} | {e.method} | {n} | - | - | - | {q} | - | - | {e.note} |")
    return head + "\n".join(rows) + "\n"


def fmt_counts(plan: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for f in plan.values():
        if f != HP:
            counts[f] = counts.get(f, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _g(x):
    return "-" if x is None else f"{x:.3g}"


def prediction_rows(entries) -> tuple[str, list[float], list[float]]:
    rows, ours, naive = [], [], []
    for e in entries:
        if not e.plan or not e.speedup or e.predicted_speedup is None:
            continue
        eo = abs(e.predicted_speedup - e.speedup) / e.speedup
        en = abs(e.per_layer_speedup - e.speedup) / e.speedup
        ours.append(eo)
        naive.append(en)
        es = abs(e.predicted_speedup_sum - e.speedup) / e.speedup
        rows.append(f"| {e.name} | {e.speedup:.3f}x ±{e.ci * 100:.1f}% | {e.predicted_speedup:.3f}x | {eo * 100:.1f}% | "
                    f"{e.predicted_speedup_sum:.3f}x | {es * 100:.1f}% | "
                    f"{e.per_layer_speedup:.3f}x | {en * 100:.1f}% | {e.mac_speedup:.2f}x |")
    head = ("| plan | measured (paired ratio, CI) | predicted: subgraph gains (the pass) | error | subgraph gains over "
            "sum of subgraph hp times | error | per-layer sum | error | mac model |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n", ours, naive


COLORS = {"fp32": "black", "ort static": "tab:orange", "ort dynamic": "tab:brown", "greedy per-layer": "tab:green",
          "IP + mac": "tab:purple", "random": "tab:gray", "solver alone": "tab:pink", "ours": "tab:red"}
MARKERS = {"fp32": "*", "ort static": "s", "ort dynamic": "D", "greedy per-layer": "^", "IP + mac": "v",
           "random": "x", "solver alone": "P", "ours": "o"}


def plots(res: dict, spec: Spec, prefix: str, xlabel: str, logx: bool = False, xform=None,
          target_x: float | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import RESULTS

    entries = [e for e in res["entries"] if e.speedup]
    files = []
    # 1. the front
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xf = xform or (lambda q: q)
    higher_better = spec.higher_better if xform is None else False
    for m in METHODS:
        pts = [(xf(e.quality[spec.primary]), e.speedup) for e in entries
               if (e.method == m or m in also_methods(e)) and spec.primary in e.quality]
        if logx:  # fp32 has error 0: shown as the line at 1x instead
            pts = [p for p in pts if p[0] > 0]
        if not pts:
            continue
        x, y = zip(*pts)
        ax.scatter(x, y, c=COLORS[m], marker=MARKERS[m], label=m, s=60 if m == "ours" else 40, zorder=3)
        if m in ("ours", "solver alone", "greedy per-layer", "IP + mac"):
            f = front_of(pts, higher_better)
            fx, fy = zip(*f)
            ax.plot(fx, fy, c=COLORS[m], lw=1.5 if m == "ours" else 1, alpha=0.8, zorder=2)
    if logx:
        ax.axhline(1.0, c="black", lw=0.8, ls=":", label="fp32")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("measured speed-up over fp32 (x)")
    if logx:
        ax.set_xscale("log")
    if higher_better:
        ax.invert_xaxis()
    if target_x is not None:
        ax.axvline(target_x, c="tab:blue", lw=0.8, ls="--", label="quality target")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{spec.name}: measured speed-up vs quality (ORT CPU EP, one interleaved run)")
    fig.tight_layout()
    files.append(f"{prefix}_front.png")
    fig.savefig(RESULTS / files[-1], dpi=110)
    plt.close(fig)

    # 2. time-gain prediction
    fig, ax = plt.subplots(figsize=(6, 5.5))
    mixed = [e for e in entries if e.plan and e.predicted_speedup]
    ax.scatter([e.speedup for e in mixed], [e.predicted_speedup for e in mixed], c="tab:red", label="subgraph gains (ours)")
    ax.scatter([e.speedup for e in mixed], [e.per_layer_speedup for e in mixed], c="tab:green", marker="^",
               label="per-layer sum")
    lo = min([e.speedup for e in mixed] + [e.per_layer_speedup for e in mixed] + [1.0])
    hi = max([e.speedup for e in mixed] + [e.predicted_speedup for e in mixed])
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("measured speed-up (x)")
    ax.set_ylabel("predicted speed-up (x)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{spec.name}: time-gain prediction")
    fig.tight_layout()
    files.append(f"{prefix}_speedup_prediction.png")
    fig.savefig(RESULTS / files[-1], dpi=110)
    plt.close(fig)

    # 3. loss MSE predicted vs measured
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for m in METHODS:
        pts = [(e.predicted_mse, e.measured_mse) for e in mixed if e.method == m and e.predicted_mse and e.measured_mse]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, c=COLORS[m], marker=MARKERS[m], label=m)
    allv = [v for e in mixed for v in (e.predicted_mse, e.measured_mse) if v]
    if allv:
        ax.plot([min(allv), max(allv)], [min(allv), max(allv)], "k--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("predicted loss MSE (first-order Taylor, calibration set)")
    ax.set_ylabel("measured loss MSE (ORT, evaluation set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{spec.name}: loss-MSE prediction")
    fig.tight_layout()
    files.append(f"{prefix}_loss_prediction.png")
    fig.savefig(RESULTS / files[-1], dpi=110)
    plt.close(fig)

    # 4. pass runtime per stage, cold and warm, with peak memory
    fig, ax = plt.subplots(figsize=(7, 4))
    stages = list(res["cold"]["stages"])
    left = {"cold": 0.0, "warm": 0.0}
    cmap = plt.get_cmap("tab10")
    for i, st in enumerate(stages):
        for run_name in ("cold", "warm"):
            v = res[run_name]["stages"].get(st, 0.0)
            ax.barh(run_name, v, left=left[run_name], color=cmap(i % 10), label=st if run_name == "cold" else None)
            left[run_name] += v
    for run_name in ("cold", "warm"):
        ax.text(left[run_name], run_name, f"  {res[run_name]['wall']:.0f} s wall, peak RSS "
                f"{res[run_name]['peak_rss_mb']:.0f} MB", va="center", fontsize=8)
    ax.set_xlim(0, max(left.values()) * 1.6)
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    ax.set_title(f"{spec.name}: the pass, per stage (cold = empty cache, warm = same cache)")
    fig.tight_layout()
    files.append(f"{prefix}_pass_runtime.png")
    fig.savefig(RESULTS / files[-1], dpi=110)
    plt.close(fig)
    return files


def table_section(res) -> str:
    """What the pass's gain table holds about fp32 time: the end-to-end time it divides by, and
    each subgraph's standalone fp32 time (identical blocks should agree)."""
    t = res["table"]
    h = [sg.hp_time * 1e3 for sg in t.subgraphs]
    return (f"Gain table of the cold pass: end-to-end fp32 time T = {t.hp_total * 1e3:.1f} ms; sum of the "
            f"{len(h)} subgraphs' standalone fp32 times = {sum(h):.1f} ms ({sum(h) / (t.hp_total * 1e3):.2f} x T); "
            f"per subgraph (ms): {', '.join(f'{x:.1f}' for x in h)}.\n")


def pass_section(res) -> str:
    c, w = res["cold"], res["warm"]
    s = ("| run | wall s | " + " | ".join(c["stages"]) + " | peak RSS MB | predicted speed-up | measured speed-up "
         "| predicted loss MSE | measured loss MSE |\n|" + "---|" * (7 + len(c["stages"])) + "\n")
    for name, r in (("cold (empty cache)", c), ("warm (same cache)", w)):
        s += (f"| {name} | {r['wall']:.1f} | " + " | ".join(f"{r['stages'].get(k, 0):.1f}" for k in c["stages"])
              + f" | {r['peak_rss_mb']:.0f} | {r['predicted_speedup']:.3f}x | {r['measured_speedup']:.3f}x | "
              f"{r['predicted_loss_mse']:.3g} | {r['measured_loss_mse']:.3g} |\n")
    return s


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "pass":
    _pass_main(*sys.argv[2:8])
