"""Models "from the wild": the conventions other exporters use, built with onnx.helper.

``wild_cnn`` is the model the issue asks for: opset 12, weights in ``Constant`` nodes and
behind ``Identity``/``Cast``, BatchNormalization after Conv and after a grouped
ConvTranspose, a depthwise Conv, Gemm with ``transB`` on an fp16 weight, one weight shared
by a MatMul and a Gemm(transB), Squeeze/Unsqueeze with opset-12 ``axes`` attributes, and a
symbolic image width so calibration samples can vary in width.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(value, name))


def _bn_params(rng, c: int, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}_gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
            f"{prefix}_beta": rng.uniform(-0.2, 0.2, c).astype(np.float32),
            f"{prefix}_mean": rng.uniform(-0.3, 0.3, c).astype(np.float32),
            f"{prefix}_var": rng.uniform(0.5, 2.0, c).astype(np.float32)}


def wild_cnn(seed: int = 0, opset: int = 12, c: int = 8, height: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    # stem: Conv with weight and bias in Constant nodes, then BatchNorm (params as Constants too)
    nodes.append(_const("stem_w", (rng.standard_normal((c, 3, 3, 3)) / np.sqrt(27)).astype(f32)))
    nodes.append(_const("stem_b", (rng.standard_normal(c) * 0.1).astype(f32)))
    bn1 = _bn_params(rng, c, "bn1")
    nodes.extend(_const(k, v) for k, v in bn1.items())
    nodes.append(helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["stem_y"], name="stem", pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("BatchNormalization", ["stem_y", *bn1], ["bn1_y"], name="bn1", epsilon=1e-3))
    nodes.append(helper.make_node("Relu", ["bn1_y"], ["r1"], name="relu1"))
    # depthwise Conv (group = channels), weight behind an Identity, BN without Conv bias
    inits.append(numpy_helper.from_array((rng.standard_normal((c, 1, 3, 3)) / 3).astype(f32), "dw_w_raw"))
    nodes.append(helper.make_node("Identity", ["dw_w_raw"], ["dw_w"], name="dw_w_identity"))
    bn2 = _bn_params(rng, c, "bn2")
    inits.extend(numpy_helper.from_array(v, k) for k, v in bn2.items())
    # TensorFlow-style "same" padding: a zero Pad, its pads computed from constants, before a VALID conv
    inits.append(numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64), "pad_begin"))
    inits.append(numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64), "pad_end"))
    inits.append(numpy_helper.from_array(np.array(0, f32), "pad_zero"))
    nodes.append(helper.make_node("Concat", ["pad_begin", "pad_end"], ["dw_pads"], name="dw_pads", axis=0))
    nodes.append(helper.make_node("Pad", ["r1", "dw_pads", "pad_zero"], ["r1_padded"], name="dw_pad"))
    nodes.append(helper.make_node("Conv", ["r1_padded", "dw_w"], ["dw_y"], name="depthwise", auto_pad="VALID", group=c))
    nodes.append(helper.make_node("BatchNormalization", ["dw_y", *bn2], ["bn2_y"], name="bn2"))
    # hard-swish as paddle2onnx spells it: x * Clip(x + 3, 0, 6) / 6
    inits.extend(numpy_helper.from_array(np.array(v, f32), k) for k, v in (("three", 3), ("zero", 0), ("six", 6)))
    nodes.append(helper.make_node("Add", ["bn2_y", "three"], ["hs_a"], name="hs_add"))
    nodes.append(helper.make_node("Clip", ["hs_a", "zero", "six"], ["hs_c"], name="hs_clip"))
    nodes.append(helper.make_node("Mul", ["bn2_y", "hs_c"], ["hs_m"], name="hs_mul"))
    nodes.append(helper.make_node("Div", ["hs_m", "six"], ["r2"], name="hs_div"))
    # grouped ConvTranspose (weight [C_in, C_out/group, k, k]), its bias an Add of a [1, C, 1, 1]
    # constant (as paddle2onnx writes it, there a Reshape of the bias: ONNX Runtime cannot infer a
    # Reshape's shape from external data, and test_large saves this model all external), then BatchNorm
    groups, c_up = 2, c // 2
    inits.append(numpy_helper.from_array((rng.standard_normal((c, c_up // groups, 2, 2)) / 2).astype(f32), "up_w"))
    inits.append(numpy_helper.from_array((rng.standard_normal((1, c_up, 1, 1)) * 0.1).astype(f32), "up_b"))
    bn3 = _bn_params(rng, c_up, "bn3")
    inits.extend(numpy_helper.from_array(v, k) for k, v in bn3.items())
    nodes.append(helper.make_node("ConvTranspose", ["r2", "up_w"], ["up_y0"], name="up", strides=[2, 2], group=groups))
    nodes.append(helper.make_node("Add", ["up_y0", "up_b"], ["up_y"], name="up_bias"))
    nodes.append(helper.make_node("BatchNormalization", ["up_y", *bn3], ["bn3_y"], name="bn3"))
    nodes.append(helper.make_node("Relu", ["bn3_y"], ["r3"], name="relu3"))
    nodes.append(helper.make_node("ReduceMean", ["r3"], ["pooled"], name="pool", axes=[2, 3], keepdims=0))
    # Gemm(transB) whose weight is an fp16 Constant behind a Cast to float
    d = 6
    nodes.append(_const("fc_w16", (rng.standard_normal((d, c_up)) / 2).astype(np.float16)))
    nodes.append(helper.make_node("Cast", ["fc_w16"], ["fc_w"], name="fc_w_cast", to=TensorProto.FLOAT))
    inits.append(numpy_helper.from_array((rng.standard_normal(d) * 0.1).astype(f32), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["pooled", "fc_w", "fc_b"], ["fc_y"], name="fc", transB=1))
    nodes.append(helper.make_node("Relu", ["fc_y"], ["h"], name="relu4"))
    # one weight read by a MatMul (per column) and by a Gemm with transB (per row)
    inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(f32), "shared_w"))
    nodes.append(helper.make_node("MatMul", ["h", "shared_w"], ["m1"], name="shared_matmul"))
    nodes.append(helper.make_node("Gemm", ["h", "shared_w"], ["m2"], name="shared_gemm", transB=1))
    nodes.append(helper.make_node("Add", ["m1", "m2"], ["s"], name="merge"))
    # opset-12 Unsqueeze/Squeeze carry axes as attributes (inputs from opset 13 on)
    nodes.append(helper.make_node("Unsqueeze", ["s"], ["s3"], name="unsqueeze", axes=[1]))
    nodes.append(helper.make_node("Squeeze", ["s3"], ["y"], name="squeeze", axes=[1]))
    graph = helper.make_graph(nodes, "wild_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, height, "width"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def wild_feeds(widths=(12, 16, 20), per_width: int = 4, seed: int = 1, height: int = 8) -> list[np.ndarray]:
    """Images of several widths: one array per width, axis 0 = samples."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((per_width, 3, height, w)).astype(np.float32) for w in widths]


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def small_embedding(rows: int = 3, width: int = 2) -> onnx.ModelProto:
    """Gather from a ``rows``-row embedding, then a MatMul whose weight sits behind an Identity
    (something for normalisation to change). Random probe ids 0..99 overflow the embedding,
    so only real ids (< ``rows``) can check the normalisation."""
    emb = numpy_helper.from_array(np.linspace(-1, 1, rows * 4, dtype=np.float32).reshape(rows, 4), "emb")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="g"),
             helper.make_node("Identity", ["wraw"], ["w"], name="wid"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, width])],
                          [emb, numpy_helper.from_array(np.ones((4, width), np.float32), "wraw")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
