"""Command line: a thin shell over the Python API.

    ampq-pass MODEL -o OUT [--calib CALIB] [--backend ort:cpu] [--max-loss-rmse 0.01] [--pareto N]
                                                         the whole pass: search a plan, write it, verify it
    ampq-pass MODEL -o OUT --plan PLAN [--calib CALIB]   rewrite MODEL with a given plan
    ampq-pass inspect MODEL [--calib CALIB] [--json]     list quantizable layers
    ampq-pass demo                                       the embedded default (MiniLM)

Bad input exits with code 2 and one line naming what is wrong; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from ampq_pass.backends import get_backend
from ampq_pass.cli.args import (add_calib_args, add_debug_arg, model_from_args, parse_formats, parse_shapes,
                                samples_from_args)
from ampq_pass.core.cache import Cache, save_json
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.model import check_output_path, save_model
from ampq_pass.core.text import table
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.layers import find_layers, layer_macs, require_layers
from ampq_pass.stages.plan import load_plan, validate_plan
from ampq_pass.stages.rewrite import rewrite, written_for

#: subcommand -> module with ``add_arguments(parser)`` and ``run(args) -> int``; "" = this module.
#: Modules are imported only when their command runs, so the CLI starts fast.
COMMANDS = {
    "inspect": "",
    "demo": "",
    "sensitivity": "ampq_pass.cli.sensitivity",
    "partition": "ampq_pass.cli.partition",
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    if command == "inspect":
        p = argparse.ArgumentParser(prog="ampq-pass inspect", description="List the quantizable layers of a model.")
        p.add_argument("model")
        add_calib_args(p)
        p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    elif command in COMMANDS and COMMANDS[command]:
        module = importlib.import_module(COMMANDS[command])
        p = argparse.ArgumentParser(prog=f"ampq-pass {command}", description=module.__doc__.strip().splitlines()[0])
        module.add_arguments(p)
    elif command == "demo":
        p = argparse.ArgumentParser(prog="ampq-pass demo", description="Run on the embedded all-MiniLM-L6-v2.")
        p.add_argument("--out", default="out", help="folder for the exported and rewritten models (default: out)")
        p.add_argument("--max-metric-drop", type=float, metavar="X",
                       help="budget in the embedding cosine to fp32 (e.g. 0.005) instead of 10%% relative loss RMS")
    else:
        p = argparse.ArgumentParser(
            prog="ampq-pass", description="Write MODEL with a mixed-precision plan as QDQ nodes.",
            epilog="Other commands: " + ", ".join(f"ampq-pass {c} -h" for c in COMMANDS))
        p.add_argument("model")
        p.add_argument("-o", "--output", required=True, help="output model path (never the input)")
        p.add_argument("--plan", help='apply this plan instead of searching one: JSON {"formats": {"<node name>": '
                                      '"<format>"}}; unnamed layers stay hp')
        add_calib_args(p)
        g = p.add_argument_group("search (without --plan)")
        g.add_argument("--backend", default="ort:cpu",
                       help="where time gains are measured: ort:cpu (default), ort:cuda, ort:tensorrt, ort:openvino, "
                            "openvino:cpu (or openvino:DEVICE; pip install 'ampq-pass[openvino]'), "
                            "mac, memory, gaudi; with --plan, the backend whose fusion rules the rewrite follows")
        g.add_argument("--formats", help="comma-separated candidate formats (default: all the backend runs fast)")
        budget = g.add_mutually_exclusive_group()
        budget.add_argument("--max-loss-rmse", type=float,
                            help="RMS change of the loss relative to the loss's RMS (default 0.01)")
        budget.add_argument("--max-loss-mse", type=float, help="absolute bound on the predicted loss MSE")
        budget.add_argument("--max-metric-drop", type=float, metavar="X",
                            help="with --metric: the accepted drop metric(hp) - metric(plan); the pass searches its "
                                 "predicted front for the fastest plan within it")
        g.add_argument("--metric", metavar="MODULE:FUNCTION",
                       help="your evaluation, FUNCTION(model_path) -> float, higher is better; MODULE is a module name "
                            "or path/to/script.py (examples: ampq_pass.cli.metrics)")
        g.add_argument("--search-points", type=int, default=12, metavar="N",
                       help="loss budgets of the predicted front the metric search walks (default 12)")
        g.add_argument("--max-memory", type=float, help="bound on the quantizable layers' weight bytes")
        g.add_argument("--loss", default="projection",
                       help="sensitivity loss: projection (default, no labels), pseudo_label[:output]")
        g.add_argument("--holdout", type=int, help="held-out samples for verification (default: a quarter, <= 32)")
        g.add_argument("--max-configs", type=int, default=64, help="configurations per subgraph (default 64)")
        g.add_argument("--activation-matmuls", action=argparse.BooleanOptionalAction, default=None,
                       help="also quantize activation-by-activation MatMuls (attention scores); default: where the "
                            "backend runs them in 8 bits (openvino:cpu)")
        g.add_argument("--no-boundary-states", action="store_true",
                       help="time every cut tensor in high precision only (the paper's model; fewer configurations)")
        g.add_argument("--no-screen", action="store_true",
                       help="time every candidate format in the subgraphs, without first dropping the self-contained "
                            "formats (int8_dyn, int4, 16-bit) that are dominated on the layer alone")
        g.add_argument("--pareto", type=int, default=0, metavar="N", help="also solve N budgets and write the front")
        g.add_argument("--report", help="write the JSON report here (plots beside it)")
        g.add_argument("--shape", action="append", metavar="INPUT=DxDx...",
                       help="time subgraphs at this input shape, batch first (e.g. image=1x3x48x640; repeatable; "
                            "default: the most common shape of the calibration set)")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--time-budget", type=float, default=600.0, metavar="SECONDS",
                       help="wall-clock time the pass aims to finish in (default 600): subgraph timing gets fewer "
                            "rounds and repair rounds are skipped to keep to it, and the report says so; 0: no limit")
        g.add_argument("--ray", metavar="ADDRESS",
                       help="time subgraphs on a Ray cluster, one actor per device: local (start one here), auto or "
                            "ray://HOST:PORT (join one); needs pip install 'ampq-pass[ray]'")
        g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_arg(p)
    return p


def cmd_inspect(args) -> int:
    model, samples = model_from_args(args)
    layers = require_layers(model, find_layers(model), args.model)
    from ampq_pass.stages.sensitivity.executor import check_supported  # torch loads only here

    check_supported(model)  # what the whole pass would refuse, inspect refuses too
    samples = samples if samples is not None else samples_from_args(args, model)
    batch = next(samples.batches(args.batch_size))
    macs = layer_macs(model, layers, batch)
    n = len(next(iter(batch.values())))
    if args.json:
        print(json.dumps([dict(l.to_dict(), macs=macs[l.name], batch=n) for l in layers], indent=1))
        return 0

    rows = [[l.name, l.op_type, "x".join(map(str, l.weight_shape or ())) or "-", f"{macs[l.name] / 1e6:,.1f}",
             ",".join(l.formats)] for l in layers]
    print(table(["node", "op", "weight", f"MMACs (batch {n})", "formats"], rows))
    print(f"{len(layers)} quantizable layers, {sum(macs.values()) / 1e9:.2f} GMACs per batch of {n}")
    return 0


def cmd_rewrite(args) -> int:
    if not args.plan:
        return cmd_search(args)
    model, samples = model_from_args(args)
    check_output_path(args.output, args.model)
    plan = load_plan(args.plan)
    # a plan that names an attention MatMul asks for it, and so does one naming an on-request
    # format (int8_w7); only --no-activation-matmuls refuses the former
    layers = find_layers(model, activation_matmuls=args.activation_matmuls is not False, offered=plan.used_formats())
    validate_plan(plan, layers, source=args.plan)
    ranges = rules = backend = None
    if plan.used_formats():
        backend = get_backend(args.backend)
        rules = backend.capabilities().rules  # the ops between layers it fuses in 8 bits
        samples = samples if samples is not None else samples_from_args(args, model)
        ranges = compute_ranges(model, layers, samples, method=args.calib_method, batch_size=args.batch_size,
                                cache=Cache(args.cache_dir), rules=rules, clip_formats=plan.used_formats())
    # a plan naming formats is written as the pass writes it for that backend
    out = written_for(backend, model, layers, plan, ranges) if backend is not None else rewrite(model, layers, plan, None)
    save_model(out, args.output, source=args.model)
    counts: dict[str, int] = {}
    for layer in layers:
        counts[plan.format_of(layer.name)] = counts.get(plan.format_of(layer.name), 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"wrote {args.output}: {len(layers)} layers ({summary})")
    return 0


def cmd_search(args) -> int:
    """The whole pass: calibrate, sensitivity, partition, timing, solve, rewrite, verify, report."""
    # torch (sensitivity) loads only for the commands that need it
    from ampq_pass.pipeline import PassOptions, run_pass
    from ampq_pass.stages.report import plot_pareto, plot_plan, render_text

    if args.report:
        check_report = Path(args.report)
        if not check_report.parent.is_dir():
            raise AmpqError(f"{args.report}: report directory {check_report.parent} does not exist")
    opts = PassOptions(
        backend=args.backend, formats=parse_formats(args.formats),
        max_loss_rmse=args.max_loss_rmse, max_loss_mse=args.max_loss_mse, max_memory=args.max_memory,
        loss=args.loss, batch_size=args.batch_size, holdout=args.holdout, calib_method=args.calib_method,
        max_configs=args.max_configs, activation_matmuls=args.activation_matmuls, pareto=args.pareto, seed=args.seed, cache_dir=args.cache_dir,
        progress=not args.no_progress, shapes=parse_shapes(args.shape), ray=args.ray,
        time_budget=args.time_budget or None,
        metric=args.metric, max_metric_drop=args.max_metric_drop, search_points=args.search_points,
        boundary_states=not args.no_boundary_states, screen=not args.no_screen)
    result = run_pass(args.model, args.output, calib=args.calib, options=opts)
    report = result.report
    print(render_text(report))
    print(f"wrote {args.output}")
    base = Path(args.report) if args.report else Path(args.output).with_suffix(".report.json")
    save_json(report, base)
    plot_plan(report, base.with_suffix(".plan.png"))
    print(f"report: {base} (plot: {base.with_suffix('.plan.png')})")
    if report["pareto"]:
        save_json({"front": report["pareto"]}, base.with_suffix(".pareto.json"))
        plot_pareto(report, base.with_suffix(".pareto.png"), title=f"{Path(args.model).name} on {args.backend}")
        print(f"pareto front: {base.with_suffix('.pareto.json')} and {base.with_suffix('.pareto.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv[1:] if command else argv)
    try:
        if command == "inspect":
            return cmd_inspect(args)
        if command == "demo":
            from ampq_pass.cli.demo import run_demo

            return run_demo(Path(args.out), max_metric_drop=args.max_metric_drop)
        if command:
            return importlib.import_module(COMMANDS[command]).run(args)
        return cmd_rewrite(args)
    except AmpqError as exc:
        if args.debug:
            raise
        print(f"ampq-pass: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ampq-pass: interrupted; finished work is in the cache and a rerun resumes from it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
