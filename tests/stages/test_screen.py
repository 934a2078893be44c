"""Each layer's self-contained formats timed alone, and the dominated ones dropped."""

from __future__ import annotations

import math

import numpy as np
import pytest

import models
from ampq_pass.backends.costmodels import MacModel
from ampq_pass.backends.ort import OrtBackend
from ampq_pass.core.cache import Cache
from ampq_pass.core.measure import Backend, Timing
from ampq_pass.core.samples import Samples
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.screen import dominated, layer_subgraph, screen_formats, screened_formats


def test_a_format_not_faster_than_hp_is_dominated():
    alone = {"int4": (1.02, -0.02, 0.01), "int8_dyn": (0.5, 0.5, 0.02)}
    assert dominated(alone, {"int4": 1e-6, "int8_dyn": 1e-3}) == {"int4": "not faster than hp alone"}


def test_a_gain_inside_the_noise_is_kept_and_none_at_all_is_not():
    assert dominated({"int4": (0.97, 0.03, 0.05)}, {"int4": 0.0}) == {}
    assert dominated({"int4": (1.0, 0.0, 0.05)}, {"int4": 0.0}) == {"int4": "not faster than hp alone"}


def test_faster_and_no_lossier_dominates_but_faster_and_lossier_does_not():
    alone = {"int8_dyn": (0.4, 0.6, 0.01), "int4": (0.7, 0.3, 0.01)}
    assert dominated(alone, {"int8_dyn": 1e-4, "int4": 2e-4}) == {"int4": "int8_dyn faster alone and no lossier"}
    assert dominated(alone, {"int8_dyn": 3e-4, "int4": 2e-4}) == {}


def test_a_difference_inside_both_noises_dominates_nothing():
    alone = {"int8_dyn": (0.50, 0.50, 0.05), "int4": (0.55, 0.45, 0.05)}
    assert dominated(alone, {"int8_dyn": 0.0, "int4": 1.0}) == {}


def test_the_cut_state_format_is_never_screened():
    assert screened_formats({"a": ["int8", "int8_dyn", "int4"], "b": ["int8"]}) == {"a": ["int8_dyn", "int4"], "b": []}


class OpClock(Backend):
    """A deterministic device: a model costs the sum of its ops' prescribed costs (the screen's
    decision logic is under test, not a CPU). Records every model it times."""

    name, unit = "op-clock", "s"
    COST = {"MatMul": 1.0, "MatMulNBits": 1.5, "MatMulInteger": 0.3, "DynamicQuantizeLinear": 0.05}

    def __init__(self):
        self.timed = []

    def capabilities(self):
        return OrtBackend().capabilities()

    def key(self):
        return {"backend": "op-clock"}

    def time(self, models, inputs):
        self.timed.extend(models.values())
        return {k: Timing.of([sum(self.COST.get(n.op_type, 0.01) for n in m.graph.node)] * 5) for k, m in models.items()}


@pytest.fixture(scope="module")
def block_setup(block_model):
    layers = find_layers(block_model)
    feeds = models.feeds_for(block_model, n=8)
    ranges = compute_ranges(block_model, layers, Samples(feeds))
    candidates = {l.name: [f for f in ("int8", "int8_dyn", "int4") if f in l.formats] for l in layers}
    return block_model, layers, feeds, ranges, candidates


def test_screen_drops_int4_that_is_slower_alone_and_keeps_the_rest(block_setup, tmp_path):
    model, layers, feeds, ranges, candidates = block_setup
    loss = {l.name: {"int8": 1e-3, "int8_dyn": 1e-4, "int4": 1e-5} for l in layers}
    clock = OpClock()
    screen = screen_formats(model, layers, candidates, loss, ranges, [feeds], clock, cache=Cache(tmp_path))
    for l in layers:
        want = [f for f in candidates[l.name] if f != "int4"]
        assert screen.candidates[l.name] == want
    int4 = [e for e in screen.entries if e.format == "int4"]
    assert int4 and all(not e.kept and e.reason == "not faster than hp alone" for e in int4)
    assert all(e.kept and e.speedup > 1 for e in screen.entries if e.format == "int8_dyn")
    assert not any(e.format == "int8" for e in screen.entries)  # protected: never timed alone
    # every model timed holds one layer: its node plus the format's own Q/DQ or casts
    assert all(sum(n.op_type in ("MatMul", "MatMulNBits", "MatMulInteger", "Gemm") for n in m.graph.node) == 1
               for m in clock.timed)
    assert "dropped" in screen.summary() and "int4" in screen.summary()
    # cached like a subgraph: a rerun times nothing
    again = OpClock()
    assert screen_formats(model, layers, candidates, loss, ranges, [feeds], again,
                          cache=Cache(tmp_path)).candidates == screen.candidates
    assert again.timed == []


def test_a_weight_only_format_on_a_memory_bound_layer_is_not_screened(block_setup, tmp_path):
    """At a decode-like shape (at most MEMORY_BOUND_ROWS rows per run) a layer timed alone keeps
    its weights in cache, so int4 is kept untimed; the other formats are screened as before."""
    from ampq_pass.stages.screen import MEMORY_BOUND_ROWS, activation_rows

    model, layers, feeds, ranges, candidates = block_setup
    one = {k: v[:1] for k, v in feeds.items()}  # one sequence of 8 tokens: 8 rows
    assert activation_rows([one], layers[0]) <= MEMORY_BOUND_ROWS < activation_rows([feeds], layers[0])
    loss = {l.name: {"int8": 1e-3, "int8_dyn": 1e-4, "int4": 1e-5} for l in layers}
    clock = OpClock()
    screen = screen_formats(model, layers, candidates, loss, ranges, [one], clock, cache=Cache(tmp_path))
    assert screen.candidates == candidates  # int4 kept (OpClock would have it slower alone)
    int4 = [e for e in screen.entries if e.format == "int4"]
    assert int4 and all(e.kept and e.reason.startswith("not screened: weight-only on a memory-bound layer")
                        for e in int4)
    from onnx import TensorProto

    int4_weights = [m for m in clock.timed if any(i.data_type == TensorProto.INT4 for i in m.graph.initializer)]
    assert clock.timed and not int4_weights  # int8_dyn timed alone, int4 never
    assert all(e.kept for e in screen.entries if e.format == "int8_dyn")


def test_screen_on_onnx_runtime_keeps_the_layers_and_reports_real_times(block_setup):
    model, layers, feeds, ranges, candidates = block_setup
    loss = {l.name: {"int8_dyn": 1e-4, "int4": 1e-5} for l in layers}
    screen = screen_formats(model, layers[:1], {layers[0].name: candidates[layers[0].name]}, loss, ranges, [feeds],
                            OrtBackend())
    assert {e.format for e in screen.entries} == {"int8_dyn", "int4"}
    assert all(math.isfinite(e.speedup) and e.speedup > 0 and e.noise >= 0 for e in screen.entries)
    assert set(screen.candidates[layers[0].name]) <= set(candidates[layers[0].name])
    assert "int8" in screen.candidates[layers[0].name]


def test_a_cost_model_is_not_screened(block_setup):
    model, layers, feeds, ranges, candidates = block_setup
    screen = screen_formats(model, layers, candidates, {}, ranges, [feeds], MacModel())
    assert screen.candidates == candidates and screen.entries == []


def test_layer_subgraph_takes_the_activation_and_embeds_the_weight(block_setup):
    model, layers, *_ = block_setup
    sg = layer_subgraph(model, layers[0], 3)
    assert sg.index == 3 and sg.layers == [layers[0].name] and sg.nodes == [layers[0].name]
    assert layers[0].activation in sg.inputs and layers[0].weight not in sg.inputs
    assert sg.outputs == [layers[0].output]


def test_a_layer_that_cannot_be_screened_keeps_its_formats(block_setup):
    from dataclasses import replace

    model, layers, feeds, ranges, candidates = block_setup
    ghost = replace(layers[0], name="not-a-node")
    screen = screen_formats(model, [ghost], {"not-a-node": candidates[layers[0].name]}, {}, ranges, [feeds], OpClock())
    assert screen.candidates["not-a-node"] == candidates[layers[0].name]
    assert screen.entries and all(e.kept and e.reason.startswith("not screened: layer 'not-a-node'")
                                  for e in screen.entries)
