import numpy as np
import pytest

from ampq_pass.core.measure import Backend, Capabilities, Timing
from ampq_pass.pipeline import faster_beyond_noise
from ampq_pass.stages.verify import speedup_interval, verify
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


def test_without_paired_rounds_the_medians_intervals_are_used():
    m = {"speedup": 1.2, "hp_ci": [0.99, 1.01], "plan_ci": [0.82, 0.84]}
    assert speedup_interval(m) == pytest.approx((0.99 / 0.84, 1.01 / 0.82))
    assert faster_beyond_noise(m)
    assert not faster_beyond_noise({"speedup": 1.01, "hp_ci": [0.99, 1.01], "plan_ci": [0.98, 1.0]})
    assert speedup_interval({**m, "speedup_ci": [1.1, 1.3]}) == (1.1, 1.3)
