"""Cost models (design.md §3 "Other cost models"): the gain table without hardware.

- ``mac``: time in *hp-MAC equivalents*: a layer costs MACs / throughput(format), with
  throughput relative to hp. The defaults are the usual peak ratios of matrix engines
  (16-bit 2x, 8-bit 4x); int4 here is weight-only (activations stay hp), so its MACs run
  at hp rate and it gains nothing in this model - its gain is memory, see ``memory``.
- ``memory``: bytes of the layers' weights as actually stored by the rewrite (quantized
  values plus scales and zero points), optionally plus the bytes of the activations
  entering each layer. Gain = bytes saved.

Only quantizable layers are counted: other ops cost the same in every configuration
and cancel in every gain.
"""

from __future__ import annotations

import numpy as np
import onnx

from ampq_pass.core.cache import digest, model_digest
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import FORMATS, HP
from ampq_pass.core.measure import Capabilities, CostModel
from ampq_pass.core.ort import observed_shapes
from ampq_pass.stages.layers import Layer, layer_macs, weight_array

#: MACs per unit time relative to hp: each format's own nominal throughput (see module docstring)
DEFAULT_THROUGHPUT: dict[str, float] = {HP: 1.0, **{name: fmt.throughput for name, fmt in FORMATS.items()}}


def _first_feeds(inputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not inputs:
        raise AmpqError("cost models need one batch of inputs to know the tensor shapes")
    return inputs[0]


def _signature(inputs: list[dict[str, np.ndarray]]) -> list:
    return sorted((k, str(v.dtype), list(v.shape)) for k, v in _first_feeds(inputs).items())


def _offered(formats: tuple[str, ...] | None, among=FORMATS) -> tuple[str, ...]:
    """The formats of the table (in its order, those in ``among``) a cost model offers: the ones
    ``formats`` names, or without it every one but those offered only on request (int8_w7)."""
    return tuple(f for f in FORMATS if f in among
                 and (f in formats if formats is not None else not FORMATS[f].on_request))


class MacModel(CostModel):
    """Theoretical time from multiply-accumulate counts and per-format throughput."""

    name = "mac"
    unit = "mac"

    def __init__(self, throughput: dict[str, float] | None = None, *, formats: tuple[str, ...] | None = None):
        self.throughput = dict(DEFAULT_THROUGHPUT)
        self.throughput.update(throughput or {})
        bad = {f: t for f, t in self.throughput.items() if not t > 0}
        if bad:
            raise AmpqError(f"mac cost model: throughput must be > 0, got {bad}")
        self._caps = Capabilities(_offered(formats, among=self.throughput), HP, "theoretical")
        # Per-instance memo: MAC counts need one ONNX Runtime run per (model, shapes),
        # and every configuration of a subgraph shares them.
        self._macs: dict[str, dict[str, int]] = {}

    def capabilities(self) -> Capabilities:
        return self._caps

    def key(self) -> dict:
        return {"backend": "mac", "throughput": dict(sorted(self.throughput.items()))}

    def macs(self, model: onnx.ModelProto, layers: list[Layer], inputs: list[dict[str, np.ndarray]]) -> dict[str, int]:
        k = digest(model_digest(model), [l.name for l in layers], _signature(inputs))
        if k not in self._macs:
            self._macs[k] = layer_macs(model, layers, _first_feeds(inputs))
        return self._macs[k]

    def cost(self, model: onnx.ModelProto, layers: list[Layer], formats: dict[str, str],
             inputs: list[dict[str, np.ndarray]]) -> float:
        macs = self.macs(model, layers, inputs)
        total = 0.0
        for layer in layers:
            fmt = formats.get(layer.name, HP)
            if fmt not in self.throughput:
                raise AmpqError(f"mac cost model has no throughput for format {fmt!r}")
            total += macs[layer.name] / self.throughput[fmt]
        return total


def weight_bytes(w: np.ndarray, layer: Layer, fmt: str) -> int:
    """Bytes the rewrite stores for ``layer``'s weight in ``fmt`` (values + scales + zero points)."""
    return int(w.nbytes) if fmt == HP else FORMATS[fmt].stored_bytes(w, layer.channel_axis)


def activation_bytes_per_element(fmt: str, hp_itemsize: int) -> float:
    """Bytes per element of a layer's input activation in ``fmt`` (hp where the format keeps it)."""
    per = None if fmt == HP else FORMATS[fmt].activation_bytes
    return float(hp_itemsize if per is None else per)


class MemoryModel(CostModel):
    """Bytes of the quantizable layers' weights (and optionally input activations)."""

    name = "memory"
    unit = "byte"

    def __init__(self, *, activations: bool = False, formats: tuple[str, ...] | None = None):
        self.activations = activations
        self._caps = Capabilities(_offered(formats), HP, "theoretical")
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}

    def capabilities(self) -> Capabilities:
        return self._caps

    def key(self) -> dict:
        return {"backend": "memory", "activations": self.activations, "bytes_version": 1}

    def _activation_shapes(self, model, layers, inputs) -> dict[str, tuple[int, ...]]:
        names = sorted({l.activation for l in layers} | {l.activation2 for l in layers if l.activation2})
        k = digest(model_digest(model), names, _signature(inputs))
        if k not in self._shapes:
            self._shapes[k] = observed_shapes(model, _first_feeds(inputs), names)
        return self._shapes[k]

    def cost(self, model: onnx.ModelProto, layers: list[Layer], formats: dict[str, str],
             inputs: list[dict[str, np.ndarray]]) -> float:
        total = 0
        for layer in layers:
            fmt = formats.get(layer.name, HP)
            if layer.weight is not None:
                total += weight_bytes(weight_array(model, layer), layer, fmt)
        if self.activations:
            shapes = self._activation_shapes(model, layers, inputs)
            for layer in layers:
                fmt = formats.get(layer.name, HP)
                for name in filter(None, (layer.activation, layer.activation2)):
                    total += int(np.prod(shapes[name])) * activation_bytes_per_element(fmt, 4)
        return float(total)
