"""Gain per subgraph configuration: noise, cache keys, rerun/resume, speed-up prediction."""

from __future__ import annotations

import numpy as np
import pytest

import models
from fakes import Counting
from ampq_pass.core.measure import Backend, Capabilities, Protocol, Timing
from ampq_pass.backends.ort import OrtBackend
from ampq_pass.core.cache import Cache
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.core.samples import Samples
from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.timing import ConfigGain, GainTable, SubgraphGains, gain_noise, predict_speedup, time_subgraph

FAST = Protocol(warmup=1, min_repeats=3, max_repeats=5, rel_ci=0.5, max_seconds=5)


class Scripted(Backend):
    """Returns prescribed samples per configuration label: exercises the gain/noise logic
    with known numbers (no hardware is being imitated; the label is the config name)."""

    name, unit = "scripted", "s"

    def __init__(self, samples: dict[str, list[float]]):
        self.samples = samples

    def capabilities(self):
        return Capabilities(("int8",), "fp32", "none")

    def key(self):
        return {"backend": "scripted"}

    def time(self, models, inputs):
        return {k: Timing.of(self.samples[k]) for k in models}


@pytest.fixture(scope="module")
def mlp_setup():
    m = models.mlp(sizes=(64, 128, 128, 32))
    layers = find_layers(m)
    feeds = models.feeds_for(m, n=16)
    ranges = compute_ranges(m, layers, Samples(feeds))
    configs = [{l.name: f for l in layers} for f in ("hp", "int8")] + [{"fc1": "int8"}]
    return m, layers, feeds, ranges, configs


def test_rerun_hits_cache_and_times_nothing(tmp_path, mlp_setup):
    m, layers, feeds, ranges, configs = mlp_setup
    cache = Cache(tmp_path)
    first = Counting(OrtBackend(protocol=FAST))
    a = time_subgraph(m, layers, configs, ranges, [feeds], first, cache=cache, index=3, name="mlp")
    assert first.calls == 1 and first.models == 3 and not a.cached
    second = Counting(OrtBackend(protocol=FAST))
    b = time_subgraph(m, layers, configs, ranges, [feeds], second, cache=cache, index=3, name="mlp")
    assert second.calls == 0 and b.cached
    assert b.to_json()["configs"] == a.to_json()["configs"] and b.hp_time == a.hp_time
    # ranges only change scale values, not kernels: not part of the key
    other = Ranges(ranges.method, {k: (lo * 2, hi * 2) for k, (lo, hi) in ranges.tensors.items()})
    time_subgraph(m, layers, configs, other, [feeds], second, cache=cache)
    assert second.calls == 0


def test_any_key_part_change_misses(tmp_path, mlp_setup):
    m, layers, feeds, ranges, configs = mlp_setup
    cache = Cache(tmp_path)
    base = Counting(OrtBackend(protocol=FAST))
    time_subgraph(m, layers, configs, ranges, [feeds], base, cache=cache)
    assert base.calls == 1

    def misses(model=m, lay=layers, cfgs=configs, inputs=(feeds,), backend=None) -> bool:
        c = Counting(backend or OrtBackend(protocol=FAST))
        time_subgraph(model, lay, cfgs, ranges, list(inputs), c, cache=cache)
        return c.calls == 1

    assert misses(cfgs=configs[:2])  # configuration set
    other_w = models.mlp(seed=5, sizes=(64, 128, 128, 32))  # same graph, other weights: the same time
    assert not misses(model=other_w, lay=find_layers(other_w))
    wider = models.mlp(sizes=(64, 256, 128, 32))  # other weight shapes
    assert misses(model=wider, lay=find_layers(wider))
    assert misses(inputs=(models.feeds_for(m, n=8),))  # input shape
    assert misses(backend=OrtBackend(threads=1, protocol=FAST))  # threads
    assert misses(backend=OrtBackend(protocol=Protocol(warmup=1, min_repeats=3, max_repeats=4, rel_ci=0.5)))
    # caps on effort are not part of the key: a run with another time budget, or a resumed one, hits
    assert not misses(backend=OrtBackend(protocol=Protocol(warmup=1, min_repeats=3, max_repeats=5, rel_ci=0.5,
                                                           max_seconds=0.5, retries=3)))
    assert not misses()  # and the original is still a hit


def test_a_renamed_copy_reads_the_entry_in_its_own_names(tmp_path, mlp_setup):
    """The repeated blocks of a network differ in names and weights only: the second one
    reads the first one's measurement, with its own layer and cut names."""
    m, layers, feeds, ranges, configs = mlp_setup
    cache = Cache(tmp_path)
    a = time_subgraph(m, layers, configs, ranges, [feeds], OrtBackend(protocol=FAST), cache=cache)
    copy = models.mlp(seed=7, sizes=(64, 128, 128, 32))
    rename = {n: f"block2/{n}" for n in ["x", "y"] + [t for node in copy.graph.node for t in node.output]
              + [t.name for t in copy.graph.initializer]}
    for node in copy.graph.node:
        node.name = f"block2/{node.name}"
        node.input[:] = [rename.get(t, t) for t in node.input]
        node.output[:] = [rename.get(t, t) for t in node.output]
    for t in list(copy.graph.initializer) + list(copy.graph.input) + list(copy.graph.output):
        t.name = rename[t.name]
    copy_layers = find_layers(copy)
    assert [l.name for l in copy_layers] == [f"block2/{l.name}" for l in layers]
    copy_configs = [{f"block2/{l}": f for l, f in c.items()} for c in configs]
    counting = Counting(OrtBackend(protocol=FAST))
    b = time_subgraph(copy, copy_layers, copy_configs, ranges, [{"block2/x": feeds["x"]}], counting, cache=cache)
    assert counting.calls == 0 and b.cached and b.key == a.key
    assert b.layers == [l.name for l in copy_layers]
    assert [c.formats for c in b.configs] == [{f"block2/{l}": f for l, f in c.formats.items()} for c in a.configs]
    assert [c.time for c in b.configs] == [c.time for c in a.configs]


def test_gain_within_noise_counts_zero_and_is_flagged():
    m = models.mlp()
    layers = find_layers(m)
    hp = [10.0, 10.5, 9.5, 10.2, 9.8, 10.1, 9.9]
    script = Scripted({
        "hp": hp,
        "fc1=int8": [h - 0.05 * s for h, s in zip(hp, [1, -1, 1, -1, 1, -1, 1])],  # ~0 gain, noisy
        "fc1=int8,fc2=int8,fc3=int8": [h - 3.0 for h in hp],  # clear gain of 3
        "fc2=int8": [h + 2.0 for h in hp],  # clear loss
    })
    configs = [{"fc1": "int8"}, {l.name: "int8" for l in layers}, {"fc2": "int8"}]
    ranges = compute_ranges(m, layers, Samples(models.feeds_for(m, n=4)))
    sg = time_subgraph(m, layers, configs, ranges, [{}], script)
    by = {tuple(sorted(k for k, v in c.formats.items() if v != "hp")): c for c in sg.configs}
    tiny = by[("fc1",)]
    assert not tiny.significant and tiny.gain == 0.0 and tiny.measured_gain != 0.0 and tiny.noise > 0
    assert abs(tiny.measured_gain) <= tiny.noise
    big = by[("fc1", "fc2", "fc3")]
    assert big.significant and big.gain == pytest.approx(3.0) and big.noise == pytest.approx(0.0)
    worse = by[("fc2",)]
    assert worse.significant and worse.gain == pytest.approx(-2.0)
    assert by[()].gain == 0.0 and sg.hp_time == pytest.approx(np.median(hp))


def test_paired_noise_cancels_common_drift():
    drift = np.linspace(1.0, 3.0, 15)  # the machine slows down during the run
    hp, cfg = Timing.of(list(drift + 1.0)), Timing.of(list(drift + 0.9))
    assert gain_noise(hp, cfg) == pytest.approx(0.0, abs=1e-12)  # every round differs by 0.1
    unpaired = Timing.of(list(drift[:7] + 0.9))
    assert gain_noise(hp, unpaired) > 0.5  # falls back to the medians' CIs


def _table(hp_total=None):
    s0 = SubgraphGains(0, "a", ["x"], 4.0, [ConfigGain({"x": "hp"}, 4.0, 0.0, 0.0, False, 0.0),
                                            ConfigGain({"x": "int8"}, 2.0, 2.0, 0.1, True, 2.0)])
    s1 = SubgraphGains(1, "b", ["y", "z"], 5.0, [
        ConfigGain({"y": "hp", "z": "hp"}, 5.0, 0.0, 0.0, False, 0.0),
        ConfigGain({"y": "int8", "z": "int8"}, 2.0, 3.0, 0.1, True, 3.0),
        ConfigGain({"y": "int8", "z": "hp"}, 4.9, 0.0, 0.2, False, 0.1)])
    return GainTable("test", {"k": 1}, "s", [s0, s1], hp_total)


def test_predict_speedup_and_json_roundtrip():
    t = _table(hp_total=10.0)
    assert predict_speedup(t, {"x": "int8", "y": "int8", "z": "int8"}) == pytest.approx(10.0 / 5.0)
    assert predict_speedup(t, {"x": "int8"}) == pytest.approx(10.0 / 8.0)
    assert predict_speedup(t, {"y": "int8"}) == pytest.approx(1.0)  # within noise: no gain
    assert predict_speedup(t, {"y": "int8"}, significant_only=False) == pytest.approx(10.0 / 9.9)
    assert predict_speedup(_table(), {"x": "int8"}) == pytest.approx(9.0 / 7.0)  # no end-to-end time: sum of hp
    with pytest.raises(AmpqError, match="was not timed"):
        predict_speedup(t, {"z": "int8"})
    back = GainTable.from_json(t.to_json())
    assert back.to_json() == t.to_json() and back.n_configs == 5
    assert back.total_gain({"x": "int8", "y": "int8", "z": "int8"}) == pytest.approx(5.0)


class Interrupting(Counting):
    """Stops the run (as Ctrl-C would) at the n-th timing call."""

    def __init__(self, inner, stop_at: int):
        super().__init__(inner)
        self.stop_at = stop_at

    def time(self, models, inputs):
        if self.calls + 1 == self.stop_at:
            raise KeyboardInterrupt
        return super().time(models, inputs)


def test_gain_table_rerun_and_resume(tmp_path, block_model, monkeypatch):
    import ampq_pass.stages.timing as timing
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.subgraphs import capture_inputs
    from ampq_pass.stages.timing import gain_table

    monkeypatch.setattr(timing, "GROUP", 64)  # one timing call per subgraph: the calls count subgraphs

    m = block_model
    layers = find_layers(m)
    feeds = models.feeds_for(m, n=8)
    ranges = compute_ranges(m, layers, Samples(feeds))
    backend = OrtBackend(protocol=FAST, formats=("int8",), saturating_int8=True)
    formats = {l.name: [f for f in l.formats if f == "int8"] for l in layers}
    part = partition(m, layers, formats=formats)
    assert len(part.subgraphs) >= 2
    captured = capture_inputs(m, part, Samples(feeds), batch_size=4)
    cache = Cache(tmp_path)

    stopper = Interrupting(backend, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        gain_table(m, layers, part, ranges, captured, stopper, cache=cache, progress=False, boundary_states=False)
    assert stopper.calls == 1  # first subgraph finished and was cached

    resumed = Counting(backend)
    table = gain_table(m, layers, part, ranges, captured, resumed, cache=cache, progress=False,
                       model_inputs=[feeds], boundary_states=False)
    assert resumed.calls == len(part.subgraphs) - 1 + 1  # the rest, plus the end-to-end hp time
    assert table.format_anchors == {}  # without boundary states: the paper's model, no format anchor
    assert table.subgraphs[0].cached and not table.subgraphs[1].cached
    assert table.hp_total > 0 and table.n_configs == sum(len(s.configs) for s in table.subgraphs)
    for s in table.subgraphs:
        assert s.configs[0].formats == {l: "hp" for l in s.layers}
        assert all(set(c.formats.values()) <= {"hp", "int8"} for c in s.configs)

    again = Counting(backend)
    table2 = gain_table(m, layers, part, ranges, captured, again, cache=cache, progress=False, model_inputs=[feeds],
                        boundary_states=False)
    assert again.calls == 0
    assert [s.to_json()["configs"] for s in table2.subgraphs] == [s.to_json()["configs"] for s in table.subgraphs]
    plan = {l.name: "int8" for l in layers}
    assert predict_speedup(table2, plan) == pytest.approx(predict_speedup(table, plan))
    assert GainTable.from_json(table2.to_json()).to_json() == table2.to_json()


def test_gain_table_with_cost_model(block_model):
    from ampq_pass.backends.costmodels import MacModel
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.subgraphs import capture_inputs
    from ampq_pass.stages.timing import gain_table

    m = block_model
    layers = find_layers(m)
    feeds = models.feeds_for(m, n=4)
    part = partition(m, layers)
    captured = capture_inputs(m, part, Samples(feeds), batch_size=4)
    mac = MacModel()
    table = gain_table(m, layers, part, None, captured, mac, progress=False, model_inputs=[feeds])
    assert table.unit == "mac"
    full = mac.macs(m, layers, [feeds])
    assert table.hp_total == sum(full.values())
    assert predict_speedup(table, {l.name: "int8" for l in layers}) == pytest.approx(4.0)


def test_rescale_keeps_ratios_and_significance():
    from ampq_pass.stages.timing import rescale

    sg = SubgraphGains(0, "s", ["a"], 2.0, [ConfigGain({"a": "hp"}, 2.0, 0.0, 0.0, False, 0.0, (1.9, 2.1)),
                                            ConfigGain({"a": "int8"}, 1.2, 0.8, 0.1, True, 0.8, (1.1, 1.3))])
    rescale(sg, 1.0)  # this subgraph was timed while the machine was twice as slow
    assert sg.hp_time == 1.0
    c = sg.configs[1]
    assert (c.time, c.gain, c.noise, c.significant) == pytest.approx((0.6, 0.4, 0.05, True))


class SizeClock(Backend):
    """A deterministic stand-in for a device: a model takes time in proportion to its serialised
    size, the same in every round (the anchoring logic is what is under test, not a CPU)."""

    name, unit = "size-clock", "s"

    def capabilities(self):
        # the CPU EP's formats and fusion rules, fixed: not what this machine's CPU EP offers
        # (int8_w7 where its u8s8 GEMM saturates), which the clock does not run
        from ampq_pass.backends.ort_rules import ORT_CPU_RULES

        return Capabilities(("int8", "int8_dyn", "int4", "int4_b128"), "fp32", "size-clock", ORT_CPU_RULES)

    def key(self):
        return {"backend": "size-clock"}

    @staticmethod
    def _timing(model) -> Timing:
        return Timing.of([1e-9 * model.ByteSize()] * 5)

    def time(self, models, inputs):
        return {k: self._timing(m) for k, m in models.items()}

    def time_each(self, jobs):
        return {k: self._timing(m) for k, (m, _) in jobs.items()}


class LoadBurst(SizeClock):
    """One subgraph's own rounds run 3x slower (a load burst), while models timed together in
    one set of rounds (time_each) are not."""

    def __init__(self, slow_model_bytes: int):
        self.slow = slow_model_bytes

    def time(self, models, inputs):
        out = super().time(models, inputs)
        if len(models) > 1 and next(iter(models.values())).ByteSize() == self.slow:
            out = {k: Timing.of([s * 3.0 for s in t.samples]) for k, t in out.items()}
        return out


def test_anchoring_undoes_a_load_burst(block_model):
    """A burst that triples one subgraph's times triples its raw gain; after anchoring, the
    subgraph's hp time agrees with the one measured beside the others."""
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.subgraphs import capture_inputs, extract
    from ampq_pass.stages.timing import gain_table

    layers = find_layers(block_model)
    feeds = models.feeds_for(block_model, n=8)
    samples = Samples(feeds)
    ranges = compute_ranges(block_model, layers, samples)
    part = partition(block_model, layers, formats={l.name: ["int8"] for l in layers})
    captured = capture_inputs(block_model, part, samples, batch_size=8)
    slow_bytes = extract(block_model, part.subgraphs[0]).ByteSize()
    kw = dict(formats=("int8",), progress=False, model_inputs=[feeds])
    table = gain_table(block_model, layers, part, ranges, captured, LoadBurst(slow_bytes), **kw)
    fair = gain_table(block_model, layers, part, ranges, captured, SizeClock(), **kw)
    burst, calm = table.subgraphs[0], fair.subgraphs[0]
    assert burst.hp_time == pytest.approx(calm.hp_time)  # without anchoring it would be 3x
    assert [c.gain for c in burst.configs] == pytest.approx([c.gain for c in calm.configs])
    assert table.hp_total == pytest.approx(fair.hp_total)


class _SlowingBackend(Backend):
    """Each configuration takes a fixed time, scaled by how many calls came before: the
    machine gets busier with every group of timings."""

    name, unit = "slowing", "s"

    def __init__(self, seconds):
        self.seconds, self.calls, self.sizes = seconds, 0, []

    def capabilities(self):
        return Capabilities(("int8", "int8_dyn", "int4"), "fp32", "fake")

    def key(self):
        return {"fake": "slowing"}

    def time(self, models, inputs):
        self.calls += 1
        self.sizes.append(len(models))
        return {k: Timing.of([self.seconds(k) * self.calls] * 3) for k in models}


def test_configurations_timed_in_groups_share_the_first_groups_scale(block_model, monkeypatch):
    """At most GROUP sessions are alive at once; a later group timed while the machine was
    twice as busy still gives the gains of the first group's scale (each group has hp)."""
    import ampq_pass.stages.timing as timing

    monkeypatch.setattr(timing, "GROUP", 3)
    layers = find_layers(block_model)
    sub_layers = layers[:2]
    configs = [{l.name: f for l in sub_layers} for f in ("int8", "int8_dyn", "int4")] + [{sub_layers[0].name: "int8"}]
    seconds = lambda label: 1.0 if label == "hp" else 0.5 + 0.1 * len(label) % 0.4  # noqa: E731
    backend = _SlowingBackend(seconds)
    ranges = compute_ranges(block_model, layers, Samples(models.feeds_for(block_model, n=4)))
    sg = time_subgraph(block_model, sub_layers, configs, ranges, [models.feeds_for(block_model, n=4)], backend)
    assert max(backend.sizes) <= 3 and backend.calls == 2
    from ampq_pass.stages.timing import config_name
    for c in sg.configs:
        label = config_name(c.formats)
        assert c.time == pytest.approx(seconds(label))
        assert c.measured_gain == pytest.approx(1.0 - seconds(label))


def test_subgraph_times_fit_the_models_hp_time():
    """Parts that add up to more than the model (edge costs a standalone subgraph pays) are
    scaled onto the model; ratios and significance do not change; parts that add up to less
    (side chains outside them) are left alone."""
    from ampq_pass.stages.timing import fit_to_model

    def table(total):
        sgs = [SubgraphGains(i, f"s{i}", [f"l{i}"], 0.2, [ConfigGain({f"l{i}": "hp"}, 0.2, 0.0, 0.0, False, 0.0),
                                                          ConfigGain({f"l{i}": "int8"}, 0.1, 0.1, 0.01, True, 0.1)])
               for i in range(2)]
        return GainTable("fake", {}, "s", sgs, hp_total=total)

    t = table(0.3)
    assert fit_to_model(t) == pytest.approx(0.75)
    assert sum(s.hp_time for s in t.subgraphs) == pytest.approx(0.3)
    assert all(s.configs[1].gain == pytest.approx(0.075) and s.configs[1].significant for s in t.subgraphs)
    assert predict_speedup(t, {"l0": "int8", "l1": "int8"}) == pytest.approx(2.0)  # 0.4 -> 0.2 in the parts
    t = table(0.5)
    assert fit_to_model(t) == 1.0 and t.subgraphs[0].hp_time == 0.2


# ----------------------------------------------------------------------------- the int8 anchor

class EdgeClock(SizeClock):
    """A deterministic clock with the one effect :func:`fit_formats_to_model` is for: a layer costs
    1.0 in float and 0.3 with int8 weights, every other node 0.01, and a model pays ``edge`` for
    each uint8 graph input or output - the layout change a standalone int8 subgraph pays at its
    edges and the whole model, whose inputs and outputs are float, never does."""

    name = "edge-clock"

    def __init__(self, edge: float = 0.25, node: float = 0.01, io: float = 0.0):
        self.edge, self.node, self.io = edge, node, io

    def key(self):
        return {"backend": "edge-clock", "edge": self.edge, "node": self.node, "io": self.io}

    def _timing(self, model) -> Timing:
        from onnx import TensorProto

        made_by = {o: n.op_type for n in model.graph.node for o in n.output}
        cost = 0.0
        for n in model.graph.node:
            if n.op_type in ("Conv", "MatMul", "Gemm"):
                cost += 0.3 if made_by.get(n.input[1]) == "DequantizeLinear" else 1.0
            elif n.op_type == "MatMulInteger":  # int8_dyn
                cost += 0.5
            else:
                cost += self.node
        edges = [v for v in list(model.graph.input) + list(model.graph.output)
                 if v.type.tensor_type.elem_type == TensorProto.UINT8]
        io = self.io * (len(model.graph.input) + len(model.graph.output))  # any graph edge, any dtype
        return Timing.of([1e-3 * (cost + self.edge * len(edges) + io)] * 5)


@pytest.fixture(scope="module")
def cnn_timing_setup(cnn_model):
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.subgraphs import capture_inputs

    layers = find_layers(cnn_model)
    feeds = models.feeds_for(cnn_model, n=8)
    ranges = compute_ranges(cnn_model, layers, Samples(feeds))
    part = partition(cnn_model, layers, formats={l.name: ["int8"] for l in layers})
    captured = capture_inputs(cnn_model, part, Samples(feeds), batch_size=8)
    return cnn_model, layers, feeds, ranges, part, captured


def test_int8_anchor_puts_the_every_int8_plan_at_its_measured_time(cnn_timing_setup):
    """Standalone int8 subgraphs pay edges the model does not: the parts under-predict the
    every-int8 plan. The difference goes to the cuts with int8 work on both sides (each int8
    part pays one edge there alone, two per cut), so after the fit the table predicts what
    the model measures for the every-int8 plan and for a plan with half the layers int8,
    which earns the bonus of its one int8-int8 cut only."""
    from ampq_pass.stages.rewrite import rewrite
    from ampq_pass.stages.timing import gain_table

    model, layers, feeds, ranges, part, captured = cnn_timing_setup
    clock = EdgeClock()
    table = gain_table(model, layers, part, ranges, captured, clock, formats=("int8",), progress=False,
                       model_inputs=[feeds])
    anchor = table.format_anchors["int8"]

    def measured(plan):
        return clock._timing(model).median / clock._timing(
            rewrite(model, layers, table.plan(plan), ranges, rules=clock.capabilities().rules)).median

    every = {l.name: "int8" for l in layers}
    assert anchor["applied"] and anchor["bonus_cuts"] == 3 and anchor["factor"] == 1.0
    assert anchor["cut_bonus"] == pytest.approx(2 * clock.edge * 1e-3)
    assert anchor["predicted_speedup"] < measured(every)  # the check can fail: the parts alone under-predict
    assert anchor["measured_speedup"] == pytest.approx(measured(every))
    assert predict_speedup(table, every) == pytest.approx(measured(every), rel=1e-6)
    half = {l.name: "int8" for l in layers[:3]}  # the stem and the first block
    assert table.bonus_cuts(table.lookup_all(half)) == ["/Relu_output_0"]
    assert 1.0 < predict_speedup(table, half) < measured(every)
    assert predict_speedup(table, half) == pytest.approx(measured(half), rel=1e-6)
    assert all(c.gain == pytest.approx(s.hp_time - c.time) for s in table.subgraphs for c in s.configs
               if "int8" in c.formats.values())

    # parts that add up exactly (no edges, free Q/DQ): nothing to fit
    exact = gain_table(model, layers, part, ranges, captured, EdgeClock(edge=0.0, node=0.0), formats=("int8",),
                       progress=False, model_inputs=[feeds])
    assert not exact.format_anchors["int8"]["applied"] and "within the noise" in exact.format_anchors["int8"]["outcome"]


def _block_setup(block_model, wanted: tuple[str, ...]):
    """The encoder block partitioned for the formats of ``wanted`` each layer can take, with its
    calibration ranges and every subgraph's captured inputs (batch 8)."""
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.subgraphs import capture_inputs

    layers = find_layers(block_model)
    feeds = models.feeds_for(block_model, n=8)
    ranges = compute_ranges(block_model, layers, Samples(feeds))
    offered = {l.name: [f for f in wanted if f in l.formats] for l in layers}
    part = partition(block_model, layers, formats=offered)
    captured = capture_inputs(block_model, part, Samples(feeds), batch_size=8)
    return layers, feeds, ranges, offered, part, captured


def test_format_anchors_fit_each_format_and_mix_them(block_model, monkeypatch):
    """With int8 and int8_dyn offered and a cost every standalone graph edge pays, each format's
    every-layer plan is predicted at what the clock gives the rewritten model, and a
    configuration mixing the two gets the layer-weighted mean of their factors."""
    from ampq_pass.stages.rewrite import rewrite
    from ampq_pass.stages.timing import gain_table

    layers, feeds, ranges, offered, part, captured = _block_setup(block_model, ("int8", "int8_dyn"))
    assert len(part.subgraphs) >= 2
    clock = EdgeClock(edge=0.1, io=0.2)
    import ampq_pass.stages.timing as timing

    # both formats anchored (the pass anchors the 8-bit cut states only: timing.ANCHORED_FORMATS says why)
    monkeypatch.setattr(timing, "ANCHORED_FORMATS", ("int8", "int8_dyn"))
    table = gain_table(block_model, layers, part, ranges, captured, clock, formats=("int8", "int8_dyn"),
                       progress=False, model_inputs=[feeds])
    assert set(table.format_anchors) == {"int8", "int8_dyn"}
    for fmt, anchor in table.format_anchors.items():
        plan = {name: fmt for name, fmts in offered.items() if fmt in fmts}
        measured = clock._timing(block_model).median / clock._timing(
            rewrite(block_model, layers, table.plan(plan), ranges, rules=clock.capabilities().rules)).median
        assert anchor["applied"], anchor
        assert predict_speedup(table, plan) == pytest.approx(measured, rel=1e-6), fmt
    f8, fd = (table.format_anchors[f]["factor"] for f in ("int8", "int8_dyn"))
    monkeypatch.setattr(timing, "fit_formats_to_model", lambda *a, **k: {})  # the parts fitted to hp only
    before = {sg.index: sg.configs for sg in gain_table(block_model, layers, part, ranges, captured, clock,
                                                        formats=("int8", "int8_dyn"), progress=False,
                                                        model_inputs=[feeds]).subgraphs}
    mixed = 0
    for sg in table.subgraphs:
        for c in sg.configs:
            low = [f for f in c.formats.values() if f != "hp"]
            if {"int8", "int8_dyn"} <= set(low):
                raw = [r for r in before[sg.index] if r.formats == c.formats and r.cuts == c.cuts][0]
                mixed += 1
                expect = (f8 * low.count("int8") + fd * low.count("int8_dyn")) / len(low)
                assert c.time == pytest.approx(raw.time * expect)

    assert mixed > 0


class _AnchorCapClock(EdgeClock):
    """EdgeClock with a timing protocol on a fake clock: every call takes ``step`` seconds and
    records which models it timed under which wall-clock cap."""

    def __init__(self, now: list, step: float, calls: list):
        super().__init__()
        self.protocol, self.now, self.step, self.calls = Protocol(), now, step, calls

    def _record(self, names):
        whole = "model" in names or sorted(names) == ["hp", "plan"]  # an anchor: a subgraph's rounds are free
        self.calls.append((sorted(names), self.protocol.max_seconds))
        self.now[0] += self.step if whole else 0.0

    def time(self, models, inputs):
        self._record(models)
        return super().time(models, inputs)

    def time_each(self, jobs):
        self._record(jobs)
        return super().time_each(jobs)


def test_the_whole_model_anchors_keep_to_the_timing_allowance(cnn_timing_setup, monkeypatch):
    """The subgraphs take SUBGRAPH_SHARE of the allowance; the whole-model anchors (hp, int8)
    share what is left, each an equal part, and a format that is a whole-model candidate only
    (int8_dyn here) is measured only while time is left. Before, the anchors ran outside the
    allowance at the protocol's 60 s cap each (OpenVINO's ConvNeXt-T: 514 s for 325 s)."""
    import types
    import ampq_pass.stages.timing as timing
    from ampq_pass.stages.timing import gain_table

    model, layers, feeds, ranges, part, captured = cnn_timing_setup
    now, calls = [0.0], []
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    def run(seconds, spent_in_subgraphs):
        def subgraph(sub, sub_layers, cfgs, *args, seconds=None, **kw):
            now[0] += spent_in_subgraphs / len(part.subgraphs)
            return real(sub, sub_layers, cfgs, *args, **kw)

        monkeypatch.setattr(timing, "time_subgraph", subgraph)
        calls.clear()
        clock = _AnchorCapClock(now, step=5.0, calls=calls)
        start = now[0]
        table = gain_table(model, layers, part, ranges, captured, clock, formats=("int8",), progress=False,
                           model_inputs=[feeds], seconds=seconds)
        return table, now[0] - start

    def anchors():
        return [cap for names, cap in calls if "model" in names or names == ["hp", "plan"]]

    real = timing.time_subgraph
    table, _ = run(100.0, spent_in_subgraphs=50.0)
    assert len(anchors()) == 2 and "int8" in table.format_anchors  # the hp anchor, then the int8 one
    assert anchors()[0] <= 50.0 / 2  # 50 s left after the subgraphs, two anchors
    assert anchors()[1] == pytest.approx(50.0 - 5.0)  # what the hp anchor left, to the last anchor
    # subgraphs that overran the whole allowance leave the anchors their protocol's floor only
    run(100.0, spent_in_subgraphs=150.0)
    assert anchors() == [0.0, 0.0]
    # no allowance: the protocol's caps
    run(None, spent_in_subgraphs=0.0)
    assert {cap for _, cap in calls} == {Protocol().max_seconds}


def test_a_candidate_format_is_measured_only_while_the_allowance_lasts(block_model, monkeypatch):
    """int8_dyn's every-layer plan is a whole-model candidate (not an anchor): measured after
    the anchors when time is left, skipped when the allowance is spent."""
    import types
    import ampq_pass.stages.timing as timing
    from ampq_pass.stages.timing import fit_formats_to_model, gain_table

    layers, feeds, ranges, offered, part, captured = _block_setup(block_model, ("int8", "int8_dyn"))
    now, calls = [0.0], []
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    clock = _AnchorCapClock(now, step=5.0, calls=calls)
    table = gain_table(block_model, layers, part, ranges, captured, clock, formats=("int8", "int8_dyn"),
                       progress=False, model_inputs=[feeds], boundary_states=False)
    candidates = {l.name: ["hp", *fs] for l, fs in zip(layers, offered.values())}
    for seconds, measured in ((30.0, {"int8", "int8_dyn"}), (4.0, {"int8"})):
        calls.clear()
        got = fit_formats_to_model(table, block_model, layers, ranges, [feeds], clock, candidates,
                                   formats=("int8",), seconds=seconds)
        assert set(got) == measured, seconds
        assert calls[0][1] == pytest.approx(seconds / 2)  # the anchor first, half of it: the candidate may follow


def test_a_model_far_faster_than_its_int8_parts_still_credits_its_cuts(cnn_timing_setup):
    """Standalone int8 subgraphs so burdened by their uint8 edges that int8 looks slower than hp
    alone, while the whole model in int8 (no such edges) is far faster: the factor that would
    scale the parts is below FIT_BOUNDS (as on OpenVINO's ResNet-50, 0.499), yet the cut bonus
    still applies - it scales nothing, it credits the int8-int8 cuts - so the every-int8 plan is
    predicted at its measurement and the solver, with the budget loose, takes it."""
    from ampq_pass.stages.rewrite import rewrite
    from ampq_pass.stages.sensitivity import sensitivity
    from ampq_pass.pipeline import build_options
    from ampq_pass.stages.solve import solve
    from ampq_pass.stages.timing import FIT_BOUNDS, gain_table

    model, layers, feeds, ranges, part, captured = cnn_timing_setup
    clock = EdgeClock(edge=2.0)
    table = gain_table(model, layers, part, ranges, captured, clock, formats=("int8",), progress=False,
                       model_inputs=[feeds])
    anchor = table.format_anchors["int8"]
    every = {l.name: "int8" for l in layers}
    measured = clock._timing(model).median / clock._timing(
        rewrite(model, layers, table.plan(every), ranges, rules=clock.capabilities().rules)).median
    assert anchor["parts_factor"] < FIT_BOUNDS[0] and anchor["applied"] and anchor["bonus_cuts"] == 3
    assert anchor["predicted_speedup"] < 1.0 < measured  # the parts alone: int8 slower than hp
    assert predict_speedup(table, every) == pytest.approx(measured, rel=1e-6)
    sens = sensitivity(model, layers, ranges, Samples(feeds), progress=False)
    assert solve(build_options(table, sens), float("inf"), cut_bonus=table.cut_bonus).plan.formats == every


def _without_cut_bonus(monkeypatch):
    """The timing stage's int8 anchor measured but not fitted (as when its factor is out of
    bounds and no cut can be credited): the parts keep their standalone times."""
    import ampq_pass.stages.timing as timing

    real = timing.fit_formats_to_model

    def fit(table, *args, **kwargs):
        records = real(table, *args, **kwargs)
        table.cut_bonus.clear()
        return {f: {**r, "applied": False, "outcome": "not fitted (test)"} for f, r in records.items()}

    monkeypatch.setattr(timing, "fit_formats_to_model", fit)


def test_the_int8_anchor_is_a_candidate_when_it_fits_the_budget(cnn_timing_setup, monkeypatch):
    """With the parts left as timed alone (int8 cuts look slower than hp there) the solver keeps
    layers hp; the anchor plan, measured faster while timing, is offered to be verified when
    its loss fits."""
    from ampq_pass.pipeline import PassOptions, _anchor_solution, build_options
    from ampq_pass.stages.sensitivity import sensitivity
    from ampq_pass.stages.solve import solve
    from ampq_pass.stages.timing import gain_table

    _without_cut_bonus(monkeypatch)
    model, layers, feeds, ranges, part, captured = cnn_timing_setup
    table = gain_table(model, layers, part, ranges, captured, EdgeClock(edge=2.0), formats=("int8",),
                       progress=False, model_inputs=[feeds])
    anchor = table.format_anchors["int8"]
    assert anchor["measured_speedup"] > 1.0 and not anchor["applied"] and not table.cut_bonus
    sens = sensitivity(model, layers, ranges, Samples(feeds), progress=False)
    options = build_options(table, sens)
    loose = solve(options, float("inf"))
    assert len(loose.plan.formats) < len(layers)  # int8 cuts look too costly alone
    taken = _anchor_solution(table, options, sens, float("inf"), PassOptions())
    assert set(taken.plan.formats.values()) == {"int8"} and len(taken.plan.formats) == len(layers)
    assert taken.plan.cuts and taken.status == "measured"
    assert _anchor_solution(table, options, sens, 0.0, PassOptions()) is None  # its loss does not fit
    assert _anchor_solution(table, options, sens, float("inf"), PassOptions(max_memory=1e9)) is None


@pytest.mark.parametrize("left", [None, 1e-3], ids=["budget", "budget-nearly-spent"])
def test_the_pass_verifies_the_anchor_and_ships_it_when_faster(cnn_model, tmp_path, monkeypatch, left):
    """Through run_pass: the solver's plan is verified, then the anchor plan, measured faster
    while timing, is verified too and shipped because it is the fastest verified plan - also
    where less of the time budget is left than a verification takes (it can only help)."""
    import onnx

    import ampq_pass.pipeline as pipeline
    from ampq_pass.pipeline import run_pass

    _without_cut_bonus(monkeypatch)
    if left is not None:
        monkeypatch.setattr(pipeline.TimeBudget, "left", lambda self: left)
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model, path)
    result = run_pass(path, tmp_path / "out.onnx", samples=Samples(models.feeds_for(cnn_model, n=24)),
                      backend=EdgeClock(edge=2.0), max_loss_rmse=10.0, progress=False, holdout=8, log=lambda s: None)
    rounds = result.report["rounds"]
    assert rounds[-1]["note"] == "int8 anchor" and rounds[0]["layers_quantized"] < rounds[-1]["layers_quantized"]
    assert rounds[-1]["measured_speedup"] > rounds[0]["measured_speedup"]
    assert len(result.solution.plan.formats) == len(find_layers(cnn_model)) and result.solution.status == "measured"
    # predicted at its whole-model measurement while timing (the deterministic clock: exactly the verified one)
    anchor = result.report["boundaries"]["format_anchors"]["int8"]
    assert rounds[-1]["predicted_speedup"] == pytest.approx(anchor["measured_speedup"])
    assert rounds[-1]["predicted_speedup"] == pytest.approx(rounds[-1]["measured_speedup"], rel=1e-6)
    assert result.report["predicted"]["speedup"] == pytest.approx(rounds[-1]["predicted_speedup"])


def test_session_bytes_counts_weights_and_computed_tensors_at_the_feeds_shapes():
    from ampq_pass.stages.timing import session_bytes

    w = np.ones((16, 32), dtype=np.float32)
    m = models.single_matmul(w)
    name = m.graph.input[0].name
    small = session_bytes(m, {name: np.zeros((4, 16), np.float32)})
    big = session_bytes(m, {name: np.zeros((400, 16), np.float32)})
    assert small == w.nbytes + 4 * 32 * 4
    assert big - small == (400 - 4) * 32 * 4


def test_the_timing_batch_is_cut_to_what_one_whole_model_session_may_hold():
    from ampq_pass.stages.timing import fit_timing_batch, session_bytes

    w = np.ones((16, 32), dtype=np.float32)
    m = models.single_matmul(w)
    name = m.graph.input[0].name
    rng = np.random.default_rng(0)
    feeds = [{name: rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(2)]
    bound = session_bytes(m, {name: feeds[0][name][:3]})  # weights + 3 samples' output
    cut, note = fit_timing_batch(m, feeds, bound=bound)
    assert [f[name].shape for f in cut] == [(3, 16)] * 2 and "batch cut from 8 to 3" in note
    assert np.array_equal(cut[1][name], feeds[1][name][:3])  # the same real samples, fewer of them
    assert fit_timing_batch(m, feeds, bound=bound - 1)[0][0][name].shape == (2, 16)
    assert fit_timing_batch(m, feeds, bound=1)[0][0][name].shape == (1, 16)  # never below one sample
    same, none = fit_timing_batch(m, feeds, bound=session_bytes(m, feeds[0]))
    assert same is feeds and none is None
    single = [{name: feeds[0][name][:1]}]
    assert fit_timing_batch(m, single, bound=1) == (single, None)


def test_groups_shrink_when_their_sessions_would_hold_too_much(monkeypatch):
    import ampq_pass.stages.timing as timing

    m = models.single_matmul(np.ones((16, 32), dtype=np.float32))
    feeds = {m.graph.input[0].name: np.zeros((1000, 16), np.float32)}  # 128 kB out + 2 kB weight
    assert timing.group_size(m, feeds) == timing.GROUP
    monkeypatch.setattr(timing, "GROUP_BYTES", 3 * 130_048)
    assert timing.group_size(m, feeds) == 3
    monkeypatch.setattr(timing, "GROUP_BYTES", 1000)
    assert timing.group_size(m, feeds) == 2  # hp and one configuration, whatever the size


class _ProtocolClock(Backend):
    """A deterministic device with a timing protocol: a configuration takes 1.0 minus 0.3 per
    int8 layer and 0.1 per fp16 layer; records which protocol timed which labels."""

    name, unit = "protocol-clock", "s"

    def __init__(self):
        self.protocol = Protocol()
        self.calls = []

    def capabilities(self):
        return Capabilities(("int8", "fp16"), "fp32", "none")

    def key(self):
        return {"backend": "protocol-clock"}

    def time(self, models, inputs):
        self.calls.append((self.protocol.max_repeats, sorted(models)))

        def t(label):
            return 1.0 - 0.3 * label.count("=int8,") - 0.3 * label.endswith("=int8") - 0.1 * label.count("=fp16")
        return {k: Timing.of([t(k)] * 5) for k in models}


def test_clearly_dominated_configurations_are_timed_quickly_only(mlp_setup):
    """fp16 is slower than int8 here; with fp16's loss no lower, every configuration
    using it is dominated by the same one with int8 and is not timed with the full protocol."""
    from itertools import product
    from ampq_pass.stages.timing import config_name

    m, layers, feeds, ranges, _ = mlp_setup
    configs = [dict(zip([l.name for l in layers], fs)) for fs in product(("hp", "int8", "fp16"), repeat=len(layers))]
    loss = {l.name: {"int8": 1e-3, "fp16": 1e-3} for l in layers}
    clock = _ProtocolClock()
    sg = time_subgraph(m, layers, configs, ranges, [feeds], clock, loss=loss)
    full = {lab for reps, labs in clock.calls if reps == Protocol().max_repeats for lab in labs}
    quick = {lab for reps, labs in clock.calls if reps < Protocol().max_repeats for lab in labs}
    assert len(quick) == len(configs)  # everything once, quickly
    for c in sg.configs:
        label = config_name(c.formats)
        uses_fp16 = "fp16" in c.formats.values()
        assert c.quick == uses_fp16 and (label in full) == (not uses_fp16 or label == "hp"), label
    # the kept ones carry the full measurement; all gains are right either way (no noise here)
    assert all(c.measured_gain == pytest.approx(1.0 - (sum(0.7 if f == "int8" else 0.9 if f == "fp16" else 1.0
                                                           for f in c.formats.values()) - (len(layers) - 1)))
               for c in sg.configs)
    # with a lower loss, fp16 is no longer dominated: everything is timed in full
    clock2 = _ProtocolClock()
    cheaper = {l.name: {"int8": 1e-3, "fp16": 1e-4} for l in layers}
    sg2 = time_subgraph(m, layers, configs, ranges, [feeds], clock2, loss=cheaper)
    assert not any(c.quick for c in sg2.configs)


@pytest.fixture(scope="module")
def decoder3_setup():
    """A three-layer decoder, partitioned with int8 offered, and its captured subgraph inputs."""
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.subgraphs import capture_inputs

    m = models.llama_decoder(layers=3)
    layers = find_layers(m)
    feeds = models.feeds_for(m, n=4)
    ranges = compute_ranges(m, layers, Samples(feeds))
    part = partition(m, layers, formats={l.name: [f for f in l.formats if f == "int8"] for l in layers})
    captured = capture_inputs(m, part, Samples(feeds), batch_size=4)
    return m, layers, ranges, part, captured


@pytest.mark.parametrize("use_cache", [True, False])
def test_repeated_blocks_are_timed_once(tmp_path, use_cache, monkeypatch, decoder3_setup):
    """A three-layer decoder: later layers' subgraphs repeat earlier ones' structure. Each
    distinct structure is timed once, with or without a disk cache; the repeats carry the
    first one's measurement in their own names and say which subgraph they repeat."""
    import ampq_pass.stages.timing as timing
    from ampq_pass.stages.timing import gain_table

    monkeypatch.setattr(timing, "GROUP", 64)  # one timing call per subgraph: the calls count subgraphs
    m, layers, ranges, part, captured = decoder3_setup
    backend = Counting(OrtBackend(protocol=FAST, formats=("int8",), saturating_int8=True))
    table = gain_table(m, layers, part, ranges, captured, backend, cache=Cache(tmp_path) if use_cache else None,
                       progress=False, boundary_states=False)
    repeats = [s for s in table.subgraphs if s.repeat_of is not None]
    assert repeats, [s.name for s in table.subgraphs]
    assert backend.calls == len({s.key for s in table.subgraphs}) < len(table.subgraphs)
    by_index = {s.index: s for s in table.subgraphs}
    for s in repeats:
        first = by_index[s.repeat_of]
        assert first.repeat_of is None and first.index < s.index and not s.cached
        assert set(s.layers) == set(part.subgraphs[s.index].layers) and not set(s.layers) & set(first.layers)
        assert [c.time for c in s.configs] == [c.time for c in first.configs]
        assert [sorted(c.formats.values()) for c in s.configs] == [sorted(c.formats.values()) for c in first.configs]


class _AllAtOncePool:
    """A device pool that takes every job before finishing any: repeats of a structure still
    in flight must wait for it instead of being timed again."""

    def __init__(self, measurer):
        self.measurer, self.jobs = measurer, 0

    def map(self, fn, jobs):
        jobs = list(jobs)
        self.jobs += len(jobs)
        for tag, args in jobs:
            yield tag, fn(self.measurer, *args)


def test_pool_times_each_structure_once_even_when_repeats_are_in_flight(monkeypatch, decoder3_setup):
    import ampq_pass.stages.timing as timing
    from ampq_pass.stages.timing import gain_table

    monkeypatch.setattr(timing, "GROUP", 64)
    m, layers, ranges, part, captured = decoder3_setup
    backend = Counting(OrtBackend(protocol=FAST, formats=("int8",), saturating_int8=True))
    pool = _AllAtOncePool(backend)
    table = gain_table(m, layers, part, ranges, captured, backend, pool=pool, progress=False, boundary_states=False)
    distinct = len({s.key for s in table.subgraphs})
    assert pool.jobs == backend.calls == distinct < len(table.subgraphs)
    assert [s.index for s in table.subgraphs] == [s.index for s in part.subgraphs]
    assert all(set(s.layers) == set(p.layers) for s, p in zip(table.subgraphs, part.subgraphs))
    assert sum(s.repeat_of is not None for s in table.subgraphs) == len(table.subgraphs) - distinct


def test_anchor_chunks_bound_the_weights_timed_beside_the_model(monkeypatch):
    """Subgraphs in order, cut into runs whose weights stay under the bound."""
    import ampq_pass.stages.timing as timing
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.timing import anchor_chunks

    m = models.llama_decoder(layers=3)
    layers = find_layers(m)
    part = partition(m, layers, formats={l.name: ["int8"] for l in layers})
    assert [s.index for c in anchor_chunks(m, part) for s in c] == [s.index for s in part.subgraphs]
    assert len(anchor_chunks(m, part)) == 1
    monkeypatch.setattr(timing, "ANCHOR_CHUNK_BYTES", 1)  # every subgraph alone
    chunks = anchor_chunks(m, part)
    assert [len(c) for c in chunks] == [1] * len(part.subgraphs)



def test_anchor_chunks_bound_what_the_sessions_hold(monkeypatch):
    """Activations count too: sessions of 400 units against a bound of 1000, the whole model's
    600 in the first chunk: one subgraph beside the model, then two at a time."""
    import ampq_pass.stages.timing as timing
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.timing import anchor_chunks

    m = models.llama_decoder(layers=3)
    layers = find_layers(m)
    part = partition(m, layers, formats={l.name: ["int8"] for l in layers})
    n = len(part.subgraphs)
    assert n >= 4
    monkeypatch.setattr(timing, "ANCHOR_SESSION_BYTES", 1000)
    chunks = anchor_chunks(m, part, sessions={s.index: 400 for s in part.subgraphs}, model_bytes=600)
    assert [len(c) for c in chunks] == [1] + [2] * ((n - 1) // 2) + [1] * ((n - 1) % 2)
    assert [s.index for c in chunks for s in c] == [s.index for s in part.subgraphs]
    # a session larger than the bound still gets a chunk of its own
    assert [len(c) for c in anchor_chunks(m, part, sessions={s.index: 5000 for s in part.subgraphs})] == [1] * n


class _DriftingClock(SizeClock):
    """Times every model by its node count, the machine 1.5x slower at every later call: the
    chunks must be put back on the first one's scale (through the subgraph timed in each)."""

    name = "drifting-clock"

    def __init__(self):
        self.calls = self.models = 0

    def key(self):
        return {"backend": "drifting-clock"}

    def time_each(self, jobs):
        self.calls += 1
        self.models += len(jobs)
        slow = 1.5 ** (self.calls - 1)
        return {k: Timing.of([1e-3 * len(m.graph.node) * slow] * 5) for k, (m, _) in jobs.items()}


def test_anchor_hp_times_in_chunks_share_one_scale(monkeypatch):
    import ampq_pass.stages.timing as timing
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.subgraphs import capture_inputs, extract
    from ampq_pass.stages.timing import anchor_hp_times

    m = models.llama_decoder(layers=2)
    layers = find_layers(m)
    feeds = models.feeds_for(m, n=4)
    part = partition(m, layers, formats={l.name: ["int8"] for l in layers})
    captured = capture_inputs(m, part, Samples(feeds), batch_size=4)
    monkeypatch.setattr(timing, "ANCHOR_CHUNK_BYTES", 1)
    clock = _DriftingClock()
    (total, _), hp = anchor_hp_times(m, part, captured, [feeds], clock)
    assert clock.calls == len(part.subgraphs) > 1
    assert clock.models == 1 + 1 + 2 * (len(part.subgraphs) - 1)  # the model once, the carrier in every chunk
    assert total == pytest.approx(1e-3 * len(m.graph.node))
    for s in part.subgraphs:
        assert hp[s.index] == pytest.approx(1e-3 * len(extract(m, s).graph.node)), s.index


class _CapClock(_ProtocolClock):
    """Each timing call takes ``step`` seconds of a fake clock; records each call's cap."""

    def __init__(self, step: float, now: list):
        super().__init__()
        self.step, self.now, self.caps = step, now, []

    def time(self, models, inputs):
        self.caps.append((self.protocol.max_seconds, self.protocol.retries))
        self.now[0] += self.step
        return super().time(models, inputs)


def test_a_time_allowance_is_shared_among_the_groups_left(mlp_setup, monkeypatch):
    """Each group's attempt may take what is left of the allowance divided by the groups still
    to time; without an allowance every attempt keeps the protocol's cap."""
    import types
    from itertools import product
    import ampq_pass.stages.timing as timing

    m, layers, feeds, ranges, _ = mlp_setup
    now = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(timing, "GROUP", 4)  # hp and three configurations a group
    configs = [dict(zip([l.name for l in layers], fs)) for fs in product(("hp", "int8", "fp16"), repeat=len(layers))]
    n_timed = len(configs) - 1
    groups = -(-n_timed // 3)
    assert groups >= 3
    clock = _CapClock(step=2.0, now=now)
    time_subgraph(m, layers, configs, ranges, [feeds], clock, seconds=12.0)
    assert len(clock.caps) == groups
    left = 12.0
    for k, (cap, retries) in enumerate(clock.caps):
        assert cap == pytest.approx(min(Protocol().max_seconds, max(left, 0.0) / (groups - k))) and retries == 0
        left -= 2.0
    assert clock.caps[-1][0] < clock.caps[0][0] or clock.caps[-1][0] == 0.0
    free = _CapClock(step=2.0, now=now)
    time_subgraph(m, layers, configs, ranges, [feeds], free)
    assert free.caps == [(Protocol().max_seconds, Protocol().retries)] * groups


def test_gain_table_shares_its_allowance_by_configurations(block_model, monkeypatch):
    """Each subgraph gets what is left of the stage's allowance times its share of the
    configurations still to time."""
    import types
    import ampq_pass.stages.timing as timing
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.subgraphs import capture_inputs
    from ampq_pass.stages.timing import gain_table

    m = block_model
    layers = find_layers(m)
    feeds = models.feeds_for(m, n=8)
    ranges = compute_ranges(m, layers, Samples(feeds))
    formats = {l.name: [f for f in l.formats if f == "int8"] for l in layers}
    part = partition(m, layers, formats=formats)
    captured = capture_inputs(m, part, Samples(feeds), batch_size=4)
    now = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    given, real = [], timing.time_subgraph

    def recording(sub, sub_layers, cfgs, *args, seconds=None, **kw):
        given.append((len(cfgs), seconds))
        now[0] += 3.0  # each subgraph takes 3 s of the fake clock
        return real(sub, sub_layers, cfgs, *args, **kw)

    monkeypatch.setattr(timing, "time_subgraph", recording)
    gain_table(m, layers, part, ranges, captured, OrtBackend(protocol=FAST, formats=("int8",), saturating_int8=True), progress=False,
               boundary_states=False, seconds=20.0)
    assert len(given) == len(part.subgraphs) >= 2
    total, spent = sum(n for n, _ in given), 0.0
    for n, seconds in given:  # the rest of the 20 s is the whole-model anchors'
        assert seconds == pytest.approx(max(20.0 * timing.SUBGRAPH_SHARE - spent, 0.0) * n / total)
        total -= n
        spent += 3.0


def test_subgraph_session_bytes_match_the_extracted_subgraphs(cnn_timing_setup):
    """One shape inference of the whole model gives each subgraph's session bytes: the same as
    inferring each extracted subgraph at its captured inputs (up to the constants an extracted
    subgraph embeds), and the model's own as session_bytes gives it."""
    from ampq_pass.stages.subgraphs import extract
    from ampq_pass.stages.timing import session_bytes, subgraph_session_bytes

    model, layers, feeds, ranges, part, captured = cnn_timing_setup
    batch = {k: v[:8] for k, v in feeds.items()}
    whole, held = subgraph_session_bytes(model, part, batch)
    assert whole == session_bytes(model, batch)
    assert set(held) == {s.index for s in part.subgraphs}
    for s in part.subgraphs:
        alone = session_bytes(extract(model, s), captured[s.index][0])
        assert held[s.index] == pytest.approx(alone, rel=0.02), s.index
    assert sum(held.values()) <= whole  # every subgraph's share is part of the model's


class TwoFormatClock(EdgeClock):
    """EdgeClock on a backend offering both 8-bit formats (as OpenVINO's CPU does), whose
    standalone int8_sym subgraphs pay twice the edge cost of int8 ones."""

    def capabilities(self):
        from dataclasses import replace

        return replace(super().capabilities(), formats=("int8", "int8_sym"))

    def _timing(self, model) -> Timing:
        sym = any(t.name.endswith("_int8_sym") for t in model.graph.initializer)
        if not sym:
            return super()._timing(model)
        doubled = EdgeClock(edge=2 * self.edge, node=self.node, io=self.io)
        return doubled._timing(model)


def test_two_8_bit_anchors_leave_each_shared_cut_the_smaller_bonus(cnn_timing_setup):
    """With int8 and int8_sym both anchored, each format's every-layer model credits its
    int8-int8 cuts; a cut both credit keeps the smaller bonus (the bonus is not kept per state,
    and the larger would credit one format's plans with the other's saving)."""
    from ampq_pass.stages.timing import gain_table

    model, layers, feeds, ranges, part, captured = cnn_timing_setup
    table = gain_table(model, layers, part, ranges, captured, TwoFormatClock(edge=2.0), formats=("int8", "int8_sym"),
                       progress=False, model_inputs=[feeds])
    credited = {f: a["cut_bonus"] for f, a in table.format_anchors.items() if a.get("applied") and "cut_bonus" in a}
    assert set(credited) == {"int8", "int8_sym"} and credited["int8"] != pytest.approx(credited["int8_sym"])
    assert table.cut_bonus
    assert all(b == pytest.approx(min(credited.values())) for b in table.cut_bonus.values())


def test_the_pass_verifies_the_fastest_anchor_whose_loss_fits(cnn_timing_setup):
    """Two 8-bit anchors (int8, int8_sym): with a budget only the more accurate one fits, that one
    is offered for verification; with a loose budget the one measured fastest; with a budget
    neither fits, none."""
    from ampq_pass.pipeline import PassOptions, _anchor_solution, build_options
    from ampq_pass.stages.sensitivity import predicted_mse, sensitivity
    from ampq_pass.stages.timing import gain_table

    class SlowSym(TwoFormatClock):  # int8_sym layers cost more: its (more accurate here) anchor is the slower
        def _timing(self, model) -> Timing:
            extra = 5e-4 * sum(t.name.endswith("_int8_sym") for t in model.graph.initializer)
            return Timing.of([v + extra for v in super()._timing(model).samples])

    model, layers, feeds, ranges, part, captured = cnn_timing_setup
    table = gain_table(model, layers, part, ranges, captured, SlowSym(edge=2.0), formats=("int8", "int8_sym"),
                       progress=False, model_inputs=[feeds])
    sens = sensitivity(model, layers, ranges, Samples(feeds), formats=("int8", "int8_sym"), progress=False)
    anchors = sorted(table.format_anchors.values(), key=lambda a: -a["measured_speedup"])
    assert len(anchors) == 2
    mse = [predicted_mse(sens, a["formats"]) for a in anchors]
    assert mse[0] != pytest.approx(mse[1])
    accurate = anchors[int(mse[1] < mse[0])]
    assert accurate is anchors[1]  # the case the choice matters in: the fastest anchor does not fit
    options, opts = build_options(table, sens), PassOptions().validate()
    between = _anchor_solution(table, options, sens, sum(mse) / 2, opts)
    assert dict(between.plan.formats) == accurate["formats"]
    assert dict(_anchor_solution(table, options, sens, max(mse) * 2, opts).plan.formats) == anchors[0]["formats"]
    assert _anchor_solution(table, options, sens, min(mse) / 2, opts) is None


class UniformClock(SizeClock):
    """A deterministic clock where int4 pays only in a whole model: a MatMul costs 1.0 in float,
    0.3 with int8 weights, 0.35 with int4 weights in a model of few int4 MatMuls and 0.1 in one
    of many (a decode step, memory-bound, where the whole model's weights shrink 8x, against
    subgraphs of a millisecond each); every other node 0.01."""

    name = "uniform-clock"

    def __init__(self, many: int):
        self.many = many

    def key(self):
        return {"backend": "uniform-clock", "many": self.many}

    def _timing(self, model) -> Timing:
        from onnx import TensorProto

        bits = {i.name: i.data_type for i in model.graph.initializer}
        made_by = {o: n for n in model.graph.node for o in n.output}
        weights = [made_by[n.input[1]] for n in model.graph.node
                   if n.op_type == "MatMul" and n.input[1] in made_by and made_by[n.input[1]].op_type == "DequantizeLinear"]
        int4 = sum(bits.get(dq.input[0]) == TensorProto.INT4 for dq in weights)
        cost = 0.0
        for n in model.graph.node:
            if n.op_type == "MatMul" and n.input[1] in made_by and made_by[n.input[1]].op_type == "DequantizeLinear":
                cost += (0.1 if int4 >= self.many else 0.35) if bits.get(made_by[n.input[1]].input[0]) == TensorProto.INT4 else 0.3
            elif n.op_type in ("MatMul", "Gemm", "Conv"):
                cost += 1.0
            else:
                cost += 0.01
        return Timing.of([1e-3 * cost] * 5)


def test_other_formats_uniform_plans_are_measured_as_candidates_and_scale_nothing(block_model, monkeypatch):
    """int4 is not a cut state, so it anchors nothing; its uniform plan is measured in the whole
    model as a candidate, and every int4 configuration keeps its standalone time."""
    from ampq_pass.stages.timing import gain_table

    layers, feeds, ranges, formats, part, captured = _block_setup(block_model, ("int8", "int4"))
    clock = UniformClock(many=len(layers))
    kw = dict(formats=("int8", "int4"), candidates=formats, progress=False, model_inputs=[feeds])
    table = gain_table(block_model, layers, part, ranges, captured, clock, **kw)
    record = table.format_anchors["int4"]
    assert record["layers"] == sum("int4" in f for f in formats.values()) and not record["applied"]
    assert record["outcome"].startswith("measured as a whole-model candidate")
    assert record["measured_speedup"] > table.format_anchors["int8"]["measured_speedup"]
    # nothing scaled: the same int4 configurations as a table without the candidate's measurement
    alone = gain_table(block_model, layers, part, ranges, captured, clock, **{**kw, "model_inputs": None})
    times = lambda t: sorted(round(c.time, 12) for sg in t.subgraphs for c in sg.configs if "int4" in c.formats.values())
    assert times(table) == pytest.approx(times(alone))
    # where no cut can carry 8 bits (a decoder whose cuts all pass a norm) nothing is anchored,
    # every uniform plan is a candidate
    import ampq_pass.stages.timing as timing

    monkeypatch.setattr(timing, "boundary_cuts", lambda *a: {})
    plain = gain_table(block_model, layers, part, ranges, captured, clock, **kw)
    assert set(plain.format_anchors) == {"int8", "int4"} and not plain.cut_bonus
    assert all(r["outcome"].startswith("measured as a whole-model candidate") for r in plain.format_anchors.values())


def test_the_pass_ships_a_uniform_int4_plan_the_subgraphs_could_not_see(block_file, tmp_path):
    """Per subgraph int8 beats int4 (0.3 against 0.35), so the solver's plan is int8; the whole
    model in int4 measured faster while timing, so the pass verifies it and ships it."""
    import onnx

    from ampq_pass.pipeline import run_pass

    layers = find_layers(onnx.load(block_file))
    result = run_pass(block_file, tmp_path / "out.onnx", calib=tmp_path / "calib.npz", formats=("int8", "int4"),
                      backend=UniformClock(many=sum("int4" in l.formats for l in layers)), max_loss_rmse=1e6,
                      progress=False, log=lambda s: None)
    rounds = result.report["rounds"]
    assert "int4" not in rounds[0]["formats"].values()
    assert rounds[-1]["note"] == "int4 anchor" and set(result.solution.plan.formats.values()) == {"int4"}
    assert result.report["measured"]["speedup"] == pytest.approx(rounds[-1]["measured_speedup"])
    assert rounds[-1]["measured_speedup"] > rounds[0]["measured_speedup"]


def test_the_uniform_plan_leaves_out_layers_tied_to_one_the_format_was_screened_off(block_model):
    """q/k/v read one input and take one format together: with int4 screened off for k, the
    group offers int8 only, so "every layer in int4 that can be" leaves all three out (the plan
    taken from the candidates, with q and v in int4, is no configuration of the table)."""
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.subgraphs import capture_inputs
    from ampq_pass.stages.timing import gain_table, uniform_formats

    layers = find_layers(block_model)
    feeds = models.feeds_for(block_model, n=8)
    ranges = compute_ranges(block_model, layers, Samples(feeds))
    formats = {l.name: ["int8", "int4"] for l in layers} | {"/k/MatMul": ["int8"]}
    part = partition(block_model, layers, formats=formats, max_configs=16)  # the cap ties q/k/v
    assert ["/q/MatMul", "/k/MatMul", "/v/MatMul"] in part.subgraphs[0].groups
    captured = capture_inputs(block_model, part, Samples(feeds), batch_size=8)
    table = gain_table(block_model, layers, part, ranges, captured, SizeClock(), formats=("int8", "int4"),
                       candidates=formats, progress=False, model_inputs=[feeds])
    tied = {"/q/MatMul", "/k/MatMul", "/v/MatMul"}
    assert set(uniform_formats(table, "int4")) == {l.name for l in layers} - tied
    assert set(uniform_formats(table, "int8")) == {l.name for l in layers}
    table.lookup_all(uniform_formats(table, "int4"))  # a plan the table can price
    # and so the int4 candidate is measured (a plan from the candidates was skipped: no configuration)
    assert table.format_anchors["int4"]["layers"] == 3


def test_weight_layers_and_attention_matmuls_in_two_formats_are_a_whole_model_candidate(block_model):
    """With the attention MatMuls as layers and two 8-bit formats offered, the timing stage also
    measures the plans that put the weight layers in one and the attention MatMuls in the other
    (a backend may run each kind fastest in a different format, which no uniform plan shows);
    they scale nothing and carry what they are in words."""
    from ampq_pass.stages.partition import partition
    from ampq_pass.stages.subgraphs import capture_inputs
    from ampq_pass.stages.timing import gain_table

    layers = find_layers(block_model, activation_matmuls=True)
    scores = {l.name for l in layers if l.weight is None}
    assert scores and len(scores) < len(layers)
    feeds = models.feeds_for(block_model, n=8)
    ranges = compute_ranges(block_model, layers, Samples(feeds))
    offered = {l.name: [f for f in ("int8", "int8_sym") if f in l.formats] for l in layers}
    part = partition(block_model, layers, formats=offered)
    captured = capture_inputs(block_model, part, Samples(feeds), batch_size=8)
    from dataclasses import replace

    class TwoFormats(EdgeClock):  # a backend whose 8-bit formats are int8 and int8_sym (OpenVINO's)
        def capabilities(self):
            return replace(super().capabilities(), formats=("int8", "int8_sym"))

    clock = TwoFormats(edge=0.1)
    table = gain_table(block_model, layers, part, ranges, captured, clock, formats=("int8", "int8_sym"),
                       progress=False, model_inputs=[feeds])
    assert {"int8", "int8_sym", "int8+int8_sym", "int8_sym+int8"} <= set(table.format_anchors)
    for fw, fa in (("int8", "int8_sym"), ("int8_sym", "int8")):
        rec = table.format_anchors[f"{fw}+{fa}"]
        assert {l: f for l, f in rec["formats"].items() if l in scores} == {l: fa for l in scores}
        assert set(f for l, f in rec["formats"].items() if l not in scores) == {fw}
        assert rec["plan"] == f"weight layers in {fw}, activation-by-activation MatMuls in {fa}"
        assert not rec["applied"] and "whole-model candidate" in rec["outcome"]
    # measured as the anchors are even when the timing allowance is spent
    spent = gain_table(block_model, layers, part, ranges, captured, TwoFormats(edge=0.2), formats=("int8", "int8_sym"),
                       progress=False, model_inputs=[feeds], seconds=1e-9)
    assert {"int8+int8_sym", "int8_sym+int8"} <= set(spent.format_anchors)
    plain = find_layers(block_model)  # no attention MatMul layer: no split candidate
    part2 = partition(block_model, plain, formats={l.name: ["int8", "int8_sym"] for l in plain})
    table2 = gain_table(block_model, plain, part2, compute_ranges(block_model, plain, Samples(feeds)),
                        capture_inputs(block_model, part2, Samples(feeds), batch_size=8), clock,
                        formats=("int8", "int8_sym"), progress=False, model_inputs=[feeds])
    assert not any("+" in k for k in table2.format_anchors)
