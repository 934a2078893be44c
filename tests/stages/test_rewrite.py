import copy

import numpy as np
import onnx
from onnx import numpy_helper
import pytest

import models
from ampq_pass.core.ort import make_session, run
from ampq_pass.core.samples import Samples
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import FORMATS, Int8
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.plan import Plan
from ampq_pass.core.proto import default_opset
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.calibrate import compute_ranges
from hardware import needs_exact_ort_int8


def _setup(model, n=16):
    layers = find_layers(model)
    feeds = models.feeds_for(model, n=n)
    return layers, feeds, compute_ranges(model, layers, Samples(feeds))


def _basic_session(model):
    # ONNX Runtime 1.32's extended optimisations drop a Relu in front of an fp8 QuantizeLinear
    # (valid only when the zero point is the type's minimum, as for uint8): numerics of fp8
    # are checked without them. The CPU backend does not offer fp8 (no fast kernel there).
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_ort_drops_relu_before_fp8_quantize(mlp_model):
    """Documents the ONNX Runtime behaviour above; if this starts failing, ORT fixed it."""
    layers, feeds, ranges = _setup(mlp_model)
    out = rewrite(mlp_model, layers, Plan({"fc3": "fp8_e4m3"}), ranges)
    ref = run(make_session(mlp_model), feeds)[0]
    basic = np.linalg.norm(_basic_session(out).run(None, feeds)[0] - ref) / np.linalg.norm(ref)
    full = np.linalg.norm(run(make_session(out), feeds)[0] - ref) / np.linalg.norm(ref)
    assert basic < 0.1 and full > 0.5


def _optimized_ops(model, tmp_path):
    path = tmp_path / "optimized.onnx"
    make_session(model, optimized_path=str(path))
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_all_hp_is_bit_exact_and_keeps_names(any_model):
    layers, feeds, ranges = _setup(any_model)
    out = rewrite(any_model, layers, Plan.uniform(layers, "hp"), ranges)
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in any_model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in any_model.graph.output]
    for a, b in zip(run(make_session(any_model), feeds), run(make_session(out), feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp16", "bf16"])
def test_uniform_plans_check_run_and_stay_close(any_model, fmt):
    layers, feeds, ranges = _setup(any_model)
    original = any_model.SerializeToString()
    out = rewrite(any_model, layers, Plan.uniform(layers, fmt), ranges)
    assert any_model.SerializeToString() == original  # input untouched
    onnx.checker.check_model(out, full_check=True)
    assert default_opset(out) >= FORMATS[fmt].opset
    assert [o.name for o in out.graph.output] == [o.name for o in any_model.graph.output]
    ref = run(make_session(any_model), feeds)[0]
    got = _basic_session(out).run(None, feeds)[0] if fmt == "fp8_e4m3" else run(make_session(out), feeds)[0]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel < {"int8": 0.1, "fp8_e4m3": 0.15, "fp16": 2e-3, "bf16": 2e-2}[fmt]


@pytest.mark.parametrize("fmt", ["int4", "int4_b128"])
def test_int4_on_matmul_layers(block_model, tmp_path, fmt):
    if fmt == "int4_b128":  # blocks of 128 need K > 128
        block_model = models.transformer_block(d=256)
    layers, feeds, ranges = _setup(block_model)
    taking = [l.name for l in layers if fmt in l.formats]
    assert len(taking) == (6 if fmt == "int4" else 5)  # the block's ff2 has K = 64
    out = rewrite(block_model, layers, Plan({l: fmt for l in taking}), ranges)
    onnx.checker.check_model(out, full_check=True)
    assert default_opset(out) >= 21
    assert _optimized_ops(out, tmp_path).count("MatMulNBits") == len(taking)
    block = FORMATS[fmt].BLOCK
    assert {a.i for n in out.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
            if a.name == "block_size"} == {block}
    ref, got = run(make_session(block_model), feeds)[0], run(make_session(out), feeds)[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.3
    # MatMulNBits computes with the weights the format stores (signed scales and calibrated clip
    # ratios included): the float model with those weights substituted gives the same output
    fake = copy.deepcopy(block_model)
    weights = {t.name: t for t in fake.graph.initializer}
    for l in layers:
        if l.name in taking:
            w = numpy_helper.to_array(weights[l.weight])
            clip = ranges.clip(l.weight, fmt)
            assert clip is not None and np.any(clip < 1)
            weights[l.weight].CopyFrom(numpy_helper.from_array(FORMATS[fmt].fake_weight(w, l.channel_axis, clip),
                                                               l.weight))
    want = run(make_session(fake), feeds)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01


def test_int8_is_fused_into_integer_kernels(mlp_model, cnn_model, block_model, tmp_path):
    def fused(model):
        layers, _, ranges = _setup(model)
        return _optimized_ops(rewrite(model, layers, Plan.uniform(layers, "int8"), ranges), tmp_path)

    ops = fused(block_model)
    assert ops.count("MatMulIntegerToFloat") == 6 and "DequantizeLinear" not in ops
    ops = fused(cnn_model)
    assert ops.count("QLinearConv") == 5 and ops.count("QGemm") == 1
    ops = fused(mlp_model)
    assert ops.count("QGemm") + ops.count("MatMulIntegerToFloat") == 3


@needs_exact_ort_int8
def test_int8_error_within_scale_bound():
    """One MatMul: |y_q - y| <= sum_k |x_k| sw/2 + |W_k| sx/2 + sx sw/4 (per output column)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 20)).astype(np.float32)
    model = models.single_matmul(w)
    x = (rng.standard_normal((32, 48)) * 2 + 0.5).astype(np.float32)
    layers = find_layers(model)
    ranges = compute_ranges(model, layers, Samples({"x": x}))
    out = rewrite(model, layers, Plan({"mm": "int8"}), ranges)
    y, yq = x @ w, run(make_session(out), {"x": x})[0]
    sx, _ = Int8.activation_params(*ranges["x"])
    sw = Int8.weight_scale(w, 1)
    bound = np.abs(x) @ np.broadcast_to(sw / 2, w.shape) + (np.abs(w) * sx / 2).sum(0) + 48 * sx * sw / 4
    err = np.abs(yq - y)
    assert np.all(err <= bound * 1.0001 + 1e-5)
    assert err.max() > 0.01 * bound.max()  # the bound is not vacuous: real error of that order


def test_mixed_plan_touches_only_named_layers(block_model, tmp_path):
    layers, feeds, ranges = _setup(block_model)
    plan = Plan({"/q/MatMul": "int8", "/ff1/MatMul": "int4", "/o/MatMul": "fp16"})
    out = rewrite(block_model, layers, plan, ranges)
    onnx.checker.check_model(out, full_check=True)
    consumers = {n.name: list(n.input) for n in out.graph.node}
    assert consumers["/k/MatMul"] == [i for n in block_model.graph.node if n.name == "/k/MatMul" for i in n.input]
    assert consumers["/q/MatMul"][1].endswith("_int8_dequantized")
    ops = _optimized_ops(out, tmp_path)
    assert ops.count("MatMulIntegerToFloat") == 1 and ops.count("MatMulNBits") == 1
    ref, got = run(make_session(block_model), feeds)[0], run(make_session(out), feeds)[0]
    assert 0 < np.abs(got - ref).max() < 0.5


def test_shared_input_gets_one_qdq_pair(block_model):
    layers, _, ranges = _setup(block_model)
    plan = Plan({n: "int8" for n in ("/q/MatMul", "/k/MatMul", "/v/MatMul")})
    out = rewrite(block_model, layers, plan, ranges)
    assert sum(n.op_type == "QuantizeLinear" for n in out.graph.node) == 1


def test_float_weights_of_quantized_layers_are_dropped(block_model):
    layers, _, ranges = _setup(block_model)
    out = rewrite(block_model, layers, Plan.uniform(layers, "int8"), ranges)
    names = {t.name for t in out.graph.initializer}
    assert not names & {l.weight for l in layers}
    weight_bytes = lambda m: sum(len(t.raw_data) for t in m.graph.initializer)  # noqa: E731
    assert weight_bytes(out) < 0.4 * weight_bytes(block_model)


def test_plan_errors(block_model):
    layers, _, ranges = _setup(block_model)
    with pytest.raises(AmpqError, match=r"node '/q/MatMull' is not a quantizable layer.*did you mean '/q/MatMul'"):
        rewrite(block_model, layers, Plan({"/q/MatMull": "int8"}), ranges)
    with pytest.raises(AmpqError, match=r"unknown format 'int7'"):
        rewrite(block_model, layers, Plan({"/q/MatMul": "int7"}), ranges)
    with pytest.raises(AmpqError, match=r"no calibrated range"):
        rewrite(block_model, layers, Plan({"/q/MatMul": "int8"}), None)


def test_int8_dynamic_is_fused_and_shares_one_dynamic_quantize(block_model, tmp_path):
    layers, feeds, ranges = _setup(block_model)
    out = rewrite(block_model, layers, Plan.uniform(layers, "int8_dyn"), ranges)
    onnx.checker.check_model(out, full_check=True)
    # q, k, v read one tensor: one DynamicQuantizeLinear for the three of them
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in out.graph.node) == 4
    ops = _optimized_ops(out, tmp_path)
    assert ops.count("DynamicQuantizeMatMul") + ops.count("MatMulIntegerToFloat") == 6
    assert "MatMulInteger" not in ops
    ref, got = run(make_session(block_model), feeds)[0], run(make_session(out), feeds)[0]
    assert 0 < np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1
