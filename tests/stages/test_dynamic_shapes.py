"""Calibration sets whose shapes vary (issue 8.2): shape groups, ranges over all, timing shapes."""

import json

import numpy as np
import onnx
import pytest

from ampq_pass.core.samples import Samples, load_samples
from ampq_pass.stages.calibrate import calibrate
from ampq_pass.cli import main
from ampq_pass.cli.args import parse_shapes
from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.layers import find_layers
from ampq_pass.core.model import load_model
from ampq_pass.core.samples import timing_feeds
from ampq_pass.pipeline import PassOptions, run_pass
from ampq_pass.stages.calibrate import required_ranges
from wild_models import wild_cnn, wild_feeds

WIDTHS = (12, 16, 20)


@pytest.fixture(scope="module")
def wild_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("dyn") / "wild.onnx"
    onnx.save(wild_cnn(), path)
    return path


@pytest.fixture(scope="module")
def model(wild_path):
    return load_model(wild_path)


@pytest.fixture
def listed_npz(tmp_path):
    path = tmp_path / "calib.npz"
    feeds = wild_feeds(WIDTHS, per_width=5)
    np.savez(path, **{f"x/{i}": a for i, a in enumerate(feeds)})
    return path, feeds


def test_list_convention_gives_shape_groups(listed_npz, model):
    path, feeds = listed_npz
    s = load_samples(path, model)
    assert len(s) == 15 and len(s.groups) == 3
    assert [shape["x"][-1] for shape, n in s.shapes()] == list(WIDTHS)
    starts, widths = [], []
    for start, batch in s.numbered_batches(4):  # 5 per group: batches 4+1 per group, never mixed
        starts.append(start)
        widths.append(batch["x"].shape[-1])
        group, first = divmod(start, 5)  # 5 samples per width: the start is a global sample index
        np.testing.assert_array_equal(batch["x"], feeds[group][first:first + len(batch["x"])])
    assert starts == [0, 4, 5, 9, 10, 14] and widths == [12, 12, 16, 16, 20, 20]
    assert sum(len(b["x"]) for b in s.batches(4)) == 15


def test_split_takes_the_last_samples_across_groups(listed_npz, model):
    s = load_samples(listed_npz[0], model)
    head, tail = s.split(7)
    assert (len(head), len(tail)) == (8, 7)
    assert [sh["x"][-1] for sh, _ in head.shapes()] == [12, 16] and [n for _, n in head.shapes()] == [5, 3]
    assert [sh["x"][-1] for sh, _ in tail.shapes()] == [16, 20] and [n for _, n in tail.shapes()] == [2, 5]


def test_directory_of_files_with_different_widths(tmp_path, model):
    feeds = wild_feeds((12, 16, 12), per_width=2)
    for i, a in enumerate(feeds):
        np.savez(tmp_path / f"part{i}.npz", x=a)
    s = load_samples(tmp_path, model)
    # the two width-12 files are one group (full batches), in first-seen order
    assert [(sh["x"][-1], n) for sh, n in s.shapes()] == [(12, 4), (16, 2)]
    assert s.most_common()["x"].shape == (4, 3, 8, 12)


@pytest.mark.parametrize("arrays, message", [
    ({"x/0": np.zeros((1, 3, 8, 4), np.float32), "x/2": np.zeros((1, 3, 8, 4), np.float32)}, r"without gaps"),
    ({"x/a": np.zeros((1, 3, 8, 4), np.float32)}, r"index 'a'"),
    ({"x/0": np.zeros((1, 3, 9, 4), np.float32)}, r"input 'x' has shape \[1, 3, 9, 4\], expected \[batch, 3, 8, width\] \(axis 2: 9 != 8\)"),
    ({"x/0": np.full((1, 3, 8, 4), np.nan, np.float32)}, r"NaN or infinite"),
    ({"x/0": np.zeros((0, 3, 8, 4), np.float32)}, r"holds no samples"),
])
def test_bad_lists_are_clear_errors(tmp_path, model, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(AmpqError, match=r"bad\.npz: .*" + message):
        load_samples(path, model)


def test_mixed_conventions_refused(tmp_path, block_model):
    path = tmp_path / "mixed.npz"
    np.savez(path, **{"hidden/0": np.zeros((1, 4, 32), np.float32), "mask": np.ones((1, 4), np.int64)})
    with pytest.raises(AmpqError, match=r"mixed\.npz: input 'mask' is one array while 'hidden' is a list"):
        load_samples(path, block_model)


def test_shared_symbolic_dim_must_agree(tmp_path, block_model):
    path = tmp_path / "seq.npz"
    np.savez(path, hidden=np.zeros((2, 6, 32), np.float32), mask=np.ones((2, 5), np.int64))
    with pytest.raises(AmpqError, match=r"dim 'seq' is 5 on axis 1 of input 'mask' but 6 on axis 1 of input 'hidden'"):
        load_samples(path, block_model)


def test_ranges_cover_every_shape_group(listed_npz, model):
    """One calibration over all widths = the union of calibrations per width (minmax)."""
    s = load_samples(listed_npz[0], model)
    tensors = required_ranges(find_layers(model))
    whole = calibrate(model, s, tensors, batch_size=4)
    per = [calibrate(model, Samples(g), tensors, batch_size=4) for g in s.groups]
    for t in tensors:
        lo = min(p[t][0] for p in per)
        hi = max(p[t][1] for p in per)
        assert whole[t] == pytest.approx((lo, hi), rel=1e-6)
    # and a single width does not cover them all: the widths really differ
    assert any(per[0][t] != whole[t] for t in tensors)


def test_timing_feeds_default_and_named(listed_npz, model):
    path, feeds = listed_npz
    s = load_samples(path, model)
    s.more[0] = {"x": np.concatenate([s.more[0]["x"], s.more[0]["x"]])}  # width 16 now the most common
    got, info = timing_feeds(model, s, shapes=None, batch_size=4, n_batches=5)
    assert info["source"] == "most common calibration shape" and info["shapes"] == {"x": [4, 3, 8, 16]}
    assert len(got) == 3  # 10 samples: batches of 4 without repeating
    got, info = timing_feeds(model, s, shapes=None, batch_size=64, n_batches=5)
    assert [g["x"].shape[0] for g in got] == [10]  # fewer samples than the batch: each once
    got, info = timing_feeds(model, s, shapes={"x": (3, 3, 8, 20)}, batch_size=4, n_batches=2)
    assert info["source"] == "--shape" and [g["x"].shape for g in got] == [(3, 3, 8, 20)] * 2
    with pytest.raises(AmpqError, match=r"--shape x=1x3x8x640: no calibration sample has this shape .*x=Nx3x8x12"):
        timing_feeds(model, s, shapes={"x": (1, 3, 8, 640)}, batch_size=4, n_batches=1)
    with pytest.raises(AmpqError, match=r"--shape x=1x4x8x20: axis 1 is fixed to 3"):
        timing_feeds(model, s, shapes={"x": (1, 4, 8, 20)}, batch_size=4, n_batches=1)
    with pytest.raises(AmpqError, match=r"'y' is not a model input"):
        timing_feeds(model, s, shapes={"y": (1, 4)}, batch_size=4, n_batches=1)


@pytest.mark.parametrize("text, message", [("x", "expected INPUT=DxDx"), ("x=1x0", "positive"), ("=1x2", "INPUT="),
                                           ("x=1xa", "positive")])
def test_parse_shapes_errors(text, message):
    with pytest.raises(AmpqError, match=message):
        parse_shapes([text])
    assert parse_shapes(["image=1X3x48x640"]) == {"image": (1, 3, 48, 640)}


def test_whole_pass_on_varying_widths_reports_timing_shape(tmp_path, wild_path, listed_npz):
    out = tmp_path / "o.onnx"
    result = run_pass(wild_path, out, calib=listed_npz[0], backend="mac", cache_dir=str(tmp_path / "c"),
                      progress=False, holdout=4, shapes={"x": (2, 3, 8, 20)}, log=lambda s: None)
    report = result.report
    assert report["timing_shapes"]["source"] == "--shape"
    assert report["timing_shapes"]["shapes"] == {"x": [2, 3, 8, 20]}
    assert [c["shape"]["x"][-1] for c in report["timing_shapes"]["calibration_shapes"]] == [12, 16, 20]
    assert any("opset 12 -> 13" in c for c in report["normalized"])
    assert report["calibration"]["shape_groups"] == 3
    onnx.checker.check_model(onnx.load(out))


def test_cli_shape_flag(tmp_path, wild_path, listed_npz, capsys):
    out = tmp_path / "o.onnx"
    code = main([str(wild_path), "-o", str(out), "--calib", str(listed_npz[0]), "--backend", "mac",
                 "--cache-dir", str(tmp_path / "c"), "--no-progress", "--shape", "x=1x3x8x16"])
    assert code == 0
    text = capsys.readouterr().out
    assert "timed at x=1x3x8x16 (--shape" in text
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["timing_shapes"]["shapes"] == {"x": [1, 3, 8, 16]}
    code = main([str(wild_path), "-o", str(out), "--calib", str(listed_npz[0]), "--backend", "mac",
                 "--cache-dir", str(tmp_path / "c"), "--no-progress", "--shape", "x=1x3x8x99"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ampq-pass: error: --shape x=1x3x8x99: no calibration sample has this shape")
    assert not [line for line in err if line.startswith("[")]  # refused before any stage ran


def _declared(dims_x, dims_y=None):
    from onnx import TensorProto as T
    from onnx import helper as h

    inputs = [h.make_tensor_value_info("x", T.FLOAT, dims_x)]
    nodes = [h.make_node("Identity", ["x"], ["ox"], name="id_x")]
    outputs = [h.make_tensor_value_info("ox", T.FLOAT, None)]
    if dims_y is not None:
        inputs.append(h.make_tensor_value_info("y", T.FLOAT, dims_y))
        nodes.append(h.make_node("Identity", ["y"], ["oy"], name="id_y"))
        outputs.append(h.make_tensor_value_info("oy", T.FLOAT, None))
    return h.make_model(h.make_graph(nodes, "g", inputs, outputs), opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("name", ["?", "", "-1", "unk__123", "unk__0", "dim_0", "s0", "s77", "Reshape_12_dim_0",
                                  "x_dynamic_axes_1", "2*s0", "None"])
def test_exporter_made_up_dim_names_are_no_constraint(tmp_path, name):
    """``[-1, 3, '?', '?']`` with 192x48 images was refused ("dim '?' is 192 ... but 48")."""
    model = _declared(["N", 3, name, name], [name, 4])
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((2, 3, 192, 48), np.float32), y=np.zeros((2, 4), np.float32))
    assert len(load_samples(path, model)) == 2


@pytest.mark.parametrize("name", ["size", "height", "seq", "batch_size"])
def test_a_meaningful_dim_name_repeated_is_a_constraint(tmp_path, name):
    model = _declared([-1, 3, name, name])
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((2, 3, 192, 48), np.float32))
    with pytest.raises(AmpqError, match=rf"dim '{name}' is 48 on axis 3 of input 'x' but 192 on axis 2 of input 'x'"):
        load_samples(path, model)
    np.savez(path, x=np.zeros((2, 3, 64, 64), np.float32))
    assert len(load_samples(path, model)) == 2


def test_minus_one_dim_value_declared(tmp_path):
    model = _declared([-1, 3, "?", "?"])
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((5, 3, 192, 48), np.float32))
    assert len(load_samples(path, model)) == 5
