"""ONNX Runtime CPU EP: the ops between layers it runs on 8-bit tensors (the fusion rule table).

Read from ONNX Runtime's source (1.2x main), not from its Python quantizer: what matters is
what the CPU EP's graph optimizer fuses, i.e. the QDQ selectors registered for
``kCpuExecutionProvider`` in
``onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selector_action_transformer.cc``
and their checks in ``qdq_selectors.cc``:

- ``UnaryOpQDQRules`` (DQ -> op -> Q becomes a com.microsoft QLinear op): AveragePool,
  LeakyRelu, GlobalAveragePool, Sigmoid, Softmax.
- ``BinaryOpQDQRules`` (both inputs from DQ, output to Q; CPU only): Add, Mul.
- ``VariadicOpQDQRules`` (every input from DQ): Concat -> QLinearConcat.
- ``WhereQDQRules`` (inputs 1 and 2 from DQ; the condition stays bool): Where -> QLinearWhere.
- ``DropQDQNodesRules`` (DQ -> op -> Q with equal scale and zero point: both dropped, the op runs
  on the 8-bit tensor): Expand, Flatten, Gather, GatherElements, Reshape, Slice, Squeeze,
  Tile, Transpose, Unsqueeze; Resize (no 16-bit); MaxPool (opset >= 12, positive scale),
  ReduceMax, ReduceMin.
- ``NodeGroupSelector::GetQDQSelection``: a Relu or Clip between a target op and its Q is
  absorbed when the Q makes it redundant (``IsClipMadeRedundantByQ``: zero point at the
  lowest code).

``tests/stages/test_fusion.py`` checks every entry, and SpaceToDepth and ReduceMean
staying out, against the installed ONNX Runtime (1.32: DepthToSpace is dropped too).

Pad is in no selector (DQ -> Pad -> Q stays float), but the CPU EP's Pad kernel takes uint8 and
int8 tensors: the table marks it ``on_quantized``, and the rewrite writes Q -> Pad -> DQ with the
pad value mapped to its code. TensorFlow-style "same" padding exports a Pad before every
strided depthwise convolution (EfficientNet): float, it also kept the SiLU before it float.

Every selector also requires (``CheckQDQNodes``) that the target's outputs go to Q nodes
only, one per output, and that the target produces no graph output. ``SplitQDQRules`` (CPU):
a Split with one DQ in and, on every output, a Q with the input's parameters runs on the
8-bit tensor. Not in the table: ArgMax (DQ dropped, no Q), SpaceToDepth (kept as
DQ -> float -> Q), ReduceMean (no QLinear kernel on the CPU EP: ``x.mean(dim=(2, 3))``
exports as ReduceMean and stays float), and the layers themselves (Conv, MatMul, Gemm: the
formats' business).
``qdq_propagation.cc`` moves Q/DQ through MaxPool, Reshape, Transpose, Squeeze, Unsqueeze and
Slice on its own; placing them with equal parameters here makes that unnecessary.
"""

from __future__ import annotations

from ampq_pass.core.fusion import ABSORBED, INTEGER, PASSTHROUGH, FusionRules, OpRule

_SEL = "qdq_selector_action_transformer.cc"


def _integer(source: str, inputs=(0,)) -> OpRule:
    return OpRule(INTEGER, inputs, source=f"{_SEL}: {source}")


def _drop(source: str, min_opset: int = 0) -> OpRule:
    return OpRule(PASSTHROUGH, (0,), min_opset, source=f"{_SEL}: {source}")


#: the CPU EP's table; one entry per op type
ORT_CPU_RULES = FusionRules("ort:cpu", {
    # integer kernels
    "Add": _integer("BinaryOpQDQRules -> QLinearAdd", (0, 1)),
    "Mul": _integer("BinaryOpQDQRules -> QLinearMul", (0, 1)),
    "Concat": _integer("VariadicOpQDQRules -> QLinearConcat", None),
    # QLinearAveragePool divides a ceil_mode window that hangs off the input by the whole kernel
    # with count_include_pad (the float kernel counts only what is inside: ORT issue 16203);
    # HF EfficientNet's pooler, AvgPool2d(1280, ceil_mode=True) on a 7x7 map, came out constant
    "AveragePool": OpRule(INTEGER, (0,), float_when=((("ceil_mode", 1), ("count_include_pad", 1)),),
                          source=f"{_SEL}: UnaryOpQDQRules -> QLinearAveragePool"),
    "GlobalAveragePool": _integer("UnaryOpQDQRules -> QLinearGlobalAveragePool"),
    "LeakyRelu": _integer("UnaryOpQDQRules -> QLinearLeakyRelu"),
    "Sigmoid": _integer("UnaryOpQDQRules -> QLinearSigmoid"),
    "Softmax": _integer("UnaryOpQDQRules -> QLinearSoftmax"),
    "Where": _integer("WhereQDQRules -> QLinearWhere", (1, 2)),
    # Q/DQ dropped around data movement
    "MaxPool": _drop("DropQDQNodesRules (no 16-bit, positive scale)", 12),
    "Resize": _drop("DropQDQNodesRules (no 16-bit)"),
    "ReduceMax": _drop("DropQDQNodesRules (no 16-bit, positive scale)"),
    "ReduceMin": _drop("DropQDQNodesRules (no 16-bit, positive scale)"),
    **{op: _drop("DropQDQNodesRules") for op in ("Expand", "Flatten", "Gather", "GatherElements", "Reshape",
                                                  "Slice", "Squeeze", "Tile", "Transpose", "Unsqueeze")},
    "Split": OpRule(PASSTHROUGH, (0,), all_outputs=True,
                    source=f"{_SEL}: SplitQDQRules -> SplitReplaceWithQuant (equal quantization parameters)"),
    "Pad": OpRule(PASSTHROUGH, (0,), 11, on_quantized=True, value_input=2,
                  source="cpu/tensor/pad.cc: Pad kernels for int8/uint8 (no QDQ selector: written on the 8-bit tensor)"),
    # newer than the source read above (which says it has no integer kernel): ORT 1.32 drops it
    "DepthToSpace": _drop("DropQDQNodesRules (ORT 1.32; tests/stages/test_fusion.py checks it)"),
    # activations made redundant by the Q after them
    "Relu": OpRule(ABSORBED, (0,), source="qdq_selectors.cc: GetQDQSelection, IsClipMadeRedundantByQ"),
    "Clip": OpRule(ABSORBED, (0,), source="qdq_selectors.cc: GetQDQSelection, IsClipMadeRedundantByQ"),
})
