"""The backend interface (design.md §4) and the timing protocol shared by all adapters.

It lives in core because the timing stage programs against it while the adapters
(``ampq_pass.backends``) sit above the stages: the gaudi adapter lowers graphs through the
sensitivity executor's op table and the cost models count MACs with the layer stage.

A :class:`Backend` times several configurations of one subgraph *together*: every round
runs each configuration once, in a rotating order, so drift of a shared, noisy machine
(frequency scaling, other processes) hits all configurations alike and per-round
differences cancel it. A :class:`CostModel` answers the same question from a formula
(MAC counts, bytes) and needs no hardware; both produce the same gain table.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx

from ampq_pass.core.fusion import FusionRules


#: two-sided 95% normal quantile, for the order-statistic confidence interval of a median
_Z95 = 1.959963984540054


def median_ci(samples: list[float] | np.ndarray, z: float = _Z95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median from order statistics.

    The number of samples below the true median is Binomial(n, 1/2); with its normal
    approximation the interval is [x_(j), x_(k)] with j, k = n/2 -+ z*sqrt(n)/2. Timing
    samples are skewed (a run can only be slowed down), so a mean +- sd interval would
    be wrong; order statistics need no distribution.
    """
    a = np.sort(np.asarray(samples, dtype=float))
    n = len(a)
    if n == 0:
        return (math.nan, math.nan)
    half = z * math.sqrt(n) / 2.0
    lo = max(int(math.floor(n / 2.0 - half)), 0)
    hi = min(int(math.ceil(n / 2.0 + half)), n - 1)
    return float(a[lo]), float(a[hi])


@dataclass
class Timing:
    """Seconds (or cost units) per run: median, its 95% CI, p90-p10 spread and every sample.

    ``samples`` are kept in round order: sample ``r`` of two configurations timed by
    :func:`interleave` ran in the same round, which lets callers pair them.
    """

    median: float
    ci_low: float
    ci_high: float
    spread: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        a = np.asarray(samples, dtype=float)
        lo, hi = median_ci(a)
        return cls(float(np.median(a)), lo, hi, float(np.percentile(a, 90) - np.percentile(a, 10)),
                   [float(x) for x in a])

    @classmethod
    def exact(cls, value: float) -> "Timing":
        """A cost without noise (cost models)."""
        return cls(float(value), float(value), float(value), 0.0, [float(value)])

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2.0

    @property
    def p10(self) -> float:
        return float(np.percentile(self.samples, 10))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.samples, 90))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Timing":
        return cls(float(data["median"]), float(data["ci_low"]), float(data["ci_high"]), float(data["spread"]),
                   [float(x) for x in data.get("samples", [])])


#: fewest rounds for a paired speed-up interval (below, the medians' own intervals are used)
MIN_PAIRED = 5


def paired_ratio(base: Timing, other: Timing) -> tuple[float, float, float] | None:
    """``(median, ci_low, ci_high)`` of the per-round ratios ``base / other`` of two timings from
    the same interleaved rounds (:func:`interleave` keeps samples in round order), the interval
    by :func:`median_ci`; None when they are not paired (unequal sample counts, or fewer than
    :data:`MIN_PAIRED`).

    On a shared machine a burst of load slows every configuration of a round alike: the ratio
    of a round cancels it, where the two medians' own intervals each carry it (det model of
    PaddleOCR, 50 rounds: medians' intervals gave 1.045-1.287x, the paired ratios 1.125-1.196x).
    """
    if len(base.samples) != len(other.samples) or len(base.samples) < MIN_PAIRED:
        return None
    r = np.asarray(base.samples, dtype=float) / np.asarray(other.samples, dtype=float)
    lo, hi = median_ci(r)
    return float(np.median(r)), lo, hi


@dataclass(frozen=True)
class Protocol:
    """How long to measure: warm-up runs, then rounds until every configuration's median
    is known to within ``rel_ci`` (95% CI half-width / median), or a cap is hit; never fewer
    than ``min_repeats`` rounds."""

    warmup: int = 3
    min_repeats: int = 7
    max_repeats: int = 50
    rel_ci: float = 0.02
    #: wall-clock cap per attempt (seconds); ``None``: no cap
    max_seconds: float | None = 60.0
    #: further attempts when the cap is hit before the CI is tight (a burst of load from
    #: another process slows a whole stretch of rounds; a later attempt may miss it). The
    #: attempt with the tightest CI is kept.
    retries: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    def key(self) -> dict:
        """What a measurement's result depends on, for cache keys: the caps on effort (wall
        clock, retries) are left out, so a run with another time budget, or one resumed after
        an interruption, reads the measurements already made instead of repeating them."""
        return {k: v for k, v in asdict(self).items() if k not in ("max_seconds", "retries")}


def interleave(runners: Mapping[str, Callable[[int], None]], protocol: Protocol, *, n_inputs: int = 1,
               clock: Callable[[], float] = time.perf_counter,
               sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time ``runners`` round-robin by ``protocol``; ``runner(i)`` runs once on input batch ``i``.

    Round ``r`` feeds batch ``r % n_inputs`` to every runner, so configurations are paired
    on identical inputs; the order inside a round rotates so that no configuration always
    runs right after the same neighbour (cache warmth, thread wake-up). ``sync`` is called
    after each run, inside the timed region, for asynchronous devices.
    """
    if not runners:
        return {}
    best: dict[str, Timing] | None = None
    for _ in range(protocol.retries + 1):
        got = _attempt(runners, protocol, n_inputs, clock, sync)
        if best is None or worst_rel_ci(got) < worst_rel_ci(best):
            best = got
        if worst_rel_ci(best) <= protocol.rel_ci:
            break
    return best


def worst_rel_ci(timings: Mapping[str, Timing]) -> float:
    """The largest CI half-width relative to its median among ``timings``."""
    return max((t.half_width / t.median if t.median > 0 else math.inf) for t in timings.values())


def _attempt(runners, protocol: Protocol, n_inputs: int, clock, sync) -> dict[str, Timing]:
    keys = list(runners)
    for key in keys:  # warm-up: first runs allocate, pre-pack weights and JIT kernels
        for i in range(protocol.warmup):
            runners[key](i % n_inputs)
            if sync:
                sync()
    samples: dict[str, list[float]] = {k: [] for k in keys}
    start = clock()
    for rnd in range(protocol.max_repeats):
        batch = rnd % n_inputs
        shift = rnd % len(keys)
        for key in keys[shift:] + keys[:shift]:
            t0 = clock()
            runners[key](batch)
            if sync:
                sync()
            samples[key].append(clock() - t0)
        if rnd + 1 < protocol.min_repeats:  # a median of fewer rounds says too little, whatever the cap
            continue
        if _tight(samples, protocol.rel_ci):
            break
        if protocol.max_seconds is not None and clock() - start > protocol.max_seconds:
            break
    return {k: Timing.of(v) for k, v in samples.items()}


def _tight(samples: dict[str, list[float]], rel_ci: float) -> bool:
    for values in samples.values():
        lo, hi = median_ci(values)
        med = float(np.median(values))
        if med <= 0 or (hi - lo) / 2.0 > rel_ci * med:
            return False
    return True


@dataclass(frozen=True)
class Capabilities:
    """Formats a backend runs *fast* (never ones it would emulate slowly), its high-precision
    format and the device it runs on."""

    formats: tuple[str, ...]
    hp: str
    device: str
    #: the ops between layers it fuses in 8 bits (:mod:`ampq_pass.core.fusion`); None: none
    rules: FusionRules | None = None
    #: whether its 8-bit formats run a MatMul of two activations (attention scores and context)
    #: in an integer kernel, so the pass treats those MatMuls as layers unless told otherwise
    activation_matmuls: bool = False

    def filter(self, formats: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """``formats`` restricted to what this backend offers, in the caller's order."""
        return tuple(f for f in formats if f in self.formats)


class Measurer(ABC):
    """What the gain table is built with: a :class:`Backend` or a :class:`CostModel`."""

    name: str = ""
    #: unit of the numbers it produces
    unit: str = ""

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """The formats it runs fast, its high-precision format and its device."""

    def check_runs(self, model: onnx.ModelProto, where: str, feeds: dict[str, np.ndarray] | None = None) -> None:
        """Raise :class:`AmpqError` naming ``where`` when this measurer cannot run ``model`` (on
        ``feeds``, a batch of samples, where given). Checked once, before any work: a subgraph
        refused after minutes of timing names a part the user never saw. Default (cost models,
        ONNX Runtime, whose first session in calibration says so within seconds): nothing to check."""

    #: whether it compiles a QDQ model into kernels of its own and may compute something else
    #: than the QDQ semantics the sensitivity stage models (OpenVINO, ONNX Runtime's GPU
    #: providers): then :meth:`outputs` gives what it computes. False: it runs them as ONNX
    #: Runtime's CPU EP does, or runs nothing (cost models).
    own_numerics: bool = False

    def outputs(self, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]] | None:
        """``model``'s outputs on each batch as this backend computes them (by output name) where
        it has :attr:`own_numerics`; None otherwise. The numerics check
        (:mod:`ampq_pass.stages.numerics`) and the verified loss read them."""
        return None

    @abstractmethod
    def key(self) -> dict:
        """Everything a measurement depends on besides the model: backend, provider, device,
        library versions, threads, protocol. Part of every cache key."""

    def deployed(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` as the pass writes it for this backend: the file its users load. The pass
        verifies this form, so what it measures is what it writes. Default: ``model`` itself."""
        return model


class Backend(Measurer):
    """Something that measures subgraph configurations on hardware."""

    unit = "s"

    def time_each(self, jobs: dict[str, tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]]) -> dict[str, Timing]:
        """Time different models, each on its own inputs, interleaved in the same rounds.

        Used to put every subgraph's hp time and the whole model's on one scale (a load
        burst while one subgraph's configurations were timed then cannot inflate its
        weight). Backends that cannot do this raise NotImplementedError; the gain table
        then keeps each subgraph's own hp time."""
        raise NotImplementedError

    @abstractmethod
    def time(self, models: dict[str, onnx.ModelProto], inputs: list[dict[str, np.ndarray]]) -> dict[str, Timing]:
        """Time every model (configurations of one subgraph) interleaved, on ``inputs``."""


class CostModel(Measurer):
    """A formula instead of a measurement; same table shape, no hardware, no noise."""

    @abstractmethod
    def cost(self, model: onnx.ModelProto, layers: list, formats: dict[str, str],
             inputs: list[dict[str, np.ndarray]]) -> float:
        """Cost of one run of ``model`` (a subgraph or the whole model) with ``formats``
        applied to ``layers`` (:class:`ampq_pass.stages.layers.Layer`; layers not named stay hp)."""


def quick_protocol(protocol: Protocol) -> Protocol:
    """A cheaper version of ``protocol``: one warm-up, 5 to 9 rounds, no retries."""
    return dataclasses.replace(protocol, warmup=min(protocol.warmup, 1), min_repeats=min(protocol.min_repeats, 5),
                               max_repeats=min(protocol.max_repeats, 9), rel_ci=max(protocol.rel_ci, 0.05),
                               max_seconds=min(protocol.max_seconds or 10.0, 10.0), retries=0)


def split_time(backend: "Measurer", parts: int, *, floor: float = 10.0) -> "Measurer":
    """``backend`` whose protocol gives each of ``parts`` measurements an equal share of one
    attempt's wall-clock cap (at least ``floor`` seconds each, no retries): a measurement cut
    into parts for memory's sake then takes about as long as it did whole. The floor never
    exceeds the cap itself: a backend already held to a spent allowance (:func:`within`) stays so."""
    protocol = getattr(backend, "protocol", None)
    if parts <= 1 or not isinstance(protocol, Protocol) or protocol.max_seconds is None:
        return backend
    return within(backend, max(min(floor, protocol.max_seconds), protocol.max_seconds / parts))


def within(backend: "Measurer", seconds: float) -> "Measurer":
    """``backend`` whose protocol stops each attempt after ``seconds`` of rounds (never before
    its ``min_repeats``; no retries): how a time allowance is spent on a measurement."""
    protocol = getattr(backend, "protocol", None)
    if not isinstance(protocol, Protocol):
        return backend
    cap = max(float(seconds), 0.0)
    if protocol.max_seconds is not None:
        cap = min(protocol.max_seconds, cap)
    return with_protocol(backend, dataclasses.replace(protocol, max_seconds=cap, retries=0))


def with_protocol(backend, protocol: Protocol):
    """A shallow copy of ``backend`` timing with ``protocol`` (backends without one: itself)."""
    if isinstance(backend, CostModel) or not isinstance(getattr(backend, "protocol", None), Protocol):
        return backend
    own = getattr(type(backend), "with_protocol", None)
    if own is not None:  # a wrapper (a meter) that forwards to the backend it holds
        return own(backend, protocol)
    quick = copy.copy(backend)
    quick.protocol = protocol
    return quick
