"""The >2 GB code path (issue 8.3) at small scale: the 2 GB threshold is lowered to 1 byte, so
every stage takes its large-model branch (checker by path, stripped shape inference and
version conversion, no whole-model copies in rewrite/capture, external-data save)."""

import numpy as np
import onnx
import pytest

import ampq_pass.core.proto as mm
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.core.samples import Samples
from ampq_pass.stages.layers import find_layers
from ampq_pass.core.model import load_model, save_model
from ampq_pass.stages.partition import partition
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.calibrate import required_ranges
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.subgraphs import capture_inputs, extract_all
from wild_models import ort_run, wild_cnn, wild_feeds


def _stages(path, tmp_path, name):
    model = load_model(path)
    layers = find_layers(model)
    part = partition(model, layers)
    subs = extract_all(model, part)
    feeds = {"x": wild_feeds()[0]}
    captured = capture_inputs(model, part, Samples(feeds), batch_size=4)
    ranges = Ranges("minmax", {t: (-4.0, 4.0) for t in required_ranges(layers)})
    q = rewrite(model, layers, Plan({l.name: "int8" for l in layers}), ranges)
    out = save_model(q, tmp_path / f"{name}.onnx")
    return model, subs, captured, out


def test_large_path_gives_the_same_results(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    path = src / "wild.onnx"
    onnx.save_model(wild_cnn(), path, save_as_external_data=True, location="wild.data", size_threshold=0)
    small_model, small_subs, small_cap, small_out = _stages(path, tmp_path, "small")
    monkeypatch.setattr(mm, "PROTOBUF_LIMIT", 1)
    big_model, big_subs, big_cap, big_out = _stages(path, tmp_path, "big")
    assert not (tmp_path / "small.onnx.data").exists()
    # load + normalise (converted without weights, weights adopted back) gives the same model
    assert [n.op_type for n in big_model.graph.node] == [n.op_type for n in small_model.graph.node]
    w_small = {t.name: onnx.numpy_helper.to_array(t) for t in small_model.graph.initializer}
    w_big = {t.name: onnx.numpy_helper.to_array(t) for t in big_model.graph.initializer}
    assert w_small.keys() == w_big.keys() and all(np.array_equal(w_small[k], w_big[k]) for k in w_small)
    # capture did not leave its extra outputs on the caller's model
    assert [o.name for o in big_model.graph.output] == ["y"]
    for a, b in zip(small_subs, big_subs, strict=True):
        assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
        wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
        wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
        assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
        assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    for k in small_cap:
        for a, b in zip(small_cap[k], big_cap[k]):
            assert all(np.array_equal(a[t], b[t]) for t in a)
    monkeypatch.undo()
    x = {"x": wild_feeds()[2]}
    small_q, big_q = onnx.load(small_out), onnx.load(big_out)
    np.testing.assert_array_equal(ort_run(small_q, x)[0], ort_run(big_q, x)[0])


def test_large_normalisation_is_checked_against_the_file(tmp_path, monkeypatch):
    import ampq_pass.core.normalize as nm

    path = tmp_path / "wild.onnx"
    onnx.save_model(wild_cnn(), path, save_as_external_data=True, location="wild.data", size_threshold=0)
    monkeypatch.setattr(mm, "PROTOBUF_LIMIT", 1)

    class WrongFold(nm.FoldBatchNorms):
        def call(self, model, *, source):
            result = super().call(model, source=source)
            for t in model.graph.initializer:
                if t.name.endswith("_bnfold_bias"):
                    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) + 1, t.name))
            return result

    monkeypatch.setattr(nm, "NORMALIZATION_PASSES",
                        tuple(WrongFold() if isinstance(p, nm.FoldBatchNorms) else p for p in nm.NORMALIZATION_PASSES))
    with pytest.raises(Exception, match=r"wild\.onnx: normalised model output #0 differs"):
        load_model(path)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(wild_cnn(), path, save_as_external_data=True, location="w.data", size_threshold=0)
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    onnx.save(m, path)
    with pytest.raises(Exception, match=r"refers to external data '\.\./\.\./etc/passwd' outside the model's folder"):
        load_model(path)


def test_short_external_data_file_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(wild_cnn(), path, save_as_external_data=True, location="w.data", size_threshold=0)
    data = (tmp_path / "w.data").read_bytes()
    (tmp_path / "w.data").write_bytes(data[: len(data) - 100])
    with pytest.raises(Exception, match=r"m\.onnx: (cannot read external data|external data of tensor)"):
        load_model(path)
