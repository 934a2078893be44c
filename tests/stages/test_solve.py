import itertools
import math
import time

import numpy as np
import pytest

from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.solve import Option, loss_budget, pareto_front, pareto_options, solve


def random_instance(rng, subgraphs=4, configs=(2, 5), memory=False):
    options = []
    for s in range(subgraphs):
        n = int(rng.integers(*configs))
        opts = [Option({f"l{s}": "hp"}, 0.0, 0.0, 100.0 if memory else 0.0)]
        for c in range(1, n):
            opts.append(Option({f"l{s}": f"f{c}"}, float(rng.normal(1.0, 1.0)), float(rng.exponential(1.0)),
                               float(rng.uniform(10, 100)) if memory else 0.0))
        options.append(opts)
    return options


def brute_force(options, max_mse, max_memory=None):
    best = None
    for choice in itertools.product(*[range(len(o)) for o in options]):
        picked = [options[s][i] for s, i in enumerate(choice)]
        mse, mem, gain = sum(o.mse for o in picked), sum(o.memory for o in picked), sum(o.gain for o in picked)
        if mse <= max_mse + 1e-9 and (max_memory is None or mem <= max_memory + 1e-9):
            if best is None or gain > best:
                best = gain
    return best


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = random_instance(rng, subgraphs=int(rng.integers(2, 6)), memory=seed % 2 == 1)
    max_mse = float(rng.uniform(0.2, 3.0))
    max_memory = float(rng.uniform(150, 400)) if seed % 2 else None
    want = brute_force(options, max_mse, max_memory)
    if want is None:
        pytest.skip("instance has no feasible plan")  # covered by test_memory_infeasible
    sol = solve(options, max_mse, max_memory=max_memory)
    assert sol.gain == pytest.approx(want, abs=1e-7)
    assert sol.mse <= max_mse * (1 + 1e-7)
    assert sol.status == "optimal"


def test_zero_budget_keeps_hp():
    options = random_instance(np.random.default_rng(0))
    sol = solve(options, 0.0)
    assert sol.plan.formats == {} and sol.gain == 0.0 and "stays hp" in sol.message


def test_negative_budget_gives_nearest_feasible():
    options = random_instance(np.random.default_rng(1))
    sol = solve(options, -1.0)
    assert sol.status == "infeasible-loss" and sol.plan.formats == {} and "negative" in sol.message


def test_unbounded_budget_takes_every_best_gain():
    options = random_instance(np.random.default_rng(2))
    sol = solve(options, math.inf)
    assert sol.gain == pytest.approx(sum(max(o.gain for o in opts) for opts in options))
    assert sol.binding == "none" and "does not bind" in sol.message


def test_binding_constraint_reported():
    options = [[Option({"a": "hp"}, 0, 0), Option({"a": "int8"}, 5, 2.0)],
               [Option({"b": "hp"}, 0, 0), Option({"b": "int8"}, 3, 1.0)]]
    sol = solve(options, 1.5)
    assert sol.plan.formats == {"b": "int8"} and sol.binding == "loss"


def test_memory_constraint():
    options = [[Option({"a": "hp"}, 0, 0, 100), Option({"a": "int8"}, 1, 1.0, 25), Option({"a": "int4"}, 0.5, 0.2, 13)],
               [Option({"b": "hp"}, 0, 0, 100), Option({"b": "int8"}, 1, 1.0, 25)]]
    # loss allows both int8, memory too: gain 2
    assert solve(options, 10, max_memory=60).gain == 2
    # memory 40 forces a int4 and b int8: 25 + 13 = 38
    sol = solve(options, 10, max_memory=40)
    assert sol.plan.formats == {"a": "int4", "b": "int8"} and sol.memory == 38 and "memory" in sol.binding


def test_memory_infeasible_returns_least_memory_plan():
    options = [[Option({"a": "hp"}, 0, 0, 100), Option({"a": "int8"}, 1, 1.0, 25)]]
    sol = solve(options, 10, max_memory=10)
    assert sol.status == "infeasible-memory" and sol.plan.formats == {"a": "int8"} and "cannot be met" in sol.message


def test_pareto_front_monotone():
    options = random_instance(np.random.default_rng(3), subgraphs=6)
    front = pareto_front(options, 8)
    budgets = [s.max_mse for s in front]
    gains = [s.gain for s in front]
    assert budgets == sorted(budgets) and len(front) == 8
    assert all(b >= a - 1e-12 for a, b in zip(gains, gains[1:]))
    assert gains[0] == 0.0 and gains[-1] == pytest.approx(solve(options, math.inf).gain)


def test_dominated_options_removed():
    opts = [Option({"a": "hp"}, 0, 0), Option({"a": "x"}, 1, 1), Option({"a": "y"}, 0.5, 2), Option({"a": "z"}, 1, 1)]
    assert pareto_options(opts) == [0, 1]


def test_budget_units():
    assert loss_budget(max_loss_rmse=0.1, loss_sq_mean=4.0) == pytest.approx(0.04)
    assert loss_budget(max_loss_mse=0.5) == 0.5
    with pytest.raises(AmpqError, match="exactly one"):
        loss_budget()
    with pytest.raises(AmpqError, match="mean square"):
        loss_budget(max_loss_rmse=0.1, loss_sq_mean=0.0)


def test_bad_options():
    with pytest.raises(AmpqError, match="non-finite"):
        solve([[Option({"a": "hp"}, 0, 0), Option({"a": "int8"}, math.nan, 1)]], 1.0)
    with pytest.raises(AmpqError, match="no subgraph"):
        solve([], 1.0)


def _cut_options():
    """Two subgraphs around cut k. p: hp, hp reading nothing int8, or int8 work next to an int8 k;
    q: hp, or int8 (its layer quantizes k, so it forces and joins k). p int8 alone loses a little."""
    k = "k"
    p = [Option({"a": "hp"}, 0.0, 0.0, cuts={k: "hp"}),
         Option({"a": "hp"}, -0.05, 0.0, cuts={k: "int8"}),
         Option({"a": "int8"}, -0.1, 0.1, cuts={k: "int8"}, joins=frozenset({k}))]
    q = [Option({"b": "hp"}, 0.0, 0.0, cuts={k: "hp"}),
         Option({"b": "int8"}, 0.5, 0.1, cuts={k: "int8"}, forces=frozenset({k}), joins=frozenset({k}))]
    return [p, q]


def test_cut_bonus_is_earned_only_with_int8_work_on_both_sides():
    options = _cut_options()
    plain = solve(options, math.inf)
    assert plain.plan.formats == {"b": "int8"} and plain.gain == pytest.approx(0.45)
    small = solve(options, math.inf, cut_bonus={"k": 0.01})  # not worth p's loss of 0.05
    assert small.plan.formats == {"b": "int8"} and small.gain == pytest.approx(0.45)
    big = solve(options, math.inf, cut_bonus={"k": 0.2})  # -0.1 + 0.5 + 0.2 beats 0.45
    assert big.plan.formats == {"a": "int8", "b": "int8"} and big.gain == pytest.approx(0.6)
    # the loss budget still binds: with room for one int8 layer only, no bonus can be earned
    tight = solve(options, 0.15, cut_bonus={"k": 0.2})
    assert tight.plan.formats == {"b": "int8"} and tight.gain == pytest.approx(0.45)


def test_cut_bonus_matches_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(20):
        options = _cut_options()
        options = [[Option(o.formats, float(o.gain + rng.normal(0, 0.1)), o.mse, cuts=o.cuts, forces=o.forces,
                           joins=o.joins) for o in opts] for opts in options]
        bonus = {"k": float(rng.uniform(0, 0.3))}
        budget = float(rng.choice([0.05, 0.15, 0.3]))
        sol = solve(options, budget, cut_bonus=bonus)
        best = -math.inf
        for i, j in itertools.product(range(3), range(2)):
            a, b = options[0][i], options[1][j]
            if a.cuts["k"] != b.cuts["k"] or (b.cuts["k"] == "int8" and "k" not in b.forces):
                continue  # the sides disagree, or nobody quantizes the cut
            if a.mse + b.mse > budget:
                continue
            best = max(best, a.gain + b.gain + (bonus["k"] if "k" in a.joins and "k" in b.joins else 0.0))
        assert sol.gain == pytest.approx(best, abs=1e-9), trial


def test_negative_cut_bonus_is_refused():
    with pytest.raises(AmpqError, match="cut_bonus"):
        solve(_cut_options(), math.inf, cut_bonus={"k": -1.0})
