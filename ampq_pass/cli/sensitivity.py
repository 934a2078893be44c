"""Per-layer sensitivity (first-order loss MSE) of every candidate format.

    ampq-pass sensitivity MODEL --calib CALIB [--loss projection] [--formats int8,fp8_e4m3] [--json FILE]

Prints one row per quantizable layer (most sensitive first) with the formats as
columns; ``--json`` writes ``{"layers": {"<node>": {"<format>": s}}, "weight": ...,
"activation": ..., ...}`` atomically.
"""

from __future__ import annotations

import argparse

import torch

from ampq_pass.cli.args import add_calib_args, parse_formats, samples_from_args
from ampq_pass.core.cache import Cache, save_json
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.model import load_model
from ampq_pass.core.text import table
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.layers import find_layers, require_layers
from ampq_pass.stages.sensitivity import sensitivity
from ampq_pass.stages.sensitivity.executor import check_supported
from ampq_pass.stages.sensitivity.losses import load_labels, make_loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model")
    add_calib_args(parser)
    parser.add_argument("--loss", default=None,
                        help="projection (default without labels), pseudo_label, cross_entropy or mse "
                             "(with --labels); optionally ':<output name>', e.g. cross_entropy:logits")
    parser.add_argument("--labels", help=".npy (or one-array .npz) of labels, axis 0 aligned with the samples")
    parser.add_argument("--formats", help="comma-separated formats to evaluate (default: every candidate)")
    parser.add_argument("--probes", type=int, default=1,
                        help="random projections per sample for the projection loss (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random projections (default: 0)")
    parser.add_argument("--float64", action="store_true", help="forward/backward in float64 (slower)")
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write the sensitivities as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def rows(sens, layers, formats: list[str]) -> list[list[object]]:
    """Table rows, most sensitive layer (largest value over formats) first."""
    ops = {l.name: l.op_type for l in layers}
    def worst(name: str) -> float:
        return max(sens.values[name].values(), default=0.0)
    out = []
    for name in sorted(sens.values, key=worst, reverse=True):
        per = sens.values[name]
        out.append([name, ops.get(name, "?")] + [f"{per[f]:.3g}" if f in per else "-" for f in formats])
    return out


def run(args: argparse.Namespace) -> int:
    formats = parse_formats(args.formats)
    model = load_model(args.model)
    layers = require_layers(model, find_layers(model, offered=formats or ()), args.model)
    labels = load_labels(args.labels) if args.labels else None
    loss = args.loss or ("cross_entropy" if labels is not None else "projection")
    make_loss(loss, labels=labels, probes=args.probes)  # refuse a bad loss before calibrating
    check_supported(model)
    samples = samples_from_args(args, model)
    if labels is not None and len(labels) < len(samples):
        raise AmpqError(f"{args.labels}: {len(labels)} labels for {len(samples)} calibration samples")
    ranges = compute_ranges(model, layers, samples, method=args.calib_method, batch_size=args.batch_size,
                            cache=Cache(args.cache_dir), clip_formats=formats)
    sens = sensitivity(model, layers, ranges, samples, formats=formats, loss=loss, batch_size=args.batch_size,
                       seed=args.seed, progress=not args.no_progress, labels=labels, probes=args.probes,
                       dtype=torch.float64 if args.float64 else torch.float32)
    columns = formats or sens.formats()
    print(table(["node", "op", *columns], rows(sens, layers, columns)))
    rms = sens.loss_sq_mean ** 0.5
    print(f"loss {sens.loss!r} over {sens.samples} samples: mean {sens.loss_mean:.4g}, RMS {rms:.4g}; "
          f"s = E[(first-order change of the loss)^2], a plan's predicted loss MSE is the sum over its layers")
    if args.json_path:
        data = sens.to_json()
        data.update(model=str(args.model), formats=columns, calibration=samples.source,
                    synthetic=samples.synthetic, calib_method=args.calib_method)
        save_json(data, args.json_path)
        print(f"wrote {args.json_path}")
    return 0
