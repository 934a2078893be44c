"""Shared bits of the benchmarks: the MiniLM fixture and a results header."""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

from ampq_pass.core.machine import cpu_flags, cpu_name

OUT = Path(__file__).parent / "out"
RESULTS = Path(__file__).parent / "results"


def minilm_path() -> Path:
    from ampq_pass.cli.minilm import export_minilm

    OUT.mkdir(exist_ok=True)
    path = OUT / "minilm.onnx"
    if not path.exists():
        export_minilm(path)
    return path


def cpu_isa() -> str:
    """What the CPU's 8-bit and 16-bit kernels can use, from its flags: ``AVX-512 VNNI, BF16``,
    ``AVX2 only (no VNNI)``, ... Machines of this project differ in it between sessions, and
    the int8 numbers depend on it: without VNNI ONNX Runtime's u8s8 GEMM adds pairs of
    products in int16 and saturates (tests/hardware.py), and int8 runs slower."""
    flags = cpu_flags()
    if flags is None:
        return platform.machine()
    parts = []
    if "avx512f" in flags:
        parts.append("AVX-512" + (" VNNI" if "avx512_vnni" in flags else ""))
    elif "avx2" in flags:
        parts.append("AVX2" + (" + AVX-VNNI" if "avx_vnni" in flags else " only (no VNNI)"))
    parts += [name for flag, name in (("avx512_bf16", "BF16"), ("amx_int8", "AMX")) if flag in flags]
    return ", ".join(parts) or "no AVX2"


def header(title: str) -> str:
    import numpy
    import onnx
    import onnxruntime
    import torch

    return (f"# {title}\n\n"
            f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}\n"
            f"- machine: {cpu_name()} ({cpu_isa()}), {os.cpu_count()} cores, Python {platform.python_version()}\n"
            f"- versions: onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, torch {torch.__version__}, "
            f"numpy {numpy.__version__}\n"
            f"- note: shared 2-core machine; ratios come from interleaved runs in one process\n\n")


def write(name: str, text: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    print(text)
    return path


def busy_fraction(seconds: float = 3.0) -> float:
    """Share of all CPUs busy over ``seconds`` (from /proc/stat), before we add our own load."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t1, i1 = read()
    time.sleep(seconds)
    t2, i2 = read()
    return 1.0 - (i2 - i1) / max(t2 - t1, 1)


def wait_for_quiet(*, limit: float, patience: float, pause: float = 0.0) -> float:
    """Other engineers share this 2-core machine: wait (at most ``patience`` s) until the
    busy share is at most ``limit``; returns the last busy share."""
    t0 = time.time()
    busy = busy_fraction()
    while busy > limit and time.time() - t0 < patience:
        time.sleep(pause)
        busy = busy_fraction()
    return busy


def two_matmuls(batch: int | str, tokens: int, d: int, hidden: int, seed: int = 0):
    """The formats probe's model: x[batch, tokens, d] -> MatMul d x hidden -> Relu -> MatMul
    hidden x d (random weights, seeded). ``batch`` is a size or a dimension name (the calibration
    batches samples along it)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, d)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    shape = [batch, tokens, d]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    # IR 8: the lent GPU machine's onnxruntime reads no newer one
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
