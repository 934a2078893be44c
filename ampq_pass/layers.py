"""Quantizable layers (design.md §3): the ops whose cost dominates and which have a
low-precision kernel on some backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


@dataclass(frozen=True)
class Layer:
    """One quantizable node.

    ``activation`` is the input tensor that gets activation quantization; ``weight`` the
    constant weight (``None`` for an activation-by-activation MatMul, whose second
    input is ``activation2``). ``channel_axis`` is the weight's output-channel axis,
    the axis of per-channel scales.
    """

    name: str
    op_type: str
    activation: str
    weight: str | None
    weight_shape: tuple[int, ...] | None
    channel_axis: int | None
    output: str
    activation2: str | None = None
    formats: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return asdict(self)


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _channel_axis(node: onnx.NodeProto, weight_rank: int) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return weight_rank - 1 if weight_rank >= 2 else None
    return None


def candidate_formats(op_type: str, weight_shape: tuple[int, ...] | None) -> tuple[str, ...]:
    """Formats the rewrite can express for this layer (backends filter what runs fast)."""
    if weight_shape is None:  # activation x activation MatMul: no weight-only format
        return ("int8", "fp8_e4m3", "fp16", "bf16")
    formats = ["int8", "fp8_e4m3", "fp16", "bf16"]
    if op_type == "MatMul" and len(weight_shape) == 2:
        formats += ["int8_dyn", "int4"]
    return tuple(formats)


def find_layers(model: onnx.ModelProto, *, activation_matmuls: bool = False) -> list[Layer]:
    """Every quantizable layer of ``model`` in graph order.

    A layer is a MatMul/Gemm/Conv/ConvTranspose whose weight input is an initializer
    and whose data input is a float activation; with ``activation_matmuls`` also
    MatMuls of two activations (attention scores).
    """
    inits = initializers(model)
    layers = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        name = node.name or f"{node.op_type}_{index}"
        x, w = node.input[0], node.input[1]
        if x in inits:  # weight on the left (x·W with constant x) is not a layer we quantize
            continue
        if w in inits:
            shape = tuple(int(d) for d in inits[w].dims)
            if inits[w].data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
                continue
            layers.append(Layer(name, node.op_type, x, w, shape, _channel_axis(node, len(shape)),
                                node.output[0], formats=candidate_formats(node.op_type, shape)))
        elif activation_matmuls and node.op_type == "MatMul":
            layers.append(Layer(name, node.op_type, x, None, None, None, node.output[0], activation2=w,
                                formats=candidate_formats(node.op_type, None)))
    return layers


def per_output_channel(values: np.ndarray, layer: Layer, node: onnx.NodeProto) -> np.ndarray:
    """Per-channel ``values`` of a weight (along ``layer.channel_axis``) as one per output channel.

    Only a grouped ConvTranspose differs: its weight is ``[C_in, C_out/group, ...]``, so
    the weight's channel axis has ``C_out/group`` entries and output channel
    ``g * C_out/group + j`` uses entry ``j`` (the int8 bias scale must follow that).
    """
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if layer.op_type == "ConvTranspose" and group > 1 and np.ndim(values) == 1:
        return np.tile(values, group)
    return values


def ensure_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a stable name (``<op>_<index>``): plans refer to nodes by name."""
    taken = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model


def weight_array(model: onnx.ModelProto, layer: Layer) -> np.ndarray:
    return numpy_helper.to_array(initializers(model)[layer.weight])


def count_macs(layer: Layer, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
               group: int = 1) -> int:
    """Multiply-accumulates of one run of ``layer`` at the given concrete shapes."""
    out = int(np.prod(output_shape))
    if layer.op_type == "MatMul":
        return out * int(input_shape[-1])
    if layer.op_type == "Gemm":
        w = layer.weight_shape
        k = w[1] if layer.channel_axis == 0 else w[0]
        return out * int(k)
    if layer.op_type == "Conv":
        w = layer.weight_shape
        return out * int(np.prod(w[1:]))
    if layer.op_type == "ConvTranspose":
        # each input element scatters into (C_out/group * prod(kernel)) outputs
        w = layer.weight_shape
        return int(np.prod(input_shape)) * int(np.prod(w[1:]))
    raise ValueError(f"no MAC count for op {layer.op_type}")


def observed_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of float tensors ``names`` for one run of ``model`` on ``feeds``.

    Symbolic dims (sequence length, shapes computed by Reshape chains) are only known
    for real inputs, so the model is run once in ONNX Runtime with those tensors exposed.
    """
    from .probe import run_exposed

    _, outs = next(run_exposed(model, [feeds], names))
    return {n: tuple(int(d) for d in outs[n].shape) for n in names}


def layer_macs(model: onnx.ModelProto, layers: list[Layer], feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """MACs of each layer for one run on ``feeds``."""
    names = sorted({l.activation for l in layers} | {l.output for l in layers})
    shapes = observed_shapes(model, feeds, names)
    return {l.name: count_macs(l, shapes[l.activation], shapes[l.output]) for l in layers}
