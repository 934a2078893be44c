"""The report: JSON for machines, a terminal summary and plots for people."""

from __future__ import annotations

import math
from pathlib import Path

from dataclasses import dataclass, field

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import HP
from ampq_pass.core.samples import Samples
from ampq_pass.core.text import table as text_table
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.partition import Partition
from ampq_pass.stages.sensitivity import Sensitivity, cut_mse, predicted_mse
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
    #: hp and uniform int8, measured like the front's points: the plot's reference marks
    reference: list[dict] = field(default_factory=list)
    #: what timing the front quickly first cost and saved (:func:`ampq_pass.stages.search.timing_saving`)
    front_timing: dict | None = None
    #: the metric search (:class:`ampq_pass.stages.search.SearchResult` as JSON), None without a metric
    search: dict | None = None
    #: each layer's self-contained formats timed alone (:class:`ampq_pass.stages.screen.Screen` as
    #: JSON, with its one-line summary), None when the screen was off
    screen: dict | None = None
    #: why the measured loss left the band around the predicted one
    #: (:func:`ampq_pass.stages.loss_check.check_loss`), None when it did not
    loss_check: dict | None = None
    #: the pass's wall-clock budget, what timing was allowed and what was skipped to keep to it
    #: (:class:`ampq_pass.pipeline.TimeBudget` as JSON), None when not tracked
    time_budget: dict | None = None
    #: (layer, format) pairs the backend ran far off the QDQ semantics, dropped before the
    #: sensitivity was used (:class:`ampq_pass.stages.numerics.Numerics` as JSON), None when
    #: the backend runs QDQ as ONNX Runtime does
    numerics: dict | None = None


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
                          # an earlier subgraph of the same structure whose timing this one reuses
                          "repeat_of": gains.repeat_of, "configs": configs, "chosen": pick})
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
                   "max_memory": opts.max_memory, "max_metric_drop": getattr(opts, "max_metric_drop", None),
                   "binding": solution.binding, "status": solution.status,
                   "message": solution.message},
        # cut tensors the plan quantizes (design.md §3 "Boundary states"), and how many
        # configurations were timed with and without counting cut states
        "boundaries": {"cuts": dict(solution.plan.cuts), "n_cuts": len(partition.cuts),
                       # what the chosen 8-bit cuts add to the predicted loss (readers other than layers)
                       "cuts_predicted_mse": cut_mse(sens, chosen, solution.plan.cuts),
                       "configs": table.n_configs,
                       "configs_derived": sum(c.derived for s in table.subgraphs for c in s.configs),
                       # clearly dominated in a quick first pass, so not timed again in full
                       "configs_quick": sum(c.quick for s in table.subgraphs for c in s.configs),
                       # subgraphs that reuse the timing of an earlier one of the same structure
                       "subgraphs_repeated": sum(s.repeat_of is not None for s in table.subgraphs),
                       "configs_without_states": sum(len({tuple(sorted(c.formats.items())) for c in s.configs})
                                                     for s in table.subgraphs),
                       # the parts fitted to the whole model: hp (factor) and every-int8 (ampq_pass.stages.timing)
                       "parts_scale": table.parts_scale, "format_anchors": table.format_anchors,
                       # time credited to cuts quantized on both sides, and those the plan earns
                       "cut_bonus": dict(table.cut_bonus),
                       "cuts_earning_bonus": _earning(table, solution.plan)},
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
        "pareto_reference": r.reference,
        "pareto_timing": r.front_timing,
        # the user's metric: every front plan tried with its metric, measured speed-up and predicted loss
        "search": r.search,
        # formats dropped before subgraph timing because, timed alone, they were dominated
        "screen": r.screen,
        # formats dropped because the backend computed them far off what the QDQ model says
        "numerics": r.numerics,
        # measured/predicted loss outside 0.5-2x: each quantized subgraph measured alone, and why
        "loss_check": r.loss_check,
        "stages_seconds": {k: round(v, 3) for k, v in r.stages.items()},
        "time_budget": r.time_budget,
    }


def _earning(table, plan) -> list[str]:
    try:
        return table.bonus_cuts(table.lookup_all(plan)) if table.cut_bonus else []
    except AmpqError:  # a plan chosen by measurement outside the table (not expected)
        return []


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
    search = report.get("search")
    if search:
        budget = f"metric {search['metric']}: drop from hp <= {search['max_drop']:g}"
    elif b["max_loss_rmse"] is not None:
        budget = f"relative loss RMS <= {b['max_loss_rmse']:g}"
    else:
        budget = f"loss MSE <= {b['max_loss_mse']:g}"
    lines.append(f"budget: {budget} (tau = {b['tau']:.3g}); binding: {b['binding']}; {b['status']}"
                 + (f" - {b['message']}" if b["message"] else ""))
    bd = report.get("boundaries")
    if bd and bd["configs"] > bd["configs_without_states"]:
        lines.append(f"boundaries: {len(bd['cuts'])} of {bd['n_cuts']} cut tensors carry int8; "
                     f"{bd['configs']} configurations ({bd.get('configs_derived', 0)} of them added up from two timed "
                     f"ones, {bd.get('configs_quick', 0)} clearly dominated after a quick pass; "
                     f"{bd['configs_without_states']} without cut states)")
    if bd and bd.get("subgraphs_repeated"):
        lines.append(f"timing: {bd['subgraphs_repeated']} of {len(report['subgraphs'])} subgraphs repeat an earlier "
                     f"one's structure and reuse its measurement")
    if report.get("screen") and report["screen"]["screened"]:
        lines.append(f"screen: {report['screen']['summary']}")
    if report.get("numerics"):
        lines.append(f"numerics on the backend: {report['numerics']['summary']}")
    for fmt, anchor in ((bd or {}).get("format_anchors") or {}).items():
        what = anchor.get("plan") or f"every {fmt}-capable layer in {fmt}"
        lines.append(f"time model: {what} ({anchor['layers']} layers) measured "
                     f"{anchor['measured_speedup']:.3f}x against {anchor['predicted_speedup']:.3f}x from the parts; "
                     f"{anchor['outcome']}")
    lines.append(f"speed-up: predicted {_fmt(p['speedup'], '.3f')}x, measured {_fmt(m.get('speedup'), '.3f')}x"
                 + (f" over the normalised model; {m['speedup_over_file']:.3f}x over the input file as given "
                    f"(normalising alone changed its timing)" if m.get("speedup_over_file") else ""))
    for rnd in report.get("rounds", [])[1:] if len(report.get("rounds", [])) > 1 else []:
        lines.append(f"round {rnd['round']} ({rnd.get('note') or 'repair'}): {rnd['layers_quantized']} layers quantized, "
                     f"predicted {_fmt(rnd['predicted_speedup'], '.3f')}x, measured {_fmt(rnd['measured_speedup'], '.3f')}x, "
                     f"loss MSE {_fmt(rnd.get('measured_loss_mse'), '.3g')}")
    if report.get("rejected_plan"):
        rej = report["rejected_plan"]
        why = (f"its measured loss {_fmt(rej['measured'].get('loss_mse'), '.3g')} over the budget"
               if report["budget"].get("status") == "loss" else "not faster than the input beyond the noise")
        lines.append(f"rejected: the solver's plan ({len(rej['formats'])} layers quantized, predicted "
                     f"{_fmt(rej['predicted_speedup'], '.3f')}x) measured {_fmt(rej['measured'].get('speedup'), '.3f')}x, "
                     f"{why}; every layer stays hp")
    if search:
        lines.extend(_search_lines(report))
    elif report.get("pareto_timing") and report["pareto_timing"].get("quick"):
        lines.append("pareto front: " + _timing_line(report["pareto_timing"]))
    ratio = (m["loss_mse"] / p["loss_mse"]) if p["loss_mse"] else None
    lines.append(f"loss MSE: predicted {_fmt(p['loss_mse'])}, measured {_fmt(m['loss_mse'])} on "
                 f"{report['calibration']['holdout']} held-out samples (measured/predicted {_fmt(ratio, '.2f')})")
    if report.get("loss_check"):
        lines.append(f"loss check: {report['loss_check']['reason']}")
    if report.get("timing_shapes"):
        t = report["timing_shapes"]
        lines.append("timed at " + ", ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in t["shapes"].items())
                     + f" ({t['source']}; calibration has {len(t['calibration_shapes'])} shape(s))")
    if report.get("normalized"):
        lines.append("normalised at load: " + "; ".join(report["normalized"]))
    if report.get("stages_seconds"):
        lines.append("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["stages_seconds"].items()))
    budget = report.get("time_budget") or {}
    for line in budget.get("skipped", []):
        lines.append(f"time budget: {line}")
    return "\n".join(lines)


def _search_lines(report: dict) -> list[str]:
    """The metric search: every front plan tried, then the count and the timing saving."""
    search = report["search"]
    rows = []
    for e in report["pareto"]:
        if e.get("metric") is None or "front_index" not in e or not e["layers_quantized"]:
            continue
        rows.append([e["front_index"], e["layers_quantized"], _fmt(e.get("predicted_rel_rms"), ".3g"),
                     _fmt(e.get("predicted_speedup"), ".3f"), _fmt(e["metric"], ".5g"), _fmt(e["metric_drop"], "+.3g"),
                     "yes" if e.get("within") else "no", _fmt(e.get("measured_speedup"), ".3f"),
                     e.get("measured_protocol") or "-", "<-" if e.get("chosen") else ""])
    out = ["", f"metric search ({search['metric']}, hp {search['hp_metric']:.5g}, max drop {search['max_drop']:g}):",
           text_table(["plan", "layers", "pred. rel. RMS", "pred. x", "metric", "drop", "within", "measured x",
                       "timing", "chosen"], rows),
           f"evaluated {search['evaluated']} of {search['front_plans']} front plans (bisection along the front"
           + (f"; {search['refined']} solved between the last plan within and the first over)"
              if search.get("refined") else ")")]
    if search.get("timing") and search["timing"].get("quick"):
        out.append("timing: " + _timing_line(search["timing"]))
    return out


def _timing_line(t: dict) -> str:
    q, f = t["quick"], t["full"]
    line = (f"{q['measurements']} quick measurements ({q['seconds']:.1f} s, {q['runs']} runs), "
            f"{t['remeasured']} re-measured with the full protocol")
    if "saved_seconds" in t:
        line += (f"; timing every plan with the full protocol would have cost ~{t['full_seconds_per_measurement']:.1f} s"
                 f" each: saved ~{t['saved_seconds']:.1f} s, ~{t['saved_runs']} runs, "
                 f"{t['full_measurements_saved']} full measurements")
    return line


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


def plot_pareto(report: dict | list, path: str | Path, *, title: str = "Pareto front") -> Path:
    """The front in units people read: speed-up over hp against the user's metric drop (with a
    metric) or the relative RMS change of the loss (the budget's unit), measured and predicted
    points both, the chosen plan starred, hp and uniform int8 marked. ``report`` is the pass's
    report (a bare list of front points also works)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    if isinstance(report, list):
        report = {"pareto": report}
    front, refs, search = report.get("pareto") or [], report.get("pareto_reference") or [], report.get("search")
    if search:
        xp = xm = "metric_drop"  # predicted points sit at their measured metric: no metric is predicted
        name = search["metric"] if len(search["metric"]) <= 60 else search["metric"][:57] + "..."
        xlabel = f"metric drop from hp: metric(hp) - metric(plan), lower is better\n{name}"
    else:
        xp, xm = "predicted_rel_rms", "measured_rel_rms"
        xlabel = "relative RMS change of the loss, sqrt(MSE / E[L^2])"
    fig, ax = plt.subplots(figsize=(7.5, 5))
    xs_all = ([e.get(xp) for e in front] + [e.get(xm) for e in front if e.get("measured_speedup")]
              + [r.get(xm) for r in refs])
    positive = sorted(x for x in xs_all if x is not None and x > 0)
    log_x = bool(positive) and positive[-1] / positive[0] > 50  # else the range allows a linear axis
    edge = positive[0] / 2 if log_x else 0.0

    def at(x):  # on a log axis, zero (hp) sits at the left edge
        return edge if log_x and x is not None and x <= 0 else x

    pred = [(at(e[xp]), e["predicted_speedup"]) for e in front if e.get(xp) is not None and e.get("predicted_speedup")]
    meas = [dict(e, **{xm: at(e[xm])}) for e in front
            if e.get(xm) is not None and e.get("measured_speedup") and e.get("layers_quantized")]
    pred.sort()
    if pred:
        ax.plot(*zip(*pred), "o-", color="tab:blue", mfc="none", ms=6, lw=1, label="predicted (solver)")
    if meas:
        xs = [e[xm] for e in meas]
        ys = [e["measured_speedup"] for e in meas]
        lo = [e["measured_speedup"] - e["measured_speedup_ci"][0] if e.get("measured_speedup_ci") else 0 for e in meas]
        hi = [e["measured_speedup_ci"][1] - e["measured_speedup"] if e.get("measured_speedup_ci") else 0 for e in meas]
        ax.errorbar(xs, ys, yerr=[[max(v, 0) for v in lo], [max(v, 0) for v in hi]], fmt="s", color="tab:orange",
                    ms=6, capsize=3, lw=1, label="measured (95% CI)")
        if search:
            for e in meas:
                if e.get("predicted_speedup"):
                    ax.plot([e[xm], e[xm]], [e["predicted_speedup"], e["measured_speedup"]], color="0.6", lw=0.8)
    chosen = [e for e in front + refs if e.get("chosen")]
    refs = [r for r in refs if not r.get("chosen")]
    for e in chosen:
        x = at(e.get(xm) if e.get(xm) is not None and e.get("measured_speedup") else e.get(xp))
        y = e.get("measured_speedup") or e.get("predicted_speedup")
        if x is not None and y:
            ax.plot([x], [y], "*", color="tab:red", ms=16, mec="k", zorder=5,
                    label=f"chosen ({e['layers_quantized']} layers quantized, {y:.2f}x)")
    markers = {"hp": ("D", "k"), "uniform int8": ("^", "tab:green")}
    for r in refs:
        x = at(r.get(xm) if r.get(xm) is not None and r.get("measured_speedup") else r.get(xp))
        y = r.get("measured_speedup") or r.get("predicted_speedup")
        if x is None or not y:
            continue
        marker, color = markers.get(r["name"], ("X", "tab:gray"))
        where = "; x = 0, drawn at the left edge" if log_x and x == edge else ""
        ax.plot([x], [y], marker, color=color, ms=8, zorder=6, label=f"{r['name']} ({y:.2f}x{where})")
    if search:
        ax.axvline(search["max_drop"], color="tab:red", ls="--", lw=1, label=f"max drop {search['max_drop']:g}")
    ax.axhline(1.0, color="0.5", ls=":", lw=1)
    if log_x:
        ax.set_xscale("log")
    if not search:
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("speed-up over hp")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]
