"""The OpenVINO runtime backend (``openvino:cpu``).

CI installs only the base package and the test extra, so every test that needs the runtime is
skipped there with a reason; the missing-package error is tested everywhere.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from ampq_pass.backends import available_backends, get_backend
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.measure import Protocol, Timing
from ampq_pass.core.ort import make_session
from hardware import needs_exact_openvino_int8

HAVE_OV = importlib.util.find_spec("openvino") is not None
needs_ov = pytest.mark.skipif(not HAVE_OV, reason="openvino is not installed (pip install 'ampq-pass[openvino]')")

FAST = Protocol(warmup=1, min_repeats=3, max_repeats=6, rel_ci=0.5, max_seconds=5)


def test_missing_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(AmpqError) as e:
        get_backend("openvino:cpu")
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'ampq-pass[openvino]'" in msg
    assert "openvino:cpu" not in available_backends()  # listing never fails without it


def test_fast_formats_from_capabilities():
    from ampq_pass.backends.openvino import OpenVinoBackend

    fast = OpenVinoBackend.fast_formats
    # 16-bit Cast pairs are not fast; int4 weight-only is (compressed-weight kernels, a decode step)
    assert fast("CPU", ("FP32", "BF16", "FP16", "INT8", "BIN")) == ("int8_sym", "int8", "int4", "int4_b128")
    assert fast("CPU", ("FP32", "BF16")) == ()  # no INT8 listed: nothing beyond hp
    assert fast("GPU.0", ("FP32", "FP16", "INT8")) == ("int8_sym",)  # unmeasured device type: int8_sym if listed
    # on an unmeasured device type ONNX Runtime's int8 (uint8 asymmetric activations) is taken on request only
    request = OpenVinoBackend.requestable_formats
    assert request("GPU.0", ("FP32", "FP16", "INT8")) == ("int8_sym", "int8")
    assert request("CPU", ("FP32", "FP16", "INT8")) == ("int8_sym", "int8", "int4", "int4_b128")
    assert request("CPU", ("FP32", "FP16")) == ()


@needs_ov
def test_a_user_may_ask_for_int8_but_not_for_a_format_the_device_emulates():
    b = get_backend("openvino:cpu", protocol=FAST, formats=("int8",))
    if "INT8" not in b.device_caps:
        pytest.skip("this CPU does not list INT8")
    assert b.capabilities().formats == ("int8",) and b.capabilities().rules is not None
    assert get_backend("openvino:cpu", protocol=FAST).capabilities().formats == ("int8_sym", "int8", "int4", "int4_b128")
    with pytest.raises(AmpqError, match="does not run 'int8_dyn' fast; it offers int8_sym, int8, int4, int4_b128"):
        get_backend("openvino:cpu", protocol=FAST, formats=("int8_dyn",))
    # the pass hands the user's --formats to the backend it makes from a spec
    from ampq_pass.pipeline import make_backend

    assert make_backend("openvino:cpu", ("int8",)).capabilities().formats == ("int8",)


@needs_ov
def test_attention_matmuls_are_layers_on_the_cpu_plugin_only_with_its_8_bit_formats():
    from ampq_pass.backends.openvino import OpenVinoBackend

    b = OpenVinoBackend("cpu")
    if "int8_sym" not in b.capabilities().formats:
        pytest.skip("this CPU does not list INT8")
    assert b.capabilities().activation_matmuls is True
    assert OpenVinoBackend("cpu", formats=("int4",)).capabilities().activation_matmuls is False
    assert get_backend("ort:cpu").capabilities().activation_matmuls is False


@needs_ov
def test_capabilities_key_and_compiled_settings():
    b = get_backend("openvino:cpu", protocol=FAST)
    caps = b.capabilities()
    assert caps.hp == "fp32" and set(caps.formats) <= {"int8_sym", "int8", "int4", "int4_b128", "fp16", "bf16"}
    assert "int8_dyn" not in caps.formats
    key = b.key()
    import openvino as ov

    assert key["openvino"] == ov.get_version() and key["device"] == "CPU" and key["threads"] == 2
    assert key["config"]["INFERENCE_NUM_THREADS"] == "2" and key["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert key["protocol"] == FAST.key() and key["optimization_capabilities"]
    compiled = b.compile(models.mlp())
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 2
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32", "float32")
    assert int(compiled.get_property("NUM_STREAMS")) == 1
    assert "openvino:cpu" in available_backends()
    assert get_backend("openvino:cpu", threads=1).key() != key  # threads are part of every cache key


@needs_ov
def test_unknown_device_and_format_are_clear_errors():
    with pytest.raises(AmpqError, match="not available; OpenVINO lists here: cpu"):
        get_backend("openvino:npu9")
    with pytest.raises(AmpqError, match="does not run 'int8_dyn' fast"):
        get_backend("openvino:cpu", formats=("int8_dyn",))
    assert get_backend("openvino:cpu", formats=()).capabilities().formats == ()


@needs_ov
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer_block"])
def test_outputs_match_onnxruntime(name):
    model = getattr(models, name)()
    feeds = models.feeds_for(model, n=4)
    want = make_session(model).run(None, feeds)[0]
    got = get_backend("openvino:cpu").run(model, feeds)[model.graph.output[0].name]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # f32 pinned: not the CPU's bf16 default


@needs_ov
def test_an_input_whose_port_took_a_folded_ops_name_is_still_fed():
    """OpenVINO folds a Pad with zero pads (the classic exporter writes one before each 1x1 conv
    of MobileNetV2) into the graph input, whose port then carries both names and may report
    the Pad's output as ``any_name``: the feed is found by any of the port's names."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.zeros(8, np.int64), "pads")
    graph = helper.make_graph([helper.make_node("Pad", ["x", "pads"], ["a_padded"]),
                               helper.make_node("Conv", ["a_padded", "w"], ["y"])], "g", [x], [y], [w, pads])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    b = get_backend("openvino:cpu", protocol=FAST)
    np.testing.assert_allclose(b.run(model, feeds)["y"], make_session(model).run(None, feeds)[0], rtol=1e-4, atol=1e-4)
    assert b.time({"a": model}, [feeds])["a"].median > 0


@needs_ov
def test_time_and_time_each_interleave():
    b = get_backend("openvino:cpu", protocol=FAST)
    m1, m2 = models.mlp(0), models.mlp(1, sizes=(16, 64, 64, 8))
    feeds = [models.feeds_for(m1, n=4, seed=s) for s in (1, 2)]
    out = b.time({"a": m1, "b": m2}, feeds)
    assert set(out) == {"a", "b"} and all(isinstance(t, Timing) and t.median > 0 for t in out.values())
    assert len(out["a"].samples) == len(out["b"].samples) >= FAST.min_repeats
    each = b.time_each({"a": (m1, feeds), "c": (models.cnn(), [models.feeds_for(models.cnn(), n=2)])})
    assert set(each) == {"a", "c"}
    with pytest.raises(AmpqError, match="no timing inputs"):
        b.time({"a": m1}, [])
    with pytest.raises(AmpqError, match="lack model input 'x'"):
        b.time({"a": m1}, [{"y": np.zeros((1, 16), np.float32)}])


@needs_ov
def test_feeds_longlong_and_scalar_shape():
    """Captured activations may be numpy longlong (int64 under another type number) or shape (1,)
    for an input an extracted subgraph declares as a scalar; ONNX Runtime takes both."""
    nodes = [helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "kf"], ["y"])]
    g = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                                       helper.make_tensor_value_info("k", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = get_backend("openvino:cpu").run(m, {"x": x, "k": np.array([3], dtype=np.longlong)})
    np.testing.assert_allclose(out["y"], 3 * x)


@needs_ov
def test_large_model_path_goes_through_a_file(monkeypatch):
    import ampq_pass.backends.openvino as ovb

    monkeypatch.setattr(ovb, "fits_in_memory", lambda m: False)
    model = models.mlp()
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    feeds = models.feeds_for(model, n=3)
    got = get_backend("openvino:cpu").run(model, feeds)["y"]
    np.testing.assert_allclose(got, make_session(model).run(None, feeds)[0], rtol=1e-4, atol=1e-4)
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}  # the caller's proto keeps its weights
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


@needs_ov
def test_int8_qdq_as_written_runs_in_integer_kernels():
    """The rewrite's int8 (uint8 per-tensor activation Q->DQ, int8 symmetric per-channel weight DQ)
    becomes a u8 x i8 FullyConnected in OpenVINO's compiled graph, not DQ->float->Q."""
    from ampq_pass.core.samples import Samples
    from ampq_pass.stages.calibrate import compute_ranges
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    model = models.single_matmul(w)
    layers = find_layers(model)
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    ranges = compute_ranges(model, layers, Samples({"x": x}, source="test"))
    q = rewrite(model, layers, Plan({"mm": "int8"}), ranges)
    b = get_backend("openvino:cpu")
    runtime = b.compile(q).get_runtime_model()
    kinds = {(str(o.get_rt_info()["layerType"].astype(str)), str(o.get_rt_info()["runtimePrecision"].astype(str)))
             for o in runtime.get_ordered_ops()}
    assert ("FullyConnected", "u8") in kinds, kinds
    np.testing.assert_allclose(b.run(q, {"x": x})["y"], make_session(q).run(None, {"x": x})[0], rtol=0.05, atol=0.05)


@needs_ov
def test_whole_pass_on_openvino(tmp_path):
    from ampq_pass.backends.openvino import OpenVinoBackend
    from ampq_pass.pipeline import run_pass

    model = models.mlp(sizes=(64, 128, 128, 16))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    feeds = models.feeds_for(model, n=24)
    np.savez(tmp_path / "c.npz", **feeds)
    result = run_pass(src, tmp_path / "out.onnx", calib=tmp_path / "c.npz", backend=OpenVinoBackend(protocol=FAST),
                      cache_dir=str(tmp_path / "cache"), log=lambda s: None)
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))
    assert result.report["backend"] == "openvino:cpu" and result.report["predicted"]["speedup"] >= 1.0


def _too_wide_pool(spatial) -> onnx.ModelProto:
    """Conv -> AveragePool whose kernel exceeds its 3x3 input (what the exporters wrote for
    EfficientNet-B0's pooler): ONNX Runtime runs it, OpenVINO's CPU plugin refuses it - at
    compile time with static spatial dims, at the first inference with dynamic ones."""
    w = np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("AveragePool", ["c"], ["y"], name="too_wide_pool", kernel_shape=[8, 8], strides=[8, 8],
                          ceil_mode=1, pads=[0, 0, 0, 0])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 1, 1])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert make_session(model).run(None, {"x": np.ones((2, 4, 3, 3), np.float32)})[0].shape == (2, 4, 1, 1)
    return model


@needs_ov
@pytest.mark.parametrize("spatial", [(3, 3), ("h", "w")], ids=["static", "dynamic"])
def test_a_model_openvino_cannot_run_is_refused_before_any_work(tmp_path, spatial):
    """The pass says so at once, naming the file, the node and the cause, instead of after
    timing the subgraphs before the one holding it (227 s on EfficientNet-B0, dynamo export) or
    with a traceback from the first inference (310 s, classic export)."""
    from ampq_pass.backends.openvino import OpenVinoBackend
    from ampq_pass.pipeline import run_pass

    src = tmp_path / "pool.onnx"
    onnx.save(_too_wide_pool(spatial), src)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((8, 4, 3, 3)).astype(np.float32))
    stages = []
    with pytest.raises(AmpqError) as e:
        run_pass(src, tmp_path / "out.onnx", calib=tmp_path / "c.npz", backend=OpenVinoBackend(protocol=FAST),
                 log=stages.append)
    msg = str(e.value)
    # the node: by its ONNX name at compile time, by OpenVINO's (its output, 'y') at inference
    assert msg.startswith(str(src)) and ("too_wide_pool" in msg or "AvgPool node with name 'y'" in msg)
    assert "Kernel after dilation" in msg and "\n" not in msg
    assert not any(line.startswith("[1/7]") for line in stages)  # refused before calibration
    assert not (tmp_path / "out.onnx").exists()


@needs_ov
def test_an_inference_openvino_refuses_is_an_error_naming_the_node_not_a_traceback():
    from ampq_pass.backends.openvino import OpenVinoBackend

    feeds = [{"x": np.ones((2, 4, 3, 3), np.float32)}]
    with pytest.raises(AmpqError, match="cannot run the model 'g' on CPU: .*AvgPool node with name 'y'; Kernel after"):
        OpenVinoBackend(protocol=FAST).time({"m": _too_wide_pool(("h", "w"))}, feeds)
    with pytest.raises(AmpqError, match="AvgPool node with name 'y'"):
        OpenVinoBackend(protocol=FAST).run(_too_wide_pool(("h", "w")), feeds[0])


def _ov_probe(op: str, n_data: int = 1, n_out: int = 1, inits=(), extra=(), **attrs) -> set[tuple[str, str]]:
    """(layer type, runtime precision) of DQ(s) -> op -> Q -> DQ compiled on the CPU plugin."""
    shape = [1, 16, 16, 16]
    nodes, feeds = [], []
    for k in range(n_data):
        nodes += [helper.make_node("QuantizeLinear", [f"x{k}", "s", "z"], [f"q{k}"]),
                  helper.make_node("DequantizeLinear", [f"q{k}", "s", "z"], [f"d{k}"])]
        feeds.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, shape))
    outs = [f"y{k}" for k in range(n_out)]
    nodes.append(helper.make_node(op, [f"d{k}" for k in range(n_data)] + list(extra), outs, **attrs))
    results = []
    for y in outs:
        nodes += [helper.make_node("QuantizeLinear", [y, "s", "z"], [y + "q"]),
                  helper.make_node("DequantizeLinear", [y + "q", "s", "z"], [y + "_out"])]
        results.append(helper.make_tensor_value_info(y + "_out", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "probe", feeds, results, [numpy_helper.from_array(np.float32(0.05), "s"),
                                                                numpy_helper.from_array(np.uint8(0), "z"), *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    compiled = get_backend("openvino:cpu").compile(model)
    return {(str(o.get_rt_info()["layerType"].astype(str)), str(o.get_rt_info()["runtimePrecision"].astype(str)))
            for o in compiled.get_runtime_model().get_ordered_ops()}


def _i64(name, v):
    return numpy_helper.from_array(np.array(v, np.int64), name)


#: op -> (probe arguments, the CPU plugin's layer type for it)
_OV_PROBES = {
    "MaxPool": (dict(kernel_shape=[2, 2]), "Pooling"), "AveragePool": (dict(kernel_shape=[2, 2]), "Pooling"),
    "GlobalAveragePool": ({}, "Reduce"), "ReduceMean": ({}, "Reduce"), "ReduceMax": ({}, "Reduce"),
    "ReduceMin": ({}, "Reduce"), "Concat": (dict(n_data=2, axis=1), "Concatenation"),
    "Reshape": (dict(extra=["shape"], inits=[_i64("shape", [1, -1])]), "Reshape"), "Flatten": ({}, "Reshape"),
    "Squeeze": (dict(extra=["axes"], inits=[_i64("axes", [0])]), "Reshape"),
    "Unsqueeze": (dict(extra=["axes"], inits=[_i64("axes", [0])]), "Reshape"),
    "Transpose": (dict(perm=[0, 2, 3, 1]), "Transpose"), "DepthToSpace": (dict(blocksize=2), "DepthToSpace"),
    "Gather": (dict(extra=["idx"], inits=[_i64("idx", [0, 1])], axis=1), "Gather"),
    "Expand": (dict(extra=["shape"], inits=[_i64("shape", [2, 16, 16, 16])]), "Broadcast"),
    "Resize": (dict(extra=["", "scales"], inits=[numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]),
               "Interpolate"),
    "Split": (dict(n_out=2, axis=1), "Split"),
}


@needs_ov
@pytest.mark.parametrize("op", sorted(_OV_PROBES))
def test_every_8_bit_entry_of_the_openvino_table_runs_in_u8(op):
    from ampq_pass.backends.openvino_rules import OPENVINO_CPU_RULES

    if "int8_sym" not in get_backend("openvino:cpu").capabilities().formats:
        pytest.skip("this CPU does not list INT8")
    assert op in OPENVINO_CPU_RULES.rules
    args, layer_type = _OV_PROBES[op]
    got = _ov_probe(op, **args)
    assert (layer_type, "u8") in got, got


@needs_ov
@pytest.mark.parametrize("op, args", [("Sigmoid", {}), ("LeakyRelu", {}), ("Softmax", {}),
                                      ("Tile", dict(extra=["r"], inits=[_i64("r", [1, 1, 1, 2])])),
                                      ("Slice", dict(extra=["a", "b"], inits=[_i64("a", [0]), _i64("b", [1])]))])
def test_ops_left_out_of_the_openvino_table_run_in_float(op, args):
    from ampq_pass.backends.openvino_rules import OPENVINO_CPU_RULES

    got = _ov_probe(op, **args)
    assert op not in OPENVINO_CPU_RULES.rules
    assert not any(precision == "u8" for layer, precision in got if layer not in ("Input", "Output", "Const", "Reorder")), got


@needs_ov
def test_a_residual_add_between_int8_convs_runs_in_u8_with_the_table():
    """The residual CNN with every conv int8: with the table's Q/DQ the plugin folds the residual
    Add into a u8 convolution (sum post-op) and runs the MaxPool in u8, with no FakeQuantize left
    but the input's; with the Q/DQ only at the layers the Add and its Relu run as f32 eltwise
    ops between float FakeQuantizes."""
    from ampq_pass.backends.openvino_rules import OPENVINO_CPU_RULES
    from ampq_pass.core.samples import Samples
    from ampq_pass.stages.calibrate import compute_ranges
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite

    if "int8_sym" not in get_backend("openvino:cpu").capabilities().formats:
        pytest.skip("this CPU does not list INT8")
    model = models.residual_cnn(c=16)
    layers = find_layers(model)
    feeds = {"x": np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)}
    ranges = compute_ranges(model, layers, Samples(feeds), rules=OPENVINO_CPU_RULES)
    plan = Plan({l.name: "int8" for l in layers if l.op_type == "Conv"})
    b = get_backend("openvino:cpu")

    def kinds(m):
        return Counter((str(o.get_rt_info()["layerType"].astype(str)), str(o.get_rt_info()["runtimePrecision"].astype(str)))
                       for o in b.compile(m).get_runtime_model().get_ordered_ops())

    fused, plain = kinds(rewrite(model, layers, plan, ranges, rules=OPENVINO_CPU_RULES)), kinds(rewrite(model, layers, plan, ranges))
    assert fused[("FakeQuantize", "f32")] == 1 and plain[("FakeQuantize", "f32")] > 1, (fused, plain)
    assert fused[("Convolution", "u8")] == plain[("Convolution", "u8")] == len(plan.formats)
    assert fused[("Pooling", "u8")] == 1 and plain[("Pooling", "u8")] == 0
    assert sum(n for (kind, _), n in fused.items() if kind == "Eltwise") < sum(n for (kind, _), n in plain.items() if kind == "Eltwise")


def test_openvino_errors_are_one_line_naming_the_node_and_the_cause():
    from ampq_pass.backends.openvino import openvino_reason

    text = """Exception from src/inference/src/cpp/core.cpp:105:
Check 'false' failed at src/frontends/common_translators/src/unconverted_ops_report.cpp:151:
FrontEnd API failed with OpConversionFailure:
Model wasn't fully converted. Failed operations detailed log:
-- AveragePool-17 with a message:
While validating ONNX node '<Node(AveragePool): /m/pooler/AveragePool>': Check 'cmp::le(kernel, dim.get_length())' failed at src/core/shape_inference/include/pooling_shape_inference_util.hpp:149:
While validating node 'opset16::AvgPool AvgPool_1 (opset1::Multiply x[0]:f32[?,1280,7,7]) -> (dynamic[...])' with friendly_name 'AvgPool_1':
Kernel after dilation has size (dim: 1280) larger than the data shape after padding (dim: 7) at axis 0.
Summary:
-- Conversion is failed for: AveragePool-17
"""
    got = openvino_reason(text)
    assert "\n" not in got and "<Node(AveragePool): /m/pooler/AveragePool>" in got
    assert "Kernel after dilation has size (dim: 1280)" in got and "AveragePool-17" in got
    assert not got.startswith("Exception from")
    assert openvino_reason("plain message") == "plain message"
    at_inference = """Exception from src/inference/src/cpp/infer_request.cpp:224:
Exception from src/plugins/intel_cpu/src/node.cpp:794:
[CPU] AvgPool node with name '/m/pooler/AveragePool' Check 'cmp::le(kernel, dim.get_length())' failed at src/core/shape_inference/include/pooling_shape_inference_util.hpp:149:
While validating node 'opset16::AvgPool /m/pooler/AveragePool (Mul[0]:f32[?,1280,?,?]) -> (f32[?,1280,1..,1..])' with friendly_name 'x':
Kernel after dilation has size (dim: 1280) larger than the data shape after padding (dim: 7) at axis 0.
"""
    assert openvino_reason(at_inference) == ("[CPU] AvgPool node with name '/m/pooler/AveragePool'; Kernel after "
                                             "dilation has size (dim: 1280) larger than the data shape after "
                                             "padding (dim: 7) at axis 0.")


def _silu_convs(c: int = 16) -> onnx.ModelProto:
    """Conv -> SiLU -> Conv (YOLOv8's block): the second conv reads a tensor with negative values."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((c, k, 3, 3)).astype(np.float32) * 0.2 for k in (3, c))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
             helper.make_node("Mul", ["a", "s"], ["h"], name="silu"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, c, 32, 32])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@needs_ov
def test_int8_sym_convolutions_run_in_integer_kernels_on_signed_and_unsigned_inputs():
    """int8_sym (zero point 0, int8 for a signed range, uint8 otherwise; no Q/DQ at the conv
    output) compiles every convolution to an 8-bit one: on the residual CNN with the table (ReLU
    ranges: uint8) and after a SiLU (a signed range: int8); outputs stay close to fp32."""
    from ampq_pass.backends.openvino_rules import OPENVINO_CPU_RULES
    from ampq_pass.core.samples import Samples
    from ampq_pass.stages.calibrate import compute_ranges
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite

    b = get_backend("openvino:cpu", protocol=FAST)
    if "int8_sym" not in b.capabilities().formats:
        pytest.skip("this CPU does not list INT8")
    for model, shape in ((models.residual_cnn(c=16), (8, 3, 16, 16)), (_silu_convs(), (8, 3, 32, 32))):
        layers = find_layers(model)
        feeds = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
        ranges = compute_ranges(model, layers, Samples(feeds), rules=OPENVINO_CPU_RULES)
        plan = Plan({l.name: "int8_sym" for l in layers if l.op_type == "Conv"})
        q = rewrite(model, layers, plan, ranges, rules=OPENVINO_CPU_RULES)
        zero_points = [t for t in q.graph.initializer if t.name.endswith("_zero_point") and t.data_type != TensorProto.INT32]
        assert zero_points and all(not numpy_helper.to_array(t).any() for t in zero_points)
        kinds = Counter((str(o.get_rt_info()["layerType"].astype(str)), str(o.get_rt_info()["runtimePrecision"].astype(str)))
                        for o in b.compile(q).get_runtime_model().get_ordered_ops())
        integer = sum(n for (kind, prec), n in kinds.items() if kind == "Convolution" and prec in ("u8", "i8"))
        assert integer == len(plan.formats), kinds
        ref = make_session(model).run(None, feeds)[0]
        got = b.run(q, feeds)[next(iter(b.run(q, feeds)))]
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05
    inits = {t.name: t for t in q.graph.initializer}
    silu_q = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "h")
    assert inits[silu_q.input[2]].data_type == TensorProto.INT8  # the SiLU output is signed: int8


@needs_exact_openvino_int8
@needs_ov
def test_a_concat_before_an_int8_sym_conv_computes_as_onnx_runtime_does():
    """Concat -> Q/DQ (int8 codes) -> Conv: OpenVINO 2026.4's CPU plugin computed it wrong on
    this project's machines (relative error 0.22 against ONNX Runtime); the rewrite with
    OpenVINO's table writes the region in uint8 codes (``unsigned_only``), which it computes
    as ONNX Runtime does, and still runs the convolution in an 8-bit kernel."""
    from ampq_pass.backends.openvino_rules import OPENVINO_CPU_RULES
    from ampq_pass.core.samples import Samples
    from ampq_pass.stages.calibrate import compute_ranges
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite

    b = get_backend("openvino:cpu", protocol=FAST)
    if "int8_sym" not in b.capabilities().formats:
        pytest.skip("this CPU does not list INT8")
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="concat"),
         helper.make_node("Conv", ["cat", "w"], ["y"], name="conv")], "concat_conv",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [8, 128, 20, 20]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [8, 64, 20, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64, 20, 20])],
        [numpy_helper.from_array(rng.normal(0, 0.05, (64, 192, 1, 1)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"a": rng.normal(0, 1.5, (8, 128, 20, 20)).astype(np.float32),
             "b": rng.normal(0, 1.5, (8, 64, 20, 20)).astype(np.float32)}
    layers = find_layers(model)
    ranges = compute_ranges(model, layers, Samples(feeds), rules=OPENVINO_CPU_RULES)
    q = rewrite(model, layers, Plan({"conv": "int8_sym"}), ranges, rules=OPENVINO_CPU_RULES)
    inits = {t.name: t for t in q.graph.initializer}
    assert [inits[n.input[2]].data_type for n in q.graph.node if n.op_type == "QuantizeLinear"] == [TensorProto.UINT8]
    ref = make_session(q).run(None, feeds)[0]
    got = b.run(q, feeds)["y"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3
    kinds = Counter((str(o.get_rt_info()["layerType"].astype(str)), str(o.get_rt_info()["runtimePrecision"].astype(str)))
                    for o in b.compile(q).get_runtime_model().get_ordered_ops())
    assert kinds[("Convolution", "u8")] + kinds[("Convolution", "i8")] == 1, kinds
