"""Peak memory of load -> partition -> extraction -> rewrite -> save on a model above 2 GB (issue 8.3).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_large.py [--gb 2.6] [--dir /work/tmp]

A MatMul chain with ``n`` square fp32 weights (external data, one file) is generated at
benchmark time, streamed to disk one weight at a time (the generator never holds the model),
and deleted afterwards. Each stage then runs in this process and the peak resident memory
(``ru_maxrss``, monotone) is read after it; the figure that matters is the peak over the
whole chain divided by the model's size on disk (the issue asks for well under 3x).
The rewrite quantizes every layer to int8 with fixed activation ranges (calibration runs
ONNX Runtime's calibrator, which is not part of this measurement).
Writes benchmarks/results/large.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def rss_now_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def generate(folder: Path, target_gb: float, dim: int = 8192) -> tuple[Path, int]:
    """x[batch, dim] -> (MatMul -> Relu) * n -> y, weights in ``model.onnx.data``."""
    per = dim * dim * 4
    n = max(1, int(np.ceil(target_gb * 2**30 / per)))
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    data = folder / "model.onnx.data"
    with open(data, "wb") as f:
        for i in range(n):
            offset = f.tell()
            for row in range(0, dim, 1024):  # 32 MB at a time
                block = rng.standard_normal((min(1024, dim - row), dim), dtype=np.float32) * np.float32(dim ** -0.5)
                f.write(block.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(per))):
                e = t.external_data.add()
                e.key, e.value = k, v
            inits.append(t)
            src = "x" if i == 0 else f"r{i - 1}"
            nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}" if i < n - 1 else "y"], name=f"relu{i}"))
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path, n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.6, help="model size to generate (GiB)")
    ap.add_argument("--dir", default=str(ROOT / "benchmarks" / "out"), help="scratch folder (deleted after)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "large.md"))
    args = ap.parse_args()

    from ampq_pass.stages.calibrate import Ranges
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.core.model import load_model, save_model
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.calibrate import required_ranges
    from ampq_pass.stages.rewrite import rewrite
    from ampq_pass.stages.subgraphs import extract

    scratch = Path(tempfile.mkdtemp(prefix="ampq-large-", dir=args.dir))
    rows = []
    try:
        t0 = time.perf_counter()
        path, n = generate(scratch, args.gb)
        size = (path.stat().st_size + (scratch / "model.onnx.data").stat().st_size) / 2**30
        rows.append(("generate (streamed to disk)", time.perf_counter() - t0, rss_now_gb(), rss_peak_gb()))
        print(f"generated {n} x 8192x8192 fp32 = {size:.2f} GiB", flush=True)

        def stage(name, fn):
            t = time.perf_counter()
            out = fn()
            rows.append((name, time.perf_counter() - t, rss_now_gb(), rss_peak_gb()))
            print(f"{name:40s} {rows[-1][1]:7.1f} s  rss {rows[-1][2]:5.2f} GiB  peak {rows[-1][3]:5.2f} GiB",
                  flush=True)
            return out

        model = stage("load (check, external data, normalise, shapes)", lambda: load_model(path))
        layers = stage("find layers", lambda: find_layers(model))
        part = stage("partition", lambda: partition(model, layers))
        biggest = {}

        def extract_all_one_by_one():
            for sg in part.subgraphs:  # one standalone subgraph alive at a time, as timing does
                sub = extract(model, sg)
                biggest["n"] = max(biggest.get("n", 0), len(sub.graph.initializer))
                del sub

        stage(f"extract {len(part.subgraphs)} subgraphs", extract_all_one_by_one)
        ranges = Ranges("minmax", {t: (-4.0, 4.0) for t in required_ranges(layers)})
        plan = Plan({l.name: "int8" for l in layers})
        q = stage("rewrite (all layers int8)", lambda: rewrite(model, layers, plan, ranges))
        out = stage("save (external data, atomic)", lambda: save_model(q, scratch / "model_int8.onnx"))
        del q
        data = scratch / "model_int8.onnx.data"  # only when the output is itself above 2 GB
        out_size = (out.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**30
        check = stage("onnx.checker on the output (path form)", lambda: onnx.checker.check_model(str(out)))
        del check
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    peak = max(r[3] for r in rows)
    lines = [
        "# Large model (> 2 GB, external data): peak memory through load, partition, extraction, rewrite",
        "",
        f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_large.py --gb {args.gb}`",
        "",
        f"Model: {n} MatMul layers with 8192x8192 fp32 weights, **{size:.2f} GiB** on disk (one external data file),",
        f"generated at benchmark time and deleted after. Output: all layers int8, {out_size:.2f} GiB.",
        "Peak = `ru_maxrss` of the process after each stage (monotone: the peak so far).",
        "",
        "| stage | seconds | RSS after (GiB) | peak so far (GiB) |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {sec:.1f} | {now:.2f} | {pk:.2f} |" for name, sec, now, pk in rows],
        "",
        f"**Peak resident memory {peak:.2f} GiB = {peak / size:.2f}x the model size** (target: well under 3x).",
        "",
        "Before this issue's fixes the same chain peaked at 2.3x after load alone: `onnx.checker.check_model(path)`",
        "reads the external data into a second (C++) copy, and `ModelProto.ByteSize()` serialises the whole model",
        "under the upb protobuf runtime (both measured on a 2.2 GB model, +1.5x and +1.1x). Now the checker runs",
        "on the proto before its data is loaded and the 2 GB test estimates the size from dims and dtypes.",
        "",
        "Where the memory goes: the loaded model (1x); the rewrite copies only the weights the new graph still",
        "reads (none here) and adds the int8 weights (0.25x); quantizing one weight makes float temporaries",
        "of that weight only. Nothing copies the whole model: the checker runs before the data is loaded, shape",
        "inference and the version converter run on a weight-less copy (`model.stripped_copy`), the cache",
        "digest hashes tensor by tensor, and extraction copies one subgraph's weights at a time.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
