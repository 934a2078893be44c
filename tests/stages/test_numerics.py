"""The (layer, format) pairs a backend computes far off the QDQ semantics, found by group testing."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest

import models
from ampq_pass.backends.ort import OrtBackend
from ampq_pass.core import ort
from ampq_pass.core.cache import Cache
from ampq_pass.core.measure import Backend
from ampq_pass.core.samples import Samples
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.numerics import (RATIO_MAX, RATIO_MIN, SCALED, NumericsEntry, check_numerics, less_accurate_scale,
                                       relative_error, scale_sensitivity, unfaithful)
from ampq_pass.stages.sensitivity import CutLoss, Sensitivity

HAVE_OV = importlib.util.find_spec("openvino") is not None


def test_relative_error_is_over_every_float_output_together():
    ref = {"a": np.array([3.0, 0.0]), "b": np.array([0.0, 4.0]), "ids": np.array([1, 2])}
    out = {"a": np.array([3.0, 0.0]), "b": np.array([0.0, 5.0]), "ids": np.array([7, 7])}
    assert relative_error(out, ref) == pytest.approx(1.0 / 5.0)  # integer outputs are not compared


def test_unfaithful_means_beyond_twice_the_reference_error_and_rounding():
    assert not unfaithful(0.0105, 0.01)
    assert unfaithful(0.05, 0.01)
    assert not unfaithful(0.0009, 0.0)  # rounding
    assert unfaithful(0.01, 0.0)


class Garbling(Backend):
    """A device whose compiler gets some layers wrong: it runs the model in ONNX Runtime and adds
    an error to the output when every layer of one of ``wrong`` (sets of layer names) is
    quantized (its weight stored quantized) - a real backend's bug, in the small: half the
    output's largest magnitude, or ``delta`` (output name -> array) where given. ``outputs`` is
    the method under test's only contact with it."""

    name, unit = "garbling", "s"
    own_numerics = True

    def __init__(self, layers, wrong: list[set[str]], delta: dict[str, np.ndarray] | None = None):
        self.weight = {l.name: l.weight for l in layers}
        self.wrong = wrong
        self.delta = delta
        self.runs = 0

    def capabilities(self):
        return OrtBackend().capabilities()

    def key(self):
        return {"backend": "garbling", "wrong": sorted(sorted(w) for w in self.wrong)}

    def time(self, models, inputs):
        raise AssertionError("the numerics check times nothing")

    def outputs(self, model, batches):
        self.runs += 1
        stored = {t.name for t in model.graph.initializer}
        quantized = {l for l, w in self.weight.items() if w not in stored}  # its float weight replaced
        out = ort.run_batches(model, batches)
        if any(w <= quantized for w in self.wrong):
            out = [{k: v + (0.5 * np.abs(v).max() if self.delta is None else self.delta[k]) for k, v in o.items()}
                   for o in out]
        return out


@pytest.fixture(scope="module")
def mlp():
    model = models.mlp()
    layers = find_layers(model)
    x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    samples = Samples({"x": x})
    ranges = compute_ranges(model, layers, samples)
    return model, layers, ranges, next(samples.batches(8))


def test_a_layer_the_backend_gets_wrong_loses_that_format_and_only_it(mlp, tmp_path):
    model, layers, ranges, batch = mlp
    candidates = {l.name: ["hp", "int8", "int8_sym"] for l in layers}
    backend = Garbling(layers, [{"fc2"}])
    found = check_numerics(model, layers, candidates, ranges, backend, batch, cache=Cache(tmp_path))
    assert found.checked == ["int8", "int8_sym"]
    assert {(e.format, tuple(e.layers), e.reason) for e in found.entries} == {
        ("int8", ("fc2",), "unfaithful alone"), ("int8_sym", ("fc2",), "unfaithful alone")}
    assert found.candidates["fc2"] == ["hp"] and found.candidates["fc1"] == ["hp", "int8", "int8_sym"]
    assert all(e.backend_error > RATIO_MAX * e.reference_error for e in found.entries)  # wrong, not less accurate
    assert found.layer_scales == {}
    # cached: a second run asks the backend nothing
    runs = backend.runs
    again = check_numerics(model, layers, candidates, ranges, backend, batch, cache=Cache(tmp_path))
    assert again.candidates == found.candidates and backend.runs == runs


def test_layers_wrong_only_together_are_dropped_together(mlp):
    model, layers, ranges, batch = mlp
    candidates = {l.name: ["hp", "int8"] for l in layers}
    found = check_numerics(model, layers, candidates, ranges, Garbling(layers, [{"fc1", "fc3"}]), batch)
    assert len(found.entries) == 1
    e = found.entries[0]
    assert set(e.layers) >= {"fc1", "fc3"} and e.reason == "unfaithful only together"
    assert all(found.candidates[l] == ["hp"] for l in e.layers)
    assert "int8: 3 layers dropped" in found.summary() or "int8: 2 layers dropped" in found.summary()


def test_a_faithful_backend_costs_one_test_per_format(mlp):
    model, layers, ranges, batch = mlp
    candidates = {l.name: ["hp", "int8", "int8_sym"] for l in layers}
    backend = Garbling(layers, [])
    found = check_numerics(model, layers, candidates, ranges, backend, batch)
    assert found.entries == [] and found.tests == 2 and found.candidates == candidates
    assert found.summary() == "int8: faithful; int8_sym: faithful (2 tests on the backend)"


class Amplifying(Garbling):
    """A device that computes every quantized model ``factor`` times as far from the hp outputs
    as ONNX Runtime does (faithful for ``factor`` < 2, but not to the digit)."""

    def __init__(self, layers, hp_model, factor):
        super().__init__(layers, [])
        self.hp_model, self.factor = hp_model, factor

    def key(self):
        return {"backend": "amplifying", "factor": self.factor}

    def outputs(self, model, batches):
        self.runs += 1
        hp = ort.run_batches(self.hp_model, batches)
        out = ort.run_batches(model, batches)
        return [{k: h[k] + self.factor * (o[k] - h[k]) for k in o} for o, h in zip(out, hp)]


def test_a_faithful_backend_with_a_larger_error_scales_that_formats_loss(mlp, tmp_path):
    model, layers, ranges, batch = mlp
    candidates = {l.name: ["hp", "int8", "int8_sym"] for l in layers}
    backend = Amplifying(layers, model, 1.5)
    found = check_numerics(model, layers, candidates, ranges, backend, batch, cache=Cache(tmp_path))
    assert found.entries == [] and found.candidates == candidates  # faithful: nothing dropped
    assert found.ratios == {"int8": pytest.approx(1.5, rel=1e-3), "int8_sym": pytest.approx(1.5, rel=1e-3)}
    assert found.loss_scales() == {"int8": pytest.approx(2.25, rel=2e-3), "int8_sym": pytest.approx(2.25, rel=2e-3)}
    assert "int8: faithful, output error 1.50x ONNX Runtime's" in found.summary() and "scaled by 2.25" in found.summary()
    assert found.to_json()["loss_scales"]["int8"] == pytest.approx(2.25, rel=2e-3)
    runs = backend.runs  # cached with the ratio
    again = check_numerics(model, layers, candidates, ranges, backend, batch, cache=Cache(tmp_path))
    assert again.ratios == found.ratios and backend.runs == runs
    # within RATIO_MIN the two agree: the loss is not scaled
    close = check_numerics(model, layers, candidates, ranges, Amplifying(layers, model, 1.05), batch)
    assert close.ratios["int8"] == pytest.approx(1.05, rel=1e-3) and 1.05 < RATIO_MIN and close.loss_scales() == {}
    assert close.summary() == "int8: faithful; int8_sym: faithful (2 tests on the backend)"


def test_a_layer_far_off_alone_is_found_inside_a_set_within_the_factor(mlp):
    """A set whose error ratio is beyond RATIO_MIN but within FACTOR is searched: the layer the
    device computes far off alone is found, the rest kept, and the ratio of what is left is ~1.
    Its own ratio is within RATIO_MAX: it keeps the format, its loss scaled by that ratio squared."""
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite

    model, layers, ranges, batch = mlp
    ref = ort.run_batches(model, [batch])[0]
    every = ort.run_batches(rewrite(model, layers, Plan({l.name: "int8" for l in layers}), ranges), [batch])[0]
    # a fixed error, 1.2 times ONNX Runtime's with every layer quantized, added whenever the culprit
    # is quantized: within FACTOR for the whole set, far off for the culprit alone (its own error is small)
    rng = np.random.default_rng(3)
    delta = {}
    for k, v in ref.items():
        d = rng.standard_normal(v.shape).astype(v.dtype)
        delta[k] = d * (1.2 * np.linalg.norm(every[k] - v) / np.linalg.norm(d))
    culprit = layers[-1].name
    backend = Garbling(layers, [{culprit}], delta)
    candidates = {l.name: ["hp", "int8"] for l in layers}
    whole = relative_error(backend.outputs(rewrite(model, layers, Plan({l.name: "int8" for l in layers}), ranges),
                                           [batch])[0], ref) / relative_error(every, ref)
    assert RATIO_MIN < whole < 2.0  # the whole set is faithful by FACTOR
    found = check_numerics(model, layers, candidates, ranges, backend, batch)
    assert [(e.layers, e.reason) for e in found.entries] == [([culprit], SCALED)]
    e = found.entries[0]
    assert 2.0 < e.backend_error / e.reference_error <= RATIO_MAX
    assert all(found.candidates[l.name] == ["hp", "int8"] for l in layers)
    assert found.layer_scales == {culprit: {"int8": pytest.approx((e.backend_error / e.reference_error) ** 2)}}
    assert found.ratios["int8"] == pytest.approx(1.0, abs=0.05)
    assert "int8: faithful but 1 layer less accurate alone kept (loss scaled by" in found.summary()
    assert found.to_json()["layer_scales"] == found.layer_scales


def test_scale_sensitivity_scales_one_formats_terms_and_leaves_the_rest():
    cut = CutLoss({"int8": 0.5})
    sens = Sensitivity(values={"a": {"int8": 2.0, "fp16": 1.0}}, weight={"a": {"int8": 1.0, "fp16": 0.5}},
                       activation={"a": {"int8": 0.5, "fp16": 0.5}}, loss_mean=1.0, loss_sq_mean=2.0, samples=4,
                       loss="mse", cuts={"t": cut})
    out = scale_sensitivity(sens, {"int8": 3.0})
    assert out.values == {"a": {"int8": 6.0, "fp16": 1.0}} and out.weight["a"] == {"int8": 3.0, "fp16": 0.5}
    assert out.activation["a"] == {"int8": 1.5, "fp16": 0.5} and out.cuts == {"t": cut}
    assert out.extra["backend_loss_scales"] == {"int8": 3.0} and "backend_loss_scales" in out.to_json()
    assert sens.values["a"]["int8"] == 2.0  # the input is not changed
    assert scale_sensitivity(sens, {}) is sens


def test_a_layer_off_alone_within_ratio_max_keeps_its_format_with_its_loss_scaled():
    """The loss MSE is quadratic in the output error: the ratio's square; beyond RATIO_MAX, or
    not computed at all, or a set wrong only together, the pair is dropped."""
    def entry(eb, er, reason="unfaithful alone", layers=("c",)):
        return NumericsEntry("int8_sym", list(layers), eb, er, reason)

    assert less_accurate_scale(entry(0.0891, 0.0033)) == pytest.approx((0.0891 / 0.0033) ** 2)  # YOLOv8n model.0
    assert less_accurate_scale(entry(0.1199, 0.0006)) is None  # its box head in int8: 200x
    assert less_accurate_scale(entry(float("inf"), 0.01)) is None  # the backend cannot run it
    assert less_accurate_scale(entry(0.01, 0.0)) is None
    assert less_accurate_scale(entry(0.03, 0.01, "unfaithful only together", ("a", "b"))) is None
    assert less_accurate_scale(entry(0.03, 0.01, "not resolved within the test cap", ("a", "b"))) is None


def test_scale_sensitivity_takes_a_layers_own_scale_where_it_is_larger():
    sens = Sensitivity(values={"a": {"int8": 2.0}, "b": {"int8": 2.0, "fp16": 1.0}},
                       weight={"a": {"int8": 1.0}, "b": {"int8": 1.0, "fp16": 0.5}},
                       activation={"a": {"int8": 1.0}, "b": {"int8": 1.0, "fp16": 0.5}}, loss_mean=1.0,
                       loss_sq_mean=2.0, samples=4, loss="mse")
    out = scale_sensitivity(sens, {"int8": 3.0}, {"b": {"int8": 10.0, "fp16": 2.0}, "a": {"int8": 1.5}})
    assert out.values == {"a": {"int8": 6.0}, "b": {"int8": 20.0, "fp16": 2.0}}
    assert out.weight["b"] == {"int8": 10.0, "fp16": 1.0} and out.activation["a"] == {"int8": 3.0}
    assert out.extra["backend_layer_loss_scales"]["b"] == {"int8": 10.0, "fp16": 2.0}
    assert scale_sensitivity(sens, {}, {}) is sens


def test_a_backend_that_runs_qdq_as_onnx_runtime_does_is_not_checked(mlp):
    model, layers, ranges, batch = mlp
    candidates = {l.name: ["hp", "int8"] for l in layers}
    found = check_numerics(model, layers, candidates, ranges, OrtBackend(), batch)
    assert found.checked == [] and found.tests == 0 and found.candidates == candidates
    assert found.summary() == "nothing checked"


@pytest.mark.skipif(not HAVE_OV, reason="openvino is not installed")
def test_openvino_outputs_are_named_as_in_the_onnx_graph_and_match_onnx_runtime_in_fp32():
    from ampq_pass.backends import get_backend

    model = models.cnn()
    feeds = models.feeds_for(model, n=4)
    got = get_backend("openvino:cpu").outputs(model, [feeds, feeds])
    want = ort.run_batches(model, [feeds])[0]
    assert len(got) == 2 and set(got[0]) == {o.name for o in model.graph.output}
    for name, value in want.items():
        assert got[0][name].dtype == np.float64
        np.testing.assert_allclose(got[0][name], value, rtol=1e-4, atol=1e-4)


def test_when_the_time_allowed_is_spent_an_unfaithful_set_is_dropped_whole_and_not_cached(mlp, tmp_path):
    model, layers, ranges, batch = mlp
    candidates = {l.name: ["hp", "int8"] for l in layers}
    backend = Garbling(layers, [{"fc2"}])
    found = check_numerics(model, layers, candidates, ranges, backend, batch, cache=Cache(tmp_path), seconds=0.0)
    assert [(sorted(e.layers), e.reason) for e in found.entries] == [
        (["fc1", "fc2", "fc3"], "not resolved within the time allowed")]
    assert all(found.candidates[l.name] == ["hp"] for l in layers)
    # with time: resolved to the one layer (the cut-short result was not kept)
    again = check_numerics(model, layers, candidates, ranges, backend, batch, cache=Cache(tmp_path))
    assert [e.layers for e in again.entries] == [["fc2"]]


class Refusing(Garbling):
    """A device whose compiler refuses a model with ``refused`` quantized (OpenVINO refuses ONNX
    Runtime's QLinearConv, for one)."""

    def outputs(self, model, batches):
        from ampq_pass.core.errors import AmpqError

        stored = {t.name for t in model.graph.initializer}
        if any(self.weight[l] not in stored for w in self.wrong for l in w):
            raise AmpqError("cannot compile")
        return super().outputs(model, batches)


def test_a_layer_the_backend_cannot_run_in_a_format_loses_it(mlp):
    model, layers, ranges, batch = mlp
    candidates = {l.name: ["hp", "int8"] for l in layers}
    found = check_numerics(model, layers, candidates, ranges, Refusing(layers, [{"fc3"}]), batch)
    assert [(e.layers, e.reason) for e in found.entries] == [(["fc3"], "unfaithful alone")]
    assert found.entries[0].backend_error == float("inf") and found.candidates["fc3"] == ["hp"]
