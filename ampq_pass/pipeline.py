"""The whole pass, stage by stage (design.md §2), with the on-disk cache.

Each stage is a plain function of plain data; :func:`run_pass` chains them:
calibrate -> sensitivity -> partition -> timing -> solve -> rewrite -> verify -> report.
Stages whose inputs did not change are read from the cache, so a rerun (or a run after
an interruption) repeats only what is missing.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ampq_pass.backends import get_backend
from ampq_pass.backends.ray_pool import RayAddress, pool_for, require_ray
from ampq_pass.core.cache import Cache, cached, digest, model_digest
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import FORMATS, HP
from ampq_pass.core.model import check_output_path, finish_loading, read_model, save_model
from ampq_pass.core.params import Integer, Number, OneOf, Shapes, SubsetOf, validate_params
from ampq_pass.core.samples import Samples, load_samples, samples_digest, synthetic_samples, timing_feeds
from ampq_pass.stages.calibrate import CALIBRATION_METHODS, Ranges, compute_ranges
from ampq_pass.stages.layers import Layer, find_layers, require_layers, weight_array
from ampq_pass.stages.partition import partition
from ampq_pass.stages.repair import Round, context_gains, correct, falls_short
from ampq_pass.stages.report import PassRecord, build_report
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.sensitivity import Sensitivity, predicted_mse, sensitivity
from ampq_pass.stages.sensitivity.executor import check_supported
from ampq_pass.stages.solve import Option, Solution, hp_solution, loss_budget, pareto_front, solve
from ampq_pass.stages.subgraphs import capture_inputs
from ampq_pass.stages.timing import GainTable, gain_table, predict_speedup
from ampq_pass.stages.verify import run_batches, verify


# ----------------------------------------------------------------------------- parameters

@dataclass
class PassOptions:
    """Every knob of the pass, declared with its constraint in :attr:`CONSTRAINTS` and
    validated once in :meth:`validate` with a message that names it."""

    #: a spec such as "ort:cpu" (see :func:`make_backend`) or a backend object
    backend: object = "ort:cpu"
    formats: tuple[str, ...] | None = None
    max_loss_rmse: float | None = None
    max_loss_mse: float | None = None
    max_memory: float | None = None
    loss: str = "projection"
    batch_size: int = 8
    holdout: int | None = None
    calib_method: str = "minmax"
    max_configs: int = 64
    #: also treat activation-by-activation MatMuls (attention scores) as layers
    activation_matmuls: bool = False
    timing_batches: int = 1
    pareto: int = 0
    seed: int = 0
    cache_dir: str | None = ".ampq-cache"
    progress: bool = True
    #: input name -> full shape (batch first) to time subgraphs at; default: the most
    #: common shape of the calibration set
    shapes: dict[str, tuple[int, ...]] | None = None
    #: rounds of the closed loop (:mod:`ampq_pass.stages.repair`) when the measured speed-up
    #: falls short of the prediction; 0 turns it off
    repair_rounds: int = 2
    #: time subgraphs on a Ray device pool: "local", "auto" or "ray://HOST:PORT"
    #: (:mod:`ampq_pass.backends.ray_pool`); None times them here, one after another
    ray: str | None = None

    CONSTRAINTS = {
        "batch_size": Integer(1), "max_configs": Integer(2), "timing_batches": Integer(1),
        "pareto": Integer(0, excluded=(1,), meaning="0 (off) or an integer >= 2 budgets"),
        "holdout": Integer(1, optional=True), "seed": Integer(0), "repair_rounds": Integer(0),
        "max_loss_rmse": Number(0, optional=True), "max_loss_mse": Number(0, optional=True),
        "max_memory": Number(0, optional=True),
        "calib_method": OneOf(CALIBRATION_METHODS), "formats": SubsetOf(tuple(FORMATS), optional=True),
        "shapes": Shapes(optional=True), "ray": RayAddress(optional=True),
    }

    def validate(self) -> "PassOptions":
        validate_params(self, self.CONSTRAINTS)
        if self.max_loss_rmse is not None and self.max_loss_mse is not None:
            raise AmpqError("give either max_loss_rmse or max_loss_mse, not both")
        if self.max_loss_rmse is None and self.max_loss_mse is None:
            self.max_loss_rmse = 0.01
        return self


def make_backend(spec):
    """A backend object from a spec (:func:`ampq_pass.backends.get_backend`); objects pass through."""
    return get_backend(spec) if isinstance(spec, str) else spec


# ----------------------------------------------------------------------------- stage helpers

def cached_sensitivity(model: onnx.ModelProto, layers: list[Layer], ranges: Ranges, samples: Samples,
                       formats: tuple[str, ...], opts: PassOptions, cache: Cache | None) -> tuple[Sensitivity, bool]:
    """:func:`ampq_pass.stages.sensitivity.sensitivity`, read from the cache when nothing changed."""
    key = digest("sensitivity", 1, model_digest(model), samples_digest(samples), ranges.to_json(),
                 sorted(formats), opts.loss, opts.seed, opts.batch_size, [l.name for l in layers])
    return cached(cache, "sensitivity", key,
                  lambda: sensitivity(model, layers, ranges, samples, formats=formats, loss=opts.loss,
                                      batch_size=opts.batch_size, seed=opts.seed, progress=opts.progress),
                  dump=Sensitivity.to_json, load=Sensitivity.from_json)


def layer_formats(layers: list[Layer], offered: tuple[str, ...]) -> dict[str, list[str]]:
    """Candidate formats per layer: what the rewrite can express and the backend runs fast."""
    return {l.name: [f for f in l.formats if f in offered] for l in layers}


def build_options(table: GainTable, sens: Sensitivity,
                  memory: dict[str, dict[str, int]] | None = None) -> list[list[Option]]:
    """Solver options: per subgraph, each timed configuration with its gain, predicted loss
    MSE (sum of its layers' sensitivities) and weight memory."""
    options = []
    for sg in table.subgraphs:
        opts = []
        for c in sg.configs:
            mem = float(sum(memory[l][c.formats.get(l, HP)] for l in sg.layers)) if memory else 0.0
            opts.append(Option(dict(c.formats), float(c.gain), float(predicted_mse(sens, c.formats)), mem))
        options.append(opts)
    return options


def weight_memory(model: onnx.ModelProto, layers: list[Layer], formats: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """Bytes of each layer's stored weight in each of its candidate formats (and hp)."""
    out = {}
    for l in layers:
        if l.weight is None:
            out[l.name] = {f: 0 for f in [HP, *formats[l.name]]}
            continue
        w = weight_array(model, l)
        out[l.name] = {f: int(w.nbytes) if f == HP else FORMATS[f].stored_bytes(w, l.channel_axis)
                       for f in [HP, *formats[l.name]]}
    return out


# ----------------------------------------------------------------------------- whole pass

@dataclass
class PassResult:
    report: dict
    solution: Solution
    model: onnx.ModelProto
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Inputs:
    """What the pass works on, checked before any stage runs."""

    model: onnx.ModelProto
    normalized: list[str]
    backend: object
    offered: tuple[str, ...]
    layers: list[Layer]
    calib: Samples
    holdout: Samples
    cache: Cache | None
    timing_inputs: list[dict[str, np.ndarray]]
    timing_info: dict


class _StageClock:
    """Seconds spent in each stage, for the report."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def _check_inputs(model_path, output, calib, samples: Samples | None, opts: PassOptions, log) -> _Inputs:
    """Load and normalise the model, pick the backend, formats, layers, samples and timing
    batches: every refusal the user could get happens here, before any long stage."""
    normalized: list[str] = []
    raw = read_model(model_path)
    check_output_path(output, model_path)
    if samples is None and calib:
        samples = load_samples(calib, raw)  # inputs are what normalisation never changes
    probe = None if samples is None or samples.synthetic else {k: v[:2] for k, v in samples.inputs.items()}
    model = finish_loading(raw, model_path, changes=normalized, feeds=probe)
    del raw
    for change in normalized:
        log(f"      normalised: {change}")
    backend = make_backend(opts.backend)
    offered = backend.capabilities().formats
    if opts.formats is not None:
        missing = [f for f in opts.formats if f not in offered]
        if missing:
            raise AmpqError(f"formats: backend {opts.backend} does not run {missing[0]!r} fast "
                            f"(it offers {', '.join(offered) or 'none'})")
        offered = tuple(f for f in offered if f in opts.formats)
    layers = require_layers(model, find_layers(model, activation_matmuls=opts.activation_matmuls), str(model_path))
    check_supported(model)  # an op the sensitivity executor lacks is named before any work
    if samples is None:
        samples = synthetic_samples(model, count=32, seed=opts.seed)
    if len(samples) < 2:
        raise AmpqError(f"calibration set has {len(samples)} sample; need at least 2 (calibration + held-out)")
    n_hold = opts.holdout if opts.holdout is not None else max(1, min(len(samples) // 4, 32))
    calib_set, holdout = samples.split(min(n_hold, len(samples) - 1))
    cache = Cache(opts.cache_dir) if opts.cache_dir else None
    if cache is not None:
        cache.check_writable()
    timing_inputs, timing_info = timing_feeds(model, calib_set, shapes=opts.shapes, batch_size=opts.batch_size,
                                              n_batches=opts.timing_batches)
    return _Inputs(model, normalized, backend, offered, layers, calib_set, holdout, cache, timing_inputs, timing_info)


def _verify_front(front: list[Solution], table: GainTable, inp: _Inputs, ranges: Ranges, check: dict) -> list[dict]:
    """Every point of the Pareto front rewritten and measured like the chosen plan."""
    points = []
    for point in front:
        entry = {"max_mse": point.max_mse, "predicted_mse": point.mse, "predicted_gain": point.gain,
                 "predicted_speedup": _speedup(table, point), "layers_quantized": len(point.plan.formats)}
        if point.plan.formats:
            q = rewrite(inp.model, inp.layers, point.plan, ranges)
            m = verify(inp.model, q, inp.holdout, inp.backend, inp.timing_inputs, **check)
            entry.update(measured_loss_mse=m["loss_mse"], measured_speedup=m.get("speedup"))
        else:
            entry.update(measured_loss_mse=0.0, measured_speedup=1.0)
        points.append(entry)
    return points


def run_pass(model_path: str | os.PathLike, output: str | os.PathLike, *, calib: str | os.PathLike | None = None,
             samples: Samples | None = None, options: PassOptions | None = None,
             log: Callable[[str], None] | None = None, **kwargs) -> PassResult:
    """Run every stage on ``model_path`` and write the mixed-precision model to ``output``.

    ``calib`` (a .npz or folder) or ``samples`` give the calibration set; the last
    ``holdout`` samples are kept aside to verify the plan. Keyword arguments are the fields
    of :class:`PassOptions`.
    """
    opts = (options or PassOptions(**kwargs)).validate()
    log = log or (lambda s: print(s, file=sys.stderr))
    if opts.ray:
        require_ray()  # one line saying how to get it, before any work
    clock = _StageClock()
    inp = _check_inputs(model_path, output, calib, samples, opts, log)
    model, layers, cache = inp.model, inp.layers, inp.cache
    formats = layer_formats(layers, inp.offered)
    clock.lap("load")

    log(f"[1/7] calibrating activation ranges ({opts.calib_method}, {len(inp.calib)} samples)")
    ranges = compute_ranges(model, layers, inp.calib, method=opts.calib_method, batch_size=opts.batch_size, cache=cache)
    clock.lap("calibrate")

    log(f"[2/7] sensitivity ({opts.loss} loss, formats {', '.join(inp.offered)})")
    sens, hit = cached_sensitivity(model, layers, ranges, inp.calib, inp.offered, opts, cache)
    if hit:
        log("      (from cache)")
    clock.lap("sensitivity")

    shown = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in inp.timing_info["shapes"].items())
    log(f"[3/7] partitioning into sequential subgraphs (timing at {shown}: {inp.timing_info['source']})")
    part = partition(model, layers, formats=formats, max_configs=opts.max_configs)
    timing_set = Samples({k: np.concatenate([b[k] for b in inp.timing_inputs]) for k in inp.timing_inputs[0]})
    captured = capture_inputs(model, part, timing_set, batch_size=opts.batch_size)
    clock.lap("partition")

    log(f"[4/7] timing {len(part.subgraphs)} subgraphs on {opts.backend}")
    with pool_for(opts.ray, inp.backend, opts.backend, log) as pool:
        table = gain_table(model, layers, part, ranges, captured, inp.backend, formats=inp.offered, cache=cache,
                           progress=opts.progress, model_inputs=inp.timing_inputs, pool=pool)
    clock.lap("timing")

    log("[5/7] solving the integer program")
    memory = weight_memory(model, layers, formats) if opts.max_memory is not None else None
    option_table = build_options(table, sens, memory)
    tau = loss_budget(max_loss_rmse=opts.max_loss_rmse, max_loss_mse=opts.max_loss_mse,
                      loss_sq_mean=sens.loss_sq_mean if opts.max_loss_rmse is not None else None)
    solution = solve(option_table, tau, max_memory=opts.max_memory)
    front = pareto_front(option_table, opts.pareto, max_memory=opts.max_memory) if opts.pareto else []
    clock.lap("solve")

    log("[6/7] rewriting")
    rewritten = rewrite(model, layers, solution.plan, ranges)
    clock.lap("rewrite")

    log(f"[7/7] verifying on {len(inp.holdout)} held-out samples")
    check = dict(loss=opts.loss, batch_size=opts.batch_size, seed=opts.seed,
                 hp_outputs=run_batches(model, inp.holdout, opts.batch_size))
    measured = verify(model, rewritten, inp.holdout, inp.backend, inp.timing_inputs, **check)
    rounds = [Round(0, dict(solution.plan.formats), _speedup(table, solution), measured)]
    verified = [(solution, rewritten)]
    for index in range(1, opts.repair_rounds + 1):
        if not solution.plan.formats or not falls_short(rounds[-1].predicted_speedup, measured):
            break
        log(f"      measured {measured['speedup']:.3f}x, predicted {rounds[-1].predicted_speedup:.3f}x: timing the "
            f"quantized subgraphs inside the whole model (repair round {index} of at most {opts.repair_rounds})")
        gains = context_gains(model, layers, ranges, table, solution.plan, inp.backend, inp.timing_inputs, cache=cache)
        rounds[-1].corrections = correct(table, solution.plan, gains)
        new = solve(build_options(table, sens, memory), tau, max_memory=opts.max_memory)
        if new.plan.formats == solution.plan.formats:
            break  # measured in context, the same plan is still the best one
        solution, rewritten = new, rewrite(model, layers, new.plan, ranges)
        measured = verify(model, rewritten, inp.holdout, inp.backend, inp.timing_inputs, **check)
        rounds.append(Round(index, dict(solution.plan.formats), _speedup(table, solution), measured))
        verified.append((solution, rewritten))
    # Never ship a slow-down: of the verified plans, the fastest that beats the input beyond the noise.
    faster = [i for i, r in enumerate(rounds) if r.formats and faster_beyond_noise(r.measured)]
    rejected = None
    if faster:
        best = max(faster, key=lambda i: rounds[i].measured["speedup"])
        (solution, rewritten), measured = verified[best], rounds[best].measured
    elif solution.plan.formats or len(rounds) > 1:
        last = rounds[-1] if rounds[-1].formats else rounds[0]
        rejected = {"formats": dict(last.formats), "predicted_speedup": last.predicted_speedup, "measured": last.measured}
        message = (f"the plan measured {last.measured['speedup']:.3f}x (hp {last.measured['hp_ci'][0] * 1e3:.3g}-"
                   f"{last.measured['hp_ci'][1] * 1e3:.3g} ms, plan {last.measured['plan_ci'][0] * 1e3:.3g}-"
                   f"{last.measured['plan_ci'][1] * 1e3:.3g} ms): not faster than the input beyond the noise, "
                   f"so every layer stays hp")
        log(f"      {message}")
        solution = hp_solution(option_table, tau, status="not-faster", message=message)
        rewritten = rewrite(model, layers, solution.plan, ranges)
        measured = verify(model, rewritten, inp.holdout, inp.backend, inp.timing_inputs, **check)
    save_model(rewritten, output, source=model_path)
    front_points = _verify_front(front, table, inp, ranges, check)
    clock.lap("verify")

    record = PassRecord(model_path=str(model_path), output=str(output), layers=layers, sens=sens, partition=part,
                        table=table, solution=solution, predicted_speedup=_speedup(table, solution),
                        measured=measured, tau=tau, opts=opts, ranges_method=ranges.method, samples=inp.calib,
                        holdout=inp.holdout, front=front_points, stages=clock.seconds,
                        timing_shapes=inp.timing_info, normalized=inp.normalized, rejected=rejected,
                        rounds=[r.to_json() for r in rounds])
    return PassResult(build_report(record), solution, rewritten, clock.seconds)


def faster_beyond_noise(measured: dict) -> bool:
    """Whether the written model's time is below the input's beyond the noise: the 95% CI of
    its median lies entirely below the input's (cost-model backends measure no time: True)."""
    if measured.get("speedup") is None:
        return True
    return measured["plan_ci"][1] < measured["hp_ci"][0]


def _speedup(table: GainTable, solution: Solution) -> float | None:
    try:
        return predict_speedup(table, solution.plan)
    except AmpqError:
        return None
