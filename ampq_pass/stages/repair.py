"""Repair (design.md §3 "Verify, repair and report"): close the loop between the gain table
and the measured model.

Gains are measured per subgraph, each extracted and timed alone with high-precision cut
tensors. In the whole model the runtime moves Q/DQ across cuts and pays layout changes at
them, so on CNNs the sum of subgraph gains can promise a speed-up the written model does
not have. When the measured speed-up falls short of the prediction beyond the noise,
:func:`context_gains` measures each quantized subgraph *in context*: the whole model with
the plan, against the whole model with that subgraph (or a group of neighbours) reverted to
high precision, all timed interleaved. When one of those variants is itself faster than the
plan beyond the noise it becomes the next plan as measured (:meth:`Context.best_revert`: gains
at cuts do not add up, so a measured variant beats any sum); otherwise :func:`correct` writes
the measured gains into the gain table in place of the standalone ones and the plan is solved
again. A bounded number of rounds (the pipeline's ``repair_rounds``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from ampq_pass.core.cache import Cache, cached, digest, model_digest
from ampq_pass.core.formats import HP
from ampq_pass.core.measure import split_time
from ampq_pass.core.proto import expected_bytes
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.timing import GainTable, gain_noise, input_signature, session_bytes
from ampq_pass.stages.verify import speedup_interval

#: bump when the meaning of a cached entry changes
_CACHE_VERSION = 2

#: reverted variants timed together with the plan (each whole-model session holds its own arena)
VARIANTS_AT_ONCE = 4
#: what the variants' weights may add up to in one batch: GPT-2 small (500 MB of weights) with
#: four variants and the plan peaked at 7.6 GB, against 3.5 GB in the verify stage before it;
#: BERT-base (435 MB) with two at 4.6 GB
CONTEXT_BYTES = 512 << 20
#: what the variants' sessions may hold in one batch, weights and computed tensors by
#: :func:`ampq_pass.stages.timing.session_bytes`: a detector fed 736 x 3008 images has 12 MB of
#: weights but holds about 1.1 GB per image, which the weights' bound alone let through four times
CONTEXT_SESSION_BYTES = 2 << 30


def variants_at_once(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None) -> int:
    """How many reverted variants of ``model`` are timed beside the plan at once: up to
    :data:`VARIANTS_AT_ONCE`, as many as :data:`CONTEXT_BYTES` of its weights allow and, with
    ``feeds`` (one timing batch), as many as :data:`CONTEXT_SESSION_BYTES` of its sessions
    allow; at least one."""
    weights = sum(expected_bytes(t) or 0 for t in model.graph.initializer)
    n = min(VARIANTS_AT_ONCE, CONTEXT_BYTES // max(weights, 1))
    if feeds is not None and n > 1:
        n = min(n, CONTEXT_SESSION_BYTES // max(session_bytes(model, feeds), 1))
    return max(1, n)


@dataclass
class Round:
    """One verified plan: what was predicted, what was measured, and what the loop corrected."""

    index: int
    formats: dict[str, str]
    predicted_speedup: float | None
    measured: dict
    #: subgraph index -> {"table_gain": standalone gain, "context_gain": gain measured in the model}
    corrections: dict[int, dict] = field(default_factory=dict)
    #: where the plan came from when not from a repair ("int8 anchor")
    note: str = ""

    def to_json(self) -> dict:
        return {"round": self.index, "layers_quantized": len(self.formats), "formats": dict(self.formats),
                "predicted_speedup": self.predicted_speedup, "measured_speedup": self.measured.get("speedup"),
                "measured_loss_mse": self.measured.get("loss_mse"),
                # its speed-up in the run that timed the verified plans together (pipeline's ship choice),
                # over the input or, where memory holds one variant at a time, over the other plan
                "measured_together": (self.measured.get("together") or {}).get("speedup"),
                "measured_together_over": (self.measured.get("together") or {}).get("over"),
                "corrections": {str(k): v for k, v in self.corrections.items()}, "note": self.note}


def falls_short(predicted_speedup: float | None, measured: dict) -> bool:
    """Whether the measured speed-up is below the prediction beyond the noise: the prediction
    lies above the measured speed-up's interval (a time-measuring backend only)."""
    if predicted_speedup is None or measured.get("speedup") is None:
        return False
    return predicted_speedup > speedup_interval(measured)[1]


def quantized_groups(table: GainTable, plan: Plan, max_groups: int) -> list[list[int]]:
    """Indices of the subgraphs ``plan`` quantizes, in graph order, in at most ``max_groups``
    groups of neighbours (each group is reverted together: the cost of a round stays bounded)."""
    used = [s.index for s in table.subgraphs if any(plan.format_of(l) != HP for l in s.layers)]
    if not used:
        return []
    size = -(-len(used) // max_groups)
    return [used[i:i + size] for i in range(0, len(used), size)]


@dataclass
class Context:
    """The plan and each of its variants with a group of neighbouring subgraphs reverted to hp,
    timed interleaved inside the whole model (seconds, or the backend's unit)."""

    plan_time: float
    #: per group: (its subgraph indices, the variant's time, the noise of the difference)
    groups: list[tuple[list[int], float, float]]

    def to_json(self) -> dict:
        return {"plan_time": self.plan_time, "groups": [[m, t, n] for m, t, n in self.groups]}

    @classmethod
    def from_json(cls, d: dict) -> "Context":
        return cls(float(d["plan_time"]), [(list(m), float(t), float(n)) for m, t, n in d["groups"]])

    def best_revert(self) -> tuple[list[int], float] | None:
        """The group whose reverting makes the model faster beyond the noise by the most, with
        the variant's time; None when no variant beats the plan. Gains at cuts do not add up:
        a variant measured faster is a better plan as it is, whatever the table says."""
        faster = [(members, t) for members, t, noise in self.groups if self.plan_time - t > noise]
        return min(faster, key=lambda x: x[1]) if faster else None


def measure_context(model: onnx.ModelProto, layers: list[Layer], ranges: Ranges | None, table: GainTable,
                    plan: Plan, backend, inputs: list[dict[str, np.ndarray]], *, max_groups: int = 12,
                    cache: Cache | None = None, seconds: float | None = None,
                    at_once: int | None = None) -> Context:
    """Time ``plan`` and, for each group of :func:`quantized_groups`, the plan with that group
    reverted to hp, interleaved on ``inputs`` (cached like every timing). With ``seconds``, no
    batch of variants starts once they are spent: the groups not timed are left out of the
    context (their subgraphs keep their standalone gains). ``at_once``: the variants timed
    together, when the caller has :func:`variants_at_once` already (it infers the model's shapes)."""
    groups = quantized_groups(table, plan, max_groups)
    key = digest("context", _CACHE_VERSION, model_digest(model), sorted(plan.formats.items()),
                 sorted(plan.cuts.items()), groups,
                 input_signature(inputs), backend.key())

    def measure() -> Context:
        rules = backend.capabilities().rules
        planned = rewrite(model, layers, plan, ranges, rules=rules)
        out, reference = [], None
        # whole-model sessions each hold an ONNX Runtime arena (ResNet-50: ~350 MB): the
        # variants are timed a few at a time, each batch with the plan, and put on the first
        # batch's scale (a busier batch keeps its ratios to the plan)
        per_batch = at_once or variants_at_once(model, inputs[0] if inputs else None)
        # the batches share one attempt's time cap: on BERT-base six batches of full rounds
        # made the repair round six minutes long
        timer = split_time(backend, -(-len(groups) // per_batch))
        started = time.monotonic()
        for start in range(0, len(groups), per_batch):
            if out and seconds is not None and time.monotonic() - started > seconds:
                break
            batch = list(enumerate(groups))[start:start + per_batch]
            models = {"plan": planned}
            models.update({f"revert{g}": rewrite(model, layers, reverted(table, plan, members), ranges, rules=rules)
                           for g, members in batch})
            t = timer.time(models, inputs)
            del models
            reference = reference or t["plan"].median
            f = reference / t["plan"].median if t["plan"].median > 0 else 1.0
            out.extend((members, t[f"revert{g}"].median * f, gain_noise(t[f"revert{g}"], t["plan"]) * f)
                       for g, members in batch)
        return Context(reference if reference is not None else math.nan, out)

    ctx, _ = cached(cache, "gain", key, measure, dump=Context.to_json, load=Context.from_json)
    return ctx


def reverted(table: GainTable, plan: Plan, members: list[int]) -> Plan:
    """``plan`` with the layers of subgraphs ``members`` back in hp (and the cut states that leaves)."""
    back = {l for s in table.subgraphs if s.index in members for l in s.layers}
    return table.plan({l: f for l, f in plan.formats.items() if l not in back})


def context_gains(table: GainTable, plan: Plan, ctx: Context) -> dict[int, tuple[float, float]]:
    """Subgraph index -> (gain in context, its noise), in the gain table's time unit.

    A group's gain in context is ``T(plan with the group reverted to hp) - T(plan)``, less the
    cut bonus the revert gives up (``GainTable.cut_bonus``: the table credits that to the cuts,
    not to the subgraphs); it is shared among the group's subgraphs in proportion to their
    table gains (equally when those are all zero).
    """
    by_index = {s.index: s for s in table.subgraphs}
    out: dict[int, tuple[float, float]] = {}
    for members, time, noise in ctx.groups:
        lost = table.bonus(plan) - table.bonus(reverted(table, plan, members)) if table.cut_bonus else 0.0
        gain = time - ctx.plan_time - lost
        weights = [max(by_index[i].lookup(plan.formats, plan.cuts).gain, 0.0) for i in members]
        total = sum(weights)
        for i, w in zip(members, weights):
            share = w / total if total > 0 else 1.0 / len(members)
            out[i] = (gain * share, noise * share)
    return out


def fit_to_measured(table: GainTable, plan: Plan, gains: dict[int, tuple[float, float]],
                    speedup: float) -> dict[int, tuple[float, float]]:
    """``gains`` (from :func:`context_gains`) scaled so that the corrected table predicts ``plan``
    at its measured ``speedup``.

    Each group's gain in context is its *marginal* gain, measured with the rest of the plan in
    place, and marginal gains add up to the plan's gain only where gains are additive. Where
    int8 neighbours share a saving (a cut both sides compute in int8, a layout kept between
    them), reverting either side gives it up, so each side's gain counts it and their sum
    counts it twice: on ResNet-50 at budget 0.02 the first plan measured 1.28x and its groups'
    context gains added up to a table that predicted 2.01x for the next plan, which measured
    1.275x. Where gains are sub-additive (two subgraphs that each save time alone save less
    together: the runtime's threads or memory traffic were the limit) each marginal gain is
    smaller than its share and the sum falls short: YOLOv8n on OpenVINO at budget 0.03 measured
    2.095x and its context gains added up to a table that predicted 1.715x for the next plan (one
    layer fewer), which measured 2.226x (fitted both ways, a later run's repair predicted 2.413x
    for a plan that measured 2.189x). Either way the plan's measured gain is the one fact, so the
    gains are scaled to it, keeping their proportions (and their noise's).
    """
    if not gains or speedup <= 0 or not table.hp_total:
        return gains
    target = table.hp_total * (1.0 - 1.0 / speedup)  # the plan's measured gain, on the table's scale
    chosen = table.lookup_all(plan)
    rest = sum(c.gain for s, c in zip(table.subgraphs, chosen) if s.index not in gains) + table.bonus(plan)
    measured = sum(g for g, _ in gains.values())
    if measured <= 0 or math.isclose(rest + measured, target):
        return gains  # nothing measured to share the gain in proportion to, or it fits
    scale = max(target - rest, 0.0) / measured
    return {i: (g * scale, n * scale) for i, (g, n) in gains.items()}


def correct(table: GainTable, plan: Plan, gains: dict[int, tuple[float, float]]) -> dict[int, dict]:
    """Put the gains measured in context into ``table`` (in place); returns what changed, for
    the report.

    The configuration ``plan`` uses gets its measured gain (inside its noise: zero, like every
    other gain). The difference to its standalone gain is what the subgraph's cuts cost in the
    model (Q/DQ moved across them, layout changes): every other quantized configuration of the
    subgraph pays it too, so each gets the same difference added; the hp configuration keeps 0.
    """
    by_index = {s.index: s for s in table.subgraphs}
    changed = {}
    for i, (gain, noise) in gains.items():
        sg = by_index[i]
        config = sg.lookup(plan.formats, plan.cuts)
        new = gain if abs(gain) > noise else 0.0
        delta = new - config.gain
        changed[i] = {"table_gain": config.gain, "context_gain": new, "noise": noise}
        for c in sg.configs:
            if any(f != HP for f in c.formats.values()):
                c.gain += delta
    return changed
