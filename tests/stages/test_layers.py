import numpy as np
import pytest

import models
from ampq_pass.stages.layers import count_macs, find_layers, layer_macs


def test_mlp_layers(mlp_model):
    layers = find_layers(mlp_model)
    assert [(l.name, l.op_type) for l in layers] == [("fc1", "MatMul"), ("fc2", "Gemm"), ("fc3", "MatMul")]
    fc2 = layers[1]
    assert fc2.weight_shape == (32, 32) and fc2.channel_axis == 0  # transB=1: weight is [N, K]
    assert "int4" in layers[0].formats and "int4" not in fc2.formats


def test_on_request_formats_are_candidates_only_where_offered(mlp_model):
    """int8_w7 (a backend's variant of int8 for CPUs whose u8s8 GEMM saturates) is a layer's
    candidate only where the backend's formats name it."""
    assert all("int8_w7" not in l.formats and "int8" in l.formats for l in find_layers(mlp_model))
    offered = find_layers(mlp_model, offered=("int8_w7", "int8_dyn_w7"))
    assert all("int8_w7" in l.formats for l in offered)
    assert ["int8_dyn_w7" in l.formats for l in offered] == [True, False, True]  # MatMul only


def test_cnn_and_block_layers(cnn_model, block_model):
    cnn = find_layers(cnn_model)
    assert [l.op_type for l in cnn] == ["Conv"] * 5 + ["Gemm"]
    assert all(l.channel_axis == 0 for l in cnn[:5])
    block = find_layers(block_model)
    assert len(block) == 6 and all(l.op_type == "MatMul" for l in block)
    # attention-score MatMuls have no constant weight: only listed on request
    with_act = find_layers(block_model, activation_matmuls=True)
    assert len(with_act) == 8
    assert sum(l.weight is None for l in with_act) == 2


def test_macs_match_hand_count(mlp_model, cnn_model):
    feeds = {"x": np.zeros((4, 16), np.float32)}
    macs = layer_macs(mlp_model, find_layers(mlp_model), feeds)
    assert macs == {"fc1": 4 * 16 * 32, "fc2": 4 * 32 * 32, "fc3": 4 * 32 * 8}
    layers = find_layers(cnn_model)
    macs = layer_macs(cnn_model, layers, {"image": np.zeros((2, 3, 16, 16), np.float32)})
    assert macs["/stem/Conv"] == 2 * 8 * 16 * 16 * (3 * 3 * 3)
    assert macs["/block1/conv1/Conv"] == 2 * 8 * 16 * 16 * (8 * 3 * 3)
    assert count_macs(layers[-1], (2, 8), (2, 10)) == 2 * 10 * 8


def _layers_in_if_branches():
    """A model whose only MatMuls sit in the branches of an If on a runtime flag (silero-vad's shape)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="then_mm")], "then", [], [out])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="else_relu")], "else", [], [out])
    node = helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                        helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], initializer=[w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_layers_inside_control_flow_get_a_one_line_reason(tmp_path, capsys):
    import onnx

    from ampq_pass.cli import main
    from ampq_pass.core.errors import AmpqError
    from ampq_pass.stages.layers import layers_in_bodies, require_layers

    model = _layers_in_if_branches()
    assert find_layers(model) == [] and layers_in_bodies(model) == {"branch": 1}
    with pytest.raises(AmpqError, match=r"inside a control-flow body \(If 'branch' \(1, condition reads input 'flag'\)\)"):
        require_layers(model, [], "m.onnx")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "control flow (If/Loop/Scan) is not supported" in err[0]
