"""Op rules: what the pass needs to know about each quantizable op type, in the op's class.

As ONNX Runtime's quantizer keeps Gemm's ``transB`` and ``beta`` handling in
``operators/gemm.py``, each class here owns its op's conventions: which axis of the weight
holds the output channels, how a per-channel value maps to the output channels, where the
bias is and how it is scaled, how to scale the weight per output channel (BatchNorm folding)
and how many multiply-accumulates one run costs. Layers, rewrite, sensitivity,
normalisation and the cost models ask here instead of branching on op names.
"""

from __future__ import annotations

import numpy as np
import onnx

from .graph import attribute


class QuantizableOp:
    """Base rules of an op with a weight input (input 1) that a format may quantize."""

    op_type: str = ""
    #: input index of the bias, or None when the op has none
    bias_input: int | None = None

    def channel_axis(self, node: onnx.NodeProto, weight_rank: int) -> int | None:
        """The weight's output-channel axis (the axis of per-channel scales)."""
        raise NotImplementedError

    def per_output_channel(self, values: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
        """Per-channel ``values`` of the weight (along :meth:`channel_axis`) as one per output channel."""
        return values

    def bias_scale(self, node: onnx.NodeProto) -> float:
        """The factor the op applies to its bias (Gemm's ``beta``; 1 elsewhere)."""
        return 1.0

    def bias(self, node: onnx.NodeProto) -> str | None:
        """Name of the node's bias input, or None."""
        i = self.bias_input
        return node.input[i] if i is not None and len(node.input) > i and node.input[i] else None

    def macs(self, weight_shape: tuple[int, ...] | None, channel_axis: int | None,
             input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of one run at the given concrete shapes."""
        raise NotImplementedError


class MatMulOp(QuantizableOp):
    op_type = "MatMul"

    def channel_axis(self, node, weight_rank):
        return weight_rank - 1 if weight_rank >= 2 else None

    def macs(self, weight_shape, channel_axis, input_shape, output_shape):
        return int(np.prod(output_shape)) * int(input_shape[-1])


class GemmOp(QuantizableOp):
    """``Y = alpha * A' B' + beta * C`` with ``B' = B^T`` when ``transB``."""

    op_type = "Gemm"
    bias_input = 2

    def channel_axis(self, node, weight_rank):
        return 0 if attribute(node, "transB", 0) else 1

    def bias_scale(self, node):
        return float(attribute(node, "beta", 1.0))

    def macs(self, weight_shape, channel_axis, input_shape, output_shape):
        k = weight_shape[1] if channel_axis == 0 else weight_shape[0]
        return int(np.prod(output_shape)) * int(k)


class ConvOp(QuantizableOp):
    """Weight ``[C_out, C_in / group, *kernel]``."""

    op_type = "Conv"
    bias_input = 2

    def channel_axis(self, node, weight_rank):
        return 0

    def scale_output_channels(self, w: np.ndarray, scale: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
        """``w`` with output channel ``o`` multiplied by ``scale[o]``."""
        return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))

    def macs(self, weight_shape, channel_axis, input_shape, output_shape):
        return int(np.prod(output_shape)) * int(np.prod(weight_shape[1:]))


class ConvTransposeOp(ConvOp):
    """Weight ``[C_in, C_out / group, *kernel]``: output channel ``g * C_out/group + j`` is
    entry ``j`` of the weight's axis 1 within the ``g``-th block of ``C_in``."""

    op_type = "ConvTranspose"

    def channel_axis(self, node, weight_rank):
        return 1

    def per_output_channel(self, values, node):
        group = attribute(node, "group", 1)
        return np.tile(values, group) if group > 1 and np.ndim(values) == 1 else values

    def scale_output_channels(self, w, scale, node):
        group = attribute(node, "group", 1)
        c_in, c_out_g = w.shape[0], w.shape[1]
        blocks = w.reshape((group, c_in // group, c_out_g) + w.shape[2:])
        blocks = blocks * scale.reshape((group, 1, c_out_g) + (1,) * (w.ndim - 2))
        return blocks.reshape(w.shape)

    def macs(self, weight_shape, channel_axis, input_shape, output_shape):
        # each input element scatters into (C_out/group * prod(kernel)) outputs
        return int(np.prod(input_shape)) * int(np.prod(weight_shape[1:]))


#: op type -> its rules; add a class above and a line here to make an op quantizable.
OPS: dict[str, QuantizableOp] = {op.op_type: op for op in (MatMulOp(), GemmOp(), ConvOp(), ConvTransposeOp())}
WEIGHTED_OPS: tuple[str, ...] = tuple(OPS)
