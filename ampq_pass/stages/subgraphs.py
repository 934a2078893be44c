"""Sequential subgraphs as standalone models, and the real activations at their inputs.

Extraction uses ``onnx.utils.Extractor``: given input and output tensor names it keeps
exactly the nodes between them, with their initializers, value_info, opsets and local
functions, which is the definition of a subgraph cut at tensors. onnx-graphsurgeon would
do the same but copies the whole graph into its own IR for every subgraph; the Extractor
works on the proto we already hold. Its one requirement is a type (element type and
shape) for every boundary tensor. onnx shape inference usually gives it, but not after a
Reshape whose shape is computed at run time (every later tensor is rank-unknown), so it is
never required: :func:`capture_inputs` has the real tensors at every cut, and types the
boundary tensors inference leaves untyped from them (:func:`captured_types`).

Capture runs the full model once per calibration batch in ONNX Runtime with every
subgraph input exposed as an extra output, so the activations fed to a subgraph in timing
are the ones it sees inside the model.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper
from onnx.utils import Extractor

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.graph import outer_scope_reads
from ampq_pass.core.ort import run_exposed
from ampq_pass.core.proto import PASS_TYPE, copy_model, fits_protobuf, infer_shapes_safe
from ampq_pass.core.samples import Samples, input_specs
from ampq_pass.stages.partition import Partition, Subgraph


#: doc_string of the value_info entries :func:`capture_inputs` adds from captured tensors (a
#: :data:`PASS_TYPE`, so that the written model does not carry them)
CAPTURED_TYPE = f"{PASS_TYPE} typed from captured tensors"


def _typed_names(model: onnx.ModelProto) -> set[str]:
    """Tensors with an element type *and* a shape (of known rank): what a subgraph's inputs
    and outputs need to pass onnx.checker."""
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    return {v.name for v in values
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type and v.type.tensor_type.HasField("shape")}


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    # Above 2 GB, inference runs on a weight-less copy anyway and only adds value_info to
    # the model it is given: doing that in place avoids a second copy of every weight.
    return infer_shapes_safe(copy_model(model) if fits_protobuf(model) else model)


def untyped(model: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """The tensors of ``names`` that neither the model nor onnx shape inference gives a type
    and shape (inference failing altogether counts as giving none)."""
    names = list(dict.fromkeys(names))
    missing = [n for n in names if n not in _typed_names(model)]
    if not missing:
        return []
    try:
        typed = _typed_names(_inferred(model))
    except Exception:  # noqa: BLE001 - inference is a help here, never a requirement
        typed = set()
    return [n for n in missing if n not in typed]


def with_types(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` itself if every tensor in ``names`` has a type and shape, else a shape-inferred copy."""
    if set(names) <= _typed_names(model):
        return model
    try:
        inferred = _inferred(model)
    except Exception as exc:  # noqa: BLE001
        inferred, why = model, f" (onnx shape inference failed: {str(exc).splitlines()[0][:120]})"
    else:
        why = ""
    missing = [n for n in names if n not in _typed_names(inferred)]
    if missing:
        raise AmpqError(f"tensor {missing[0]!r}: onnx shape inference gives it no type or shape{why} (a shape "
                        f"computed at run time?) and no captured tensor typed it: run capture_inputs on this "
                        f"model before extracting its subgraphs")
    return inferred


def captured_types(model: onnx.ModelProto, batches: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
                   names: Iterable[str]) -> list[onnx.ValueInfoProto]:
    """Types of tensors ``names`` from their real values: ``batches`` is ``[(model feed,
    {name: value})]``. The element type is the arrays'; a dim is symbolic (``<name>_dim<axis>``)
    when it differs between batches or equals the size of a non-fixed dim of a model input
    (the batch, a sequence length), else fixed to the size seen."""
    specs = input_specs(model)
    out = []
    for name in names:
        arrays = [values[name] for _, values in batches if name in values]
        if not arrays:
            continue
        first = np.asarray(arrays[0])
        rank = first.ndim
        free = [{int(feed[s.name].shape[a]) for s in specs if s.name in feed
                 for a, d in enumerate(s.shape) if not (isinstance(d, int) and d > 0) and a < feed[s.name].ndim}
                for feed, values in batches if name in values]
        dims: list[int | str] = []
        for axis in range(rank):
            sizes = {np.shape(a)[axis] if np.ndim(a) == rank else -1 for a in arrays}
            size = int(first.shape[axis])
            symbolic = len(sizes) > 1 or any(int(np.shape(a)[axis]) in f for a, f in zip(arrays, free)
                                              if np.ndim(a) == rank)
            dims.append(f"{name}_dim{axis}" if symbolic else size)
        elem = helper.np_dtype_to_tensor_dtype(first.dtype)
        value = helper.make_tensor_value_info(name, elem, dims)
        value.doc_string = CAPTURED_TYPE
        out.append(value)
    return out


def add_types(model: onnx.ModelProto, values: list[onnx.ValueInfoProto]) -> None:
    """Put ``values`` in ``model.graph.value_info`` (in place), replacing entries of the same
    name that lack a type or shape; graph inputs and outputs are left as they are."""
    io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    new = {v.name: v for v in values if v.name not in io}
    if not new:
        return
    keep = [v for v in model.graph.value_info if v.name not in new]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep + list(new.values()))


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
        with _outer_reads_as_inputs(typed) as added:
            sub = Extractor(typed).extract_model(list(subgraph.inputs), list(subgraph.outputs))
    except ValueError as exc:
        raise AmpqError(f"subgraph {subgraph.index} ({subgraph.name}): cannot extract ({exc})") from None
    for node in sub.graph.node:
        if node.name in added:
            del node.input[added[node.name]:]
    _check_nodes(sub, subgraph)
    sub.graph.name = f"subgraph{subgraph.index}"
    sub.graph.doc_string = f"{subgraph.kind} subgraph {subgraph.name}: layers {', '.join(subgraph.layers)}"
    if check:
        onnx.checker.check_model(sub)
    return sub


@contextlib.contextmanager
def _outer_reads_as_inputs(model: onnx.ModelProto) -> Iterator[dict[str, int]]:
    """While onnx's Extractor runs, the enclosing-graph tensors that If/Loop/Scan bodies read are
    appended to their nodes' inputs: the Extractor follows node inputs only, and ONNX lists
    just an If's condition there. Yields {node name: its own input count}; the model gets its
    inputs back afterwards (the extracted copy must be trimmed by the caller)."""
    added = {}
    for node in model.graph.node:
        extra = [n for n in dict.fromkeys(outer_scope_reads(node)) if n not in node.input]
        if extra:
            added[node.name] = len(node.input)
            node.input.extend(extra)
    try:
        yield added
    finally:
        for node in model.graph.node:
            if node.name in added:
                del node.input[added[node.name]:]


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


def capture_inputs(model: onnx.ModelProto, partition: Partition,
                   samples: Samples | list[dict[str, np.ndarray]], *, batch_size: int = 8,
                   max_batches: int | None = None) -> dict[int, list[dict[str, np.ndarray]]]:
    """The real input tensors of every subgraph, batch by batch.

    Returns ``{subgraph index: [ {input name: array} per batch ]}``. One ONNX Runtime
    run of the full model per batch, with every subgraph input exposed as an output;
    a tensor read by several subgraphs (an attention mask) is one shared array.
    ``samples`` is a :class:`Samples` (cut in ``batch_size`` batches, or its whole feeds) or
    a list of feeds used as they are.

    Boundary tensors (subgraph inputs and outputs) that onnx shape inference cannot type
    are typed from the captured values and the types added to ``model.graph.value_info``
    (in place, doc_string :data:`CAPTURED_TYPE`), so that :func:`extract` works on it.
    """
    graph_inputs = {i.name for i in model.graph.input}
    wanted = sorted({t for s in partition.subgraphs for t in s.inputs if t not in graph_inputs})
    produced = {t for n in model.graph.node for t in n.output}
    unknown = [t for t in wanted if t not in produced]
    if unknown:
        raise AmpqError(f"subgraph input {unknown[0]!r} is not a tensor of the model")
    boundary = [t for s in partition.subgraphs for t in s.inputs + s.outputs if t in produced]
    need = untyped(model, boundary)
    exposed = wanted + sorted(set(need) - set(wanted))
    out: dict[int, list[dict[str, np.ndarray]]] = {s.index: [] for s in partition.subgraphs}
    feeds = samples.batches(batch_size) if isinstance(samples, Samples) else iter(samples)
    batches = itertools.islice(feeds, max_batches)
    seen: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    for batch, values in run_exposed(model, batches, exposed):
        if need:
            seen.append((batch, {t: values[t] for t in need}))
        values.update(batch)
        for s in partition.subgraphs:
            out[s.index].append({t: values[t] for t in s.inputs})
    if need:
        add_types(model, captured_types(model, seen, need))
    return out


def extract_all(model: onnx.ModelProto, partition: Partition) -> list[onnx.ModelProto]:
    """Every subgraph of ``partition`` extracted, in order (shape inference at most once)."""
    names = [t for s in partition.subgraphs for t in s.inputs + s.outputs]
    typed = with_types(model, names)
    return [extract(typed, s) for s in partition.subgraphs]
