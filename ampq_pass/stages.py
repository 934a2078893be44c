"""Stages that combine the building blocks with the on-disk cache."""

from __future__ import annotations

import numpy as np
import onnx

from .cache import Cache, digest, model_digest
from .calibration import Ranges, Samples, calibrate
from .layers import Layer
from .rewrite import required_ranges


def samples_digest(samples: Samples) -> str:
    """Digest of every shape group's arrays (one group hashes as it did before groups existed)."""
    parts = []
    for index, group in enumerate(samples.groups):
        if index:
            parts.append(("group", index))
        parts.extend((k, str(v.dtype), list(v.shape), np.ascontiguousarray(v).tobytes())
                     for k, v in sorted(group.items()))
    return digest(*parts)


def compute_ranges(model: onnx.ModelProto, layers: list[Layer], samples: Samples, *, method: str = "minmax",
                   batch_size: int = 8, cache: Cache | None = None) -> Ranges:
    """Calibrated ranges of every activation a plan over ``layers`` may quantize.

    Computed once per (model, samples, method) and kept in ``cache``: sensitivity, timing
    and rewrite all read these same ranges.
    """
    tensors = required_ranges(layers)
    key = digest("ranges", model_digest(model), samples_digest(samples), method, batch_size, tensors)
    if cache is not None and (hit := cache.get("ranges", key)) is not None:
        return Ranges.from_json(hit)
    ranges = calibrate(model, samples, tensors, method=method, batch_size=batch_size)
    if cache is not None:
        cache.put("ranges", key, ranges.to_json())
    return ranges
