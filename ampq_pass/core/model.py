"""Load and save ONNX models: clear errors on bad files, atomic writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from ampq_pass.core.cache import atomic_write
from ampq_pass.core.errors import AmpqError, first_line
from ampq_pass.core.normalize import Normalized, normalize_checked
from ampq_pass.core.proto import expected_bytes, fits_protobuf, infer_shapes_safe, pass_types_removed, save_external


def load_model(path: str | os.PathLike, *, infer_shapes: bool = True, normalize: bool = True,
               changes: list[str] | None = None) -> onnx.ModelProto:
    """Read an ONNX model with its external data, check it, normalise it and run shape inference.

    Normalisation (:mod:`ampq_pass.core.normalize`: weights to initializers, opset >= 13,
    BatchNorm folded into convolutions) happens here, once, for every command; what it did
    is appended to ``changes``, and a normalised model whose outputs differ from the
    original's raises. Raises :class:`AmpqError` naming the file for a missing file, a file
    that is not (or not entirely) an ONNX model, and missing external data.
    """
    model = read_model(path)
    return finish_loading(model, path, normalize=normalize, infer_shapes=infer_shapes, changes=changes)


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The model as the file holds it (checked, external data loaded), not yet normalised."""
    path = Path(path)
    if not path.is_file():
        raise AmpqError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise AmpqError(f"{path}: not an ONNX model or truncated (protobuf parse failed: {first_line(exc)})") from None
    except OSError as exc:
        raise AmpqError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not model.graph.node:
        raise AmpqError(f"{path}: not an ONNX model or truncated (no graph nodes were read)")
    _check_names(model, path)
    _check_external_refs(model, path)
    _check(model, path)
    _load_external(model, path)
    return model


def finish_loading(model: onnx.ModelProto, path: str | os.PathLike, *, normalize: bool = True,
                   infer_shapes: bool = True, changes: list[str] | None = None,
                   feeds: dict[str, np.ndarray] | None = None, record: Normalized | None = None) -> onnx.ModelProto:
    """Normalise a model from :func:`read_model` and run shape inference.

    ``feeds`` are the inputs the normalised model is checked on against the original: give
    real ones (the first calibration samples) where random probes cannot run the model
    (image sizes a detector needs, a scalar sample rate, token ids within the vocabulary).
    ``record`` receives what normalisation did (its changes, and whether they may change timing).
    """
    path = Path(path)
    if normalize:
        try:
            model, done = normalize_checked(model, source=str(path), original_path=str(path), feeds=feeds)
        except AmpqError:
            raise
        except Exception as exc:  # a model that passes the checker but that a rule cannot read
            raise AmpqError(f"{path}: cannot normalise the model ({type(exc).__name__}: {first_line(exc)})") from None
        if changes is not None:
            changes.extend(done.changes)
        if record is not None:
            for message in done.changes:
                record.add(message, exact=done.exact, timing=done.timing)
    if infer_shapes:
        try:
            model = infer_shapes_safe(model)
        except AmpqError:
            raise
        except Exception as exc:  # onnx raises InferenceError / ValidationError / RuntimeError
            raise AmpqError(f"{path}: onnx shape inference fails on the model ({first_line(exc)})") from None
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
        raise AmpqError(f"{path}: invalid or truncated ONNX model ({first_line(exc)})") from None
    except ValueError as exc:  # a file whose embedded tensors alone exceed 2 GB cannot be a valid proto
        raise AmpqError(f"{path}: invalid ONNX model ({first_line(exc)})") from None


@contextlib.contextmanager
def _cwd(folder: Path):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


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
            want = expected_bytes(tensor) if tensor.HasField("raw_data") else None
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
        want = expected_bytes(tensor)
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
        raise AmpqError(f"{path}: cannot read external data ({first_line(exc)})") from None


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
    2 GB are written with external data ``<name>.data`` beside them. The value_info entries
    the pass added (inferred or captured types, :data:`~ampq_pass.core.proto.PASS_TYPE`) are
    left out of the file: the written model keeps the input's own.
    """
    path = check_output_path(path, source)
    with pass_types_removed(model):
        return _save(model, path)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    data_name = path.name + ".data"
    if fits_protobuf(model):
        return atomic_write(path, lambda tmp: onnx.save_model(model, tmp))
    tmp_data: list[Path] = []

    def write(tmp: str) -> None:
        tmp_data.append(path.parent / (Path(tmp).name + ".data"))
        save_external(model, tmp, tmp_data[0].name)
        # The model refers to its data file by name: rewrite that name before the renames.
        if tmp_data[0].exists():  # no data file when every tensor is under the size threshold
            _relocate_external(tmp, tmp_data[0].name, data_name)
            os.replace(tmp_data[0], path.parent / data_name)

    try:
        return atomic_write(path, write)
    finally:
        if tmp_data and tmp_data[0].exists():
            tmp_data[0].unlink()


def _relocate_external(model_file: str, old: str, new: str) -> None:
    m = onnx.load(model_file, load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(m, model_file)
