import numpy as np
import pytest

from ampq_pass.core.measure import Backend, Capabilities, Timing
from ampq_pass.pipeline import faster_beyond_noise
from ampq_pass.stages.verify import speedup_interval, time_together, verify
from ampq_pass.core.samples import Samples


class RoundLoad(Backend):
    """Times from rounds that a varying load slows alike: hp 10 ms, the plan ``ratio`` faster,
    both times ``load[r]`` in round ``r`` (no model is run)."""

    name, unit = "round-load", "s"

    def __init__(self, ratio: float, load):
        self.ratio, self.load = ratio, list(load)

    def capabilities(self):
        return Capabilities(formats=("int8",), hp="fp32", device="none")

    def key(self):
        return {"backend": self.name}

    def time(self, models, inputs):
        return {"hp": Timing.of([0.010 * f for f in self.load]),
                "plan": Timing.of([0.010 / self.ratio * f for f in self.load])}


def test_the_speed_up_interval_pairs_the_rounds(mlp_model):
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    holdout = Samples({mlp_model.graph.input[0].name: x})
    load = np.random.default_rng(1).uniform(1.0, 1.5, 30)
    m = verify(mlp_model, mlp_model, holdout, RoundLoad(1.05, load), [{mlp_model.graph.input[0].name: x}])
    lo, hi = speedup_interval(m)
    assert m["speedup"] == pytest.approx(1.05) and lo == pytest.approx(1.05) and hi == pytest.approx(1.05)
    # 5% faster every round: beyond the noise, though the medians' own intervals overlap
    assert m["plan_ci"][1] > m["hp_ci"][0] and faster_beyond_noise(m)


class ByName(Backend):
    """Each model runs in a time set by its graph's name (seconds), every round slowed alike by a load."""

    name, unit = "by-name", "s"

    def __init__(self, times: dict[str, float]):
        self.times, self.calls = times, []

    def capabilities(self):
        return Capabilities(formats=("int8",), hp="fp32", device="none")

    def key(self):
        return {"backend": self.name}

    def time(self, models, inputs):
        self.calls.append(list(models))
        load = np.random.default_rng(2).uniform(1.0, 1.5, 20)
        return {label: Timing.of([self.times[m.graph.name] * f for f in load]) for label, m in models.items()}


def _renamer(model):
    """Copies of ``model`` told apart by their graph's name (what :class:`ByName` times)."""
    import onnx

    def named(name):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.graph.name = name
        return m

    return named


def test_candidates_are_timed_together_against_the_input(mlp_model):
    named = _renamer(mlp_model)
    backend = ByName({"input": 0.010, "a": 0.008, "b": 0.005})
    got = time_together(named("input"), {"r0": named("a"), "r1": named("b")}, backend, [{}])
    assert backend.calls == [["hp", "r0", "r1"]]  # one run, the input first
    assert got["r0"]["speedup"] == pytest.approx(1.25) and got["r1"]["speedup"] == pytest.approx(2.0)
    assert got["r1"]["speedup_ci"] == pytest.approx([2.0, 2.0])
    assert got["r0"]["over"] == got["r1"]["over"] == "input"
    with pytest.raises(ValueError, match="'hp' names the input"):
        time_together(named("input"), {"hp": named("a")}, backend, [{}])


def test_without_the_input_candidates_are_timed_against_the_first(mlp_model):
    """A model of which memory holds two sessions at a time: the candidates alone, one run."""
    named = _renamer(mlp_model)
    backend = ByName({"a": 0.008, "b": 0.005})
    got = time_together(None, {"r0": named("a"), "r1": named("b")}, backend, [{}])
    assert backend.calls == [["r0", "r1"]]
    assert got["r0"]["speedup"] == pytest.approx(1.0) and got["r1"]["speedup"] == pytest.approx(1.6)
    assert got["r0"]["over"] == got["r1"]["over"] == "r0"


def test_without_paired_rounds_the_medians_intervals_are_used():
    m = {"speedup": 1.2, "hp_ci": [0.99, 1.01], "plan_ci": [0.82, 0.84]}
    assert speedup_interval(m) == pytest.approx((0.99 / 0.84, 1.01 / 0.82))
    assert faster_beyond_noise(m)
    assert not faster_beyond_noise({"speedup": 1.01, "hp_ci": [0.99, 1.01], "plan_ci": [0.98, 1.0]})
    assert speedup_interval({**m, "speedup_ci": [1.1, 1.3]}) == (1.1, 1.3)


class OwnNumerics(RoundLoad):
    """:class:`RoundLoad` that computes models its own way: every output ``offset`` off what ONNX
    Runtime computes (a compiler of its own, as OpenVINO's), and records what it ran."""

    own_numerics = True

    def __init__(self, offset: float):
        super().__init__(1.0, [1.0] * 5)
        self.offset, self.ran = offset, []

    def outputs(self, model, batches):
        from ampq_pass.core import ort

        self.ran.append(len(batches))
        return [{k: v + self.offset for k, v in o.items()} for o in ort.run_batches(model, batches)]


def test_the_loss_is_measured_with_the_backend_computing_the_plan(mlp_model):
    name = mlp_model.graph.input[0].name
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    holdout = Samples({name: x})
    same = verify(mlp_model, mlp_model, holdout, RoundLoad(1.0, [1.0] * 5), [{name: x}], batch_size=4)
    assert same["loss_mse"] == 0.0  # ONNX Runtime against itself
    backend = OwnNumerics(0.5)
    off = verify(mlp_model, mlp_model, holdout, backend, [{name: x}], batch_size=4)
    assert backend.ran == [2]  # both held-out batches, one compilation
    # the projection loss of a constant offset d on every output: d^2 per output dimension, summed
    assert off["loss_mse"] == pytest.approx(0.25 * mlp_model.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
