import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import models
from ampq_pass.core.structure import canonical_names, node_token, structure_digest


def _block(prefix: str = "", seed: int = 0, shape=(4, 8), width: int = 8, alpha: float = 0.1) -> onnx.ModelProto:
    """x -> MatMul(w) -> Reshape(shape) -> LeakyRelu(alpha), names prefixed."""
    rng = np.random.default_rng(seed)
    p = prefix
    nodes = [helper.make_node("MatMul", [f"{p}x", f"{p}w"], [f"{p}h"], name=f"{p}mm"),
             helper.make_node("Reshape", [f"{p}h", f"{p}shape"], [f"{p}r"], name=f"{p}reshape"),
             helper.make_node("LeakyRelu", [f"{p}r"], [f"{p}y"], name=f"{p}act", alpha=alpha)]
    inits = [numpy_helper.from_array(rng.standard_normal((16, width)).astype(np.float32), f"{p}w"),
             numpy_helper.from_array(np.array(shape, np.int64), f"{p}shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(f"{p}x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info(f"{p}y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_names_and_weight_values_do_not_change_the_structure():
    assert structure_digest(_block()) == structure_digest(_block("layer3/", seed=5))


def test_what_sets_the_kernels_and_shapes_does():
    base = structure_digest(_block())
    assert structure_digest(_block(shape=(8, 4))) != base  # a Reshape's target (an integer initializer's value)
    assert structure_digest(_block(alpha=0.2)) != base  # an attribute
    assert structure_digest(_block(width=16, shape=(8, 8))) != base  # a weight's shape
    rewired = _block()
    rewired.graph.node[2].input[0] = "h"  # LeakyRelu reads the MatMul's output instead of the Reshape's
    assert structure_digest(rewired) != base


def test_tokens_follow_positions():
    a, b = _block(), _block("blk/")
    na, nb = canonical_names(a), canonical_names(b)
    assert na["x"] == nb["blk/x"] == "t0" and na["r"] == nb["blk/r"]
    assert node_token(na, "act") == node_token(nb, "blk/act") == "n2"
    assert node_token(na, "blk/act") is None


def test_a_real_exported_model_differs_from_its_other_weights_only_in_values():
    assert structure_digest(models.cnn(seed=0)) == structure_digest(models.cnn(seed=3))
    assert structure_digest(models.cnn(seed=0)) != structure_digest(models.mlp())


def test_resize_scales_and_float_scalars_are_compared_by_value():
    def model(scales, exponent):
        nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], name="up", mode="nearest"),
                 helper.make_node("Pow", ["r", "e"], ["y"], name="pow")]
        inits = [numpy_helper.from_array(np.array(scales, np.float32), "scales"),
                 numpy_helper.from_array(np.array(exponent, np.float32), "e")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    base = structure_digest(model([1, 1, 2, 2], 2.0))
    assert structure_digest(model([1, 1, 2, 2], 2.0)) == base
    assert structure_digest(model([1, 1, 4, 4], 2.0)) != base
    assert structure_digest(model([1, 1, 2, 2], 0.5)) != base
