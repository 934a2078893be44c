"""The torch executor against ONNX Runtime, its unsupported-op report, and its gradients."""

from __future__ import annotations

from pathlib import Path

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


# ----------------------------------------------------------------------------- what exporters emit (issue 12)

I64, BOOL, U8 = TensorProto.INT64, TensorProto.BOOL, TensorProto.UINT8
_EMPTY = numpy_helper.from_array(np.zeros(0, np.float32), "roi")


def _rng_floats(shape, seed=0, lo=None, hi=None):
    rng = np.random.default_rng(seed)
    if lo is not None:
        return rng.uniform(lo, hi, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def C(op, inputs, outputs=(("y", F32),), attrs=None, inits=(), opset=18, feeds=None, grad=True, tol=1e-5):
    """One op-parity case: node inputs (name, type, shape) fed at run time, initializers after them."""
    return dict(op=op, inputs=inputs, outputs=list(outputs), attrs=attrs or {}, inits=list(inits), opset=opset,
                feeds=feeds or {}, grad=grad, tol=tol)


def _lstm_weights(dirs, hidden, size, gates, seed, peephole=False):
    rng = np.random.default_rng(seed)
    w = [_floats("W", rng.standard_normal((dirs, gates * hidden, size)) * 0.5),
         _floats("R", rng.standard_normal((dirs, gates * hidden, hidden)) * 0.5),
         _floats("B", rng.standard_normal((dirs, 2 * gates * hidden)) * 0.5)]
    return w


X3 = ("x", F32, [2, 3, 4])
_SEQ = ("x", F32, [5, 3, 4])  # [T, N, I]
_H0 = lambda dirs: ("h0", F32, [dirs, 3, 6])  # noqa: E731
_C0 = lambda dirs: ("c0", F32, [dirs, 3, 6])  # noqa: E731

EXPORTER_OPS = {
    # indexing
    "gather_nd": C("GatherND", [X3], inits=[_ints("i", [[0, 1], [1, -1], [-2, 0]])]),
    "gather_nd_batch_dims": C("GatherND", [X3], attrs=dict(batch_dims=1), inits=[_ints("i", [[[2], [0]], [[1], [1]]])]),
    "scatter_nd": C("ScatterND", [("x", F32, [4, 3]), ("u", F32, [2])], inits=[_ints("i", [[0, 1], [-1, 2]])]) | dict(order=["x", "i", "u"]),
    "scatter_nd_add": C("ScatterND", [("x", F32, [4, 3]), ("u", F32, [3, 3])], attrs=dict(reduction="add"),
                        inits=[_ints("i", [[1], [3], [1]])]) | dict(order=["x", "i", "u"]),
    "scatter_nd_max": C("ScatterND", [("x", F32, [4, 3]), ("u", F32, [2, 3])], attrs=dict(reduction="max"),
                        inits=[_ints("i", [[1], [2]])]) | dict(order=["x", "i", "u"]),
    "scatter_elements": C("ScatterElements", [("x", F32, [2, 3]), ("u", F32, [2, 2])], attrs=dict(axis=1),
                          inits=[_ints("i", [[1, 0], [2, -1]])]) | dict(order=["x", "i", "u"]),
    "scatter_elements_mul": C("ScatterElements", [("x", F32, [2, 3]), ("u", F32, [2, 2])],
                              attrs=dict(axis=1, reduction="mul"), inits=[_ints("i", [[1, 1], [2, 0]])])
    | dict(order=["x", "i", "u"]),
    "one_hot": C("OneHot", [("i", I64, [2, 3])], attrs=dict(axis=1), grad=False,
                 inits=[_ints("depth", [4]), _floats("values", [-1, 2])],
                 feeds={"i": np.array([[0, 3, -1], [2, 7, 1]], np.int64)}),
    "non_zero": C("NonZero", [("x", F32, [3, 4])], [("y", I64)], grad=False,
                  feeds={"x": np.array([[0, 1, 0, 2], [3, 0, 0, 0], [0, 0, 4, 5]], np.float32)}),
    "top_k": C("TopK", [X3], [("y", F32), ("yi", I64)], attrs=dict(axis=1), inits=[_ints("k", [2])]),
    "top_k_smallest": C("TopK", [X3], [("y", F32), ("yi", I64)], attrs=dict(axis=-1, largest=0), inits=[_ints("k", [3])]),
    "einsum": C("Einsum", [X3, ("w", F32, [4, 5])], attrs=dict(equation="bij,jk->bik")),
    "range_float": C("Range", [], grad=False, inits=[_floats("s", 1.5), _floats("l", 7.0), _floats("d", 0.75)]),
    "range_int": C("Range", [], [("y", I64)], grad=False, inits=[_ints("s", 10), _ints("l", 1), _ints("d", -3)]),
    "tile": C("Tile", [X3], inits=[_ints("r", [2, 1, 3])]),
    "depth_to_space_dcr": C("DepthToSpace", [("x", F32, [2, 8, 2, 3])], attrs=dict(blocksize=2)),
    "depth_to_space_crd": C("DepthToSpace", [("x", F32, [2, 8, 2, 3])], attrs=dict(blocksize=2, mode="CRD")),
    "space_to_depth": C("SpaceToDepth", [("x", F32, [2, 2, 4, 6])], attrs=dict(blocksize=2)),
    # pads in every mode, on any axis, negative pads crop
    "pad_edge": C("Pad", [X4], attrs=dict(mode="edge"), inits=[_ints("pads", [1, 0, 2, 1, 0, 2, 1, 3])]),
    "pad_wrap": C("Pad", [X4], attrs=dict(mode="wrap"), opset=19, inits=[_ints("pads", [0, 1, 2, 1, 1, 0, 1, 4])]),
    "pad_reflect_batch_axis": C("Pad", [X4], attrs=dict(mode="reflect"), inits=[_ints("pads", [1, 2, 0, 0, 0, 1, 0, 0])]),
    "pad_negative": C("Pad", [X4], inits=[_ints("pads", [0, 0, -1, 2, 0, 0, 1, -2]), _floats("v", 1.5)]),
    # elementwise
    "erf": C("Erf", [X3]), "gelu_tanh": C("Gelu", [X3], attrs=dict(approximate="tanh"), opset=20),
    "gelu": C("Gelu", [X3], opset=20), "mish": C("Mish", [X3]), "softplus": C("Softplus", [X3]),
    "softsign": C("Softsign", [X3]), "hard_sigmoid": C("HardSigmoid", [X3], attrs=dict(alpha=0.3, beta=0.4)),
    "selu": C("Selu", [X3]), "celu": C("Celu", [X3], attrs=dict(alpha=0.7)),
    "thresholded_relu": C("ThresholdedRelu", [X3], attrs=dict(alpha=0.3)),
    "shrink": C("Shrink", [X3], attrs=dict(lambd=0.4, bias=0.1)),
    "sign": C("Sign", [X3], grad=False), "floor": C("Floor", [X3], grad=False), "ceil": C("Ceil", [X3], grad=False),
    "round_half_even": C("Round", [X3], grad=False, feeds={"x": (np.arange(24).reshape(2, 3, 4) / 2 - 6).astype(np.float32)}),
    "atan": C("Atan", [X3]), "tan": C("Tan", [X3]), "sinh": C("Sinh", [X3]), "cosh": C("Cosh", [X3]),
    "asin": C("Asin", [X3], feeds={"x": _rng_floats([2, 3, 4], lo=-0.9, hi=0.9)}),
    "acosh": C("Acosh", [X3], feeds={"x": _rng_floats([2, 3, 4], lo=1.1, hi=3)}),
    "mod_int": C("Mod", [("a", I64, [6]), ("b", I64, [6])], [("y", I64)], grad=False,
                 feeds={"a": np.array([7, -7, 7, -7, 5, 0], np.int64), "b": np.array([3, 3, -3, -3, 5, 2], np.int64)}),
    "mod_fmod": C("Mod", [X3, ("b", F32, [4])], attrs=dict(fmod=1), grad=False,
                  feeds={"b": np.array([0.7, -1.3, 2.0, 0.4], np.float32)}),
    "bit_shift": C("BitShift", [("a", U8, [4]), ("b", U8, [4])], [("y", U8)], attrs=dict(direction="LEFT"), grad=False,
                   feeds={"a": np.array([1, 3, 255, 16], np.uint8), "b": np.array([0, 2, 1, 3], np.uint8)}),
    "is_nan": C("IsNaN", [("x", F32, [5])], [("y", BOOL)], grad=False,
                feeds={"x": np.array([0, np.nan, np.inf, -np.inf, 1], np.float32)}),
    "is_inf_negative_only": C("IsInf", [("x", F32, [5])], [("y", BOOL)], attrs=dict(detect_positive=0), grad=False,
                              feeds={"x": np.array([0, np.nan, np.inf, -np.inf, 1], np.float32)}),
    "xor": C("Xor", [("a", BOOL, [4]), ("b", BOOL, [4])], [("y", BOOL)], grad=False,
             feeds={"a": np.array([0, 0, 1, 1], bool), "b": np.array([0, 1, 0, 1], bool)}),
    "or_broadcast": C("Or", [("a", BOOL, [2, 1]), ("b", BOOL, [3])], [("y", BOOL)], grad=False,
                      feeds={"a": np.array([[0], [1]], bool), "b": np.array([0, 1, 0], bool)}),
    "max_variadic": C("Max", [X3, ("b", F32, [4]), ("c", F32, [3, 1])]),
    "min_variadic": C("Min", [X3, ("b", F32, [3, 4])]),
    "sum_variadic": C("Sum", [X3, ("b", F32, [4]), ("c", F32, [2, 1, 1])]),
    "mean_variadic": C("Mean", [X3, ("b", F32, [1, 3, 1])]),
    "argmin": C("ArgMin", [X3], [("y", I64)], attrs=dict(axis=-1, keepdims=1), grad=False),
    # reductions
    "reduce_l1": C("ReduceL1", [X3], inits=[_ints("axes", [1])]),
    "reduce_l2": C("ReduceL2", [X3], attrs=dict(keepdims=0), inits=[_ints("axes", [0, 2])]),
    "reduce_log_sum_exp": C("ReduceLogSumExp", [X3], inits=[_ints("axes", [-1])]),
    "reduce_log_sum": C("ReduceLogSum", [X3], inits=[_ints("axes", [1])], feeds={"x": _rng_floats([2, 3, 4], lo=0.1, hi=2)}),
    "reduce_prod": C("ReduceProd", [X3], inits=[_ints("axes", [0, 2])]),
    "reduce_log_sum_exp_opset13": C("ReduceLogSumExp", [X3], attrs=dict(axes=[1], keepdims=0), opset=13),
    # normalisation
    "group_norm": C("GroupNormalization", [("x", F32, [2, 6, 3, 2])], attrs=dict(num_groups=3, epsilon=1e-3), opset=21,
                    inits=[_floats("s", np.linspace(0.5, 2, 6)), _floats("b", np.linspace(-1, 1, 6))]),
    "layer_norm_stats": C("LayerNormalization", [X3], [("y", F32), ("mean", F32), ("inv", F32)], attrs=dict(axis=1),
                          inits=[_floats("s", np.linspace(0.5, 2, 12).reshape(3, 4)), _floats("b", np.ones((3, 4)))]),
    "instance_norm_3d": C("InstanceNormalization", [X3], inits=[_floats("s", [1, 2, 3]), _floats("b", [0, 1, 0])]),
    "lp_normalization": C("LpNormalization", [X3], attrs=dict(axis=1, p=2)),
    "lrn_wide": C("LRN", [("x", F32, [2, 5, 3, 2])], attrs=dict(size=5, alpha=0.1, beta=0.6, bias=1.5)),
    "lrn": C("LRN", [("x", F32, [2, 5, 3, 2])], attrs=dict(size=3)),
    # shapes
    "dropout_ratio": C("Dropout", [X3], [("y", F32), ("mask", BOOL)], inits=[_floats("r", 0.3)]),
    "shape_start_end": C("Shape", [X4], [("y", I64)], attrs=dict(start=1, end=-1), opset=15, grad=False),
    "size": C("Size", [X4], [("y", I64)], grad=False),
    "squeeze_attr": C("Squeeze", [("x", F32, [2, 1, 3, 1])], attrs=dict(axes=[-1, 1]), opset=11),
    "squeeze_input": C("Squeeze", [("x", F32, [2, 1, 3, 1])], inits=[_ints("a", [3])], opset=13),
    "unsqueeze_attr": C("Unsqueeze", [X3], attrs=dict(axes=[0, -1]), opset=11),
    "unsqueeze_input": C("Unsqueeze", [X3], inits=[_ints("a", [1, 4])], opset=13),
    "split_attr": C("Split", [X4], [("y0", F32), ("y1", F32)], attrs=dict(axis=3, split=[2, 4]), opset=11),
    "split_input": C("Split", [X4], [("y0", F32), ("y1", F32), ("y2", F32)], attrs=dict(axis=2),
                     inits=[_ints("s", [1, 3, 1])], opset=13),
    "split_equal": C("Split", [X4], [("y0", F32), ("y1", F32)], attrs=dict(axis=1), opset=13, feeds={}, inits=[],
                     grad=True) | dict(inputs=[("x", F32, [2, 4, 5, 6])]),
    # resize: the coordinate and nearest modes exporters write
    "resize_nearest_asymmetric_floor": C("Resize", [X4], grad=False, attrs=dict(
        mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        inits=[_EMPTY, _floats("scales", [1, 1, 2, 2])]),
    "resize_nearest_pytorch_half_pixel": C("Resize", [X4], grad=False, attrs=dict(
        mode="nearest", coordinate_transformation_mode="pytorch_half_pixel", nearest_mode="round_prefer_floor"),
        inits=[_EMPTY, _floats("scales", [1, 1, 1.5, 0.5])]),
    "resize_nearest_align_corners_prefer_ceil": C("Resize", [X4], grad=False, attrs=dict(
        mode="nearest", coordinate_transformation_mode="align_corners", nearest_mode="round_prefer_ceil"),
        inits=[_EMPTY, _floats("scales", [1, 1, 2, 1.5])]),
    "resize_nearest_tf_half_pixel": C("Resize", [X4], grad=False, attrs=dict(
        mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn"),
        inits=[_EMPTY, _floats("scales", [1, 1, 3, 0.5])]),
    "resize_nearest_half_pixel_symmetric": C("Resize", [X4], grad=False, opset=19, attrs=dict(
        mode="nearest", coordinate_transformation_mode="half_pixel_symmetric"),
        inits=[_EMPTY, _floats("scales", [1, 1, 1.7, 0.6])]),
    "resize_linear_half_pixel_symmetric": C("Resize", [X4], opset=19, attrs=dict(
        mode="linear", coordinate_transformation_mode="half_pixel_symmetric"),
        inits=[_EMPTY, _floats("scales", [1, 1, 2.5, 0.7])]),
    "resize_linear_half_pixel": C("Resize", [X4], attrs=dict(mode="linear"), inits=[_EMPTY, _floats("scales", [1, 1, 2, 2])]),
    "resize_cubic_asymmetric": C("Resize", [X4], attrs=dict(mode="cubic", coordinate_transformation_mode="asymmetric"),
                                 inits=[_EMPTY, _floats("scales", [1, 1, 2, 0.5])], tol=1e-4),
    "resize_linear_axes_sizes": C("Resize", [X4], attrs=dict(mode="linear", axes=[3, 2]), inits=[
        _EMPTY, numpy_helper.from_array(np.zeros(0, np.float32), "scales"), _ints("sizes", [9, 4])]),
    "resize_keep_aspect_not_larger": C("Resize", [X4], grad=False, attrs=dict(
        mode="nearest", axes=[2, 3], keep_aspect_ratio_policy="not_larger"), inits=[
        _EMPTY, numpy_helper.from_array(np.zeros(0, np.float32), "scales"), _ints("sizes", [10, 9])]),
    "resize_tf_crop_and_resize": C("Resize", [X4], attrs=dict(
        mode="linear", coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-3.0),
        inits=[_floats("roi", [0, 0, 0.1, -0.2, 1, 1, 0.8, 1.3]), _floats("scales", [1, 1, 1.4, 1.5])]),
    # recurrent layers: directions, initial states, sequence lengths, peepholes, layouts
    "lstm_forward_initial_states": C("LSTM", [_SEQ, _H0(1), _C0(1)], [("Y", F32), ("Yh", F32), ("Yc", F32)],
                                     attrs=dict(hidden_size=6),
                                     inits=_lstm_weights(1, 6, 4, 4, 0)) | dict(order=["x", "W", "R", "B", "", "h0", "c0"]),
    "lstm_reverse": C("LSTM", [_SEQ], [("Y", F32), ("Yh", F32), ("Yc", F32)], attrs=dict(hidden_size=6, direction="reverse"),
                      inits=_lstm_weights(1, 6, 4, 4, 1)),
    "lstm_bidirectional_lens_peephole": C(
        "LSTM", [_SEQ, ("lens", TensorProto.INT32, [3]), _H0(2), _C0(2)], [("Y", F32), ("Yh", F32), ("Yc", F32)],
        attrs=dict(hidden_size=6, direction="bidirectional"),
        inits=[*_lstm_weights(2, 6, 4, 4, 2), _floats("P", np.random.default_rng(9).standard_normal((2, 18)) * 0.3)],
        feeds={"lens": np.array([5, 2, 4], np.int32)}, tol=1e-4) | dict(order=["x", "W", "R", "B", "lens", "h0", "c0", "P"]),
    "gru_linear_before_reset": C("GRU", [_SEQ, _H0(1)], [("Y", F32), ("Yh", F32)],
                                 attrs=dict(hidden_size=6, linear_before_reset=1), inits=_lstm_weights(1, 6, 4, 3, 4))
    | dict(order=["x", "W", "R", "B", "", "h0"]),
    "gru_bidirectional": C("GRU", [_SEQ, _H0(2)], [("Y", F32), ("Yh", F32)],
                           attrs=dict(hidden_size=6, direction="bidirectional"), inits=_lstm_weights(2, 6, 4, 3, 5))
    | dict(order=["x", "W", "R", "B", "", "h0"]),
    "gru_reverse_lens": C("GRU", [_SEQ, ("lens", TensorProto.INT32, [3])], [("Y", F32), ("Yh", F32)],
                          attrs=dict(hidden_size=6, direction="reverse"), inits=_lstm_weights(1, 6, 4, 3, 6),
                          feeds={"lens": np.array([3, 5, 1], np.int32)}) | dict(order=["x", "W", "R", "B", "lens"]),
    "rnn_bidirectional": C("RNN", [_SEQ, _H0(2)], [("Y", F32), ("Yh", F32)],
                           attrs=dict(hidden_size=6, direction="bidirectional"), inits=_lstm_weights(2, 6, 4, 1, 7))
    | dict(order=["x", "W", "R", "B", "", "h0"]),
}


def _case_model(case):
    order = case.get("order") or [i[0] for i in case["inputs"]] + [t.name for t in case["inits"]]
    node = helper.make_node(case["op"], order, [o[0] for o in case["outputs"]], name="n0", **case["attrs"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in case["inputs"]],
                              [helper.make_tensor_value_info(n, t, None) for n, t in case["outputs"]], case["inits"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case["opset"])])
    model.ir_version = 8
    return model


def _case_feeds(case):
    feeds = {}
    for seed, (name, _, shape) in enumerate(case["inputs"]):
        feeds[name] = case["feeds"][name] if name in case["feeds"] else _rng_floats(shape, seed)
    return feeds


@pytest.mark.parametrize("case", sorted(EXPORTER_OPS))
def test_exporter_op_parity_and_gradients(case):
    spec = EXPORTER_OPS[case]
    model, feeds = _case_model(spec), _case_feeds(spec)
    refs = ort_outputs(model, feeds)
    with torch.no_grad():
        ours = Executor(model).run(feeds)
    assert list(ours) == [o[0] for o in spec["outputs"]]
    for out, ref in zip(ours.values(), refs):
        assert tuple(out.shape) == ref.shape, case
        if ref.dtype in (np.float32, np.float64):
            assert out.dtype == torch.float32, case
            assert max_rel_diff(out.numpy(), ref) <= spec["tol"], case
        else:
            assert out.numpy().dtype == ref.dtype and (out.numpy() == ref).all(), case
    if not spec["grad"]:
        return
    # gradients reach the first float input and match finite differences (float64)
    ex = Executor(model, dtype=torch.float64)
    name = spec["inputs"][0][0]

    def loss(x):
        out = ex.run({**feeds, name: x})[spec["outputs"][0][0]]
        return (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)).sum()

    x = torch.tensor(feeds[name], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(x), [x])
    assert float(grad.abs().max()) > 0, case
    with torch.no_grad():
        _directional_check(lambda v: float(loss(v)), x.detach(), grad)


@pytest.mark.parametrize("op, gates, outs", [("LSTM", 4, 3), ("GRU", 3, 2)])
def test_recurrent_batch_first_layout_matches_sequence_first(op, gates, outs):
    # ONNX Runtime has no layout=1 kernel: check it against layout=0 (checked against ONNX Runtime above)
    names = [("Y", F32), ("Yh", F32), ("Yc", F32)][:outs]
    states = [("h0", F32, [2, 3, 6]), ("c0", F32, [2, 3, 6])][:outs - 1]
    base = C(op, [_SEQ, *states], names, attrs=dict(hidden_size=6, direction="bidirectional"),
             inits=_lstm_weights(2, 6, 4, gates, 8)) | dict(order=["x", "W", "R", "B", "", *[s[0] for s in states]])
    feeds = _case_feeds(base)
    batch_first = dict(base, attrs=dict(base["attrs"], layout=1))
    seq = Executor(_case_model(base)).run(feeds)
    bf = Executor(_case_model(batch_first)).run({k: np.swapaxes(v, 0, 1) for k, v in feeds.items()})
    assert torch.equal(bf["Y"], seq["Y"].permute(2, 0, 1, 3))
    for name in [n for n, _ in names[1:]]:
        assert torch.equal(bf[name], seq[name].transpose(0, 1))


def _if_model(cond_nodes, then_nodes, else_nodes, inputs, inits=()):
    """y = If(cond) of two branches; the branches read x and an initializer of the enclosing graph."""
    def branch(nodes, tag):
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_y", F32, None)])
    node = helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=branch(then_nodes, "then"),
                            else_branch=branch(else_nodes, "else"))
    graph = helper.make_graph([*cond_nodes, node, helper.make_node("Mul", ["y", "x"], ["z"], name="after")], "g",
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info("z", F32, None)], [_floats("w", [0.5, -2, 3]), *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


_THEN = [helper.make_node("Mul", ["x", "w"], ["t1"], name="then_mul"), helper.make_node("Tanh", ["t1"], ["then_y"], name="then_tanh")]
_ELSE = [helper.make_node("Sigmoid", ["x"], ["e1"], name="else_sigmoid"),
         helper.make_node("Add", ["e1", "w"], ["else_y"], name="else_add")]


@pytest.mark.parametrize("rate", [16000, 8000])
def test_if_with_a_setting_runs_the_chosen_branch(rate):
    # silero-vad's pattern: If(Equal(sr, 16000)), sr a scalar integer input; nested: a shape-fixed If inside
    inner = helper.make_node("If", ["shape_cond"], ["then_y"], name="inner_if",
                             then_branch=helper.make_graph([helper.make_node("Tanh", ["t1"], ["in_y"], name="in_tanh")],
                                                           "in_then", [], [helper.make_tensor_value_info("in_y", F32, None)]),
                             else_branch=helper.make_graph([helper.make_node("Neg", ["t1"], ["in_n"], name="in_neg")],
                                                           "in_else", [], [helper.make_tensor_value_info("in_n", F32, None)]))
    then = [helper.make_node("Mul", ["x", "w"], ["t1"], name="then_mul"),
            helper.make_node("Shape", ["x"], ["shp"], name="then_shape"),
            helper.make_node("ReduceSum", ["shp"], ["n"], name="then_n", keepdims=0),
            helper.make_node("Greater", ["n", "five"], ["shape_cond"], name="then_gt"), inner]
    model = _if_model([helper.make_node("Equal", ["sr", "k"], ["cond"], name="eq")], then, _ELSE,
                      [("x", F32, [2, 3]), ("sr", I64, [])], [_ints("k", 16000), _ints("five", 4)])
    assert unsupported_ops(model) == {}
    feeds = {"x": _rng_floats([2, 3]), "sr": np.array(rate, np.int64)}
    (ref,) = ort_outputs(model, feeds)
    ex = Executor(model, dtype=torch.float64)
    x = torch.tensor(feeds["x"], dtype=torch.float64, requires_grad=True)
    seen = []
    hooks = {name: (lambda s, t, name=name: seen.append(name) or t) for name in ("in_tanh", "else_add", "then_mul")}
    z = ex.run({**feeds, "x": x}, input_hooks=hooks)["z"]
    assert max_rel_diff(z.detach().numpy(), ref) <= 1e-6
    assert seen == (["then_mul", "then_mul", "in_tanh"] if rate == 16000 else ["else_add", "else_add"])
    (grad,) = torch.autograd.grad((z * z).sum(), [x])  # through the branch and the outer Mul
    with torch.no_grad():
        _directional_check(lambda v: float((ex.run({**feeds, "x": v})["z"] ** 2).sum()), x.detach(), grad)


def test_data_dependent_if_is_refused_naming_the_node():
    cond = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt")]
    model = _if_model(cond, _THEN, _ELSE, [("x", F32, [2, 3])], [_floats("zero", 0.0)])
    assert unsupported_ops(model) == {}
    with pytest.raises(AmpqError, match="data-dependent condition: node 'the_if' \\(condition 'cond'\\)"):
        Executor(model)
    # a condition from the input's shape only is fixed: accepted
    shape_cond = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
                  helper.make_node("ReduceSum", ["s"], ["n"], name="n", keepdims=0),
                  helper.make_node("Greater", ["n", "four"], ["cond"], name="gt")]
    fixed = _if_model(shape_cond, _THEN, _ELSE, [("x", F32, [2, 3])], [_ints("four", 4)])
    feeds = {"x": _rng_floats([2, 3])}
    assert max_rel_diff(Executor(fixed).run(feeds)["z"].numpy(), ort_outputs(fixed, feeds)[0]) <= 1e-6


def test_unsupported_ops_inside_branches_are_named():
    model = _if_model([helper.make_node("Equal", ["sr", "k"], ["cond"], name="eq")],
                      [helper.make_node("FancyOp", ["x"], ["then_y"], name="fancy_in_then")], _ELSE,
                      [("x", F32, [2, 3]), ("sr", I64, [])], [_ints("k", 1)])
    assert unsupported_ops(model) == {"FancyOp": "fancy_in_then"}
    with pytest.raises(AmpqError, match="FancyOp \\(e.g. node 'fancy_in_then'\\)"):
        Executor(model)


_SILERO = Path(__file__).resolve().parents[2] / "benchmarks/corpus/models/silero_vad/model.onnx"


@pytest.mark.skipif(not _SILERO.is_file(), reason="corpus model not fetched (benchmarks/corpus)")
def test_silero_vad_if_and_lstm_match_onnxruntime_with_gradients():
    from ampq_pass.core.model import load_model

    model = load_model(_SILERO)
    rng = np.random.default_rng(0)
    feeds = {"input": (rng.standard_normal((3, 512)) * 0.1).astype(np.float32),
             "state": (rng.standard_normal((2, 3, 128)) * 0.1).astype(np.float32), "sr": np.array(16000, np.int64)}
    refs = ort_outputs(model, feeds)
    ex = Executor(model, dtype=torch.float64)
    x = torch.tensor(feeds["input"], dtype=torch.float64, requires_grad=True)
    outs = ex.run({**feeds, "input": x})
    for out, ref in zip(outs.values(), refs):
        assert max_rel_diff(out.detach().numpy(), ref) <= 1e-4
    (grad,) = torch.autograd.grad(outs["output"].sum(), [x])
    assert float(grad.abs().max()) > 0


_GRID = ("g", F32, [2, 4, 5, 2])
GRID_SAMPLE = {
    "bilinear_zeros": dict(mode="bilinear"),
    "bilinear_border_align": dict(mode="bilinear", padding_mode="border", align_corners=1),
    "nearest_reflection": dict(mode="nearest", padding_mode="reflection"),
    "bicubic_border": dict(mode="bicubic", padding_mode="border"),
}


@pytest.mark.parametrize("case", sorted(GRID_SAMPLE))
def test_grid_sample(case):
    spec = C("GridSample", [X4, _GRID], attrs=GRID_SAMPLE[case], opset=16, grad=GRID_SAMPLE[case]["mode"] != "nearest",
             feeds={"g": _rng_floats([2, 4, 5, 2], 3, lo=-1.3, hi=1.3)}, tol=1e-4)
    model, feeds = _case_model(spec), _case_feeds(spec)
    (ref,) = ort_outputs(model, feeds)
    ours = Executor(model, dtype=torch.float64)
    x = torch.tensor(feeds["x"], dtype=torch.float64, requires_grad=True)
    y = ours.run({**feeds, "x": x})["y"]
    assert max_rel_diff(y.detach().numpy(), ref) <= spec["tol"], case
    if spec["grad"]:
        (grad,) = torch.autograd.grad((y * y).sum(), [x])
        assert float(grad.abs().max()) > 0
