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


def test_int4_clip_ratios_are_searched_on_the_layers_calibration_input(tmp_path):
    """compute_ranges searches int4's clip ratios against the MatMul's calibration input; the
    rewritten model then errs less on held-out inputs than round to nearest; the ratios survive
    the cache and JSON exactly; with no clip formats there are none."""
    from ampq_pass.core.cache import Cache
    from ampq_pass.core.formats import FORMATS
    from ampq_pass.core.ort import make_session
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite

    rng = np.random.default_rng(0)
    w = rng.standard_t(3, (96, 16)).astype(np.float32)
    model = models.single_matmul(w)
    layers = find_layers(model)
    assert "int4" in layers[0].formats
    x = models.varied_tokens(rng, 192, 96)
    calib, held = Samples({"x": x[:128]}), x[128:]
    cache = Cache(tmp_path)
    ranges = compute_ranges(model, layers, calib, cache=cache)
    expected = FORMATS["int4"].search_clip(w, models.shrunk_block_gram(x[:128], 32))
    assert np.mean(ranges.clip("w", "int4") == expected) > 0.95  # float summation order may flip a near-tie
    assert np.any(ranges.clip("w", "int4") < 1)
    again = compute_ranges(model, layers, calib, cache=cache)
    np.testing.assert_array_equal(again.clip("w", "int4"), ranges.clip("w", "int4"))
    np.testing.assert_array_equal(Ranges.from_json(ranges.to_json()).clip("w", "int4"), ranges.clip("w", "int4"))
    rtn = compute_ranges(model, layers, calib, cache=cache, clip_formats=())
    assert rtn.clip("w", "int4") is None and rtn.tensors == ranges.tensors

    def error(r):
        out = make_session(rewrite(model, layers, Plan({"mm": "int4"}), r)).run(None, {"x": held})[0]
        return float(np.mean((out - held @ w) ** 2))

    assert error(ranges) < 0.9 * error(rtn)


def test_a_weight_read_by_two_matmuls_is_clipped_for_both_inputs():
    """One stored weight serves both layers: its ratios minimise the sum of their output errors."""
    from onnx import TensorProto, helper, numpy_helper

    from ampq_pass.core.formats import FORMATS
    from ampq_pass.stages.calibrate import search_clips

    rng = np.random.default_rng(1)
    w = rng.standard_t(3, (64, 48)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["ya"], name="mm_a"), helper.make_node("MatMul", ["b", "w"], ["yb"],
                                                                                        name="mm_b")],
        "shared", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 64]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 48]) for n in ("ya", "yb")],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layers = find_layers(model)
    a, b = models.varied_tokens(rng, 64, 64), models.varied_tokens(rng, 64, 64)
    clips = search_clips(model, layers, Samples({"a": a, "b": b}))
    assert set(clips) == {("w", "int4")}  # K = 64: no int4_b128
    both = FORMATS["int4"].search_clip(w, models.shrunk_block_gram(a, 32) + models.shrunk_block_gram(b, 32))
    assert np.mean(clips[("w", "int4")] == both) > 0.95
    for one in (a, b):  # neither input alone gives those ratios
        assert np.mean(FORMATS["int4"].search_clip(w, models.shrunk_block_gram(one, 32)) == both) < 0.8


def _sums(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block: the sums over tokens of x_b x_b^T and of (x_b * x_b)(x_b * x_b)^T (the calibration's)."""
    return models.block_gram(x, block) * len(x), models.block_gram(x.astype(np.float64) ** 2, block) * len(x)


def test_shrunk_second_moment_equals_the_formula_computed_from_the_tokens():
    """From the two running sums, the same matrix as Schafer and Strimmer's diagonal-target
    shrinkage evaluated on the tokens themselves (tests/models.py: one outer product per
    token), K padded to whole blocks."""
    from ampq_pass.stages.calibrate import shrunk_second_moment

    rng = np.random.default_rng(3)
    x = models.varied_tokens(rng, 40, 72)  # 72 = 2 blocks of 32 and a padded one
    got, lam = shrunk_second_moment(*_sums(x, 32), len(x))
    np.testing.assert_allclose(got, models.shrunk_block_gram(x, 32), rtol=1e-5, atol=1e-9)
    assert lam.shape == (3,) and np.all((lam > 0) & (lam <= 1))


def test_shrinkage_fades_with_many_tokens_and_fills_in_a_rank_deficient_moment():
    """Many tokens of correlated channels: lam near 0, the sample moment kept. Fewer tokens
    than the block: the sample moment is singular, the shrunk one positive definite."""
    from ampq_pass.stages.calibrate import shrunk_second_moment

    rng = np.random.default_rng(4)
    mix = rng.standard_normal((32, 32)) * np.linspace(0.2, 3.0, 32)
    many = (rng.standard_normal((20000, 32)) @ mix).astype(np.float32)
    got, lam = shrunk_second_moment(*_sums(many, 32), len(many))
    assert lam[0] < 0.02
    np.testing.assert_allclose(got, models.block_gram(many, 32), rtol=0.02, atol=0.02 * np.abs(got).max())
    few = many[:12]
    s = models.block_gram(few, 32)[0]
    got, lam = shrunk_second_moment(*_sums(few, 32), len(few))
    assert np.linalg.matrix_rank(s) == 12
    assert lam[0] > 0.2 and np.linalg.eigvalsh(got[0]).min() > 0


def test_shrinkage_leaves_a_diagonal_moment_alone():
    """Tokens whose second moment is exactly diagonal: nothing to shrink."""
    from ampq_pass.stages.calibrate import shrunk_second_moment

    x = np.concatenate([np.eye(32), -np.eye(32)]).astype(np.float32) * 2.0
    got, lam = shrunk_second_moment(*_sums(x, 32), len(x))
    assert lam[0] == 0
    np.testing.assert_allclose(got[0], np.eye(32) * 8 / 64, atol=1e-12)  # each +-2 e_i twice, 64 tokens


def test_with_few_tokens_the_shrunk_search_errs_less_on_held_out_inputs():
    """Fewer calibration tokens than the block (int4_b128, 24 tokens): clip ratios searched on
    the shrunk moment give a lower output error on held-out inputs than on the sample moment,
    which is blind to every direction the few tokens miss."""
    from ampq_pass.core.formats import FORMATS
    from ampq_pass.stages.calibrate import shrunk_second_moment

    fmt = FORMATS["int4_b128"]
    rng = np.random.default_rng(5)
    w = rng.standard_t(3, (256, 64)).astype(np.float32)
    x = models.varied_tokens(rng, 24 + 2000, 256)
    calib, held = x[:24], x[24:]
    sums = _sums(calib, 128)
    plain = fmt.search_clip(w, sums[0] / len(calib))
    shrunk = fmt.search_clip(w, shrunk_second_moment(*sums, len(calib))[0])

    def error(clip):
        return float(np.mean((held @ fmt.fake_weight(w, None, clip) - held @ w) ** 2))

    assert error(shrunk) < 0.97 * error(plain)
