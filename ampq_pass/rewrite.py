"""Rewrite: express a plan as QDQ / Cast nodes in the ONNX graph (design.md §3 "Rewrite").

The edits are local: for each non-``hp`` layer, new initializers and nodes are inserted
just before it and its inputs are renamed. This works on the ONNX protos directly rather
than through onnx-graphsurgeon because graphsurgeon's import materialises every weight as
a numpy array, which doubles peak memory on >2 GB models for edits that touch a handful
of tensors; insertion before the consumer keeps topological order by construction.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from .calibration import Ranges
from .errors import AmpqError
from .formats import HP, FORMATS, Int8
from .layers import Layer, initializers, per_output_channel
from .plan import Plan, validate_plan

#: ops whose int8 QDQ kernel (QLinearConv ...) needs the output quantized too; MatMul and
#: Gemm have float-output integer kernels (MatMulIntegerToFloat, QGemm) in ONNX Runtime.
_QUANTIZED_OUTPUT_OPS = ("Conv", "ConvTranspose")


def required_ranges(layers: list[Layer]) -> list[str]:
    """Activation tensors whose range any plan over ``layers`` may need."""
    names = []
    for layer in layers:
        names.append(layer.activation)
        if layer.activation2:
            names.append(layer.activation2)
        if layer.op_type in _QUANTIZED_OUTPUT_OPS:
            names.append(layer.output)
    return sorted(set(names))


def required_opset(plan: Plan) -> int:
    return max([FORMATS[f].opset for f in plan.used_formats()], default=0)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def raise_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert to ``opset`` with onnx's version converter when the model is older."""
    if default_opset(model) >= opset:
        return model
    from .model import convert_opset

    try:
        converted = convert_opset(model, opset)
    except Exception as exc:  # the converter raises RuntimeError/ValueError/ConvertError
        raise AmpqError(
            f"model opset {default_opset(model)} must be raised to {opset} for the chosen formats, "
            f"and onnx's version converter failed: {str(exc).splitlines()[0]}"
        ) from None
    return converted


def rewrite(model: onnx.ModelProto, layers: list[Layer], plan: Plan, ranges: Ranges | None) -> onnx.ModelProto:
    """A copy of ``model`` with ``plan`` applied as QDQ/Cast nodes; ``model`` is not modified.

    An all-``hp`` plan returns an unchanged copy. Models above 2 GB are never copied
    whole: the edits run on a weight-less copy and only the weights the rewritten graph
    still reads are copied in at the end, so a plan that quantizes most weights adds
    about a quarter of the model size, not the whole of it.
    """
    from .model import _fits_protobuf, stripped_copy

    validate_plan(plan, layers)
    large = not _fits_protobuf(model)
    if large:
        out = stripped_copy(model)
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    if not plan.used_formats():
        return _fill_weights(out, model) if large else out
    out = raise_opset(out, required_opset(plan))
    graph = out.graph
    # Weight values come from the caller's model (the copy may hold placeholders);
    # initializers the version converter created live only in the copy.
    inits = {**initializers(out), **initializers(model)}
    by_name = {l.name: l for l in layers}

    before: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert before it
    after: dict[str, list[onnx.NodeProto]] = {}
    # New initializers go into the graph as soon as they are made (the graph holds the
    # only copy; a list kept until the end would hold a second copy of every new weight).
    class _Sink:
        @staticmethod
        def extend(tensors) -> None:
            for t in tensors:
                graph.initializer.append(t)

    new_inits = _Sink()
    # (tensor, format, axis) -> replacement name: a weight shared by two layers is dequantized
    # once per format and channel axis (a MatMul reads it per column, a Gemm with transB per row)
    shared: dict[tuple, str] = {}
    nodes = {n.name: n for n in graph.node}
    replaced: dict[str, list[onnx.NodeProto]] = {}  # node name -> the nodes that compute it now

    def emit(anchor: str, key: tuple, make) -> str:
        if key not in shared:
            emitted = make()
            new_inits.extend(emitted.initializers)
            before.setdefault(anchor, []).extend(emitted.nodes)
            shared[key] = emitted.output
        return shared[key]

    def need_range(tensor: str) -> tuple[float, float]:
        if ranges is None or tensor not in ranges:
            raise AmpqError(f"no calibrated range for activation {tensor!r}; calibrate before rewriting")
        return ranges[tensor]

    for node_name, fmt_name in plan.formats.items():
        if fmt_name == HP:
            continue
        layer, fmt, node = by_name[node_name], FORMATS[fmt_name], nodes[node_name]
        act_inputs = [layer.activation] + ([layer.activation2] if layer.activation2 else [])
        act_scale = None
        if fmt.quantizes_activation:
            for slot, tensor in enumerate(act_inputs):
                lo, hi = need_range(tensor) if fmt.needs_range else (0.0, 0.0)
                node.input[slot] = emit(node_name, (tensor, fmt_name),
                                        lambda t=tensor, a=lo, b=hi: fmt.activation_nodes(t, a, b))
            if isinstance(fmt, Int8) and not fmt.replaces_op:
                act_scale = fmt.activation_params(*need_range(layer.activation))[0]
        if layer.weight is not None:
            w = numpy_helper.to_array(inits[layer.weight])
            axis = layer.channel_axis
            taken_axes = {k[2] for k in shared if len(k) == 3 and k[:2] == (layer.weight, fmt_name)}
            wname = layer.weight if not taken_axes or axis in taken_axes else f"{layer.weight}_axis{axis}"
            node.input[1] = emit(node_name, (layer.weight, fmt_name, axis),
                                 lambda w=w, n=wname, a=axis: fmt.weight_nodes(n, w, a))
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if fmt.replaces_op:
                replaced[node_name] = fmt.op_nodes(node, node.input[0], node.input[1])
            elif isinstance(fmt, Int8) and bias in inits and layer.op_type in ("Conv", "Gemm", "ConvTranspose"):
                b = numpy_helper.to_array(inits[bias])
                w_scale = per_output_channel(fmt.weight_scale(w, layer.channel_axis), layer, node)
                if b.ndim == 1:
                    emitted = fmt.bias_nodes(f"{node_name}_{bias}", b, act_scale, w_scale)
                    new_inits.extend(emitted.initializers)
                    before.setdefault(node_name, []).extend(emitted.nodes)
                    node.input[2] = emitted.output
        if isinstance(fmt, Int8) and layer.op_type in _QUANTIZED_OUTPUT_OPS:
            # Rename the op's output and re-create the original name after Q->DQ, so every
            # consumer and graph output keeps the tensor name it had.
            lo, hi = need_range(layer.output)
            raw = f"{layer.output}_{fmt_name}_raw"
            node.output[0] = raw
            emitted = fmt.activation_nodes(raw, lo, hi)
            emitted.nodes[-1].output[0] = layer.output
            new_inits.extend(emitted.initializers)
            after.setdefault(node_name, []).extend(emitted.nodes)

    ordered = []
    for node in graph.node:
        ordered.extend(before.get(node.name, []))
        ordered.extend(replaced.get(node.name, [node]))
        ordered.extend(after.get(node.name, []))
    del graph.node[:]
    graph.node.extend(ordered)
    _drop_unused_initializers(graph)
    return _fill_weights(out, model) if large else out


def _fill_weights(out: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the data-less placeholders of :func:`ampq_pass.model.stripped_copy` that the
    rewritten graph still reads with the weights of ``model``."""
    source = initializers(model)
    for t in out.graph.initializer:
        orig = source.get(t.name)
        if orig is not None and not t.raw_data and list(t.dims) == list(orig.dims) and t.data_type == orig.data_type:
            t.CopyFrom(orig)
    return out


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove float weights that no node reads any more: that is where memory is saved."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    used |= _subgraph_inputs(graph)
    graph_inputs = {i.name for i in graph.input}
    # delete by index: rebuilding the list would copy every kept weight once more
    drop = [i for i, t in enumerate(graph.initializer) if t.name not in used and t.name not in graph_inputs]
    for i in reversed(drop):
        del graph.initializer[i]


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= {i for n in g.node for i in n.input}
                names |= _subgraph_inputs(g)
    return names
