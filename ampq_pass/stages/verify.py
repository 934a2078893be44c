"""Verify: the written model measured end to end (design.md §3 "Verify, repair and report"):
its loss MSE against the high-precision model on held-out samples, and its speed-up on the
backend, next to what the plan predicted.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from ampq_pass.core import ort
from ampq_pass.core.measure import CostModel, paired_ratio
from ampq_pass.core.proto import copy_model, fits_protobuf
from ampq_pass.core.samples import Samples
from ampq_pass.stages.sensitivity.losses import Loss, logit_tensors, loss_tensors, make_loss


def run_batches(model, samples: Samples, batch_size: int = 8, optimize: bool = True,
                threads: int = 0, backend=None) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` in ONNX Runtime, batch by batch (float outputs as float64 copies);
    on ``backend`` instead where it computes a QDQ model its own way
    (:meth:`ampq_pass.core.measure.Measurer.outputs`: OpenVINO).

    The input of a final Softmax/LogSoftmax/Sigmoid (:func:`logit_tensors`) comes back too,
    under its own name: the default losses read the logits of such an output.
    """
    if not isinstance(model, onnx.ModelProto):
        return ort.run_batches(model, samples.batches(batch_size), optimize=optimize, threads=threads)
    existing = {o.name for o in model.graph.output}
    extra = sorted(set(logit_tensors(model).values()) - existing)
    own = getattr(backend, "own_numerics", False) and fits_protobuf(model)
    if not extra and not own:
        return ort.run_batches(model, samples.batches(batch_size), optimize=optimize, threads=threads)
    large = not fits_protobuf(model)
    # above 2 GB (or nothing to add): outputs added only while the session is built
    probe = model if large or not extra else copy_model(model)
    n_outputs = len(probe.graph.output)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in extra)
    try:
        if own:
            return backend.outputs(probe, list(samples.batches(batch_size)))
        sess = ort.make_session(probe, optimize=optimize, threads=threads)
    finally:
        while len(probe.graph.output) > n_outputs:
            probe.graph.output.pop()
    return ort.session_outputs(sess, samples.batches(batch_size))


def _loss_view(model_hp, model_q, loss_fn: Loss, hp: list, q: list) -> tuple[dict, dict]:
    """Which tensor the loss reads for each output, in each model: the logits of a final
    Softmax/Sigmoid where the loss reads logits and both runs returned them, else the output."""
    if not isinstance(model_hp, onnx.ModelProto) or not isinstance(model_q, onnx.ModelProto) or not hp or not q:
        return {}, {}
    view_hp, view_q = loss_tensors(model_hp, loss_fn), loss_tensors(model_q, loss_fn)
    both = [o for o in view_hp if o in view_q and view_hp[o] in hp[0] and view_q[o] in q[0]]
    return {o: view_hp[o] for o in both}, {o: view_q[o] for o in both}


def _read(values: dict, view: dict, outputs: list[str]) -> dict:
    return {o: torch.from_numpy(values[view.get(o, o)]) for o in outputs}


def measured_loss_mse(model_hp, model_q, samples: Samples, loss: str | Loss = "projection", *,
                      labels: np.ndarray | None = None, batch_size: int = 8, seed: int = 0,
                      optimize: bool = True, threads: int = 0, hp_outputs: list | None = None,
                      backend=None) -> float:
    """``E_x[(L_q(x) - L_hp(x))^2]`` with both models run in ONNX Runtime on ``samples``; with
    ``backend``, ``model_q`` runs where the plan will (:func:`run_batches`): a backend that
    compiles QDQ its own way may compute another loss than ONNX Runtime does.

    For the projection loss this is the exact expectation over r: ``||f_q - f_hp||^2`` per
    sample, summed over outputs (on the logits of a final Softmax/Sigmoid, as the sensitivity
    reads them). ``hp_outputs`` (from :func:`run_batches`) skips re-running hp.
    """
    loss_fn = make_loss(loss, labels=labels)
    hp = hp_outputs if hp_outputs is not None else run_batches(model_hp, samples, batch_size, optimize, threads)
    q = run_batches(model_q, samples, batch_size, optimize, threads, backend=backend)
    view_hp, view_q = _loss_view(model_hp, model_q, loss_fn, hp, q)
    outputs = _graph_outputs(model_hp, hp)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for (start, _), ref, out in zip(samples.numbered_batches(batch_size), hp, q):
        ref_t = _read(ref, view_hp, outputs)
        out_t = _read(out, view_q, outputs)
        if samples.whole_feeds:  # one feed is one sample: give the loss its sample axis
            ref_t = {k: t.unsqueeze(0) for k, t in ref_t.items()}
            out_t = {k: t.unsqueeze(0) for k, t in out_t.items()}
        sq = loss_fn.squared_change(out_t, ref_t, start, generator)
        total += float(sq.to(torch.float64).sum())
        count += int(sq.shape[0])
    return total / max(count, 1)


def _graph_outputs(model, hp: list) -> list[str]:
    if isinstance(model, onnx.ModelProto):
        return [o.name for o in model.graph.output]
    return list(hp[0]) if hp else []


def verify(model: onnx.ModelProto, rewritten: onnx.ModelProto, holdout: Samples, backend, timing_inputs,
           *, loss: str = "projection", batch_size: int = 8, seed: int = 0, hp_outputs=None) -> dict:
    """Measured loss MSE on ``holdout`` (the plan run on ``backend`` where that computes QDQ its
    own way, :func:`run_batches`) and, on a timing backend, the end-to-end speed-up
    (both models timed interleaved on ``timing_inputs``) with its confidence intervals:
    ``speedup`` is the median per-round ratio and ``speedup_ci`` its 95% CI where the rounds
    pair (:func:`speedup_interval`), else the ratio of the medians."""
    out = {"loss_mse": measured_loss_mse(model, rewritten, holdout, loss, batch_size=batch_size,
                                         seed=seed, hp_outputs=hp_outputs, backend=backend)}
    if isinstance(backend, CostModel):
        out["speedup"] = None
        out["note"] = f"backend {getattr(backend, 'name', backend)} is a cost model: no time measured"
        return out
    t = backend.time({"hp": model, "plan": rewritten}, timing_inputs)
    out.update(hp_time=t["hp"].median, plan_time=t["plan"].median,
               hp_ci=[t["hp"].ci_low, t["hp"].ci_high], plan_ci=[t["plan"].ci_low, t["plan"].ci_high])
    out.update(_speedup(t["hp"], t["plan"]))
    return out


def _speedup(hp, plan) -> dict:
    """``speedup`` of ``plan`` over ``hp`` (two timings of one interleaved run): the median
    per-round ratio with its 95% CI ``speedup_ci`` where the rounds pair, else the ratio of
    the medians."""
    paired = paired_ratio(hp, plan)
    if paired is None:
        return {"speedup": hp.median / plan.median}
    return {"speedup": paired[0], "speedup_ci": [paired[1], paired[2]]}


def time_together(model: onnx.ModelProto | None, candidates: dict[str, onnx.ModelProto], backend,
                  timing_inputs) -> dict[str, dict] | None:
    """Each of ``candidates``' speed-up over ``model`` from one run timing them all and ``model``
    interleaved on ``timing_inputs``: ``speedup`` (the median per-round ratio where the rounds
    pair, else the ratio of the medians), ``speedup_ci`` and ``over`` ("input"); None on a cost
    model. ``model`` None: the candidates alone (a model of which memory holds two whole-model
    sessions at a time, as a verification does), each one's speed-up over the first candidate
    (``over``: its name; the first gets 1).

    Why: each plan the pass verifies is timed against the input in a run of its own, and two
    such runs at different moments do not order two plans reliably (a small Llama's decode
    step: the budget-0.05 plan verified at 2.00x and the every-int4 plan at 1.94x in runs of
    their own; timed together, 1.82x and 2.01-2.14x, and 2.11x against 2.44x scored)."""
    if isinstance(backend, CostModel):
        return None
    if "hp" in candidates:
        raise ValueError("time_together: 'hp' names the input model; name the candidates otherwise")
    if model is None:
        first = next(iter(candidates))
        t = backend.time(dict(candidates), timing_inputs)
        return {name: {**_speedup(t[first], t[name]), "over": first} for name in candidates}
    t = backend.time({"hp": model, **candidates}, timing_inputs)
    return {name: {**_speedup(t["hp"], t[name]), "over": "input"} for name in candidates}


def speedup_interval(measured: dict) -> tuple[float, float]:
    """The range of a verification's measured speed-up: the 95% CI of the median per-round
    ratio (``speedup_ci``, :func:`ampq_pass.core.measure.paired_ratio`) where the rounds pair,
    else the widest ratio of the two medians' CIs (``hp_ci``, ``plan_ci``)."""
    if measured.get("speedup_ci"):
        lo, hi = measured["speedup_ci"]
        return float(lo), float(hi)
    (hp_lo, hp_hi), (plan_lo, plan_hi) = measured["hp_ci"], measured["plan_ci"]
    return hp_lo / plan_hi, hp_hi / plan_lo
