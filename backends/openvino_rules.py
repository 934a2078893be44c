"""OpenVINO CPU plugin: the ops between layers it runs on 8-bit tensors (the fusion rule table).

OpenVINO's ONNX frontend turns each QuantizeLinear into a FakeQuantize; its low-precision
transformations (LPT) then split every FakeQuantize into an 8-bit one and a dequantization
that they move down through the ops they support, up to the next FakeQuantize, where the CPU
plugin fuses it. So an op runs in 8 bits when LPT has a transformation for it; in front of any
other op a Q/DQ stays a float FakeQuantize (one more rounding, nothing faster). Read from
openvinotoolkit/openvino (2025/2026):

- ``src/common/low_precision_transformations/src/markup_precisions.cpp``
  (``isPrecisionPreserved``): MaxPool, Reshape, Squeeze, Unsqueeze, Transpose, DepthToSpace,
  Gather, Split/VariadicSplit, Interpolate (nearest), ReduceMax/ReduceMin, Concat run on the
  8-bit tensor with the input's scale (PASSTHROUGH here).
- ``avg_pool.cpp``, ``reduce_mean.cpp`` (ONNX GlobalAveragePool becomes ReduceMean), ``concat.cpp``,
  ``add.cpp``: 8-bit inputs, dequantization after the op (INTEGER here: DQ on every data input,
  one Q after; a Concat of inputs at different scales gets a per-channel dequantization). A
  residual Add between int8 convolutions placed so runs as a u8 Eltwise fused with them
  (conv -> Add -> Relu -> conv at 8 x 16 x 56 x 56: 1.52 ms against 2.13 ms with the Add in
  float, on this 2-core Xeon). ``multiply_partial.cpp`` exists, but a Mul placed the same way
  compiled to no u8 kernel here (1.76 against 1.97 ms, within what one probe can tell), so Mul
  stays out.
- ``common_optimizations/relu_fake_quantize_fusion.cpp``: a Relu before a FakeQuantize whose
  range starts at 0 is removed; Clamp is a post-op of the convolution (ABSORBED here).
- Not in LPT (``MarkupPrecisions`` leaves port 0 without precisions): Sigmoid, LeakyRelu with an
  asymmetric uint8 input (``prelu.cpp`` refuses a zero point), Softmax, Where, Tile,
  GatherElements, Slice (NNCF's OpenVINO backend took it off its quantize-agnostic list; it
  compiles to f32 here). ONNX Runtime's table quantizes the first four (Where compiles to a u8
  snippet here, not timed, so it stays out until measured); here they stay float, with the Q after them
  that the next layer needs (the plugin fuses Sigmoid, Swish, HSwish... into the
  convolution's post-ops anyway). Pad with a non-zero zero point on several axes is refused
  by ``pad.cpp``; the project's activations are asymmetric, so Pad stays out.

- Signed codes through a Concat: ``Concat -> Q/DQ (int8, zero point 0) -> Conv`` (and the same
  with the Q/DQ on the Concat's inputs) is computed wrong by the 2026.4 CPU plugin (relative
  error 0.22 against ONNX Runtime, a single conv without the Concat: 0.00003); with uint8 codes
  and zero point 128 (the same values) it is right and as fast. So a Concat is ``unsigned_only``:
  the rewrite writes every signed Q/DQ of its 8-bit region that way
  (:func:`ampq_pass.stages.fusion.recode_unsigned`).

``tests/backends/test_openvino.py`` checks each 8-bit entry, and the ops left out, against the
installed OpenVINO: compiled on the CPU plugin, a data-movement entry runs in u8 and an op
left out in f32; ``benchmarks/results/fusion_openvino.md`` times the table against ONNX
Runtime's on OpenVINO.
"""

from __future__ import annotations

from ampq_pass.core.fusion import ABSORBED, INTEGER, PASSTHROUGH, FusionRules, OpRule

_LPT = "openvino low_precision_transformations"


def _integer(source: str, inputs=(0,)) -> OpRule:
    return OpRule(INTEGER, inputs, source=f"{_LPT}: {source}")


def _preserved(source: str = "markup_precisions.cpp isPrecisionPreserved") -> OpRule:
    return OpRule(PASSTHROUGH, (0,), source=f"{_LPT}: {source}")


#: the CPU plugin's table; one entry per op type
OPENVINO_CPU_RULES = FusionRules("openvino:cpu", {
    # 8-bit inputs, dequantization moved after the op
    "Add": _integer("add.cpp (residual sum; fused into the convolution as a sum post-op)", (0, 1)),
    "Concat": _integer("concat.cpp (inputs at different scales: per-channel dequantization after it)", None),
    "AveragePool": _integer("avg_pool.cpp"),
    "GlobalAveragePool": _integer("reduce_mean.cpp (the ONNX frontend makes it ReduceMean)"),
    "ReduceMean": _integer("reduce_mean.cpp"),
    # precision-preserving: the op runs on the 8-bit tensor at its input's scale
    **{op: _preserved() for op in ("MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
                                    "DepthToSpace", "Gather", "ReduceMax", "ReduceMin")},
    "Expand": _preserved("markup_precisions.cpp (Broadcast runs in u8 on the CPU plugin)"),
    "Resize": _preserved("interpolate.cpp (nearest mode only; other modes keep the Q/DQ pair in float)"),
    "Split": OpRule(PASSTHROUGH, (0,), all_outputs=True, source=f"{_LPT}: split.cpp (Split, VariadicSplit)"),
    # activations removed by the FakeQuantize after them
    "Relu": OpRule(ABSORBED, (0,), source="common_optimizations/relu_fake_quantize_fusion.cpp"),
    "Clip": OpRule(ABSORBED, (0,), source="intel_cpu: Clamp fused into the convolution as a post-op"),
}, layer_outputs=True,  # int8_sym leaves a conv's output float; a residual Add needs it quantized (stages/fusion.py)
   # a Concat in 8 bits with int8 codes feeds the next convolution wrong values (measured: stages/fusion.py
   # recode_unsigned); uint8 codes with zero point 128 carry the same values and run as fast
   unsigned_only=frozenset({"Concat"}))
