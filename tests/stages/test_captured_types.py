"""Shapes from the data: a Reshape whose shape is computed at run time leaves every later tensor
rank-unknown to onnx shape inference; subgraphs cut there are typed from the captured tensors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from ampq_pass.backends.ort import OrtBackend
from ampq_pass.cli.main import main
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.measure import Protocol
from ampq_pass.core.proto import infer_shapes_safe
from ampq_pass.core.samples import Samples
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.partition import partition
from ampq_pass.stages.subgraphs import CAPTURED_TYPE, capture_inputs, extract, extract_all
from ampq_pass.stages.timing import gain_table

FAST = Protocol(warmup=1, min_repeats=3, max_repeats=5, rel_ci=0.5, max_seconds=5)


def computed_reshape_model(d: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x [batch, seq, d] -> MatMul -> Reshape to [batch, -1, d] with the shape computed at run
    time (Shape -> Gather -> Concat -> Slice with a computed end) -> MatMul -> MatMul."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(rng.standard_normal((d, d)).astype(np.float32) / 4, f"w{i}") for i in range(3)]
    inits += [nh.from_array(np.array([0], np.int64), "i0"), nh.from_array(np.array([-1, d], np.int64), "rest"),
              nh.from_array(np.array([0], np.int64), "start")]
    nodes = [
        h.make_node("MatMul", ["x", "w0"], ["a"], name="mm0"),
        h.make_node("Relu", ["a"], ["a1"], name="relu0"),
        h.make_node("Shape", ["a1"], ["shp"], name="shape"),
        h.make_node("Gather", ["shp", "i0"], ["b"], name="gather", axis=0),
        h.make_node("Concat", ["b", "rest"], ["full"], name="concat", axis=0),
        h.make_node("Shape", ["shp"], ["rank"], name="rank"),
        h.make_node("Max", ["rank", "rank"], ["end"], name="end"),
        h.make_node("Slice", ["full", "start", "end"], ["newshape"], name="slice"),
        h.make_node("Reshape", ["a1", "newshape"], ["r"], name="reshape"),
        h.make_node("MatMul", ["r", "w1"], ["c"], name="mm1"),
        h.make_node("Relu", ["c"], ["c1"], name="relu1"),
        h.make_node("MatMul", ["c1", "w2"], ["y"], name="mm2"),
    ]
    graph = h.make_graph(nodes, "computed_reshape", [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", d])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", "rows", d])], initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def feeds(n: int = 8, seq: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, seq, 16)).astype(np.float32)}


def test_inference_really_loses_the_rank():
    inferred = infer_shapes_safe(computed_reshape_model())
    types = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    assert not types["r"].HasField("shape") and not types["c1"].HasField("shape")


def test_extraction_without_capture_is_a_clear_error():
    model = computed_reshape_model()
    part = partition(model, find_layers(model))
    with pytest.raises(AmpqError, match=r"no type or shape .*run capture_inputs"):
        extract_all(model, part)


def test_captured_types_make_every_subgraph_extractable_and_exact():
    model = computed_reshape_model()
    part = partition(model, find_layers(model))
    assert len(part.subgraphs) == 3
    samples = Samples(feeds(8))
    captured = capture_inputs(model, part, samples, batch_size=4)
    added = {v.name: v for v in model.graph.value_info if v.doc_string == CAPTURED_TYPE}
    assert set(added) == {"r", "c1"}
    # batch and data-dependent dims symbolic, the hidden size fixed
    dims = [d.dim_param or d.dim_value for d in added["r"].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[1], str) and dims[2] == 16
    subs = extract_all(model, part)  # passes onnx.checker
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    full = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for b, batch in enumerate(samples.batches(4)):
        values = dict(batch)
        for sg, sub in zip(part.subgraphs, subs):
            sess = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            feed = {t: values[t] if t in values else captured[sg.index][b][t] for t in sg.inputs}
            values.update(zip(sg.outputs, sess.run(sg.outputs, feed)))
        np.testing.assert_allclose(values["y"], full.run(["y"], batch)[0], rtol=0, atol=1e-5)
    # other sequence lengths run through the same extracted subgraphs (dims stayed symbolic)
    sess = ort.InferenceSession(subs[1].SerializeToString(), opts, providers=["CPUExecutionProvider"])
    assert sess.run(None, {"r": np.ones((3, 11, 16), np.float32)})[0].shape == (3, 11, 16)


def test_model_typed_by_inference_is_left_alone(mlp_model):
    model = onnx.ModelProto()
    model.CopyFrom(mlp_model)
    part = partition(model, find_layers(model))
    capture_inputs(model, part, Samples({"x": np.ones((4, 16), np.float32)}))
    assert not [v for v in model.graph.value_info if v.doc_string == CAPTURED_TYPE]


def test_timing_path_on_the_computed_reshape():
    model = computed_reshape_model()
    layers = find_layers(model)
    samples = Samples(feeds(8))
    ranges = compute_ranges(model, layers, samples)
    formats = {l.name: [f for f in l.formats if f == "int8"] for l in layers}
    part = partition(model, layers, formats=formats)
    captured = capture_inputs(model, part, samples, batch_size=4)
    table = gain_table(model, layers, part, ranges, captured, OrtBackend(protocol=FAST, formats=("int8",), saturating_int8=True),
                       progress=False, model_inputs=list(samples.batches(4)), boundary_states=False)
    assert len(table.subgraphs) == 3 and all(len(sg.configs) == 2 for sg in table.subgraphs)


def test_whole_pass_on_the_computed_reshape(tmp_path):
    onnx.save(computed_reshape_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **feeds(16))
    code = main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--calib", str(tmp_path / "c.npz"),
                      "--backend", "mac", "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))
