"""Sensitivity: the first-order Taylor estimate of the loss MSE of a plan (design.md §3).

For layer ``l`` and format ``p``::

    s[l][p] = E_x[(<G^W_l(x), E^W_{l,p}> + <G^A_l(x), E^A_{l,p}(x)>)^2]

The inner products are needed *per sample*, but nothing per sample is stored beyond
the current batch. One forward + backward per batch (and per random probe) gives, for
every layer, the gradient of its output ``G^Y`` and of its input *as that layer reads it*
``G^A`` (a zero tensor that requires grad is added to each layer's input and output in
the executor, so a tensor shared by q/k/v gets one gradient per consumer). Then:

- activation term: ``<G^A(x), E^A(x)>`` summed over each sample's elements;
- weight term: every quantizable op is linear in its weight, so
  ``<G^W(x), E^W> = <G^Y(x), op(A(x), E^W)>`` (the op applied to the weight error, no bias),
  and for a MatMul with a 2-D weight ``<A(x)^T G^Y(x), E^W>`` through one per-sample
  outer product shared by all formats.

Errors use :mod:`ampq_pass.formats` and the calibrated :class:`Ranges`: the same scales
as the rewrite, including what the rewrite adds for int8 Conv (quantized output, int32 bias).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import FORMATS, HP, Format, get_format
from ampq_pass.core.graph import initializers
from ampq_pass.core.ops import OPS
from ampq_pass.core.samples import Samples
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.sensitivity.executor import Executor
from ampq_pass.stages.sensitivity.losses import Loss, make_loss

# Per-sample weight gradients of a MatMul are built in chunks of at most this many elements.
_CHUNK_ELEMENTS = 1 << 25


@dataclass
class Sensitivity:
    """Per-layer, per-format loss-MSE estimates; ``s[l][hp] = 0`` is implied, not stored.

    ``weight`` and ``activation`` hold the same expectation with only one of the two
    error terms, so ``values`` = weight + activation + 2·E[cross term].
    """

    values: dict[str, dict[str, float]]
    weight: dict[str, dict[str, float]]
    activation: dict[str, dict[str, float]]
    loss_mean: float
    loss_sq_mean: float
    samples: int
    loss: str
    probes: int = 1
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"layers": self.values, "weight": self.weight, "activation": self.activation,
                "loss": self.loss, "samples": self.samples, "probes": self.probes,
                "loss_mean": self.loss_mean, "loss_sq_mean": self.loss_sq_mean, **self.extra}

    @classmethod
    def from_json(cls, data: dict) -> "Sensitivity":
        known = {"layers", "weight", "activation", "loss", "samples", "probes", "loss_mean", "loss_sq_mean"}
        return cls(values=data["layers"], weight=data["weight"], activation=data["activation"],
                   loss_mean=float(data["loss_mean"]), loss_sq_mean=float(data["loss_sq_mean"]),
                   samples=int(data["samples"]), loss=data["loss"], probes=int(data.get("probes", 1)),
                   extra={k: v for k, v in data.items() if k not in known})

    def formats(self) -> list[str]:
        seen: dict[str, None] = {}
        for per in self.values.values():
            seen.update(dict.fromkeys(per))
        return list(seen)


# ----------------------------------------------------------------------------- per-layer errors

@dataclass
class _LayerErrors:
    """What one layer needs for every candidate format: weight errors (fixed) and ranges."""

    layer: Layer
    formats: list[str]
    weight_errors: dict[str, torch.Tensor]  # format -> Q(W) - W
    bias_errors: dict[str, torch.Tensor]  # format -> Q(b) - b (int8 Conv/Gemm bias as int32)
    ranges: dict[str, tuple[float, float]]  # tensor -> calibrated range
    bias_scale: float = 1.0  # the op's factor on its bias (Gemm's beta)


def _bias_error(fmt: Format, model_inits: dict, node: onnx.NodeProto, w: np.ndarray, layer: Layer,
                ranges: Ranges) -> np.ndarray | None:
    """Rounding error of the bias the format's rewrite stores (int8: int32 with the kernel's scale)."""
    bias = OPS[layer.op_type].bias(node)
    if not fmt.quantizes_bias or bias not in model_inits:
        return None
    b = onnx.numpy_helper.to_array(model_inits[bias])
    if b.ndim != 1:
        return None
    scale = fmt.bias_scale(w, node, *ranges[layer.activation])
    return fmt.fake_bias(b, scale) - b.astype(np.float32)


def _prepare(model: onnx.ModelProto, layers: list[Layer], ranges: Ranges, formats: Iterable[str] | None,
             dtype: torch.dtype) -> list[_LayerErrors]:
    inits = initializers(model)
    nodes = {n.name: n for n in model.graph.node}
    wanted = None if formats is None else [get_format(f).name for f in formats if f != HP]
    prepared = []
    for layer in layers:
        fmts = [f for f in layer.formats if wanted is None or f in wanted]
        if wanted is not None:
            fmts.sort(key=wanted.index)
        node = nodes.get(layer.name)
        if node is None:
            raise AmpqError(f"layer {layer.name!r} is not a node of the model")
        tensors = sorted({t for f in fmts for t in FORMATS[f].calibrated_tensors(layer)})
        layer_ranges = {t: ranges[t] for t in tensors}
        w_err, b_err = {}, {}
        if layer.weight is not None:
            w = onnx.numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
            for f in fmts:
                fmt = FORMATS[f]
                w_err[f] = torch.from_numpy(fmt.fake_weight(w, layer.channel_axis) - w).to(dtype)
                e = _bias_error(fmt, inits, node, w, layer, ranges)
                if e is not None:
                    b_err[f] = torch.from_numpy(e).to(dtype)
        prepared.append(_LayerErrors(layer, fmts, w_err, b_err, layer_ranges, OPS[layer.op_type].bias_scale(node)))
    return prepared


def _activation_error(fmt: Format, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Q(x) - x with the format's own numpy reference (bit-identical to the rewritten graph)."""
    x32 = x.detach().to(torch.float32).numpy()
    return torch.from_numpy(fmt.fake_activation(x32, lo, hi)).to(x.dtype) - x.detach()


def _per_sample(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Sum over everything but the sample: [batch]. Assumes a batch-major layout."""
    if x.dim() == 0 or x.shape[0] % batch:
        raise AmpqError(f"{what} has shape {list(x.shape)}: its axis 0 is not the batch axis ({batch} samples); "
                        f"per-sample sensitivities need batch-major tensors (try batch_size=1)")
    return x.reshape(batch, -1).sum(dim=1)


# ----------------------------------------------------------------------------- the pass

@dataclass
class _Accumulator:
    total: dict[str, dict[str, float]] = field(default_factory=dict)
    weight: dict[str, dict[str, float]] = field(default_factory=dict)
    activation: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, layer: str, fmt: str, t_w: torch.Tensor, t_a: torch.Tensor, scale: float) -> None:
        for store, value in ((self.total, t_w + t_a), (self.weight, t_w), (self.activation, t_a)):
            per = store.setdefault(layer, {})
            per[fmt] = per.get(fmt, 0.0) + scale * float((value.to(torch.float64) ** 2).sum())


def _weight_terms(ex: Executor, item: _LayerErrors, a: torch.Tensor, g_y: torch.Tensor,
                  batch: int) -> dict[str, torch.Tensor]:
    """Per-sample <G^W, E^W> (+ int8 bias term) for each format, [batch] each."""
    layer = item.layer
    if layer.op_type == "MatMul" and len(layer.weight_shape) == 2:
        k, n = layer.weight_shape
        a3, g3 = a.reshape(batch, -1, k), g_y.reshape(batch, -1, n)
        errors = torch.stack([item.weight_errors[f] for f in item.formats]).reshape(len(item.formats), -1)
        out = []
        chunk = max(1, _CHUNK_ELEMENTS // (k * n))
        for s in range(0, batch, chunk):
            grads = a3[s:s + chunk].transpose(1, 2) @ g3[s:s + chunk]  # per-sample dL/dW, [b, K, N]
            out.append(grads.reshape(grads.shape[0], -1) @ errors.T)  # [b, P] without a [b, P, K, N] temporary
        terms = torch.cat(out)
        return {f: terms[:, i] for i, f in enumerate(item.formats)}
    terms = {}
    for f in item.formats:
        dy = ex.apply(layer.name, a, item.weight_errors[f])  # the op is linear in W: op(A, E) = dY
        t = _per_sample(g_y * dy, batch, f"output of {layer.name!r}")
        if f in item.bias_errors:
            e_b = item.bias_errors[f]
            if layer.op_type == "Gemm":
                t = t + item.bias_scale * _per_sample(g_y * e_b, batch, f"output of {layer.name!r}")
            else:
                shape = (1, -1) + (1,) * (g_y.dim() - 2)
                t = t + _per_sample(g_y * e_b.reshape(shape), batch, f"output of {layer.name!r}")
        terms[f] = t
    return terms


def _activation_terms(item: _LayerErrors, acts: list[torch.Tensor], g_acts: list[list[torch.Tensor]],
                      y: torch.Tensor, g_ys: list[torch.Tensor], batch: int) -> dict[str, list[torch.Tensor]]:
    """Per-sample <G^A, E^A(x)> for each format and probe: {format: [probe] -> [batch]}."""
    layer = item.layer
    names = layer.activations
    terms: dict[str, list[torch.Tensor]] = {}
    for f in item.formats:
        fmt = FORMATS[f]
        per_probe = [torch.zeros(batch, dtype=torch.float64) for _ in g_ys]
        if fmt.quantizes_activation:
            for slot, (name, a) in enumerate(zip(names, acts)):
                err = _activation_error(fmt, a, *item.ranges.get(name, (0.0, 0.0)))
                for p, g in enumerate(g_acts):
                    per_probe[p] = per_probe[p] + _per_sample(g[slot] * err, batch, f"input {name!r}")
            if fmt.quantizes_output(layer.op_type):
                err = _activation_error(fmt, y, *item.ranges[layer.output])
                for p, g_y in enumerate(g_ys):
                    per_probe[p] = per_probe[p] + _per_sample(g_y * err, batch, f"output {layer.output!r}")
        terms[f] = per_probe
    return terms


class _Taps:
    """Zero leaves added to every layer's inputs and output: their gradients are G^A and G^Y."""

    def __init__(self, layers: list[Layer]):
        self.slots = {l.name: (2 if l.activation2 else 1) for l in layers}
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.input_deltas: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.output_deltas: dict[str, torch.Tensor] = {}

    def input_hooks(self) -> dict:
        def make(name: str):
            def hook(slot: int, t: torch.Tensor) -> torch.Tensor:
                if slot >= self.slots[name]:
                    return t
                delta = torch.zeros_like(t, requires_grad=True)
                self.inputs.setdefault(name, []).append(t.detach())
                self.input_deltas.setdefault(name, []).append(delta)
                return t + delta
            return hook
        return {name: make(name) for name in self.slots}

    def output_hooks(self) -> dict:
        def make(name: str):
            def hook(slot: int, t: torch.Tensor) -> torch.Tensor:
                if slot:
                    return t
                delta = torch.zeros_like(t, requires_grad=True)
                self.outputs[name] = t.detach()
                self.output_deltas[name] = delta
                return t + delta
            return hook
        return {name: make(name) for name in self.slots}

    def leaves(self) -> list[torch.Tensor]:
        out = []
        for name in self.slots:
            out += self.input_deltas[name] + [self.output_deltas[name]]
        return out


def sensitivity(model: onnx.ModelProto, layers: list[Layer], ranges: Ranges, samples: Samples, *,
                formats: Iterable[str] | None = None, loss: str | Loss = "projection", batch_size: int = 8,
                seed: int = 0, progress: bool = True, labels: np.ndarray | None = None, probes: int = 1,
                dtype: torch.dtype = torch.float32) -> Sensitivity:
    """``s[layer][format]`` for every layer and candidate format (``formats`` filters them).

    One forward and ``probes`` backward passes per batch on the torch executor; per-sample
    inner products are accumulated and nothing is kept across batches. ``loss`` is a name
    (:func:`ampq_pass.losses.make_loss`) or a :class:`Loss`; ``labels`` are for task losses.
    """
    from tqdm import tqdm

    loss_fn = make_loss(loss, labels=labels, probes=probes)
    n_probes = getattr(loss_fn, "probes", 1)
    ex = Executor(model, dtype=dtype)
    items = _prepare(model, layers, ranges, formats, dtype)
    acc = _Accumulator()
    generator = torch.Generator().manual_seed(seed)
    loss_sum = loss_sq = grad_sq = 0.0
    count = 0
    n_batches = sum(1 for _ in samples.numbered_batches(batch_size))
    for start, batch in tqdm(samples.numbered_batches(batch_size), total=n_batches, desc="sensitivity",
                             unit="batch", disable=not progress,
                             file=sys.stderr):
        n = len(next(iter(batch.values())))
        taps = _Taps(layers)
        with torch.enable_grad():
            outputs = ex.run(batch, input_hooks=taps.input_hooks(), output_hooks=taps.output_hooks())
            reference = {k: v.detach() for k, v in outputs.items()}
            leaves = taps.leaves()
            grads_per_probe = []
            for p in range(n_probes):
                per_sample = loss_fn.per_sample(outputs, reference, start, generator)
                if p == 0:
                    values = per_sample.detach().to(torch.float64)
                    loss_sum += float(values.sum())
                    loss_sq += float((values ** 2).sum())
                grads = torch.autograd.grad(per_sample.sum(), leaves, retain_graph=p + 1 < n_probes,
                                            allow_unused=True)
                grads_per_probe.append([torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)])
        del outputs, reference, leaves
        count += n
        for layer_item, acts, g_acts, y, g_ys in _split_grads(items, taps, grads_per_probe):
            name = layer_item.layer.name
            grad_sq += sum(float((g ** 2).sum()) for g in g_ys)
            a_terms = _activation_terms(layer_item, acts, g_acts, y, g_ys, n)
            w_terms = [_weight_terms(ex, layer_item, acts[0], g_y, n) if layer_item.layer.weight is not None
                       else None for g_y in g_ys]
            for f in layer_item.formats:
                for p in range(n_probes):
                    t_w = w_terms[p][f].to(torch.float64) if w_terms[p] is not None else torch.zeros(n, dtype=torch.float64)
                    acc.add(name, f, t_w, a_terms[f][p], 1.0 / n_probes)
        del grads_per_probe, taps
    if count and grad_sq == 0.0 and items:
        raise AmpqError(f"the gradient of loss {loss_fn.name!r} is zero at the high-precision point for every "
                        f"layer: every sensitivity would be 0; use a loss with a non-zero gradient "
                        f"('projection', 'pseudo_label' or a task loss with labels)")
    scale = 1.0 / max(count, 1)
    def mean(store):
        return {l.layer.name: {f: store.get(l.layer.name, {}).get(f, 0.0) * scale for f in l.formats} for l in items}
    return Sensitivity(mean(acc.total), mean(acc.weight), mean(acc.activation), loss_sum * scale,
                       loss_sq * scale, count, loss_fn.name, n_probes)


def _split_grads(items: list[_LayerErrors], taps: _Taps, grads_per_probe: list[list[torch.Tensor]]):
    """Yield (layer errors, inputs, [probe][slot] input grads, output, [probe] output grads) per layer."""
    offset = 0
    for item in items:
        name = item.layer.name
        k = len(taps.input_deltas[name])
        g_acts = [grads[offset:offset + k] for grads in grads_per_probe]
        g_ys = [grads[offset + k] for grads in grads_per_probe]
        offset += k + 1
        yield item, taps.inputs[name], g_acts, taps.outputs[name], g_ys


# ----------------------------------------------------------------------------- prediction vs measurement

def predicted_mse(sens: Sensitivity, plan_formats: Mapping[str, str]) -> float:
    """``M(plan) = Σ_l s[l][p_l]`` (``hp`` layers add 0)."""
    total = 0.0
    for layer, fmt in plan_formats.items():
        if fmt == HP:
            continue
        if layer not in sens.values:
            raise AmpqError(f"plan names layer {layer!r}, which has no sensitivity")
        if fmt not in sens.values[layer]:
            raise AmpqError(f"layer {layer!r} has no sensitivity for format {fmt!r} "
                            f"(computed: {', '.join(sens.values[layer]) or 'none'})")
        total += sens.values[layer][fmt]
    return total
