"""The metric search along the predicted front (issue 17): bisection, quick-then-full timing,
the never-slower rule, and loading the user's metric."""

import math

import pytest

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.measure import Protocol, Timing
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.search import (Meter, bisect_front, evaluate_metric, load_metric, plan_between, quick_protocol,
                                     search_front, timing_saving, with_protocol)
from ampq_pass.stages.solve import Solution


def _front(n):
    """n plans: plan 0 is hp, plan i quantizes i layers; gain and loss grow along the front."""
    return [Solution(Plan({f"l{j}": "int8" for j in range(i)}), [], float(i), 0.01 * i, 0.0, 0.01 * i, None,
                     "loss", "optimal") for i in range(n)]


def _measured(speedup, half=0.01):
    """A verify dict: hp 1 s, the plan 1/speedup s, both with CI half-width ``half``."""
    plan = 1.0 / speedup
    return {"loss_mse": 0.0, "speedup": speedup, "hp_ci": [1 - half, 1 + half], "plan_ci": [plan - half, plan + half]}


def _faster(m):
    return m.get("speedup") is None or m["plan_ci"][1] < m["hp_ci"][0]


def _run(drops, *, speedups=None, quick_half=0.01, max_drop=0.005, full_speedups=None):
    n = len(drops)
    speedups = speedups or [1 + 0.1 * i for i in range(n)]
    full_speedups = full_speedups or speedups
    calls = {"metric": [], "quick": [], "full": []}

    def metric_of(i, sol):
        calls["metric"].append(i)
        return 0.9 - drops[i]

    def measure(i, sol, how):
        calls[how].append(i)
        return _measured(speedups[i] if how == "quick" else full_speedups[i], quick_half if how == "quick" else 0.01)

    res = search_front(_front(n), hp_metric=0.9, max_drop=max_drop, metric_of=metric_of, measure=measure,
                       faster=_faster, predicted_speedup=lambda s: 1 + 0.1 * len(s.plan.formats))
    return res, calls


@pytest.mark.parametrize("n, last", [(2, 1), (2, 0), (9, 0), (9, 4), (9, 8), (12, 6), (12, 7)])
def test_bisection_finds_the_last_index_within(n, last):
    found, asked = bisect_front(n, lambda i: i <= last)
    assert found == last
    assert len(asked) <= 1 + math.ceil(math.log2(n))
    assert 0 not in asked  # the all-hp plan is within by definition


def test_search_picks_the_fastest_front_plan_within_the_drop():
    drops = [0, 0.0005, 0.001, 0.002, 0.004, 0.006, 0.01, 0.02, 0.05]
    res, calls = _run(drops)
    assert res.chosen.index == 4 and res.chosen.within and res.chosen.drop == pytest.approx(0.004)
    assert len(res.trials) == len(calls["metric"]) <= 1 + math.ceil(math.log2(len(drops)))
    assert all(t.quick is not None for t in res.trials)  # every plan tried was timed, quickly
    # the over-budget plans are never timed with the full protocol
    assert all(drops[i] <= 0.005 for i in calls["full"])
    assert "4 layers quantized" in res.message and f"{len(res.trials)} of 9" in res.message
    js = res.to_json()
    assert js["chosen"] == 4 and js["evaluated"] == len(res.trials)
    assert all({"metric", "metric_drop", "measured_speedup", "predicted_mse"} <= set(t) for t in js["tried"])


def test_only_the_plans_that_decide_the_choice_are_timed_in_full():
    drops = [0, 0.001, 0.002, 0.003, 0.004, 0.009, 0.01, 0.02, 0.03]
    # tried: 8 (over), 4 (within), 6 (over), 5 (over); within: 4 only - and plan 2, 3 never tried
    res, calls = _run(drops)
    assert calls["full"] == [4]
    # wide quick intervals: two within-bound plans overlap, both are re-measured, the faster one wins
    drops = [0, 0.001, 0.002, 0.003, 0.004, 0.0045, 0.01, 0.02, 0.03]
    res, calls = _run(drops, speedups=[1, 1.1, 1.2, 1.3, 1.5, 1.52, 1.6, 1.7, 1.8], quick_half=0.1,
                      full_speedups=[1, 1.1, 1.2, 1.3, 1.55, 1.5, 1.6, 1.7, 1.8])
    assert sorted(calls["full"]) == [4, 5] and res.chosen.index == 4
    # tight quick intervals that do not overlap: only the best one is re-measured
    res, calls = _run(drops, speedups=[1, 1.1, 1.2, 1.3, 1.3, 1.5, 1.6, 1.7, 1.8], quick_half=0.001)
    assert calls["full"] == [5] and res.chosen.index == 5


def test_a_plan_not_faster_beyond_noise_is_not_chosen():
    drops = [0, 0.001, 0.002, 0.01]
    res, calls = _run(drops, speedups=[1, 1.005, 1.006, 1.2])
    assert res.chosen is None and res.rejected is not None and "not faster" in res.message
    res, _ = _run([0, 0.01, 0.02])
    assert res.chosen is None and res.rejected is None and "no quantized front plan" in res.message


def test_cost_model_measurements_choose_by_predicted_gain():
    drops = [0, 0.001, 0.002, 0.004, 0.01]

    res = search_front(_front(5), hp_metric=1.0, max_drop=0.003, metric_of=lambda i, s: 1.0 - drops[i],
                       measure=lambda i, s, how: {"loss_mse": 0.0, "speedup": None}, faster=_faster,
                       predicted_speedup=lambda s: None)
    assert res.chosen.index == 2 and res.chosen.full is None


def _sol(mse, gain, name):
    return Solution(Plan({name: "int8"} if gain else {}), [], gain, mse, 0.0, mse, None, "loss", "optimal")


def test_plan_between_solves_inside_the_loss_interval():
    # the integer program over four plans: the best gain with predicted loss <= the budget
    plans = [_sol(0.0, 0.0, "hp"), _sol(0.1, 1.0, "a"), _sol(0.15, 1.5, "b"), _sol(0.4, 2.0, "c")]
    budgets = []

    def solve_at(b):
        budgets.append(b)
        return max((p for p in plans if p.mse <= b), key=lambda p: p.gain)

    mid = plan_between(plans[1], plans[3], solve_at)
    assert mid is plans[2] and budgets == [pytest.approx(0.25)]
    budgets.clear()
    assert plan_between(plans[2], plans[3], solve_at) is None  # neighbours on the true front
    assert len(budgets) == 7 and all(0.15 < b < 0.4 for b in budgets)
    assert plan_between(plans[3], plans[1], solve_at) is None  # not an interval


def _between(lo, hi):
    """The true front has a plan half-way between two integer-gain plans (one level deep)."""
    if hi.gain - lo.gain <= 0.5:
        return None
    return _sol((lo.mse + hi.mse) / 2, (lo.gain + hi.gain) / 2, f"mid{lo.gain}")


def _run_between(refine=4, max_drop=0.027):
    calls = []

    def metric_of(i, sol):
        calls.append(i)
        return 0.9 - sol.mse  # the drop is the predicted loss

    return search_front(_front(5), hp_metric=0.9, max_drop=max_drop, metric_of=metric_of,
                        measure=lambda i, sol, how: _measured(1 + 0.1 * sol.gain), faster=_faster,
                        predicted_speedup=lambda s: 1 + 0.1 * s.gain, between=_between, refine=refine), calls


def test_the_search_evaluates_plans_between_the_last_within_and_the_first_over():
    # front plans: loss 0, .01, .02, .03, .04; bound .027: plan 2 within, plan 3 over, the plan
    # solved between them (loss .025, gain 2.5) is within and faster than plan 2
    res, calls = _run_between()
    assert res.refined == 1 and len(res.plans) == 6 and res.plans[5].gain == 2.5
    assert res.chain == [0, 1, 2, 5, 3, 4] and calls[-1] == 5
    assert res.chosen.index == 5 and res.chosen.within
    assert "1 of them solved between" in res.message
    assert [t["front_index"] for t in res.to_json()["tried"]] == [i for i in res.chain if i in calls]
    # refine=0: the bisection alone, the front plan 2 is chosen
    res, calls = _run_between(refine=0)
    assert res.refined == 0 and res.chosen.index == 2 and len(res.plans) == 5
    # the plan between is over the bound: plan 2 stays, the refined plan is the new first-over
    res, _ = _run_between(max_drop=0.022)
    assert res.refined == 1 and res.chosen.index == 2 and res.chain.index(5) == 3
    with pytest.raises(AmpqError, match="refine"):
        _run_between(refine=-1)


def test_front_must_start_at_hp():
    with pytest.raises(AmpqError, match="all-hp"):
        search_front(_front(3)[1:], hp_metric=1.0, max_drop=0.1, metric_of=lambda i, s: 1.0,
                     measure=lambda i, s, h: {}, faster=_faster, predicted_speedup=lambda s: None)


def test_load_metric_from_module_and_script(tmp_path):
    fn = load_metric("math:sqrt")
    assert fn(4.0) == 2.0
    script = tmp_path / "my_eval.py"
    script.write_text("def score(path):\n    return 0.5\n")
    assert load_metric(f"{script}:score")("x.onnx") == 0.5
    for spec, message in [("math", "MODULE:FUNCTION"), ("no_such_module_xyz:f", "cannot import"),
                          ("math:nope", "no callable 'nope'"), (f"{tmp_path}/missing.py:f", "does not exist")]:
        with pytest.raises(AmpqError, match=message):
            load_metric(spec)


def test_metric_values_are_checked():
    assert evaluate_metric(lambda p: 1, "m.onnx") == 1.0
    for bad, message in [(lambda p: float("nan"), "finite"), (lambda p: "high", "expected a number"),
                         (lambda p: 1 / 0, "ZeroDivisionError")]:
        with pytest.raises(AmpqError, match=message):
            evaluate_metric(bad, "m.onnx")


class _Fake:
    def __init__(self):
        self.protocol = Protocol()

    def time(self, models, inputs):
        n = self.protocol.min_repeats
        return {k: Timing.of([1.0] * n) for k in models}


def test_quick_protocol_and_the_saving():
    full = _Fake()
    quick = with_protocol(full, quick_protocol(full.protocol))
    assert quick is not full and full.protocol == Protocol()
    assert quick.protocol.min_repeats < full.protocol.min_repeats and quick.protocol.warmup <= 1
    mq, mf = Meter(quick), Meter(full)
    for _ in range(4):
        mq.time({"hp": None, "plan": None}, [])
    mf.time({"hp": None, "plan": None}, [])
    saving = timing_saving(mq, mf, remeasured=1)
    assert mq.runs == 4 * 2 * (5 + 1) and mf.runs == 2 * (7 + 3)
    assert saving["full_measurements_saved"] == 3
    assert saving["saved_runs"] == 3 * 20 - 48
    assert "note" in timing_saving(object(), mf, remeasured=0)


def test_a_meter_takes_another_protocol_and_keeps_counting():
    """The repair round splits its time cap over batches (core.measure.split_time) on the
    pipeline's metered backend: that used to recurse forever in copy.copy (a corpus run of
    BERT-base ended in RecursionError)."""
    import copy

    import models

    from ampq_pass.backends.ort import OrtBackend
    from ampq_pass.core.measure import Protocol, split_time
    from ampq_pass.stages.search import Meter

    meter = Meter(OrtBackend(protocol=Protocol(warmup=1, min_repeats=3, max_repeats=3, max_seconds=60.0)))
    copy.copy(meter)  # no recursion
    part = split_time(meter, 4)
    assert isinstance(part, Meter) and part.protocol.max_seconds == 15.0
    assert meter.protocol.max_seconds == 60.0
    m = models.mlp()
    part.time({"a": m}, [models.feeds_for(m, n=2)])
    assert part.measurements == meter.measurements == 1 and meter.runs == part.runs == 3 + 1
