import numpy as np
import pytest

import models
from ampq_pass.stages.calibrate import Ranges, calibrate
from ampq_pass.core.samples import Samples, load_samples, synthetic_samples
from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.layers import find_layers
from ampq_pass.core.ort import observed_shapes
from ampq_pass.stages.calibrate import required_ranges
from ampq_pass.stages.calibrate import compute_ranges


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_and_validate(tmp_path, block_model):
    f = models.feeds_for(block_model, n=6)
    s = load_samples(_write(tmp_path / "c.npz", **f), block_model)
    assert len(s) == 6 and set(s.inputs) == {"hidden", "mask"}


def test_directory_of_files(tmp_path, mlp_model):
    d = tmp_path / "calib"
    d.mkdir()
    _write(d / "a.npz", x=np.ones((3, 16), np.float32))
    _write(d / "b.npz", x=np.zeros((2, 16), np.float32))
    assert len(load_samples(d, mlp_model)) == 5


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.ones((2, 16), np.float32)}, r"model input 'x' is missing"),
    ({"x": np.ones((2, 16), np.float32), "z": np.ones(2)}, r"array 'z' is not a model input"),
    ({"x": np.ones((2, 16), np.float64)}, r"input 'x' has dtype float64, expected float32"),
    ({"x": np.ones((2, 15), np.float32)}, r"input 'x' has shape \[2, 15\], expected \[batch, 16\]"),
    ({"x": np.ones((2, 16, 1), np.float32)}, r"input 'x' has shape \[2, 16, 1\], expected rank 2"),
])
def test_bad_calibration_names_dtype_shape(tmp_path, mlp_model, arrays, message):
    with pytest.raises(AmpqError, match=message):
        load_samples(_write(tmp_path / "bad.npz", **arrays), mlp_model)


def test_bad_archive(tmp_path, mlp_model):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(AmpqError, match="junk.npz: not a readable"):
        load_samples(p, mlp_model)


def test_synthetic_warns(block_model, capsys):
    s = synthetic_samples(block_model, count=3)
    assert s.synthetic and s.inputs["hidden"].shape == (3, 16, 32)
    assert "SYNTHETIC" in capsys.readouterr().err
