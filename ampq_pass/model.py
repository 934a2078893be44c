"""Load and save ONNX models: clear errors on bad files, atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import AmpqError

# Above this size a ModelProto cannot be serialised in one piece (protobuf's 2 GB limit),
# so tensors go to an external-data file beside the model.
_PROTOBUF_LIMIT = 2**31 - 1 - 2**20


def load_model(path: str | os.PathLike, *, infer_shapes: bool = True) -> onnx.ModelProto:
    """Read an ONNX model with its external data, check it and run shape inference.

    Raises :class:`AmpqError` naming the file for a missing file, a file that is not
    (or not entirely) an ONNX model, and missing external data.
    """
    path = Path(path)
    if not path.is_file():
        raise AmpqError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise AmpqError(f"{path}: not an ONNX model or truncated (protobuf parse failed: {exc})") from None
    if not model.graph.node:
        raise AmpqError(f"{path}: not an ONNX model or truncated (no graph nodes were read)")
    _load_external(model, path)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AmpqError(f"{path}: invalid or truncated ONNX model ({first})") from None
    except ValueError as exc:  # the checker refuses protos above 2 GB held in memory
        if "2GB" not in str(exc) and "2 GB" not in str(exc):
            raise
    if infer_shapes:
        model = infer_shapes_safe(model)
    return model


def _load_external(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    missing = []
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if not (path.parent / location).is_file():
                missing.append((tensor.name, location))
    if missing:
        name, location = missing[0]
        more = f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else ""
        raise AmpqError(
            f"{path}: external data file {path.parent / location} for tensor {name!r} is missing{more}"
        )
    try:
        load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise AmpqError(f"{path}: cannot read external data ({exc})") from None


def infer_shapes_safe(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference; models above 2 GB are inferred without serialising them whole."""
    if model.ByteSize() < _PROTOBUF_LIMIT:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    # Above the protobuf limit: infer on a weight-less copy and graft the value_info back.
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for t in stripped.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
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
    large = model.ByteSize() >= _PROTOBUF_LIMIT if _cheap_size_ok(model) else True
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    data_name = path.name + ".data"
    tmp_data = folder / (Path(tmp).name + ".data")
    try:
        if large:
            save_external(model, tmp, tmp_data.name)
            # The model refers to its data file by name: rewrite that name before the renames.
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


def _cheap_size_ok(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # pragma: no cover - protobuf refuses to size some huge protos
        return False


def _relocate_external(model_file: str, old: str, new: str) -> None:
    m = onnx.load(model_file, load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(m, model_file)
