"""Sequential subgraphs as standalone models, and the real activations at their inputs.

Extraction uses ``onnx.utils.Extractor``: given input and output tensor names it keeps
exactly the nodes between them, with their initializers, value_info, opsets and local
functions, which is the definition of a subgraph cut at tensors. onnx-graphsurgeon would
do the same but copies the whole graph into its own IR for every subgraph; the Extractor
works on the proto we already hold. Its one requirement is a type for every boundary
tensor, which onnx shape inference provides.

Capture runs the full model once per calibration batch in ONNX Runtime with every
subgraph input exposed as an extra output, so the activations fed to a subgraph in timing
are the ones it sees inside the model.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx.utils import Extractor

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.ort import run_exposed
from ampq_pass.core.proto import copy_model, fits_protobuf, infer_shapes_safe
from ampq_pass.core.samples import Samples
from ampq_pass.stages.partition import Partition, Subgraph


def _typed_names(model: onnx.ModelProto) -> set[str]:
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    return {v.name for v in values if v.type.tensor_type.elem_type}


def with_types(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` itself if every tensor in ``names`` has a type, else a shape-inferred copy."""
    if set(names) <= _typed_names(model):
        return model
    # Above 2 GB, inference runs on a weight-less copy anyway and only adds value_info to
    # the model it is given: doing that in place avoids a second copy of every weight.
    inferred = infer_shapes_safe(copy_model(model) if fits_protobuf(model) else model)
    missing = [n for n in names if n not in _typed_names(inferred)]
    if missing:
        raise AmpqError(f"tensor {missing[0]!r}: onnx shape inference gives it no type, cannot extract a subgraph at it")
    return inferred


def extract(model: onnx.ModelProto, subgraph: Subgraph, *, check: bool = True) -> onnx.ModelProto:
    """``subgraph`` as a standalone model: its inputs (cut tensors, side-chain tensors, model
    inputs) become graph inputs with their dtypes and shapes, its outputs graph outputs.

    Ops that compute constants for it (``Constant``, an ``Identity`` of a weight) are copied
    in. The result passes ``onnx.checker``; a node set that differs from the subgraph's
    means the partition does not belong to this model and raises :class:`AmpqError`.
    """
    if not subgraph.outputs:
        raise AmpqError(f"subgraph {subgraph.index} ({subgraph.name}) has no outputs to extract")
    typed = with_types(model, subgraph.inputs + subgraph.outputs)
    try:
        sub = Extractor(typed).extract_model(list(subgraph.inputs), list(subgraph.outputs))
    except ValueError as exc:
        raise AmpqError(f"subgraph {subgraph.index} ({subgraph.name}): cannot extract ({exc})") from None
    _check_nodes(sub, subgraph)
    sub.graph.name = f"subgraph{subgraph.index}"
    sub.graph.doc_string = f"{subgraph.kind} subgraph {subgraph.name}: layers {', '.join(subgraph.layers)}"
    if check:
        onnx.checker.check_model(sub)
    return sub


def _check_nodes(sub: onnx.ModelProto, subgraph: Subgraph) -> None:
    got = {n.name for n in sub.graph.node}
    want = set(subgraph.nodes)
    missing = want - got
    # Constant-making ops copied in: all their inputs are constants of the extracted model
    # (its nodes keep the model's topological order, so one pass settles it).
    consts = {t.name for t in sub.graph.initializer}
    makers = set()
    for node in sub.graph.node:
        if node.name not in want and all(t in consts for t in node.input if t):
            consts.update(node.output)
            makers.add(node.name)
    foreign = sorted(got - want - makers)
    if foreign:
        raise AmpqError(f"subgraph {subgraph.index} ({subgraph.name}): extraction pulled in node {foreign[0]!r}; "
                        "the partition does not match this model")
    lost_layers = [l for l in subgraph.layers if l in missing]
    if lost_layers:
        raise AmpqError(f"subgraph {subgraph.index} ({subgraph.name}): layer {lost_layers[0]!r} does not reach "
                        "the subgraph's outputs; the partition does not match this model")


def capture_inputs(model: onnx.ModelProto, partition: Partition, samples: Samples, *, batch_size: int = 8,
                   max_batches: int | None = None) -> dict[int, list[dict[str, np.ndarray]]]:
    """The real input tensors of every subgraph, batch by batch.

    Returns ``{subgraph index: [ {input name: array} per batch ]}``. One ONNX Runtime
    run of the full model per batch, with every subgraph input exposed as an output;
    a tensor read by several subgraphs (an attention mask) is one shared array.
    """
    graph_inputs = {i.name for i in model.graph.input}
    wanted = sorted({t for s in partition.subgraphs for t in s.inputs if t not in graph_inputs})
    produced = {t for n in model.graph.node for t in n.output}
    unknown = [t for t in wanted if t not in produced]
    if unknown:
        raise AmpqError(f"subgraph input {unknown[0]!r} is not a tensor of the model")
    out: dict[int, list[dict[str, np.ndarray]]] = {s.index: [] for s in partition.subgraphs}
    batches = itertools.islice(samples.batches(batch_size), max_batches)
    for batch, values in run_exposed(model, batches, wanted):
        values.update(batch)
        for s in partition.subgraphs:
            out[s.index].append({t: values[t] for t in s.inputs})
    return out


def extract_all(model: onnx.ModelProto, partition: Partition) -> list[onnx.ModelProto]:
    """Every subgraph of ``partition`` extracted, in order (shape inference at most once)."""
    names = [t for s in partition.subgraphs for t in s.inputs + s.outputs]
    typed = with_types(model, names)
    return [extract(typed, s) for s in partition.subgraphs]
