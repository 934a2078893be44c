"""Rewrite: express a plan as QDQ / Cast nodes in the ONNX graph (design.md §3 "Rewrite").

The edits are local: for each non-``hp`` layer, new initializers and nodes are inserted
just before it and its inputs are renamed. This works on the ONNX protos directly rather
than through onnx-graphsurgeon because graphsurgeon's import materialises every weight as
a numpy array, which doubles peak memory on >2 GB models for edits that touch a handful
of tensors; insertion before the consumer keeps topological order by construction.

What is emitted for a layer is the format's business (:mod:`ampq_pass.core.formats`):
this module only places it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx
from onnx import numpy_helper

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import CUT_STATES, FORMATS, HP, Emitted, Format
from ampq_pass.core.fusion import FusionRules
from ampq_pass.core.graph import drop_unused_initializers, ensure_node_names, initializers
from ampq_pass.core.measure import Measurer
from ampq_pass.core.ops import OPS
from ampq_pass.core.proto import copy_model, fits_protobuf, raise_opset, stripped_copy
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.stages.fusion import follow_rules, recode_unsigned, shared_ranges
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.plan import Plan, validate_plan


def required_opset(plan: Plan) -> int:
    """The lowest default-domain opset that every format of ``plan`` (its cuts' included) can be written in."""
    used = plan.used_formats() | {s for s in plan.cuts.values() if s != HP}
    return max([FORMATS[f].opset for f in used], default=0)


@dataclass
class _Edits:
    """Nodes to place around existing nodes, and the new initializers, of one rewrite.

    New initializers go into the graph as soon as they are made: the graph then holds the
    only copy (a list kept until the end would hold a second copy of every new weight).
    """

    graph: onnx.GraphProto
    before: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    after: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    replaced: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    #: (tensor, format[, axis]) -> replacement name: emitted once, read by every layer that needs it
    shared: dict[tuple, str] = field(default_factory=dict)

    def place(self, anchor: str, emitted: Emitted, *, after: bool = False) -> str:
        self.graph.initializer.extend(emitted.initializers)
        (self.after if after else self.before).setdefault(anchor, []).extend(emitted.nodes)
        return emitted.output

    def once(self, anchor: str, key: tuple, make: Callable[[], Emitted]) -> str:
        if key not in self.shared:
            self.shared[key] = self.place(anchor, make())
        return self.shared[key]

    def apply(self) -> None:
        ordered = []
        for node in self.graph.node:
            ordered.extend(self.before.get(node.name, []))
            ordered.extend(self.replaced.get(node.name, [node]))
            ordered.extend(self.after.get(node.name, []))
        del self.graph.node[:]
        self.graph.node.extend(ordered)


def _range(ranges: Ranges | None, tensor: str) -> tuple[float, float]:
    if ranges is None or tensor not in ranges:
        raise AmpqError(f"no calibrated range for activation {tensor!r}; calibrate before rewriting")
    return ranges[tensor]


def rewrite(model: onnx.ModelProto, layers: list[Layer], plan: Plan, ranges: Ranges | None, *,
            rules: FusionRules | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with ``plan`` applied as QDQ/Cast nodes; ``model`` is not modified.

    An all-``hp`` plan returns an unchanged copy. Models above 2 GB are never copied
    whole: the edits run on a weight-less copy and only the weights the rewritten graph
    still reads are copied in at the end, so a plan that quantizes most weights adds
    about a quarter of the model size, not the whole of it. ``rules`` (the backend's,
    :attr:`ampq_pass.core.measure.Capabilities.rules`) also quantizes the ops between layers
    that the backend fuses (:func:`ampq_pass.stages.fusion.follow_rules`).
    """
    validate_plan(plan, layers)
    ranges = shared_ranges(model, rules, ranges)  # equal parameters across the rules' passthrough ops
    large = not fits_protobuf(model)
    out = stripped_copy(model) if large else copy_model(model)
    cuts = {t: s for t, s in plan.cuts.items() if s != HP}
    if plan.used_formats() or cuts:
        out = raise_opset(out, required_opset(plan), why="the plan's formats")
        ensure_node_names(out)  # the version converter may add unnamed nodes; every stage refers to nodes by name
        # Weight values come from the caller's model (the copy may hold placeholders);
        # initializers the version converter created live only in the copy.
        inits = {**initializers(out), **initializers(model)}
        by_name = {l.name: l for l in layers}
        nodes = {n.name: n for n in out.graph.node}
        edits = _Edits(out.graph)
        # cuts first: a layer reading a quantized cut then reuses its Q/DQ (edits.once)
        for tensor, state in cuts.items():
            _quantize_cut(edits, tensor, FORMATS[state], plan, by_name, ranges)
        for node_name, fmt_name in plan.formats.items():
            if fmt_name != HP:
                _rewrite_layer(edits, by_name[node_name], FORMATS[fmt_name], nodes[node_name], inits, ranges)
        edits.apply()
        used = plan.used_formats() | set(cuts.values())
        # ops between layers are quantized in the plan's 8-bit format (int8_sym where the plan has it)
        follow_rules(out, rules, ranges, next((f for f in reversed(CUT_STATES) if f in used), CUT_STATES[0]))
        recode_unsigned(out, rules)  # signed codes where the backend gets them wrong
        drop_unused_initializers(out.graph)
    return _fill_weights(out, model) if large else out


def written_for(backend: Measurer, model: onnx.ModelProto, layers: list[Layer], plan: Plan,
                ranges: Ranges | None) -> onnx.ModelProto:
    """:func:`rewrite` following ``backend``'s fusion rules, in the form the pass writes for that
    backend (:meth:`~ampq_pass.core.measure.Measurer.deployed`), so that what is measured is what
    is written; a plan that quantizes nothing is :func:`rewrite`'s copy as it is."""
    rewritten = rewrite(model, layers, plan, ranges, rules=backend.capabilities().rules)
    return backend.deployed(rewritten) if plan.formats else rewritten


def _quantize_cut(edits: _Edits, tensor: str, fmt: Format, plan: Plan, layers: dict[str, Layer],
                  ranges: Ranges | None) -> None:
    """One Q->DQ on a cut tensor that every reader reads (design.md §3 "Boundary states").

    Where a node makes the tensor, its output is renamed and the Q->DQ placed after it
    re-creates the original name, so readers and graph outputs keep their input. A layer
    whose format quantizes its own output already does exactly that (:func:`_rewrite_layer`).
    A graph input gets its Q->DQ before its first reader, and every reader is renamed.
    """
    graph = edits.graph
    maker = next((n for n in graph.node if tensor in n.output), None)
    if maker is not None:
        layer = layers.get(maker.name)
        own = plan.format_of(maker.name)
        if layer is not None and own == fmt.name and fmt.quantizes_output(layer.op_type):
            edits.shared[(tensor, fmt.name)] = tensor
            return
        raw = f"{tensor}_{fmt.name}_cut_raw"
        maker.output[list(maker.output).index(tensor)] = raw
        emitted = fmt.activation_nodes(raw, *_range(ranges, tensor))
        emitted.nodes[-1].output[0] = tensor
        edits.place(maker.name, emitted, after=True)
        edits.shared[(tensor, fmt.name)] = tensor
        return
    readers = [n for n in graph.node if tensor in n.input]
    if not readers:
        raise AmpqError(f"cut tensor {tensor!r} is neither made nor read by the model")
    dq = edits.once(readers[0].name, (tensor, fmt.name), lambda: fmt.activation_nodes(tensor, *_range(ranges, tensor)))
    for n in readers:
        for i, name in enumerate(n.input):
            if name == tensor:
                n.input[i] = dq


def _rewrite_layer(edits: _Edits, layer: Layer, fmt: Format, node: onnx.NodeProto,
                   inits: dict[str, onnx.TensorProto], ranges: Ranges | None) -> None:
    """Place ``fmt``'s nodes for one layer: activation Q/DQ, weight DQ, int32 bias, output Q/DQ."""
    if fmt.quantizes_activation:
        for slot, tensor in enumerate(layer.activations):
            lo, hi = _range(ranges, tensor) if fmt.needs_range else (0.0, 0.0)
            node.input[slot] = edits.once(layer.name, (tensor, fmt.name),
                                          lambda t=tensor, a=lo, b=hi: fmt.activation_nodes(t, a, b))
    if layer.weight is not None:
        w = numpy_helper.to_array(inits[layer.weight])
        axis = layer.channel_axis
        clip = ranges.clip(layer.weight, fmt.name) if ranges is not None else None
        # a weight shared by two layers is dequantized once per format and channel axis
        # (a MatMul reads it per column, a Gemm with transB per row)
        taken = {k[2] for k in edits.shared if len(k) == 3 and k[:2] == (layer.weight, fmt.name)}
        wname = layer.weight if not taken or axis in taken else f"{layer.weight}_axis{axis}"
        node.input[1] = edits.once(layer.name, (layer.weight, fmt.name, axis),
                                   lambda: fmt.weight_nodes(wname, w, axis, clip))
        bias = OPS[layer.op_type].bias(node)
        if fmt.replaces_op:
            edits.replaced[layer.name] = fmt.op_nodes(node, node.input[0], node.input[1])
        elif fmt.quantizes_bias and bias in inits:
            b = numpy_helper.to_array(inits[bias])
            if b.ndim == 1:
                scale = fmt.bias_scale(w, node, *_range(ranges, layer.activation))
                node.input[2] = edits.place(layer.name, fmt.bias_nodes(f"{layer.name}_{bias}", b, scale))
    if fmt.quantizes_output(layer.op_type):
        # Rename the op's output and re-create the original name after Q->DQ, so every
        # consumer and graph output keeps the tensor name it had.
        raw = f"{layer.output}_{fmt.name}_raw"
        node.output[0] = raw
        emitted = fmt.activation_nodes(raw, *_range(ranges, layer.output))
        emitted.nodes[-1].output[0] = layer.output
        edits.place(layer.name, emitted, after=True)


def _fill_weights(out: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the data-less placeholders of :func:`ampq_pass.core.proto.stripped_copy` that the
    rewritten graph still reads with the weights of ``model``."""
    source = initializers(model)
    for t in out.graph.initializer:
        orig = source.get(t.name)
        if orig is not None and not t.raw_data and list(t.dims) == list(orig.dims) and t.data_type == orig.data_type:
            t.CopyFrom(orig)
    return out
