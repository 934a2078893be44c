"""Protobuf-level helpers for ONNX models of any size: size without serialising, copies
without weights, opset conversion and shape inference that work above protobuf's 2 GB limit.

Everything here works on ``onnx.ModelProto`` alone; nothing knows about layers or stages.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

from ampq_pass.core.errors import AmpqError, first_line

# Above this size a ModelProto cannot be serialised in one piece (protobuf's 2 GB limit),
# so tensors go to an external-data file beside the model.
PROTOBUF_LIMIT = 2**31 - 1 - 2**20

#: doc_string prefix of every value_info entry the pass adds to its working model (types
#: from onnx shape inference, from captured tensors): the stages need them, a written model
#: does not, so :func:`pass_types_removed` takes them out while it is saved.
PASS_TYPE = "ampq-pass:"
#: doc_string of the value_info entries :func:`infer_shapes_safe` adds
INFERRED_TYPE = f"{PASS_TYPE} inferred by onnx shape inference"


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version, 0 when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy (callers that must not copy >2 GB models use :func:`stripped_copy`)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def raise_opset(model: onnx.ModelProto, opset: int, *, why: str, source: str = "model") -> onnx.ModelProto:
    """``model`` converted to ``opset`` with onnx's version converter when it is older.

    A converter failure is the user's model's limit, so it becomes one :class:`AmpqError`
    naming ``source`` and ``why`` the opset is needed.
    """
    old = default_opset(model)
    if old >= opset:
        return model
    try:
        return convert_opset(model, opset)
    except Exception as exc:  # the converter raises RuntimeError / ValueError / ConvertError
        raise AmpqError(f"{source}: opset {old} must be raised to {opset} ({why}) and onnx's "
                        f"version converter failed: {first_line(exc)}") from None


def fits_protobuf(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serialises below protobuf's 2 GB limit.

    Not ``model.ByteSize()``: the upb protobuf runtime computes it by serialising the
    whole message, which on a 2.5 GB model takes seconds and a second 2.5 GB buffer
    (measured). The size is dominated by tensor bytes, which dims and dtype give for free;
    everything else is sized per node / per small tensor, with a margin for framing.
    """
    return approx_size(model) < PROTOBUF_LIMIT


def approx_size(model: onnx.ModelProto) -> int:
    """Serialised size of ``model``, computed without serialising its weights."""
    total = 0
    for t in model.graph.initializer:
        n = expected_bytes(t) if t.HasField("raw_data") else None
        total += (n + 64 + len(t.name) + 8 * len(t.dims)) if n is not None else t.ByteSize()
    for node in model.graph.node:
        total += node.ByteSize()  # Constant nodes hold their tensors here
    for field in (model.graph.input, model.graph.output, model.graph.value_info):
        total += sum(v.ByteSize() for v in field)
    return total + 4096


def expected_bytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.data_type in (onnx.TensorProto.STRING,) or itemsize == 0:
        return None
    n = 1
    for d in tensor.dims:
        n *= int(d)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * itemsize


def stripped_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers keep name, dims and type but no data.

    Built field by field: ``CopyFrom`` followed by clearing would hold a second copy of
    every weight for a moment, which is exactly what >2 GB models cannot afford.
    """
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            set_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            set_field(out.graph, fd, value)
    for t in model.graph.initializer:
        s = out.graph.initializer.add()
        s.name, s.data_type = t.name, t.data_type
        s.dims.extend(t.dims)
    return out


def set_field(target, fd, value) -> None:
    """Copy one protobuf field (as listed by ``ListFields``) into ``target``."""
    if fd.is_repeated:
        getattr(target, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)


def adopt_structure(model: onnx.ModelProto, converted: onnx.ModelProto) -> onnx.ModelProto:
    """Give ``model`` (in place) everything of ``converted`` except the weights it already holds.

    ``converted`` came from :func:`stripped_copy` of ``model``: its initializers with the same
    name, dims and no data stand for ``model``'s own, which stay where they are (no copy);
    initializers the converter created or changed are taken over, ones it dropped go.
    """
    mine = {t.name: t for t in model.graph.initializer}
    theirs = []
    for t in converted.graph.initializer:
        orig = mine.get(t.name)
        placeholder = orig is not None and list(t.dims) == list(orig.dims) and t.data_type == orig.data_type \
            and not (t.raw_data or t.float_data or t.int32_data or t.int64_data or t.double_data)
        theirs.append((t.name, None if placeholder else t))
    keep_names = {name for name, t in theirs if t is None}
    drop = [t for t in model.graph.initializer if t.name not in keep_names]
    for t in drop:
        model.graph.initializer.remove(t)
    for _, t in theirs:
        if t is not None:
            model.graph.initializer.add().CopyFrom(t)
    for fd, value in converted.graph.ListFields():
        if fd.name != "initializer":
            model.graph.ClearField(fd.name)
            set_field(model.graph, fd, value)
    for fd in model.DESCRIPTOR.fields:
        if fd.name != "graph":
            model.ClearField(fd.name)
    for fd, value in converted.ListFields():
        if fd.name != "graph":
            set_field(model, fd, value)
    return model


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx's version converter. Models above 2 GB are converted without their weights (the
    converter serialises the proto) and the result is adopted in place by ``model``."""
    from onnx import version_converter

    if fits_protobuf(model):
        return version_converter.convert_version(model, opset)
    converted = version_converter.convert_version(stripped_copy(model), opset)
    return adopt_structure(model, converted)


def infer_shapes_safe(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference; models above 2 GB are inferred without serialising them whole.

    The value_info entries inference adds are marked :data:`INFERRED_TYPE`, so that the model
    the pass writes keeps only the input's own (a user's model should not come back with
    hundreds of entries it did not have)."""
    own = {v.name for v in model.graph.value_info}
    if fits_protobuf(model):
        out = onnx.shape_inference.infer_shapes(model, data_prop=True)
    else:
        # Above the protobuf limit: infer on a weight-less copy and graft the value_info back.
        inferred = onnx.shape_inference.infer_shapes(stripped_copy(model), data_prop=False)
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
        out = model
    for value in out.graph.value_info:
        if value.name not in own:
            value.doc_string = INFERRED_TYPE
    return out


@contextlib.contextmanager
def pass_types_removed(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """``model`` without the value_info entries the pass added (doc_string :data:`PASS_TYPE`...)
    while the block runs, with them back afterwards: in place, because a copy of a large
    model only to drop some small entries would double its memory at the moment it is saved."""
    entries = list(model.graph.value_info)
    keep = [v for v in entries if not v.doc_string.startswith(PASS_TYPE)]
    if len(keep) == len(entries):
        yield model
        return
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    try:
        yield model
    finally:
        del model.graph.value_info[:]
        model.graph.value_info.extend(entries)


def save_external(model: onnx.ModelProto, path: str | os.PathLike, location: str) -> None:
    """Save with all tensors in one external file ``location`` beside ``path``.

    onnx's saver moves the tensors out of the in-memory proto; they are read back so the
    caller's model is unchanged (copying a >2 GB model first would double peak memory).
    """
    from onnx.external_data_helper import load_external_data_for_model

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    load_external_data_for_model(model, str(Path(path).parent))
