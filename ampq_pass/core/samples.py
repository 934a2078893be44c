"""Calibration samples: reading, validation against the model, synthetic inputs.

Two conventions, both validated against the model before any work:

* **Samples** (``--calib FILE.npz`` or a directory of them): one array per model input,
  axis 0 = samples; batches are cut along axis 0. Every input must have its batch on
  axis 0.
* **Whole feeds** (``--calib-feeds DIR``, or :func:`calib_feeds` / :func:`load_feeds` in
  Python): every ``*.npz`` in ``DIR`` (or one ``.npz`` file) holds one *complete feed*,
  one array per model input exactly as the model takes it: no sample axis is added or
  cut, so scalar (rank-0) inputs, a state whose batch is on axis 1 (``[2, N, 128]``) or
  inputs with no batch axis at all work. Each feed is one batch of its own
  (``--batch-size`` does not apply); files are taken in name order. A feed's sample count
  is the size of its declared batch dim: the first axis, in model input order, whose dim
  name contains ``batch``, else axis 0 of the first input whose axis 0 is not a fixed
  size, else 1. Sample counts only size the held-out split; stages that need per-sample
  values treat one feed as one sample (:attr:`Samples.whole_feeds`).

Dim names are constraints only when they mean something: the same name on several axes or
inputs must have the same size, except for ``?``, empty names, numbers (``-1``) and names
that exporters make up for a dim they know nothing about (``unk__123``, ``dim_0``,
``Reshape_12_dim_0``, torch.dynamo's ``s0``, ``x_dynamic_axes_1``, expressions such as
``2*s0``), which never mean "equal".
"""

from __future__ import annotations

import os
import re
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
    #: whole feeds (see the module docstring): each is one batch as the model takes it;
    #: ``inputs`` is then the first feed and ``more`` the others
    counts: list[int] | None = None

    @classmethod
    def from_feeds(cls, feeds: list[dict[str, np.ndarray]], counts: list[int] | None = None, *,
                   synthetic: bool = False, source: str = "") -> "Samples":
        """Whole feeds, each one batch as it is; ``counts`` = samples per feed (default 1 each)."""
        if not feeds:
            raise AmpqError(f"{source or 'calibration'}: no feed given")
        counts = [1] * len(feeds) if counts is None else [int(c) for c in counts]
        if len(counts) != len(feeds) or min(counts) < 1:
            raise AmpqError(f"feeds: {len(counts)} sample counts for {len(feeds)} feeds (each >= 1)")
        return cls(feeds[0], synthetic, source, list(feeds[1:]), counts)

    @property
    def whole_feeds(self) -> bool:
        """True when every batch is one whole feed (no sample axis to cut or sum over)."""
        return self.counts is not None

    @property
    def groups(self) -> list[dict[str, np.ndarray]]:
        """Shape groups; with whole feeds, the feeds (each its own group)."""
        return [self.inputs, *self.more]

    def __len__(self) -> int:
        if self.counts is not None:
            return sum(self.counts)
        return sum(_count(g) for g in self.groups)

    def count(self, batch: dict[str, np.ndarray]) -> int:
        """Samples in ``batch`` (one yielded by :meth:`batches`): its axis 0, or a feed's count."""
        if self.counts is not None:
            for feed, n in zip(self.groups, self.counts):
                if feed is batch or all(feed.get(k) is v for k, v in batch.items()):
                    return n
            return 1
        return _count(batch)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for _, batch in self.numbered_batches(batch_size):
            yield batch

    def numbered_batches(self, batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(index of the batch's first sample, batch)``: with several shape groups the
        start is not ``k * batch_size`` (each group ends with its own partial batch)."""
        if batch_size < 1:
            raise AmpqError(f"batch_size must be >= 1, got {batch_size}")
        offset = 0
        if self.counts is not None:  # whole feeds: each is one batch, as it is
            for feed, n in zip(self.groups, self.counts):
                yield offset, feed
                offset += n
            return
        for group in self.groups:
            n = _count(group)
            for start in range(0, n, batch_size):
                yield offset + start, {k: v[start:start + batch_size] for k, v in group.items()}
            offset += n

    def split(self, n_holdout: int) -> tuple["Samples", "Samples"]:
        """(calibration part, held-out part): the last ``n_holdout`` samples are held out."""
        if not 0 < n_holdout < len(self):
            raise AmpqError(f"held-out samples must be between 1 and {len(self) - 1}, got {n_holdout}")
        if self.counts is not None:
            return self._split_feeds(n_holdout)
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

    def _split_feeds(self, n_holdout: int) -> tuple["Samples", "Samples"]:
        """Whole feeds are never cut: the last feeds holding at least ``n_holdout`` samples are
        held out, and at least one feed stays on each side."""
        feeds, counts = self.groups, self.counts or []
        if len(feeds) < 2:
            raise AmpqError(f"{self.source or 'calibration'}: one whole feed ({counts[0]} samples) cannot be split "
                            f"into calibration and held-out parts; give at least 2 feeds")
        cut, held = len(feeds) - 1, counts[-1]
        while held < n_holdout and cut > 1:
            cut -= 1
            held += counts[cut]
        return (Samples.from_feeds(feeds[:cut], counts[:cut], synthetic=self.synthetic, source=self.source),
                Samples.from_feeds(feeds[cut:], counts[cut:], synthetic=self.synthetic, source=self.source))

    def shapes(self) -> list[tuple[dict[str, tuple[int, ...]], int]]:
        """Per shape group: the per-sample shape of each input (axis 0 dropped) and the sample
        count; with whole feeds, per feed: the feed's shapes as they are and its count."""
        if self.counts is not None:
            return [({k: tuple(int(d) for d in v.shape) for k, v in g.items()}, n) for g, n in zip(self.groups, self.counts)]
        return [({k: tuple(int(d) for d in v.shape[1:]) for k, v in g.items()}, _count(g)) for g in self.groups]

    def group_at(self, shape: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
        """All samples whose per-sample shapes are ``shape`` (inputs not named match any).
        With whole feeds: the first feed whose shapes are ``shape``."""
        if self.counts is not None:
            return next((g for g in self.feeds_at(shape)), None)
        found = [g for g in self.groups if all(tuple(g[k].shape[1:]) == tuple(v) for k, v in shape.items() if k in g)]
        if not found:
            return None
        return {k: np.concatenate([g[k] for g in found]) for k in found[0]}

    def feeds_at(self, shape: dict[str, tuple[int, ...]]) -> list[dict[str, np.ndarray]]:
        """Whole feeds whose shapes are ``shape`` (inputs not named match any)."""
        return [g for g in self.groups if all(tuple(g[k].shape) == tuple(v) for k, v in shape.items() if k in g)]

    def most_common(self) -> dict[str, np.ndarray]:
        """The shape group holding the most samples (the first one on a tie); with whole
        feeds, the first feed of the shape most feeds have."""
        if self.counts is not None:
            signatures = [_feed_signature(g) for g in self.groups]
            best = max(signatures, key=signatures.count)
            return self.groups[signatures.index(best)]
        return max(self.groups, key=_count)


def _count(group: dict[str, np.ndarray]) -> int:
    return len(next(iter(group.values()))) if group else 0


def _feed_signature(arrays: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in arrays.items()))


def _signature(arrays: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((k, tuple(v.shape[1:])) for k, v in arrays.items()))


def group_by_shape(parts: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Merge parts whose per-sample shapes agree (keeping first-seen order), so batches stay full."""
    merged: dict[tuple, list[dict[str, np.ndarray]]] = {}
    for part in parts:
        merged.setdefault(_signature(part), []).append(part)
    return [{k: np.concatenate([p[k] for p in same]) if len(same) > 1 else same[0][k] for k in same[0]}
            for same in merged.values()]


class FeedsPath(str):
    """A calibration path holding whole feeds (``--calib-feeds``): :func:`load_samples` reads
    it with :func:`load_feeds`. A ``str``, so it travels through ``run_pass(calib=...)``."""

    def __fspath__(self) -> str:
        return str.__str__(self)


def calib_feeds(path: str | os.PathLike) -> FeedsPath:
    """Mark ``path`` (a directory of ``.npz`` feeds, or one) as whole feeds for ``calib=``."""
    return FeedsPath(os.fspath(path))


def load_samples(path: str | os.PathLike, model: onnx.ModelProto) -> Samples:
    """Read ``FILE.npz`` or a directory of ``*.npz`` files and validate them against ``model``.

    Each input is either one array ``NAME`` (axis 0 = samples) or a list of arrays
    ``NAME/0``, ``NAME/1``, ... whose per-sample shapes may differ (dynamic dims); list
    entry ``i`` of every input forms one shape group. Files of a directory may differ in
    shape too. Groups with equal shapes are merged. A :class:`FeedsPath`
    (:func:`calib_feeds`) is read as whole feeds (:func:`load_feeds`).
    """
    if isinstance(path, FeedsPath):
        return load_feeds(path, model)
    path = Path(path)
    files = _npz_files(path)
    parts: list[dict[str, np.ndarray]] = []
    for file in files:
        for arrays in _split_lists(_read_npz(file), file):
            validate_inputs(arrays, model, source=str(file))
            parts.append(arrays)
    groups = group_by_shape(parts)
    return Samples(groups[0], source=str(path), more=groups[1:])


def _npz_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise AmpqError(f"{path}: calibration directory holds no .npz file")
        return files
    if path.is_file():
        return [path]
    raise AmpqError(f"{path}: no such calibration file or directory")


def load_feeds(path: str | os.PathLike, model: onnx.ModelProto) -> Samples:
    """Whole feeds: every ``*.npz`` of directory ``path`` (name order), or the one file
    ``path``, is one complete feed (one array per model input, exactly the shape the model
    takes: no sample axis). Each is validated against the model, with every axis checked,
    and becomes one batch of its own; its sample count comes from its declared batch dim
    (module docstring)."""
    path = Path(path)
    feeds, counts = [], []
    for file in _npz_files(path):
        arrays = _read_npz(file)
        listed = sorted(k for k in arrays if "/" in k)
        if listed:
            raise AmpqError(f"{file}: array {listed[0]!r}: a whole feed holds one array per model input "
                            f"(the NAME/0, NAME/1 lists are for --calib); put each feed in a file of its own")
        counts.append(validate_feed(arrays, model, source=str(file)))
        feeds.append(arrays)
    return Samples.from_feeds(feeds, counts, source=str(path))


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


#: dim names exporters make up for a dim they know nothing about: never a constraint
_ANONYMOUS_DIM = re.compile(r"^(\?*|-?\d+|none|null|unknown|dyn(amic)?|unk_*\d*|dim_?\d+|.*_dim_?\d+|"
                            r"[a-z]\d+|.*_dynamic_axes_\d+|.*[^\w.].*)$", re.IGNORECASE)


def meaningful_dim(dim) -> bool:
    """True for a dim name that constrains: the same name elsewhere must have the same size."""
    return isinstance(dim, str) and not _ANONYMOUS_DIM.match(dim.strip())


def _check_arrays(arrays: dict[str, np.ndarray], model: onnx.ModelProto, source: str,
                  whole: bool) -> dict[str, InputSpec]:
    """Names, dtypes, ranks, fixed dims, finiteness and named-dim agreement; axis 0 is not
    checked for samples (it counts them) and is for whole feeds."""
    specs = {s.name: s for s in input_specs(model)}
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise AmpqError(f"{source}: model input {missing[0]!r} is missing (given: {sorted(arrays)})")
    extra = [n for n in arrays if n not in specs]
    if extra:
        raise AmpqError(f"{source}: array {extra[0]!r} is not a model input (expected: {sorted(specs)})")
    first = 0 if whole else 1
    for name, spec in specs.items():
        arr = arrays[name]
        if arr.dtype != spec.dtype:
            raise AmpqError(f"{source}: input {name!r} has dtype {arr.dtype}, expected {spec.dtype}")
        if not whole and not spec.shape:
            raise AmpqError(f"{source}: input {name!r} is a scalar (rank 0) in the model: it has no sample axis; "
                            f"give whole feeds instead (--calib-feeds DIR: one .npz per feed, each array exactly "
                            f"as the model takes it)")
        if arr.ndim != len(spec.shape):
            raise AmpqError(
                f"{source}: input {name!r} has shape {list(arr.shape)}, expected rank {len(spec.shape)} "
                f"{_show(spec.shape)}" + (" (a whole feed, as the model takes it)" if whole else " (axis 0 = samples)")
            )
        for axis in range(first, arr.ndim):
            want = spec.shape[axis]
            if isinstance(want, int) and want > 0 and arr.shape[axis] != want:
                raise AmpqError(
                    f"{source}: input {name!r} has shape {list(arr.shape)}, expected {_show(spec.shape)} "
                    f"(axis {axis}: {arr.shape[axis]} != {want})"
                )
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            raise AmpqError(f"{source}: input {name!r} holds NaN or infinite values; calibration data must be finite")
    # a meaningful dim name shared by several axes or inputs (``seq`` of ids and mask) must agree
    seen: dict[str, tuple[str, int, int]] = {}
    for name, spec in specs.items():
        for axis, dim in enumerate(spec.shape[first:], start=first):
            if meaningful_dim(dim):
                size = arrays[name].shape[axis]
                if dim in seen and seen[dim][2] != size:
                    other, other_axis, other_size = seen[dim]
                    where = f"axis {axis} of input {name!r}"
                    there = f"axis {other_axis} of input {other!r}"
                    raise AmpqError(f"{source}: dim {dim!r} is {size} on {where} but {other_size} on {there}")
                seen.setdefault(dim, (name, axis, size))
    return specs


def validate_inputs(arrays: dict[str, np.ndarray], model: onnx.ModelProto, source: str = "calibration") -> None:
    """Check names, dtypes and shapes of calibration arrays (axis 0 = samples) against the model's inputs."""
    specs = _check_arrays(arrays, model, source, whole=False)
    count = None
    for name in specs:
        n = arrays[name].shape[0]
        if count is None:
            count, first = n, name
        elif n != count:
            fixed = [k for k in (first, name) if isinstance(specs[k].shape[0], int) and specs[k].shape[0] > 1]
            hint = (f"; axis 0 of input {fixed[0]!r} is fixed to {specs[fixed[0]].shape[0]} in the model, so its "
                    f"batch is elsewhere: give whole feeds (--calib-feeds DIR)") if fixed else ""
            raise AmpqError(f"{source}: input {name!r} has {n} samples, other inputs have {count}{hint}")
    if not count:
        raise AmpqError(f"{source}: calibration set holds no samples")


def validate_feed(arrays: dict[str, np.ndarray], model: onnx.ModelProto, source: str = "feed") -> int:
    """Check one whole feed against the model's inputs (every axis); returns its sample count."""
    specs = _check_arrays(arrays, model, source, whole=True)
    return feed_count(arrays, specs.values())


def feed_count(arrays: dict[str, np.ndarray], specs) -> int:
    """Samples in a whole feed: its first axis named like ``batch``, else axis 0 of the first
    input whose axis 0 is not fixed, else 1."""
    specs = list(specs)
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and "batch" in dim.lower():
                return max(1, int(arrays[spec.name].shape[axis]))
    for spec in specs:
        if spec.shape and not (isinstance(spec.shape[0], int) and spec.shape[0] > 0):
            return max(1, int(arrays[spec.name].shape[0]))
    return 1


def _show(shape) -> str:
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


def synthetic_samples(model: onnx.ModelProto, count: int = 8, *, seed: int = 0,
                      dims: dict[str, int] | None = None, warn: bool = True) -> Samples:
    """Random inputs from the input specs, for a first look when no calibration set is given.

    Symbolic dims take ``dims[name]`` or 1 for axis 0 (samples) and 16 elsewhere. Ranges
    and sensitivities computed on such data say little about real inputs: a warning says so.

    A model with an input that has no sample axis at 0 (a scalar such as silero-vad's ``sr``,
    a state ``[2, batch, 128]`` whose axis 0 is fixed to more than 1) gets ``count`` whole
    feeds of one sample each instead, every array exactly as the model takes it: a scalar
    stays a scalar (stacking ``count`` of them into ``[count]`` gives a feed no model runs).
    There a dim named like ``batch`` or an axis 0 is 1 and any other symbolic dim 16, the
    same size for every axis with the same meaningful name.
    """
    rng = np.random.default_rng(seed)
    dims = dims or {}
    specs = input_specs(model)
    if not any(_no_sample_axis(spec) for spec in specs):
        inputs = {}
        for spec in specs:
            shape = [count]
            for axis, d in enumerate(spec.shape[1:], start=1):
                shape.append(d if isinstance(d, int) and d > 0 else dims.get(str(d), 16))
            inputs[spec.name] = _random_input(spec, shape, rng)
        samples = Samples(inputs, synthetic=True, source="synthetic")
    else:
        shapes = {spec.name: [_synthetic_dim(d, axis, dims) for axis, d in enumerate(spec.shape)] for spec in specs}
        feeds = [{spec.name: _random_input(spec, shapes[spec.name], rng) for spec in specs} for _ in range(count)]
        samples = Samples.from_feeds(feeds, synthetic=True, source="synthetic")
    if warn:
        print(
            "WARNING: no --calib given: using SYNTHETIC random inputs. Ranges, sensitivities and the "
            "plan will not reflect real data.",
            file=sys.stderr,
        )
    return samples


def _no_sample_axis(spec: InputSpec) -> bool:
    """A scalar, or axis 0 fixed to more than one (the batch is elsewhere): no samples on axis 0."""
    return not spec.shape or (isinstance(spec.shape[0], int) and spec.shape[0] > 1)


def _synthetic_dim(dim, axis: int, dims: dict[str, int]) -> int:
    if isinstance(dim, int) and dim > 0:
        return dim
    if isinstance(dim, str) and dim in dims:
        return int(dims[dim])
    return 1 if axis == 0 or (meaningful_dim(dim) and "batch" in dim.lower()) else 16


def _random_input(spec: InputSpec, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """Random values of ``spec``'s dtype, guessed from its name (masks 1, positions 0..n-1)."""
    if spec.dtype.kind == "f":
        return np.asarray(rng.standard_normal(shape)).astype(spec.dtype)
    if spec.dtype.kind == "b" or "mask" in spec.name.lower():
        return np.ones(shape, dtype=spec.dtype)
    if ("type" in spec.name.lower() or "position" in spec.name.lower()) and shape:
        return np.zeros(shape, dtype=spec.dtype) if "type" in spec.name.lower() else \
            np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
    return np.asarray(rng.integers(0, 100, size=shape)).astype(spec.dtype)


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
    Whole feeds are used as they are (``shapes`` then names whole-feed shapes), at most
    ``n_batches`` of them, never repeated.
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
    if samples.whole_feeds:
        return _whole_feeds_for_timing(samples, shapes, n_batches, available)
    if shapes:
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
    if not shapes:
        batch = min(batch, n)  # the default never repeats a sample (a detector's 4 images were timed as 8)
    feeds = []
    for b in range(n_batches):
        rows = (np.arange(batch) + b * batch) % n
        feeds.append({k: np.ascontiguousarray(v[rows]) for k, v in group.items()})
        if not shapes and (b + 1) * batch >= n:
            break  # the default never repeats a sample; a named batch larger than the group does
    info = {"source": source, "shapes": {k: list(v.shape) for k, v in feeds[0].items()},
            "calibration_shapes": [{"shape": a, "samples": c} for a, (_, c) in zip(available, samples.shapes())]}
    return feeds, info


def timing_batch(feeds: list[dict[str, np.ndarray]], info: dict) -> int | None:
    """Samples per run of the timing feeds (:func:`timing_feeds`), the batch the model is timed
    and deployed at; None for whole feeds, each of which is one run as it is."""
    if info.get("whole_feeds") or not feeds or not feeds[0]:
        return None
    return len(next(iter(feeds[0].values())))


def _whole_feeds_for_timing(samples: Samples, shapes: dict[str, tuple[int, ...]] | None, n_batches: int,
                            available: list[dict]) -> tuple[list[dict[str, np.ndarray]], dict]:
    if shapes:
        found = samples.feeds_at(shapes)
        if not found:
            named = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())
            have = "; ".join(", ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in a.items())
                             for a in available)
            raise AmpqError(f"--shape {named}: no calibration feed has this shape (whole feeds are named with "
                            f"their full shape; the feeds have: {have})")
        source = "--shape"
    else:
        found = samples.feeds_at(_shape_map(samples.most_common()))
        source = "most common calibration feed shape"
    # (np.ascontiguousarray would turn a scalar into shape [1])
    feeds = [{k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in f.items()}
             for f in found[:max(1, n_batches)]]
    # one entry per distinct shape (every feed is a group of its own: 64 feeds of one shape are one shape)
    merged: dict[str, dict] = {}
    for a, (_, c) in zip(available, samples.shapes()):
        entry = merged.setdefault(repr(sorted(a.items())), {"shape": a, "samples": 0})
        entry["samples"] += c
    info = {"source": source, "shapes": {k: list(v.shape) for k, v in feeds[0].items()}, "whole_feeds": True,
            "calibration_shapes": list(merged.values())}
    return feeds, info


def _shape_map(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in arrays.items()}
