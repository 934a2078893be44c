"""Bad input: exit code 2, one line naming the file/tensor/node, input untouched, no partial output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from ampq_pass.cli import main


@pytest.fixture()
def work(tmp_path, block_model):
    src = tmp_path / "block.onnx"
    onnx.save(block_model, src)
    np.savez(tmp_path / "calib.npz", **models.feeds_for(block_model, n=8))
    (tmp_path / "plan.json").write_text(json.dumps({"formats": {"/q/MatMul": "int8", "/ff1/MatMul": "int4"}}))
    return tmp_path


def _fails(capsys, argv, pattern, work):
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [l for l in err.splitlines() if not l.startswith("WARNING")]
    assert len(lines) == 1 and "Traceback" not in err, err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    after = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    assert after == before  # input untouched, nothing half-written
    return lines[0]


def test_rewrite_with_plan_works(work, capsys):
    out = work / "out.onnx"
    rc = main([str(work / "block.onnx"), "-o", str(out), "--plan", str(work / "plan.json"),
               "--calib", str(work / "calib.npz"), "--cache-dir", str(work / "cache")])
    assert rc == 0
    onnx.checker.check_model(onnx.load(out))
    assert "wrote" in capsys.readouterr().out


def test_a_plan_may_name_attention_matmuls_unless_told_not_to(work, capsys):
    """--plan applies a format to an activation-by-activation MatMul it names (both inputs get a
    Q/DQ); with --no-activation-matmuls the same plan is refused in one line."""
    from ampq_pass.stages.layers import find_layers

    model = onnx.load(work / "block.onnx")
    scores = next(l.name for l in find_layers(model, activation_matmuls=True) if l.weight is None)
    plan = work / "scores.json"
    plan.write_text(json.dumps({"formats": {scores: "int8"}}))
    _fails(capsys, [work / "block.onnx", "-o", work / "out.onnx", "--plan", plan, "--calib", work / "calib.npz",
                    "--no-activation-matmuls"], "is not a quantizable layer of the model", work)
    out = work / "out.onnx"
    rc = main([str(work / "block.onnx"), "-o", str(out), "--plan", str(plan), "--calib", str(work / "calib.npz")])
    assert rc == 0, capsys.readouterr().err
    written = onnx.load(out)
    node = next(n for n in written.graph.node if n.name == scores)
    makers = {o: n.op_type for n in written.graph.node for o in n.output}
    assert [makers.get(i) for i in node.input[:2]] == ["DequantizeLinear", "DequantizeLinear"]


def _multiple_of_32_model() -> onnx.ModelProto:
    """Conv (stride 32) -> BatchNormalization -> Resize x32 -> Add with the input: runs only on
    sizes that are multiples of 32 (as a text detector's FPN does); its BN is folded at load."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(3, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1.0, 1.0, 32.0, 32.0], np.float32), "scales")]
    inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, 3).astype(np.float32), n) for n in ("g", "v")]
    inits += [numpy_helper.from_array(rng.normal(size=3).astype(np.float32), n) for n in ("b", "m")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", strides=[32, 32]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Resize", ["n", "", "scales"], ["u"], name="up", mode="nearest"),
             helper.make_node("Add", ["u", "x"], ["y"], name="add")]
    dims = ["n", 3, "h", "w"]
    g = helper.make_graph(nodes, "fpn", [helper.make_tensor_value_info("x", 1, dims)],
                          [helper.make_tensor_value_info("y", 1, dims)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_with_a_plan_normalisation_is_checked_on_the_calibration_samples(tmp_path, capsys):
    # random probes (symbolic dims 16) cannot run this model; its calibration samples can
    onnx.save(_multiple_of_32_model(), tmp_path / "fpn.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).normal(size=(4, 3, 64, 64)).astype(np.float32))
    (tmp_path / "plan.json").write_text(json.dumps({"formats": {"conv": "int8"}}))
    rc = main([str(tmp_path / "fpn.onnx"), "-o", str(tmp_path / "out.onnx"), "--plan", str(tmp_path / "plan.json"),
               "--calib", str(tmp_path / "calib.npz"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 0 and "normalisation not verified" not in err, err
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))
    (tmp_path / "hp.json").write_text(json.dumps({"formats": {}}))
    rc = main([str(tmp_path / "fpn.onnx"), "-o", str(tmp_path / "out2.onnx"), "--plan", str(tmp_path / "hp.json")])
    assert rc == 0 and "normalisation not verified" in capsys.readouterr().err  # without samples: said so


def test_not_onnx(work, capsys):
    (work / "junk.onnx").write_text("not a model")
    _fails(capsys, [work / "junk.onnx", "-o", work / "o.onnx", "--plan", work / "plan.json"], r"junk\.onnx", work)


def test_truncated(work, capsys):
    data = (work / "block.onnx").read_bytes()
    (work / "cut.onnx").write_bytes(data[: len(data) // 3])
    _fails(capsys, [work / "cut.onnx", "-o", work / "o.onnx", "--plan", work / "plan.json"], r"cut\.onnx", work)


def test_missing_external_data(work, capsys):
    m = models.transformer_block()
    onnx.save_model(m, work / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    os.unlink(work / "ext.bin")
    _fails(capsys, [work / "ext.onnx", "-o", work / "o.onnx", "--plan", work / "plan.json"],
           r"external data file .*ext\.bin", work)


def test_unknown_node(work, capsys):
    (work / "bad.json").write_text(json.dumps({"formats": {"/nope/MatMul": "int8"}}))
    _fails(capsys, [work / "block.onnx", "-o", work / "o.onnx", "--plan", work / "bad.json"],
           r"node '/nope/MatMul' is not a quantizable layer", work)


def test_unknown_format(work, capsys):
    (work / "bad.json").write_text(json.dumps({"formats": {"/q/MatMul": "int2"}}))
    _fails(capsys, [work / "block.onnx", "-o", work / "o.onnx", "--plan", work / "bad.json"],
           r"unknown format 'int2'", work)


def test_plan_not_json(work, capsys):
    (work / "bad.json").write_text("{formats: ")
    _fails(capsys, [work / "block.onnx", "-o", work / "o.onnx", "--plan", work / "bad.json"], r"bad\.json: not a JSON", work)


@pytest.mark.parametrize("change, pattern", [
    (lambda f: f.pop("mask"), r"model input 'mask' is missing"),
    (lambda f: f.update(mask=f["mask"].astype(np.int32)), r"input 'mask' has dtype int32, expected int64"),
    (lambda f: f.update(hidden=f["hidden"][..., :5]), r"input 'hidden' has shape \[8, 8, 5\], expected \[batch, seq, 32\]"),
])
def test_bad_calibration(work, capsys, change, pattern):
    feeds = models.feeds_for(models.transformer_block(), n=8)
    change(feeds)
    np.savez(work / "bad.npz", **feeds)
    _fails(capsys, [work / "block.onnx", "-o", work / "o.onnx", "--plan", work / "plan.json", "--calib", work / "bad.npz"],
           pattern, work)


def test_output_is_input(work, capsys):
    _fails(capsys, [work / "block.onnx", "-o", work / "block.onnx", "--plan", work / "plan.json"],
           r"block\.onnx: output path is the input model", work)


def test_output_dir_missing(work, capsys):
    _fails(capsys, [work / "block.onnx", "-o", work / "nodir" / "o.onnx", "--plan", work / "plan.json"],
           r"output directory .*nodir does not exist", work)


def test_output_dir_unwritable(work, capsys):
    if os.geteuid() == 0:
        target = Path("/sys/o.onnx")  # root may write anywhere but to a virtual filesystem
    else:
        ro = work / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "o.onnx"
    _fails(capsys, [work / "block.onnx", "-o", target, "--plan", work / "plan.json"], r"is not writable", work)


def test_debug_shows_traceback(work):
    (work / "junk.onnx").write_text("not a model")
    r = subprocess.run([sys.executable, "-m", "ampq_pass.cli", str(work / "junk.onnx"), "-o", str(work / "o.onnx"),
                        "--plan", str(work / "plan.json"), "--debug"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ampq_pass.cli", str(work / "junk.onnx"), "-o", str(work / "o.onnx"),
                        "--plan", str(work / "plan.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_inspect_json(work, capsys):
    assert main(["inspect", str(work / "block.onnx"), "--calib", str(work / "calib.npz"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows][:3] == ["/q/MatMul", "/k/MatMul", "/v/MatMul"]
    assert all({"name", "op_type", "macs"} <= set(r) for r in rows)
