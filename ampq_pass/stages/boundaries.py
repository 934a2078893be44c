"""Boundary states of cut tensors (design.md §3 "Boundary states").

The paper times every subgraph alone with high-precision cut tensors, so gains add up.
On CNNs they do not: when a layer next to a cut is int8, the rewritten model quantizes the
cut tensor itself (a QLinearConv's uint8 output, or the next layer's input Q), and the
runtime then fuses across the cut - it moves the QuantizeLinear over a MaxPool, runs ops
between in uint8, and changes layout there - none of which a subgraph timed with a float
input and a float output sees.

So every cut tensor has a *state*: ``hp``, or ``int8`` when the plan quantizes it. The
state is not a free choice: it follows from the formats of the layers on both sides
(:func:`forces`): a cut is int8 exactly when its producer layer's format quantizes its
output or a layer reading it quantizes it as its activation (a free Q/DQ at a cut would
only add error). In the rewritten model an int8 cut holds one Q->DQ that every reader reads
(:func:`ampq_pass.stages.rewrite.rewrite` with ``plan.cuts``), and a subgraph is timed with
that boundary as the runtime sees it (:func:`split_at_cuts`): the producer's subgraph ends
at the QuantizeLinear and returns uint8, the consumer's starts at the DequantizeLinear and
reads uint8. Each Q/DQ is then timed in exactly one subgraph, and given the states the
subgraphs' times add up to the model's again. A subgraph's configuration is its layers'
formats *and* the states of its cuts (:func:`with_states`); the integer program links the
two sides of every cut (:mod:`ampq_pass.stages.solve`). With every cut ``hp`` this is the
paper's model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import FORMATS, HP
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.partition import Partition

#: the one non-hp state: the format whose activation Q/DQ a cut carries. Only int8 is fused
#: across ops by the runtimes here (fp8 Q/DQ runs as separate ops on ORT's CPU EP).
STATE = "int8"


@dataclass(frozen=True)
class Cut:
    """A cut tensor that can carry ``int8``: made by subgraph ``producer`` (by layer
    ``producer_layer`` when a layer makes it) and read by subgraph ``consumer`` only
    (layers ``readers`` read it as an activation)."""

    tensor: str
    producer: int
    consumer: int
    producer_layer: str | None
    readers: tuple[str, ...]


def boundary_cuts(model: onnx.ModelProto, partition: Partition, layers: list[Layer]) -> dict[str, Cut]:
    """The cuts of ``partition`` that can be int8: read by exactly one later subgraph, not a
    model output (a model output stays float), and next to a layer that can take ``int8``
    on at least one side. Other cuts are always ``hp``."""
    outputs = {o.name for o in model.graph.output}
    by_output = {l.output: l for l in layers}
    by_name = {l.name: l for l in layers}
    out: dict[str, Cut] = {}
    for tensor in partition.cuts:
        if tensor in outputs:
            continue
        made = [s.index for s in partition.subgraphs if tensor in s.outputs]
        read = [s.index for s in partition.subgraphs if tensor in s.inputs]
        if len(made) != 1 or len(read) != 1:
            continue
        consumer = partition.subgraphs[read[0]]
        readers = tuple(l.name for l in layers if l.name in consumer.layers and tensor in l.activations)
        maker = by_output.get(tensor)
        producer_layer = maker.name if maker is not None and maker.name in partition.subgraphs[made[0]].layers else None
        cut = Cut(tensor, made[0], read[0], producer_layer, readers)
        if can_force(cut, by_name):
            out[tensor] = cut
    return out


def _forces_with(cut: Cut, layer: Layer, fmt_name: str) -> bool:
    if fmt_name != STATE:
        return False
    fmt = FORMATS[fmt_name]
    if layer.name == cut.producer_layer:
        return fmt.quantizes_output(layer.op_type)
    return layer.name in cut.readers and cut.tensor in fmt.calibrated_tensors(layer)


def forces(cut: Cut, formats: dict[str, str], layers: dict[str, Layer], side: int) -> bool:
    """Whether the layers of subgraph ``side`` (the cut's producer or consumer) with
    ``formats`` quantize the cut tensor themselves."""
    names = [cut.producer_layer] if side == cut.producer else list(cut.readers)
    return any(n is not None and _forces_with(cut, layers[n], formats.get(n, HP)) for n in names)


def joins(cut: Cut, formats: dict[str, str], layers: dict[str, Layer], side: int) -> bool:
    """Whether subgraph ``side`` computes in int8 at the cut, so that an int8 cut passes int8 on
    between int8 work (the runtime keeps its int8 layout across it): the consumer when its
    layers quantize the cut; the producer when the layer that makes the cut runs int8, or, when
    non-layer ops (Relu, Add, pooling) make it, when any of its layers does."""
    if side == cut.consumer:
        return forces(cut, formats, layers, side)
    if cut.producer_layer is not None:
        return formats.get(cut.producer_layer, HP) == STATE
    return any(f == STATE for f in formats.values())


def can_force(cut: Cut, layers: dict[str, Layer], candidates: dict[str, list[str]] | None = None, *,
              side: int | None = None) -> bool:
    """Whether some candidate format of a layer next to the cut (on ``side`` only, when given)
    quantizes it."""
    names = []
    if side in (None, cut.producer) and cut.producer_layer is not None:
        names.append(cut.producer_layer)
    if side in (None, cut.consumer):
        names.extend(cut.readers)
    pick = (lambda n: candidates.get(n, ())) if candidates is not None else (lambda n: layers[n].formats)
    return any(_forces_with(cut, layers[n], f) for n in names for f in pick(n))


def with_states(index: int, configs: list[dict[str, str]], cuts: dict[str, Cut], layers: dict[str, Layer],
                candidates: dict[str, list[str]]) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Every ``(formats, states)`` of subgraph ``index`` the whole model can have.

    A cut this configuration quantizes is ``int8``; one it does not is ``hp``, or ``int8``
    too when the neighbour on the other side can quantize it (then this side is timed with
    the neighbour's Q or DQ at its edge). All-hp formats with all-hp states come first.
    """
    mine = [c for c in cuts.values() if index in (c.producer, c.consumer)]
    out = []
    for formats in configs:
        choices = []
        for cut in mine:
            other = cut.consumer if index == cut.producer else cut.producer
            if forces(cut, formats, layers, index):
                choices.append([STATE])
            elif can_force(cut, layers, candidates, side=other):
                choices.append([HP, STATE])
            else:
                choices.append([HP])
        for picked in itertools.product(*choices):
            out.append((formats, {c.tensor: s for c, s in zip(mine, picked)}))
    return out


def forced_cuts(cuts: dict[str, Cut], formats: dict[str, str], layers: dict[str, Layer]) -> dict[str, str]:
    """The states that ``formats`` give the cuts (a plan's ``cuts``): ``int8`` where a layer
    on either side quantizes the tensor, nothing (``hp``) elsewhere."""
    return {t: STATE for t, c in cuts.items()
            if forces(c, formats, layers, c.producer) or forces(c, formats, layers, c.consumer)}


# --------------------------------------------------------------------------- timing models

def feed_name(tensor: str) -> str:
    """Name of the uint8 graph input that replaces an int8 input cut in a timed subgraph."""
    return f"{tensor}__{STATE}"


def split_at_cuts(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """Move a rewritten subgraph's edges past the Q/DQ of its int8 cuts (in place; returned).

    For an input cut, its QuantizeLinear is removed and the quantized tensor becomes a uint8
    graph input (:func:`feed_name`); for an output cut, its DequantizeLinear is removed and
    the quantized tensor becomes the graph output. That QuantizeLinear is timed in the
    producer's subgraph and that DequantizeLinear in the consumer's, as in the whole model.
    """
    g = model.graph
    for tensor in inputs:
        readers = [n for n in g.node if tensor in n.input]
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            raise AmpqError(f"int8 input cut {tensor!r}: expected one QuantizeLinear reading it, found "
                            f"{[n.op_type for n in readers]}")
        q = readers[0]
        quantized = q.output[0]
        g.node.remove(q)
        for n in g.node:
            for i, name in enumerate(n.input):
                if name == quantized:
                    n.input[i] = feed_name(tensor)
        _as_uint8(g.input, tensor, feed_name(tensor))
    for tensor in outputs:
        makers = [n for n in g.node if tensor in n.output]
        if len(makers) != 1 or makers[0].op_type != "DequantizeLinear":
            raise AmpqError(f"int8 output cut {tensor!r}: expected a DequantizeLinear making it, found "
                            f"{[n.op_type for n in makers]}")
        dq = makers[0]
        if any(tensor in n.input for n in g.node):
            raise AmpqError(f"int8 output cut {tensor!r} is also read inside its subgraph")
        g.node.remove(dq)
        _as_uint8(g.output, tensor, dq.input[0])
    return model


def _as_uint8(values, old: str, new: str) -> None:
    """Replace graph input/output ``old`` by a uint8 one named ``new`` of the same shape, in place."""
    value = next(v for v in values if v.name == old)
    typed = helper.make_tensor_value_info(new, TensorProto.UINT8, None)
    typed.type.tensor_type.shape.CopyFrom(value.type.tensor_type.shape)
    values.insert(list(values).index(value), typed)
    values.remove(value)


def quantized_feeds(batches: list[dict[str, np.ndarray]], tensors: list[str], ranges: Ranges | None) -> list[dict[str, np.ndarray]]:
    """``batches`` with, for each int8 input cut, its captured value quantized as the cut's
    QuantizeLinear would (uint8, the calibrated scale and zero point; numpy's ``rint``
    rounds half to even like the operator) under :func:`feed_name`."""
    if not tensors:
        return batches
    params = {}
    for t in tensors:
        if ranges is None or t not in ranges:
            raise AmpqError(f"no calibrated range for cut tensor {t!r}; calibrate before timing")
        params[t] = FORMATS[STATE].activation_params(*ranges[t])
    out = []
    for b in batches:
        extra = {}
        for t, (scale, zp) in params.items():
            x = b[t].astype(np.float32)
            extra[feed_name(t)] = np.clip(np.rint(x / scale) + np.float32(zp), 0, 255).astype(np.uint8)
        out.append({**b, **extra})
    return out
