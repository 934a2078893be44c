"""Normalise a model once, at load, so every later stage sees one convention.

Exporters differ in how they hold weights and which opset they target. The stages after
this one (layers, rewrite, sensitivity, partition) assume:

- every constant weight is a graph **initializer** (not a ``Constant`` node's attribute,
  not behind an ``Identity`` or a ``Cast`` of an initializer);
- the default-domain opset is at least 13, where DequantizeLinear takes a per-channel
  ``axis`` (onnx's version converter raises older models);
- a ``BatchNormalization`` right after a ``Conv``/``ConvTranspose`` is folded into the
  convolution's weight and bias, so the convolution is one quantizable layer whose weight
  is the weight that actually multiplies the activation (quantizing the un-folded weight
  and then scaling by the BN would give a different per-channel error than the plan
  predicts, and ONNX Runtime folds the BN anyway, after the QDQ nodes would block it);
- a zero ``Pad`` whose only reader is a ``Conv`` is folded into the convolution's pads (so an
  int8 convolution reads its 8-bit input directly, as the float one does once ONNX Runtime
  has fused the Pad);
- an ``Add`` of one constant per output channel after a convolution is folded into its bias
  (paddle2onnx's bias-less Conv + Add: the Add would sit between an int8 convolution and its
  QuantizeLinear);
- the element-wise hard-swish ``x * Clip(x + 3, 0, 6) / 6`` is one ``HardSwish`` (an opset-13
  model is raised to 14 for it), so its four passes over the activation become one;
- every node has a name (unnamed nodes get ``<op_type>_<index>`` from their index in the
  *original* file, before any node is removed, so plan names stay stable).

Gemm with ``transB``, grouped/depthwise convolutions and weights shared by several nodes
need no rewriting: :mod:`ampq_pass.core.ops` picks the output-channel axis from the op and its
attributes, and :mod:`ampq_pass.rewrite` emits one dequantized copy per (weight, format, axis).

Each rule is one small pass, shaped after onnx-ir's pass infrastructure
(``onnx_ir.passes``: ``PassBase``, ``PassResult``, ``PassManager``) but on
``onnx.ModelProto``: a pass takes the model and returns a :class:`PassResult` (the model,
whether it was modified, and the :class:`Change` records it made, each saying whether it is
exact or may move outputs by rounding). :data:`NORMALIZATION_PASSES` lists them, in order,
as data; :func:`normalize` runs them with a :class:`PassManager` and collects the changes
into a :class:`Normalized` record. Unlike onnx-ir's ``Sequential``, a failing pass's error
is not wrapped: an :class:`AmpqError` reaches the caller as the pass raised it.

After normalising, :func:`check_equivalent` runs the original and the normalised model in
ONNX Runtime on the same inputs and raises :class:`AmpqError` when their outputs differ.
"""

from __future__ import annotations

import abc
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ampq_pass.core.errors import AmpqError, first_line
from ampq_pass.core.graph import attribute, bodies, consumers, drop_unused_initializers, ensure_node_names
from ampq_pass.core.ops import OPS
from ampq_pass.core.ort import make_session
from ampq_pass.core.proto import default_opset, fits_protobuf, raise_opset
from ampq_pass.core.samples import synthetic_samples

#: DequantizeLinear's per-channel ``axis`` exists from opset 13 on.
MIN_OPSET = 13

#: relative and absolute tolerance of the equivalence check (BatchNorm folding reorders
#: float operations; the error it adds is ~1e-7 relative, far inside this).
RTOL, ATOL = 1e-4, 1e-5


@dataclass
class Normalized:
    """What :func:`normalize` did; ``exact`` is False when a change may move outputs by rounding."""

    changes: list[str] = field(default_factory=list)
    exact: bool = True
    #: whether a change may change how long a backend takes to run the model (not only how it
    #: is held): speed-ups over the normalised model then differ from speed-ups over the file
    timing: bool = False

    def add(self, message: str, *, exact: bool = True, timing: bool = False) -> None:
        self.changes.append(message)
        self.exact = self.exact and exact
        self.timing = self.timing or timing

    @property
    def changed(self) -> bool:
        return bool(self.changes)


# ----------------------------------------------------------------------------- pass infrastructure

@dataclass(frozen=True)
class Change:
    """One thing a pass did: ``message`` for the report; ``exact`` False when it may move outputs by
    rounding; ``timing`` True when it may change how long a backend takes (a Pad folded away)."""

    message: str
    exact: bool = True
    timing: bool = False


@dataclass
class PassResult:
    """Result of a pass (as ``onnx_ir.passes.PassResult``, plus what changed).

    Attributes
    ----------
    model : onnx.ModelProto
        The model after the pass (the input model itself for an in-place pass).
    modified : bool
        Whether the model differs from the pass's input.
    changes : list of Change
        What the pass reports; empty when ``modified`` is False (a pass may modify the
        model without reporting it, as :class:`DropUnusedInitializers` does).
    """

    model: onnx.ModelProto
    modified: bool
    changes: list[Change] = field(default_factory=list)


class NormalizationPass(abc.ABC):
    """Base class of a normalisation pass: ``pass_(model, source=...)`` returns a :class:`PassResult`.

    Subclasses implement :meth:`call`. ``in_place`` (a class attribute) says the pass
    changes ``model`` and returns that same object; a pass with ``in_place = False`` may
    return another model (the caller goes on with ``result.model``). ``source`` names the
    model in error messages. Each pass's docstring gives the definition it computes and,
    under Returns, when it reports ``modified`` and the change message it records.
    """

    in_place: ClassVar[bool] = True

    def __call__(self, model: onnx.ModelProto, /, *, source: str = "model") -> PassResult:
        result = self.call(model, source=source)
        if not isinstance(result, PassResult):
            raise TypeError(f"the pass {self!r} should return a PassResult, not {type(result).__name__}")
        if self.in_place and result.model is not model:
            raise RuntimeError(f"the pass {self!r} is declared in place but returned another model")
        if result.changes and not result.modified:
            raise RuntimeError(f"the pass {self!r} reported changes but modified=False")
        return result

    @abc.abstractmethod
    def call(self, model: onnx.ModelProto, *, source: str) -> PassResult:
        """Run the pass on ``model``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassManager:
    """Run ``passes`` in order, once each (as ``onnx_ir.passes.PassManager`` with ``steps=1``).

    Returns one :class:`PassResult`: the last pass's model, ``modified`` if any pass
    modified the model, and every pass's changes in order. Errors are not wrapped.
    """

    def __init__(self, passes: Sequence[NormalizationPass]):
        self.passes = tuple(passes)

    def __call__(self, model: onnx.ModelProto, /, *, source: str = "model") -> PassResult:
        modified, changes = False, []
        for pass_ in self.passes:
            result = pass_(model, source=source)
            model = result.model
            modified = modified or result.modified
            changes.extend(result.changes)
        return PassResult(model, modified, changes)


def _result(model: onnx.ModelProto, *changes: Change | None) -> PassResult:
    """A :class:`PassResult` with the given changes (``None`` ones skipped), modified iff any."""
    kept = [c for c in changes if c is not None]
    return PassResult(model, bool(kept), kept)


# ----------------------------------------------------------------------------- passes

class NameNodes(NormalizationPass):
    """Give every unnamed node of the main graph the name ``<op_type>_<index>``.

    For the nodes ``n_0, ..., n_{N-1}`` of the graph as given, an unnamed ``n_i`` is named
    ``f"{n_i.op_type}_{i}"`` (with ``_`` appended until the name is not taken), so the
    index is the node's position in the *original* graph, before later passes remove nodes.

    Returns
    -------
    PassResult
        ``modified`` iff some node had no name; one exact change
        ``"named <k> unnamed nodes <op>_<index>"``.

    Notes
    -----
    Runs first: plans refer to nodes by these names. See
    :func:`ampq_pass.core.graph.ensure_node_names`.
    """

    def call(self, model: onnx.ModelProto, *, source: str) -> PassResult:
        unnamed = sum(1 for n in model.graph.node if not n.name)
        if not unnamed:
            return _result(model)
        ensure_node_names(model)
        return _result(model, Change(f"named {unnamed} unnamed nodes <op>_<index>"))


class UpgradeOpset(NormalizationPass):
    """Raise the default-domain opset ``v`` of the model to ``max(v, MIN_OPSET)``.

    The model with opset ``v < MIN_OPSET`` (13, where DequantizeLinear has a per-channel
    ``axis``) is replaced by ``onnx.version_converter.convert_version(model, MIN_OPSET)``;
    a model with ``v >= MIN_OPSET`` is returned as it is.

    Parameters
    ----------
    model : onnx.ModelProto
        Above 2 GB converted without its weights and adopted in place; otherwise the
        converter returns a new model (so the pass is not ``in_place``).
    source : str
        Names the model in the error.

    Returns
    -------
    PassResult
        ``modified`` iff ``v < MIN_OPSET``; one inexact change
        ``"upgraded opset <v> -> 13 with onnx.version_converter"`` (the converter may
        rewrite ops in ways that round differently).

    Raises
    ------
    AmpqError
        When the converter fails (:func:`ampq_pass.core.proto.raise_opset`).

    Notes
    -----
    Runs before :class:`ConstantsToInitializers`: the converter turns opset-12 attributes
    (Squeeze ``axes``, ...) into ``Constant`` inputs, which that pass then moves into
    initializers like every other constant.
    """

    in_place = False

    def call(self, model: onnx.ModelProto, *, source: str) -> PassResult:
        old = default_opset(model)
        if old >= MIN_OPSET:
            return _result(model)
        converted = raise_opset(model, MIN_OPSET, why="per-channel QDQ", source=source)
        # the converter's adapters add nodes without names (Softmax 11 -> 13 becomes
        # Shape/Flatten/Softmax/Reshape); NameNodes ran before it, so name them here
        ensure_node_names(converted)
        return _result(converted, Change(f"upgraded opset {old} -> {MIN_OPSET} with onnx.version_converter",
                                         exact=False))


class ConstantsToInitializers(NormalizationPass):
    """Replace each ``Constant`` node of the main graph by an initializer under its output name.

    A node ``y = Constant(value=T)`` (or ``value_float``/``value_int``/``value_floats``/
    ``value_ints``, as float32/int64 tensors) of the default domain whose output ``y`` is
    not a graph output is removed and ``T`` named ``y`` is added as an initializer (also as
    a graph input when the IR version is below 4). String, sparse and other kinds stay nodes.

    Returns
    -------
    PassResult
        ``modified`` iff some node moved; one exact change
        ``"moved <k> Constant nodes into initializers"``.
    """

    def call(self, model: onnx.ModelProto, *, source: str) -> PassResult:
        graph = model.graph
        outputs = _graph_outputs(graph)
        keep, moved = [], 0
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
                tensor = _constant_node_value(node)
                if tensor is not None:
                    tensor.name = node.output[0]
                    _add_initializer(model, tensor)
                    moved += 1
                    continue
            keep.append(node)
        if not moved:
            return _result(model)
        del graph.node[:]
        graph.node.extend(keep)
        return _result(model, Change(f"moved {moved} Constant nodes into initializers"))


class FoldIdentityAndCast(NormalizationPass):
    """Fold ``Identity`` and ``Cast`` of initializers, to a fixpoint.

    For an initializer ``W`` and a node whose output ``y`` is not a graph output:

    - ``y = Identity(W)``: the node is removed and every reader of ``y`` (subgraph bodies
      included) reads ``W``;
    - ``y = Cast(W, to=t)`` with ``t`` and ``W``'s type numeric (``W`` may also be bool):
      the node is removed and the initializer ``y = W.astype(t)`` is added.

    Repeated until no node folds, so chains such as ``Constant -> Cast -> Identity`` fold too.

    Returns
    -------
    PassResult
        ``modified`` iff some node folded; exact changes
        ``"removed <k> Identity nodes of weights"`` and/or
        ``"folded <k> Cast nodes of weights into initializers"`` (the cast is the one ONNX
        Runtime would compute).

    Notes
    -----
    onnx has no public "fold constants" pass (onnxoptimizer / onnxsim do, but pull in
    their own protobuf builds and rewrite far more than weights), so these two rules are
    written here.
    """

    def call(self, model: onnx.ModelProto, *, source: str) -> PassResult:
        graph = model.graph
        outputs = _graph_outputs(graph)
        n_identity = n_cast = 0
        while True:
            inits = {t.name: t for t in graph.initializer}
            rename: dict[str, str] = {}
            keep = []
            for node in graph.node:
                src = node.input[0] if node.input else ""
                if node.op_type == "Identity" and src in inits and node.output[0] not in outputs:
                    rename[node.output[0]] = src
                    n_identity += 1
                    continue
                if node.op_type == "Cast" and src in inits and node.output[0] not in outputs:
                    to = next((a.i for a in node.attribute if a.name == "to"), None)
                    if to in _CAST_TARGETS and inits[src].data_type in (*_CAST_TARGETS, TensorProto.BOOL):
                        value = numpy_helper.to_array(inits[src]).astype(_CAST_TARGETS[to])
                        _add_initializer(model, numpy_helper.from_array(value, node.output[0]))
                        n_cast += 1
                        continue
                keep.append(node)
            if len(keep) == len(graph.node):
                break
            del graph.node[:]
            graph.node.extend(keep)
            _rename_inputs(graph, rename)
        return _result(model,
                       Change(f"removed {n_identity} Identity nodes of weights") if n_identity else None,
                       Change(f"folded {n_cast} Cast nodes of weights into initializers") if n_cast else None)


class FoldPadsIntoConvs(NormalizationPass):
    """Fold a zero ``Pad`` in front of a ``Conv`` into the convolution's ``pads``.

    For ``y = Pad(x, pads, value)`` of mode ``constant`` with ``value`` absent or 0, no
    ``axes`` input, ``pads = [b_0, ..., b_{r-1}, e_0, ..., e_{r-1}]`` known (an initializer,
    or computed from initializers only) with ``b_i, e_i >= 0`` and ``b_0 = b_1 = e_0 = e_1 = 0``
    (nothing padded on the batch and channel axes), whose only reader is ``z = Conv(y, ...)``
    (as input 0, ``auto_pad`` absent, ``NOTSET`` or ``VALID``) and ``y`` not a graph output:
    the Conv reads ``x`` and its pads become ``[p_j + b_{j+2}] + [q_j + e_{j+2}]`` for its own
    ``[p_j] + [q_j]`` (zeros when absent or ``VALID``), ``auto_pad`` dropped. The Pad, and the
    nodes that computed its ``pads`` when nothing else reads them, are removed.

    Returns
    -------
    PassResult
        ``modified`` iff some Pad folded; one exact change
        ``"folded <k> Pad nodes into convolutions (<pad> into <conv>, ...)"`` (zero padding
        inside the convolution adds the same zeros), marked ``timing``: ONNX Runtime does not
        fold every such Pad itself (HF EfficientNet-B0 runs 1.32x faster folded).

    Notes
    -----
    TensorFlow-style "same" padding exports a Pad, its pads computed by a chain of
    ConstantOfShape/Concat/Slice/Transpose/Cast from constants, before every strided (HF
    EfficientNet) or every (HF MobileNetV2) convolution. ONNX Runtime folds them into float
    convolutions itself (constant folding, then ``PadFusion``), but a Q/DQ between the Pad
    and the Conv stops that: the int8 model paid a Pad per convolution that the fp32 model
    did not. ``pads`` chains are evaluated with ``onnx.reference`` (onnx has no
    constant-folding pass; see :class:`FoldIdentityAndCast`).
    """

    #: a pads chain longer than this is not evaluated (exporters use about 12 nodes)
    MAX_CHAIN = 64

    def call(self, model: onnx.ModelProto, *, source: str) -> PassResult:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        readers = consumers(graph)
        outputs = _graph_outputs(graph)
        producer = {o: n for n in graph.node for o in n.output if o}
        removed: set[int] = set()
        chains: list[onnx.NodeProto] = []
        folded = []
        for pad in graph.node:
            if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx") or len(pad.input) < 2 or len(pad.input) > 3 \
                    and pad.input[3]:
                continue
            mode = attribute(pad, "mode", b"constant")
            y = pad.output[0]
            users = readers.get(y, [])
            if mode != b"constant" or y in outputs or len(users) != 1:
                continue
            conv = users[0]
            if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or list(conv.input).index(y) != 0 \
                    or conv.input[1:].count(y) or attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
                continue
            value = pad.input[2] if len(pad.input) > 2 else ""
            if value and (value not in inits or np.any(numpy_helper.to_array(inits[value]) != 0)):
                continue
            pads, chain = constant_value(model, pad.input[1], inits, producer, max_chain=self.MAX_CHAIN)
            pads = pads.astype(np.int64) if pads is not None and pads.dtype.kind in "iu" else None
            if pads is None:
                continue
            rank = pads.size // 2
            if pads.ndim != 1 or pads.size % 2 or rank < 3 or np.any(pads < 0) or np.any(pads[[0, 1, rank, rank + 1]] != 0):
                continue
            own = attribute(conv, "pads", None) if attribute(conv, "auto_pad", b"NOTSET") == b"NOTSET" else None
            own = np.zeros(2 * (rank - 2), np.int64) if own is None else np.asarray(own, np.int64)
            if own.size != 2 * (rank - 2):
                continue
            new = own + np.concatenate([pads[2:rank], pads[rank + 2:]])
            for a in list(conv.attribute):
                if a.name in ("pads", "auto_pad"):
                    conv.attribute.remove(a)
            conv.attribute.append(helper.make_attribute("pads", [int(v) for v in new]))
            conv.input[0] = pad.input[0]
            removed.add(id(pad))
            chains.extend(chain)
            folded.append(f"{pad.name} into {conv.name}")
        if not folded:
            return _result(model)
        _remove_nodes(graph, removed, chains, inits)
        return _result(model, Change(f"folded {len(folded)} Pad nodes into convolutions "
                                     f"({_first_three(folded)})", timing=True))

class FoldBiasAddsIntoConvs(NormalizationPass):
    """Fold ``Add(Conv(x, W, b), c)``, ``c`` one constant per output channel, into the bias.

    For a ``Conv``/``ConvTranspose`` with an initializer weight ``W`` (float, rank ``r``),
    its bias ``b`` absent or an initializer, whose output ``y`` is not a graph output and has
    one reader ``z = Add(y, c)`` (or ``Add(c, y)``) where ``c`` is an initializer or computed
    from initializers only (:func:`constant_value`), float, of rank at most ``r``, and of a
    shape that, right-aligned to rank ``r``, is 1 on every axis but axis 1 and there 1 or
    ``C_out`` (``W.shape[0]``; ``W.shape[1] * group`` for ConvTranspose): the convolution reads
    the bias ``b + c`` (computed in float64, stored in ``W``'s dtype as ``<conv>_biasfold``)
    and produces ``z``; the Add, and the nodes that computed ``c`` when nothing else reads
    them, are removed.

    Returns
    -------
    PassResult
        ``modified`` iff some Add folded; one inexact change
        ``"folded <k> per-channel Add nodes into convolution biases (<add> into <conv>, ...)"``
        (the constant is added inside the convolution: the float sum may round differently).

    Notes
    -----
    paddle2onnx writes every convolution with a bias as a bias-less Conv and an Add of
    the bias reshaped to ``[1, C, 1, 1]`` (PaddleOCR's detector: 18 of them). ONNX Runtime
    fuses them in a float model (``ConvAddFusion``), but in a QDQ model the Add sits between
    the convolution and its QuantizeLinear, and the convolution stays float.
    """

    #: a chain computing ``c`` longer than this is not evaluated
    MAX_CHAIN = 16

    def call(self, model: onnx.ModelProto, *, source: str) -> PassResult:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        readers = consumers(graph)
        outputs = _graph_outputs(graph)
        producer = {o: n for n in graph.node for o in n.output if o}
        removed: set[int] = set()
        chains: list[onnx.NodeProto] = []
        folded = []
        for conv in graph.node:
            if conv.op_type not in ("Conv", "ConvTranspose") or conv.domain not in ("", "ai.onnx") \
                    or len(conv.input) < 2 or conv.input[1] not in inits:
                continue
            y = conv.output[0]
            users = readers.get(y, [])
            if y in outputs or len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
                continue
            add = users[0]
            if len(add.input) != 2 or add.input[0] == add.input[1]:
                continue
            bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
            if bias is not None and bias not in inits:
                continue
            w = numpy_helper.to_array(inits[conv.input[1]])
            other = add.input[1] if add.input[0] == y else add.input[0]
            c, chain = constant_value(model, other, inits, producer, max_chain=self.MAX_CHAIN)
            if w.dtype.kind != "f" or c is None or c.dtype.kind != "f" or c.ndim > w.ndim:
                continue
            c_out = w.shape[0] if conv.op_type == "Conv" else w.shape[1] * attribute(conv, "group", 1)
            shape = (1,) * (w.ndim - c.ndim) + c.shape
            if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, c_out):
                continue
            b = numpy_helper.to_array(inits[bias]).astype(np.float64) if bias else np.zeros(c_out)
            name = f"{conv.name}_biasfold"
            new_b = numpy_helper.from_array((b + c.astype(np.float64).reshape(-1)).astype(w.dtype), name)
            graph.initializer.append(new_b)
            inits[name] = new_b
            if len(conv.input) > 2:
                conv.input[2] = name
            else:
                conv.input.append(name)
            conv.output[0] = add.output[0]  # the convolution now produces what the Add produced
            removed.add(id(add))
            chains.extend(chain)
            folded.append(f"{add.name} into {conv.name}")
        if not folded:
            return _result(model)
        _remove_nodes(graph, removed, chains, inits)
        return _result(model, Change(f"folded {len(folded)} per-channel Add nodes into convolution biases "
                                     f"({_first_three(folded)})", exact=False))


class FuseHardSwish(NormalizationPass):
    """Fuse the element-wise spelling of hard-swish and hard-sigmoid into one op.

    For a float tensor ``x`` and scalar constants ``a`` and ``b > 0`` (initializers), with
    ``h = Clip(Add(x, a), 0, b)`` (``Add`` operands in either order, ``Clip`` bounds given as
    inputs; or ``h = Clip(x, 0, b)`` and ``a = 0``):

    - ``Div(Mul(x, h), b)`` (``Mul`` in either order; ``Div(., b)`` or ``Mul(., 1/b)``)
      becomes ``HardSwish(x)`` when ``a = 3``, ``b = 6`` and the opset is at least 14 (an
      opset-13 model is raised to 14 when :func:`_raises_to_14_as_is`), else
      ``Mul(x, HardSigmoid(x, alpha=1/b, beta=a/b))``;
    - ``Div(h, b)`` becomes ``HardSigmoid(x, alpha=1/b, beta=a/b)``.

    Only where every intermediate tensor has that one reader and is not a graph output; the
    new nodes are named after the node whose output they produce (``<name>_hardsigmoid``).

    Returns
    -------
    PassResult
        ``modified`` iff some pattern fused; one inexact change
        ``"fused <k> element-wise hard-swish/hard-sigmoid patterns (<node>, ...)"`` (the op
        computes ``x/b + a/b`` where the pattern computed ``(x + a)/b``), marked ``timing``.

    Notes
    -----
    paddle2onnx (and torch's exporter below opset 14) writes MobileNetV3's hard-swish as
    four element-wise ops; ONNX Runtime fuses none of them, so each pass over the activation
    is paid four times, in a float model and between the Q/DQ of an int8 one alike.
    """

    def call(self, model: onnx.ModelProto, *, source: str) -> PassResult:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        readers = consumers(graph)
        outputs = _graph_outputs(graph)
        producer = {o: n for n in graph.node for o in n.output if o}
        # HardSwish is an opset-14 op; from 13 the import is raised to 14 where nothing changes
        # meaning (:func:`_raises_to_14_as_is`): OpenVINO fuses HardSwish as it fuses the four-op
        # pattern, but not x * HardSigmoid(x) (PaddleOCR's detector: 0.91x of the file with it, 1.01x
        # with HardSwish; ONNX Runtime 1.14x and 1.12x)
        swish = default_opset(model) >= 14 or (default_opset(model) == 13 and _raises_to_14_as_is(model))
        raised = False
        taken = {n.name for n in graph.node}

        def fresh(name):
            while name in taken:
                name += "_"
            taken.add(name)
            return name

        removed: set[int] = set()
        added: dict[int, list[onnx.NodeProto]] = {}  # id(last node of a pattern) -> its replacement
        fused = []

        def scalar(name):
            if name not in inits or inits[name].data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
                return None
            v = numpy_helper.to_array(inits[name])
            return float(v.reshape(-1)[0]) if v.size == 1 else None

        def only_reader(name, node):
            return name not in outputs and len(readers.get(name, [])) == 1 and readers[name][0] is node

        def divided(node):
            """The divisor when ``node`` is ``Div(t, b)`` or ``Mul(t, 1/b)`` of a scalar: (t, b)."""
            if node.op_type == "Div" and len(node.input) == 2 and scalar(node.input[1]):
                return node.input[0], scalar(node.input[1])
            if node.op_type == "Mul" and len(node.input) == 2:
                for t, c in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
                    if scalar(c):
                        return t, 1.0 / scalar(c)
            return None, None

        def hard_sigmoid_of(name):
            """``(x, a, b, nodes)`` when ``name`` is ``Clip(Add(x, a), 0, b)``, or ``Clip(x, 0, b)``
            with ``a = 0`` (an Add of a constant straight after a convolution is in its bias by now)."""
            clip = producer.get(name)
            if clip is None or clip.op_type != "Clip" or len(clip.input) != 3 or id(clip) in removed:
                return None
            lo, hi = scalar(clip.input[1]), scalar(clip.input[2])
            if lo != 0.0 or not hi or hi <= 0 or clip.input[0] in inits:
                return None
            add = producer.get(clip.input[0])
            if add is not None and add.op_type == "Add" and len(add.input) == 2 and id(add) not in removed \
                    and only_reader(add.output[0], clip):
                for x, c in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
                    if scalar(c) is not None and x not in inits:
                        return x, scalar(c), hi, [add, clip]
            return clip.input[0], 0.0, hi, [clip]

        for last in graph.node:
            if last.domain not in ("", "ai.onnx") or id(last) in removed:
                continue
            t, b = divided(last)
            if t is None or not only_reader(t, last):
                continue
            inner = producer.get(t)
            if inner is None or id(inner) in removed:
                continue
            y = last.output[0]
            got = hard_sigmoid_of(t)
            if got is not None and _same(got[2], b):                                 # Div(h, b)
                x, a, _, nodes = got
                new = [helper.make_node("HardSigmoid", [x], [y], name=fresh(f"{last.name}_hardsigmoid"), alpha=1.0 / b,
                                        beta=a / b)]
            elif inner.op_type == "Mul" and len(inner.input) == 2:                  # Div(Mul(x, h), b)
                for x, h in ((inner.input[0], inner.input[1]), (inner.input[1], inner.input[0])):
                    got = hard_sigmoid_of(h)
                    if got is not None and got[0] == x and _same(got[2], b) and only_reader(h, inner):
                        break
                else:
                    continue
                _, a, _, nodes = got
                nodes = nodes + [inner]
                if swish and _same(a, 3.0) and _same(b, 6.0):
                    new = [helper.make_node("HardSwish", [x], [y], name=fresh(f"{last.name}_hardswish"))]
                    raised = raised or default_opset(model) < 14
                else:
                    gate = f"{last.name}_hardsigmoid_out"
                    new = [helper.make_node("HardSigmoid", [x], [gate], name=fresh(f"{last.name}_hardsigmoid"),
                                            alpha=1.0 / b, beta=a / b),
                           helper.make_node("Mul", [x, gate], [y], name=last.name)]
            else:
                continue
            removed.update(id(n) for n in nodes)
            added[id(last)] = new
            fused.append(last.name)
        if not fused:
            return _result(model)
        if raised:
            for o in model.opset_import:
                if o.domain in ("", "ai.onnx"):
                    o.version = 14
        keep = []
        for n in graph.node:
            if id(n) in added:
                keep.extend(added[id(n)])
            elif id(n) not in removed:
                keep.append(n)
        del graph.node[:]
        graph.node.extend(keep)
        _drop_stale_value_info(graph, keep=set(inits))
        return _result(model, Change(f"fused {len(fused)} element-wise hard-swish/hard-sigmoid patterns "
                                     f"({_first_three(fused)})"
                                     + ("; opset 13 -> 14 for HardSwish" if raised else ""), exact=False, timing=True))


class FoldBatchNorms(NormalizationPass):
    """Fold ``BatchNormalization(Conv(x, W, b))`` into ``Conv(x, W', b')`` (inference mode).

    For a ``Conv``/``ConvTranspose`` whose only reader is an inference-mode
    ``BatchNormalization(gamma, beta, mean, var, epsilon=eps)`` with one output, and whose
    weight, bias (if any) and BN parameters are initializers (float weight)::

        s[o]  = gamma[o] / sqrt(var[o] + eps)
        W'[o] = W[o] * s[o]
        b'[o] = (b[o] - mean[o]) * s[o] + beta[o]      (b = 0 when the conv has no bias)

    computed in float64 and stored in ``W``'s dtype, ``o`` the output channel (axis 0 of
    a Conv weight; for ConvTranspose, whose weight is ``[C_in, C_out / group, ...]``,
    output channel ``g * C_out/group + j`` is ``W[g-th block of C_in, j]``: the op's
    :attr:`ampq_pass.core.ops.OPS` entry ``scale_output_channels`` does the scaling). The
    convolution reads ``W'`` (named ``<W>_bnfold_<bn>``) and ``b'`` (``<conv>_bnfold_bias``)
    and produces the BN's output; the BN node and stale ``value_info`` are removed.

    Parameters
    ----------
    model : onnx.ModelProto
        Changed in place. Folded weights get new names, so a weight shared with another
        node is untouched.

    Returns
    -------
    PassResult
        ``modified`` iff some BN folded; one inexact change
        ``"folded <k> BatchNormalization into convolutions (<bn> into <conv>, ...)"``
        (the fold reorders float operations).
    """

    def call(self, model: onnx.ModelProto, *, source: str) -> PassResult:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        readers = consumers(graph)
        outputs = _graph_outputs(graph)
        producer = {o: n for n in graph.node for o in n.output}
        removed: set[int] = set()
        folded = []
        for bn in graph.node:
            if bn.op_type != "BatchNormalization" or len(bn.output) != 1 and any(bn.output[1:]):
                continue
            if next((a.i for a in bn.attribute if a.name == "training_mode"), 0):
                continue
            conv = producer.get(bn.input[0])
            if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or len(conv.input) < 2:
                continue
            y = conv.output[0]
            if y in outputs or len(readers.get(y, [])) != 1 or conv.input[1] not in inits:
                continue
            params = bn.input[1:5]
            if len(params) != 4 or not all(p in inits for p in params):
                continue
            bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
            if bias is not None and bias not in inits:
                continue
            w = numpy_helper.to_array(inits[conv.input[1]])
            if w.dtype.kind != "f":
                continue
            gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
            eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            scale = gamma / np.sqrt(var + eps)
            w_new = OPS[conv.op_type].scale_output_channels(w.astype(np.float64), scale, conv)
            b = numpy_helper.to_array(inits[bias]).astype(np.float64) if bias else np.zeros_like(mean)
            b_new = (b - mean) * scale + beta
            w_name, b_name = f"{conv.input[1]}_bnfold_{bn.name}", f"{conv.name}_bnfold_bias"
            new_w = numpy_helper.from_array(w_new.astype(w.dtype), w_name)
            new_b = numpy_helper.from_array(b_new.astype(w.dtype), b_name)
            graph.initializer.extend([new_w, new_b])
            inits[w_name], inits[b_name] = new_w, new_b
            conv.input[1] = w_name
            if len(conv.input) > 2:
                conv.input[2] = b_name
            else:
                conv.input.append(b_name)
            conv.output[0] = bn.output[0]  # the Conv now produces what the BN produced
            removed.add(id(bn))
            folded.append(f"{bn.name} into {conv.name}")
        if not folded:
            return _result(model)
        keep = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)
        # value_info of the Conv's old output would now describe a dangling name
        _drop_stale_value_info(graph)
        return _result(model, Change(f"folded {len(folded)} BatchNormalization into convolutions "
                                     f"({_first_three(folded)})", exact=False))


class DropUnusedInitializers(NormalizationPass):
    """Remove the initializers that nothing reads.

    An initializer ``t`` of the main graph is removed when no node input, subgraph body
    input, graph output nor graph input is named ``t.name``
    (:func:`ampq_pass.core.graph.drop_unused_initializers`).

    Returns
    -------
    PassResult
        ``modified`` iff some initializer was removed; no change is reported (removing an
        unread tensor cannot change an output, and it is not worth a line in the report).

    Notes
    -----
    Runs last: the passes before it leave the weights they replaced unread.
    """

    def call(self, model: onnx.ModelProto, *, source: str) -> PassResult:
        return PassResult(model, drop_unused_initializers(model.graph) > 0)


#: The normalisation, in order (read at each :func:`normalize` call, so a test may replace it).
#: The converter runs before the Constant pass: it turns opset-12 attributes (Squeeze axes,
#: ...) into Constant inputs, which the next pass then moves into initializers.
NORMALIZATION_PASSES: tuple[NormalizationPass, ...] = (
    NameNodes(),
    UpgradeOpset(),
    ConstantsToInitializers(),
    FoldIdentityAndCast(),
    FoldPadsIntoConvs(),
    FoldBiasAddsIntoConvs(),
    FoldBatchNorms(),
    FuseHardSwish(),
    DropUnusedInitializers(),
)


def normalize(model: onnx.ModelProto, *, source: str = "model",
              passes: Sequence[NormalizationPass] | None = None) -> tuple[onnx.ModelProto, Normalized]:
    """Normalise ``model`` in place (and return it, possibly a converted copy) with what changed.

    Runs ``passes`` (default :data:`NORMALIZATION_PASSES`) with a :class:`PassManager`.
    """
    result = PassManager(NORMALIZATION_PASSES if passes is None else passes)(model, source=source)
    done = Normalized()
    for change in result.changes:
        done.add(change.message, exact=change.exact, timing=change.timing)
    return result.model, done


# ----------------------------------------------------------------------------- helpers

def _raises_to_14_as_is(model: onnx.ModelProto) -> bool:
    """Whether the default-domain import of an opset-13 model can read 14 with no node changed.

    Opset 14 changed Add/Sub/Mul/Div/Relu/Identity/CumSum (more types), Reshape (``allowzero``,
    default 0: the 13 behaviour), GRU/LSTM/RNN (``layout``, default 0: the 13 behaviour) and
    BatchNormalization, whose extra outputs exist only in training mode from 14 on: a
    BatchNormalization with more than one output is the one node that would change meaning.
    """
    def walk(g: onnx.GraphProto) -> bool:
        for n in g.node:
            if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") and sum(1 for o in n.output if o) > 1:
                return False
            if not all(walk(b) for b in bodies(n)):
                return False
        return True
    return walk(model.graph)


def _same(a: float, b: float) -> bool:
    """Equal up to float32 rounding (a divisor written as a multiplication by its inverse)."""
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b))


def _graph_outputs(graph: onnx.GraphProto) -> set[str]:
    return {o.name for o in graph.output}


def constant_value(model: onnx.ModelProto, name: str, inits: dict[str, TensorProto],
                   producer: dict[str, onnx.NodeProto], *, max_chain: int = 64
                   ) -> tuple[np.ndarray | None, list[onnx.NodeProto]]:
    """The value of tensor ``name`` when it is an initializer or computed from initializers only
    by at most ``max_chain`` default-domain nodes without bodies, and the nodes computing it
    (in graph order); ``(None, [])`` otherwise, or when ``onnx.reference`` cannot evaluate them.

    onnx has no constant-folding pass (see :class:`FoldIdentityAndCast`); the chains folded
    here are exporters' small shape computations (a Pad's pads, a bias reshaped for an Add).
    """
    if name in inits:
        return numpy_helper.to_array(inits[name]), []
    chain, todo, seen = [], [name], set()
    while todo:
        t = todo.pop()
        if t in inits or t in seen or not t:
            continue
        seen.add(t)
        node = producer.get(t)
        if node is None or node.domain not in ("", "ai.onnx") or bodies(node) or len(chain) >= max_chain:
            return None, []
        if all(node is not c for c in chain):
            chain.append(node)
        todo.extend(node.input)
    order = [n for n in model.graph.node if any(n is c for c in chain)]
    used = {i for n in order for i in n.input}
    sub = helper.make_graph(order, "constant", [], [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None)],
                            [inits[i] for i in used if i in inits])
    try:
        from onnx.reference import ReferenceEvaluator

        value = ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import,
                                                     ir_version=model.ir_version)).run(None, {})[0]
    except Exception:  # noqa: BLE001 - an op the reference cannot evaluate: the tensor is not known
        return None, []
    return np.asarray(value), order


def _remove_nodes(graph: onnx.GraphProto, removed: set[int], chains: list[onnx.NodeProto],
                  inits: dict[str, TensorProto]) -> None:
    """Remove the nodes whose ``id`` is in ``removed``, then the ``chains`` nodes nothing reads any
    more (to a fixpoint), and the ``value_info`` of tensors no node writes."""
    outputs = _graph_outputs(graph)
    keep = [n for n in graph.node if id(n) not in removed]
    chain_ids = {id(n) for n in chains}
    while True:
        read = {i for n in keep for i in n.input if i} | outputs
        for n in keep:
            for sub in bodies(n):
                read.update(i for b in sub.node for i in b.input)
        dead = [n for n in keep if id(n) in chain_ids and not any(o in read for o in n.output)]
        if not dead:
            break
        keep = [n for n in keep if all(n is not d for d in dead)]
    del graph.node[:]
    graph.node.extend(keep)
    _drop_stale_value_info(graph, keep=set(inits))


def _drop_stale_value_info(graph: onnx.GraphProto, keep: set[str] = frozenset()) -> None:
    """Remove the ``value_info`` of tensors no node writes any more (except the names in ``keep``)."""
    written = {o for n in graph.node for o in n.output}
    for v in [v for v in graph.value_info if v.name not in written and v.name not in keep]:
        graph.value_info.remove(v)


def _first_three(names: list[str]) -> str:
    """``"a, b, c, ..."``: the first three of ``names`` for a change message."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _add_initializer(model: onnx.ModelProto, tensor: TensorProto) -> None:
    model.graph.initializer.append(tensor)
    if model.ir_version < 4:  # before IR 4 an initializer must also be a graph input
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))


def _constant_node_value(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a ``Constant`` node produces, or None for kinds kept as nodes (strings, sparse)."""
    if len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        t = TensorProto()
        t.CopyFrom(attr.t)
        return t
    scalar = {"value_float": (lambda a: np.array(a.f, np.float32)), "value_int": (lambda a: np.array(a.i, np.int64)),
              "value_floats": (lambda a: np.array(list(a.floats), np.float32)),
              "value_ints": (lambda a: np.array(list(a.ints), np.int64))}
    if attr.name in scalar:
        return numpy_helper.from_array(scalar[attr.name](attr))
    return None


_CAST_TARGETS = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
                 TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT32: np.int32,
                 TensorProto.INT64: np.int64}


def _rename_inputs(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    if not rename:
        return

    def final(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    def walk(g: onnx.GraphProto) -> None:
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = final(name)
            for sub in bodies(node):  # If/Loop bodies may read outer-scope weights
                walk(sub)

    walk(graph)


# ----------------------------------------------------------------------------- equivalence

def probe_feeds(model: onnx.ModelProto, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Two random samples per input (symbolic dims 16), as :func:`synthetic_samples` makes them."""
    return dict(synthetic_samples(model, count=2, seed=seed, warn=False).inputs)


def _run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    # log level 4: failures come back as exceptions and become one line; no C++ log noise
    sess = make_session(model, optimize=False, log_level=4)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def check_equivalent(original: onnx.ModelProto | str, normalized: onnx.ModelProto, *, source: str = "model",
                     feeds: dict[str, np.ndarray] | None = None, rtol: float = RTOL, atol: float = ATOL) -> bool:
    """Raise :class:`AmpqError` if ``normalized`` gives other outputs than ``original`` on ``feeds``.

    ``original`` may be a file path (models above 2 GB are run from their file). Returns
    False, with a warning, when the *original* model cannot run on the probe inputs
    (random integers out of range for an embedding, say): then nothing can be compared.
    """
    feeds = feeds if feeds is not None else probe_feeds(normalized)
    try:
        ref = _run(original, feeds)
    except Exception as exc:  # onnxruntime's own exception types (or AmpqError from make_session)
        print(f"WARNING: {source}: normalisation not verified: the original model does not run on random probe "
              f"inputs ({first_line(exc, 200)})", file=sys.stderr)
        return False
    try:
        got = _run(normalized, feeds)
    except Exception as exc:
        raise AmpqError(f"{source}: the normalised model does not run in ONNX Runtime "
                        f"({first_line(exc, 200)})") from None
    for index, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            raise AmpqError(f"{source}: normalised model output #{index} has shape {list(b.shape)}, "
                            f"original {list(a.shape)}")
        if a.dtype.kind in "fc":
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            err = np.abs(a64 - b64)
            err = np.where(np.isnan(a64) & np.isnan(b64), 0.0, err)
            bound = atol + rtol * float(np.nanmax(np.abs(a64))) if a.size else 0.0
            worst = float(np.nanmax(err)) if a.size else 0.0
            if not worst <= bound:  # also catches NaN on one side only
                raise AmpqError(f"{source}: normalised model output #{index} differs from the original by "
                                f"{worst:.3g} (tolerance {bound:.3g}); normalisation is not exact for this model")
        elif not np.array_equal(a, b):
            raise AmpqError(f"{source}: normalised model output #{index} differs from the original")
    return True


def normalize_checked(model: onnx.ModelProto, *, source: str = "model", original_path: str | None = None,
                      feeds: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, Normalized]:
    """:func:`normalize` and, when something changed, :func:`check_equivalent` against the original.

    The original is kept as serialised bytes (or, above 2 GB, read again from
    ``original_path`` by ONNX Runtime) so no second proto copy is held in memory.
    Changes that only move bytes (Constant/Identity to initializer, node names) are exact
    by construction and are not re-run on large models.
    """
    small = fits_protobuf(model)
    before = model.SerializeToString() if small else None
    model, done = normalize(model, source=source)
    if not done.changed:
        return model, done
    if small:
        original = onnx.load_from_string(before)
        del before
        check_equivalent(original, model, source=source, feeds=feeds)
    elif not done.exact and original_path is not None:
        check_equivalent(os.fspath(original_path), model, source=source, feeds=feeds)
    return model, done
