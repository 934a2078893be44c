"""Calibration samples: reading, validation against the model, synthetic inputs.

Samples come from ``--calib FILE.npz`` (one array per model input, first axis =
samples) or a directory of such files; they are validated against the model before any
work.
"""

from __future__ import annotations

import os
import struct
import sys
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

from ampq_pass.core.cache import digest
from ampq_pass.core.errors import AmpqError


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
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            # the checker lets an input's element type be UNDEFINED (0) or a non-tensor type
            raise AmpqError(f"model input {value.name!r} has no usable tensor element type "
                            f"(elem_type {tt.elem_type}); expected a numeric tensor input") from None
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


@dataclass
class Samples:
    """Calibration inputs: one array per model input, samples along axis 0.

    Samples whose shapes differ (images of several widths, sentences of several lengths)
    form *shape groups*: ``inputs`` is the first group and ``more`` the others, each a dict
    with one array per input whose samples share one shape. A batch never mixes groups.
    Sample order is group after group; ``len``, :meth:`batches` and :meth:`split` count
    over all groups, so code written for one group works unchanged.
    """

    inputs: dict[str, np.ndarray]
    synthetic: bool = False
    source: str = ""
    more: list[dict[str, np.ndarray]] = field(default_factory=list)

    @property
    def groups(self) -> list[dict[str, np.ndarray]]:
        return [self.inputs, *self.more]

    def __len__(self) -> int:
        return sum(_count(g) for g in self.groups)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for _, batch in self.numbered_batches(batch_size):
            yield batch

    def numbered_batches(self, batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(index of the batch's first sample, batch)``: with several shape groups the
        start is not ``k * batch_size`` (each group ends with its own partial batch)."""
        if batch_size < 1:
            raise AmpqError(f"batch_size must be >= 1, got {batch_size}")
        offset = 0
        for group in self.groups:
            n = _count(group)
            for start in range(0, n, batch_size):
                yield offset + start, {k: v[start:start + batch_size] for k, v in group.items()}
            offset += n

    def split(self, n_holdout: int) -> tuple["Samples", "Samples"]:
        """(calibration part, held-out part): the last ``n_holdout`` samples are held out."""
        if not 0 < n_holdout < len(self):
            raise AmpqError(f"held-out samples must be between 1 and {len(self) - 1}, got {n_holdout}")
        cut = len(self) - n_holdout
        head: list[dict[str, np.ndarray]] = []
        tail: list[dict[str, np.ndarray]] = []
        offset = 0
        for group in self.groups:
            n = _count(group)
            lo = max(0, min(n, cut - offset))
            if lo > 0:
                head.append({k: v[:lo] for k, v in group.items()})
            if lo < n:
                tail.append({k: v[lo:] for k, v in group.items()})
            offset += n
        return (Samples(head[0], self.synthetic, self.source, head[1:]),
                Samples(tail[0], self.synthetic, self.source, tail[1:]))

    def shapes(self) -> list[tuple[dict[str, tuple[int, ...]], int]]:
        """Per shape group: the per-sample shape of each input (axis 0 dropped) and the sample count."""
        return [({k: tuple(int(d) for d in v.shape[1:]) for k, v in g.items()}, _count(g)) for g in self.groups]

    def group_at(self, shape: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
        """All samples whose per-sample shapes are ``shape`` (inputs not named match any)."""
        found = [g for g in self.groups if all(tuple(g[k].shape[1:]) == tuple(v) for k, v in shape.items() if k in g)]
        if not found:
            return None
        return {k: np.concatenate([g[k] for g in found]) for k in found[0]}

    def most_common(self) -> dict[str, np.ndarray]:
        """The shape group holding the most samples (the first one on a tie)."""
        return max(self.groups, key=_count)


def _count(group: dict[str, np.ndarray]) -> int:
    return len(next(iter(group.values()))) if group else 0


def _signature(arrays: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((k, tuple(v.shape[1:])) for k, v in arrays.items()))


def group_by_shape(parts: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Merge parts whose per-sample shapes agree (keeping first-seen order), so batches stay full."""
    merged: dict[tuple, list[dict[str, np.ndarray]]] = {}
    for part in parts:
        merged.setdefault(_signature(part), []).append(part)
    return [{k: np.concatenate([p[k] for p in same]) if len(same) > 1 else same[0][k] for k in same[0]}
            for same in merged.values()]


def load_samples(path: str | os.PathLike, model: onnx.ModelProto) -> Samples:
    """Read ``FILE.npz`` or a directory of ``*.npz`` files and validate them against ``model``.

    Each input is either one array ``NAME`` (axis 0 = samples) or a list of arrays
    ``NAME/0``, ``NAME/1``, ... whose per-sample shapes may differ (dynamic dims); list
    entry ``i`` of every input forms one shape group. Files of a directory may differ in
    shape too. Groups with equal shapes are merged.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise AmpqError(f"{path}: calibration directory holds no .npz file")
    elif path.is_file():
        files = [path]
    else:
        raise AmpqError(f"{path}: no such calibration file or directory")
    parts: list[dict[str, np.ndarray]] = []
    for file in files:
        for arrays in _split_lists(_read_npz(file), file):
            validate_inputs(arrays, model, source=str(file))
            parts.append(arrays)
    groups = group_by_shape(parts)
    return Samples(groups[0], source=str(path), more=groups[1:])


def _split_lists(arrays: dict[str, np.ndarray], file: Path) -> list[dict[str, np.ndarray]]:
    """``{"x/0": a, "x/1": b}`` -> ``[{"x": a}, {"x": b}]``; plain ``{"x": a}`` -> ``[{"x": a}]``."""
    plain = {k: v for k, v in arrays.items() if "/" not in k}
    listed: dict[str, dict[int, np.ndarray]] = {}
    for key, value in arrays.items():
        if "/" not in key:
            continue
        name, _, index = key.rpartition("/")
        if not index.isdigit():
            raise AmpqError(f"{file}: array {key!r}: a list entry is named NAME/<index> with index 0, 1, ..., "
                            f"got index {index!r}")
        listed.setdefault(name, {})[int(index)] = value
    if not listed:
        return [plain]
    both = sorted(set(plain) & set(listed))
    if both:
        raise AmpqError(f"{file}: input {both[0]!r} is given both as one array and as a list {both[0]}/0, ...")
    if plain:
        raise AmpqError(f"{file}: input {sorted(plain)[0]!r} is one array while {sorted(listed)[0]!r} is a list "
                        f"(NAME/0, NAME/1, ...): give every input in the same form")
    lengths = {name: sorted(entries) for name, entries in listed.items()}
    first = next(iter(lengths))
    for name, indices in lengths.items():
        if indices != list(range(len(indices))):
            raise AmpqError(f"{file}: input {name!r}: list entries must be {name}/0 .. {name}/{len(indices) - 1} "
                            f"without gaps, got indices {indices}")
        if indices != lengths[first]:
            raise AmpqError(f"{file}: input {name!r} has {len(indices)} list entries, input {first!r} has "
                            f"{len(lengths[first])}")
    return [{name: listed[name][i] for name in listed} for i in lengths[first]]


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, NotImplementedError,
            RuntimeError, TypeError, MemoryError, zlib.error, UnicodeDecodeError, struct.error,
            SyntaxError, tokenize.TokenError) as exc:  # numpy parses a damaged .npy header as Python
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise AmpqError(f"{file}: not a readable .npz calibration archive ({text})") from None


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
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            raise AmpqError(f"{source}: input {name!r} holds NaN or infinite values; calibration data must be finite")
    if not count:
        raise AmpqError(f"{source}: calibration set holds no samples")
    # a symbolic dim shared by several inputs (``seq`` of ids and mask) must agree
    seen: dict[str, tuple[str, int]] = {}
    for name, spec in specs.items():
        for axis, dim in enumerate(spec.shape[1:], start=1):
            if isinstance(dim, str) and dim:
                size = arrays[name].shape[axis]
                if dim in seen and seen[dim][1] != size:
                    other, other_size = seen[dim]
                    raise AmpqError(f"{source}: dim {dim!r} is {size} in input {name!r} but {other_size} in "
                                    f"input {other!r}")
                seen.setdefault(dim, (name, size))


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


def samples_digest(samples: Samples) -> str:
    """Digest of every shape group's arrays (one group hashes as it did before groups existed)."""
    parts = []
    for index, group in enumerate(samples.groups):
        if index:
            parts.append(("group", index))
        parts.extend((k, str(v.dtype), list(v.shape), np.ascontiguousarray(v).tobytes())
                     for k, v in sorted(group.items()))
    return digest(*parts)


def timing_feeds(model: onnx.ModelProto, samples: Samples, *, shapes: dict[str, tuple[int, ...]] | None,
                 batch_size: int, n_batches: int) -> tuple[list[dict[str, np.ndarray]], dict]:
    """The batches subgraphs are timed on, and a note for the report saying which shape and why.

    With ``shapes`` (``--shape input=1x3x48x640``) the samples of the calibration group with
    those per-sample shapes are used, ``shape[0]`` per batch (repeated when the group is
    smaller); otherwise the most common shape group of the calibration set, ``batch_size``
    per batch. Real samples, so the activations captured at subgraph inputs are real too.
    """
    specs = {s.name: s for s in input_specs(model)}
    available = [{k: list(v) for k, v in shape.items()} for shape, _ in samples.shapes()]
    if shapes:
        for name, shape in shapes.items():
            if name not in specs:
                raise AmpqError(f"--shape {name}=...: {name!r} is not a model input (inputs: {', '.join(specs)})")
            spec = specs[name]
            if len(shape) != len(spec.shape):
                raise AmpqError(f"--shape {name}={'x'.join(map(str, shape))}: rank {len(shape)}, the model input "
                                f"has rank {len(spec.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise AmpqError(f"--shape {name}={'x'.join(map(str, shape))}: axis {axis} is fixed to {want} "
                                    f"in the model")
        batches = {int(s[0]) for s in shapes.values()}
        if len(batches) > 1:
            raise AmpqError(f"--shape: the inputs name different batch sizes {sorted(batches)}; give one")
        batch = batches.pop()
        group = samples.group_at({k: tuple(v[1:]) for k, v in shapes.items()})
        if group is None:
            named = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())
            have = "; ".join(", ".join(f"{k}=Nx{'x'.join(map(str, v))}" for k, v in a.items()) for a in available)
            raise AmpqError(f"--shape {named}: no calibration sample has this shape (the calibration set has: {have})")
        source = "--shape"
    else:
        group, batch, source = samples.most_common(), batch_size, "most common calibration shape"
    n = len(next(iter(group.values())))
    feeds = []
    for b in range(n_batches):
        rows = (np.arange(batch) + b * batch) % n
        feeds.append({k: np.ascontiguousarray(v[rows]) for k, v in group.items()})
        if not shapes and (b + 1) * batch >= n:
            break  # the default never repeats a sample; a named batch larger than the group does
    info = {"source": source, "shapes": {k: list(v.shape) for k, v in feeds[0].items()},
            "calibration_shapes": [{"shape": a, "samples": c} for a, (_, c) in zip(available, samples.shapes())]}
    return feeds, info
