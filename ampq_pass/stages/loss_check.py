"""Why the measured loss differs from the predicted one (issue 12, item 7).

The loss budget rests on two approximations (design.md §3 "Sensitivity"): each layer's loss
MSE is its first-order Taylor estimate, and the losses of the layers a plan quantizes add up.
When the verified plan's measured/predicted loss ratio leaves :data:`BAND`, the report says
which of the two failed, from one more measurement per quantized subgraph:

- *alone*: the plan's formats on one subgraph only (its cut states with it), measured on the
  held-out samples like the whole plan. Their sum against the prediction tests the
  per-layer estimates; the whole plan's loss against their sum tests additivity.

Definition. With ``P`` the predicted loss, ``A = sum_k measured(plan on subgraph k alone)``
and ``T`` the plan's measured loss: the estimates hold when ``A / P`` is in :data:`BAND`,
additivity holds when ``T / A`` is; the reason names the factor outside it (both, or
neither when only their product leaves the band).
"""

from __future__ import annotations

import math
import time

import onnx

from ampq_pass.core.formats import HP
from ampq_pass.core.samples import Samples
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.partition import Partition
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.sensitivity import Sensitivity, cut_mse, predicted_mse
from ampq_pass.stages.verify import measured_loss_mse

#: the measured/predicted loss ratio the budget is taken to mean what it says within
BAND = (0.5, 2.0)
#: subgraphs measured alone at most (those with the largest predicted loss): one rewrite and
#: one run of the held-out samples each
MAX_SUBGRAPHS = 24


def outside(measured: float, predicted: float) -> bool:
    """Whether ``measured / predicted`` leaves :data:`BAND` (a zero prediction: any loss does)."""
    if predicted <= 0:
        return measured > 0
    return not BAND[0] <= measured / predicted <= BAND[1]


def plan_on(plan: Plan, partition: Partition, index: int) -> Plan:
    """``plan`` restricted to subgraph ``index``: its layers' formats and its own cut tensors' states."""
    sg = next(s for s in partition.subgraphs if s.index == index)
    mine = set(sg.inputs) | set(sg.outputs)
    return Plan({l: f for l, f in plan.formats.items() if l in sg.layers and f != HP},
                {t: st for t, st in plan.cuts.items() if t in mine})


def check_loss(model: onnx.ModelProto, layers: list[Layer], plan: Plan, partition: Partition, ranges: Ranges,
               sens: Sensitivity, holdout: Samples, measured: float, *, rules=None, loss: str = "projection",
               batch_size: int = 8, seed: int = 0, hp_outputs: list | None = None,
               seconds: float | None = None, backend=None) -> dict:
    """The measurement and reason of the module docstring, as plain data for the report. With
    ``seconds``, no subgraph is started once they are spent (the largest predicted losses go
    first; the rest count as unchecked). ``backend``: where the plan's loss was measured
    (:func:`ampq_pass.stages.verify.run_batches`), so the parts are measured there too."""
    predicted = predicted_mse(sens, plan.formats) + cut_mse(sens, plan.formats, plan.cuts)
    parts = []
    for sg in partition.subgraphs:
        sub = plan_on(plan, partition, sg.index)
        if sub.formats:
            parts.append((predicted_mse(sens, sub.formats) + cut_mse(sens, sub.formats, sub.cuts), sg.index, sub))
    parts.sort(key=lambda p: -p[0])
    checked, rows = parts[:MAX_SUBGRAPHS], []
    started = time.monotonic()
    for k, (pred, index, sub) in enumerate(checked):
        if rows and seconds is not None and time.monotonic() - started > seconds:
            checked = checked[:k]
            break
        q = rewrite(model, layers, sub, ranges, rules=rules)
        rows.append({"subgraph": index, "layers": len(sub.formats), "predicted": pred,
                     "measured": measured_loss_mse(model, q, holdout, loss, batch_size=batch_size, seed=seed,
                                                   hp_outputs=hp_outputs, backend=backend)})
    covered = sum(r["predicted"] for r in rows)
    alone = sum(r["measured"] for r in rows)
    out = {"predicted": predicted, "measured": measured, "alone": alone, "alone_predicted": covered,
           "subgraphs": rows, "unchecked": len(parts) - len(checked), "holdout": len(holdout)}
    out["reason"] = _reason(covered, alone, measured, predicted, out["unchecked"])
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def _reason(covered: float, alone: float, measured: float, predicted: float, unchecked: int) -> str:
    est, add = _ratio(alone, covered), _ratio(measured, alone)
    est_ok, add_ok = BAND[0] <= est <= BAND[1], BAND[0] <= add <= BAND[1]
    each = (f"each quantized subgraph alone measured {alone:.3g} in sum against {covered:.3g} predicted "
            f"({est:.2f}x)" + (f", {unchecked} smallest not measured" if unchecked else ""))
    together = (f"quantized together they measured {measured:.3g} ({add:.2f}x their sum: their errors "
                f"{'partly cancel' if add < 1 else 'compound'})")
    if est_ok and not add_ok:
        return f"the per-layer estimates hold ({each}), but {together}; the additive loss model ignores that"
    if add_ok and not est_ok:
        return (f"the first-order estimates are off per layer ({each}); {together}, so additivity holds")
    if not est_ok and not add_ok:
        return f"both approximations are off: {each}; {together}"
    return f"each factor is within {BAND[0]:g}-{BAND[1]:g}x ({each}; {together}); only their product is not"
