"""The rewrite that follows a backend's fusion rules (issue 13, item 2): ONNX Runtime's CPU EP
table on a residual CNN built here, checked against the graph ONNX Runtime itself optimizes."""

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import models
from onnx import TensorProto, helper, numpy_helper

from ampq_pass.backends.ort import OrtBackend
from ampq_pass.backends.ort_rules import ORT_CPU_RULES
from ampq_pass.core.fusion import ABSORBED, INTEGER, PASSTHROUGH, FusionRules, OpRule, rule_tensors
from ampq_pass.core.measure import Capabilities
from ampq_pass.core.samples import Samples
from ampq_pass.stages.calibrate import compute_ranges, required_ranges
from ampq_pass.stages.fusion import follow_rules
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.rewrite import rewrite
from hardware import needs_exact_ort_int8


def _feeds(n=16, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)}


def _session(model, path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if path:
        so.optimized_model_filepath = str(path)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _optimized(model, tmp_path, tag):
    path = tmp_path / f"{tag}.onnx"
    _session(model, path)
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def cnn_setup():
    model = models.residual_cnn()
    layers, ranges = _calibrated(model)
    return model, layers, ranges


def _inferred(graph: onnx.GraphProto) -> onnx.ModelProto:
    """``graph`` as an opset-17 model with inferred shapes (the rewrite's rules read tensor types)."""
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    model.ir_version = 8
    return model


def _calibrated(model: onnx.ModelProto):
    """The model's layers and ranges calibrated with ORT's table (16 random inputs)."""
    layers = find_layers(model)
    return layers, compute_ranges(model, layers, Samples(_feeds()), rules=ORT_CPU_RULES)


def _all_int8(layers):
    return Plan({l.name: "int8" for l in layers})


def test_rule_tensors_are_the_outputs_of_integer_and_absorbed_ops(cnn_setup):
    model, layers, ranges = cnn_setup
    seeds = required_ranges(layers)
    names = rule_tensors(model, ORT_CPU_RULES, seeds)
    assert names == sorted(["stem_relu_out", "a_relu_out", "add_out", "add_relu_out", "c_relu_out", "gap_out"])
    assert all(t in ranges for t in names)
    assert rule_tensors(model, None, seeds) == []
    # nothing can be 8-bit without a quantized layer around it
    assert rule_tensors(model, ORT_CPU_RULES) == []


def test_no_rule_tensors_on_a_transformer_block():
    """MatMul outputs are never quantized (float-output kernels): the bias Adds, the attention
    mask's Add and the Softmax are never calibrated for the rules."""
    model = onnx.shape_inference.infer_shapes(models.transformer_block())
    layers = find_layers(model)
    assert rule_tensors(model, ORT_CPU_RULES, required_ranges(layers)) == []


def test_integer_add_with_rules_and_not_without(cnn_setup, tmp_path):
    model, layers, ranges = cnn_setup
    plain = rewrite(model, layers, _all_int8(layers), ranges)
    fused = rewrite(model, layers, _all_int8(layers), ranges, rules=ORT_CPU_RULES)
    onnx.checker.check_model(fused, full_check=True)
    without, with_ = _optimized(plain, tmp_path, "plain"), _optimized(fused, tmp_path, "fused")
    assert without["QLinearAdd"] == 0 and with_["QLinearAdd"] == 1
    assert with_["QLinearGlobalAveragePool"] == 1 and without["QLinearGlobalAveragePool"] == 0
    # every Relu folded into the op before it, the MaxPool runs on uint8: nothing float between layers
    assert with_["Relu"] == 0 and with_["Add"] == 0 and with_["GlobalAveragePool"] == 0
    assert with_["QLinearConv"] == without["QLinearConv"] == 4
    # never a Q/DQ the backend keeps: the optimized graph has fewer, not more
    qdq = lambda c: c["QuantizeLinear"] + c["DequantizeLinear"]  # noqa: E731
    assert qdq(with_) < qdq(without)
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]


def test_outputs_stay_close_to_fp32(cnn_setup):
    model, layers, ranges = cnn_setup
    feeds = _feeds(32, seed=7)
    ref = _session(model).run(None, feeds)[0]
    for rules in (None, ORT_CPU_RULES):
        out = _session(rewrite(model, layers, _all_int8(layers), ranges, rules=rules)).run(None, feeds)[0]
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05


def test_no_qdq_around_an_op_not_in_the_table(cnn_setup):
    """Without Add in the table the Add stays float, and so do the Relu and MaxPool after it:
    no Q/DQ is placed around any of them (the Add may read a DQ a layer already placed)."""
    model, layers, ranges = cnn_setup
    table = FusionRules("no-add", {k: v for k, v in ORT_CPU_RULES.rules.items() if k != "Add"})
    fused = rewrite(model, layers, _all_int8(layers), ranges, rules=table)
    nodes = {n.name: n for n in fused.graph.node}
    plain = rewrite(model, layers, _all_int8(layers), ranges)
    existing = {o for n in plain.graph.node for o in n.output}
    assert set(nodes["add"].input) <= existing
    for name in ("add", "add_relu", "pool"):
        made = nodes[name].output[0]
        assert made == f"{name}_out"
        assert not any(n.op_type == "QuantizeLinear" and made in n.input for n in fused.graph.node
                       if name != "pool"), name
    assert [n.op_type for n in fused.graph.node if "add_out" in n.input] == ["Relu"]
    assert sum(n.op_type == "QuantizeLinear" for n in fused.graph.node) < sum(
        n.op_type == "QuantizeLinear" for n in plain.graph.node)  # only the Relus folded into Qs


def test_an_empty_table_changes_nothing(cnn_setup):
    model, layers, ranges = cnn_setup
    plain = rewrite(model, layers, _all_int8(layers), ranges)
    again = rewrite(model, layers, _all_int8(layers), ranges, rules=FusionRules("none", {}))
    assert plain.SerializeToString() == again.SerializeToString()
    copy = onnx.ModelProto()
    copy.CopyFrom(plain)
    assert follow_rules(copy, None, ranges) is False
    assert follow_rules(copy, FusionRules("none", {}), ranges) is False
    assert follow_rules(copy, ORT_CPU_RULES, ranges) is True


def test_float_neighbours_keep_the_op_float(cnn_setup, tmp_path):
    """Only the convolutions a and b in int8: the Add reads one int8 input (b's output) and
    one float one (the stem's Relu, whose producer stays float), so it stays float."""
    model, layers, ranges = cnn_setup
    fused = rewrite(model, layers, Plan({"a": "int8", "b": "int8"}), ranges, rules=ORT_CPU_RULES)
    c = _optimized(fused, tmp_path, "partial")
    assert c["QLinearAdd"] == 0 and c["QLinearConv"] == 2
    assert c["QLinearGlobalAveragePool"] == 0


def test_a_missing_range_keeps_the_op_float(cnn_setup, tmp_path):
    """Ranges calibrated without the rules: ops whose new Q needs a range stay float; the
    rest (Relu folded into a Q a layer already placed) still follows the rules."""
    model, layers, _ = cnn_setup
    ranges = compute_ranges(model, layers, Samples(_feeds()))
    assert "add_out" not in ranges and "gap_out" not in ranges
    fused = rewrite(model, layers, _all_int8(layers), ranges, rules=ORT_CPU_RULES)
    c = _optimized(fused, tmp_path, "noranges")
    assert c["QLinearGlobalAveragePool"] == 0
    onnx.checker.check_model(fused, full_check=True)


def test_passthrough_shares_the_scale_of_its_input():
    model = models.residual_cnn(head=False)
    layers, ranges = _calibrated(model)
    fused = rewrite(model, layers, _all_int8(layers), ranges, rules=ORT_CPU_RULES)
    prod = {o: n for n in fused.graph.node for o in n.output}
    pool = next(n for n in fused.graph.node if n.op_type == "MaxPool")
    dq_in = prod[pool.input[0]]
    q_out = next(n for n in fused.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
    assert dq_in.op_type == "DequantizeLinear" and list(dq_in.input[1:]) == list(q_out.input[1:])
    # the graph output stays float and keeps its name
    assert [o.name for o in fused.graph.output] == ["y"]


def test_rules_reach_the_stages_through_the_backend():
    assert OrtBackend().capabilities().rules is ORT_CPU_RULES
    assert OrtBackend(fusion=False).capabilities().rules is None
    assert OrtBackend().key()["fusion"] != OrtBackend(fusion=False).key()["fusion"]
    assert Capabilities(("int8",), "fp32", "x").rules is None


def test_table_entries_are_checked():
    with pytest.raises(ValueError):
        OpRule("fused")
    for wrong in (dict(kind=INTEGER, on_quantized=True), dict(kind=PASSTHROUGH, value_input=2),
                  dict(kind=PASSTHROUGH, on_quantized=True, all_outputs=True)):
        with pytest.raises(ValueError, match="single-output passthrough"):
            OpRule(**wrong)
    assert {r.kind for r in ORT_CPU_RULES.rules.values()} == {INTEGER, PASSTHROUGH, ABSORBED}
    mp = helper.make_node("MaxPool", ["a"], ["b"], kernel_shape=[2, 2])
    assert ORT_CPU_RULES.rule(mp, 11) is None and ORT_CPU_RULES.rule(mp, 12) is not None
    assert ORT_CPU_RULES.rules["Where"].data_inputs(helper.make_node("Where", ["c", "x", "y"], ["z"])) == [1, 2]


def test_readers_before_the_layer_that_placed_the_dq_are_moved_after_it(tmp_path):
    """A MaxPool listed before the convolution whose input Q/DQ it comes to read: the rewritten
    graph is put back in topological order."""
    rng = np.random.default_rng(3)
    w = lambda name, cin, cout: numpy_helper.from_array(  # noqa: E731
        (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["s"], name="stem", pads=[1] * 4),
             helper.make_node("Relu", ["s"], ["h"], name="relu"),
             helper.make_node("MaxPool", ["h"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["h"], ["a"], name="a", pads=[1] * 4),
             helper.make_node("Conv", ["p", "w2"], ["c"], name="c", pads=[1] * 4)]
    nodes[3].input.append("w1")
    graph = helper.make_graph(nodes, "order", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
                              [w("w0", 3, 8), w("w1", 8, 8), w("w2", 8, 8)])
    model = _inferred(graph)
    layers, ranges = _calibrated(model)
    fused = rewrite(model, layers, _all_int8(layers), ranges, rules=ORT_CPU_RULES)
    onnx.checker.check_model(fused, full_check=True)
    pool = next(n for n in fused.graph.node if n.name == "pool")
    assert pool.input[0] != "h"  # it reads the dequantized tensor
    c = _optimized(fused, tmp_path, "order")
    assert c["QLinearConv"] == 3 and c["Relu"] == 0


def test_cli_rewrite_follows_the_backends_rules(tmp_path):
    import json

    from ampq_pass.cli.main import main

    model = models.residual_cnn()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **_feeds())
    layers = find_layers(model)
    (tmp_path / "plan.json").write_text(json.dumps({"formats": {l.name: "int8" for l in layers}}))
    base = [str(tmp_path / "m.onnx"), "--plan", str(tmp_path / "plan.json"), "--calib", str(tmp_path / "calib.npz"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(base + ["-o", str(tmp_path / "ort.onnx")]) == 0
    assert main(base + ["-o", str(tmp_path / "mac.onnx"), "--backend", "mac"]) == 0
    fused = [n.name for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node if "_fused_int8" in n.name]
    assert fused and not [n for n in onnx.load(str(tmp_path / "mac.onnx")).graph.node if "_fused_int8" in n.name]


def _probe(op: str, n_data: int = 1, extra=(), inits=(), shape=(1, 4, 8, 8), **attrs) -> Counter:
    """DQ(s) -> op -> Q -> DQ at one scale, as ONNX Runtime's CPU EP optimizes it."""
    nodes, feeds = [], []
    for k in range(n_data):
        nodes += [helper.make_node("QuantizeLinear", [f"x{k}", "s", "z"], [f"q{k}"]),
                  helper.make_node("DequantizeLinear", [f"q{k}", "s", "z"], [f"d{k}"])]
        feeds.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, list(shape)))
    data = [f"d{k}" for k in range(n_data)]
    ins = ["cond", *data] if op == "Where" else [*data, *extra]
    if op == "Where":
        feeds.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, list(shape)))
    nodes += [helper.make_node(op, ins, ["y"], **attrs),
              helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "probe", feeds, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(0), "z"),
                               *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = Path(tempfile.mkdtemp(prefix="ampq-probe-")) / "p.onnx"
    _session(model, path)
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


_I64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
_PROBES = {
    "Add": dict(n_data=2), "Mul": dict(n_data=2), "Concat": dict(n_data=2, axis=1), "Where": dict(n_data=2),
    "AveragePool": dict(kernel_shape=[2, 2]), "GlobalAveragePool": {}, "LeakyRelu": {}, "Sigmoid": {}, "Softmax": {},
    "MaxPool": dict(kernel_shape=[2, 2]), "ReduceMax": {}, "ReduceMin": {}, "Flatten": {}, "Squeeze": {},
    "Transpose": dict(perm=[0, 2, 3, 1]), "DepthToSpace": dict(blocksize=2),
    "Resize": dict(extra=["", "scales"], inits=[numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]),
    "Reshape": dict(extra=["shape"], inits=[_I64("shape", [1, -1])]),
    "Unsqueeze": dict(extra=["axes"], inits=[_I64("axes", [0])]),
    "Slice": dict(extra=["starts", "ends"], inits=[_I64("starts", [0]), _I64("ends", [1])]),
    "Tile": dict(extra=["repeats"], inits=[_I64("repeats", [1, 1, 1, 2])]),
    "Expand": dict(extra=["eshape"], inits=[_I64("eshape", [2, 4, 8, 8])]),
    "Gather": dict(extra=["idx"], inits=[_I64("idx", [0, 1])], axis=1),
    "GatherElements": dict(extra=["idx"], inits=[numpy_helper.from_array(np.zeros((1, 4, 8, 8), np.int64), "idx")]),
    "Relu": {}, "Clip": dict(extra=["lo", "hi"], inits=[numpy_helper.from_array(np.float32(0), "lo"),
                                                         numpy_helper.from_array(np.float32(12.75), "hi")]),
}


@pytest.mark.parametrize("op", sorted(op for op, r in ORT_CPU_RULES.rules.items() if op != "Split" and not r.on_quantized))
def test_every_entry_of_the_ort_table_is_what_the_installed_ort_does(op):
    """The table against the installed ONNX Runtime: an integer op becomes its QLinear kernel,
    a passthrough op loses its DQ and Q, an absorbed activation disappears."""
    got = _probe(op, **_PROBES[op])
    kind = ORT_CPU_RULES.rules[op].kind
    # what remains: the Q of each input and the DQ of the output
    assert got["QuantizeLinear"] == _PROBES[op].get("n_data", 1) and got["DequantizeLinear"] == 1, got
    if kind == INTEGER:
        assert got[f"QLinear{op}"] == 1 and got[op] == 0, got
    elif kind == ABSORBED:
        assert got[op] == 0, got


@pytest.mark.parametrize("op, spec", [
    ("SpaceToDepth", dict(blocksize=2)),
    ("ReduceMean", {}),
])
def test_ops_left_out_of_the_table_keep_their_qdq_in_ort(op, spec):
    got = _probe(op, **spec)
    assert op not in ORT_CPU_RULES.rules and got["QuantizeLinear"] == 2 and got["DequantizeLinear"] == 2, got


def test_ort_keeps_qdq_around_pad_but_runs_pad_on_uint8():
    """Why Pad is ``on_quantized``: ONNX Runtime keeps DQ -> Pad -> Q in float, and runs the
    same Pad written on the uint8 tensor (the pad value mapped to its code) to the same codes."""
    pads = _I64("pads", [0, 0, 1, 1, 0, 0, 1, 1])
    value = numpy_helper.from_array(np.float32(0.5), "v")
    got = _probe("Pad", extra=["pads", "v"], inits=[pads, value])
    assert got["QuantizeLinear"] == 2 and got["DequantizeLinear"] == 2 and got["Pad"] == 1, got
    rule = ORT_CPU_RULES.rules["Pad"]
    assert rule.kind == PASSTHROUGH and rule.on_quantized and rule.value_input == 2

    def model(on_quantized: bool):
        q = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])]
        if on_quantized:  # 0.5 / 0.05 + 3 = code 13
            nodes = q + [helper.make_node("Pad", ["q", "pads", "v8"], ["p"]),
                         helper.make_node("DequantizeLinear", ["p", "s", "z"], ["out"])]
        else:
            nodes = q + [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                         helper.make_node("Pad", ["d", "pads", "v"], ["p"]),
                         helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"]),
                         helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["out"])]
        graph = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(np.float32(0.05), "s"),
                                   numpy_helper.from_array(np.uint8(3), "z"), pads, value,
                                   numpy_helper.from_array(np.uint8(13), "v8")])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    x = {"x": np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)}
    want, got = (_session(model(flag)).run(None, x)[0] for flag in (False, True))
    assert got.shape == (2, 4, 10, 10) and np.array_equal(got, want)
    assert np.allclose(got[:, :, 0, :], 0.5)


def _silu_pad_cnn(pad_value=None):
    """conv -> SiLU (Sigmoid, Mul) -> Pad -> depthwise conv (stride 2) -> conv: the
    TensorFlow-style "same" padding of EfficientNet's strided depthwise convolutions."""
    rng = np.random.default_rng(11)
    w = lambda name, shape: numpy_helper.from_array(  # noqa: E731
        (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)
    pad_in = ["e", "pads"] + (["pv"] if pad_value is not None else [])
    nodes = [helper.make_node("Conv", ["x", "w0"], ["e"], name="expand", pads=[1] * 4),
             helper.make_node("Sigmoid", ["e"], ["sg"], name="sigmoid"),
             helper.make_node("Mul", ["e", "sg"], ["act"], name="silu"),
             helper.make_node("Pad", ["act", "pads"] + pad_in[2:], ["padded"], name="pad"),
             helper.make_node("Conv", ["padded", "w1"], ["dw"], name="depthwise", group=8, strides=[2, 2]),
             helper.make_node("Conv", ["dw", "w2"], ["y"], name="project")]
    inits = [w("w0", (8, 3, 3, 3)), w("w1", (8, 1, 3, 3)), w("w2", (4, 8, 1, 1)), _I64("pads", [0, 0, 0, 0, 0, 0, 1, 1])]
    if pad_value is not None:
        inits.append(numpy_helper.from_array(np.float32(pad_value), "pv"))
    graph = helper.make_graph(nodes, "silu_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = _inferred(graph)
    return model


@needs_exact_ort_int8
@pytest.mark.parametrize("pad_value", [None, 0.25])
def test_pad_before_an_int8_conv_runs_on_uint8_and_takes_the_silu_with_it(tmp_path, pad_value):
    """All three convolutions int8: the Pad reads the uint8 tensor and feeds the depthwise
    convolution's DQ (no Q/DQ around it), so the SiLU before it, whose only reader was the
    float Pad, becomes QLinearSigmoid and QLinearMul. The outputs stay those of the model with
    a float Pad: the pad value's code is what the Q after a float Pad would make of it."""
    model = _silu_pad_cnn(pad_value)
    layers, ranges = _calibrated(model)
    without_pad = FusionRules("no-pad", {k: v for k, v in ORT_CPU_RULES.rules.items() if k != "Pad"})
    old = rewrite(model, layers, _all_int8(layers), ranges, rules=without_pad)
    new = rewrite(model, layers, _all_int8(layers), ranges, rules=ORT_CPU_RULES)
    onnx.checker.check_model(new, full_check=True)
    prod = {o: n for n in new.graph.node for o in n.output}
    pad = next(n for n in new.graph.node if n.op_type == "Pad")
    assert prod[pad.input[0]].op_type == "QuantizeLinear"
    assert [n.op_type for n in new.graph.node if pad.output[0] in n.input] == ["DequantizeLinear"]
    if pad_value is not None:
        s = numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == prod[pad.input[0]].input[1]))
        z = numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == prod[pad.input[0]].input[2]))
        code = numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == pad.input[2]))
        assert code.dtype == z.dtype and int(code) == int(np.rint(pad_value / s)) + int(z)
    before, after = _optimized(old, tmp_path, "old"), _optimized(new, tmp_path, "new")
    assert before["Sigmoid"] == 1 and before["Mul"] == 1 and before["QLinearSigmoid"] == 0
    assert after["Sigmoid"] == 0 and after["Mul"] == 0 and after["QLinearSigmoid"] == 1 and after["QLinearMul"] == 1
    assert after["QLinearConv"] == 3 and after["Pad"] == 1
    qdq = lambda c: c["QuantizeLinear"] + c["DequantizeLinear"]  # noqa: E731
    assert qdq(after) < qdq(before)
    feeds = _feeds(8, seed=4)
    ref = _session(model).run(None, feeds)[0]
    for m in (old, new):
        out = _session(m).run(None, feeds)[0]
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05
    # the same codes as DQ -> float Pad -> Q in its place
    floated = onnx.ModelProto()
    floated.CopyFrom(new)
    pad = next(n for n in floated.graph.node if n.op_type == "Pad")
    q_in, p_out = pad.input[0], pad.output[0]
    s, z = prod[q_in].input[1:3]
    at = list(floated.graph.node).index(pad)
    floated.graph.node.insert(at, helper.make_node("DequantizeLinear", [q_in, s, z], ["pad_in_float"]))
    floated.graph.node.insert(at + 2, helper.make_node("QuantizeLinear", ["pad_out_float", s, z], [p_out]))
    pad.input[0], pad.output[0] = "pad_in_float", "pad_out_float"
    del pad.input[2:]
    if pad_value is not None:
        pad.input.append("pv_float")
        floated.graph.initializer.append(numpy_helper.from_array(np.float32(pad_value), "pv_float"))
    assert np.array_equal(_session(floated).run(None, feeds)[0], _session(new).run(None, feeds)[0])


def test_a_pad_read_by_a_passthrough_op_leaves_no_unread_dequantize(tmp_path):
    """conv -> Relu -> Pad -> MaxPool -> conv, all int8: no layer's Q follows the Pad (the
    MaxPool reads it), so the Pad gets a DQ of its own; the DQ it no longer reads goes."""
    rng = np.random.default_rng(4)
    w = lambda name, cin, cout: numpy_helper.from_array(  # noqa: E731
        (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["s"], name="stem", pads=[1] * 4),
             helper.make_node("Relu", ["s"], ["h"], name="relu"),
             helper.make_node("Pad", ["h", "pads"], ["hp"], name="pad"),
             helper.make_node("MaxPool", ["hp"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w1"], ["y"], name="head", pads=[1] * 4)]
    graph = helper.make_graph(nodes, "padpool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [w("w0", 3, 8), w("w1", 8, 8), _I64("pads", [0, 0, 1, 1, 0, 0, 1, 1])])
    model = _inferred(graph)
    layers, ranges = _calibrated(model)
    fused = rewrite(model, layers, _all_int8(layers), ranges, rules=ORT_CPU_RULES)
    onnx.checker.check_model(fused, full_check=True)
    prod = {o: n for n in fused.graph.node for o in n.output}
    read = {i for n in fused.graph.node for i in n.input} | {o.name for o in fused.graph.output}
    pad = next(n for n in fused.graph.node if n.op_type == "Pad")
    assert prod[pad.input[0]].op_type == "QuantizeLinear"
    assert [n.op_type for n in fused.graph.node if pad.output[0] in n.input] == ["DequantizeLinear"]
    assert all(o in read for n in fused.graph.node for o in n.output)  # nothing computed for no reader
    c = _optimized(fused, tmp_path, "padpool")
    assert c["QLinearConv"] == 2 and c["MaxPool"] == 1 and c["Pad"] == 1 and c["DequantizeLinear"] == 1
    feeds = _feeds(8, seed=3)
    ref = _session(model).run(None, feeds)[0]
    out = _session(fused).run(None, feeds)[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05


def test_a_pad_with_a_computed_value_stays_float():
    model = _silu_pad_cnn(0.25)
    cast = helper.make_node("Identity", ["pv"], ["pv_computed"], name="computed")
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    pad.input[2] = "pv_computed"
    model.graph.node.insert(0, cast)
    layers, ranges = _calibrated(model)
    new = rewrite(model, layers, _all_int8(layers), ranges, rules=ORT_CPU_RULES)
    prod = {o: n for n in new.graph.node for o in n.output}
    pad = next(n for n in new.graph.node if n.op_type == "Pad")
    assert prod[pad.input[0]].op_type != "QuantizeLinear"
    onnx.checker.check_model(new, full_check=True)


def _average_pool_pair(**attrs) -> tuple[np.ndarray, np.ndarray]:
    """DQ -> AveragePool -> Q -> DQ on a 7x7 map: (float semantics, ONNX Runtime's QLinearAveragePool)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("AveragePool", ["d"], ["y"], **attrs),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 7, 7])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(0), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = {"x": np.random.default_rng(0).uniform(0, 10, (2, 4, 7, 7)).astype(np.float32)}
    got = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        got.append(ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, x)[0])
    return got[0], got[1]


def test_an_average_pool_that_qlinear_average_pool_gets_wrong_stays_float():
    """ONNX Runtime's QLinearAveragePool divides a ceil_mode window hanging off the input by the
    whole kernel under count_include_pad (the float kernel by what is inside): HF EfficientNet's
    pooler, AvgPool2d(1280, ceil_mode=True) on a 7x7 map, gave a constant. The table keeps that
    AveragePool float and fuses the others. (If the first assertion fails, ONNX Runtime fixed its
    kernel and the ``float_when`` entry can go.)"""
    bad = dict(kernel_shape=[8, 8], strides=[8, 8], ceil_mode=1, count_include_pad=1)
    want, got = _average_pool_pair(**bad)
    assert not np.allclose(got, want, atol=0.1)
    for fine in (dict(kernel_shape=[7, 7]), dict(kernel_shape=[8, 8], strides=[8, 8], ceil_mode=1),
                 dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)):
        want, got = _average_pool_pair(**fine)
        assert np.allclose(got, want, atol=0.051), fine
        assert ORT_CPU_RULES.rule(helper.make_node("AveragePool", ["d"], ["y"], **fine), 17) is not None
    assert ORT_CPU_RULES.rule(helper.make_node("AveragePool", ["d"], ["y"], **bad), 17) is None
    assert "float_when" not in str(ORT_CPU_RULES.key()) and [["ceil_mode", 1], ["count_include_pad", 1]] in \
        ORT_CPU_RULES.key()["rules"]["AveragePool"][-1]


def test_split_runs_on_8_bit_in_ort():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Split", ["d", "sizes"], ["a", "b"], axis=1)]
    outs = []
    for t in ("a", "b"):
        nodes += [helper.make_node("QuantizeLinear", [t, "s", "z"], [t + "q"]),
                  helper.make_node("DequantizeLinear", [t + "q", "s", "z"], [t + "_out"])]
        outs.append(helper.make_tensor_value_info(t + "_out", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])], outs,
                              [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(0), "z"),
                               _I64("sizes", [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = Path(tempfile.mkdtemp(prefix="ampq-probe-")) / "p.onnx"
    _session(model, path)
    got = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert got["QuantizeLinear"] == 1 and got["DequantizeLinear"] == 2 and got["Split"] == 1, got
    assert ORT_CPU_RULES.rules["Split"].kind == PASSTHROUGH


def test_split_between_int8_layers_shares_the_scale(tmp_path):
    """conv -> Relu -> Split -> (conv, conv): the Split's outputs take the scale of its input and
    ONNX Runtime runs it on uint8 (no DQ/Q left between the convolutions)."""
    rng = np.random.default_rng(5)
    w = lambda name, cin, cout: numpy_helper.from_array(  # noqa: E731
        (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["s"], name="stem", pads=[1] * 4),
             helper.make_node("Relu", ["s"], ["h"], name="relu"),
             helper.make_node("Split", ["h", "sizes"], ["h1", "h2"], name="split", axis=1),
             helper.make_node("Conv", ["h1", "w1"], ["a"], name="a", pads=[1] * 4),
             helper.make_node("Conv", ["h2", "w2"], ["b"], name="b", pads=[1] * 4)]
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
                              [w("w0", 3, 8), w("w1", 4, 4), w("w2", 4, 4), _I64("sizes", [4, 4])])
    model = _inferred(graph)
    layers, ranges = _calibrated(model)
    plain = rewrite(model, layers, _all_int8(layers), ranges)
    fused = rewrite(model, layers, _all_int8(layers), ranges, rules=ORT_CPU_RULES)
    onnx.checker.check_model(fused, full_check=True)
    without, with_ = _optimized(plain, tmp_path, "plain"), _optimized(fused, tmp_path, "fused")
    assert with_["QLinearConv"] == 3 and with_["Relu"] == 0
    assert with_["QuantizeLinear"] + with_["DequantizeLinear"] < without["QuantizeLinear"] + without["DequantizeLinear"]
    feeds = _feeds(8, seed=3)
    ref = _session(model).run(None, feeds)
    for got, want in zip(_session(fused).run(None, feeds), ref):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


def test_openvino_cpu_has_its_own_table():
    pytest.importorskip("openvino")
    from ampq_pass.backends.openvino import OpenVinoBackend
    from ampq_pass.backends.openvino_rules import OPENVINO_CPU_RULES

    backend = OpenVinoBackend("cpu")
    if "int8" not in backend.capabilities().formats:
        pytest.skip("this CPU does not list INT8")
    rules = backend.capabilities().rules
    assert rules is OPENVINO_CPU_RULES and rules.rules != ORT_CPU_RULES.rules
    # ONNX Runtime has QLinearSigmoid and QLinearSoftmax; OpenVINO's LPT keeps them in float
    assert {"Sigmoid", "Softmax"} <= set(ORT_CPU_RULES.rules) and not {"Sigmoid", "Softmax"} & set(rules.rules)
    assert OpenVinoBackend("cpu", fusion=False).capabilities().rules is None
    assert backend.key()["fusion"] != OpenVinoBackend("cpu", fusion=False).key()["fusion"]


def test_a_layers_float_output_is_quantized_for_an_8_bit_reader_only_where_the_table_says(cnn_setup):
    """int8_sym leaves a conv's output float. With a table that allows it (OpenVINO's,
    ``layer_outputs``), the conv whose only reader is the residual Add gets one Q/DQ after it, so
    the Add reads two dequantized tensors and runs in 8 bits; a conv followed by a Relu keeps its
    output float; without the permission (ONNX Runtime's table) the Add stays float."""
    from dataclasses import replace

    model, layers, ranges = cnn_setup
    plan = Plan({l.name: "int8_sym" for l in layers})
    allowed = replace(ORT_CPU_RULES, layer_outputs=True)
    plain, fused = (rewrite(model, layers, plan, ranges, rules=r) for r in (ORT_CPU_RULES, allowed))
    onnx.checker.check_model(fused, full_check=True)
    prod = lambda m: {o: n for n in m.graph.node for o in n.output}  # noqa: E731

    def add_inputs(m):
        p = prod(m)
        add = next(n for n in m.graph.node if n.op_type == "Add")
        return [p[i].op_type for i in add.input]

    assert add_inputs(fused) == ["DequantizeLinear", "DequantizeLinear"]
    assert "DequantizeLinear" not in add_inputs(plain)
    quantized = {n.input[0] for n in fused.graph.node if n.op_type == "QuantizeLinear"}
    convs = [n for n in fused.graph.node if n.op_type == "Conv"]
    by_reader = {n.output[0]: [r.op_type for r in fused.graph.node if n.output[0] in r.input] for n in convs}
    assert any(readers == ["QuantizeLinear"] for readers in by_reader.values())  # the one before the Add
    assert all(out not in quantized for out, readers in by_reader.items() if "Relu" in readers)
    ref = _session(model).run(None, _feeds(8, seed=3))[0]
    out = _session(fused).run(None, _feeds(8, seed=3))[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05


def _concat_cnn() -> onnx.ModelProto:
    """x -> conv a, conv b -> Concat -> conv c -> conv d: no activations, so every tensor after
    a conv is signed and int8_sym writes it with int8 codes."""
    rng = np.random.default_rng(5)
    w = lambda name, o, i: numpy_helper.from_array(rng.normal(0, 0.3, (o, i, 1, 1)).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="concat"),
             helper.make_node("Conv", ["cat", "wc"], ["c"], name="conv_c"),
             helper.make_node("Conv", ["c", "wd"], ["y"], name="conv_d")]
    graph = helper.make_graph(nodes, "concat_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 16, 16])],
                              [w("wa", 4, 3), w("wb", 4, 3), w("wc", 4, 8), w("wd", 4, 4)])
    return _inferred(graph)


@pytest.mark.parametrize("table", ["openvino", "ort_with_unsigned_concat"])
def test_recode_unsigned_writes_a_concat_region_in_uint8_codes_with_the_same_values(table):
    """Every signed Q/DQ of the 8-bit region around the Concat (OpenVINO's table: on its inputs,
    the conv outputs, and after it; a table that leaves the conv outputs float: after it only) is
    written as uint8 with zero point 128; the input's and conv d's, outside it, keep int8 codes;
    the values are the same to the last bit."""
    from dataclasses import replace

    from ampq_pass.backends.openvino_rules import OPENVINO_CPU_RULES
    from ampq_pass.stages.fusion import recode_unsigned

    rules = OPENVINO_CPU_RULES if table == "openvino" else replace(ORT_CPU_RULES, unsigned_only=frozenset({"Concat"}))
    model = _concat_cnn()
    layers = find_layers(model)
    ranges = compute_ranges(model, layers, Samples(_feeds()), rules=rules)
    plan = Plan({l.name: "int8_sym" for l in layers})
    signed = rewrite(model, layers, plan, ranges, rules=replace(rules, unsigned_only=frozenset()))
    recoded = rewrite(model, layers, plan, ranges, rules=rules)
    onnx.checker.check_model(recoded, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in recoded.graph.initializer}
    zero = {n.input[0]: inits[n.input[2]] for n in recoded.graph.node if n.op_type == "QuantizeLinear"}
    before = {n.input[0]: numpy_helper.to_array(next(t for t in signed.graph.initializer if t.name == n.input[2]))
              for n in signed.graph.node if n.op_type == "QuantizeLinear"}
    region = {t for t in zero if t in ("a", "b", "cat") or t.startswith(("a_", "b_", "cat_"))}
    assert "cat" in region and (table != "openvino" or {"a", "b"} <= {t.split("_")[0] for t in region})
    for t, zp in zero.items():
        if t in region:
            assert zp.dtype == np.uint8 and int(zp) == 128, t
        else:
            assert zp.dtype == np.int8 and int(zp) == 0, t  # x and c: no Concat in their region
    assert {t: b.dtype for t, b in before.items()} == {t: np.dtype(np.int8) for t in before}  # all signed before
    feeds = _feeds(4, seed=9)
    np.testing.assert_array_equal(_session(recoded).run(None, feeds)[0], _session(signed).run(None, feeds)[0])
    assert recode_unsigned(recoded, rules) is False and recode_unsigned(signed, None) is False
