"""Timing on a Ray device pool (issue 16): scaling with workers, and the plan of a real run.

1. Simulated pool: a paced backend (each configuration "occupies its device" by sleeping
   ``DELAY`` s, then reports a time from a formula of its label) on a 32-layer MatMul chain
   (32 subgraphs, one job each), with 1, 2, 4, 8 actors on a local Ray cluster with 8 device
   units (``paced:0`` ... ``paced:7``). Sleeping workers need no CPU, so the timing stage's
   wall time should fall about linearly; efficiency = T(1) / (n * T(n)), wanted >= 0.8.
   Pool start-up (ray.init + actors) is reported separately from the timing stage.
2. Real run: the whole pass (``run_pass``) on a small MLP on ONNX Runtime's CPU EP, once
   locally and once with ``ray="local"`` (one device unit ``ort:cpu:0``: the machine), each
   with an empty cache; then the Ray run again on the local run's cache (every timing read
   from it). Reported: the plans, the timing stage's seconds, and Ray's overhead.
3. Sensitivity on the pool: a transformer encoder block (d 512, sequence 256, random weights),
   64 calibration samples, locally (2 torch threads, and 1 as each Ray worker has) and on
   1 and 2 workers (calibration batches split over the workers, per-layer sums added on the
   driver); wall time and the largest relative difference to the local values.

Writes benchmarks/results/ray.md. Run: .venv/bin/python benchmarks/bench_ray.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from common import busy_fraction, header, write  # noqa: E402

import models  # noqa: E402
from ampq_pass.backends.ray_pool import RayPool, device_resource, require_ray  # noqa: E402
from ampq_pass.core.measure import Backend, Capabilities, Timing  # noqa: E402
from ampq_pass.core.samples import Samples  # noqa: E402
from ampq_pass.pipeline import run_pass  # noqa: E402
from ampq_pass.stages.calibrate import compute_ranges  # noqa: E402
from ampq_pass.stages.layers import find_layers  # noqa: E402
from ampq_pass.stages.partition import partition  # noqa: E402
from ampq_pass.stages.subgraphs import capture_inputs  # noqa: E402
from ampq_pass.stages.timing import gain_table  # noqa: E402

DELAY = 0.25  # seconds a configuration keeps its (simulated) device busy
DEPTH = 32  # subgraphs
WORKERS = (1, 2, 4, 8)


class Paced(Backend):
    """A simulated device: sleeps DELAY s per configuration; 1 ms minus 0.1 ms per int8 layer."""

    name, unit = "paced", "s"

    def capabilities(self):
        return Capabilities(("int8",), "fp32", "paced")

    def key(self):
        return {"backend": "paced", "delay": DELAY}

    def time(self, models, inputs):
        time.sleep(DELAY * len(models))
        return {label: Timing.of([1e-3 * (1 - 0.1 * label.count("="))] * 5) for label in models}


def chain(n: int, d: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x -> (MatMul -> Relu) x n: n sequential subgraphs of one layer each."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(n):
        inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def simulated() -> tuple[str, dict]:
    ray = require_ray()
    model = chain(DEPTH)
    layers = find_layers(model)
    feeds = {"x": np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)}
    ranges = compute_ranges(model, layers, Samples(feeds))
    part = partition(model, layers, formats={l.name: ["int8"] for l in layers}, max_configs=8)
    captured = capture_inputs(model, part, Samples(feeds), batch_size=8)

    def table(pool=None):
        t0 = time.perf_counter()
        out = gain_table(model, layers, part, ranges, captured, Paced(), progress=False, pool=pool)
        return time.perf_counter() - t0, out

    local_s, local = table()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning",
             resources={device_resource("paced", i): 1 for i in range(max(WORKERS))})
    rows, walls = [], {}
    try:
        for n in WORKERS:
            t0 = time.perf_counter()
            pool = RayPool(Paced(), workers=n)
            start = time.perf_counter() - t0
            wall, pooled = table(pool)
            pool.close()
            same = [s.to_json()["configs"] for s in pooled.subgraphs] == [s.to_json()["configs"] for s in local.subgraphs]
            walls[n] = wall
            rows.append((n, start, wall, walls[1] / (n * wall), same))
    finally:
        ray.shutdown()
    ideal = DELAY * sum(len(s.configs) for s in local.subgraphs)
    text = (f"## 1. Simulated device pool (sleeping backend)\n\n"
            f"{len(part.subgraphs)} subgraphs (32-layer MatMul chain), {sum(len(s.configs) for s in local.subgraphs)} "
            f"configurations, {DELAY} s of device time each: {ideal:.1f} s of device time in all. Local loop "
            f"(no Ray): {local_s:.2f} s.\n\n"
            "| workers | pool start-up (s) | timing stage (s) | speed-up vs 1 worker | efficiency T1/(n*Tn) | table = local |\n"
            "|---|---|---|---|---|---|\n")
    text += "".join(f"| {n} | {start:.2f} | {wall:.2f} | {walls[1] / wall:.2f}x | {eff:.2f} | {same} |\n"
                    for n, start, wall, eff, same in rows)
    return text, {"rows": rows, "local_s": local_s}


def real() -> str:
    model = models.mlp(sizes=(512, 2048, 2048, 512))
    feeds = models.feeds_for(model, n=48)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.onnx"
        onnx.save(model, path)
        common = dict(samples=Samples(feeds), backend="ort:cpu", max_loss_rmse=0.2, batch_size=32,
                      progress=False, log=lambda s: None)
        runs = {}
        for name, ray_address, cache in (("local", None, "a"), ("ray local (cold cache)", "local", "b"),
                                         ("ray local (local run's cache)", "local", "a")):
            t0 = time.perf_counter()
            result = run_pass(path, Path(tmp) / f"{cache}.onnx", cache_dir=str(Path(tmp) / cache), ray=ray_address,
                              **common)
            runs[name] = (time.perf_counter() - t0, result)
        t0 = time.perf_counter()
        from ampq_pass.backends import get_backend

        with RayPool(get_backend("ort:cpu"), spec="ort:cpu", address="local"):
            pass
        startup = time.perf_counter() - t0
    plans = {k: sorted(r.solution.plan.formats.items()) for k, (_, r) in runs.items()}
    base = plans["local"]
    text = ("## 2. Real run: whole pass on an MLP (512-2048-2048-512, batch 32), ort:cpu, budget rmse 0.2\n\n"
            "| run | whole pass (s) | timing stage (s) | predicted speed-up | measured speed-up | plan = local plan |\n"
            "|---|---|---|---|---|---|\n")
    for k, (wall, r) in runs.items():
        pred, meas = r.report["predicted"].get("speedup"), r.report["measured"].get("speedup")
        text += (f"| {k} | {wall:.1f} | {r.stage_seconds['timing']:.2f} | {_x(pred)} | {_x(meas)} | "
                 f"{plans[k] == base} |\n")
    local_t = runs["local"][1].stage_seconds["timing"]
    ray_t = runs["ray local (cold cache)"][1].stage_seconds["timing"]
    text += (f"\nlocal plan: {dict(base)}\n\nRay's overhead on one machine: the timing stage took {ray_t:.2f} s with "
             f"Ray against {local_t:.2f} s locally ({ray_t - local_t:+.2f} s); starting and stopping a local cluster "
             f"with its one actor alone takes {startup:.2f} s, in the Ray run's whole-pass time (the pool opens "
             f"before the sensitivity stage and serves both stages).\n")
    return text


def sensitivity_on_pool() -> str:
    import torch

    from ampq_pass.stages.sensitivity import sensitivity

    ray = require_ray()
    model = models.transformer_block(d=512)
    layers = find_layers(model)
    samples = Samples(models.feeds_for(model, n=64, seed=2, seq=256))
    ranges = compute_ranges(model, layers, samples)
    run = dict(batch_size=8, progress=False)
    torch.set_num_threads(os.cpu_count())  # torch's default here (a Ray run earlier in this process may have lowered it)
    sensitivity(model, layers, ranges, samples, **run)  # warm-up: first-call costs (imports, torch) are not the stage's
    t0 = time.perf_counter()
    local = sensitivity(model, layers, ranges, samples, **run)
    rows = [(f"local (no Ray), {torch.get_num_threads()} torch threads", time.perf_counter() - t0, 0.0, "-")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each Ray worker runs with (Ray sets OMP_NUM_THREADS=1 in its workers)
    t0 = time.perf_counter()
    sensitivity(model, layers, ranges, samples, **run)
    rows.append(("local (no Ray), 1 torch thread", time.perf_counter() - t0, 0.0, "-"))
    torch.set_num_threads(threads)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning",
             resources={device_resource("paced", i): 1 for i in range(2)})
    try:
        for n in (1, 2):
            t0 = time.perf_counter()
            with RayPool(Paced(), workers=n) as pool:
                start = time.perf_counter() - t0
                t0 = time.perf_counter()
                pooled = sensitivity(model, layers, ranges, samples, pool=pool, **run)
                wall = time.perf_counter() - t0
            diff = max(abs(pooled.values[l][f] - v) / max(abs(v), 1e-30)
                       for l, per in local.values.items() for f, v in per.items())
            rows.append((f"{n} Ray worker{'s' if n > 1 else ''} (1 torch thread each)", wall, diff, f"{start:.2f}"))
    finally:
        ray.shutdown()
    text = ("## 3. Sensitivity on the pool: a transformer encoder block (d 512, sequence 256), 64 samples, batch 8 (8 batches)\n\n"
            "| run | sensitivity stage (s) | max relative difference to local | pool start-up (s) |\n|---|---|---|---|\n")
    text += "".join(f"| {name} | {wall:.2f} | {diff:.1e} | {start} |\n" for name, wall, diff, start in rows)
    return text


def _x(value) -> str:
    return "-" if value is None else f"{value:.3f}x"


def main() -> None:
    load = os.getloadavg()
    busy = busy_fraction()
    sim, _ = simulated()
    rl = real()
    sens = sensitivity_on_pool()
    load_after = os.getloadavg()
    text = header("Timing on a Ray device pool (issue 16)") + (
        f"- load average before: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (busy share {busy:.0%}), after: "
        f"{load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}\n"
        f"- ray {require_ray().__version__}; command: `.venv/bin/python benchmarks/bench_ray.py`\n\n") + sim + "\n" + rl + "\n" + sens
    write("ray.md", text)


if __name__ == "__main__":
    main()
