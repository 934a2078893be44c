"""ampq-pass: automatic mixed precision for ONNX models.

The public API is :func:`run_pass` and one plain function per stage (design.md §2)::

    model   = load_model("model.onnx")                 # checked and normalised once
    layers  = find_layers(model)
    samples = load_samples("calib.npz", model)         # or synthetic_samples(model)
    ranges  = compute_ranges(model, layers, samples)   # ONNX Runtime calibrators, cached
    sens    = sensitivity(model, layers, ranges, samples)
    part    = partition(model, layers)
    table   = gain_table(model, layers, part, ranges, capture_inputs(model, part, samples), get_backend("ort:cpu"))
    plan    = solve(options, tau).plan                 # see ampq_pass.pipeline.build_options
    out     = rewrite(model, layers, plan, ranges)
    save_model(out, "model_mp.onnx", source="model.onnx")

Names are resolved on first use, so ``import ampq_pass`` stays cheap (torch loads only
with the stages that need it).
"""

from __future__ import annotations

import importlib

#: public name -> module that defines it
_API = {
    "run_pass": "pipeline", "PassOptions": "pipeline", "PassResult": "pipeline",
    "AmpqError": "core.errors", "load_model": "core.model", "save_model": "core.model",
    "Samples": "core.samples", "load_samples": "core.samples", "synthetic_samples": "core.samples",
    "FORMATS": "core.formats", "ALL_FORMATS": "core.formats",
    "Layer": "stages.layers", "find_layers": "stages.layers", "layer_macs": "stages.layers",
    "Ranges": "stages.calibrate", "calibrate": "stages.calibrate", "compute_ranges": "stages.calibrate",
    "required_ranges": "stages.calibrate",
    "Sensitivity": "stages.sensitivity", "sensitivity": "stages.sensitivity", "predicted_mse": "stages.sensitivity",
    "partition": "stages.partition", "extract": "stages.subgraphs", "capture_inputs": "stages.subgraphs",
    "gain_table": "stages.timing", "predict_speedup": "stages.timing",
    "solve": "stages.solve", "pareto_front": "stages.solve", "loss_budget": "stages.solve",
    "Plan": "stages.plan", "load_plan": "stages.plan", "validate_plan": "stages.plan",
    "rewrite": "stages.rewrite", "verify": "stages.verify", "measured_loss_mse": "stages.verify",
    "build_report": "stages.report", "get_backend": "backends",
}

__all__ = sorted(_API)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'ampq_pass' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ampq_pass.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
