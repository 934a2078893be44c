"""The whole pass, stage by stage (design.md §2), with the on-disk cache.

Each stage is a plain function of plain data; :func:`run_pass` chains them:
calibrate -> sensitivity -> partition -> timing -> solve -> rewrite -> verify -> report.
Stages whose inputs did not change are read from the cache, so a rerun (or a run after
an interruption) repeats only what is missing.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ampq_pass.backends import get_backend
from ampq_pass.core.cache import Cache, digest, model_digest
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import FORMATS, HP
from ampq_pass.core.model import check_output_path, load_model, save_model
from ampq_pass.core.samples import Samples, input_specs, load_samples, samples_digest, synthetic_samples
from ampq_pass.stages.calibrate import Ranges, compute_ranges
from ampq_pass.stages.layers import Layer, find_layers, weight_array
from ampq_pass.stages.partition import partition
from ampq_pass.stages.report import build_report
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.sensitivity import Sensitivity, predicted_mse, sensitivity
from ampq_pass.stages.solve import Option, Solution, loss_budget, pareto_front, solve
from ampq_pass.stages.subgraphs import capture_inputs
from ampq_pass.stages.timing import gain_table, predict_speedup
from ampq_pass.stages.verify import run_batches, verify


# ----------------------------------------------------------------------------- parameters

@dataclass
class PassOptions:
    """Every knob of the pass, validated in :meth:`validate` with messages that name it."""

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

    def validate(self) -> "PassOptions":
        def positive_int(name, value, minimum=1):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
                raise AmpqError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("batch_size", self.batch_size)
        positive_int("max_configs", self.max_configs, 2)
        positive_int("timing_batches", self.timing_batches)
        positive_int("pareto", self.pareto, 0)
        if self.pareto == 1:
            raise AmpqError("pareto must be 0 (off) or >= 2 budgets, got 1")
        if self.holdout is not None:
            positive_int("holdout", self.holdout)
        if self.max_loss_rmse is not None and self.max_loss_mse is not None:
            raise AmpqError("give either max_loss_rmse or max_loss_mse, not both")
        for name in ("max_loss_rmse", "max_loss_mse", "max_memory"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                raise AmpqError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.max_loss_rmse is None and self.max_loss_mse is None:
            self.max_loss_rmse = 0.01
        if self.shapes is not None:
            for name, shape in self.shapes.items():
                if not isinstance(shape, (tuple, list)) or not shape or \
                        not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape):
                    raise AmpqError(f"shapes: input {name!r}: a shape is positive integers, batch first, got {shape!r}")
        if self.formats is not None:
            bad = [f for f in self.formats if f not in FORMATS]
            if bad:
                raise AmpqError(f"formats: unknown format {bad[0]!r}; expected some of {', '.join(FORMATS)}")
        return self


def make_backend(spec):
    """A backend object from a spec (:func:`ampq_pass.backends.get_backend`); objects pass through."""
    return get_backend(spec) if isinstance(spec, str) else spec


# ----------------------------------------------------------------------------- stages

def cached_sensitivity(model: onnx.ModelProto, layers: list[Layer], ranges: Ranges, samples: Samples,
                       formats: tuple[str, ...], opts: PassOptions, cache: Cache | None):
    """:func:`ampq_pass.sensitivity.sensitivity`, read from the cache when nothing changed."""
    key = digest("sensitivity", 1, model_digest(model), samples_digest(samples), ranges.to_json(),
                 sorted(formats), opts.loss, opts.seed, opts.batch_size, [l.name for l in layers])
    if cache is not None and (hit := cache.get("sensitivity", key)) is not None:
        return Sensitivity.from_json(hit), True
    sens = sensitivity(model, layers, ranges, samples, formats=formats, loss=opts.loss,
                       batch_size=opts.batch_size, seed=opts.seed, progress=opts.progress)
    if cache is not None:
        cache.put("sensitivity", key, sens.to_json())
    return sens, False


def layer_formats(layers: list[Layer], offered: tuple[str, ...]) -> dict[str, list[str]]:
    """Candidate formats per layer: what the rewrite can express and the backend runs fast."""
    return {l.name: [f for f in l.formats if f in offered] for l in layers}


def build_options(table, sens, memory: dict[str, dict[str, int]] | None = None) -> list[list[Option]]:
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


# ----------------------------------------------------------------------------- timing shapes

def timing_feeds(model: onnx.ModelProto, samples: Samples, *, shapes: dict[str, tuple[int, ...]] | None,
                 batch_size: int, n_batches: int) -> tuple[list[dict[str, np.ndarray]], dict]:
    """The batches subgraphs are timed on, and a note for the report saying which shape and why.

    With ``shapes`` (``--shape input=1x3x48x640``) the samples of the calibration group with
    those per-sample shapes are used, ``shape[0]`` per batch (repeated when the group is
    smaller); otherwise the most common shape group of the calibration set, ``batch_size``
    per batch. Real samples, so the activations captured at subgraph inputs are real too.
    """
    specs = {s.name: s for s in input_specs(model)}
    available = [{k: list(v) for k, v in shape.items()} for shape, _ in samples.shapes()]
    if shapes:
        for name, shape in shapes.items():
            if name not in specs:
                raise AmpqError(f"--shape {name}=...: {name!r} is not a model input (inputs: {', '.join(specs)})")
            spec = specs[name]
            if len(shape) != len(spec.shape):
                raise AmpqError(f"--shape {name}={'x'.join(map(str, shape))}: rank {len(shape)}, the model input "
                                f"has rank {len(spec.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise AmpqError(f"--shape {name}={'x'.join(map(str, shape))}: axis {axis} is fixed to {want} "
                                    f"in the model")
        batches = {int(s[0]) for s in shapes.values()}
        if len(batches) > 1:
            raise AmpqError(f"--shape: the inputs name different batch sizes {sorted(batches)}; give one")
        batch = batches.pop()
        group = samples.group_at({k: tuple(v[1:]) for k, v in shapes.items()})
        if group is None:
            named = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())
            have = "; ".join(", ".join(f"{k}=Nx{'x'.join(map(str, v))}" for k, v in a.items()) for a in available)
            raise AmpqError(f"--shape {named}: no calibration sample has this shape (the calibration set has: {have})")
        source = "--shape"
    else:
        group, batch, source = samples.most_common(), batch_size, "most common calibration shape"
    n = len(next(iter(group.values())))
    feeds = []
    for b in range(n_batches):
        rows = (np.arange(batch) + b * batch) % n
        feeds.append({k: np.ascontiguousarray(v[rows]) for k, v in group.items()})
        if not shapes and (b + 1) * batch >= n:
            break  # the default never repeats a sample; a named batch larger than the group does
    info = {"source": source, "shapes": {k: list(v.shape) for k, v in feeds[0].items()},
            "calibration_shapes": [{"shape": a, "samples": c} for a, (_, c) in zip(available, samples.shapes())]}
    return feeds, info


# ----------------------------------------------------------------------------- whole pass

@dataclass
class PassResult:
    report: dict
    solution: Solution
    model: onnx.ModelProto
    stage_seconds: dict[str, float] = field(default_factory=dict)


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
    stages: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + now - clock
        clock = now

    normalized: list[str] = []
    model = load_model(model_path, changes=normalized)
    for change in normalized:
        log(f"      normalised: {change}")
    check_output_path(output, model_path)
    backend = make_backend(opts.backend)
    offered = backend.capabilities().formats
    if opts.formats is not None:
        missing = [f for f in opts.formats if f not in offered]
        if missing:
            raise AmpqError(f"formats: backend {opts.backend} does not run {missing[0]!r} fast "
                            f"(it offers {', '.join(offered) or 'none'})")
        offered = tuple(f for f in offered if f in opts.formats)
    layers = find_layers(model, activation_matmuls=opts.activation_matmuls)
    if not layers:
        raise AmpqError(f"{model_path}: no quantizable layer (MatMul/Gemm/Conv/ConvTranspose with a constant weight)")
    if samples is None:
        samples = load_samples(calib, model) if calib else synthetic_samples(model, count=32, seed=opts.seed)
    n_hold = opts.holdout if opts.holdout is not None else max(1, min(len(samples) // 4, 32))
    if len(samples) < 2:
        raise AmpqError(f"calibration set has {len(samples)} sample; need at least 2 (calibration + held-out)")
    calib_set, holdout = samples.split(min(n_hold, len(samples) - 1))
    cache = Cache(opts.cache_dir) if opts.cache_dir else None
    if cache is not None:
        cache.check_writable()
    formats = layer_formats(layers, offered)
    # chosen (and a bad --shape refused) before any work
    timing_inputs, timing_info = timing_feeds(model, calib_set, shapes=opts.shapes, batch_size=opts.batch_size,
                                              n_batches=opts.timing_batches)
    lap("load")

    log(f"[1/7] calibrating activation ranges ({opts.calib_method}, {len(calib_set)} samples)")
    ranges = compute_ranges(model, layers, calib_set, method=opts.calib_method, batch_size=opts.batch_size, cache=cache)
    lap("calibrate")

    log(f"[2/7] sensitivity ({opts.loss} loss, formats {', '.join(offered)})")
    sens, hit = cached_sensitivity(model, layers, ranges, calib_set, offered, opts, cache)
    if hit:
        log("      (from cache)")
    lap("sensitivity")

    shown = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in timing_info["shapes"].items())
    log(f"[3/7] partitioning into sequential subgraphs (timing at {shown}: {timing_info['source']})")
    part = partition(model, layers, formats=formats, max_configs=opts.max_configs)
    captured = capture_inputs(model, part, Samples({k: np.concatenate([b[k] for b in timing_inputs])
                                                    for k in timing_inputs[0]}),
                              batch_size=opts.batch_size)
    lap("partition")

    log(f"[4/7] timing {sum(1 for _ in part.subgraphs)} subgraphs on {opts.backend}")
    table = gain_table(model, layers, part, ranges, captured, backend, formats=offered, cache=cache,
                       progress=opts.progress, model_inputs=timing_inputs)
    lap("timing")

    log("[5/7] solving the integer program")
    memory = weight_memory(model, layers, formats) if opts.max_memory is not None else None
    option_table = build_options(table, sens, memory)
    tau = loss_budget(max_loss_rmse=opts.max_loss_rmse, max_loss_mse=opts.max_loss_mse,
                      loss_sq_mean=sens.loss_sq_mean if opts.max_loss_rmse is not None else None)
    solution = solve(option_table, tau, max_memory=opts.max_memory)
    front = pareto_front(option_table, opts.pareto, max_memory=opts.max_memory) if opts.pareto else []
    lap("solve")

    log("[6/7] rewriting")
    rewritten = rewrite(model, layers, solution.plan, ranges)
    save_model(rewritten, output, source=model_path)
    lap("rewrite")

    log(f"[7/7] verifying on {len(holdout)} held-out samples")
    hp_outputs = run_batches(model, holdout, opts.batch_size)
    check = dict(loss=opts.loss, batch_size=opts.batch_size, seed=opts.seed, hp_outputs=hp_outputs)
    measured = verify(model, rewritten, holdout, backend, timing_inputs, **check)
    front_points = []
    for point in front:
        entry = {"max_mse": point.max_mse, "predicted_mse": point.mse, "predicted_gain": point.gain,
                 "predicted_speedup": _speedup(table, point), "layers_quantized": len(point.plan.formats)}
        if point.plan.formats:
            q = rewrite(model, layers, point.plan, ranges)
            m = verify(model, q, holdout, backend, timing_inputs, **check)
            entry.update(measured_loss_mse=m["loss_mse"], measured_speedup=m.get("speedup"))
        else:
            entry.update(measured_loss_mse=0.0, measured_speedup=1.0)
        front_points.append(entry)
    lap("verify")

    report = build_report(model_path=str(model_path), output=str(output), layers=layers, sens=sens, partition=part,
                          table=table, solution=solution, predicted_speedup=_speedup(table, solution),
                          measured=measured, tau=tau, opts=opts, ranges_method=ranges.method,
                          samples=calib_set, holdout=holdout, front=front_points, stages=stages,
                          timing_shapes=timing_info, normalized=normalized)
    return PassResult(report, solution, rewritten, stages)


def _speedup(table, solution: Solution) -> float | None:
    try:
        return predict_speedup(table, solution.plan)
    except AmpqError:
        return None
