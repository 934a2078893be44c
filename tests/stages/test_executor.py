"""The torch executor against ONNX Runtime, its unsupported-op report, and its gradients."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import models
from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.sensitivity.executor import OPS, Executor, unsupported_ops

torch.set_num_threads(1)


def ort_outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def max_rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| relative to the largest |ref| (elementwise ratios blow up near 0)."""
    return float(np.abs(ours.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture(scope="module")
def llama_model():
    return models.llama_decoder()


def llama_feeds(n=4, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, seq), np.int64)
    mask[: n // 2, :3] = 0  # left padding (a causal model never sees right padding) on half the batch
    return {"input_ids": rng.integers(0, 128, (n, seq)).astype(np.int64), "attention_mask": mask}


@pytest.mark.parametrize("name", ["block", "cnn", "feature_cnn", "llama", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_with_onnxruntime(name, dtype, block_model, cnn_model, mlp_model, llama_model):
    model = {"block": block_model, "cnn": cnn_model, "mlp": mlp_model, "llama": llama_model,
             "feature_cnn": models.feature_cnn()}[name]
    feeds = llama_feeds() if name == "llama" else models.feeds_for(model, n=4)
    refs = ort_outputs(model, feeds)
    with torch.no_grad():
        ours = Executor(model, dtype=dtype).run(feeds)
    assert list(ours) == [o.name for o in model.graph.output]
    for out, ref in zip(ours.values(), refs):
        assert out.dtype == dtype
        assert out.shape == ref.shape
        assert max_rel_diff(out.numpy(), ref) <= 1e-4


def test_llama_padding_changes_logits(llama_model):
    # The mask path (Range/Expand/Where/IsNaN...) must actually act, not only match a trivial case.
    feeds = llama_feeds()
    unmasked = dict(feeds, attention_mask=np.ones_like(feeds["attention_mask"]))
    ex = Executor(llama_model)
    with torch.no_grad():
        a, b = ex.run(feeds)["logits"], ex.run(unmasked)["logits"]
    assert torch.allclose(a[2:], b[2:])  # unpadded rows: same
    assert not torch.allclose(a[:2, 3:], b[:2, 3:])  # padded rows attend to fewer keys


# ----------------------------------------------------------------------------- single ops vs ORT

def _single(op, inputs, outputs, attrs=None, inits=(), opset=18):
    graph = helper.make_graph([helper.make_node(op, [i[0] for i in inputs] + [t.name for t in inits],
                                                [o[0] for o in outputs], name="n0", **(attrs or {}))],
                              "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _ints(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _floats(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


F32, X4 = TensorProto.FLOAT, ("x", TensorProto.FLOAT, [2, 3, 5, 6])

SINGLE_OPS = {
    "resize_nearest_round_floor": ("Resize", [X4], dict(mode="nearest", coordinate_transformation_mode="half_pixel"),
                                   [numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
                                    _floats("scales", [1, 1, 1.7, 0.6])]),
    "resize_nearest_ceil_sizes": ("Resize", [X4], dict(mode="nearest", nearest_mode="ceil",
                                                       coordinate_transformation_mode="asymmetric"),
                                  [numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
                                   numpy_helper.from_array(np.zeros(0, np.float32), "scales"),
                                   _ints("sizes", [2, 3, 9, 4])]),
    "resize_linear_align_corners": ("Resize", [X4], dict(mode="linear", coordinate_transformation_mode="align_corners"),
                                    [numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
                                     _floats("scales", [1, 1, 2, 1.5])]),
    "resize_linear_pytorch_down": ("Resize", [X4], dict(mode="linear",
                                                        coordinate_transformation_mode="pytorch_half_pixel"),
                                   [numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
                                    _floats("scales", [1, 1, 0.5, 0.5])]),
    "resize_cubic": ("Resize", [X4], dict(mode="cubic", coordinate_transformation_mode="half_pixel"),
                     [numpy_helper.from_array(np.zeros(0, np.float32), "roi"), _floats("scales", [1, 1, 2, 2])]),
    "resize_cubic_exclude": ("Resize", [X4], dict(mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5),
                             [numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
                              _floats("scales", [1, 1, 1.5, 2])]),
    "maxpool_asym_ceil": ("MaxPool", [X4], dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1), []),
    "maxpool_same": ("MaxPool", [X4], dict(kernel_shape=[3, 2], auto_pad="SAME_UPPER", strides=[2, 2]), []),
    "maxpool_dilated": ("MaxPool", [X4], dict(kernel_shape=[2, 2], pads=[1, 1, 0, 1], dilations=[2, 1]), []),
    "avgpool_ceil": ("AveragePool", [X4], dict(kernel_shape=[2, 3], strides=[2, 2], ceil_mode=1), []),
    "avgpool_exclude_pad": ("AveragePool", [X4], dict(kernel_shape=[3, 3], strides=[2, 1], pads=[1, 1, 1, 1]), []),
    "avgpool_include_pad": ("AveragePool", [X4], dict(kernel_shape=[3, 3], pads=[1, 2, 1, 0], count_include_pad=1), []),
    "conv_asym_pads_group": ("Conv", [X4], dict(pads=[0, 1, 2, 1], strides=[2, 1], group=3),
                             [_floats("w", np.random.default_rng(0).standard_normal((6, 1, 3, 2)))]),
    "conv_same_lower": ("Conv", [X4], dict(auto_pad="SAME_LOWER", strides=[2, 2]),
                        [_floats("w", np.random.default_rng(1).standard_normal((4, 3, 2, 3)))]),
    "conv_transpose_pads": ("ConvTranspose", [X4], dict(strides=[2, 3], pads=[1, 0, 0, 2], output_padding=[1, 0]),
                            [_floats("w", np.random.default_rng(2).standard_normal((3, 2, 3, 3)))]),
    "slice_negative_step": ("Slice", [X4], {}, [_ints("starts", [-1, 4]), _ints("ends", [-100, 0]),
                                                _ints("axes", [3, 2]), _ints("steps", [-2, -1])]),
    "slice_clamped": ("Slice", [X4], {}, [_ints("starts", [1, -10]), _ints("ends", [2**62, 3]), _ints("axes", [1, 3])]),
    "pad_reflect": ("Pad", [X4], dict(mode="reflect"), [_ints("pads", [0, 0, 1, 2, 0, 0, 2, 1])]),
    "pad_constant_axes": ("Pad", [X4], {}, [_ints("pads", [1, 2]), _floats("value", 0.5), _ints("axes", [-1])]),
    "split_uneven": ("Split", [X4], dict(axis=2, num_outputs=2), []),
    "cumsum_reverse_exclusive": ("CumSum", [X4], dict(reverse=1, exclusive=1), [_ints("axis", 2)]),
    "trilu_lower": ("Trilu", [X4], dict(upper=0), [_ints("k", 1)]),
    "gather_negative": ("Gather", [X4], dict(axis=2), [_ints("idx", [[-1, 0], [2, -3]])]),
    "reduce_max_axes_input": ("ReduceMax", [X4], dict(keepdims=0), [_ints("axes", [1, -1])]),
    "argmax_last": ("ArgMax", [X4], dict(axis=1, keepdims=0, select_last_index=1), []),
    "expand_bidirectional": ("Expand", [("x", F32, [3, 1, 6])], {}, [_ints("shape", [2, 1, 5, 1])]),
    "gemm_trans_alpha": ("Gemm", [("x", F32, [4, 3])], dict(transA=1, transB=1, alpha=0.5, beta=2.0),
                         [_floats("b", np.ones((5, 4))), _floats("c", np.arange(5))]),
    "batchnorm": ("BatchNormalization", [X4], dict(epsilon=1e-3),
                  [_floats("s", [1, 2, 3]), _floats("b", [0, 1, 0]), _floats("m", [0.1, 0, -1]), _floats("v", [1, 4, 2])]),
    "layernorm_axis": ("LayerNormalization", [X4], dict(axis=-2, epsilon=1e-3),
                       [_floats("s", np.linspace(0.5, 1.5, 30).reshape(5, 6))]),
    "softmax": ("Softmax", [X4], dict(axis=1), []),
    "instance_norm": ("InstanceNormalization", [X4], {}, [_floats("s", [1, 2, 3]), _floats("b", [0, 1, 0])]),
}


@pytest.mark.parametrize("case", sorted(SINGLE_OPS))
def test_single_op_parity(case):
    op, inputs, attrs, inits = SINGLE_OPS[case]
    n_out = attrs.get("num_outputs", 1)
    out_type = TensorProto.INT64 if op == "ArgMax" else F32
    model = _single(op, inputs, [(f"y{i}", out_type) for i in range(n_out)], attrs, inits)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, _, s in inputs}
    refs = ort_outputs(model, feeds)
    with torch.no_grad():
        ours = Executor(model).run(feeds)
    for out, ref in zip(ours.values(), refs):
        assert out.shape == ref.shape, case
        assert max_rel_diff(out.numpy(), ref) <= 1e-5, case


def test_integer_division_truncates_like_onnx():
    model = _single("Div", [("a", TensorProto.INT64, [4]), ("b", TensorProto.INT64, [4])], [("y", TensorProto.INT64)])
    feeds = {"a": np.array([7, -7, 9, -9], np.int64), "b": np.array([2, 2, -4, -4], np.int64)}
    assert Executor(model).run(feeds)["y"].tolist() == ort_outputs(model, feeds)[0].tolist() == [3, -3, -2, 2]


# ----------------------------------------------------------------------------- unsupported ops

def test_unsupported_ops_reported_before_compute(monkeypatch, mlp_model):
    model = onnx.ModelProto()
    model.CopyFrom(mlp_model)
    extra = [helper.make_node("FancyOp", ["y"], ["z1"], name="fancy_a"),
             helper.make_node("FancyOp", ["z1"], ["z2"], name="fancy_b"),
             helper.make_node("FusedMatMul", ["z2", "z2"], ["z3"], name="fused", domain="com.microsoft"),
             helper.make_node("Loop", [], ["z4"], name="loop_node")]
    model.graph.node.extend(extra)
    assert unsupported_ops(model) == {"FancyOp": "fancy_a", "com.microsoft.FusedMatMul": "fused",
                                      "Loop": "loop_node"}
    calls = []
    monkeypatch.setitem(OPS, "MatMul", lambda *a: calls.append(a))  # would record any compute
    with pytest.raises(AmpqError) as err:
        Executor(model)
    message = str(err.value)
    for text in ("3 op type(s)", "FancyOp (e.g. node 'fancy_a')", "com.microsoft.FusedMatMul (e.g. node 'fused')",
                 "Loop (e.g. node 'loop_node')"):
        assert text in message
    assert "fancy_b" not in message  # one node name per op type
    assert calls == []


def test_missing_feed_is_an_error(mlp_model):
    with pytest.raises(AmpqError, match="'x' is not fed"):
        Executor(mlp_model).run({})


# ----------------------------------------------------------------------------- gradients

def _directional_check(f, x: torch.Tensor, grad: torch.Tensor, seed: int = 0, h: float = 1e-6) -> None:
    """<grad, v> must equal the central difference of f along a random v (float64)."""
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
    analytic = float((grad * v).sum())
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("name, node, slot", [("block", "/v/MatMul", 1), ("block", "/v/MatMul", 0),
                                              ("cnn", "/block1/conv2/Conv", 1), ("cnn", "/head/Gemm", 0),
                                              ("llama", "/inner/model/layers.0/mlp/down_proj/MatMul", 1)])
def test_gradient_of_layer_weight_and_input(name, node, slot, block_model, cnn_model, llama_model):
    """Replace one node input by a leaf via a hook; its gradient matches finite differences.

    For the input slot the gradient is that of *this consumer's* read only: /v/MatMul shares
    its input with /q and /k, and perturbing only the v read must give the same number.
    """
    model = {"block": block_model, "cnn": cnn_model, "llama": llama_model}[name]
    feeds = llama_feeds(n=2, seq=6) if name == "llama" else models.feeds_for(model, n=2)
    ex = Executor(model, dtype=torch.float64)
    r = {}

    def loss(replacement=None):
        def hook(s, t):
            if s != slot:
                return t
            if replacement is None:
                r["leaf"] = t.detach().clone().requires_grad_(True)
                return r["leaf"]
            return replacement
        out = next(iter(ex.run(feeds, input_hooks={node: hook}).values()))
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        return (out * weights).sum()

    value = loss()
    (grad,) = torch.autograd.grad(value, [r["leaf"]])
    assert float(grad.abs().max()) > 0
    with torch.no_grad():
        _directional_check(lambda x: float(loss(x)), r["leaf"].detach(), grad)


# ----------------------------------------------------------------------------- quantization vs ORT

def _qdq_model(nodes, inits, out_type, opset=19):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", out_type, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 9
    return model


def _fp8(name, values):
    import ml_dtypes

    return numpy_helper.from_array(np.asarray(values, np.float32).astype(ml_dtypes.float8_e4m3fn), name)


def _q(inputs, out="y", **attrs):
    return helper.make_node("QuantizeLinear", inputs, [out], name="q", **attrs)


def _dq(inputs, out="y", **attrs):
    return helper.make_node("DequantizeLinear", inputs, [out], name="dq", **attrs)


_W = np.random.default_rng(3).integers(-128, 128, (2, 3, 4)).astype(np.int8)
QDQ_CASES = {
    # Q alone: exact integer codes (ties round to even, saturation at the type's range)
    "q_int8_zero_point": ([_q(["x", "s", "z"])], [_floats("s", 0.02), numpy_helper.from_array(np.int8(-3), "z")],
                          TensorProto.INT8, 19),
    "q_uint8_default": ([_q(["x", "s"])], [_floats("s", 0.5)], TensorProto.UINT8, 19),
    "q_int8_per_axis": ([_q(["x", "s", "z"], axis=1)],
                        [_floats("s", [0.01, 0.1, 1.0]), numpy_helper.from_array(np.int8([0, 5, -5]), "z")],
                        TensorProto.INT8, 19),
    # DQ of a weight with a per-axis / blocked scale and an int8 zero point
    "dq_int8_per_axis": ([_dq(["w", "s", "z"], axis=2)],
                         [numpy_helper.from_array(_W, "w"), _floats("s", [0.5, 0.25, 2.0, 1.0]),
                          numpy_helper.from_array(np.int8([1, -2, 0, 3]), "z")], F32, 19),
    "dq_int8_blocked": ([_dq(["w", "s"], axis=2, block_size=2)],
                        [numpy_helper.from_array(_W, "w"), _floats("s", np.linspace(0.1, 1.2, 12).reshape(2, 3, 2))],
                        F32, 21),
    # the fp8 QDQ pair the rewrite emits: saturating e4m3fn, per-tensor activation scale
    "qdq_fp8_saturating": ([_q(["x", "s", "z"], out="xq"), _dq(["xq", "s", "z"])],
                           [_floats("s", 0.004), _fp8("z", 0.0)], F32, 19),
    "dq_fp8_weight_per_axis": ([_dq(["w", "s", "z"], axis=1)],
                               [_fp8("w", np.linspace(-448, 448, 24).reshape(2, 3, 4)),
                                _floats("s", [0.5, 1.0, 2.0]), _fp8("z", np.zeros(3))], F32, 19),
}


@pytest.mark.parametrize("case", sorted(QDQ_CASES))
def test_quantize_dequantize_parity(case):
    nodes, inits, out_type, opset = QDQ_CASES[case]
    model = _qdq_model(nodes, inits, out_type, opset)
    x = (np.random.default_rng(0).standard_normal((2, 3, 4)) * 2).astype(np.float32)
    x.flat[:4] = [0.25, 0.75, -0.25, 1.25]  # halves of the 0.5 scale: round half to even
    (ref,) = ort_outputs(model, {"x": x})
    with torch.no_grad():
        ours = Executor(model).run({"x": x})["y"]
    assert ours.shape == ref.shape
    if out_type == F32:
        assert ours.dtype == torch.float32
        assert max_rel_diff(ours.numpy(), ref) <= 1e-6, case
    else:
        assert ours.numpy().dtype == ref.dtype and (ours.numpy() == ref).all(), case
