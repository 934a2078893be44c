import numpy as np
import onnx
import pytest

import models
from ampq_pass.stages.calibrate import Ranges, calibrate
from ampq_pass.core.samples import Samples, load_samples, synthetic_samples, timing_batch
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


def _scalar_gain_model(state: bool = False) -> onnx.ModelProto:
    """y = (x @ w) * gain with a scalar (rank-0) ``gain``; with ``state``, also s = state * 2
    for a state input [2, batch, 8] whose batch is on axis 1."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Mul", ["h", "gain"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
              helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])]
    inits = [w]
    if state:
        inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
        nodes.append(helper.make_node("Mul", ["state", "two"], ["s"]))
        inputs.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 8]))
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, "batch", 8]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("state", [False, True])
def test_synthetic_feeds_for_a_scalar_input_keep_it_scalar(state):
    from ampq_pass.core.ort import make_session

    model = _scalar_gain_model(state)
    s = synthetic_samples(model, count=3, warn=False)
    assert s.whole_feeds and len(s) == 3 and s.synthetic
    session = make_session(model)
    for feed in s.groups:
        assert feed["gain"].shape == () and feed["x"].shape == (1, 8)
        if state:
            assert feed["state"].shape == (2, 1, 8)  # the batch on axis 1 is the same 1
        session.run(None, feed)


def test_whole_feeds_of_one_shape_are_one_calibration_shape():
    from ampq_pass.core.samples import timing_feeds

    model = _scalar_gain_model(state=True)
    s = synthetic_samples(model, count=5, warn=False)
    feeds, info = timing_feeds(model, s, shapes=None, batch_size=8, n_batches=2)
    assert len(feeds) == 2 and feeds[0]["gain"].shape == ()
    assert info["calibration_shapes"] == [{"shape": {"x": [1, 8], "gain": [], "state": [2, 1, 8]}, "samples": 5}]
    assert timing_batch(feeds, info) is None  # each whole feed is one run as it is


def test_timing_batch_is_the_samples_per_timed_run(mlp_model):
    """What dynamic scales span in the sensitivity: the default batch, or the one --shape names."""
    from ampq_pass.core.samples import timing_feeds

    s = Samples(models.feeds_for(mlp_model, n=12))
    feeds, info = timing_feeds(mlp_model, s, shapes=None, batch_size=8, n_batches=1)
    assert timing_batch(feeds, info) == 8
    name, value = next(iter(s.inputs.items()))
    feeds, info = timing_feeds(mlp_model, s, shapes={name: (1, *value.shape[1:])}, batch_size=8, n_batches=1)
    assert timing_batch(feeds, info) == 1
