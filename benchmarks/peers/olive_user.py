"""Olive's user script for benchmarks/peers/olive_peer.py: the calibration data (the same samples as
every method) and the custom metric its search ranks by (peerlib.SearchMetric on search.npz)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peerlib  # noqa: E402
from olive.data.registry import Registry  # noqa: E402

_METRICS: dict[str, "peerlib.SearchMetric"] = {}


@Registry.register_dataset()
def peers_calib(model: str, **kwargs):
    """The calibration batches of ``model`` as (inputs, label) pairs of torch tensors."""
    import torch

    m = peerlib.meta(model)
    return [({k: torch.from_numpy(v) for k, v in f.items()}, 0)
            for f in peerlib.batches(peerlib.load(model, "calib"), m["batch"])]


@Registry.register_dataloader()
def peers_batches(dataset, **kwargs):
    """The batches as they are (already batched)."""
    return dataset


def evaluate(model, device, execution_providers, model_name: str = "minilm") -> float:
    """peerlib's search metric (higher is better) of the candidate model file."""
    if model_name not in _METRICS:
        _METRICS[model_name] = peerlib.SearchMetric(model_name)
    return float(_METRICS[model_name](Path(model.model_path)))
