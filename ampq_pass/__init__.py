"""ampq-pass: automatic mixed precision for ONNX models.

The public API is a set of plain functions, one per stage (design.md §2)::

    model   = load_model("model.onnx")
    layers  = find_layers(model)
    samples = load_samples("calib.npz", model)         # or synthetic_samples(model)
    ranges  = compute_ranges(model, layers, samples)   # ONNX Runtime calibrators, cached
    out     = rewrite(model, layers, plan, ranges)
    save_model(out, "model_mp.onnx", source="model.onnx")
"""

from .calibration import Ranges, Samples, calibrate, load_samples, synthetic_samples
from .errors import AmpqError
from .formats import ALL_FORMATS, FORMATS
from .layers import Layer, find_layers, layer_macs
from .model import load_model, save_model
from .plan import Plan, load_plan, validate_plan
from .rewrite import required_ranges, rewrite
from .stages import compute_ranges

__all__ = [
    "ALL_FORMATS", "FORMATS", "AmpqError", "Layer", "Plan", "Ranges", "Samples", "calibrate",
    "compute_ranges", "find_layers", "layer_macs", "load_model", "load_plan", "load_samples",
    "required_ranges", "rewrite", "save_model", "synthetic_samples", "validate_plan",
]
__version__ = "0.1.0"
