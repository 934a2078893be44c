"""Fusion rules: which ops *between* layers a backend runs on 8-bit tensors, as plain data.

The layer rewrite (:mod:`ampq_pass.stages.rewrite`) quantizes layers (Conv, MatMul, Gemm ...);
what sits between them (Add, Relu, pooling, Concat, Reshape ...) stays in float, so a
backend that has integer kernels for those ops pays DQ -> float -> Q around each of them.
A backend says which ops it fuses with a :class:`FusionRules` table, reached through
:attr:`ampq_pass.core.measure.Capabilities.rules` (the tables themselves live with the
adapters, e.g. ``ampq_pass.backends.ort_rules``); :func:`ampq_pass.stages.fusion.follow_rules`
places Q/DQ by the table. One entry per op, three kinds:

- :data:`INTEGER`: the op has an integer kernel that the backend forms from DQ on every data
  input and one Q on the output (ONNX Runtime: QLinearAdd, QLinearConcat, QLinearGlobalAveragePool ...).
- :data:`PASSTHROUGH`: the op moves or selects values; with DQ before and Q after at the *same*
  scale and zero point the backend drops both and runs the op on the 8-bit tensor.
- :data:`ABSORBED`: an activation (Relu, Clip) after an op with an 8-bit output, which the
  output's Q makes redundant when its zero point is the lowest code.

A passthrough op the backend does *not* fuse but whose kernel takes 8-bit tensors (ONNX
Runtime's Pad: DQ -> Pad -> Q stays float, a uint8 Pad runs 2.5x faster than a float one) is
marked ``on_quantized``: the rewrite writes it on the quantized tensor itself, Q -> op -> DQ,
which is exact for an op that only moves values (a constant it inserts, Pad's
``constant_value``, is mapped into the 8-bit domain the way the Q after it would map it).

:func:`rule_tensors` names the tensors whose calibrated range a rewrite with the table may
read (calibration runs once, before any plan is known).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import onnx

from ampq_pass.core.graph import attribute
from ampq_pass.core.proto import default_opset

INTEGER = "integer"
PASSTHROUGH = "passthrough"
ABSORBED = "absorbed"
KINDS = (INTEGER, PASSTHROUGH, ABSORBED)

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class OpRule:
    """How a backend runs one op type between quantized neighbours."""

    kind: str
    #: input slots that carry data to quantize (None: every input, e.g. Concat); other inputs
    #: (shapes, axes, indices, a Where condition) stay as they are
    inputs: tuple[int, ...] | None = (0,)
    #: lowest default-domain opset at which the backend fuses it (0: any)
    min_opset: int = 0
    #: whether every output carries data (Split); otherwise the op has one output (an op with
    #: a second, optional output in use, as MaxPool's Indices, is not fused)
    all_outputs: bool = False
    #: where in the backend's source this rule comes from
    source: str = ""
    #: (passthrough only) the backend keeps DQ -> op -> Q in float, but its kernel takes the
    #: 8-bit tensor: the rewrite writes Q -> op -> DQ
    on_quantized: bool = False
    #: (with ``on_quantized``) the slot of a scalar in the data's float type that the op inserts
    #: (Pad's constant_value; absent means 0), mapped into the 8-bit domain
    value_input: int | None = None
    #: attribute values under which the backend's integer kernel computes something else than
    #: the op, so the op stays float: each entry a set of (name, value) pairs that must all hold
    #: (values other than the attribute's default; an absent attribute matches none)
    float_when: tuple[tuple[tuple[str, int], ...], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fusion kind {self.kind!r}; expected one of {KINDS}")
        if (self.on_quantized or self.value_input is not None) and (self.kind != PASSTHROUGH or self.all_outputs
                                                                    or not self.on_quantized):
            raise ValueError("on_quantized and value_input are for a single-output passthrough op; "
                             f"got kind {self.kind!r}, all_outputs={self.all_outputs}, "
                             f"on_quantized={self.on_quantized}, value_input={self.value_input}")

    def fits(self, node: onnx.NodeProto) -> bool:
        """Whether the backend's kernel computes ``node`` as written (no ``float_when`` match)."""
        return not any(all(attribute(node, k) == v for k, v in case) for case in self.float_when)

    def data_inputs(self, node: onnx.NodeProto) -> list[int]:
        """The slots of ``node`` that must arrive quantized (absent optional inputs skipped)."""
        slots = range(len(node.input)) if self.inputs is None else self.inputs
        return [i for i in slots if i < len(node.input) and node.input[i]]

    def data_outputs(self, node: onnx.NodeProto) -> list[str] | None:
        """The outputs of ``node`` that carry data, or None when the node's outputs do not fit the rule."""
        made = [o for o in node.output if o]
        if not made or (not self.all_outputs and (len(made) != 1 or not node.output[0])):
            return None
        return made if self.all_outputs else [node.output[0]]


@dataclass(frozen=True, eq=False)
class FusionRules:
    """A backend's table: op type -> :class:`OpRule` (default domain only)."""

    name: str
    rules: dict[str, OpRule] = field(default_factory=dict)
    #: whether a quantized layer's float output may get a Q/DQ of its own where every reader is
    #: an op the table runs in 8 bits (a residual Add after a convolution): for backends whose
    #: 8-bit formats leave the layer's output float (OpenVINO's int8_sym); ONNX Runtime's int8
    #: quantizes a convolution's output itself (QLinearConv)
    layer_outputs: bool = False
    #: op types the backend computes wrong on *signed* 8-bit codes: an 8-bit region holding one
    #: is written with uint8 codes, zero point + 128, the same values
    #: (:func:`ampq_pass.stages.fusion.recode_unsigned`)
    unsigned_only: frozenset[str] = frozenset()

    def rule(self, node: onnx.NodeProto, opset: int) -> OpRule | None:
        """The rule for ``node`` at ``opset``, or None when the backend keeps it in float (no
        entry, an older opset, or attributes its kernel gets wrong)."""
        if node.domain not in ("", "ai.onnx"):
            return None
        r = self.rules.get(node.op_type)
        return r if r is not None and opset >= r.min_opset and r.fits(node) else None

    def key(self) -> dict:
        """What a timing made with these rules depends on (part of cache keys)."""
        return {"name": self.name, "rules": {op: [r.kind, list(r.inputs) if r.inputs is not None else None,
                                                  r.min_opset, *(["on_quantized", r.value_input] if r.on_quantized else []),
                                                  *([[list(map(list, c)) for c in r.float_when]] if r.float_when else [])]
                                             for op, r in sorted(self.rules.items())},
                **({"layer_outputs": True} if self.layer_outputs else {}),
                **({"unsigned_only": sorted(self.unsigned_only)} if self.unsigned_only else {})}


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return {v.name for v in (*g.input, *g.value_info, *g.output)
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in _FLOAT_TYPES}


def rule_tensors(model: onnx.ModelProto, rules: FusionRules | None, quantizable: Iterable[str] = ()) -> list[str]:
    """Float tensors whose range a rewrite following ``rules`` may need: the outputs of the
    :data:`INTEGER` and :data:`ABSORBED` ops of ``model`` (a :data:`PASSTHROUGH` op reuses its
    input's scale) that can be 8-bit at all, i.e. whose data inputs are, transitively, tensors
    some plan quantizes (``quantizable``: the layers' inputs and quantized outputs). An
    attention mask's Add or a Softmax after a float MatMul is never calibrated (the histogram
    calibrators break on mask values). Tensors of unknown type are left out (the pass then
    keeps that op in float): the model should carry inferred shapes, as
    :func:`ampq_pass.core.model.load_model` leaves it."""
    if rules is None:
        return []
    opset = default_opset(model)
    floats = _float_tensors(model)
    int8 = set(quantizable)
    names = set()
    for node in model.graph.node:  # topological: one forward sweep
        r = rules.rule(node, opset)
        outs = r.data_outputs(node) if r is not None else None
        if not outs:
            continue
        data = [node.input[i] for i in r.data_inputs(node)] if r.kind != ABSORBED else node.input[:1]
        if data and all(t in int8 for t in data):
            int8.update(outs)
            if r.kind in (INTEGER, ABSORBED):
                names.update(o for o in outs if o in floats)
    return sorted(names)
