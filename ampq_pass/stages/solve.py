"""The plan as an integer program (design.md §3 "Plan"), solved with python-mip (CBC).

Each subgraph ``s`` offers options (configurations) ``c`` with a gain ``g_s(c)``, a
predicted loss MSE ``M_s(c) = sum_{l in s} s_{l, c_l}`` and optionally a memory
footprint. With binaries ``y_{s,c}``::

    maximise  sum y_{s,c} g_s(c)
    s.t.      sum_c y_{s,c} = 1                  for every subgraph s
              sum y_{s,c} M_s(c) <= tau          (loss budget)
              sum y_{s,c} mem_s(c) <= budget     (optional)

Options dominated within their subgraph (no more gain, no less loss, no less memory than
another option with the same cut states) are removed first: they are never needed for an
optimum, and removing them keeps the program small.

Boundary states (design.md §3): an option may carry the states of its subgraph's cut
tensors (``Option.cuts``) and the cuts its own formats quantize (``Option.forces``). For
a cut ``k`` between subgraphs ``p`` and ``q``, and each 8-bit state ``b_k`` it is offered in::

    sum_{c of p: b_k} y_{p,c} = sum_{c of q: b_k} y_{q,c}              (both sides agree)
    sum_{c of p: b_k} y_{p,c} <= sum_{c of p forcing k in b_k} y_{p,c} + sum_{c of q forcing k in b_k} y_{q,c}

the second because a cut is quantized only when a layer next to it quantizes it, in that state.

Cut bonuses (``cut_bonus``, :attr:`ampq_pass.stages.timing.GainTable.cut_bonus`): the time the
whole model saves at cut ``k`` when it is int8 with int8 work on every side
(``Option.joins``). With a binary ``z_k`` and ``J_{s,k}`` the options of ``s`` joining ``k``::

    maximise  ... + sum_k bonus_k z_k
    s.t.      z_k <= sum_{c in J_{s,k}} y_{s,c}     for every subgraph s next to k

(``z_k`` is 1 only when every side joins ``k``; a positive bonus makes it 1 whenever it can be).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import HP
from ampq_pass.stages.plan import Plan


@dataclass(frozen=True)
class Option:
    """One configuration of one subgraph, as the solver sees it."""

    formats: dict[str, str]
    gain: float
    mse: float
    memory: float = 0.0
    #: states of the subgraph's cut tensors (unnamed: hp) and the cuts its formats quantize
    cuts: dict[str, str] = field(default_factory=dict)
    forces: frozenset[str] = frozenset()
    #: the int8 cuts it computes in int8 next to (they earn a cut bonus when every side joins)
    joins: frozenset[str] = frozenset()

    def signature(self) -> tuple:
        return tuple(sorted(self.cuts.items())), tuple(sorted(self.forces)), tuple(sorted(self.joins))


@dataclass
class Solution:
    plan: Plan
    choice: list[int]  # index into each subgraph's option list
    gain: float
    mse: float
    memory: float
    max_mse: float
    max_memory: float | None
    #: "loss", "memory", "loss+memory" or "none" (every option at its best was affordable)
    binding: str
    status: str
    message: str = ""

    def to_json(self) -> dict:
        return {"formats": self.plan.formats, "choice": self.choice, "gain": self.gain, "mse": self.mse,
                "memory": self.memory, "max_mse": self.max_mse, "max_memory": self.max_memory,
                "binding": self.binding, "status": self.status, "message": self.message}


def _validate(options: list[list[Option]], max_mse: float, max_memory: float | None) -> None:
    if not options:
        raise AmpqError("nothing to solve: the model has no subgraph with a quantizable layer")
    for s, opts in enumerate(options):
        if not opts:
            raise AmpqError(f"subgraph {s} has no configuration to choose from")
        for o in opts:
            if not (math.isfinite(o.gain) and math.isfinite(o.mse) and math.isfinite(o.memory)) or o.mse < 0:
                raise AmpqError(f"subgraph {s}: configuration {o.formats} has a non-finite gain/loss/memory or negative loss")
    if not math.isfinite(max_mse) and max_mse != math.inf:
        raise AmpqError(f"max_mse must be a number >= 0, got {max_mse}")
    if max_memory is not None and not math.isfinite(max_memory):
        raise AmpqError(f"max_memory must be a finite number of bytes, got {max_memory}")


def pareto_options(opts: list[Option], *, memory: bool = True) -> list[int]:
    """Indices of the options not dominated by another (more or equal gain, less or equal
    loss and, with ``memory``, memory; strictly better in one; the first of equals kept)."""
    keep = []
    mem = (lambda o: o.memory) if memory else (lambda o: 0.0)
    for i, a in enumerate(opts):
        dominated = False
        for j, b in enumerate(opts):
            if i == j or b.signature() != a.signature():  # other cut states: not comparable
                continue
            if b.gain >= a.gain and b.mse <= a.mse and mem(b) <= mem(a) and (
                    b.gain > a.gain or b.mse < a.mse or mem(b) < mem(a) or j < i):
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return keep


def solve(options: list[list[Option]], max_mse: float, *, max_memory: float | None = None,
          time_limit: float = 60.0, cut_bonus: dict[str, float] | None = None) -> Solution:
    """The plan maximising gain with predicted loss MSE <= ``max_mse`` (and memory <= ``max_memory``),
    counting ``cut_bonus`` (cut -> gain) at every cut that all subgraphs next to it join.

    A negative ``max_mse`` or a memory budget no plan can meet is not an error: the
    nearest feasible plan is returned (all-hp for the loss; least memory for the memory
    budget) with ``status`` and ``message`` saying so.
    """
    _validate(options, max_mse, max_memory)
    bonus = {t: float(b) for t, b in (cut_bonus or {}).items()}
    if any(not math.isfinite(b) or b < 0 for b in bonus.values()):
        raise AmpqError(f"cut_bonus must hold finite gains >= 0, got {bonus}")
    if max_mse < 0:
        sol = _solve(options, 0.0, max_memory, time_limit, bonus)
        sol.status, sol.max_mse = "infeasible-loss", max_mse
        sol.message = f"loss budget {max_mse:g} is negative; the nearest feasible plan keeps every layer in hp"
        return sol
    if max_memory is not None:
        least = sum(min(o.memory for o in opts if o.mse <= max_mse) if any(o.mse <= max_mse for o in opts)
                    else min(o.memory for o in opts) for opts in options)
        if least > max_memory * (1 + 1e-12):
            sol = _solve_least_memory(options, max_mse, time_limit, bonus)
            sol.status, sol.max_memory = "infeasible-memory", max_memory
            sol.message = (f"memory budget {max_memory:,.0f} B cannot be met within loss budget {max_mse:g}; "
                           f"nearest feasible plan uses {sol.memory:,.0f} B (the least possible)")
            return sol
    return _solve(options, max_mse, max_memory, time_limit, bonus)


def _solve(options, max_mse, max_memory, time_limit, bonus=None) -> Solution:
    import mip

    # An option whose own loss exceeds the whole budget can never be part of a plan. Dropping
    # it here keeps the budget exact where CBC's absolute tolerance (~1e-6 on the scaled
    # constraint) would otherwise let a zero budget admit options of loss ~1e-6.
    affordable = [[i for i, o in enumerate(opts) if o.mse <= max_mse] or [min(range(len(opts)), key=lambda i: opts[i].mse)]
                  for opts in options]
    kept = [[affordable[s][k] for k in pareto_options([opts[i] for i in affordable[s]], memory=max_memory is not None)]
            for s, opts in enumerate(options)]
    bonus = bonus or {}
    gscale = max([abs(options[s][i].gain) for s, ks in enumerate(kept) for i in ks] + list(bonus.values()),
                 default=1.0) or 1.0
    m = mip.Model(sense=mip.MAXIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    # 1e-6 relative: far below timing noise, and it spares CBC proving the last digits.
    m.max_mip_gap = 1e-6
    m.max_mip_gap_abs = 1e-9
    y = [[m.add_var(var_type=mip.BINARY) for _ in ks] for ks in kept]
    for vs in y:
        m += mip.xsum(vs) == 1
    # Scaled so that the budget is 1 and gains are O(1): CBC's tolerances are absolute.
    if math.isfinite(max_mse):
        mscale = max_mse if max_mse > 0 else 1.0
        m += mip.xsum(options[s][i].mse / mscale * v for s, ks in enumerate(kept)
                      for i, v in zip(ks, y[s])) <= (1.0 if max_mse > 0 else 0.0)
    if max_memory is not None:
        bscale = max_memory if max_memory > 0 else 1.0
        m += mip.xsum(options[s][i].memory / bscale * v for s, ks in enumerate(kept)
                      for i, v in zip(ks, y[s])) <= (1.0 if max_memory > 0 else 0.0)
    _link_cuts(m, options, kept, y)
    earned = _bonus_terms(m, options, kept, y, bonus)
    m.objective = mip.xsum([options[s][i].gain / gscale * v for s, ks in enumerate(kept) for i, v in zip(ks, y[s])]
                           + [b / gscale * z for b, z in earned])
    status = m.optimize(max_seconds=time_limit)
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        # Every subgraph has an hp option with zero loss, so this only happens for memory.
        raise AmpqError(f"the integer program has no solution ({status.name}); check the memory budget")
    choice = [ks[max(range(len(ks)), key=lambda j: y[s][j].x)] for s, ks in enumerate(kept)]
    return _solution(options, choice, max_mse, max_memory,
                     "optimal" if status == mip.OptimizationStatus.OPTIMAL else "feasible (time limit)", bonus)


def _bonus_terms(m, options, kept, y, bonus: dict[str, float]) -> list:
    """``(bonus_k, z_k)`` for every cut with a positive bonus and two or more sides (module docstring)."""
    import mip

    terms = []
    for t, b in bonus.items():
        sides = _sides(options, t)
        if b <= 0 or len(sides) < 2:
            continue
        z = m.add_var(var_type=mip.BINARY)
        for s in sides:
            m += z <= mip.xsum(v for i, v in zip(kept[s], y[s]) if t in options[s][i].joins)
        terms.append((b, z))
    return terms


def earned_bonus(options: list[list[Option]], choice: list[int], cut_bonus: dict[str, float] | None) -> float:
    """The bonus of every cut that all subgraphs next to it join under ``choice``."""
    total = 0.0
    for t, b in (cut_bonus or {}).items():
        sides = _sides(options, t)
        if len(sides) > 1 and all(t in options[s][choice[s]].joins for s in sides):
            total += b
    return total


def _sides(options: list[list[Option]], cut: str) -> list[int]:
    """The subgraphs with ``cut`` among their options' cut tensors."""
    return [s for s, opts in enumerate(options) if any(cut in o.cuts for o in opts)]


def _link_cuts(m, options, kept, y) -> None:
    """The two linking constraints of every cut, for each of its 8-bit states (module
    docstring): with two 8-bit formats (OpenVINO's int8 and int8_sym) a cut may be offered in
    both, and each state must be agreed on and bought by a layer that quantizes the cut in
    that very state (linking one state only let the other be picked by both sides with no
    layer asking for it: MobileNetV2's int8_sym plan got 16 unforced uint8 cuts, each
    quantizing a tensor twice, and measured 54x its predicted loss)."""
    import mip

    states: dict[str, set[str]] = {}
    for opts in options:
        for o in opts:
            for t, st in o.cuts.items():
                if st != HP:
                    states.setdefault(t, set()).add(st)
    for t, offered in states.items():
        subs = sorted({s for s, opts in enumerate(options) for o in opts if t in o.cuts})
        for state in sorted(offered):
            on = {s: [v for i, v in zip(kept[s], y[s]) if options[s][i].cuts.get(t, HP) == state] for s in subs}
            forcing = [v for s in subs for i, v in zip(kept[s], y[s])
                       if t in options[s][i].forces and options[s][i].cuts.get(t) == state]
            for a, b in zip(subs, subs[1:]):
                m += mip.xsum(on[a]) == mip.xsum(on[b])
            if subs:
                m += mip.xsum(on[subs[0]]) <= mip.xsum(forcing)


def _solve_least_memory(options, max_mse, time_limit, bonus=None) -> Solution:
    neg = [[replace(o, gain=-o.memory) for o in opts] for opts in options]
    sol = _solve(neg, max(max_mse, 0.0), None, time_limit)
    return _solution(options, sol.choice, max_mse, None, sol.status, bonus)


def hp_solution(options: list[list[Option]], max_mse: float, *, status: str, message: str) -> Solution:
    """The plan that keeps every layer in high precision (each subgraph's all-hp option)."""
    return solution_of(options, Plan({}), max_mse, status=status, message=message)


def solution_of(options: list[list[Option]], plan: Plan, max_mse: float, *, status: str, message: str,
                cut_bonus: dict[str, float] | None = None) -> Solution:
    """The :class:`Solution` whose options give every layer its format in ``plan`` (a plan chosen
    by measurement rather than by the solver)."""
    choice = []
    for s, opts in enumerate(options):
        match = [i for i, o in enumerate(opts) if all(plan.format_of(l) == f for l, f in o.formats.items())
                 and all(plan.cuts.get(t, HP) == st for t, st in o.cuts.items())]
        if not match:
            raise AmpqError(f"subgraph {s} has no configuration matching the plan")
        choice.append(match[0])
    sol = _solution(options, choice, max_mse, None, status, cut_bonus)
    sol.message = message
    return sol


def _solution(options, choice, max_mse, max_memory, status, bonus=None) -> Solution:
    picked = [options[s][i] for s, i in enumerate(choice)]
    formats = {l: f for o in picked for l, f in o.formats.items() if f != HP}
    cuts = {t: st for o in picked for t, st in o.cuts.items() if st != HP}
    gain = float(sum(o.gain for o in picked) + earned_bonus(options, choice, bonus))
    mse = float(sum(o.mse for o in picked))
    memory = float(sum(o.memory for o in picked))
    binding = _binding(options, choice, max_mse, max_memory)
    message = ""
    if not formats:
        message = ("no configuration with a positive gain fits the loss budget: every layer stays hp"
                   if max_mse >= 0 else "")
    elif binding == "none":
        message = "the budget does not bind: every subgraph runs its highest-gain configuration"
    elif binding == "cuts":
        message = ("the budget does not bind; some subgraphs run a lower-gain configuration because quantizing "
                   "a cut costs their neighbour more than it gains")
    return Solution(Plan(formats, cuts), list(choice), gain, mse, memory, max_mse, max_memory, binding, status, message)


def _binding(options, choice, max_mse, max_memory) -> str:
    """Which constraint stops a better plan: a budget binds when some subgraph has an option
    with more gain (and the same cut states) that would break it if swapped in alone; "cuts"
    when no budget binds but an option with more gain needs other cut states."""
    used_mse = sum(options[s][i].mse for s, i in enumerate(choice))
    used_mem = sum(options[s][i].memory for s, i in enumerate(choice))
    loss = memory = False
    for s, i in enumerate(choice):
        cur = options[s][i]
        for o in options[s]:
            if o.gain > cur.gain + 1e-15 and o.cuts == cur.cuts:
                if used_mse - cur.mse + o.mse > max_mse:
                    loss = True
                if max_memory is not None and used_mem - cur.memory + o.memory > max_memory:
                    memory = True
    linked = any(o.gain > options[s][i].gain + 1e-15 and o.cuts != options[s][i].cuts
                 for s, i in enumerate(choice) for o in options[s])
    return {(True, True): "loss+memory", (True, False): "loss", (False, True): "memory"}.get(
        (loss, memory), "cuts" if linked else "none")


def pareto_front(options: list[list[Option]], points: int, *, max_memory: float | None = None,
                 cut_bonus: dict[str, float] | None = None) -> list[Solution]:
    """Solutions for ``points`` loss budgets from 0 to the loss of the unconstrained best plan
    (geometrically spaced), sorted by budget; gain never decreases along the front."""
    if points < 2:
        raise AmpqError(f"pareto points must be >= 2, got {points}")
    top = solve(options, math.inf, max_memory=max_memory, cut_bonus=cut_bonus)
    positive = sorted(o.mse for opts in options for o in opts if o.mse > 0)
    if top.mse <= 0 or not positive:
        return [top]
    lo = positive[0]
    budgets = [0.0] + [lo * (top.mse / lo) ** (k / (points - 2)) for k in range(points - 1)] if points > 2 else [0.0, top.mse]
    return [solve(options, b, max_memory=max_memory, cut_bonus=cut_bonus) for b in budgets]


def loss_budget(*, max_loss_rmse: float | None = None, max_loss_mse: float | None = None,
                loss_sq_mean: float | None = None) -> float:
    """``tau`` from the user's units.

    ``max_loss_rmse`` is the RMS change of the loss relative to the loss's own RMS,
    ``sqrt(M) / sqrt(E[L^2]) <= max_loss_rmse``: for the label-free projection loss this is
    the relative RMS change of the model's outputs. ``max_loss_mse`` is absolute.
    """
    if (max_loss_rmse is None) == (max_loss_mse is None):
        raise AmpqError("give exactly one of max_loss_rmse (relative) and max_loss_mse (absolute)")
    if max_loss_mse is not None:
        if not math.isfinite(max_loss_mse):
            raise AmpqError(f"max_loss_mse must be a finite number, got {max_loss_mse}")
        return float(max_loss_mse)
    if not math.isfinite(max_loss_rmse):
        raise AmpqError(f"max_loss_rmse must be a finite number, got {max_loss_rmse}")
    if loss_sq_mean is None or loss_sq_mean <= 0:
        raise AmpqError("max_loss_rmse needs the loss's mean square from the sensitivity pass (got none or zero)")
    return float(max_loss_rmse) ** 2 * float(loss_sq_mean) * (1 if max_loss_rmse >= 0 else -1)
