"""Find: the quantizable layers (design.md §3), the ops whose cost dominates and which have
a low-precision kernel on some backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import FORMATS
from ampq_pass.core.graph import bodies, initializers, node_names, producers
from ampq_pass.core.ops import OPS, WEIGHTED_OPS
from ampq_pass.core.ort import observed_shapes

_FLOAT_WEIGHTS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


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

    @property
    def activations(self) -> list[str]:
        """The input tensors a format quantizes as activations (one, or two for x·y MatMuls)."""
        return [self.activation] + ([self.activation2] if self.activation2 else [])


def candidate_formats(op_type: str, weight_shape: tuple[int, ...] | None,
                      offered: Iterable[str] = ()) -> tuple[str, ...]:
    """Formats the rewrite can express for this layer (backends filter what runs fast):
    every format that accepts the op and weight shape, in the table's order; a format a
    backend offers only on request (:attr:`ampq_pass.core.formats.Format.on_request`, such as
    ``int8_w7``) only where ``offered`` names it."""
    offered = set(offered)
    return tuple(name for name, fmt in FORMATS.items()
                 if (not fmt.on_request or name in offered) and fmt.accepts(op_type, weight_shape))


def find_layers(model: onnx.ModelProto, *, activation_matmuls: bool = False,
                offered: Iterable[str] = ()) -> list[Layer]:
    """Every quantizable layer of ``model`` in graph order.

    A layer is a node of an op in :data:`ampq_pass.core.ops.OPS` whose weight input is a
    float initializer and whose data input is an activation; with ``activation_matmuls``
    also MatMuls of two activations (attention scores). Nodes are named at load
    (:func:`ampq_pass.core.normalize.normalize`), so a layer's name is its node's name.
    ``offered``: the backend's formats, which bring in its on-request ones (:func:`candidate_formats`).
    """
    inits = initializers(model)
    node_names(model)  # every node named (a layer is known by its node's name)
    layers = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if x in inits:  # weight on the left (x·W with constant x) is not a layer we quantize
            continue
        if w in inits:
            if inits[w].data_type not in _FLOAT_WEIGHTS:
                continue
            shape = tuple(int(d) for d in inits[w].dims)
            axis = OPS[node.op_type].channel_axis(node, len(shape))
            layers.append(Layer(node.name, node.op_type, x, w, shape, axis, node.output[0],
                                formats=candidate_formats(node.op_type, shape, offered)))
        elif activation_matmuls and node.op_type == "MatMul":
            layers.append(Layer(node.name, node.op_type, x, None, None, None, node.output[0], activation2=w,
                                formats=candidate_formats(node.op_type, None, offered)))
    return layers


def layers_in_bodies(model: onnx.ModelProto) -> dict[str, int]:
    """Control-flow nodes (If/Loop/Scan) of the main graph -> how many weighted ops of
    :data:`ampq_pass.core.ops.OPS` their bodies hold (recursively); those with none are left out.

    The pass plans and rewrites the main graph only: layers inside bodies are not layers.
    """
    def count(graph: onnx.GraphProto) -> int:
        return sum((n.op_type in WEIGHTED_OPS) + sum(count(g) for g in bodies(n)) for n in graph.node)

    found = {n.name: sum(count(g) for g in bodies(n)) for n in model.graph.node if bodies(n)}
    return {k: v for k, v in found.items() if v}


def require_layers(model: onnx.ModelProto, layers: list[Layer], source: str) -> list[Layer]:
    """``layers`` when there is at least one; otherwise the one-line reason there is none."""
    if layers:
        return layers
    hidden = layers_in_bodies(model)
    if hidden:
        nodes = {n.name: n for n in model.graph.node}
        where = ", ".join(f"{nodes[k].op_type} {k!r} ({v}{_condition_inputs(model, nodes[k])})"
                          for k, v in list(hidden.items())[:3])
        raise AmpqError(f"{source}: every weighted op sits inside a control-flow body ({where}); the pass plans "
                        f"the main graph only, and control flow (If/Loop/Scan) is not supported")
    raise AmpqError(f"{source}: no quantizable layer ({'/'.join(WEIGHTED_OPS)} with a constant float weight)")


def _condition_inputs(model: onnx.ModelProto, node: onnx.NodeProto) -> str:
    """``", condition reads input 'sr'"`` for an If whose condition is computed from model
    inputs: what makes the branch data-dependent (silero-vad's If(sr == 16000)), so the user
    sees why a plan cannot pick one branch for them."""
    if node.op_type != "If" or not node.input or not node.input[0]:
        return ""
    made = producers(model.graph)
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    found, todo, seen = [], [node.input[0]], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            found.append(name)
        elif name in made:
            todo.extend(t for t in made[name].input if t)
    if not found:
        return ""
    return f", condition reads input{'s' if len(found) > 1 else ''} {', '.join(map(repr, sorted(found)))}"


def weight_array(model: onnx.ModelProto, layer: Layer) -> np.ndarray:
    """The layer's weight as a numpy array."""
    return numpy_helper.to_array(initializers(model)[layer.weight])


def count_macs(layer: Layer, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one run of ``layer`` at the given concrete shapes."""
    return OPS[layer.op_type].macs(layer.weight_shape, layer.channel_axis, input_shape, output_shape)


def layer_macs(model: onnx.ModelProto, layers: list[Layer], feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """MACs of each layer for one run on ``feeds``."""
    names = sorted({l.activation for l in layers} | {l.output for l in layers})
    shapes = observed_shapes(model, feeds, names)
    return {l.name: count_macs(l, shapes[l.activation], shapes[l.output]) for l in layers}
