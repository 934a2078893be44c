"""Calibrate: activation ranges from ONNX Runtime's own calibrators (MinMax, Percentile,
Entropy), kept as plain data. Sensitivity, timing and rewrite all derive their scales
from the same :class:`Ranges`, computed once and cached.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ampq_pass.core.cache import Cache, cached, digest, model_digest
from ampq_pass.core.errors import AmpqError, runtime_errors
from ampq_pass.core.formats import FORMATS
from ampq_pass.core.memory import release_freed_memory
from ampq_pass.core.fusion import FusionRules, rule_tensors
from ampq_pass.core.proto import fits_protobuf, save_external
from ampq_pass.core.samples import Samples, samples_digest
from ampq_pass.stages.layers import Layer

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
#: ONNX Runtime's working set per calibration run is bounded by running batches whose
#: inputs stay under this share of the memory budget (activations are ~this factor larger).
DEFAULT_MEMORY_BUDGET = 1 << 30
_ACTIVATIONS_PER_INPUT_BYTE = 64


def calibration_batches(samples: Samples, batch_size: int, memory_budget: int = DEFAULT_MEMORY_BUDGET):
    """``samples`` in batches of ``batch_size``, each split into sub-batches whose inputs are at
    most ``memory_budget / 64`` bytes (one sample at a time for large images)."""
    for batch in samples.batches(batch_size):
        if samples.whole_feeds:  # a whole feed has no sample axis to split
            yield batch
            continue
        n = len(next(iter(batch.values())))
        per_sample = sum(v[:1].nbytes for v in batch.values())
        sub = int(max(1, min(n, memory_budget // max(1, _ACTIVATIONS_PER_INPUT_BYTE * per_sample))))
        for start in range(0, n, sub):
            yield {k: v[start:start + sub] for k, v in batch.items()}


def required_ranges(layers: list[Layer]) -> list[str]:
    """Activation tensors whose range any plan over ``layers`` may need (each candidate
    format says which tensors of a layer it quantizes)."""
    names: set[str] = set()
    for layer in layers:
        for f in layer.formats:
            names.update(FORMATS[f].calibrated_tensors(layer))
    return sorted(names)


@dataclass
class Ranges:
    """Calibrated [lowest, highest] of activation tensors, by tensor name."""

    method: str
    tensors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> tuple[float, float]:
        try:
            return self.tensors[name]
        except KeyError:
            raise AmpqError(f"no calibrated range for tensor {name!r}; was it calibrated?") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def to_json(self) -> dict:
        return {"method": self.method, "tensors": {k: list(v) for k, v in self.tensors.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "Ranges":
        return cls(data["method"], {k: (float(a), float(b)) for k, (a, b) in data["tensors"].items()})


def calibrate(model: onnx.ModelProto, samples: Samples, tensors: list[str], *, method: str = "minmax",
              batch_size: int = 8, percentile: float = 99.999, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Ranges:
    """Ranges of ``tensors`` over ``samples`` with ONNX Runtime's calibrator for ``method``.

    Streaming: the calibrator is fed one (sub-)batch per ``collect_data`` call, so what it
    keeps between batches is its running min/max or histograms, never the activations of
    every batch (ONNX Runtime's histogram calibrators otherwise hold every exposed tensor of
    every batch until the end); batches are split so that their inputs fit ``memory_budget / 64``.
    MinMax ranges do not depend on the split; histograms are merged batch by batch as
    ONNX Runtime merges them across ``collect_data`` calls.
    """
    from onnxruntime.quantization import calibrate as ort_calibrate

    if method not in CALIBRATION_METHODS:
        raise AmpqError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    wanted = set(tensors)

    class Reader(ort_calibrate.CalibrationDataReader):
        def __init__(self, batch):
            self._it = iter([batch])

        def get_next(self):
            return next(self._it, None)

    # ONNX Runtime's calibrators pick tensors by op type (every input and output of every
    # MatMul, say, attention-mask additions included, whose -inf-like values break the
    # histogram calibrators). Narrow the selection to exactly the tensors a plan needs.
    base = {"minmax": ort_calibrate.MinMaxCalibrater, "percentile": ort_calibrate.PercentileCalibrater,
            "entropy": ort_calibrate.EntropyCalibrater}[method]

    class Narrowed(base):
        def select_tensors_to_calibrate(self, model):
            found, value_infos = super().select_tensors_to_calibrate(model)
            return found & wanted, value_infos

    # The same per-method settings as onnxruntime.quantization.calibrate.create_calibrator.
    options = {"minmax": {"symmetric": False, "moving_average": False},
               "percentile": {"symmetric": True, "num_bins": 2048, "percentile": percentile},
               "entropy": {"symmetric": False, "num_bins": 128, "num_quantized_bins": 128}}[method]
    with tempfile.TemporaryDirectory(prefix="ampq-calib-") as tmp:
        src = Path(tmp) / "model.onnx"
        large = not fits_protobuf(model)
        if large:
            save_external(model, src, "model.onnx.data")
        else:
            onnx.save_model(model, str(src))
        with runtime_errors("model"):
            op_types = sorted({n.op_type for n in model.graph.node if set(n.input) & wanted or set(n.output) & wanted})
            calibrator = Narrowed(src, op_types, str(Path(tmp) / "augmented.onnx"),
                                  use_external_data_format=large, **options)
            calibrator.augment_graph()
            calibrator.execution_providers = ["CPUExecutionProvider"]
            calibrator.create_inference_session()
            for batch in calibration_batches(samples, batch_size, memory_budget):
                calibrator.collect_data(Reader(batch))
            data = calibrator.compute_data()
            del calibrator
    release_freed_memory()  # the calibrator's session and augmented model, before sensitivity
    found = {}
    for name in wanted:
        if name in data:
            lo, hi = data[name].range_value
            found[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
    missing = wanted - set(found)
    if missing:
        raise AmpqError(f"calibrator produced no range for tensor {sorted(missing)[0]!r}")
    return Ranges(method, dict(sorted(found.items())))


def compute_ranges(model: onnx.ModelProto, layers: list[Layer], samples: Samples, *, method: str = "minmax",
                   batch_size: int = 8, cache: Cache | None = None, rules: FusionRules | None = None) -> Ranges:
    """Calibrated ranges of every activation a plan over ``layers`` may quantize (and, with a
    backend's fusion ``rules``, the tensors between layers that a rewrite following them may
    quantize: :func:`ampq_pass.core.fusion.rule_tensors`).

    Computed once per (model, samples, method) and kept in ``cache``: sensitivity, timing
    and rewrite all read these same ranges.
    """
    needed = required_ranges(layers)
    tensors = sorted(set(needed) | set(rule_tensors(model, rules, needed)))
    key = digest("ranges", model_digest(model), samples_digest(samples), method, batch_size, tensors)
    ranges, _ = cached(cache, "ranges", key, lambda: calibrate(model, samples, tensors, method=method,
                                                             batch_size=batch_size),
                       dump=Ranges.to_json, load=Ranges.from_json)
    return ranges
