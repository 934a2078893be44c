"""Arguments shared by the sub-commands, parsed in one place each."""

from __future__ import annotations

import argparse

import onnx

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import get_format
from ampq_pass.core.model import finish_loading, read_model
from ampq_pass.core.samples import Samples, calib_feeds, load_samples, synthetic_samples
from ampq_pass.stages.calibrate import CALIBRATION_METHODS


def add_calib_args(p: argparse.ArgumentParser) -> None:
    given = p.add_mutually_exclusive_group()
    given.add_argument("--calib", help=".npz (one array per model input, axis 0 = samples) or a directory of them")
    # stored in ``calib`` as a marked path, so it reaches run_pass(calib=...) unchanged
    given.add_argument("--calib-feeds", dest="calib", type=calib_feeds, metavar="DIR",
                       help="directory of .npz files, each one complete feed used as it is (no sample axis: "
                            "scalar inputs, a batch on any axis); each feed is one batch")
    p.add_argument("--calib-method", default="minmax", choices=list(CALIBRATION_METHODS),
                   help="ONNX Runtime calibrator for activation ranges (default: minmax)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default: 8)")
    p.add_argument("--cache-dir", default=".ampq-cache", help="on-disk cache of ranges and timings")


def add_debug_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def samples_from_args(args: argparse.Namespace, model: onnx.ModelProto) -> Samples:
    """``--calib`` / ``--calib-feeds`` read and validated against ``model``, or synthetic inputs
    (with a warning)."""
    return load_samples(args.calib, model) if args.calib else synthetic_samples(model)


def model_from_args(args: argparse.Namespace) -> tuple[onnx.ModelProto, Samples | None]:
    """``args.model`` normalised, and the ``--calib`` samples (None without them). The
    normalisation is checked on the first calibration samples where they are given: random
    probes cannot run every model (a text detector whose image sizes must be multiples of 32)."""
    if not args.calib:
        return finish_loading(read_model(args.model), args.model), None
    raw = read_model(args.model)
    samples = load_samples(args.calib, raw)
    return finish_loading(raw, args.model, feeds=next(samples.batches(2))), samples


def parse_formats(arg: str | None) -> tuple[str, ...] | None:
    """``--formats int8,int4`` -> ``("int8", "int4")``; None when not given. Unknown names and an
    empty list are the user's error."""
    if arg is None:
        return None
    names = tuple(get_format(f.strip()).name for f in arg.split(",") if f.strip())
    if not names:
        raise AmpqError("--formats is empty; give e.g. --formats int8,int4")
    return names


def parse_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """``["image=1x3x48x640", ...]`` -> ``{"image": (1, 3, 48, 640)}``."""
    if not specs:
        return None
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        parts = dims.lower().split("x")
        if not sep or not name or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise AmpqError(f"--shape {spec!r}: expected INPUT=DxDx... with positive integers, batch first "
                            f"(e.g. image=1x3x48x640)")
        if name in out:
            raise AmpqError(f"--shape: input {name!r} is given twice")
        out[name] = tuple(int(p) for p in parts)
    return out
