"""Verify: the written model measured end to end (design.md §3 "Verify, repair and report"):
its loss MSE against the high-precision model on held-out samples, and its speed-up on the
backend, next to what the plan predicted.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from ampq_pass.core import ort
from ampq_pass.core.measure import CostModel
from ampq_pass.core.samples import Samples
from ampq_pass.stages.sensitivity.losses import Loss, make_loss


def run_batches(model, samples: Samples, batch_size: int = 8, optimize: bool = True,
                threads: int = 0) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` in ONNX Runtime, batch by batch (float outputs as float64 copies)."""
    return ort.run_batches(model, samples.batches(batch_size), optimize=optimize, threads=threads)


def measured_loss_mse(model_hp, model_q, samples: Samples, loss: str | Loss = "projection", *,
                      labels: np.ndarray | None = None, batch_size: int = 8, seed: int = 0,
                      optimize: bool = True, threads: int = 0, hp_outputs: list | None = None) -> float:
    """``E_x[(L_q(x) - L_hp(x))^2]`` with both models run in ONNX Runtime on ``samples``.

    For the projection loss this is the exact expectation over r: ``||f_q - f_hp||^2`` per
    sample, summed over outputs. ``hp_outputs`` (from :func:`run_batches`) skips re-running hp.
    """
    loss_fn = make_loss(loss, labels=labels)
    hp = hp_outputs if hp_outputs is not None else run_batches(model_hp, samples, batch_size, optimize, threads)
    q = run_batches(model_q, samples, batch_size, optimize, threads)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for (start, _), ref, out in zip(samples.numbered_batches(batch_size), hp, q):
        ref_t = {k: torch.from_numpy(v) for k, v in ref.items()}
        out_t = {k: torch.from_numpy(v) for k, v in out.items()}
        sq = loss_fn.squared_change(out_t, ref_t, start, generator)
        total += float(sq.to(torch.float64).sum())
        count += int(sq.shape[0])
    return total / max(count, 1)


def verify(model: onnx.ModelProto, rewritten: onnx.ModelProto, holdout: Samples, backend, timing_inputs,
           *, loss: str = "projection", batch_size: int = 8, seed: int = 0, hp_outputs=None) -> dict:
    """Measured loss MSE on ``holdout`` and, on a timing backend, the end-to-end speed-up
    (both models timed interleaved on ``timing_inputs``) with its confidence intervals."""
    out = {"loss_mse": measured_loss_mse(model, rewritten, holdout, loss, batch_size=batch_size,
                                         seed=seed, hp_outputs=hp_outputs)}
    if isinstance(backend, CostModel):
        out["speedup"] = None
        out["note"] = f"backend {getattr(backend, 'name', backend)} is a cost model: no time measured"
        return out
    t = backend.time({"hp": model, "plan": rewritten}, timing_inputs)
    out.update(speedup=t["hp"].median / t["plan"].median, hp_time=t["hp"].median, plan_time=t["plan"].median,
               hp_ci=[t["hp"].ci_low, t["hp"].ci_high], plan_ci=[t["plan"].ci_low, t["plan"].ci_high])
    return out
