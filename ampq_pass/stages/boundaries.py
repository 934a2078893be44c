"""Boundary states of cut tensors (design.md §3 "Boundary states").

The paper times every subgraph alone with high-precision cut tensors, so gains add up.
On CNNs they do not: when a layer next to a cut is int8, the rewritten model quantizes the
cut tensor itself (a QLinearConv's uint8 output, or the next layer's input Q), and the
runtime then fuses across the cut - it moves the QuantizeLinear over a MaxPool, runs ops
between in uint8, and changes layout there - none of which a subgraph timed with a float
input and a float output sees.

So every cut tensor has a *state*: ``hp``, or the 8-bit format (``int8``, or ``int8_sym`` where
the backend wants symmetric activations) whose Q/DQ it carries when the plan quantizes it. The
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
from onnx import helper

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import CUT_STATES, FORMATS, HP
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.partition import Partition

#: the non-hp states: the formats whose activation Q/DQ a cut can carry. Only 8-bit integer
#: Q/DQ is fused across ops by the runtimes here (fp8 Q/DQ runs as separate ops on ORT's CPU EP).
STATES = CUT_STATES


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
    if fmt_name not in STATES:
        return False
    fmt = FORMATS[fmt_name]
    if layer.name == cut.producer_layer:
        return fmt.quantizes_output(layer.op_type)
    return layer.name in cut.readers and cut.tensor in fmt.calibrated_tensors(layer)


def forced_states(cut: Cut, formats: dict[str, str], layers: dict[str, Layer], side: int) -> set[str]:
    """The states the layers of subgraph ``side`` (the cut's producer or consumer) with
    ``formats`` give the cut tensor by quantizing it themselves (empty: they do not; two:
    readers in different 8-bit formats, which no single Q/DQ on the cut can serve)."""
    names = [cut.producer_layer] if side == cut.producer else list(cut.readers)
    return {formats[n] for n in names if n is not None and _forces_with(cut, layers[n], formats.get(n, HP))}


def forces(cut: Cut, formats: dict[str, str], layers: dict[str, Layer], side: int) -> bool:
    """Whether the layers of subgraph ``side`` (the cut's producer or consumer) with
    ``formats`` quantize the cut tensor themselves."""
    return bool(forced_states(cut, formats, layers, side))


def joins(cut: Cut, formats: dict[str, str], layers: dict[str, Layer], side: int, state: str) -> bool:
    """Whether subgraph ``side`` computes in ``state`` at the cut, so that a cut in that state
    passes 8-bit data on between 8-bit work (the runtime keeps its layout across it): the
    consumer when its layers quantize the cut; the producer when the layer that makes the cut
    runs in ``state``, or, when non-layer ops (Relu, Add, pooling) make it, when any of its
    layers does."""
    if side == cut.consumer:
        return state in forced_states(cut, formats, layers, side)
    if cut.producer_layer is not None:
        return formats.get(cut.producer_layer, HP) == state
    return any(f == state for f in formats.values())


def forceable_states(cut: Cut, layers: dict[str, Layer], candidates: dict[str, list[str]] | None = None, *,
                     side: int | None = None) -> list[str]:
    """The states some candidate format of a layer next to the cut (on ``side`` only, when
    given) gives it, in :data:`STATES` order."""
    names = []
    if side in (None, cut.producer) and cut.producer_layer is not None:
        names.append(cut.producer_layer)
    if side in (None, cut.consumer):
        names.extend(cut.readers)
    pick = (lambda n: candidates.get(n, ())) if candidates is not None else (lambda n: layers[n].formats)
    found = {f for n in names for f in pick(n) if _forces_with(cut, layers[n], f)}
    return [s for s in STATES if s in found]


def can_force(cut: Cut, layers: dict[str, Layer], candidates: dict[str, list[str]] | None = None, *,
              side: int | None = None) -> bool:
    """Whether some candidate format of a layer next to the cut (on ``side`` only, when given)
    quantizes it."""
    return bool(forceable_states(cut, layers, candidates, side=side))


def with_states(index: int, configs: list[dict[str, str]], cuts: dict[str, Cut], layers: dict[str, Layer],
                candidates: dict[str, list[str]]) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Every ``(formats, states)`` of subgraph ``index`` the whole model can have.

    A cut this configuration quantizes is in its layers' 8-bit format; one it does not is
    ``hp``, or any state the neighbour on the other side can give it (then this side is timed
    with the neighbour's Q or DQ at its edge). A configuration whose layers would quantize one
    cut in two formats has no Q/DQ to time and is left out. All-hp formats with all-hp states
    come first.
    """
    mine = [c for c in cuts.values() if index in (c.producer, c.consumer)]
    out = []
    for formats in configs:
        choices = []
        for cut in mine:
            other = cut.consumer if index == cut.producer else cut.producer
            forced = forced_states(cut, formats, layers, index)
            if forced:
                choices.append(sorted(forced))
            else:
                choices.append([HP, *forceable_states(cut, layers, candidates, side=other)])
        if any(len(c) > 1 and HP not in c for c in choices):
            continue
        for picked in itertools.product(*choices):
            out.append((formats, {c.tensor: s for c, s in zip(mine, picked)}))
    return out


def forced_cuts(cuts: dict[str, Cut], formats: dict[str, str], layers: dict[str, Layer]) -> dict[str, str]:
    """The states that ``formats`` give the cuts (a plan's ``cuts``): the 8-bit format of the
    layers on either side that quantize the tensor, nothing (``hp``) elsewhere. Both sides
    agree in a plan the solver made (its linking constraints); where they do not, the
    producer's wins (one Q/DQ on the cut)."""
    out = {}
    for t, c in cuts.items():
        states = forced_states(c, formats, layers, c.producer) or forced_states(c, formats, layers, c.consumer)
        if states:
            out[t] = max(states)  # one state: two only where readers disagree, which the solver never picks
    return out


# --------------------------------------------------------------------------- timing models

def feed_name(tensor: str, state: str, elem_type: int) -> str:
    """Name of the 8-bit graph input of element type ``elem_type`` (uint8 or int8) that replaces
    an input cut in ``state`` in a timed subgraph. The type is part of the name because a
    backend may read a format's int8 codes as uint8 ones (:func:`ampq_pass.stages.fusion.recode_unsigned`)."""
    return f"{tensor}__{state}__{helper.tensor_dtype_to_np_dtype(elem_type).name}"


def split_at_cuts(model: onnx.ModelProto, inputs: dict[str, str], outputs: list[str]) -> onnx.ModelProto:
    """Move a rewritten subgraph's edges past the Q/DQ of its 8-bit cuts (in place; returned).

    For an input cut (``inputs``: tensor -> state), its QuantizeLinear is removed and the
    quantized tensor becomes an 8-bit graph input (:func:`feed_name`); for an output cut, its
    DequantizeLinear is removed and the quantized tensor becomes the graph output. That
    QuantizeLinear is timed in the producer's subgraph and that DequantizeLinear in the
    consumer's, as in the whole model. The 8-bit type is the zero point's (uint8 or int8).
    """
    g = model.graph
    zero_type = {t.name: t.data_type for t in g.initializer}
    for tensor, state in inputs.items():
        readers = [n for n in g.node if tensor in n.input]
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            raise AmpqError(f"int8 input cut {tensor!r}: expected one QuantizeLinear reading it, found "
                            f"{[n.op_type for n in readers]}")
        q = readers[0]
        quantized = q.output[0]
        g.node.remove(q)
        fed = feed_name(tensor, state, zero_type[q.input[2]])
        for n in g.node:
            for i, name in enumerate(n.input):
                if name == quantized:
                    n.input[i] = fed
        _as_quantized(g.input, tensor, fed, zero_type[q.input[2]])
    for tensor in outputs:
        makers = [n for n in g.node if tensor in n.output]
        if len(makers) != 1 or makers[0].op_type != "DequantizeLinear":
            raise AmpqError(f"int8 output cut {tensor!r}: expected a DequantizeLinear making it, found "
                            f"{[n.op_type for n in makers]}")
        dq = makers[0]
        if any(tensor in n.input for n in g.node):
            raise AmpqError(f"int8 output cut {tensor!r} is also read inside its subgraph")
        g.node.remove(dq)
        _as_quantized(g.output, tensor, dq.input[0], zero_type[dq.input[2]])
    return model


def _as_quantized(values, old: str, new: str, elem_type: int) -> None:
    """Replace graph input/output ``old`` by one of ``elem_type`` named ``new`` of the same shape, in place."""
    value = next(v for v in values if v.name == old)
    typed = helper.make_tensor_value_info(new, elem_type, None)
    typed.type.tensor_type.shape.CopyFrom(value.type.tensor_type.shape)
    values.insert(list(values).index(value), typed)
    values.remove(value)


def quantized_feeds(batches: list[dict[str, np.ndarray]], cuts: list[tuple[str, str]],
                    ranges: Ranges | None) -> list[dict[str, np.ndarray]]:
    """``batches`` with, for each 8-bit input cut ``(tensor, state)``, its captured value
    quantized as the cut's QuantizeLinear would (the state's format with the calibrated range:
    :meth:`ampq_pass.core.formats.Int8.activation_codes`) under :func:`feed_name`; int8 codes
    also as the uint8 codes of the same values (+ 128), for a subgraph whose backend reads them so."""
    if not cuts:
        return batches
    for t, _ in cuts:
        if ranges is None or t not in ranges:
            raise AmpqError(f"no calibrated range for cut tensor {t!r}; calibrate before timing")
    out = []
    for b in batches:
        fed = dict(b)
        for t, st in cuts:
            codes = FORMATS[st].activation_codes(b[t], *ranges[t])
            fed[feed_name(t, st, helper.np_dtype_to_tensor_dtype(codes.dtype))] = codes
            if codes.dtype == np.int8:
                fed[feed_name(t, st, onnx.TensorProto.UINT8)] = (codes.astype(np.int16) + 128).astype(np.uint8)
        out.append(fed)
    return out
