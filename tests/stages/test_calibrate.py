import numpy as np
import pytest

import models
from ampq_pass.stages.calibrate import Ranges, calibrate
from ampq_pass.core.samples import Samples, load_samples, synthetic_samples
from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.layers import find_layers
from ampq_pass.core.ort import observed_shapes
from ampq_pass.stages.calibrate import required_ranges
from ampq_pass.stages.calibrate import compute_ranges


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_minmax_ranges_equal_observed_extremes(block_model):
    layers = find_layers(block_model)
    f = models.feeds_for(block_model, n=8)
    tensors = required_ranges(layers)
    ranges = calibrate(block_model, Samples(f), tensors, method="minmax", batch_size=3)
    import onnxruntime as ort

    probe_shapes = observed_shapes(block_model, f, tensors)  # also proves the tensors exist
    assert set(ranges.tensors) == set(tensors) == set(probe_shapes)
    # recompute the extremes of one tensor directly
    from ampq_pass.core.ort import observed_shapes as _  # noqa: F401
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(block_model)
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(layers[0].activation))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    act = sess.run([layers[0].activation], f)[0]
    lo, hi = ranges[layers[0].activation]
    assert lo == pytest.approx(float(act.min()), rel=1e-6) and hi == pytest.approx(float(act.max()), rel=1e-6)


def test_percentile_narrower_than_minmax(block_model):
    layers = find_layers(block_model)
    f = Samples(models.feeds_for(block_model, n=8))
    a = calibrate(block_model, f, [layers[0].activation], method="minmax")
    b = calibrate(block_model, f, [layers[0].activation], method="percentile", percentile=99.0)
    (alo, ahi), (blo, bhi) = a[layers[0].activation], b[layers[0].activation]
    assert max(abs(blo), abs(bhi)) < max(abs(alo), abs(ahi))


def test_ranges_cached_and_json_roundtrip(tmp_path, mlp_model):
    from ampq_pass.core.cache import Cache

    layers = find_layers(mlp_model)
    s = Samples(models.feeds_for(mlp_model, n=4))
    cache = Cache(tmp_path)
    r1 = compute_ranges(mlp_model, layers, s, cache=cache)
    assert len(list((tmp_path / "ranges").glob("*.json"))) == 1
    r2 = compute_ranges(mlp_model, layers, s, cache=cache)
    assert r1.tensors == r2.tensors
    assert Ranges.from_json(r1.to_json()).tensors == r1.tensors


def test_unknown_method(mlp_model):
    with pytest.raises(AmpqError, match="calibration method"):
        calibrate(mlp_model, Samples(models.feeds_for(mlp_model, n=2)), ["x"], method="magic")


def test_calibration_streams_sub_batches(block_model, monkeypatch):
    """The calibrator is fed one (sub-)batch per call: MinMax ranges do not depend on the split;
    with a tiny budget every batch runs one sample at a time, and the histogram calibrators
    never hold more than one batch of activations."""
    from onnxruntime.quantization import calibrate as ort_calibrate

    from ampq_pass.stages.calibrate import calibration_batches

    layers = find_layers(block_model)
    samples = Samples(models.feeds_for(block_model, n=8))
    tensors = required_ranges(layers)
    assert [len(b["input_ids"] if "input_ids" in b else next(iter(b.values())))
            for b in calibration_batches(samples, 4, memory_budget=1)] == [1] * 8
    whole = calibrate(block_model, samples, tensors, batch_size=8)
    split = calibrate(block_model, samples, tensors, batch_size=8, memory_budget=1)
    assert split.tensors == whole.tensors
    held = []
    original = ort_calibrate.HistogramCalibrater.collect_data

    def spy(self, reader):
        original(self, reader)
        held.append(len(self.intermediate_outputs))

    monkeypatch.setattr(ort_calibrate.HistogramCalibrater, "collect_data", spy)
    ranges = calibrate(block_model, samples, tensors, method="percentile", batch_size=2)
    assert len(held) == 4 and set(held) == {0} and set(ranges.tensors) == set(tensors)
