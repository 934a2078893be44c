"""Issue 6: the integer program on a synthetic 1,000-layer, 4-format, 200-subgraph instance.

Run: .venv/bin/python benchmarks/bench_solve.py   -> benchmarks/results/solve.md
Each subgraph has 5 layers with hp + 4 formats; configurations are capped at 64 per
subgraph as the partitioner does (a random 64 of the 3,125, hp-only always included).
Sensitivities are per layer and additive; gains are per configuration and not additive.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import header, write  # noqa: E402

from ampq_pass.stages.solve import Option, pareto_front, solve  # noqa: E402

FORMATS = ("hp", "int8", "int4", "fp8_e4m3", "bf16")
BITS = {"hp": 32, "int8": 8, "int4": 4, "fp8_e4m3": 8, "bf16": 16}


def instance(seed: int = 0, subgraphs: int = 200, layers: int = 5, cap: int = 64):
    rng = np.random.default_rng(seed)
    options = []
    for s in range(subgraphs):
        names = [f"s{s}.l{i}" for i in range(layers)]
        sens = {n: {"hp": 0.0, "int8": rng.exponential(1e-4), "int4": rng.exponential(1e-3),
                    "fp8_e4m3": rng.exponential(2e-4), "bf16": rng.exponential(1e-6)} for n in names}
        speed = {"hp": 0.0, "int8": 0.45, "int4": 0.2, "fp8_e4m3": 0.3, "bf16": 0.1}
        size = {n: float(rng.integers(1, 8)) * 1e6 for n in names}
        combos = list(itertools.product(FORMATS, repeat=layers))
        picks = [0] + list(rng.choice(np.arange(1, len(combos)), size=cap - 1, replace=False))
        opts = []
        for k in picks:
            cfg = dict(zip(names, combos[k]))
            base = sum(speed[f] * size[n] for n, f in cfg.items()) * 1e-9
            synergy = 1.0 + 0.3 * (sum(f != "hp" for f in cfg.values()) == layers)  # whole block faster
            gain = base * synergy + rng.normal(0, 1e-5) * (k != 0)
            opts.append(Option(cfg, float(gain), float(sum(sens[n][f] for n, f in cfg.items())),
                               float(sum(size[n] * BITS[f] / 8 for n, f in cfg.items()))))
        options.append(opts)
    return options


def main() -> None:
    options = instance()
    n_layers = sum(len(o[0].formats) for o in options)
    n_vars = sum(len(o) for o in options)
    top = solve(options, math.inf)
    rows = []
    for frac in (0.01, 0.1, 0.5):
        t0 = time.perf_counter()
        sol = solve(options, frac * top.mse)
        rows.append((f"loss <= {frac:g} x max", time.perf_counter() - t0, sol))
    full_mem = sum(max(o.memory for o in opts) for opts in options)
    t0 = time.perf_counter()
    sol = solve(options, 0.1 * top.mse, max_memory=0.4 * full_mem)
    rows.append(("loss <= 0.1 x max, memory <= 40%", time.perf_counter() - t0, sol))
    t0 = time.perf_counter()
    front = pareto_front(options, 10)
    t_front = time.perf_counter() - t0
    text = header("Integer program on a synthetic instance (issue 6)")
    text += (f"{len(options)} subgraphs, {n_layers} layers, 4 formats + hp, {n_vars} configurations "
             f"(cap 64 per subgraph). Target: < 2 s per solve.\n\n")
    text += "| budget | solve time s | status | gain | predicted MSE | binding |\n|---|---|---|---|---|---|\n"
    for name, t, s in rows:
        text += f"| {name} | {t:.3f} | {s.status} | {s.gain:.5g} | {s.mse:.3g} | {s.binding} |\n"
    text += f"\nPareto front of 10 budgets: {t_front:.2f} s in all; gains " + \
        ", ".join(f"{s.gain:.4g}" for s in front) + "\n"
    write("solve.md", text)


if __name__ == "__main__":
    main()
