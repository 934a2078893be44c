"""The metric our pass's metric-driven search uses in the peers benchmark (``--metric
benchmarks/peers/ours_metric.py:search_cosine``): the same one INC's autotune and AIMET's AMP
evaluate, mean cosine of mean-pooled embeddings to fp32 on search.npz (MiniLM sentences 64-95),
through the project's own EmbeddingCosine. Runs in the pass's process (main venv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_D = Path(__file__).resolve().parent.parent / "out" / "peers" / "minilm"
_METRIC = None


def search_cosine(model_path: str) -> float:
    global _METRIC
    if _METRIC is None:
        from ampq_pass.cli.metrics import EmbeddingCosine

        with np.load(_D / "search.npz") as z:
            _METRIC = EmbeddingCosine(str(_D / "fp32.onnx"), {k: z[k] for k in z.files})
    return _METRIC(model_path)
