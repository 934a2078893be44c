"""Normalisation at load (issue 8.1): other exporters' conventions become ours, outputs unchanged."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import models
from ampq_pass.cli import main
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import Int8
from ampq_pass.stages.layers import find_layers
from ampq_pass.core.graph import initializers
from ampq_pass.core.model import load_model
from ampq_pass.core.normalize import (MIN_OPSET, FoldPadsIntoConvs, check_equivalent, default_opset, normalize,
                                      normalize_checked)
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.calibrate import Ranges
from wild_models import ort_run, wild_cnn, wild_feeds


def _copy(m):
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


@pytest.fixture(scope="module")
def wild():
    return wild_cnn()


@pytest.fixture(scope="module")
def wild_path(tmp_path_factory, wild):
    path = tmp_path_factory.mktemp("wild") / "wild.onnx"
    onnx.save(wild, path)
    return path


def test_load_normalises_every_convention(wild_path):
    changes = []
    model = load_model(wild_path, changes=changes)
    assert default_opset(model) >= MIN_OPSET
    assert not [n for n in model.graph.node if n.op_type in ("Constant", "Identity", "Cast", "BatchNormalization")]
    text = " | ".join(changes)
    for what in ("Constant", "Identity", "Cast", "opset 12 -> 13", "BatchNormalization"):
        assert what in text
    layers = {l.name: l for l in find_layers(model)}
    # every weight-bearing op is a layer now, with the output-channel axis its op needs
    assert {k: (v.channel_axis, v.weight_shape) for k, v in layers.items()} == {
        "stem": (0, (8, 3, 3, 3)), "depthwise": (0, (8, 1, 3, 3)), "up": (1, (8, 2, 2, 2)),
        "fc": (0, (6, 4)), "shared_matmul": (1, (6, 6)), "shared_gemm": (0, (6, 6))}


def test_folded_weights_are_the_effective_weights(wild):
    """The Conv weight after folding is W * gamma / sqrt(var + eps), per output channel."""
    model, _ = normalize(_copy(wild))
    w = numpy_helper.to_array(initializers(model)[find_layers(model)[0].weight])
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in wild.graph.node if n.op_type == "Constant"}
    scale = consts["bn1_gamma"] / np.sqrt(consts["bn1_var"] + 1e-3)
    np.testing.assert_allclose(w, consts["stem_w"] * scale[:, None, None, None], rtol=1e-6)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_outputs_unchanged_at_every_width(wild, index):
    model, _ = normalize(_copy(wild))
    x = wild_feeds()[index]
    np.testing.assert_allclose(ort_run(model, {"x": x})[0], ort_run(wild, {"x": x})[0], rtol=1e-5, atol=1e-6)


def _replace_pass(monkeypatch, kind, wrong):
    """Put ``wrong`` in place of the ``kind`` pass of ``NORMALIZATION_PASSES`` for one test."""
    import ampq_pass.core.normalize as nm

    passes = tuple(wrong if isinstance(p, kind) else p for p in nm.NORMALIZATION_PASSES)
    assert sum(p is wrong for p in passes) == 1
    monkeypatch.setattr(nm, "NORMALIZATION_PASSES", passes)


def test_a_wrong_normalisation_is_caught(wild, monkeypatch):
    """The equivalence check is real: a fold that gets epsilon wrong is refused with a clear error."""
    import ampq_pass.core.normalize as nm

    class SloppyFold(nm.FoldBatchNorms):
        def call(self, model, *, source):
            for node in model.graph.node:
                if node.op_type == "BatchNormalization":
                    for a in node.attribute:
                        if a.name == "epsilon":
                            a.f = 0.5
            return super().call(model, source=source)

    _replace_pass(monkeypatch, nm.FoldBatchNorms, SloppyFold())
    with pytest.raises(AmpqError, match=r"wild\.onnx: normalised model output #0 differs from the original"):
        normalize_checked(_copy(wild), source="wild.onnx")


def _unnamed_relus(model):
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.name = ""
    return model


def test_each_pass_reports_whether_it_modified(wild, mlp_model):
    """Each pass of NORMALIZATION_PASSES: modified=False (no change, model bytes equal) on a
    normalised model; modified=True on the wild model normalised by the passes before it."""
    import ampq_pass.core.normalize as nm

    passes = nm.NORMALIZATION_PASSES
    assert [type(p).__name__ for p in passes] == ["NameNodes", "UpgradeOpset", "ConstantsToInitializers",
                                                  "FoldIdentityAndCast", "FoldPadsIntoConvs", "FoldBiasAddsIntoConvs",
                                                  "FoldBatchNorms", "FuseHardSwish", "DropUnusedInitializers"]
    normalised, _ = normalize(_unnamed_relus(_copy(wild)))
    for index, pass_ in enumerate(passes):
        for done in (normalised, mlp_model):
            result = pass_(_copy(done))
            assert not result.modified and not result.changes, pass_
            assert result.model.SerializeToString() == done.SerializeToString(), pass_
        before, _ = normalize(_unnamed_relus(_copy(wild)), passes=passes[:index])
        result = pass_(before, source="wild.onnx")
        assert result.modified, pass_
        assert pass_.in_place == (result.model is before)
        if not isinstance(pass_, nm.DropUnusedInitializers):  # the only pass that reports nothing
            assert result.changes, pass_
        inexact = (nm.UpgradeOpset, nm.FoldBiasAddsIntoConvs, nm.FoldBatchNorms, nm.FuseHardSwish)
        assert all(c.exact for c in result.changes) == (not isinstance(pass_, inexact))


def test_normalize_reports_each_pass_change_in_order(wild):
    _, done = normalize(_unnamed_relus(_copy(wild)))
    assert done.changes == [
        "named 3 unnamed nodes <op>_<index>",
        "upgraded opset 12 -> 13 with onnx.version_converter",
        "moved 9 Constant nodes into initializers",
        "removed 1 Identity nodes of weights",
        "folded 1 Cast nodes of weights into initializers",
        "folded 1 Pad nodes into convolutions (dw_pad into depthwise)",
        "folded 1 per-channel Add nodes into convolution biases (up_bias into up)",
        "folded 3 BatchNormalization into convolutions (bn1 into stem, bn2 into depthwise, bn3 into up)",
        "fused 1 element-wise hard-swish/hard-sigmoid patterns (hs_div); opset 13 -> 14 for HardSwish"]
    assert not done.exact


def test_a_pass_that_breaks_its_contract_is_refused():
    import ampq_pass.core.normalize as nm

    class Liar(nm.NormalizationPass):
        def call(self, model, *, source):
            return nm.PassResult(_copy(model), True)

    m = helper.make_model(helper.make_graph([], "g", [], []))
    with pytest.raises(RuntimeError, match="declared in place but returned another model"):
        normalize(m, passes=[Liar()])


def test_untouched_model_is_not_changed(mlp_model):
    model, done = normalize(_copy(mlp_model))
    assert not done.changed
    assert model.SerializeToString() == mlp_model.SerializeToString()


def test_unnamed_nodes_keep_their_original_index_names():
    # Constant at index 0 is removed; the MatMul must still be called MatMul_1, as in the file.
    w = np.ones((4, 2), np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["n", 4])],
                          [helper.make_tensor_value_info("y", 1, ["n", 2])])
    model, _ = normalize_checked(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert [l.name for l in find_layers(model)] == ["MatMul_1"]


def test_nodes_the_opset_converter_adds_are_named():
    # onnx's Softmax 11 -> 13 adapter wraps the Softmax in unnamed Shape/Flatten/Reshape nodes
    # (PaddleOCR's paddle2onnx classifier was refused for it)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Softmax", ["h"], ["y"], name="sm", axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 3, 4])],
                          [helper.make_tensor_value_info("y", 1, [2, 3, 5])],
                          [numpy_helper.from_array(np.ones((4, 5), np.float32), "w")])
    model, done = normalize_checked(helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)]))
    assert default_opset(model) == MIN_OPSET
    assert len(model.graph.node) > 2 and all(n.name for n in model.graph.node)
    assert [l.name for l in find_layers(model)] == ["mm"]


def test_shared_weight_gets_one_dequantize_per_axis(wild):
    model, _ = normalize(_copy(wild))
    layers = find_layers(model)
    ranges = Ranges("minmax", {t: (-3.0, 3.0) for l in layers for t in (l.activation, l.output)})
    out = rewrite(model, layers, Plan({"shared_matmul": "int8", "shared_gemm": "int8"}), ranges)
    readers = {n.name: n for n in out.graph.node}
    dq = {n.output[0]: n for n in out.graph.node if n.op_type == "DequantizeLinear"}
    axes = {name: dq[readers[name].input[1]].attribute[0].i for name in ("shared_matmul", "shared_gemm")}
    assert axes == {"shared_matmul": 1, "shared_gemm": 0}
    assert readers["shared_matmul"].input[1] != readers["shared_gemm"].input[1]
    onnx.checker.check_model(out)
    x = wild_feeds()[0]
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0], atol=0.05)


@pytest.mark.parametrize("layer", ["depthwise", "up"])
def test_grouped_conv_weight_quantized_per_output_channel(wild, layer):
    """Depthwise Conv: one scale per output channel on axis 0; grouped ConvTranspose on axis 1;
    the stored int8 weight dequantizes to exactly the numpy reference sensitivity uses."""
    model, _ = normalize(_copy(wild))
    layers = {l.name: l for l in find_layers(model)}
    l = layers[layer]
    ranges = Ranges("minmax", {t: (-3.0, 3.0) for t in (l.activation, l.output)})
    out = rewrite(model, list(layers.values()), Plan({layer: "int8"}), ranges)
    node = next(n for n in out.graph.node if n.name == layer)
    dq = next(n for n in out.graph.node if n.output[0] == node.input[1])
    inits = initializers(out)
    q, scale = (numpy_helper.to_array(inits[i]) for i in dq.input[:2])
    assert dq.attribute[0].i == l.channel_axis and scale.shape == (l.weight_shape[l.channel_axis],)
    w = numpy_helper.to_array(initializers(model)[l.weight])
    shape = [1] * w.ndim
    shape[l.channel_axis] = -1
    np.testing.assert_array_equal(q.astype(np.float32) * scale.reshape(shape), Int8().fake_weight(w, l.channel_axis))
    ort_run(out, {"x": wild_feeds()[1]})  # runs


def test_cli_plan_on_wild_model(tmp_path, wild_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text('{"formats": {"stem": "int8", "fc": "int8", "shared_gemm": "int8"}}')
    calib = tmp_path / "c.npz"
    np.savez(calib, **{f"x/{i}": a for i, a in enumerate(wild_feeds())})
    out = tmp_path / "o.onnx"
    assert main([str(wild_path), "-o", str(out), "--plan", str(plan), "--calib", str(calib),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    q = onnx.load(out)
    onnx.checker.check_model(q)
    assert [i.name for i in q.graph.input] == ["x"] and [o.name for o in q.graph.output] == ["y"]
    for x in wild_feeds():
        np.testing.assert_allclose(ort_run(q, {"x": x})[0], ort_run(wild_cnn(), {"x": x})[0], atol=0.1)


def test_converter_failure_is_a_clear_error(monkeypatch, wild):
    import ampq_pass.core.proto as mm

    def broken(model, opset):
        raise RuntimeError("No Adapter For Foo\nmore lines")

    monkeypatch.setattr(mm, "convert_opset", broken)
    with pytest.raises(AmpqError, match=r"w\.onnx: opset 12 must be raised to 13 .* failed: No Adapter For Foo$"):
        normalize(_copy(wild), source="w.onnx")


def test_original_that_cannot_run_on_probes_only_warns(capsys):
    from wild_models import small_embedding

    m = small_embedding()  # random probe ids 0..99 are out of range for its 3 rows
    model, done = normalize_checked(m, source="emb.onnx")
    assert done.changed and "normalisation not verified" in capsys.readouterr().err
    assert check_equivalent(m, model, feeds={"ids": np.zeros((1, 5), np.int64)})


def _pad_conv(pads=(0, 0, 1, 0, 0, 0, 2, 1), value=0.0, mode="constant", conv_pads=(1, 0, 1, 0), second_reader=False,
              pads_from_shape=False):
    """x -> Pad -> Conv(3x3), the Pad's pads computed by Concat (or from x's Shape)."""
    rng = np.random.default_rng(2)
    half = len(pads) // 2
    inits = [numpy_helper.from_array(np.array(pads[:half], np.int64), "pb"),
             numpy_helper.from_array(np.array(pads[half:], np.int64), "pe"),
             numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) / 5).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(value, np.float32), "v")]
    nodes = [helper.make_node("Concat", ["pb", "pe"], ["pads"], name="pads", axis=0)]
    if pads_from_shape:  # pads = pads + 0 * rank(x): depends on the input
        nodes += [helper.make_node("Shape", ["x"], ["xs"], name="shape"),
                  helper.make_node("Shape", ["xs"], ["rank"], name="rank"),
                  helper.make_node("Sub", ["rank", "rank"], ["zero"], name="zero"),
                  helper.make_node("Add", ["pads_c", "zero"], ["pads_x"], name="addz")]
        nodes[0].output[0] = "pads_c"
    nodes += [helper.make_node("Pad", ["x", "pads_x" if pads_from_shape else "pads", "v"], ["p"], name="pad", mode=mode),
              helper.make_node("Conv", ["p", "w"], ["y"], name="conv", pads=list(conv_pads))]
    outs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["p"], ["r"], name="relu"))
        outs.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "padconv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                               ["n", 3, 9, 10])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_zero_pad_before_a_conv_is_folded_into_its_pads():
    """Pad [0,0,1,0 | 0,0,2,1] before a Conv with pads [1,0 | 1,0]: one Conv with pads
    [2,0 | 3,1], the Pad and its Concat gone, outputs equal."""
    model = _pad_conv()
    done, record = normalize_checked(_copy(model), source="padconv.onnx")
    ops = [n.op_type for n in done.graph.node]
    assert ops == ["Conv"] and "folded 1 Pad nodes into convolutions (pad into conv)" in record.changes
    conv = done.graph.node[0]
    assert conv.input[0] == "x" and list(helper.get_attribute_value(next(a for a in conv.attribute
                                                                        if a.name == "pads"))) == [2, 0, 3, 1]
    assert {t.name for t in done.graph.initializer} == {"w"}
    x = {"x": np.random.default_rng(3).standard_normal((2, 3, 9, 10)).astype(np.float32)}
    assert np.allclose(ort_run(done, x)[0], ort_run(model, x)[0], atol=1e-6)


@pytest.mark.parametrize("case", [dict(value=0.5), dict(mode="reflect"), dict(pads=(0, 1, 1, 0, 0, 0, 1, 0)),
                                  dict(pads=(0, 0, -1, 0, 0, 0, 1, 0)), dict(second_reader=True),
                                  dict(pads=(0, 0, 1, 0, 0, 0, 1)),
                                  dict(pads_from_shape=True)])
def test_a_pad_that_is_not_a_zero_spatial_pad_of_one_conv_stays(case):
    """Not folded: a non-zero value, another mode, padding on the channel axis, a crop, a
    second reader of the padded tensor, pads of odd length (an invalid Pad: the model is not
    run), pads that depend on the input."""
    model = _pad_conv(**case)
    if len(case.get("pads", ())) % 2:
        done = FoldPadsIntoConvs()(model).model
        assert "Pad" in [n.op_type for n in done.graph.node]
        return
    done, record = normalize_checked(model, source="padconv.onnx")
    assert "Pad" in [n.op_type for n in done.graph.node]
    assert not any("Pad nodes" in c for c in record.changes)


def _conv_add(c_shape=(1, 4, 1, 1), conv_bias=False, reshape=False, second_reader=False, add_input_from_x=False):
    """x -> Conv(3 -> 4) -> Add(c): c an initializer of ``c_shape`` (or that reshaped by a Reshape node)."""
    rng = np.random.default_rng(4)
    c = rng.standard_normal(int(np.prod(c_shape))).astype(np.float32)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) / 5).astype(np.float32), "w"),
             numpy_helper.from_array(c if reshape else c.reshape(c_shape), "c")]
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if conv_bias else []), ["y"], name="conv", pads=[1, 1, 1, 1])]
    if conv_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"))
    operand = "c"
    if reshape:
        inits.append(numpy_helper.from_array(np.array(c_shape, np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["c", "shape"], ["c4"], name="reshape"))
        operand = "c4"
    if add_input_from_x:  # an operand computed from the input: not a constant
        nodes.append(helper.make_node("ReduceMean", ["x"], ["xm"], name="mean", axes=[1, 2, 3], keepdims=1))
        operand = "xm"
    nodes.append(helper.make_node("Add", [operand, "y"], ["z"], name="add"))
    outs = [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
        outs.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "convadd", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                               ["n", 3, 6, 7])], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", [dict(), dict(reshape=True), dict(conv_bias=True, c_shape=(4, 1, 1)),
                                  dict(c_shape=(1,))])
def test_a_per_channel_add_after_a_conv_becomes_its_bias(case):
    """Add of [1,4,1,1] (or a Reshape of [4] to it, paddle2onnx's bias; or [4,1,1] onto the conv's
    own bias; or a scalar): one Conv with the sum as bias, the Add (and Reshape) gone, outputs equal."""
    model = _conv_add(**case)
    done, record = normalize_checked(_copy(model), source="convadd.onnx")
    assert [n.op_type for n in done.graph.node] == ["Conv"]
    assert "folded 1 per-channel Add nodes into convolution biases (add into conv)" in record.changes
    assert done.graph.node[0].output[0] == "z" and done.graph.node[0].input[2] == "conv_biasfold"
    x = {"x": np.random.default_rng(5).standard_normal((2, 3, 6, 7)).astype(np.float32)}
    assert np.allclose(ort_run(done, x)[0], ort_run(model, x)[0], atol=1e-5)


@pytest.mark.parametrize("case", [dict(c_shape=(4,)), dict(c_shape=(1, 1, 6, 1)), dict(c_shape=(1, 1, 4, 1, 1)),
                                  dict(second_reader=True), dict(add_input_from_x=True)])
def test_an_add_that_is_not_one_constant_per_output_channel_stays(case):
    """Not folded: [4] broadcasts over the width, [1,1,6,1] over the height, a rank-5 constant
    would broadcast the output up, the conv output has a second reader, the operand is computed
    from the input."""
    done, record = normalize_checked(_conv_add(**case), source="convadd.onnx")
    assert "Add" in [n.op_type for n in done.graph.node]
    assert not any("Add nodes" in c for c in record.changes)


def _hard_swish(kind="paddle", opset=13, b=6.0, lo=0.0, second_reader=False):
    """x -> Conv -> the element-wise hard-swish (``paddle``: x * Clip(x + 3, 0, 6) / 6; ``mul_inverse``:
    the same with * (1/6); ``sigmoid``: Clip(x + 3, 0, 6) / 6 alone)."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 1, 1))).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k)
              for k, v in (("three", 3.0), ("lo", lo), ("b", b), ("inv_b", 1.0 / b))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
             helper.make_node("Add", ["three", "h"], ["a"], name="add"),
             helper.make_node("Clip", ["a", "lo", "b"], ["c"], name="clip")]
    if kind == "sigmoid":
        nodes.append(helper.make_node("Div", ["c", "b"], ["y"], name="div"))
    else:
        nodes.append(helper.make_node("Mul", ["c", "h"], ["m"], name="mul"))
        nodes.append(helper.make_node("Mul", ["m", "inv_b"], ["y"], name="div") if kind == "mul_inverse" else
                     helper.make_node("Div", ["m", "b"], ["y"], name="div"))
    outs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
    if second_reader:
        outs.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "hswish", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                              ["n", 3, 5, 5])], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("kind,opset,ops,raised", [("paddle", 13, ["Conv", "HardSwish"], True),
                                                   ("mul_inverse", 13, ["Conv", "HardSwish"], True),
                                                   ("paddle", 14, ["Conv", "HardSwish"], False),
                                                   ("sigmoid", 13, ["Conv", "HardSigmoid"], False)])
def test_element_wise_hard_swish_becomes_one_op(kind, opset, ops, raised):
    """One HardSwish (an opset-13 model raised to 14 for it), or a HardSigmoid for Clip(x + 3, 0, 6) / 6."""
    model = _hard_swish(kind, opset)
    done, record = normalize_checked(_copy(model), source="hswish.onnx")
    assert [n.op_type for n in done.graph.node] == ops
    assert default_opset(done) == (14 if raised else opset)
    assert "fused 1 element-wise hard-swish/hard-sigmoid patterns (div)" + (
        "; opset 13 -> 14 for HardSwish" if raised else "") in record.changes
    assert all(n.name for n in done.graph.node) and len({n.name for n in done.graph.node}) == len(ops)
    x = {"x": np.random.default_rng(7).standard_normal((2, 3, 5, 5)).astype(np.float32) * 4}
    assert np.allclose(ort_run(done, x)[0], ort_run(model, x)[0], atol=1e-5)


@pytest.mark.parametrize("case", [dict(b=5.0), dict(lo=-1.0), dict(second_reader=True)])
def test_a_clip_that_is_not_a_hard_swish_stays(case):
    """Not fused: a divisor other than the Clip's upper bound, a lower bound other than 0, an
    intermediate tensor read elsewhere (here a graph output)."""
    model = _hard_swish(**case)
    if "b" in case:  # the Clip's bound and the divisor are both b: make them differ
        model.graph.initializer.append(numpy_helper.from_array(np.array(6.0, np.float32), "six"))
        next(n for n in model.graph.node if n.name == "clip").input[2] = "six"
    done, record = normalize_checked(model, source="hswish.onnx")
    assert "Clip" in [n.op_type for n in done.graph.node]
    assert not any("hard-swish" in c for c in record.changes)


def test_hard_swish_stays_two_ops_where_opset_14_would_change_a_node():
    """A training-mode BatchNormalization (extra outputs) means something else at opset 14: the
    model stays at 13 and the pattern becomes x * HardSigmoid(x)."""
    from ampq_pass.core.normalize import FuseHardSwish

    model = _hard_swish("paddle", 13)
    g = model.graph
    params = [("bn_scale", 1), ("bn_bias", 0), ("bn_mean", 0), ("bn_var", 1)]
    g.initializer.extend(numpy_helper.from_array(np.full(3, v, np.float32), k) for k, v in params)
    g.node.append(helper.make_node("BatchNormalization", ["x", *(k for k, _ in params)], ["bn", "rm", "rv"], name="bn"))
    done = FuseHardSwish()(model).model
    assert default_opset(done) == 13
    assert [n.op_type for n in done.graph.node] == ["Conv", "HardSigmoid", "Mul", "BatchNormalization"]
