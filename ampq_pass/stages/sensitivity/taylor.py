"""Sensitivity: the first-order Taylor estimate of the loss MSE of a plan (design.md §3).

For layer ``l`` and format ``p``::

    s[l][p] = E_x[(<G^W_l(x), E^W_{l,p}> + <G^A_l(x), E^A_{l,p}(x)>)^2]

The inner products are needed *per sample*, but nothing per sample is stored beyond
the current sub-batch. One forward + backward per sub-batch (and per random probe) gives,
for every layer, the gradient of its output ``G^Y`` and of its input *as that layer reads
it* ``G^A`` (each layer input and output is replaced in the executor by a view with a
gradient hook, so a tensor shared by q/k/v gets one gradient per consumer). Then, inside
the backward pass, as each layer's gradients arrive:

- activation term: ``<G^A(x), E^A(x)>`` summed over each sample's elements;
- weight term: every quantizable op is linear in its weight, so
  ``<G^W(x), E^W> = <G^Y(x), op(A(x), E^W)>`` (the op applied to the weight error, no bias),
  and for a MatMul with a 2-D weight ``<A(x)^T G^Y(x), E^W>`` through one per-sample
  outer product shared by all formats.

Errors use :mod:`ampq_pass.formats` and the calibrated :class:`Ranges`: the same scales
as the rewrite, including what the rewrite adds for int8 Conv (quantized output, int32 bias).

Memory is bounded (``memory_budget``, default 1 GiB for the working set): batches are run
in sub-batches sized from the forward activations of one sample, a layer's saved tensors
are freed as soon as its terms are accumulated, and weight errors are kept only while they
fit the budget (``benchmarks/results/memory.md``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.memory import release_freed_memory
from ampq_pass.core.formats import CUT_STATES, FORMATS, HP, Format, get_format
from ampq_pass.core.graph import initializers
from ampq_pass.core.ops import OPS
from ampq_pass.core.samples import Samples
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.sensitivity.executor import Executor
from ampq_pass.stages.sensitivity.losses import ConstantOutputs, Loss, loss_tensors, make_loss

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
    #: tensor -> what quantizing it once for every reader (an 8-bit cut state) adds beyond the
    #: terms of the layers that read it (:class:`CutLoss`, :func:`cut_mse`)
    cuts: dict[str, "CutLoss"] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"layers": self.values, "weight": self.weight, "activation": self.activation,
                "loss": self.loss, "samples": self.samples, "probes": self.probes,
                "loss_mean": self.loss_mean, "loss_sq_mean": self.loss_sq_mean,
                "cuts": {t: c.to_json() for t, c in self.cuts.items()}, **self.extra}

    @classmethod
    def from_json(cls, data: dict) -> "Sensitivity":
        known = {"layers", "weight", "activation", "loss", "samples", "probes", "loss_mean", "loss_sq_mean", "cuts"}
        return cls(values=data["layers"], weight=data["weight"], activation=data["activation"],
                   loss_mean=float(data["loss_mean"]), loss_sq_mean=float(data["loss_sq_mean"]),
                   samples=int(data["samples"]), loss=data["loss"], probes=int(data.get("probes", 1)),
                   extra={k: v for k, v in data.items() if k not in known},
                   cuts={t: CutLoss.from_json(c) for t, c in data.get("cuts", {}).items()})

    def formats(self) -> list[str]:
        seen: dict[str, None] = {}
        for per in self.values.values():
            seen.update(dict.fromkeys(per))
        return list(seen)


# ----------------------------------------------------------------------------- per-layer errors

@dataclass
class _LayerErrors:
    """What one layer needs for every candidate format: its formats and calibrated ranges."""

    layer: Layer
    formats: list[str]
    ranges: dict[str, tuple[float, float]]  # tensor -> calibrated range
    bias_scale: float = 1.0  # the op's factor on its bias (Gemm's beta)


@dataclass
class CutLoss:
    """The loss a cut state adds to a plan: ``loss[state]`` for quantizing ``tensor`` once for
    every reader (the rewrite's one Q->DQ on a cut, :func:`ampq_pass.stages.rewrite.rewrite`).

    Each layer's activation term counts only the error that layer reads; a cut's Q->DQ also
    feeds the readers that are not layers: the residual Add and the norm after a transformer
    block's LayerNorm output, the skip path of a CNN block. With ``G_t`` the gradient of the
    tensor (all readers) and ``G_r`` that of each layer ``r`` reading it::

        loss[p] = E_x[(<G_t(x) - sum_r G_r(x), E_p(x)>)^2]

    the first-order loss of the error those other readers see (per sample, as the layer terms).
    On DistilBERT with every LayerNorm output an 8-bit cut (OpenVINO) the layer terms alone
    predicted 52 and the plan measured 175. ``producer`` is the layer making the tensor, if
    one does; in the states of ``covered`` its own output quantization is the cut's Q->DQ and
    its term, taken with ``G_t``, already counts every reader, so the cut adds nothing.
    """

    loss: dict[str, float]
    producer: str | None = None
    covered: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"loss": self.loss, "producer": self.producer, "covered": list(self.covered)}

    @classmethod
    def from_json(cls, data: dict) -> "CutLoss":
        return cls({k: float(v) for k, v in data["loss"].items()}, data.get("producer"), tuple(data.get("covered", ())))


@dataclass
class _CutTensor:
    """A tensor some layer reads that an 8-bit cut state could quantize for every reader."""

    tensor: str
    producer: str  # the node that makes it
    slot: int  # which output of the producer
    range: tuple[float, float]
    states: list[str]
    layer: str | None = None  # the producer, when it is a layer
    covered: tuple[str, ...] = ()


def _cut_tensors(model: onnx.ModelProto, items: list[_LayerErrors], ranges: Ranges) -> list[_CutTensor]:
    """Every calibrated layer input made by a node (a graph input is never a cut), with the
    8-bit cut states the layers offer (:data:`ampq_pass.core.formats.CUT_STATES`)."""
    states = [f for f in CUT_STATES if any(f in item.formats for item in items)]
    if not states:
        return []
    made = {out: (n.name, slot) for n in model.graph.node for slot, out in enumerate(n.output) if out}
    layers = {item.layer.name: item.layer for item in items}
    out: dict[str, _CutTensor] = {}
    for item in items:
        for t in item.layer.activations:
            if t in out or t not in made or t not in ranges:
                continue
            node, slot = made[t]
            maker = layers.get(node)
            covered = tuple(f for f in states if maker is not None and maker.output == t
                            and FORMATS[f].quantizes_output(maker.op_type))
            out[t] = _CutTensor(t, node, slot, tuple(ranges[t]), states, node if maker is not None else None, covered)
    return list(out.values())


def cut_mse(sens: Sensitivity, formats: Mapping[str, str], cuts: Mapping[str, str]) -> float:
    """What the 8-bit ``cuts`` (tensor -> state) add to the loss of a plan with layer ``formats``
    (:class:`CutLoss`; a cut whose producer quantizes its output in that state adds nothing)."""
    total = 0.0
    for t, state in cuts.items():
        c = sens.cuts.get(t)
        if state == HP or c is None or (c.producer is not None and formats.get(c.producer) == state
                                        and state in c.covered):
            continue
        total += c.loss.get(state, 0.0)
    return total


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
    """Formats and ranges per layer; weight errors come later, layer by layer (:class:`_WeightErrors`)."""
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
        prepared.append(_LayerErrors(layer, fmts, layer_ranges, OPS[layer.op_type].bias_scale(node)))
    return prepared


def _activation_error(fmt: Format, x: torch.Tensor, lo: float, hi: float, samples: int = 1,
                      run_batch: int | None = None) -> torch.Tensor:
    """Q(x) - x with the format's own numpy reference (bit-identical to the rewritten graph).

    A format with dynamic scales (``needs_range`` false: ``int8_dyn``) computes its scale over
    the tensor of one run, so the error depends on how many samples a run holds: with
    ``run_batch``, ``x`` (``samples`` samples along axis 0, batch-major) is quantized
    ``run_batch`` samples at a time, as the deployed model at that batch would; without it,
    as one run. (A decode step served at batch 1 quantizes one token's row: its range is that
    token's, not the widest of the 8 a calibration sub-batch holds.)"""
    x32 = x.detach().to(torch.float32).numpy()
    if (fmt.needs_range or run_batch is None or run_batch >= samples or x32.ndim == 0
            or x32.shape[0] % samples):
        q = fmt.fake_activation(x32, lo, hi)
    else:
        rows = x32.shape[0] // samples * run_batch
        q = np.concatenate([fmt.fake_activation(x32[i:i + rows], lo, hi) for i in range(0, x32.shape[0], rows)])
    return torch.from_numpy(q).to(x.dtype) - x.detach()


def _per_sample(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Sum over everything but the sample: [batch]. Assumes a batch-major layout."""
    if x.dim() == 0 or x.shape[0] % batch:
        raise AmpqError(f"{what} has shape {list(x.shape)}: its axis 0 is not the batch axis ({batch} samples); "
                        f"per-sample sensitivities need batch-major tensors (try batch_size=1)")
    return x.reshape(batch, -1).sum(dim=1)


# ----------------------------------------------------------------------------- the pass

def _weight_terms(ex: Executor, item: _LayerErrors, errors: tuple[dict, dict], a: torch.Tensor,
                  g_y: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Per-sample <G^W, E^W> (+ int8 bias term) for each format, [batch] each; ``errors`` is
    (format -> Q(W) - W, format -> Q(b) - b)."""
    layer = item.layer
    weight_errors, bias_errors = errors
    if layer.op_type == "MatMul" and len(layer.weight_shape) == 2:
        k, n = layer.weight_shape
        a3, g3 = a.reshape(batch, -1, k), g_y.reshape(batch, -1, n)
        errors = torch.stack([weight_errors[f] for f in item.formats]).reshape(len(item.formats), -1)
        out = []
        chunk = max(1, _CHUNK_ELEMENTS // (k * n))
        for s in range(0, batch, chunk):
            grads = a3[s:s + chunk].transpose(1, 2) @ g3[s:s + chunk]  # per-sample dL/dW, [b, K, N]
            out.append(grads.reshape(grads.shape[0], -1) @ errors.T)  # [b, P] without a [b, P, K, N] temporary
        terms = torch.cat(out)
        return {f: terms[:, i] for i, f in enumerate(item.formats)}
    terms = {}
    for f in item.formats:
        dy = ex.apply(layer.name, a, weight_errors[f])  # the op is linear in W: op(A, E) = dY
        t = _per_sample(g_y * dy, batch, f"output of {layer.name!r}")
        if f in bias_errors:
            e_b = bias_errors[f]
            if layer.op_type == "Gemm":
                t = t + item.bias_scale * _per_sample(g_y * e_b, batch, f"output of {layer.name!r}")
            else:
                shape = (1, -1) + (1,) * (g_y.dim() - 2)
                t = t + _per_sample(g_y * e_b.reshape(shape), batch, f"output of {layer.name!r}")
        terms[f] = t
    return terms


#: Default bound on the working set of one forward + backward (activations kept for the
#: backward pass, gradients in flight, one layer's error tensors), in bytes.
DEFAULT_MEMORY_BUDGET = 1 << 30
#: Bytes of working set per byte of forward activations (saved tensors + gradients + one layer's terms).
_WORKING_SET_FACTOR = 3


class _Stream:
    """One sub-batch's forward + backward, with each layer's terms computed inside the backward.

    Instead of a zero leaf per layer input/output (a copy of every activation) and all
    gradients returned at once, every layer input and output is replaced by a view that
    carries a gradient hook (a tensor that needs no gradient yet becomes a fresh leaf: no
    copy). When ``G^Y`` of a layer arrives, its weight terms (and int8 output term) are
    computed; when ``G^A`` arrives, its activation terms; then the layer's saved inputs are
    dropped. What stays per layer is a few ``[batch]`` vectors. The working set is what
    autograd itself keeps for the backward pass plus one layer's error tensors.
    """

    def __init__(self, ex: Executor, items: list[_LayerErrors], weights: "_WeightErrors", n: int, n_probes: int,
                 cuts: list[_CutTensor] | None = None, run_batch: int | None = None):
        self.ex, self.weights, self.n, self.n_probes, self.run_batch = ex, weights, n, n_probes, run_batch
        self.items = {item.layer.name: item for item in items}
        # cut tensors: their value until their (all readers') gradient arrives, and per
        # (tensor, state) the terms <G_t, E> and the sum of the layer readers' <G_r, E>
        self.cuts = {c.tensor: c for c in cuts or ()}
        self.cut_values: dict[str, torch.Tensor] = {}
        self.t_cut: dict[tuple[str, str], list[torch.Tensor | None]] = {}
        self.t_cut_read: dict[tuple[str, str], list[torch.Tensor | None]] = {}
        self.acts: dict[str, dict[int, torch.Tensor]] = {}
        self.outs: dict[str, torch.Tensor] = {}
        self.leaves: list[torch.Tensor] = []
        self.probe = 0
        self.grad_sq = 0.0
        # (layer, format) -> per probe: [n] float64 weight term / activation term
        self.t_w: dict[tuple[str, str], list[torch.Tensor | None]] = {}
        self.t_a: dict[tuple[str, str], list[torch.Tensor | None]] = {}

    def _tap(self, t: torch.Tensor, on_grad) -> torch.Tensor:
        if t.requires_grad:
            v = t.view_as(t)  # a view: no copy; its gradient is this consumer's only
        else:
            v = t.detach().requires_grad_(True)  # nothing upstream needs a gradient: a leaf, no copy
            self.leaves.append(v)
        v.register_hook(on_grad)
        return v

    def input_hooks(self) -> dict:
        def make(name: str, slots: int):
            def hook(slot: int, t: torch.Tensor) -> torch.Tensor:
                if slot >= slots or not t.is_floating_point():
                    return t
                self.acts.setdefault(name, {})[slot] = t.detach()
                return self._tap(t, lambda g: self._on_input_grad(name, slot, g))
            return hook
        return {name: make(name, 2 if item.layer.activation2 else 1) for name, item in self.items.items()}

    def output_hooks(self) -> dict:
        def make(name: str, keep_output: bool):
            def hook(slot: int, y: torch.Tensor) -> torch.Tensor:
                if slot or not y.is_floating_point():
                    return y
                if keep_output:
                    self.outs[name] = y.detach()
                return self._tap(y, lambda g: self._on_output_grad(name, g))
            return hook

        def cut_hook(cuts: dict[int, _CutTensor], inner):
            def hook(slot: int, y: torch.Tensor) -> torch.Tensor:
                c = cuts.get(slot)
                if c is not None and y.is_floating_point():
                    self.cut_values[c.tensor] = y.detach()
                    y = self._tap(y, lambda g: self._on_cut_grad(c, g))  # the gradient of every reader
                return inner(slot, y) if inner is not None else y
            return hook

        hooks = {name: make(name, any(FORMATS[f].quantizes_activation and FORMATS[f].quantizes_output(item.layer.op_type)
                                      for f in item.formats))
                 for name, item in self.items.items()}
        by_producer: dict[str, dict[int, _CutTensor]] = {}
        for c in self.cuts.values():
            by_producer.setdefault(c.producer, {})[c.slot] = c
        for node, cuts in by_producer.items():
            hooks[node] = cut_hook(cuts, hooks.get(node))
        return hooks

    def _add(self, store: dict, key: tuple[str, str], value: torch.Tensor) -> None:
        per = store.setdefault(key, [None] * self.n_probes)
        value = value.detach().to(torch.float64)
        per[self.probe] = value if per[self.probe] is None else per[self.probe] + value

    def _on_output_grad(self, name: str, g_y: torch.Tensor) -> None:
        item, n = self.items[name], self.n
        self.grad_sq += float(torch.linalg.vector_norm(g_y.detach(), dtype=torch.float64)) ** 2
        g_y = g_y.detach()
        if item.layer.weight is not None and 0 in self.acts.get(name, {}):
            for f, t in _weight_terms(self.ex, item, self.weights.get(item), self.acts[name][0], g_y, n).items():
                self._add(self.t_w, (name, f), t)
        y = self.outs.get(name)
        if y is not None:
            for f in item.formats:
                fmt = FORMATS[f]
                if fmt.quantizes_activation and fmt.quantizes_output(item.layer.op_type):
                    err = _activation_error(fmt, y, *item.ranges[item.layer.output], n, self.run_batch)
                    self._add(self.t_a, (name, f), _per_sample(g_y * err, n, f"output {item.layer.output!r}"))
                    del err
            if self.probe + 1 == self.n_probes:
                del self.outs[name]

    def _on_input_grad(self, name: str, slot: int, g: torch.Tensor) -> None:
        item, n = self.items[name], self.n
        a = self.acts.get(name, {}).get(slot)
        if a is None:
            return
        tensor = item.layer.activations[slot]
        g = g.detach()
        cut = self.cuts.get(tensor)
        states = cut.states if cut is not None else ()
        for f in dict.fromkeys([*item.formats, *states]):
            fmt = FORMATS[f]
            if not fmt.quantizes_activation:
                continue
            term = None
            if f in item.formats:
                err = _activation_error(fmt, a, *item.ranges.get(tensor, (0.0, 0.0)), n, self.run_batch)
                term = _per_sample(g * err, n, f"input {tensor!r}")
                self._add(self.t_a, (name, f), term)
            if f in states:  # this layer's share of the error a cut's Q->DQ on its input makes
                if term is None or item.ranges.get(tensor) != cut.range:
                    err = _activation_error(fmt, a, *cut.range)
                    term = _per_sample(g * err, n, f"input {tensor!r}")
                self._add(self.t_cut_read, (tensor, f), term)
            err = None
        if self.probe + 1 == self.n_probes:  # the last use of this input
            del self.acts[name][slot]

    def _on_cut_grad(self, cut: _CutTensor, g: torch.Tensor) -> None:
        y = self.cut_values.get(cut.tensor)
        if y is None:
            return
        g = g.detach()
        for f in cut.states:
            err = _activation_error(FORMATS[f], y, *cut.range)
            self._add(self.t_cut, (cut.tensor, f), _per_sample(g * err, self.n, f"cut {cut.tensor!r}"))
            del err
        if self.probe + 1 == self.n_probes:
            del self.cut_values[cut.tensor]

    def accumulate(self, sums: "SensitivitySums") -> None:
        zero = torch.zeros(self.n, dtype=torch.float64)
        for key, per in self.t_cut.items():
            read = self.t_cut_read.get(key, [None] * self.n_probes)
            for p in range(self.n_probes):
                other = (per[p] if per[p] is not None else zero) - (read[p] if read[p] is not None else zero)
                sums.add_cut(*key, other, 1.0 / self.n_probes)
        for name, item in self.items.items():
            for f in item.formats:
                ws, as_ = self.t_w.get((name, f)), self.t_a.get((name, f))
                for p in range(self.n_probes):
                    t_w = ws[p] if ws is not None and ws[p] is not None else zero
                    t_a = as_[p] if as_ is not None and as_[p] is not None else zero
                    sums.add_terms(name, f, t_w, t_a, 1.0 / self.n_probes)


class _WeightErrors:
    """``Q_p(W) - W`` per layer and format: kept while they fit ``budget`` bytes, else
    recomputed when the layer's gradient arrives (a model's weights times its formats
    can be several times the model)."""

    def __init__(self, model: onnx.ModelProto, ranges: Ranges, dtype: torch.dtype, budget: int):
        self.inits = initializers(model)
        self.nodes = {n.name: n for n in model.graph.node}
        self.ranges, self.dtype, self.budget = ranges, dtype, budget
        self.kept: dict[str, tuple[dict, dict]] = {}
        self.kept_bytes = 0
        self.recomputed = 0

    def _compute(self, item: _LayerErrors) -> tuple[dict, dict]:
        layer = item.layer
        w = onnx.numpy_helper.to_array(self.inits[layer.weight]).astype(np.float32, copy=False)
        w_err, b_err = {}, {}
        for f in item.formats:
            fmt = FORMATS[f]
            clip = self.ranges.clip(layer.weight, f)
            err = torch.from_numpy(fmt.fake_weight(w, layer.channel_axis, clip) - w).to(self.dtype)
            # int8 and int8_dyn quantize weights alike: one tensor for both halves what is kept
            w_err[f] = next((e for e in w_err.values() if torch.equal(e, err)), err)
            e = _bias_error(fmt, self.inits, self.nodes[layer.name], w, layer, self.ranges)
            if e is not None:
                b_err[f] = torch.from_numpy(e).to(self.dtype)
        return w_err, b_err

    def get(self, item: _LayerErrors) -> tuple[dict, dict]:
        name = item.layer.name
        if name in self.kept:
            return self.kept[name]
        errors = self._compute(item)
        size = sum(t.numel() * t.element_size() for t in {id(t): t for d in errors for t in d.values()}.values())
        if self.kept_bytes + size <= self.budget:
            self.kept[name] = errors
            self.kept_bytes += size
        else:
            self.recomputed += 1
        return errors


def _forward_bytes_per_sample(ex: Executor, one: dict[str, np.ndarray]) -> int:
    """Bytes of every float tensor one forward pass of one sample writes (no gradient)."""
    total = 0

    def count(slot: int, t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            total += t.numel() * t.element_size()
        return t

    with torch.no_grad():
        ex.run(one, output_hooks={name: count for name in ex.node_names})
    return total


def _shape_key(batch: dict[str, np.ndarray]) -> str:
    """The per-sample shapes of a batch: batches with the same key run in the same sub-batches."""
    return ",".join(f"{k}:{'x'.join(map(str, v.shape[1:]))}" for k, v in sorted(batch.items()))


def sub_batch_cap(ex: Executor, batch: dict[str, np.ndarray], memory_budget: int) -> int:
    """Samples per forward + backward so that the working set stays within ``memory_budget``:
    ``_WORKING_SET_FACTOR`` x the forward activations of one sample, at least one sample.

    It depends on the per-sample shapes only, so every worker of a pool that sees a batch of
    the same shapes splits it the same way (the result of ``int8_dyn``, whose scale is taken
    over the sub-batch, depends on the split)."""
    per_sample = _forward_bytes_per_sample(ex, {k: v[:1] for k, v in batch.items()})
    return int(max(1, memory_budget // max(1, _WORKING_SET_FACTOR * per_sample)))


@dataclass
class SensitivitySums:
    """The sums over samples that a :class:`Sensitivity` is made of.

    Every entry is a sum over samples (or, for ``constant``, a property of the set of samples
    seen), so sums over disjoint parts of the calibration set add up to the sums over all of
    it: :meth:`add` is how a pool's workers' parts are combined (issue 16)."""

    total: dict[str, dict[str, float]] = field(default_factory=dict)
    weight: dict[str, dict[str, float]] = field(default_factory=dict)
    activation: dict[str, dict[str, float]] = field(default_factory=dict)
    cuts: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> state -> sum (CutLoss)
    loss_sum: float = 0.0
    loss_sq: float = 0.0
    grad_sq: float = 0.0
    count: int = 0
    sub_batch: dict[str, int] = field(default_factory=dict)  # per-sample shapes -> sub-batch cap
    constant: ConstantOutputs = field(default_factory=ConstantOutputs)

    def add_cut(self, tensor: str, fmt: str, term: torch.Tensor, scale: float) -> None:
        per = self.cuts.setdefault(tensor, {})
        per[fmt] = per.get(fmt, 0.0) + scale * float((term.to(torch.float64) ** 2).sum())

    def add_terms(self, layer: str, fmt: str, t_w: torch.Tensor, t_a: torch.Tensor, scale: float) -> None:
        for store, value in ((self.total, t_w + t_a), (self.weight, t_w), (self.activation, t_a)):
            per = store.setdefault(layer, {})
            per[fmt] = per.get(fmt, 0.0) + scale * float((value.to(torch.float64) ** 2).sum())

    def add(self, other: "SensitivitySums") -> None:
        """Add the sums of other samples (in a fixed order: the float sums are then reproducible)."""
        for mine, theirs in ((self.total, other.total), (self.weight, other.weight),
                             (self.activation, other.activation), (self.cuts, other.cuts)):
            for layer, per in theirs.items():
                into = mine.setdefault(layer, {})
                for fmt, v in per.items():
                    into[fmt] = into.get(fmt, 0.0) + v
        self.loss_sum += other.loss_sum
        self.loss_sq += other.loss_sq
        self.grad_sq += other.grad_sq
        self.count += other.count
        for key, cap in other.sub_batch.items():
            self.sub_batch[key] = min(cap, self.sub_batch.get(key, cap))
        self.constant.add(other.constant)


def sensitivity_sums(model: onnx.ModelProto, layers: list[Layer], ranges: Ranges,
                     batches: Iterable[tuple[int, dict[str, np.ndarray]]], *, whole_feeds: bool = False,
                     formats: Iterable[str] | None = None, loss: str | Loss = "projection", seed: int = 0,
                     labels: np.ndarray | None = None, probes: int = 1, dtype: torch.dtype = torch.float32,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET, run_batch: int | None = None,
                     on_batch=None) -> SensitivitySums:
    """The :class:`SensitivitySums` of ``batches`` (``(index of the first sample, batch)``, as
    :meth:`Samples.numbered_batches` gives them; with ``whole_feeds`` each batch is one whole
    feed). ``on_batch()`` is called after each batch (progress). See :func:`sensitivity`."""
    loss_fn = make_loss(loss, labels=labels, probes=probes)
    n_probes = getattr(loss_fn, "probes", 1)
    ex = Executor(model, dtype=dtype)
    items = _prepare(model, layers, ranges, formats, dtype)
    cuts = _cut_tensors(model, items, ranges)
    # At most one model's worth of weight errors is kept (the rest recomputed per batch, a few
    # ms a layer): with the model proto and the executor's weights that is the 3x the model
    # file issue 12 allows; DistilBERT's three formats had kept 1 GB, its peak 4.4 GB.
    weight_bytes = sum(int(np.prod(l.weight_shape)) * 4 for l in layers if l.weight_shape)
    weights = _WeightErrors(model, ranges, dtype, min(memory_budget, weight_bytes))
    view = loss_tensors(model, loss_fn)  # graph output -> the tensor the loss reads (logits of a final Softmax)
    read = list(dict.fromkeys(view.get(o, o) for o in ex.output_names))
    sums = SensitivitySums()
    for start, batch in batches:
        # A whole feed (--calib-feeds) has no sample axis: it is one sample, never split.
        n = 1 if whole_feeds else len(next(iter(batch.values())))
        shape_key = _shape_key(batch)
        if whole_feeds:
            sums.sub_batch[shape_key] = 1
        elif shape_key not in sums.sub_batch:
            sums.sub_batch[shape_key] = sub_batch_cap(ex, batch, memory_budget)
        sub = sums.sub_batch[shape_key]
        for offset in range(0, n, sub):
            part = batch if whole_feeds else {k: v[offset:offset + sub] for k, v in batch.items()}
            m = 1 if whole_feeds else len(next(iter(part.values())))
            stream = _Stream(ex, items, weights, m, n_probes, cuts, None if whole_feeds else run_batch)
            with torch.enable_grad():
                result = ex.run(part, outputs=read, input_hooks=stream.input_hooks(),
                                output_hooks=stream.output_hooks())
                outputs = {o: result[view.get(o, o)] for o in ex.output_names}
                del result
                if whole_feeds:  # the loss reads axis 0 as the samples
                    outputs = {k: v.unsqueeze(0) for k, v in outputs.items()}
                reference = {k: v.detach() for k, v in outputs.items()}
                sums.constant.update(reference, loss_fn.read(reference))
                for p in range(n_probes):
                    stream.probe = p
                    per_sample = loss_fn.per_sample(outputs, reference, start + offset, _probe_generator(seed, p))
                    if p == 0:
                        values = per_sample.detach().to(torch.float64)
                        sums.loss_sum += float(values.sum())
                        sums.loss_sq += float((values ** 2).sum())
                    if per_sample.requires_grad:
                        torch.autograd.grad(per_sample.sum(), stream.leaves, retain_graph=p + 1 < n_probes,
                                            allow_unused=True)
                    del per_sample
            del outputs, reference
            stream.accumulate(sums)
            sums.grad_sq += stream.grad_sq
            sums.count += m
            del stream
            # Each sub-batch's activations and gradients, freed, stay resident in glibc's heap
            # until trimmed: DistilBERT (2 samples a sub-batch) grew 250 MB a sub-batch to 4.2 GB;
            # trimmed here it stays at 1.8 GB.
            release_freed_memory(collect=False)
        if on_batch is not None:
            on_batch()
    # The executor's weights, the kept weight errors and every batch's freed activations:
    # given back now, or they stay resident through the stages after this one.
    del ex, weights, items
    release_freed_memory()
    return sums


def _sums_on_worker(_backend, model: onnx.ModelProto, layers, ranges, batches, kwargs) -> SensitivitySums:
    """A pool job (:meth:`RayPool.map` passes the worker's backend first; sensitivity runs on
    the worker's CPU and does not use it)."""
    return sensitivity_sums(model, layers, ranges, batches, **kwargs)


def _split(batches: list, parts: int) -> list[list]:
    """``batches`` in ``parts`` contiguous runs of near-equal length (the first ones longer)."""
    size, extra = divmod(len(batches), parts)
    out, at = [], 0
    for i in range(parts):
        n = size + (i < extra)
        if n:
            out.append(batches[at:at + n])
        at += n
    return out


def sensitivity(model: onnx.ModelProto, layers: list[Layer], ranges: Ranges, samples: Samples, *,
                formats: Iterable[str] | None = None, loss: str | Loss = "projection", batch_size: int = 8,
                seed: int = 0, progress: bool = True, labels: np.ndarray | None = None, probes: int = 1,
                dtype: torch.dtype = torch.float32, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                run_batch: int | None = None, pool=None) -> Sensitivity:
    """``s[layer][format]`` for every layer and candidate format (``formats`` filters them).

    One forward and ``probes`` backward passes per batch on the torch executor; per-sample
    inner products are accumulated and nothing is kept across batches. ``loss`` is a name
    (:func:`ampq_pass.losses.make_loss`) or a :class:`Loss`; ``labels`` are for task losses.

    Memory: a batch is run in sub-batches sized so that one forward + backward stays within
    ``memory_budget`` bytes (one sample at a time for large inputs), each layer's tensors are
    freed as soon as its terms are accumulated, and weight errors are kept only while they
    fit the same budget. The result does not depend on the sub-batch size (up to float
    summation order), except for formats with dynamic scales (``int8_dyn``), whose scale is
    taken over the tensor of one run: ``run_batch`` samples (the batch the model is deployed
    and timed at; the pass gives its timing batch), or without it the sub-batch that is run
    (which is at most ``run_batch`` samples either way).
    The projection loss draws ``r`` per sample index, so batching does not change it either.

    ``pool`` (a :class:`ampq_pass.backends.ray_pool.RayPool`): the batches are split into one
    contiguous run per worker, each worker returns its :class:`SensitivitySums`, and the sums
    are added in the batches' order: the same result as without a pool up to float summation
    order. Each worker holds the model and its own ``memory_budget`` working set.
    """
    from tqdm import tqdm

    if run_batch is not None and (isinstance(run_batch, bool) or not isinstance(run_batch, int) or run_batch < 1):
        raise AmpqError(f"run_batch must be a positive integer or None, got {run_batch!r}")
    loss_fn = make_loss(loss, labels=labels, probes=probes)
    n_probes = getattr(loss_fn, "probes", 1)
    items = _prepare(model, layers, ranges, formats, dtype)  # checks the layers before any work
    batches = list(samples.numbered_batches(batch_size))  # slices: views of the calibration arrays
    kwargs = dict(whole_feeds=samples.whole_feeds, formats=formats, loss=loss, seed=seed, labels=labels,
                  probes=probes, dtype=dtype, memory_budget=memory_budget, run_batch=run_batch)
    with tqdm(total=len(batches), desc="sensitivity", unit="batch", disable=not progress, file=sys.stderr) as bar:
        if pool is None:
            sums = sensitivity_sums(model, layers, ranges, batches, on_batch=bar.update, **kwargs)
        else:
            parts = _split(batches, len(pool))
            done: dict[int, SensitivitySums] = {}
            jobs = ((i, (model, layers, ranges, part, kwargs)) for i, part in enumerate(parts))
            for i, part_sums in pool.map(_sums_on_worker, jobs):
                done[i] = part_sums
                bar.update(len(parts[i]))
            sums = SensitivitySums()
            for i in sorted(done):
                sums.add(done[i])
    if sums.count and sums.grad_sq == 0.0 and items:
        flat = sums.constant.constant()
        why = (f" (output{'s' if len(flat) > 1 else ''} {', '.join(map(repr, flat))} never varied over the "
               f"{sums.constant.samples} samples: saturated?)" if flat else "")
        raise AmpqError(f"the gradient of loss {loss_fn.name!r} is zero at the high-precision point for every "
                        f"layer{why}: every sensitivity would be 0; use a loss with a non-zero gradient "
                        f"('projection', 'pseudo_label' or a task loss with labels, ':OUTPUT' for an output that varies)")
    scale = 1.0 / max(sums.count, 1)

    def mean(store):
        return {l.layer.name: {f: store.get(l.layer.name, {}).get(f, 0.0) * scale for f in l.formats} for l in items}

    extra = {"sub_batch": _sub_batches(sums.sub_batch, batches, samples.whole_feeds), "memory_budget": int(memory_budget)}
    view = loss_tensors(model, loss_fn)
    if view:
        extra["loss_tensors"] = dict(view)
    if run_batch is not None and not samples.whole_feeds:
        extra["run_batch"] = run_batch  # the samples one dynamic scale spanned
    if sums.constant.to_json() is not None:
        extra["constant_outputs"] = sums.constant.to_json()
    cut_losses = {c.tensor: CutLoss({f: v * scale for f, v in sums.cuts.get(c.tensor, {}).items()}, c.layer, c.covered)
                  for c in _cut_tensors(model, items, ranges) if c.tensor in sums.cuts}
    return Sensitivity(mean(sums.total), mean(sums.weight), mean(sums.activation), sums.loss_sum * scale,
                       sums.loss_sq * scale, sums.count, loss_fn.name, n_probes, extra, cut_losses)


def _sub_batches(caps: dict[str, int], batches: list, whole: bool) -> dict[str, int]:
    """The sub-batch each shape group ran in (the cap, at most the group's largest batch), for the record."""
    largest: dict[str, int] = {}
    for _, batch in batches:
        key = _shape_key(batch)
        largest[key] = max(largest.get(key, 0), 1 if whole else len(next(iter(batch.values()))))
    return {k: min(cap, largest.get(k, cap)) for k, cap in caps.items()}


def constant_output_warning(sens: Sensitivity) -> str | None:
    """One line when outputs the loss reads were constant over the calibration samples
    (:class:`~ampq_pass.stages.sensitivity.losses.ConstantOutputs`), else None."""
    return ConstantOutputs.warning(sens.extra.get("constant_outputs"), sens.loss)


def _probe_generator(seed: int, probe: int) -> torch.Generator:
    """The generator of probe ``probe``; losses draw per sample index from it (batching-independent)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + probe) % (1 << 62))


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
