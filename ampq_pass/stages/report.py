"""The report: JSON for machines, a terminal summary and plots for people."""

from __future__ import annotations

import math
from pathlib import Path

from dataclasses import dataclass, field

from ampq_pass.core.formats import HP
from ampq_pass.core.samples import Samples
from ampq_pass.core.text import table as text_table
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.partition import Partition
from ampq_pass.stages.sensitivity import Sensitivity, predicted_mse
from ampq_pass.stages.solve import Solution
from ampq_pass.stages.timing import GainTable

REPORT_VERSION = 1


@dataclass
class PassRecord:
    """What the stages of one pass produced: the report is a function of this record."""

    model_path: str
    output: str
    layers: list[Layer]
    sens: Sensitivity
    partition: Partition
    table: GainTable
    solution: Solution
    predicted_speedup: float | None
    measured: dict
    tau: float
    #: the pass's options (:class:`ampq_pass.pipeline.PassOptions`)
    opts: object
    ranges_method: str
    samples: Samples
    holdout: Samples
    front: list[dict] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    timing_shapes: dict | None = None
    normalized: list[str] = field(default_factory=list)
    #: the solver's plan when it measured no faster than the input (then every layer stays hp)
    rejected: dict | None = None
    #: every verified plan of the closed loop (:class:`ampq_pass.stages.repair.Round` as JSON)
    rounds: list[dict] = field(default_factory=list)


def build_report(record: PassRecord) -> dict:
    """Every layer's sensitivities, subgraph and chosen format; every subgraph's configs with
    gains, noise and the chosen one; predicted vs measured; the budget and what bound."""
    r = record
    layers, sens, partition, table, solution, opts = r.layers, r.sens, r.partition, r.table, r.solution, r.opts
    samples, holdout = r.samples, r.holdout
    sub_of = {l: sg.index for sg in partition.subgraphs for l in sg.layers}
    chosen = solution.plan.formats
    layer_rows = []
    for l in layers:
        layer_rows.append({
            "name": l.name, "op_type": l.op_type, "subgraph": sub_of.get(l.name),
            "format": chosen.get(l.name, HP),
            "sensitivity": dict(sens.values.get(l.name, {})),
            "weight_sensitivity": dict(sens.weight.get(l.name, {})),
            "activation_sensitivity": dict(sens.activation.get(l.name, {})),
        })
    subgraphs = []
    for sg, gains, pick in zip(partition.subgraphs, table.subgraphs, solution.choice):
        configs = [dict(c.to_json(), predicted_mse=predicted_mse(sens, c.formats)) for c in gains.configs]
        subgraphs.append({"index": sg.index, "name": sg.name, "kind": sg.kind, "layers": list(sg.layers),
                          "groups": sg.groups, "note": sg.note, "hp_time": gains.hp_time, "cached": gains.cached,
                          "configs": configs, "chosen": pick})
    return {
        "version": REPORT_VERSION,
        "model": r.model_path, "output": r.output, "backend": str(getattr(opts.backend, "name", opts.backend)), "unit": table.unit,
        "calibration": {"samples": len(samples), "holdout": len(holdout), "synthetic": samples.synthetic,
                        "ranges": r.ranges_method, "loss": sens.loss, "batch_size": opts.batch_size,
                        "shape_groups": len(samples.groups) if hasattr(samples, "groups") else 1},
        # which input shapes the subgraphs were timed at, and why (--shape or the most common)
        "timing_shapes": r.timing_shapes,
        # what load-time normalisation changed (ampq_pass.core.normalize), empty when nothing
        "normalized": list(r.normalized),
        "budget": {"max_loss_rmse": opts.max_loss_rmse, "max_loss_mse": opts.max_loss_mse, "tau": r.tau,
                   "max_memory": opts.max_memory, "binding": solution.binding, "status": solution.status,
                   "message": solution.message},
        "predicted": {"speedup": r.predicted_speedup, "loss_mse": solution.mse, "gain": solution.gain,
                      "hp_time": table.hp_total, "memory": solution.memory if opts.max_memory is not None else None},
        "measured": r.measured,
        # the plan the solver chose, when its measured model was not faster than the input
        "rejected_plan": r.rejected,
        # the closed loop: each verified plan, predicted vs measured, and the gains it corrected
        "rounds": r.rounds,
        "layers": layer_rows,
        "subgraphs": subgraphs,
        "pareto": r.front,
        "stages_seconds": {k: round(v, 3) for k, v in r.stages.items()},
    }


def _fmt(v, spec=".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def render_text(report: dict) -> str:
    """A terminal summary: per-subgraph table, totals, prediction vs measurement."""
    unit = report["unit"]
    scale, uname = (1e3, "ms") if unit == "s" else (1.0, unit)
    rows = []
    for sg in report["subgraphs"]:
        c = sg["configs"][sg["chosen"]]
        used = sorted({f for f in c["formats"].values() if f != HP})
        best = max(sg["configs"], key=lambda x: x["gain"])
        rows.append([sg["index"], sg["kind"], len(sg["layers"]), len(sg["configs"]), ",".join(used) or "hp",
                     f"{sg['hp_time'] * scale:.3g}", f"{c['gain'] * scale:.3g}", f"{c['noise'] * scale:.2g}",
                     f"{best['gain'] * scale:.3g}", _fmt(c["predicted_mse"])])
    lines = [text_table(["sub", "kind", "layers", "configs", "chosen", f"hp {uname}", f"gain {uname}",
                         f"noise {uname}", "best gain", "pred. loss MSE"], rows)]
    b, p, m = report["budget"], report["predicted"], report["measured"]
    n_q = sum(l["format"] != HP for l in report["layers"])
    counts = {}
    for l in report["layers"]:
        counts[l["format"]] = counts.get(l["format"], 0) + 1
    lines.append("")
    lines.append(f"plan: {n_q} of {len(report['layers'])} layers quantized ("
                 + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ")")
    budget = (f"relative loss RMS <= {b['max_loss_rmse']:g}" if b["max_loss_rmse"] is not None
              else f"loss MSE <= {b['max_loss_mse']:g}")
    lines.append(f"budget: {budget} (tau = {b['tau']:.3g}); binding: {b['binding']}; {b['status']}"
                 + (f" - {b['message']}" if b["message"] else ""))
    lines.append(f"speed-up: predicted {_fmt(p['speedup'], '.3f')}x, measured {_fmt(m.get('speedup'), '.3f')}x")
    for rnd in report.get("rounds", [])[1:] if len(report.get("rounds", [])) > 1 else []:
        lines.append(f"repair round {rnd['round']}: {rnd['layers_quantized']} layers quantized, predicted "
                     f"{_fmt(rnd['predicted_speedup'], '.3f')}x, measured {_fmt(rnd['measured_speedup'], '.3f')}x")
    if report.get("rejected_plan"):
        rej = report["rejected_plan"]
        lines.append(f"rejected: the solver's plan ({len(rej['formats'])} layers quantized, predicted "
                     f"{_fmt(rej['predicted_speedup'], '.3f')}x) measured {_fmt(rej['measured'].get('speedup'), '.3f')}x, "
                     f"not faster than the input beyond the noise; every layer stays hp")
    ratio = (m["loss_mse"] / p["loss_mse"]) if p["loss_mse"] else None
    lines.append(f"loss MSE: predicted {_fmt(p['loss_mse'])}, measured {_fmt(m['loss_mse'])} on "
                 f"{report['calibration']['holdout']} held-out samples (measured/predicted {_fmt(ratio, '.2f')})")
    if report.get("timing_shapes"):
        t = report["timing_shapes"]
        lines.append("timed at " + ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in t["shapes"].items())
                     + f" ({t['source']}; calibration has {len(t['calibration_shapes'])} shape(s))")
    if report.get("normalized"):
        lines.append("normalised at load: " + "; ".join(report["normalized"]))
    if report.get("stages_seconds"):
        lines.append("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["stages_seconds"].items()))
    return "\n".join(lines)


def plot_plan(report: dict, path: str | Path) -> Path:
    """Per-layer plan: sensitivity of each format (log scale) with the chosen format marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    formats = sorted({f for l in layers for f in l["sensitivity"]})
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(layers)), 4.5))
    x = range(len(layers))
    for f in formats:
        ys = [l["sensitivity"].get(f, float("nan")) for l in layers]
        ax.plot(x, ys, marker="o", ms=3, lw=1, label=f"sensitivity {f}")
    for i, l in enumerate(layers):
        if l["format"] != HP:
            ax.scatter([i], [l["sensitivity"].get(l["format"], float("nan"))], s=80, facecolors="none",
                       edgecolors="k", zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels([_short(l["name"]) for l in layers], rotation=90, fontsize=6)
    ax.set_ylabel("predicted loss MSE (s[l][p])")
    ax.set_title("per-layer plan: circled = chosen format (others stay hp)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_pareto(front: list[dict], path: str | Path, *, title: str = "Pareto front") -> Path:
    """Predicted loss MSE vs predicted speed-up, with the measured points of the verified plans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    pts = [p for p in front if p.get("predicted_speedup")]
    ax.plot([p["predicted_mse"] for p in pts], [p["predicted_speedup"] for p in pts], "o-", label="predicted")
    meas = [p for p in front if p.get("measured_speedup")]
    ax.plot([p["measured_loss_mse"] for p in meas], [p["measured_speedup"] for p in meas], "s--", label="measured")
    ax.set_xscale("symlog", linthresh=min([p["predicted_mse"] for p in pts if p["predicted_mse"] > 0] or [1e-9]))
    ax.set_xlabel("loss MSE")
    ax.set_ylabel("speed-up over hp")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]
