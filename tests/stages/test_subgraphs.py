"""Standalone extraction and captured inputs: running the subgraphs in order reproduces the model."""

from __future__ import annotations

import json

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ampq_pass.core.samples import Samples
from ampq_pass.cli import main
from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.layers import find_layers
from ampq_pass.core.proto import infer_shapes_safe
from ampq_pass.stages.partition import Partition, partition
from ampq_pass.stages.subgraphs import capture_inputs, extract, extract_all


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def llama_feeds(n: int = 6, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, seq), np.int64)
    mask[: n // 2, -3:] = 0
    return {"input_ids": rng.integers(0, 128, (n, seq)).astype(np.int64), "attention_mask": mask}


@pytest.fixture(scope="module")
def llama_model():
    return infer_shapes_safe(models.llama_decoder(layers=2))


def run_in_order(model, part, subs, captured, batch, b):
    """Each subgraph fed from model inputs and earlier subgraphs' outputs; side-chain
    tensors (only those) from the capture. Returns every tensor computed this way."""
    side = {t for n in model.graph.node if n.name in set(part.side_nodes) for t in n.output}
    values = dict(batch)
    for sg, sub in zip(part.subgraphs, subs):
        feeds = {}
        for t in sg.inputs:
            if t in values:
                feeds[t] = values[t]
            else:
                assert t in side, f"{t} is neither computed nor a side tensor"
                feeds[t] = captured[sg.index][b][t]
        values.update(zip(sg.outputs, session(sub).run(sg.outputs, feeds)))
    return values


def check_reproduces(model, part, feeds, batch_size):
    subs = extract_all(model, part)
    captured = capture_inputs(model, part, Samples(feeds), batch_size=batch_size)
    full = session(model)
    names = [o.name for o in model.graph.output]
    for b, batch in enumerate(Samples(feeds).batches(batch_size)):
        values = run_in_order(model, part, subs, captured, batch, b)
        for name, ref in zip(names, full.run(names, batch)):
            np.testing.assert_allclose(values[name], ref, rtol=0, atol=1e-6)
        # what a subgraph computes for the next one is what the capture saw in the model
        for sg in part.subgraphs:
            for t, v in captured[sg.index][b].items():
                np.testing.assert_array_equal(values.get(t, v), v)


@pytest.mark.parametrize("name", ["mlp", "cnn", "block"])
def test_subgraphs_in_order_reproduce_the_model(name, mlp_model, cnn_model, block_model):
    model = {"mlp": mlp_model, "cnn": cnn_model, "block": block_model}[name]
    model = infer_shapes_safe(model)
    check_reproduces(model, partition(model, find_layers(model)), models.feeds_for(model, n=6), batch_size=4)


def test_llama_subgraphs_in_order_reproduce_the_model(llama_model):
    part = partition(llama_model, find_layers(llama_model))
    check_reproduces(llama_model, part, llama_feeds(), batch_size=4)


@pytest.fixture(scope="module")
def block_inferred(block_model):
    return infer_shapes_safe(block_model)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cap=st.integers(2, 40), fmts=st.lists(st.sampled_from(["int8", "fp16", "bf16", "fp8_e4m3"]), min_size=1,
                                               max_size=4, unique=True),
       activation_matmuls=st.booleans(), batch_size=st.integers(1, 5), seed=st.integers(0, 100))
def test_property_any_cap_any_formats_reproduces(block_inferred, cap, fmts, activation_matmuls, batch_size, seed):
    """Whatever ties and finer cuts the cap forces, the pieces still compose to the model."""
    layers = find_layers(block_inferred, activation_matmuls=activation_matmuls)
    part = partition(block_inferred, layers, formats={l.name: fmts for l in layers}, max_configs=cap)
    check_reproduces(block_inferred, part, models.feeds_for(block_inferred, n=5, seed=seed), batch_size)


def test_extracted_models_are_valid_and_typed(llama_model):
    part = partition(llama_model, find_layers(llama_model))
    for sg in part.subgraphs:
        sub = extract(llama_model, sg)
        onnx.checker.check_model(sub, full_check=True)
        assert [i.name for i in sub.graph.input] == sg.inputs
        assert [o.name for o in sub.graph.output] == sg.outputs
        assert all(i.type.tensor_type.elem_type for i in sub.graph.input)
        assert {(o.domain, o.version) for o in sub.opset_import} == {(o.domain, o.version)
                                                                     for o in llama_model.opset_import}
        assert set(sg.nodes) <= {n.name for n in sub.graph.node}
        # side-chain tensors arrive as inputs: no side op is copied in except constants
        copied = {n.name for n in sub.graph.node} - set(sg.nodes)
        ops = {n.name: n.op_type for n in llama_model.graph.node}
        assert all(ops[n] in ("Constant", "Identity") for n in copied), copied


def test_capture_batches_and_shared_side_tensors(llama_model):
    part = partition(llama_model, find_layers(llama_model))
    feeds = llama_feeds(n=7)
    captured = capture_inputs(llama_model, part, Samples(feeds), batch_size=3)
    assert set(captured) == {s.index for s in part.subgraphs}
    assert all(len(v) == 3 for v in captured.values())  # 3 + 3 + 1 samples
    assert captured[0][2]["input_ids"].shape[0] == 1
    # a side tensor read by both attention subgraphs is one array, not a copy per reader
    shared = set(part.subgraphs[0].inputs) & set(part.subgraphs[2].inputs)
    assert shared
    t = next(iter(shared))
    assert captured[0][0][t] is captured[2][0][t]
    limited = capture_inputs(llama_model, part, Samples(feeds), batch_size=3, max_batches=1)
    assert all(len(v) == 1 for v in limited.values())


def test_mismatched_partition_is_refused(mlp_model, block_model):
    part = partition(block_model, find_layers(block_model))
    with pytest.raises(AmpqError):
        extract(mlp_model, part.subgraphs[0])
    with pytest.raises(AmpqError, match="not a tensor of the model"):
        capture_inputs(mlp_model, part, Samples(models.feeds_for(mlp_model)))


def test_cli_partition_table_json_and_drawing(tmp_path, block_model, capsys):
    path = tmp_path / "block.onnx"
    onnx.save(block_model, path)
    out_json, png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["partition", str(path), "--json", str(out_json), "--draw", str(png)]) == 0
    text = capsys.readouterr().out
    assert "attention" in text and "2 subgraphs (1 attention, 1 mlp)" in text
    data = json.loads(out_json.read_text())
    assert [len(s["layers"]) for s in data["subgraphs"]] == [4, 2]
    assert Partition.from_json(data).subgraphs[0].layers == data["subgraphs"][0]["layers"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["partition", str(path), "--max-configs", "8", "--formats", "int8"]) == 0
    assert "tied q,k,v" in capsys.readouterr().out


def test_cli_partition_errors(tmp_path, capsys):
    assert main(["partition", str(tmp_path / "missing.onnx")]) == 2
    assert "no such model file" in capsys.readouterr().err
    onnx.save(models.mlp(), tmp_path / "m.onnx")
    assert main(["partition", str(tmp_path / "m.onnx"), "--max-configs", "1"]) == 2
    assert main(["partition", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "no" / "p.json")]) == 2


def _branch_reads_outer_tensor():
    """x -> MatMul -> Relu = r; If(flag) whose branches read r from the enclosing graph; then a
    second MatMul on the If's output (silero-vad's decoder reads its encoder this way)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, None)
    then_g = helper.make_graph([helper.make_node("Add", ["r", "one"], ["b"], name="then_add")], "then", [], [out])
    else_g = helper.make_graph([helper.make_node("Mul", ["r", "one"], ["b"], name="else_mul")], "else", [], [out])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("If", ["flag"], ["b"], name="branch", then_branch=then_g, else_branch=else_g),
             helper.make_node("MatMul", ["b", "w2"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
                                       helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_extraction_follows_tensors_that_if_branches_read():
    import onnxruntime as ort

    model = _branch_reads_outer_tensor()
    model = onnx.shape_inference.infer_shapes(model)
    layers = find_layers(model)
    part = partition(model, layers)
    subs = extract_all(model, part)
    before = [list(n.input) for n in model.graph.node]
    x = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32), "flag": np.array(True)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    feeds = dict(x)
    for sub in subs:
        sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
        feeds.update(zip([o.name for o in sess.get_outputs()], outs))
    np.testing.assert_allclose(feeds["y"], want, rtol=1e-6)
    assert [list(n.input) for n in model.graph.node] == before  # the caller's model is untouched
    assert all(len(n.input) == 1 for s in subs for n in s.graph.node if n.op_type == "If")
