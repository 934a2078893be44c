"""Search the Pareto front with the user's own metric (issue 17).

The loss budget of the integer program is the pass's own unit (predicted loss MSE). A user
usually has a metric of their own (accuracy, embedding cosine, BLEU) and a drop of it that
they accept. :func:`search_front` walks the front the solver predicts (one plan per loss
budget, gain non-decreasing along it) and bisects over it: each step rewrites one plan,
evaluates the user's metric on the written model and times it on the backend. The drop
``metric(hp) - metric(plan)`` is taken as non-decreasing along the front (more loss, less
metric), so ``1 + ceil(log2(n))`` evaluations find the last plan within the bound.
The front's budgets are spaced geometrically, so its plans lie far apart where the loss is
large - where a metric bound usually falls: the search then solves plans *between* the last
plan within the bound and the first over it (:func:`plan_between`) and bisects on, a few steps.

Timing is done in two passes (design.md §3 "Timing protocol"): every plan tried is timed
with a *quick* protocol (few repeats, a wide confidence interval); only the plans that can
still decide the choice - within the metric bound, and with a quick speed-up that reaches the
confidence interval of the best plan measured in full so far - are timed again with the
backend's full protocol, fastest first. The chosen plan must be
faster than the input beyond the noise on the full measurement (the never-slower rule).
:class:`Meter` counts seconds and timed runs of both, for the report's saving.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.measure import CostModel, Protocol, quick_protocol, with_protocol  # noqa: F401 (re-exported)
from ampq_pass.stages.solve import Solution
from ampq_pass.stages.verify import speedup_interval

Metric = Callable[[str], float]


# ----------------------------------------------------------------------------- the metric

def load_metric(spec: str) -> Metric:
    """``"package.module:function"`` or ``"path/to/script.py:function"`` -> the function.

    The function takes the path of an ONNX model and returns a float, higher is better.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise AmpqError(f"metric {spec!r}: expected MODULE:FUNCTION or path/to/script.py:FUNCTION")
    target, _, name = spec.rpartition(":")
    if not target or not name.isidentifier():
        raise AmpqError(f"metric {spec!r}: expected MODULE:FUNCTION or path/to/script.py:FUNCTION")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise AmpqError(f"metric {spec!r}: script {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"ampq_user_metric_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's script: say which and why, in one line
            raise AmpqError(f"metric {spec!r}: importing {path} failed ({type(exc).__name__}: {exc})") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise AmpqError(f"metric {spec!r}: cannot import module {target!r} ({exc})") from exc
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise AmpqError(f"metric {spec!r}: {target} has no callable {name!r}")
    return fn


def metric_name(metric) -> str:
    if isinstance(metric, str):
        return metric
    return getattr(metric, "name", None) or getattr(metric, "__qualname__", None) or type(metric).__name__


def evaluate_metric(metric: Metric, path: str | Path) -> float:
    """``metric(path)`` as a finite float; anything else is the user's error, named."""
    try:
        value = metric(str(path))
    except AmpqError:
        raise
    except Exception as exc:
        raise AmpqError(f"metric {metric_name(metric)} failed on {path} ({type(exc).__name__}: {exc})") from exc
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise AmpqError(f"metric {metric_name(metric)} returned {value!r} for {path}; expected a number") from None
    if not math.isfinite(value):
        raise AmpqError(f"metric {metric_name(metric)} returned {value} for {path}; expected a finite number")
    return value


# ----------------------------------------------------------------------------- timing cost

class Meter:
    """A backend that counts what its end-to-end timings cost: seconds, timed runs (repeats
    and warm-ups of every model) and measurements (calls of :meth:`time`)."""

    def __init__(self, backend, *, counts_into: "Meter | None" = None):
        self.inner = backend
        self.counts_into = counts_into
        self.seconds = 0.0
        self.runs = 0
        self.measurements = 0
        #: models timed, summed over measurements (a plan's check times two: hp and the plan)
        self.models = 0

    def __getattr__(self, name):
        if name in ("inner", "counts_into"):  # not set yet (copy.copy builds without __init__)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def with_protocol(self, protocol):
        """This meter's backend timing with ``protocol`` (:func:`ampq_pass.core.measure.with_protocol`),
        its costs counted here too."""
        return Meter(with_protocol(self.inner, protocol), counts_into=self)

    def time(self, models, inputs):
        t0 = time.perf_counter()
        out = self.inner.time(models, inputs)
        elapsed = time.perf_counter() - t0
        warmup = getattr(getattr(self.inner, "protocol", None), "warmup", 0)
        meter = self
        while meter is not None:
            meter.seconds += elapsed
            meter.runs += sum(len(t.samples) + warmup for t in out.values())
            meter.measurements += 1
            meter.models += len(out)
            meter = meter.counts_into
        return out

    def to_json(self) -> dict:
        return {"seconds": round(self.seconds, 3), "runs": self.runs, "measurements": self.measurements}


def timed_backend(backend):
    """``backend`` wrapped in a :class:`Meter`, unless it is a cost model (nothing is timed)."""
    return backend if isinstance(backend, CostModel) else Meter(backend)


def timing_saving(quick, full, *, remeasured: int) -> dict:
    """What timing plans with the quick protocol first saved against timing every one of them
    with the full protocol: ``remeasured`` of the quick measurements were repeated with the
    full protocol; a full measurement's cost is the mean of those made by ``full``."""
    if not isinstance(quick, Meter) or not isinstance(full, Meter):
        return {"note": "cost-model backend: nothing timed"}
    out = {"quick": quick.to_json(), "full": full.to_json(), "remeasured": remeasured,
           "full_measurements_saved": max(quick.measurements - remeasured, 0)}
    if full.models:
        # per model timed, times two (hp and the plan): the loop's context timings time many
        # models in one measurement and would inflate a per-measurement mean
        per_s, per_runs = 2 * full.seconds / full.models, 2 * full.runs / full.models
        avoided = quick.measurements - remeasured
        out.update(saved_seconds=round(per_s * avoided - quick.seconds, 3),
                   saved_runs=int(round(per_runs * avoided - quick.runs)),
                   full_seconds_per_measurement=round(per_s, 3), full_runs_per_measurement=round(per_runs, 1))
    return out


# ----------------------------------------------------------------------------- the search

@dataclass
class Trial:
    """One front plan the search evaluated."""

    index: int
    solution: Solution
    predicted_speedup: float | None
    metric: float | None = None
    drop: float | None = None
    within: bool = False
    #: :func:`ampq_pass.stages.verify.verify`'s dict with the quick protocol, then the full one
    quick: dict | None = None
    full: dict | None = None

    @property
    def measured(self) -> dict | None:
        return self.full or self.quick

    def speedup(self) -> float | None:
        m = self.measured
        return None if m is None else m.get("speedup")

    def to_json(self) -> dict:
        m = self.measured or {}
        return {"front_index": self.index, "layers_quantized": len(self.solution.plan.formats),
                "max_mse": self.solution.max_mse, "predicted_mse": self.solution.mse,
                "predicted_gain": self.solution.gain, "predicted_speedup": self.predicted_speedup,
                "metric": self.metric, "metric_drop": self.drop, "within": self.within,
                "measured_loss_mse": m.get("loss_mse"), "measured_speedup": m.get("speedup"),
                "quick_speedup": (self.quick or {}).get("speedup"),
                "protocol": "full" if self.full else ("quick" if self.quick and self.quick.get("speedup") else None)}


@dataclass
class SearchResult:
    hp_metric: float
    max_drop: float
    trials: list[Trial]
    #: the chosen plan, or None: no plan within the bound was faster than the input
    chosen: Trial | None
    #: the best plan within the bound when it measured no faster than the input
    rejected: Trial | None = None
    message: str = ""
    order: list[int] = field(default_factory=list)
    #: every plan of the search by index (the front's distinct plans, then those solved between)
    plans: list[Solution] = field(default_factory=list)
    #: the indices of ``plans`` by increasing predicted loss (the chain the bisection walked)
    chain: list[int] = field(default_factory=list)
    #: how many of ``plans`` were solved between two front plans
    refined: int = 0

    def to_json(self) -> dict:
        pos = {i: k for k, i in enumerate(self.chain)}
        return {"hp_metric": self.hp_metric, "max_drop": self.max_drop, "evaluated": len(self.trials),
                "order": list(self.order), "refined": self.refined,
                "tried": [t.to_json() for t in sorted(self.trials, key=lambda t: pos.get(t.index, t.index))],
                "chosen": None if self.chosen is None else self.chosen.index,
                "rejected": None if self.rejected is None else self.rejected.index, "message": self.message}


def distinct_plans(front: list[Solution]) -> list[Solution]:
    """The front as a chain the bisection can walk: the all-hp plan first (when there is one),
    then plans by increasing predicted loss, each with more gain than every plan before it
    (repeats - several budgets giving one plan - and dominated plans are dropped: a solver's
    tolerance can return a plan slightly above a tiny budget)."""
    hp = [s for s in front if not s.plan.formats][:1]
    out, seen = list(hp), set()
    best = hp[0].gain if hp else -math.inf
    for s in sorted((s for s in front if s.plan.formats), key=lambda s: (s.mse, -s.gain)):
        key = tuple(sorted(s.plan.formats.items()))
        if key in seen or s.gain <= best:
            continue
        seen.add(key)
        best = s.gain
        out.append(s)
    return out


def _key(sol: Solution) -> tuple:
    return tuple(sorted(sol.plan.formats.items()))


#: budgets tried between two plans, as fractions of the way from the lower plan's loss to the
#: upper one's (the middle first, then the halves of each side)
BETWEEN_FRACTIONS = (0.5, 0.75, 0.25, 0.875, 0.625, 0.375, 0.125)

#: plans the search solves and evaluates between the last plan within the bound and the first
#: over it, after the bisection along the front
REFINE_PLANS = 4


def plan_between(lower: Solution, upper: Solution, solve_at: Callable[[float], Solution]) -> Solution | None:
    """A plan strictly between two plans of a front: more gain than ``lower`` and less than
    ``upper``, found by solving at loss budgets between their predicted losses
    (:data:`BETWEEN_FRACTIONS`); ``solve_at(budget)`` is the integer program at that budget.
    None when no budget in the interval gives one (the two are neighbours on the true front)."""
    if not lower.mse < upper.mse:
        return None
    for f in BETWEEN_FRACTIONS:
        sol = solve_at(lower.mse + f * (upper.mse - lower.mse))
        if lower.gain < sol.gain < upper.gain and sol.plan.formats and _key(sol) not in (_key(lower), _key(upper)):
            return sol
    return None


def bisect_front(n: int, within: Callable[[int], bool]) -> tuple[int, list[int]]:
    """The last index in ``0..n-1`` for which ``within`` holds, assuming it holds for a prefix
    (index 0 always: the all-hp plan); returns it and the indices asked, in order."""
    asked: list[int] = []

    def ask(i: int) -> bool:
        asked.append(i)
        return within(i)

    lo, hi = 0, n - 1
    if n <= 1 or ask(hi):
        return hi if n > 0 else 0, asked
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ask(mid):
            lo = mid
        else:
            hi = mid
    return lo, asked


def search_front(front: list[Solution], *, hp_metric: float, max_drop: float,
                 metric_of: Callable[[int, Solution], float],
                 measure: Callable[[int, Solution, str], dict],
                 faster: Callable[[dict], bool],
                 predicted_speedup: Callable[[Solution], float | None],
                 between: Callable[[Solution, Solution], Solution | None] | None = None,
                 refine: int = REFINE_PLANS,
                 log: Callable[[str], None] = lambda s: None) -> SearchResult:
    """The fastest plan of ``front`` whose metric drop is within ``max_drop`` and that is
    faster than the input beyond the noise.

    ``metric_of(i, plan)`` evaluates the user's metric on plan ``i`` (its index in the
    result's ``plans``); ``measure(i, plan, "quick" | "full")`` times it end to end (a verify
    dict, ``speedup`` None on cost models); ``faster(measured)`` is the never-slower rule.
    ``between(lower, upper)`` (e.g. :func:`plan_between`) gives a plan strictly between two
    plans, or None: after the bisection, up to ``refine`` such plans are evaluated between the
    last plan within the bound and the first over it.
    """
    if refine < 0:
        raise AmpqError(f"refine must be >= 0, got {refine}")
    plans = distinct_plans(front)
    if not plans or plans[0].plan.formats:
        raise AmpqError("the front must start with the all-hp plan (loss budget 0)")
    chain = list(range(len(plans)))
    trials: dict[int, Trial] = {}

    def within(i: int) -> bool:
        sol = plans[i]
        t = Trial(i, sol, predicted_speedup(sol))
        t.metric = metric_of(i, sol)
        t.drop = hp_metric - t.metric
        t.within = t.drop <= max_drop
        t.quick = measure(i, sol, "quick")
        trials[i] = t
        ms = t.quick.get("speedup")
        log(f"      plan {i + 1}/{len(plans)}: {len(sol.plan.formats)} layers quantized, metric {t.metric:.5g} "
            f"(drop {t.drop:+.3g}, bound {max_drop:g}: {'within' if t.within else 'over'}), predicted "
            f"{_x(t.predicted_speedup)}, measured {_x(ms)} (quick)")
        return t.within

    last, order = bisect_front(len(plans), within)
    refined = 0
    lo, hi = last, last + 1  # positions in ``chain``: the last plan within, the first over
    seen = {_key(p) for p in plans}
    while between is not None and refined < refine and hi < len(chain):
        mid = between(plans[chain[lo]], plans[chain[hi]])
        if mid is None or _key(mid) in seen:
            break
        seen.add(_key(mid))
        plans.append(mid)
        k = len(plans) - 1
        chain.insert(hi, k)
        refined += 1
        order.append(k)
        if within(k):
            lo, hi = hi, hi + 1
    candidates = sorted((t for t in trials.values() if t.within and t.solution.plan.formats),
                        key=lambda t: _rank(t.quick, t.solution), reverse=True)
    chosen = None
    rejected = None
    if candidates:
        timed = candidates[0].quick.get("speedup") is not None
        # In order of quick speed-up: a plan is timed with the full protocol only while it can
        # still decide the choice - its quick estimate reaches the interval of the best plan
        # measured in full so far (or no plan measured in full beats the input yet).
        for t in candidates:
            if not timed:
                if faster(t.quick):  # a cost model: no time to measure, the best predicted gain wins
                    chosen = t
                    break
                continue
            if chosen is not None and t.quick["speedup"] < speedup_interval(chosen.full)[0]:
                continue
            t.full = measure(t.index, t.solution, "full")
            log(f"      plan {t.index + 1}: measured {_x(t.full.get('speedup'))} (full protocol)")
            if faster(t.full) and (chosen is None or _rank(t.full, t.solution) > _rank(chosen.full, chosen.solution)):
                chosen = t
        if chosen is None:
            rejected = max(candidates, key=lambda t: _rank(t.measured, t.solution))
    if chosen is not None:
        message = (f"fastest front plan within a metric drop of {max_drop:g}: {len(chosen.solution.plan.formats)} "
                   f"layers quantized, metric {chosen.metric:.5g} (hp {hp_metric:.5g}, drop {chosen.drop:.3g}); "
                   f"{len(trials)} of {len(plans)} front plans evaluated"
                   + (f", {refined} of them solved between two front plans" if refined else ""))
    elif rejected is not None:
        m = rejected.measured
        message = (f"the best plan within the metric bound measured {_x(m.get('speedup'))}: not faster than the "
                   f"input beyond the noise, so every layer stays hp ({len(trials)} of {len(plans)} plans evaluated)")
    else:
        message = (f"no quantized front plan keeps the metric drop within {max_drop:g}: every layer stays hp "
                   f"({len(trials)} of {len(plans)} front plans evaluated)")
    return SearchResult(hp_metric, max_drop, [trials[i] for i in sorted(trials)], chosen, rejected, message,
                        order, plans, chain, refined)


def _rank(measured: dict | None, sol: Solution) -> tuple:
    s = None if measured is None else measured.get("speedup")
    return (s if s is not None else -math.inf, sol.gain)


def _x(v) -> str:
    return "-" if v is None else f"{v:.3f}x"
