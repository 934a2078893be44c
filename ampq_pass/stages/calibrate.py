"""Calibrate: activation ranges from ONNX Runtime's own calibrators (MinMax, Percentile,
Entropy), and the clipped ranges of weight blocks that formats search against the layer's
calibration inputs (int4: :meth:`ampq_pass.core.formats.Int4.search_clip`), kept as plain
data. Sensitivity, timing and rewrite all derive their scales from the same :class:`Ranges`,
computed once and cached.
"""

from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from ampq_pass.core.cache import Cache, cached, digest, model_digest
from ampq_pass.core.errors import AmpqError, runtime_errors
from ampq_pass.core.formats import FORMATS
from ampq_pass.core.graph import initializers
from ampq_pass.core.memory import release_freed_memory
from ampq_pass.core.fusion import FusionRules, rule_tensors
from ampq_pass.core.ort import run_exposed
from ampq_pass.core.proto import fits_protobuf, save_external
from ampq_pass.core.samples import Samples, samples_digest
from ampq_pass.stages.layers import Layer

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
#: ONNX Runtime's working set per calibration run is bounded by running batches whose
#: inputs stay under this share of the memory budget (activations are ~this factor larger).
DEFAULT_MEMORY_BUDGET = 1 << 30
_ACTIVATIONS_PER_INPUT_BYTE = 64


def calibration_batches(samples: Samples, batch_size: int, memory_budget: int = DEFAULT_MEMORY_BUDGET):
    """``samples`` in batches of ``batch_size``, each split into sub-batches whose inputs are at
    most ``memory_budget / 64`` bytes (one sample at a time for large images)."""
    for batch in samples.batches(batch_size):
        if samples.whole_feeds:  # a whole feed has no sample axis to split
            yield batch
            continue
        n = len(next(iter(batch.values())))
        per_sample = sum(v[:1].nbytes for v in batch.values())
        sub = int(max(1, min(n, memory_budget // max(1, _ACTIVATIONS_PER_INPUT_BYTE * per_sample))))
        for start in range(0, n, sub):
            yield {k: v[start:start + sub] for k, v in batch.items()}


def required_ranges(layers: list[Layer]) -> list[str]:
    """Activation tensors whose range any plan over ``layers`` may need (each candidate
    format says which tensors of a layer it quantizes)."""
    names: set[str] = set()
    for layer in layers:
        for f in layer.formats:
            names.update(FORMATS[f].calibrated_tensors(layer))
    return sorted(names)


@dataclass
class Ranges:
    """Calibrated [lowest, highest] of activation tensors, by tensor name; and the clip ratios of
    weight blocks, by (weight tensor, format), for the formats that search them."""

    method: str
    tensors: dict[str, tuple[float, float]] = field(default_factory=dict)
    clips: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def __getitem__(self, name: str) -> tuple[float, float]:
        try:
            return self.tensors[name]
        except KeyError:
            raise AmpqError(f"no calibrated range for tensor {name!r}; was it calibrated?") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def clip(self, weight: str, fmt: str) -> np.ndarray | None:
        """The calibrated clip ratios of ``weight`` in format ``fmt``; None: round to nearest."""
        return self.clips.get((weight, fmt))

    def to_json(self) -> dict:
        # clip ratios are multiples of 0.05 (the formats' grids): stored exactly as uint8 percent
        clips = [{"weight": w, "format": f, "shape": list(r.shape),
                  "percent": base64.b64encode(np.rint(r * 100).astype(np.uint8).tobytes()).decode()}
                 for (w, f), r in sorted(self.clips.items())]
        return {"method": self.method, "tensors": {k: list(v) for k, v in self.tensors.items()}, "clips": clips}

    @classmethod
    def from_json(cls, data: dict) -> "Ranges":
        clips = {(c["weight"], c["format"]): (np.frombuffer(base64.b64decode(c["percent"]), np.uint8)
                                              .reshape(c["shape"]).astype(np.float32) / np.float32(100))
                 for c in data.get("clips", [])}
        return cls(data["method"], {k: (float(a), float(b)) for k, (a, b) in data["tensors"].items()}, clips)


def calibrate(model: onnx.ModelProto, samples: Samples, tensors: list[str], *, method: str = "minmax",
              batch_size: int = 8, percentile: float = 99.999, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Ranges:
    """Ranges of ``tensors`` over ``samples`` with ONNX Runtime's calibrator for ``method``.

    Streaming: the calibrator is fed one (sub-)batch per ``collect_data`` call, so what it
    keeps between batches is its running min/max or histograms, never the activations of
    every batch (ONNX Runtime's histogram calibrators otherwise hold every exposed tensor of
    every batch until the end); batches are split so that their inputs fit ``memory_budget / 64``.
    MinMax ranges do not depend on the split; histograms are merged batch by batch as
    ONNX Runtime merges them across ``collect_data`` calls.
    """
    from onnxruntime.quantization import calibrate as ort_calibrate

    if method not in CALIBRATION_METHODS:
        raise AmpqError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    wanted = set(tensors)

    class Reader(ort_calibrate.CalibrationDataReader):
        def __init__(self, batch):
            self._it = iter([batch])

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
        large = not fits_protobuf(model)
        if large:
            save_external(model, src, "model.onnx.data")
        else:
            onnx.save_model(model, str(src))
        with runtime_errors("model"):
            op_types = sorted({n.op_type for n in model.graph.node if set(n.input) & wanted or set(n.output) & wanted})
            calibrator = Narrowed(src, op_types, str(Path(tmp) / "augmented.onnx"),
                                  use_external_data_format=large, **options)
            calibrator.augment_graph()
            calibrator.execution_providers = ["CPUExecutionProvider"]
            calibrator.create_inference_session()
            for batch in calibration_batches(samples, batch_size, memory_budget):
                calibrator.collect_data(Reader(batch))
            data = calibrator.compute_data()
            del calibrator
    release_freed_memory()  # the calibrator's session and augmented model, before sensitivity
    found = {}
    for name in wanted:
        if name in data:
            lo, hi = data[name].range_value
            found[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
    missing = wanted - set(found)
    if missing:
        raise AmpqError(f"calibrator produced no range for tensor {sorted(missing)[0]!r}")
    return Ranges(method, dict(sorted(found.items())))


def _token_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """``x`` [..., K] as [ceil(K/block), tokens, block] (K padded with zeros, as the block quantizer pads)."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
    pad = (-x.shape[1]) % block
    if pad:
        x = np.pad(x, ((0, 0), (0, pad)))
    return x.reshape(x.shape[0], -1, block).transpose(1, 0, 2)


def _block_grams(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums over the tokens of ``x`` [..., K], for each block b of ``block`` along K, of x_b x_b^T
    and of (x_b * x_b)(x_b * x_b)^T (what :func:`shrunk_second_moment` reads): two
    [ceil(K/block), block, block] arrays."""
    xb = _token_blocks(x, block)
    sq = np.square(xb)
    return (np.matmul(xb.transpose(0, 2, 1), xb).astype(np.float64),
            np.matmul(sq.transpose(0, 2, 1), sq).astype(np.float64))


def shrunk_second_moment(sum_xx: np.ndarray, sum_x2x2: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each block's second-moment matrix with its off-diagonal entries shrunk toward zero.

    For each block, with tokens x_1..x_n of dimension B, ``sum_xx`` = sum_k x_k x_k^T and
    ``sum_x2x2`` = sum_k (x_k * x_k)(x_k * x_k)^T (both [blocks, B, B]):

        S = sum_xx / n,  D = diag(S),
        var_ij = (sum_x2x2_ij - n S_ij^2) / n^2   (the estimated variance of S_ij),
        lam = min(1, sum_{i != j} var_ij / sum_{i != j} S_ij^2),
        returns  lam D + (1 - lam) S,  and lam [blocks]

    (Schafer and Strimmer, "A shrinkage approach to large-scale covariance matrix estimation",
    2005, target D: the diagonal kept, the off-diagonal shrunk by as much as the tokens leave
    it uncertain), for the uncentred second moment. Why: the int4 clip search weighs a
    block's rounding error by S, and with fewer tokens than B (a decode step calibrated on 16
    tokens, blocks of 128) S has rank n and the search fits the few directions they span;
    each channel's energy (the diagonal, what activation-aware methods weigh) is estimated
    well from few tokens, the correlations are not. Many tokens: lam -> 0, S itself. A target
    of the identity (Ledoit and Wolf) loses the channels' energies: on synthetic tokens (24
    for calibration, blocks of 128, six seeds) with independent channels of lognormal scales
    it erred 4-14% more on held-out inputs than the unshrunk search, this target 5-11% less;
    with correlated channels (a low-rank mix) this target ranged from 5% less to 6% more.
    sklearn's estimators need the tokens themselves; calibration keeps only these two sums."""
    n = max(int(n), 1)
    s = np.asarray(sum_xx, np.float64) / n
    var = (np.asarray(sum_x2x2, np.float64) - n * np.square(s)) / n ** 2
    off = ~np.eye(s.shape[-1], dtype=bool)
    spread = np.square(s[:, off]).sum(axis=1)
    lam = np.clip(np.maximum(var[:, off], 0.0).sum(axis=1) / np.where(spread > 0, spread, 1.0), 0.0, 1.0)
    lam = np.where(spread > 0, lam, 0.0)
    diag = np.einsum("bii->bi", s)[:, :, None] * np.eye(s.shape[-1])[None]
    return lam[:, None, None] * diag + (1.0 - lam[:, None, None]) * s, lam


def _clip_searches(layers: list[Layer], formats: Iterable[str] | None) -> dict[tuple[str, str], list[Layer]]:
    """(weight, format) -> the layers reading that weight, for each candidate format of
    ``formats`` (None: any) that searches its clipping."""
    wanted: dict[tuple[str, str], list[Layer]] = {}
    for layer in layers:
        if layer.weight is None:
            continue
        for f in layer.formats:
            if FORMATS[f].clip_block and (formats is None or f in formats):
                wanted.setdefault((layer.weight, f), []).append(layer)
    return wanted


def search_clips(model: onnx.ModelProto, layers: list[Layer], samples: Samples, *,
                 formats: Iterable[str] | None = None, batch_size: int = 8,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict[tuple[str, str], np.ndarray]:
    """Clip ratios of every (weight, format) where a layer's candidate format (of ``formats``;
    None: any) searches them (:attr:`~ampq_pass.core.formats.Format.clip_block`), from the
    per-block second moments of the layer's input over ``samples``, shrunk by
    :func:`shrunk_second_moment`. A weight read by several layers is searched against the sum
    of their inputs' moments (one stored weight serves them all)."""
    wanted = _clip_searches(layers, None if formats is None else set(formats))
    if not wanted:
        return {}
    blocks: dict[str, set[int]] = {}
    for (_, f), users in wanted.items():
        for layer in users:
            blocks.setdefault(layer.activation, set()).add(FORMATS[f].clip_block)
    sums: dict[tuple[str, int], np.ndarray] = {}
    squares: dict[tuple[str, int], np.ndarray] = {}
    tokens: dict[str, int] = {}
    names = sorted(blocks)
    for _, values in run_exposed(model, calibration_batches(samples, batch_size, memory_budget), names,
                                 what="model (clip search)"):
        for name, x in values.items():
            tokens[name] = tokens.get(name, 0) + int(np.prod(x.shape[:-1]))
            for b in blocks[name]:
                g, q = _block_grams(np.asarray(x), b)
                sums[(name, b)] = g if (name, b) not in sums else sums[(name, b)] + g
                squares[(name, b)] = q if (name, b) not in squares else squares[(name, b)] + q
    inits = initializers(model)
    clips = {}
    for (weight, f), users in sorted(wanted.items()):
        fmt = FORMATS[f]
        w = onnx.numpy_helper.to_array(inits[weight]).astype(np.float32, copy=False)
        gram = sum(shrunk_second_moment(sums[(layer.activation, fmt.clip_block)],
                                        squares[(layer.activation, fmt.clip_block)], tokens[layer.activation])[0]
                   for layer in users)
        clips[(weight, f)] = fmt.search_clip(w, gram)
    return clips


def compute_ranges(model: onnx.ModelProto, layers: list[Layer], samples: Samples, *, method: str = "minmax",
                   batch_size: int = 8, cache: Cache | None = None, rules: FusionRules | None = None,
                   clip_formats: Iterable[str] | None = None) -> Ranges:
    """Calibrated ranges of every activation a plan over ``layers`` may quantize (and, with a
    backend's fusion ``rules``, the tensors between layers that a rewrite following them may
    quantize: :func:`ampq_pass.core.fusion.rule_tensors`).

    Also the clip ratios of the weights whose candidate formats search them (:func:`search_clips`),
    for the formats of ``clip_formats`` (None: all; a backend passes the formats it offers; an
    empty one: none, and those formats round to nearest).

    Computed once per (model, samples, method) and kept in ``cache``: sensitivity, timing
    and rewrite all read these same ranges.
    """
    needed = required_ranges(layers)
    tensors = sorted(set(needed) | set(rule_tensors(model, rules, needed)))
    clip_formats = None if clip_formats is None else sorted(set(clip_formats))
    searched = sorted(_clip_searches(layers, clip_formats))
    key = digest("ranges", model_digest(model), samples_digest(samples), method, batch_size, tensors, "clips", 2,
                 searched)

    def compute() -> Ranges:
        ranges = calibrate(model, samples, tensors, method=method, batch_size=batch_size)
        if searched:
            ranges.clips = search_clips(model, layers, samples, formats=clip_formats, batch_size=batch_size)
        return ranges

    ranges, _ = cached(cache, "ranges", key, compute, dump=Ranges.to_json, load=Ranges.from_json)
    return ranges
