"""Whole feeds (--calib-feeds DIR): any model's inputs can be calibrated, scalars and a state
with its batch on axis 1 included; each feed is one batch, used as it is."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from ampq_pass.cli.main import main
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.samples import Samples, calib_feeds, load_feeds, load_samples, timing_feeds
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.partition import partition
from ampq_pass.stages.subgraphs import capture_inputs, extract_all


def stateful_model(d: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x [batch, d], state [2, batch, d] (batch on axis 1, like silero-vad), scale: a scalar."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(rng.standard_normal((d, d)).astype(np.float32) / 4, "w1"),
             nh.from_array(rng.standard_normal((d, 8)).astype(np.float32) / 4, "w2"),
             nh.from_array(np.array(0, np.int64), "zero"), nh.from_array(np.array([0], np.int64), "ax0")]
    nodes = [
        h.make_node("Gather", ["state", "zero"], ["s0"], name="take_state", axis=0),
        h.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        h.make_node("Add", ["a", "s0"], ["b"], name="add_state"),
        h.make_node("Mul", ["b", "scale"], ["c"], name="scale_it"),
        h.make_node("Relu", ["c"], ["r"], name="relu"),
        h.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        h.make_node("Unsqueeze", ["r", "ax0"], ["r1"], name="unsq_r"),
        h.make_node("Unsqueeze", ["s0", "ax0"], ["s1"], name="unsq_s"),
        h.make_node("Concat", ["r1", "s1"], ["new_state"], name="next_state", axis=0),
    ]
    graph = h.make_graph(nodes, "stateful", [
        h.make_tensor_value_info("x", T.FLOAT, ["batch", d]),
        h.make_tensor_value_info("state", T.FLOAT, [2, "batch", d]),
        h.make_tensor_value_info("scale", T.FLOAT, [])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", 8]),
         h.make_tensor_value_info("new_state", T.FLOAT, [2, "batch", d])], initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def feed(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 16)).astype(np.float32),
            "state": rng.standard_normal((2, n, 16)).astype(np.float32),
            "scale": np.array(0.5 + seed / 10, np.float32)}


@pytest.fixture()
def feeds_dir(tmp_path):
    d = tmp_path / "feeds"
    d.mkdir()
    for i, n in enumerate([4, 4, 3, 4, 2, 4]):
        np.savez(d / f"{i:03d}.npz", **feed(n, i))
    return d


def test_samples_convention_refuses_a_scalar_clearly(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, **feed(4, 0))
    with pytest.raises(AmpqError, match=r"input 'scale' is a scalar \(rank 0\).*--calib-feeds"):
        load_samples(path, stateful_model())


def test_feeds_are_batches_as_they_are(feeds_dir):
    model = stateful_model()
    samples = load_feeds(feeds_dir, model)
    assert samples.whole_feeds and samples.counts == [4, 4, 3, 4, 2, 4] and len(samples) == 21
    batches = list(samples.batches(100))
    assert len(batches) == 6 and batches[0]["scale"].shape == () and batches[2]["state"].shape == (2, 3, 16)
    assert [start for start, _ in samples.numbered_batches(1)] == [0, 4, 8, 11, 15, 17]
    assert [samples.count(b) for b in batches] == [4, 4, 3, 4, 2, 4]
    assert load_samples(calib_feeds(feeds_dir), model).counts == samples.counts  # the marked path
    calib, held = samples.split(5)
    assert calib.counts == [4, 4, 3, 4] and held.counts == [2, 4] and held.whole_feeds
    assert Samples.from_feeds([feed(2, 0)]).counts == [1]
    with pytest.raises(AmpqError, match="cannot be split"):
        Samples.from_feeds([feed(2, 0)], [2]).split(1)


@pytest.mark.parametrize("change, message", [
    (lambda f: f.update(state=np.zeros((3, 4, 16), np.float32)), r"axis 0: 3 != 2"),
    (lambda f: f.update(state=np.zeros((2, 5, 16), np.float32)),
     r"dim 'batch' is 5 on axis 1 of input 'state' but 4 on axis 0 of input 'x'"),
    (lambda f: f.update(scale=np.ones(1, np.float32)), r"input 'scale' has shape \[1\], expected rank 0"),
    (lambda f: f.update(x=f["x"].astype(np.float64)), r"dtype float64"),
])
def test_bad_feeds_are_clear_errors(tmp_path, change, message):
    f = feed(4, 0)
    change(f)
    np.savez(tmp_path / "0.npz", **f)
    with pytest.raises(AmpqError, match=message):
        load_feeds(tmp_path, stateful_model())


def test_capture_extraction_and_timing_feeds(feeds_dir):
    model = stateful_model()
    samples = load_feeds(feeds_dir, model)
    layers = find_layers(model)
    timing, info = timing_feeds(model, samples, shapes=None, batch_size=8, n_batches=8)
    assert len(timing) == 4 and info["shapes"]["state"] == [2, 4, 16] and info["shapes"]["scale"] == []
    named, _ = timing_feeds(model, samples, shapes={"state": (2, 3, 16)}, batch_size=8, n_batches=8)
    assert len(named) == 1 and named[0]["x"].shape == (3, 16)
    with pytest.raises(AmpqError, match="no calibration feed has this shape"):
        timing_feeds(model, samples, shapes={"state": (2, 7, 16)}, batch_size=8, n_batches=8)
    part = partition(model, layers)
    captured = capture_inputs(model, part, timing)  # a list of feeds, used as they are
    assert all(len(v) == 4 for v in captured.values())
    assert len(extract_all(model, part)) == len(part.subgraphs)


def test_inspect_with_calib_feeds(tmp_path, feeds_dir, capsys):
    onnx.save(stateful_model(), tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx"), "--calib-feeds", str(feeds_dir)]) == 0
    assert "2 quantizable layers" in capsys.readouterr().out
    np.savez(tmp_path / "c.npz", **feed(4, 0))
    assert main(["inspect", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz")]) == 2
    assert "is a scalar (rank 0)" in capsys.readouterr().err


def test_whole_pass_with_calib_feeds(tmp_path, feeds_dir):
    """A scalar input and a state with its batch on axis 1: every stage takes whole feeds."""
    model = stateful_model()
    onnx.save(model, tmp_path / "m.onnx")
    ranges = compute_ranges(model, find_layers(model), load_feeds(feeds_dir, model))
    assert "x" in ranges and "r" in ranges
    code = main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--calib-feeds", str(feeds_dir),
                 "--backend", "mac", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--debug"])
    assert code == 0
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))
