"""Calibration samples and activation ranges.

Samples come from ``--calib FILE.npz`` (one array per model input, first axis =
samples) or a directory of such files; they are validated against the model before any
work. Activation ranges come from ONNX Runtime's own calibrators (MinMax, Percentile,
Entropy) and are kept as plain data: sensitivity, timing and rewrite all derive their
scales from the same :class:`Ranges`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

from .errors import AmpqError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # int for fixed dims, str/None for symbolic ones


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers) with dtypes and dims."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tt = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        specs.append(InputSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return specs


@dataclass
class Samples:
    """Calibration inputs: one array per model input, samples along axis 0."""

    inputs: dict[str, np.ndarray]
    synthetic: bool = False
    source: str = ""

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        if batch_size < 1:
            raise AmpqError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.inputs.items()}

    def split(self, n_holdout: int) -> tuple["Samples", "Samples"]:
        """(calibration part, held-out part): the last ``n_holdout`` samples are held out."""
        if not 0 < n_holdout < len(self):
            raise AmpqError(f"held-out samples must be between 1 and {len(self) - 1}, got {n_holdout}")
        cut = len(self) - n_holdout
        head = {k: v[:cut] for k, v in self.inputs.items()}
        tail = {k: v[cut:] for k, v in self.inputs.items()}
        return Samples(head, self.synthetic, self.source), Samples(tail, self.synthetic, self.source)


def load_samples(path: str | os.PathLike, model: onnx.ModelProto) -> Samples:
    """Read ``FILE.npz`` or a directory of ``*.npz`` files and validate them against ``model``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise AmpqError(f"{path}: calibration directory holds no .npz file")
    elif path.is_file():
        files = [path]
    else:
        raise AmpqError(f"{path}: no such calibration file or directory")
    parts: dict[str, list[np.ndarray]] = {}
    for file in files:
        arrays = _read_npz(file)
        validate_inputs(arrays, model, source=str(file))
        for k, v in arrays.items():
            parts.setdefault(k, []).append(v)
    try:
        inputs = {k: np.concatenate(v, axis=0) for k, v in parts.items()}
    except ValueError as exc:
        raise AmpqError(f"{path}: calibration files disagree in shape ({exc})") from None
    return Samples(inputs, source=str(path))


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise AmpqError(f"{file}: not a readable .npz calibration archive ({exc})") from None


def validate_inputs(arrays: dict[str, np.ndarray], model: onnx.ModelProto, source: str = "calibration") -> None:
    """Check names, dtypes and shapes of calibration arrays against the model's inputs."""
    specs = {s.name: s for s in input_specs(model)}
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise AmpqError(f"{source}: model input {missing[0]!r} is missing (given: {sorted(arrays)})")
    extra = [n for n in arrays if n not in specs]
    if extra:
        raise AmpqError(f"{source}: array {extra[0]!r} is not a model input (expected: {sorted(specs)})")
    count = None
    for name, spec in specs.items():
        arr = arrays[name]
        if arr.dtype != spec.dtype:
            raise AmpqError(f"{source}: input {name!r} has dtype {arr.dtype}, expected {spec.dtype}")
        if arr.ndim != len(spec.shape):
            raise AmpqError(
                f"{source}: input {name!r} has shape {list(arr.shape)}, expected rank {len(spec.shape)} "
                f"{_show(spec.shape)} (axis 0 = samples)"
            )
        for axis in range(1, arr.ndim):
            want = spec.shape[axis]
            if isinstance(want, int) and want > 0 and arr.shape[axis] != want:
                raise AmpqError(
                    f"{source}: input {name!r} has shape {list(arr.shape)}, expected {_show(spec.shape)} "
                    f"(axis {axis}: {arr.shape[axis]} != {want})"
                )
        if count is None:
            count = arr.shape[0]
        elif arr.shape[0] != count:
            raise AmpqError(f"{source}: input {name!r} has {arr.shape[0]} samples, other inputs have {count}")
    if not count:
        raise AmpqError(f"{source}: calibration set holds no samples")


def _show(shape) -> str:
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


def synthetic_samples(model: onnx.ModelProto, count: int = 8, *, seed: int = 0,
                      dims: dict[str, int] | None = None, warn: bool = True) -> Samples:
    """Random inputs from the input specs, for a first look when no calibration set is given.

    Symbolic dims take ``dims[name]`` or 1 for axis 0 (samples) and 16 elsewhere. Ranges
    and sensitivities computed on such data say little about real inputs: a warning says so.
    """
    rng = np.random.default_rng(seed)
    dims = dims or {}
    inputs = {}
    for spec in input_specs(model):
        shape = [count]
        for axis, d in enumerate(spec.shape[1:], start=1):
            shape.append(d if isinstance(d, int) and d > 0 else dims.get(str(d), 16))
        if spec.dtype.kind == "f":
            inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            inputs[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif "mask" in spec.name.lower():
            inputs[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif "type" in spec.name.lower() or "position" in spec.name.lower():
            inputs[spec.name] = np.zeros(shape, dtype=spec.dtype) if "type" in spec.name.lower() else \
                np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
        else:
            inputs[spec.name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
    if warn:
        print(
            "WARNING: no --calib given: using SYNTHETIC random inputs. Ranges, sensitivities and the "
            "plan will not reflect real data.",
            file=sys.stderr,
        )
    return Samples(inputs, synthetic=True, source="synthetic")


# ----------------------------------------------------------------------------- ranges

@dataclass
class Ranges:
    """Calibrated [lowest, highest] of activation tensors, by tensor name."""

    method: str
    tensors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> tuple[float, float]:
        try:
            return self.tensors[name]
        except KeyError:
            raise AmpqError(f"no calibrated range for tensor {name!r}; was it calibrated?") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def to_json(self) -> dict:
        return {"method": self.method, "tensors": {k: list(v) for k, v in self.tensors.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "Ranges":
        return cls(data["method"], {k: (float(a), float(b)) for k, (a, b) in data["tensors"].items()})


def calibrate(model: onnx.ModelProto, samples: Samples, tensors: list[str], *, method: str = "minmax",
              batch_size: int = 8, percentile: float = 99.999) -> Ranges:
    """Ranges of ``tensors`` over ``samples`` with ONNX Runtime's calibrator for ``method``."""
    from onnxruntime.quantization import calibrate as ort_calibrate

    if method not in CALIBRATION_METHODS:
        raise AmpqError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    wanted = set(tensors)

    class Reader(ort_calibrate.CalibrationDataReader):
        def __init__(self):
            self._it = samples.batches(batch_size)

        def get_next(self):
            return next(self._it, None)

    # ONNX Runtime's calibrators pick tensors by op type (every input and output of every
    # MatMul, say, attention-mask additions included, whose -inf-like values break the
    # histogram calibrators). Narrow the selection to exactly the tensors a plan needs.
    base = {"minmax": ort_calibrate.MinMaxCalibrater, "percentile": ort_calibrate.PercentileCalibrater,
            "entropy": ort_calibrate.EntropyCalibrater}[method]

    class Narrowed(base):
        def select_tensors_to_calibrate(self, model):
            found, value_infos = super().select_tensors_to_calibrate(model)
            return found & wanted, value_infos

    # The same per-method settings as onnxruntime.quantization.calibrate.create_calibrator.
    options = {"minmax": {"symmetric": False, "moving_average": False},
               "percentile": {"symmetric": True, "num_bins": 2048, "percentile": percentile},
               "entropy": {"symmetric": False, "num_bins": 128, "num_quantized_bins": 128}}[method]
    with tempfile.TemporaryDirectory(prefix="ampq-calib-") as tmp:
        src = Path(tmp) / "model.onnx"
        large = model.ByteSize() > 2**31 - 2**21
        if large:
            from .model import save_external

            save_external(model, src, "model.onnx.data")
        else:
            onnx.save_model(model, str(src))
        op_types = sorted({n.op_type for n in model.graph.node if set(n.input) & wanted or set(n.output) & wanted})
        calibrator = Narrowed(src, op_types, str(Path(tmp) / "augmented.onnx"),
                              use_external_data_format=large, **options)
        calibrator.augment_graph()
        calibrator.execution_providers = ["CPUExecutionProvider"]
        calibrator.create_inference_session()
        calibrator.collect_data(Reader())
        data = calibrator.compute_data()
    found = {}
    for name in wanted:
        if name in data:
            lo, hi = data[name].range_value
            found[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
    missing = wanted - set(found)
    if missing:
        raise AmpqError(f"calibrator produced no range for tensor {sorted(missing)[0]!r}")
    return Ranges(method, dict(sorted(found.items())))


def save_json(data: dict, path: str | os.PathLike) -> None:
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise AmpqError(f"{path}: cannot write ({exc.strerror or exc})") from None
