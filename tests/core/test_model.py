import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.model import load_model, save_model


def test_load_runs_shape_inference(tmp_path, mlp_model):
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model, path)
    model = load_model(path)
    assert {v.name for v in model.graph.value_info} >= {"h1", "r1"}


def test_not_onnx(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_text("hello, this is not a model\n" * 10)
    with pytest.raises(AmpqError, match=r"x\.onnx: .*not an ONNX model|x\.onnx: invalid"):
        load_model(path)


def test_truncated(tmp_path, cnn_model):
    data = cnn_model.SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AmpqError, match=r"t\.onnx"):
        load_model(path)


def test_missing_external_data(tmp_path, mlp_model):
    path = tmp_path / "ext.onnx"
    mlp_model = models.mlp()  # onnx's external-data saver rewrites the proto it is given
    onnx.save_model(mlp_model, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    assert load_model(path).graph.initializer[0].raw_data  # loads with its data
    os.unlink(tmp_path / "ext.data")
    with pytest.raises(AmpqError, match=r"external data file .*ext\.data.* missing"):
        load_model(path)


def test_save_refuses_input_path(tmp_path, mlp_model):
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model, path)
    before = path.read_bytes()
    with pytest.raises(AmpqError, match="input model"):
        save_model(mlp_model, path, source=path)
    assert path.read_bytes() == before


def test_save_is_atomic_and_leaves_no_temp(tmp_path, mlp_model):
    out = save_model(mlp_model, tmp_path / "o.onnx")
    assert onnx.load(out).graph.node[0].name == "fc1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_save_large_model_with_external_data(tmp_path, monkeypatch, mlp_model):
    # Force the external-data path on a small model instead of building a >2 GB one here.
    import ampq_pass.core.proto as mm

    monkeypatch.setattr(mm, "PROTOBUF_LIMIT", 1)
    out = save_model(mlp_model, tmp_path / "big.onnx")
    assert mlp_model.graph.initializer[0].raw_data  # the caller's proto keeps its weights
    assert (tmp_path / "big.onnx.data").is_file()
    back = load_model(out)
    w = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    ref = {t.name: numpy_helper.to_array(t) for t in mlp_model.graph.initializer}
    assert all(np.array_equal(w[k], ref[k]) for k in ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]


def test_saved_model_keeps_only_the_inputs_value_info(tmp_path):
    # Shape inference at load (and types captured from real tensors later) add value_info
    # the stages need; the written model must come back with the input's own entries only.
    from onnx import TensorProto, helper

    from ampq_pass.core.proto import PASS_TYPE

    model = models.mlp()
    model.graph.value_info.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, None))
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(tmp_path / "m.onnx")
    loaded.graph.value_info.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    loaded.graph.value_info[-1].doc_string = f"{PASS_TYPE} typed from captured tensors"
    held = [v.name for v in loaded.graph.value_info]
    assert {"h1", "r1", "extra"} <= set(held)
    out = onnx.load(save_model(loaded, tmp_path / "o.onnx"))
    assert [v.name for v in out.graph.value_info] == ["h1"]
    assert [v.name for v in loaded.graph.value_info] == held  # the caller's model keeps its types
