"""Example metrics for ``--metric`` / ``run_pass(metric=...)``: ``fn(model_path) -> float``,
higher is better; the pass bounds ``metric(hp) - metric(plan)`` by ``--max-metric-drop``.

- :class:`EmbeddingCosine`: mean cosine of mean-pooled token embeddings to a reference model
  (sentence-embedding models such as all-MiniLM-L6-v2);
- :class:`Top1Agreement`: fraction of inputs whose arg-max class equals the reference model's
  (classifiers; no labels needed);
- :func:`minilm_cosine`: the demo's metric, ready for the command line::

      ampq-pass out/minilm.onnx -o out/minilm_mp.onnx --calib calib.npz \\
          --metric ampq_pass.cli.metrics:minilm_cosine --max-metric-drop 0.005

Your own metric is a function in any module or script (``--metric path/to/eval.py:score``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _outputs(model_path: str | os.PathLike, feeds: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """The first output of the model on ``feeds``, batch by batch (ONNX Runtime, default session)."""
    from ampq_pass.core.ort import make_session, run

    sess = make_session(str(model_path))
    wanted = {i.name for i in sess.get_inputs()}
    n = len(next(iter(feeds.values())))
    out = [run(sess, {k: v[i:i + batch_size] for k, v in feeds.items() if k in wanted})[0]
           for i in range(0, n, batch_size)]
    return np.concatenate(out)


class EmbeddingCosine:
    """Mean cosine similarity of sentence embeddings (mean-pooled first output over the tokens
    of ``mask_input``) to those of ``reference`` on ``feeds``. The reference's embeddings are
    computed once; the hp model scores 1.0."""

    def __init__(self, reference: str | os.PathLike, feeds: dict[str, np.ndarray], *,
                 mask_input: str | None = "attention_mask", batch_size: int = 8):
        self.reference, self.feeds, self.mask_input, self.batch_size = str(reference), feeds, mask_input, batch_size
        self.name = f"embedding cosine to {Path(reference).name}"
        self._ref: np.ndarray | None = None

    def embed(self, model_path) -> np.ndarray:
        hidden = _outputs(model_path, self.feeds, self.batch_size).astype(np.float64)
        if hidden.ndim == 2:
            return hidden
        if self.mask_input is None:
            return hidden.mean(axis=1)
        m = self.feeds[self.mask_input][..., None].astype(np.float64)
        return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)

    def __call__(self, model_path) -> float:
        if self._ref is None:
            self._ref = self.embed(self.reference)
        a, b = self._ref, self.embed(model_path)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        return float(cos.mean())


class Top1Agreement:
    """Fraction of ``feeds`` on which the model's arg-max (over ``axis`` of its first output)
    equals ``reference``'s: a classifier's accuracy against the hp model, no labels needed."""

    def __init__(self, reference: str | os.PathLike, feeds: dict[str, np.ndarray], *, axis: int = -1,
                 batch_size: int = 8):
        self.reference, self.feeds, self.axis, self.batch_size = str(reference), feeds, axis, batch_size
        self.name = f"top-1 agreement with {Path(reference).name}"
        self._ref: np.ndarray | None = None

    def __call__(self, model_path) -> float:
        if self._ref is None:
            self._ref = _outputs(self.reference, self.feeds, self.batch_size).argmax(self.axis)
        got = _outputs(model_path, self.feeds, self.batch_size).argmax(self.axis)
        return float((got == self._ref).mean())


def top1_agreement(model_path: str) -> float:
    """Command-line form of :class:`Top1Agreement`: the reference model and the inputs (an .npz,
    one array per model input, axis 0 = samples) come from ``AMPQ_METRIC_REFERENCE`` and
    ``AMPQ_METRIC_INPUTS``."""
    global _TOP1
    if _TOP1 is None:
        ref, inputs = os.environ.get("AMPQ_METRIC_REFERENCE"), os.environ.get("AMPQ_METRIC_INPUTS")
        if not ref or not inputs:
            from ampq_pass.core.errors import AmpqError

            raise AmpqError("top1_agreement needs AMPQ_METRIC_REFERENCE (the hp model) and AMPQ_METRIC_INPUTS (.npz)")
        with np.load(inputs) as data:
            _TOP1 = Top1Agreement(ref, {k: data[k] for k in data.files})
    return _TOP1(model_path)


_TOP1: Top1Agreement | None = None
_MINILM: dict[tuple, EmbeddingCosine] = {}


def minilm_metric(reference: str | os.PathLike, *, count: int = 64, offset: int = 96, seq_len: int = 128) -> EmbeddingCosine:
    """The demo's metric: sentence-embedding cosine to ``reference`` (fp32 all-MiniLM-L6-v2) on
    ``count`` held-out sentences (from ``offset`` on: disjoint from the demo's 64 calibration and
    32 verification sentences)."""
    from ampq_pass.cli.minilm import english_sentences, tokenize

    key = (str(reference), count, offset, seq_len)
    if key not in _MINILM:
        metric = EmbeddingCosine(reference, tokenize(english_sentences(count, offset=offset), seq_len))
        metric.name = f"MiniLM embedding cosine to fp32 ({count} held-out sentences)"
        _MINILM[key] = metric
    return _MINILM[key]


def minilm_cosine(model_path: str) -> float:
    """Command-line form of :func:`minilm_metric`; the fp32 reference is ``AMPQ_MINILM_REFERENCE``
    or ``out/minilm.onnx`` (what ``ampq-pass demo`` exports)."""
    return minilm_metric(os.environ.get("AMPQ_MINILM_REFERENCE", "out/minilm.onnx"))(model_path)
