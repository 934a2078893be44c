"""Shared bits of the benchmarks: the MiniLM fixture and a results header."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

OUT = Path(__file__).parent / "out"
RESULTS = Path(__file__).parent / "results"


def minilm_path() -> Path:
    from ampq_pass.minilm import export_minilm

    OUT.mkdir(exist_ok=True)
    path = OUT / "minilm.onnx"
    if not path.exists():
        export_minilm(path)
    return path


def header(title: str) -> str:
    import numpy
    import onnx
    import onnxruntime
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return (f"# {title}\n\n"
            f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}\n"
            f"- machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}\n"
            f"- versions: onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, torch {torch.__version__}, "
            f"numpy {numpy.__version__}\n"
            f"- note: shared 2-core machine; ratios come from interleaved runs in one process\n\n")


def write(name: str, text: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    print(text)
    return path
