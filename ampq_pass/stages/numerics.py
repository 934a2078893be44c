"""Numerics: drop the (layer, format) pairs a backend runs far less accurately than the QDQ
model says (issue 14; design.md §3 "Format" and "Verify, repair and report").

The sensitivity stage predicts each format's loss from the QDQ semantics ONNX defines (its
executor computes them as ONNX Runtime does), and the pass verified the loss in ONNX Runtime.
A backend that compiles the QDQ model into kernels of its own does not always compute that:
on an AMD EPYC (no AMX) OpenVINO 2026.4's CPU plugin ran YOLOv8n with every convolution in
``int8_sym`` at a relative output error of 0.207 where ONNX Runtime ran the same file at
0.018. Bisected, one layer at a time: each ``int8_sym`` convolution fed by a Concat (12 of
64) is off by 0.02-0.26 alone on OpenVINO and by 0.0004-0.0033 in ONNX Runtime, and so is
each box-head convolution in ``int8`` with ONNX Runtime's output Q/DQ into the head's Concat
(0.04-0.12 against 0.0005); every other layer agrees to the digit. Such a pair makes a plan
whose predicted and verified loss mean nothing on the device the plan is for.

Definition. For a set ``S`` of layers and one format ``f``, the plan "``S`` in ``f``" is
rewritten and run on one calibration batch by the backend (outputs ``y_b``) and by ONNX
Runtime (``y_r``); ``y`` is the hp model's output in ONNX Runtime. ``S`` is *unfaithful* on the
backend when

    ||y_b - y|| > FACTOR * ||y_r - y|| + TOL * ||y||

(norms over every float output together). Group testing: the set of every layer offered
``f`` is tested; an unfaithful set is halved and each half tested, down to single layers,
which are dropped (``f`` leaves their candidates) unless their error ratio is within
:data:`RATIO_MAX` (below); a set within ``FACTOR`` whose error ratio
is beyond :data:`RATIO_MIN` is halved the same way, but only its single layers unfaithful
alone are dropped (a layer far off alone hides in a set whose reference error is large).
The layers left are then tested together
again (a pair can be unfaithful only beside its neighbours: a Concat quantized when all its
inputs are), for at most :data:`ROUNDS` rounds. A set found unfaithful whose halves are
both faithful, or that the test cap (:data:`MAX_TESTS` per format) or the time allowed leaves
unresolved, is dropped whole and said so: the budget must mean on the device what it says.

A format whose layers are all faithful can still be computed with a somewhat larger error
than the QDQ semantics give (YOLOv8n on OpenVINO, AMD EPYC: a plan of faithful pairs ran at
output error 0.0235 there against 0.0155 in ONNX Runtime, 1.5x): the loss budget would then
mean less on the device than it says.
The ratio ``||y_b - y|| / ||y_r - y||`` of the layers left in a format, tested together, is
kept (:attr:`Numerics.ratios`); beyond :data:`RATIO_MIN` its square scales that format's
sensitivity (:meth:`Numerics.loss_scales`, :func:`scale_sensitivity`): the loss MSE is
quadratic in the output error, to first order the same factor for every layer of the format.

A single layer off alone by a ratio ``||y_b - y|| / ||y_r - y||`` within :data:`RATIO_MAX`
is computed less accurately, not wrongly (YOLOv8n on OpenVINO, AMD EPYC without VNNI: eight
``int8_sym`` convolutions 2.9-27x ONNX Runtime's error alone, where a wrong box-head kernel was
80-240x): it keeps the format, its sensitivity for it scaled by that ratio's square
(:attr:`Numerics.layer_scales`), so the loss budget, not the check, decides whether its speed is
worth its error. Dropping them kept 8 of YOLOv8n's 64 layers hp on OpenVINO, and NVIDIA
ModelOpt's all-int8 plan ran faster there at an error our budgets allowed.

Backends that run the QDQ model as ONNX Runtime's CPU EP does, and cost models, have no
numerics of their own (:attr:`ampq_pass.core.measure.Measurer.own_numerics`): nothing is checked.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ampq_pass.core import ort
from ampq_pass.core.cache import Cache, digest, model_digest
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import HP
from ampq_pass.core.measure import Measurer
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.sensitivity import Sensitivity
from ampq_pass.stages.timing import input_signature

#: bump when the meaning of a cached entry changes
_CACHE_VERSION = 3
#: how much larger than ONNX Runtime's the backend's output error may be (faithful sets measured
#: 0.99-1.01x on YOLOv8n, MiniLM and ResNet-50; the unfaithful ones 10-100x)
FACTOR = 2.0
#: error relative to the output's norm below which any difference is rounding
TOL = 1e-3
#: rounds of "test what is left together" after the single culprits are dropped
ROUNDS = 3
#: the backend's output error over ONNX Runtime's (every faithful layer of a format together)
#: up to which the two agree: faithful sets measured 0.99-1.01x on MiniLM and ResNet-50
RATIO_MIN = 1.1
#: a layer off alone by at most this error ratio keeps the format, its loss scaled (module
#: docstring): YOLOv8n's int8_sym convolutions on OpenVINO were 2.9-27x, its wrong int8 box-head 80-240x
RATIO_MAX = 30.0
#: the reason recorded for such a layer
SCALED = "less accurate alone (kept, its loss scaled)"
#: tests (one rewrite, one compile, one batch in both runtimes) per format at most
MAX_TESTS = 96
#: the reason of a set dropped whole because the time allowed was spent
TIMED_OUT = "not resolved within the time allowed"


@dataclass
class NumericsEntry:
    """One set of layers dropped from one format (or, :data:`SCALED`, one layer kept with its
    loss scaled), with the errors measured on it."""

    format: str
    layers: list[str]
    backend_error: float
    reference_error: float
    #: "unfaithful alone", "unfaithful only together", "not resolved within the test cap",
    #: "not resolved within the time allowed" or :data:`SCALED`
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Numerics:
    """The candidates left per layer and the record of what was dropped."""

    candidates: dict[str, list[str]]
    entries: list[NumericsEntry] = field(default_factory=list)
    tests: int = 0
    checked: list[str] = field(default_factory=list)
    #: format -> the backend's output error over ONNX Runtime's with every layer left in that
    #: format quantized together (absent: no layer left, or both errors at rounding level)
    ratios: dict[str, float] = field(default_factory=dict)

    def loss_scales(self) -> dict[str, float]:
        """format -> the factor its sensitivity takes on this backend: the squared error ratio
        where it exceeds :data:`RATIO_MIN` (the loss MSE is quadratic in the output error)."""
        return {f: r * r for f, r in self.ratios.items() if r > RATIO_MIN}

    @property
    def layer_scales(self) -> dict[str, dict[str, float]]:
        """layer -> format -> the factor its sensitivity takes on this backend: the layers kept
        though off alone (:data:`SCALED` entries), each its squared error ratio."""
        out: dict[str, dict[str, float]] = {}
        for e in self.entries:
            if e.reason == SCALED:
                out.setdefault(e.layers[0], {})[e.format] = _squared_ratio(e)
        return out

    def to_json(self) -> dict:
        return {"checked": list(self.checked), "tests": self.tests, "entries": [e.to_json() for e in self.entries],
                "ratios": dict(self.ratios), "loss_scales": self.loss_scales(),
                "layer_scales": {l: dict(per) for l, per in self.layer_scales.items()}, "summary": self.summary()}

    def summary(self) -> str:
        """One line: which formats were checked, how many layers each lost, in how many tests,
        and the formats whose loss is scaled."""
        if not self.checked:
            return "nothing checked"
        lost = {f: sum(len(e.layers) for e in self.entries if e.format == f and e.reason != SCALED)
                for f in self.checked}
        scales = self.loss_scales()
        parts = []
        for f, n in lost.items():
            part = f"{f}: {n} layer{'s' if n != 1 else ''} dropped" if n else f"{f}: faithful"
            kept = sorted(per[f] for per in self.layer_scales.values() if f in per)
            if kept:
                part += (f"{', ' if n else ' but '}{len(kept)} layer{'s' if len(kept) != 1 else ''} less accurate "
                         f"alone kept (loss scaled by {kept[0]:.3g}-{kept[-1]:.3g})")
            if f in scales:
                part += (f", output error {self.ratios[f]:.2f}x ONNX Runtime's with the rest together "
                         f"(its loss scaled by {scales[f]:.2f})")
            parts.append(part)
        return f"{'; '.join(parts)} ({self.tests} test{'s' if self.tests != 1 else ''} on the backend)"


def scale_sensitivity(sens: Sensitivity, scales: dict[str, float],
                      layer_scales: dict[str, dict[str, float]] | None = None) -> Sensitivity:
    """``sens`` with every layer's estimate for format ``f`` multiplied by ``scales[f]`` or, for
    a layer ``l`` with its own, by the larger of that and ``layer_scales[l][f]`` (its weight,
    activation and total terms alike; the cut states' terms are left as they are)."""
    layer_scales = layer_scales or {}
    if not scales and not layer_scales:
        return sens

    def factor(layer: str, fmt: str) -> float:
        return max(scales.get(fmt, 1.0), layer_scales.get(layer, {}).get(fmt, 1.0))

    def scaled(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {l: {f: v * factor(l, f) for f, v in per.items()} for l, per in table.items()}

    extra = dict(sens.extra, backend_loss_scales=dict(scales))
    if layer_scales:
        extra["backend_layer_loss_scales"] = {l: dict(per) for l, per in layer_scales.items()}
    return dataclasses.replace(sens, values=scaled(sens.values), weight=scaled(sens.weight),
                               activation=scaled(sens.activation), extra=extra)


def less_accurate_scale(entry: NumericsEntry) -> float | None:
    """The factor a layer's loss takes in ``entry``'s format where the entry is one layer off
    alone by an error ratio within :data:`RATIO_MAX` (its square: the loss MSE is quadratic in
    the output error); None where it is dropped."""
    if entry.reason != "unfaithful alone" or len(entry.layers) != 1 or entry.reference_error <= 0:
        return None
    ratio = entry.backend_error / entry.reference_error
    return _squared_ratio(entry) if math.isfinite(ratio) and ratio <= RATIO_MAX else None


def _squared_ratio(entry: NumericsEntry) -> float:
    return (entry.backend_error / entry.reference_error) ** 2


def relative_error(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """``||outputs - reference|| / ||reference||`` over every float output both hold."""
    num = den = 0.0
    for name, ref in reference.items():
        out = outputs.get(name)
        if out is None or np.asarray(ref).dtype.kind != "f" or np.shape(out) != np.shape(ref):
            continue
        r = np.asarray(ref, dtype=np.float64)
        num += float(np.sum((np.asarray(out, dtype=np.float64) - r) ** 2))
        den += float(np.sum(r ** 2))
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


def unfaithful(backend_error: float, reference_error: float) -> bool:
    """Whether the backend's error exceeds the reference's beyond :data:`FACTOR` and :data:`TOL`."""
    return backend_error > FACTOR * reference_error + TOL


def check_numerics(model: onnx.ModelProto, layers: list[Layer], candidates: dict[str, list[str]],
                   ranges: Ranges, backend: Measurer, batch: dict[str, np.ndarray], *, rules=None,
                   cache: Cache | None = None, max_tests: int = MAX_TESTS, progress=None,
                   seconds: float | None = None) -> Numerics:
    """The candidates with every (layer, format) pair the backend runs unfaithfully removed
    (module docstring). ``batch``: one batch of calibration feeds. ``progress``: called with
    the number of tests after each one (a progress bar's update), or None. ``seconds``: the
    time the check may take (each test compiles the whole model: seconds on a large one); a
    set still unfaithful when it is spent is dropped whole, like one the test cap leaves."""
    if not getattr(backend, "own_numerics", False):  # runs QDQ as ONNX Runtime does: nothing to check
        return Numerics({l: list(fs) for l, fs in candidates.items()})
    reference = ort.run_batches(model, [batch])[0]
    formats = sorted({f for fs in candidates.values() for f in fs if f != HP})
    result = Numerics({l: list(fs) for l, fs in candidates.items()}, checked=formats)
    deadline = None if seconds is None else time.monotonic() + seconds
    for fmt in formats:
        offered = [layer.name for layer in layers if fmt in candidates.get(layer.name, ())]
        # the ranges stand for the calibration set the batch is taken from
        key = digest("numerics", _CACHE_VERSION, model_digest(model), fmt, offered, ranges.to_json(),
                     input_signature([batch]), backend.key(), getattr(rules, "name", None))

        got = cache.get("numerics", key) if cache is not None else None
        if got is None:
            dropped, tests, ratio = _group_test(model, layers, fmt, offered, ranges, backend, batch, reference,
                                                rules, max_tests, progress, deadline)
            got = {"tests": tests, "entries": [e.to_json() for e in dropped], "ratio": ratio}
            # not through ``cached``: a result the time allowance cut short is not kept, so a run
            # with more time resolves what this one dropped whole
            if cache is not None and not any(e["reason"] == TIMED_OUT for e in got["entries"]):
                cache.put("numerics", key, got)
        result.tests += int(got["tests"])
        if got.get("ratio") is not None:
            result.ratios[fmt] = float(got["ratio"])
        for e in got["entries"]:
            entry = NumericsEntry(**e)
            # kept, the budget decides; decided after the cache (its entries keep the raw reason),
            # so a change of RATIO_MAX needs no new cache version
            if less_accurate_scale(entry) is not None:
                result.entries.append(dataclasses.replace(entry, reason=SCALED))
                continue
            result.entries.append(entry)
            for name in entry.layers:
                result.candidates[name] = [f for f in result.candidates.get(name, []) if f != fmt]
    return result


def _group_test(model, layers, fmt, offered, ranges, backend, batch, reference, rules, max_tests,
                progress, deadline) -> tuple[list[NumericsEntry], int, float | None]:
    tests = 0
    memo: dict[tuple[str, ...], tuple[bool, float, float]] = {}

    def test(names: list[str]) -> tuple[bool, float, float]:
        nonlocal tests
        key = tuple(names)
        if key not in memo:
            quantized = rewrite(model, layers, Plan({n: fmt for n in names}, {}), ranges, rules=rules)
            try:
                eb = relative_error(backend.outputs(quantized, [batch])[0], reference)
            except AmpqError:  # the backend cannot compile or run it: as far off as can be
                eb = math.inf
            er = relative_error(ort.run_batches(quantized, [batch])[0], reference)
            memo[key] = (unfaithful(eb, er), eb, er)
            tests += 1
            if progress is not None:
                progress(tests)
        return memo[key]

    dropped: list[NumericsEntry] = []

    def bisect(names: list[str]) -> None:
        bad, eb, er = test(names)
        # A set within FACTOR but beyond RATIO_MIN is searched too: one layer far off alone can
        # hide in a set whose reference error is large (PaddleOCR's detector on OpenVINO: every
        # int8_sym layer together 1.86x ONNX Runtime's error, Conv_50 alone 47x); only single
        # layers unfaithful alone are dropped from such a set, never the set itself.
        suspect = not bad and len(names) > 1 and er > TOL and math.isfinite(eb) and eb > RATIO_MIN * er
        if not bad and not suspect:
            return
        if len(names) == 1:
            dropped.append(NumericsEntry(fmt, names, eb, er, "unfaithful alone"))
            return
        if tests + 2 > max_tests:
            if bad:
                dropped.append(NumericsEntry(fmt, names, eb, er, "not resolved within the test cap"))
            return
        if deadline is not None and time.monotonic() > deadline:
            if bad:
                dropped.append(NumericsEntry(fmt, names, eb, er, TIMED_OUT))
            return
        half = len(names) // 2
        before = len(dropped)
        for part in (names[:half], names[half:]):
            bisect(part)
        if bad and len(dropped) == before:  # both halves faithful: the set is unfaithful only as a whole
            dropped.append(NumericsEntry(fmt, names, eb, er, "unfaithful only together"))

    left = list(offered)
    for _ in range(ROUNDS):
        if not left or tests >= max_tests:
            break
        before = len(dropped)
        bisect(left)
        if len(dropped) == before:
            break
        gone = {n for e in dropped for n in e.layers}
        left = [n for n in left if n not in gone]
    ratio = None
    if left and (tuple(left) in memo or tests < max_tests):  # the faithful rest, together
        _, eb, er = test(left)
        if er > TOL and math.isfinite(eb):  # below TOL both are rounding: no ratio to speak of
            ratio = eb / er
    return dropped, tests, ratio
