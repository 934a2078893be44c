"""The structure of a model, without its names and its weights' values.

Two models with the same structure run the same kernels on the same shapes, so they take
the same time: the repeated blocks of a network (BERT-base's twelve encoder layers,
ConvNeXt's nine stage-3 blocks) extracted as standalone subgraphs differ only in tensor and
node names and in their weights. TensorRT's timing cache keys its measurements the same
way (by layer signature, not by layer name); keying ours by structure lets the pass time
each distinct block once.

What "the same structure" keeps: the op types, domains, attributes, the wiring between
nodes, the graph inputs' and outputs' types and shapes, the opsets, and every initializer's
dtype and shape. Values are kept for every initializer that can steer the computation:
integer tensors (Reshape shapes, Slice bounds, Gather indices), floating-point scalars (a Pow
exponent, a Range bound) and the scales a Resize or Upsample reads (they set its output
shape). Only the values of the other floating-point tensors, the weights and biases, are
left out. Attributes holding graphs or
tensors are kept whole, names and all: two control-flow bodies compare equal only when they
are identical, which errs on the side of timing twice.
"""

from __future__ import annotations

import hashlib

import onnx

#: ops whose floating-point inputs set shapes, not just values
_SHAPE_FROM_FLOATS = {"Resize", "Upsample"}

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def canonical_names(model: onnx.ModelProto) -> dict[str, str]:
    """Name -> position token, the same for two models of the same structure.

    Tensors are numbered ``t0, t1, ...`` in order of first appearance: the graph inputs, then
    each node's inputs and outputs in node order (initializers included where a node first
    reads them), then any graph output not yet seen. Nodes are ``n0, n1, ...`` by position.
    Node and tensor names share the map (a node and a tensor may share a name in ONNX, so node
    names are looked up under ``("node", name)``: use :func:`node_token`).
    """
    names: dict[str, str] = {}

    def see(t: str) -> None:
        if t and t not in names:
            names[t] = f"t{len(names)}"

    for i in model.graph.input:
        see(i.name)
    for node in model.graph.node:
        for t in list(node.input) + list(node.output):
            see(t)
    for o in model.graph.output:
        see(o.name)
    tensors = dict(names)
    for k, node in enumerate(model.graph.node):
        tensors[_node_key(node.name or f"#{k}")] = f"n{k}"
    return tensors


def node_token(names: dict[str, str], node_name: str) -> str | None:
    """The position token of the node called ``node_name`` in ``names`` (:func:`canonical_names`)."""
    return names.get(_node_key(node_name))


def _node_key(name: str) -> str:
    return "\x00node\x00" + name


def structure_digest(model: onnx.ModelProto, names: dict[str, str] | None = None) -> str:
    """A sha256 digest of the model's structure (see the module docstring): equal for two
    models that differ only in names and in their weights' values."""
    names = names if names is not None else canonical_names(model)
    h = hashlib.sha256()

    def put(*parts: object) -> None:
        for p in parts:
            h.update(p if isinstance(p, bytes) else repr(p).encode())
            h.update(b"\x00")

    def token(t: str) -> str:
        # a tensor that appears nowhere in the wiring (an unused initializer) keeps its name
        return names.get(t, "?" + t) if t else ""

    steering = {t for node in model.graph.node if node.op_type in _SHAPE_FROM_FLOATS for t in node.input}
    put("opsets", sorted((o.domain, o.version) for o in model.opset_import))
    for vi in model.graph.input:
        put("input", token(vi.name), _type(vi.type))
    for t in sorted(model.graph.initializer, key=lambda t: token(t.name)):
        put("init", token(t.name), t.data_type, tuple(t.dims))
        if _value_matters(t) or t.name in steering:
            put(t.raw_data if t.HasField("raw_data") else t.SerializeToString(deterministic=True))
    for node in model.graph.node:
        put("node", node.domain, node.op_type, [token(t) for t in node.input], [token(t) for t in node.output])
        for a in node.attribute:
            put(a.SerializeToString(deterministic=True))
    for vi in model.graph.output:
        put("output", token(vi.name), _type(vi.type))
    return h.hexdigest()


def _value_matters(t: onnx.TensorProto) -> bool:
    size = 1
    for d in t.dims:
        size *= d
    return t.data_type not in _FLOAT_TYPES or size <= 1


def _type(tp: onnx.TypeProto) -> bytes:
    return tp.SerializeToString(deterministic=True)
