"""Graph-level helpers on ``onnx.GraphProto``: names, initializers, consumers, attributes.

Plain functions over the proto; nothing here knows about layers, formats or stages.
"""

from __future__ import annotations

import onnx

from ampq_pass.core.errors import AmpqError


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The model's initializers by name."""
    return {t.name: t for t in model.graph.initializer}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes of ``graph`` that read it (subgraph bodies not included)."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node of ``graph`` that writes it."""
    return {o: n for n in graph.node for o in n.output if o}


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node`` (``default`` when absent)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def ensure_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a stable name ``<op>_<index>`` (plans refer to nodes by name);
    returns ``model``, changed in place.

    The index is the node's position in the graph as given, so names do not depend on which
    nodes later passes remove.
    """
    taken = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model


def node_names(model: onnx.ModelProto) -> list[str]:
    """The names of ``model``'s nodes in graph order; every node must have one.

    Plans, partitions and layers refer to nodes by name. :func:`ampq_pass.core.model.load_model`
    names every node at load (:func:`ensure_node_names`), so the stages never invent names;
    a model built in memory must be named the same way first.
    """
    for index, node in enumerate(model.graph.node):
        if not node.name:
            raise AmpqError(f"node #{index} ({node.op_type}) has no name; load the model with load_model, which "
                            f"names every node, or call ensure_node_names on it")
    return [n.name for n in model.graph.node]


def bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs a node holds in its attributes (If branches, Loop/Scan bodies)."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]


def outer_scope_reads(node: onnx.NodeProto) -> list[str]:
    """The tensors of the enclosing graph that ``node``'s bodies read (recursively): names a body
    reads that none of its inputs, initializers or nodes defines. They are inputs of ``node`` in
    all but name (ONNX lists only the condition of an If as its input)."""
    names: list[str] = []
    for body in bodies(node):
        defined = {i.name for i in body.input} | {t.name for t in body.initializer}
        defined.update(o for inner in body.node for o in inner.output)
        for inner in body.node:
            names += [n for n in list(inner.input) + outer_scope_reads(inner) if n and n not in defined]
    return names


def body_inputs(graph: onnx.GraphProto) -> set[str]:
    """Every tensor of ``graph`` that the bodies of its control-flow nodes read: used even though no
    top-level node input names it."""
    return {name for node in graph.node for name in outer_scope_reads(node)}


def drop_unused_initializers(graph: onnx.GraphProto) -> int:
    """Remove initializers that no node (nor subgraph body, nor graph output) reads; returns how many.

    Deleted by index: rebuilding the list would copy every kept weight once more.
    """
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    used |= body_inputs(graph)
    graph_inputs = {i.name for i in graph.input}
    drop = [i for i, t in enumerate(graph.initializer) if t.name not in used and t.name not in graph_inputs]
    for i in reversed(drop):
        del graph.initializer[i]
    return len(drop)
