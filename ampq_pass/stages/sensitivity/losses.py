"""Losses for sensitivity (design.md §3): per-sample scalars whose gradient at the
high-precision point is not zero.

- :class:`TaskLoss`: labels given; cross-entropy over an output's last axis (classifiers,
  language models: labels [...] index the classes) or MSE to given targets.
- :class:`PseudoLabelLoss`: cross-entropy against the high-precision model's own argmax.
- :class:`ProjectionLoss` (default without labels): ``L(x) = <r, f(x)>`` with a fresh
  ``r ~ N(0, I)`` per sample (and probe), so ``E_r[ΔL^2] = ||J Δ||^2``, the first-order
  output MSE. ``r`` is drawn from the generator's seed and the sample's index, so the
  same sample gets the same ``r`` whatever the batching.

**Logits side.** A graph output written by a final Softmax, LogSoftmax or Sigmoid is read
*before* that node (:func:`logit_tensors`) by the projection, pseudo-label and
cross-entropy losses: where such an output saturates (probabilities at 0 or 1) its
gradient vanishes and the first-order estimate of the output change is far below what a
quantized model really changes (measured/predicted 0.001 on a saturated classifier), while
the logits stay in the regime where the first-order estimate holds. ``projection_raw``
keeps the outputs as written.

A loss that compares the model with its *own* output (KL or MSE to itself) is at its
minimum at the high-precision point: its gradient is zero and so would be every
sensitivity. :func:`make_loss` refuses it and says why.

Every loss works on dicts of output tensors (torch, so the same code gives the
gradient in the executor and the measured value on ONNX Runtime outputs). ``reference``
is the high-precision output of the same samples; ``start`` is the index of the first
sample of the batch in the calibration set (to pick labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ampq_pass.core.errors import AmpqError

#: losses refused because their gradient vanishes at the high-precision point
_SELF_REFERENCED = ("kl", "kl_div", "self_kl", "self_mse", "distillation")
#: final activations that a loss reads through (their input is used instead of the graph output)
TERMINAL_ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid")


def logit_tensors(model, kinds: tuple[str, ...] = TERMINAL_ACTIVATIONS) -> dict[str, str]:
    """``{graph output: input of the node}`` for outputs written directly by a Softmax,
    LogSoftmax or Sigmoid (``kinds``) of the default domain: the logits of that output."""
    producers = {out: node for node in model.graph.node for out in node.output if out}
    inputs = {i.name for i in model.graph.input}
    found = {}
    for output in model.graph.output:
        node = producers.get(output.name)
        if node is not None and "Softmax" in kinds:
            logits = _decomposed_softmax(node, producers)
            if logits is not None and logits not in inputs:
                found[output.name] = logits
                continue
        if node is None or node.op_type not in kinds or node.domain not in ("", "ai.onnx"):
            continue
        if not node.input or not node.input[0] or node.input[0] in inputs:
            continue
        if node.op_type != "Sigmoid":
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            if axis != -1 and "Sigmoid" not in kinds:  # class axis not last: cross-entropy would misread it
                continue
        found[output.name] = node.input[0]
    return found


def _decomposed_softmax(node, producers) -> str | None:
    """``z`` of a softmax written out as ``Div(Exp(Sub(z, m)), f(Exp(...)))`` (tf2onnx / jax2tf
    exports), where the divisor is computed from the same Exp; else None."""
    if node.op_type != "Div" or len(node.input) != 2:
        return None
    exp = producers.get(node.input[0])
    if exp is None or exp.op_type != "Exp":
        return None
    sub = producers.get(exp.input[0])
    if sub is None or sub.op_type != "Sub":
        return None
    frontier, seen = [node.input[1]], set()
    for _ in range(8):  # the divisor: ReduceSum(Exp) through a few reshapes/broadcasts
        nxt = []
        for t in frontier:
            if t == exp.output[0]:
                return sub.input[0]
            p = producers.get(t)
            if p is not None and p.name not in seen:
                seen.add(p.name)
                nxt += [i for i in p.input if i]
        frontier = nxt
    return None


def loss_tensors(model, loss: "Loss") -> dict[str, str]:
    """``{graph output: tensor}`` that ``loss`` reads instead of the output (empty: outputs as written)."""
    kinds = getattr(loss, "reads_logits", ())
    if not kinds:
        return {}
    found = logit_tensors(model, kinds)
    output = getattr(loss, "output", None)
    return {k: v for k, v in found.items() if output is None or k == output}


def with_logits(outputs: dict, view: dict[str, str]) -> dict:
    """``outputs`` (which hold the ``view`` tensors too) with each viewed output replaced by its tensor."""
    return {k: outputs[view[k]] if k in view and view[k] in outputs else v
            for k, v in outputs.items() if k not in set(view.values()) - set(view)}


def _float_outputs(outputs: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in outputs.items() if v.is_floating_point()]


def _pick_output(outputs: dict[str, torch.Tensor], name: str | None, loss: str) -> torch.Tensor:
    if name is not None:
        if name not in outputs:
            raise AmpqError(f"loss {loss!r}: the model has no output {name!r} (outputs: {sorted(outputs)})")
        return outputs[name]
    floats = _float_outputs(outputs)
    if len(floats) != 1:
        raise AmpqError(f"loss {loss!r}: the model has {len(floats)} float outputs {floats}; "
                        f"name one, e.g. '{loss}:{floats[0] if floats else 'logits'}'")
    return outputs[floats[0]]


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-sample mean cross-entropy over all positions (classes on the last axis)."""
    n = logits.shape[0]
    flat = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1).to(torch.int64)
    if flat.shape[0] != labels.shape[0]:
        raise AmpqError(f"cross-entropy: {labels.shape[0]} labels for logits of shape {list(logits.shape)} "
                        f"(expected one label per position, {flat.shape[0]})")
    token = torch.nn.functional.cross_entropy(flat, labels, ignore_index=ignore_index, reduction="none")
    token = token.reshape(n, -1)
    counted = (labels.reshape(n, -1) != ignore_index).sum(dim=1).clamp(min=1)
    return token.sum(dim=1) / counted


class Loss:
    """A per-sample loss. Subclasses implement :meth:`per_sample`."""

    name: str = ""
    #: random probes per sample; >1 only for stochastic losses
    probes: int = 1
    #: final activations this loss reads through (see :func:`logit_tensors`); () = outputs as written
    reads_logits: tuple[str, ...] = ()

    def per_sample(self, outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], start: int,
                   generator: torch.Generator) -> torch.Tensor:
        """Loss of each sample of the batch, shape [batch]."""
        raise NotImplementedError

    def read(self, outputs: dict[str, torch.Tensor]) -> list[str]:
        """The outputs of ``outputs`` this loss is computed from (the one it picks)."""
        name = getattr(self, "output", None)
        if name is not None:
            return [name] if name in outputs else []
        floats = _float_outputs(outputs)
        return floats if len(floats) == 1 else []

    def squared_change(self, outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], start: int,
                       generator: torch.Generator) -> torch.Tensor:
        """(L_q - L_hp)^2 per sample, for the measured loss MSE of a quantized model."""
        with torch.no_grad():
            g1 = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            g2 = torch.Generator().manual_seed(g1.initial_seed())  # both sides must see the same r
            return (self.per_sample(outputs, reference, start, g1) - self.per_sample(reference, reference, start, g2)) ** 2


@dataclass
class ProjectionLoss(Loss):
    """``L(x) = <r, f(x)>``, r ~ N(0, I) fresh per sample, over ``output`` or all float outputs."""

    output: str | None = None
    probes: int = 1
    logits: bool = True  # read outputs of a final Softmax/LogSoftmax/Sigmoid before it
    name: str = field(default="projection", init=False)

    def __post_init__(self):
        self.reads_logits = TERMINAL_ACTIVATIONS if self.logits else ()
        if not self.logits:
            self.name = "projection_raw"

    def _outputs(self, outputs: dict[str, torch.Tensor]) -> list[str]:
        if self.output is not None:
            _pick_output(outputs, self.output, self.name)
            return [self.output]
        return _float_outputs(outputs)

    def read(self, outputs):
        return self._outputs(outputs)

    def per_sample(self, outputs, reference, start, generator):
        names = self._outputs(outputs)
        n = outputs[names[0]].shape[0] if names else 0
        base = generator.initial_seed()
        # r of sample i depends only on (generator seed, start + i): the same whatever the batching
        per = [torch.Generator().manual_seed((base * 1_000_003 + start + i) % (1 << 62)) for i in range(n)]
        total = 0
        for name in names:
            f = outputs[name]
            r = torch.stack([torch.randn(f.shape[1:], generator=g, dtype=torch.float64) for g in per]).to(f.dtype)
            total = total + (r * f).reshape(f.shape[0], -1).sum(dim=1)
        return total

    def squared_change(self, outputs, reference, start, generator):
        # The exact expectation over r: E_r[<r, Δf>^2] = ||Δf||^2.
        total = 0
        for name in self._outputs(outputs):
            d = (outputs[name].to(torch.float64) - reference[name].to(torch.float64))
            total = total + (d * d).reshape(d.shape[0], -1).sum(dim=1)
        return total


@dataclass
class PseudoLabelLoss(Loss):
    """Cross-entropy against the high-precision argmax of ``output`` (classes on the last axis)."""

    output: str | None = None
    name: str = field(default="pseudo_label", init=False)
    reads_logits: tuple[str, ...] = field(default=("Softmax", "LogSoftmax"), init=False)

    def per_sample(self, outputs, reference, start, generator):
        logits = _pick_output(outputs, self.output, self.name)
        ref = _pick_output(reference, self.output, self.name)
        return _cross_entropy(logits, ref.detach().argmax(dim=-1), ignore_index=-100)


@dataclass
class TaskLoss(Loss):
    """A task loss against given ``labels`` (axis 0 = samples, aligned with the calibration set)."""

    kind: str  # "cross_entropy" or "mse"
    labels: np.ndarray
    output: str | None = None
    ignore_index: int = -100

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.kind

    @property
    def reads_logits(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("Softmax", "LogSoftmax") if self.kind == "cross_entropy" else ()

    def per_sample(self, outputs, reference, start, generator):
        pred = _pick_output(outputs, self.output, self.kind)
        n = pred.shape[0]
        if start + n > len(self.labels):
            raise AmpqError(f"loss {self.kind!r}: {len(self.labels)} labels for at least {start + n} samples")
        target = torch.from_numpy(np.asarray(self.labels[start:start + n]))
        if self.kind == "cross_entropy":
            return _cross_entropy(pred, target, self.ignore_index)
        diff = pred - target.to(pred.dtype).reshape(pred.shape)
        return (diff * diff).reshape(n, -1).mean(dim=1)


def _differs(first: torch.Tensor, values: torch.Tensor, shape) -> bool:
    """Whether ``values`` (one sample, or samples on axis 0, of per-sample ``shape``) differ
    from ``first``. A tolerance, not equality: the same sample run in sub-batches of another
    size differs in the last bits."""
    tol = 1e-6 * (1.0 + float(first.abs().max())) if first.numel() else 0.0
    return tuple(shape) != tuple(first.shape) or float((values - first).abs().max()) > tol


class ConstantOutputs:
    """Which outputs a loss reads are the same for every sample (zero variance: a saturated
    sigmoid, a mask), found while the samples stream by (the first sample of each output is
    kept, nothing else).

    The loss budget is relative to the loss the outputs make (``--max-loss-rmse`` scales
    with E[L^2]) and the sensitivities are its first-order change: an output that does not
    move with the input is at a flat point (no gradient, so no predicted change) and its
    fixed value sets part of E[L^2] that no sample's quantization error is compared with.
    The pass says so (:meth:`warning`) instead of quietly giving a budget that means nothing.
    """

    def __init__(self):
        self.first: dict[str, torch.Tensor] = {}
        self.varies: set[str] = set()
        self.sq: dict[str, float] = {}  # sum over samples of ||f||^2, the output's share of E[L^2]
        self.samples = 0

    def update(self, reference: dict[str, torch.Tensor], names: list[str]) -> None:
        """Add a batch: ``reference[name]`` has the samples on axis 0."""
        count = 0
        for name in names:
            value = reference[name].detach()
            if not value.is_floating_point() or value.shape[0] == 0:
                continue
            count = max(count, int(value.shape[0]))
            self.sq[name] = self.sq.get(name, 0.0) + float((value.to(torch.float64) ** 2).sum())
            if name in self.varies:
                continue
            first = self.first.setdefault(name, value[0].clone())
            if _differs(first, value, value.shape[1:]):
                self.varies.add(name)
                del self.first[name]
        self.samples += count

    def add(self, other: "ConstantOutputs") -> None:
        """Take in what ``other`` saw on other samples (a pool worker's share): an output is
        constant over both only if it was constant over each, with the same value."""
        for name, sq in other.sq.items():
            self.sq[name] = self.sq.get(name, 0.0) + sq
        for name in other.varies:
            self.varies.add(name)
            self.first.pop(name, None)
        for name, first in other.first.items():
            if name in self.varies:
                continue
            mine = self.first.get(name)
            if mine is None:
                self.first[name] = first
                continue
            if _differs(mine, first, first.shape):
                self.varies.add(name)
                del self.first[name]
        self.samples += other.samples

    def constant(self) -> dict[str, float]:
        """``{output: its share of sum ||f||^2}`` for the outputs that never varied (none
        before two samples were seen)."""
        if self.samples < 2:
            return {}
        total = sum(self.sq.values())
        return {k: (self.sq[k] / total if total > 0 else 0.0) for k in self.sq if k not in self.varies}

    def to_json(self) -> dict | None:
        """What :meth:`warning` needs, for the Sensitivity record; None when nothing is constant."""
        constant = self.constant()
        if not constant:
            return None
        return {"outputs": constant, "read": sorted(self.sq), "samples": self.samples}

    @staticmethod
    def warning(found: dict | None, loss: str) -> str | None:
        """One line naming the constant outputs and what the ``loss`` does with them."""
        if not found:
            return None
        constant, read, n = found["outputs"], found["read"], found["samples"]
        names = ", ".join(repr(k) for k in constant)
        head = f"output{'s' if len(constant) > 1 else ''} {names} {'are' if len(constant) > 1 else 'is'} " \
               f"constant over the {n} calibration samples (zero variance)"
        others = [k for k in read if k not in constant]
        if not others:
            return (f"warning: {head}: the {loss} loss reads nothing that varies, its predicted change is "
                    f"~0 whatever the plan and a budget relative to it means nothing; give --max-loss-mse, "
                    f"or --loss {loss}:OUTPUT naming an output that varies")
        share = sum(constant.values())
        return (f"warning: {head}: the {loss} loss sums it with {len(others)} other output"
                f"{'s' if len(others) > 1 else ''} ({', '.join(map(repr, others))}); it has no predicted "
                f"change and makes {share:.0%} of the E[L^2] that --max-loss-rmse is relative to "
                f"(--loss {loss}:OUTPUT reads one output only)")


LOSS_NAMES = ("projection", "projection_raw", "pseudo_label", "cross_entropy", "mse")
_ALIASES = {"proj": "projection", "random_projection": "projection", "pseudo": "pseudo_label",
            "pseudo-label": "pseudo_label", "argmax": "pseudo_label", "ce": "cross_entropy",
            "cross-entropy": "cross_entropy", "xent": "cross_entropy"}


def make_loss(spec: str | Loss, *, labels: np.ndarray | None = None, probes: int = 1) -> Loss:
    """A :class:`Loss` from ``"name[:output]"``; refuses losses with a zero gradient at hp.

    ``projection`` (default without labels; on the logits of a final Softmax/Sigmoid),
    ``projection_raw`` (on the outputs as written), ``pseudo_label``, ``cross_entropy`` and ``mse``
    (both need ``labels``). ``kl`` and ``mse`` without labels compare the model with itself.
    """
    if isinstance(spec, Loss):
        return spec
    name, _, output = spec.partition(":")
    name = _ALIASES.get(name.strip().lower(), name.strip().lower())
    output = output.strip() or None
    if name in _SELF_REFERENCED or (name == "mse" and labels is None):
        raise AmpqError(
            f"loss {spec!r} compares the model with its own high-precision output: at the high-precision "
            f"point that loss is at its minimum, its gradient is exactly zero, and every first-order "
            f"sensitivity would be 0. Use 'projection' (no labels needed), 'pseudo_label' (classifiers, "
            f"language models) or a task loss with labels ('cross_entropy', 'mse')")
    if probes < 1:
        raise AmpqError(f"probes must be >= 1, got {probes}")
    if name == "projection":
        return ProjectionLoss(output, probes)
    if name == "projection_raw":
        return ProjectionLoss(output, probes, logits=False)
    if name == "pseudo_label":
        return PseudoLabelLoss(output)
    if name in ("cross_entropy", "mse"):
        if labels is None:
            raise AmpqError(f"loss {name!r} needs labels (--labels FILE); without labels use 'pseudo_label' "
                            f"or 'projection'")
        return TaskLoss(name, np.asarray(labels), output)
    raise AmpqError(f"unknown loss {spec!r}; expected one of {', '.join(LOSS_NAMES)} (optionally ':<output name>')")


def load_labels(path: str) -> np.ndarray:
    """Labels from ``.npy`` or a ``.npz`` holding one array (axis 0 = samples)."""
    import zipfile

    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise AmpqError(f"{path}: no such labels file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise AmpqError(f"{path}: not a readable .npy/.npz labels file ({exc})") from None
    if isinstance(data, np.ndarray):
        return data
    with data:
        if len(data.files) != 1:
            raise AmpqError(f"{path}: a labels .npz must hold exactly one array, found {data.files}")
        return data[data.files[0]]
