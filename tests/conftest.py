import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402


@pytest.fixture(scope="session")
def mlp_model():
    return models.mlp()


@pytest.fixture(scope="session")
def cnn_model():
    return models.cnn()


@pytest.fixture(scope="session")
def block_model():
    return models.transformer_block()


@pytest.fixture(scope="session", params=["mlp", "cnn", "block"])
def any_model(request, mlp_model, cnn_model, block_model):
    return {"mlp": mlp_model, "cnn": cnn_model, "block": block_model}[request.param]


@pytest.fixture()
def block_file(tmp_path, block_model):
    """The transformer block saved as ``block.onnx`` beside 24 calibration samples ``calib.npz``."""
    path = tmp_path / "block.onnx"
    onnx.save(block_model, path)
    np.savez(tmp_path / "calib.npz", **models.feeds_for(block_model, n=24))
    return path
