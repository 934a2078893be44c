"""A against B on one corpus model: is a gap between two plans real, or timing noise?

    benchmarks/run_snapshot.sh benchmarks/bench_ab.py NAME MODEL_A MODEL_B [--rounds 200] [--out ab.md]
    benchmarks/run_snapshot.sh benchmarks/bench_ab.py NAME MODEL_A MODEL_B --fp32 MODEL --inputs FEEDS.npz
                                                      (a model outside the corpus: its fp32 file and 16 inputs)

``bench_cnn_fronts.py`` times a dozen models in 30 rounds; two points 2-3% apart there have
overlapping intervals. This times only fp32 (the corpus file), A and B, interleaved round-robin in
one process (ORT CPU EP, 2 intra-op threads, batch 8, the two evaluation batches of
``bench_cnn_fronts.eval_inputs``) for a fixed number of rounds, and reports the paired ratio
t_B / t_A per round (its median and 95% CI: above 1, A is faster), each model's speed-up over fp32,
and what ONNX Runtime runs for each (the op counts of the graph it optimises to, level ALL):
two plans that compile to the same kernels cannot differ but by noise. Appends to
``benchmarks/results/ab.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "corpus"))

from bench_cnn_fronts import BATCH, MODELS, eval_inputs  # noqa: E402
from common import RESULTS, cpu_name, wait_for_quiet  # noqa: E402

from ampq_pass.backends.ort import time_interleaved  # noqa: E402
from ampq_pass.core.measure import Protocol, median_ci  # noqa: E402
from ampq_pass.core.ort import make_session  # noqa: E402


def compiled_ops(path: str | Path) -> collections.Counter:
    """The op types of the graph ONNX Runtime's CPU EP runs ``path`` as (its default level, ALL)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = str(Path(tmp) / "optimized.onnx")
        make_session(path, optimized_path=optimized)
        return collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)


def _ops(c: collections.Counter) -> str:
    return ", ".join(f"{op} x{n}" for op, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", help="corpus model (benchmarks/corpus/models/NAME), or a label with --fp32 and --inputs")
    ap.add_argument("a", help="model A (.onnx)")
    ap.add_argument("b", help="model B (.onnx)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--fp32", help="the fp32 model, for a model outside the corpus")
    ap.add_argument("--inputs", help="an .npz with one array per model input (axis 0: samples; the first 16 are timed)")
    ap.add_argument("--out", default="ab.md", help="file under benchmarks/results to append to (default ab.md)")
    args = ap.parse_args()
    if args.rounds < 10:
        ap.error(f"--rounds must be >= 10, got {args.rounds}")
    if (args.fp32 is None) != (args.inputs is None):
        ap.error("--fp32 and --inputs go together")
    if args.fp32 is None:
        key, ev, ev_note = eval_inputs(args.name)
        feeds = {key: ev}
        fp32 = MODELS / args.name / "model.onnx"
    else:
        with np.load(args.inputs) as z:
            feeds = {k: z[k][:2 * BATCH] for k in z.files}
        if any(len(v) < 2 * BATCH for v in feeds.values()):
            ap.error(f"--inputs {args.inputs}: every array needs at least {2 * BATCH} samples")
        fp32, ev_note = Path(args.fp32), f"the first {2 * BATCH} samples of {args.inputs}"
    paths = {"fp32": fp32, "A": Path(args.a), "B": Path(args.b)}
    for k, p in paths.items():
        if not p.is_file():
            ap.error(f"{k}: no such file {p}")
    ops = {k: compiled_ops(p) for k, p in paths.items() if k != "fp32"}
    sessions = {k: make_session(str(p), threads=2, spinning=False) for k, p in paths.items()}
    batches = [{k: v[s:s + BATCH] for k, v in feeds.items()} for s in (0, BATCH)]
    busy = wait_for_quiet(limit=0.25, patience=90.0)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    protocol = Protocol(warmup=5, min_repeats=args.rounds, max_repeats=args.rounds, max_seconds=None)
    timings = time_interleaved(sessions, batches, protocol=protocol)
    seconds, load_after = time.perf_counter() - t0, os.getloadavg()
    t = {k: np.asarray(v.samples) for k, v in timings.items()}
    ratio = t["B"] / t["A"]
    lo, hi = median_ci(ratio)
    lines = [f"## {args.name}: A = `{args.a}`, B = `{args.b}`", "",
             f"- {datetime.datetime.now().isoformat(timespec='minutes')}, CPU {cpu_name()}, code {os.environ.get('AMPQ_CODE_COMMIT', 'working tree')}; {len(ratio)} rounds of fp32, A and B "
             f"interleaved in {seconds:.0f} s; busy before {busy:.0%}; load average before "
             f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}; "
             f"inputs: {ev_note}, batch {BATCH}", "",
             "| model | median ms | speed-up over fp32 (paired median [95% CI]) | what ONNX Runtime runs (ops after optimisation) |",
             "|---|---|---|---|"]
    for k in ("fp32", "A", "B"):
        r = t["fp32"] / t[k]
        rl, rh = median_ci(r)
        lines.append(f"| {k} | {np.median(t[k]) * 1e3:.2f} | {np.median(r):.3f}x [{rl:.3f}, {rh:.3f}] | "
                     f"{_ops(ops[k]) if k in ops else '-'} |")
    same = "the same ops" if ops["A"] == ops["B"] else "different ops"
    lines += ["", f"t_B / t_A per round: median **{np.median(ratio):.3f}** [{lo:.3f}, {hi:.3f}] "
              f"({'A faster' if lo > 1 else 'B faster' if hi < 1 else 'no difference beyond the noise'}); "
              f"A and B compile to {same}.", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    out = RESULTS / args.out
    if not out.exists():
        out.write_text("# A/B timings of two plans (`benchmarks/bench_ab.py`)\n\n")
    with out.open("a") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
