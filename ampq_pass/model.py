"""Load and save ONNX models: clear errors on bad files, atomic writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import AmpqError

# Above this size a ModelProto cannot be serialised in one piece (protobuf's 2 GB limit),
# so tensors go to an external-data file beside the model.
_PROTOBUF_LIMIT = 2**31 - 1 - 2**20


def load_model(path: str | os.PathLike, *, infer_shapes: bool = True, normalize: bool = True,
               changes: list[str] | None = None) -> onnx.ModelProto:
    """Read an ONNX model with its external data, check it, normalise it and run shape inference.

    Normalisation (:mod:`ampq_pass.normalize`: weights to initializers, opset >= 13,
    BatchNorm folded into convolutions) happens here, once, for every command; what it did
    is appended to ``changes``, and a normalised model whose outputs differ from the
    original's raises. Raises :class:`AmpqError` naming the file for a missing file, a file
    that is not (or not entirely) an ONNX model, and missing external data.
    """
    path = Path(path)
    if not path.is_file():
        raise AmpqError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise AmpqError(f"{path}: not an ONNX model or truncated (protobuf parse failed: {_first_line(exc)})") from None
    except OSError as exc:
        raise AmpqError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not model.graph.node:
        raise AmpqError(f"{path}: not an ONNX model or truncated (no graph nodes were read)")
    _check_names(model, path)
    _check_external_refs(model, path)
    _check(model, path)
    _load_external(model, path)
    if normalize:
        from .normalize import normalize_checked

        try:
            model, done = normalize_checked(model, source=str(path), original_path=str(path))
        except AmpqError:
            raise
        except Exception as exc:  # a model that passes the checker but that a rule cannot read
            raise AmpqError(f"{path}: cannot normalise the model ({type(exc).__name__}: {_first_line(exc)})") from None
        if changes is not None:
            changes.extend(done.changes)
    if infer_shapes:
        try:
            model = infer_shapes_safe(model)
        except AmpqError:
            raise
        except Exception as exc:  # onnx raises InferenceError / ValidationError / RuntimeError
            raise AmpqError(f"{path}: onnx shape inference fails on the model ({_first_line(exc)})") from None
    return model


def _check_names(model: onnx.ModelProto, path: Path) -> None:
    """Every name is text. ONNX's proto2 strings are not UTF-8-validated by protobuf: a damaged
    file yields ``bytes`` names, which would surface later as a crash in a JSON report."""
    g = model.graph
    values = [(n, "node") for n in g.node] + [(v, "value") for v in (*g.input, *g.output, *g.value_info)] + \
        [(t, "initializer") for t in g.initializer]
    for obj, kind in values:
        names = [obj.name] + (list(obj.input) + list(obj.output) + [obj.op_type, obj.domain] if kind == "node" else [])
        bad = next((b for b in names if isinstance(b, bytes)), None)
        if bad is not None:
            raise AmpqError(f"{path}: a {kind} name is not valid UTF-8 ({bad[:40]!r}); the file is damaged")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _check(model: onnx.ModelProto, path: Path) -> None:
    """onnx.checker on the model as read from the file, *before* its external data is loaded.

    The proto is small then (weights still in their data file), so the in-memory checker
    works at any model size. onnx's path form (``check_model(path)``) would do the same
    checks but reads the external data into a second, C++ copy of the model: measured
    +1.5x the model size on a 2.2 GB model. The in-memory checker resolves external data
    locations against the working directory (it only checks the files exist), hence the
    short change of directory to the model's folder.
    """
    try:
        with _cwd(path.parent):
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise AmpqError(f"{path}: invalid or truncated ONNX model ({_first_line(exc)})") from None
    except ValueError as exc:  # a file whose embedded tensors alone exceed 2 GB cannot be a valid proto
        raise AmpqError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None


@contextlib.contextmanager
def _cwd(folder: Path):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def _fits_protobuf(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serialises below protobuf's 2 GB limit.

    Not ``model.ByteSize()``: the upb protobuf runtime computes it by serialising the
    whole message, which on a 2.5 GB model takes seconds and a second 2.5 GB buffer
    (measured). The size is dominated by tensor bytes, which dims and dtype give for free;
    everything else is sized per node / per small tensor, with a margin for framing.
    """
    return approx_size(model) < _PROTOBUF_LIMIT


def approx_size(model: onnx.ModelProto) -> int:
    """Serialised size of ``model``, computed without serialising its weights."""
    total = 0
    for t in model.graph.initializer:
        n = _expected_bytes(t) if t.HasField("raw_data") else None
        total += (n + 64 + len(t.name) + 8 * len(t.dims)) if n is not None else t.ByteSize()
    for node in model.graph.node:
        total += node.ByteSize()  # Constant nodes hold their tensors here
    for field in (model.graph.input, model.graph.output, model.graph.value_info):
        total += sum(v.ByteSize() for v in field)
    return total + 4096


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

    if _fits_protobuf(model):
        return version_converter.convert_version(model, opset)
    converted = version_converter.convert_version(stripped_copy(model), opset)
    return adopt_structure(model, converted)


def _check_external_refs(model: onnx.ModelProto, path: Path) -> bool:
    """Every external tensor names a file beside the model that holds its bytes; True if any.

    Checked from the references and file sizes alone, before anything is read: a missing
    or short data file, or a location outside the model's folder, is one clear error.
    """
    from onnx.external_data_helper import uses_external_data

    missing = []
    external = False
    sizes: dict[Path, int] = {}
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            # embedded bytes: the checker does not compare them with the dims (ONNX Runtime
            # then fails deep inside with "buffer size mismatch"); the file is < 2 GB here,
            # so reading the length is cheap
            want = _expected_bytes(tensor) if tensor.HasField("raw_data") else None
            if want is not None and len(tensor.raw_data) != want:
                raise AmpqError(f"{path}: tensor {tensor.name!r} holds {len(tensor.raw_data)} bytes, expected {want} "
                                f"for shape {list(tensor.dims)}")
            continue
        external = True
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (path.parent / location).resolve()
        if not location or Path(location).is_absolute() or path.parent.resolve() not in target.parents:
            raise AmpqError(f"{path}: tensor {tensor.name!r} refers to external data {location!r} outside "
                            f"the model's folder (expected a file name beside the model)")
        if not target.is_file():
            missing.append((tensor.name, location))
            continue
        size = sizes.setdefault(target, target.stat().st_size)
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else size - offset
        except ValueError:
            raise AmpqError(f"{path}: tensor {tensor.name!r} has a non-numeric external data offset/length") from None
        want = _expected_bytes(tensor)
        if offset < 0 or length < 0 or offset + length > size:
            raise AmpqError(f"{path}: external data of tensor {tensor.name!r} needs bytes {offset}..{offset + length} "
                            f"of {location}, which has {size} bytes (truncated data file?)")
        if want is not None and length != want:
            raise AmpqError(f"{path}: external data of tensor {tensor.name!r} has {length} bytes, "
                            f"expected {want} for shape {list(tensor.dims)}")
    if missing:
        name, location = missing[0]
        more = f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else ""
        raise AmpqError(
            f"{path}: external data file {path.parent / location} for tensor {name!r} is missing{more}"
        )
    return external


def _load_external(model: onnx.ModelProto, path: Path) -> None:
    """Read external tensor data beside ``path`` (references checked first)."""
    from onnx.external_data_helper import load_external_data_for_model

    if not _check_external_refs(model, path):
        return
    try:
        load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise AmpqError(f"{path}: cannot read external data ({_first_line(exc)})") from None


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    import numpy as np
    from onnx import helper

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


def infer_shapes_safe(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference; models above 2 GB are inferred without serialising them whole."""
    if _fits_protobuf(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    # Above the protobuf limit: infer on a weight-less copy and graft the value_info back.
    stripped = stripped_copy(model)
    inferred = onnx.shape_inference.infer_shapes(stripped, data_prop=False)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def check_output_path(path: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work, an output that is the input model or lies in a folder we cannot write."""
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise AmpqError(f"{path}: output path is the input model; choose another -o (the input is never modified)")
    folder = path.parent
    if not folder.is_dir():
        raise AmpqError(f"{path}: output directory {folder} does not exist")
    if path.is_dir():
        raise AmpqError(f"{path}: output path is a directory, expected a file name")
    # A real write probe: os.access says yes to root on read-only and virtual filesystems.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise AmpqError(f"{path}: output directory {folder} is not writable ({exc.strerror or exc})") from None
    return path


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (temp file in the same folder, then rename).

    Refuses to overwrite ``source`` (the input model is never modified). Models above
    2 GB are written with external data ``<name>.data`` beside them.
    """
    path = check_output_path(path, source)
    folder = path.parent
    large = not _fits_protobuf(model)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    data_name = path.name + ".data"
    tmp_data = folder / (Path(tmp).name + ".data")
    try:
        if large:
            save_external(model, tmp, tmp_data.name)
            # The model refers to its data file by name: rewrite that name before the renames.
            if tmp_data.exists():  # no data file when every tensor is under the size threshold
                _relocate_external(tmp, tmp_data.name, data_name)
                os.replace(tmp_data, folder / data_name)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise AmpqError(f"{path}: cannot write output ({exc.strerror or exc})") from None
    finally:
        for leftover in (Path(tmp), tmp_data):
            if leftover.exists():
                leftover.unlink()
    return path


def save_external(model: onnx.ModelProto, path: str | os.PathLike, location: str) -> None:
    """Save with all tensors in one external file ``location`` beside ``path``.

    onnx's saver moves the tensors out of the in-memory proto; they are read back so the
    caller's model is unchanged (copying a >2 GB model first would double peak memory).
    """
    from onnx.external_data_helper import load_external_data_for_model

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    load_external_data_for_model(model, str(Path(path).parent))


def _relocate_external(model_file: str, old: str, new: str) -> None:
    m = onnx.load(model_file, load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(m, model_file)
