"""mac and memory cost models on the small MLP, checked against hand-computed numbers.

MLP (tests/models.py, sizes 16-32-32-8), batch 4:
  fc1 MatMul x[4,16] . w1[16,32]        MACs 4*32*16 = 2048, weight 16*32*4 B = 2048 B
  fc2 Gemm   r1[4,32] . w2[32,32]^T     MACs 4*32*32 = 4096, weight 32*32*4 B = 4096 B
  fc3 MatMul r2[4,32] . w3[32,8]        MACs 4*8*32  = 1024, weight 32*8*4 B  = 1024 B
"""

from __future__ import annotations

import pytest

import models
from ampq_pass.backends.costmodels import MacModel, MemoryModel
from ampq_pass.core.samples import Samples
from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.timing import predict_speedup, time_subgraph


@pytest.fixture(scope="module")
def setup():
    m = models.mlp()
    layers = find_layers(m)
    feeds = models.feeds_for(m, n=4)
    return m, layers, [feeds], compute_ranges(m, layers, Samples(feeds))


def test_on_request_formats_are_offered_only_when_named():
    for model in (MacModel, MemoryModel):
        assert "int8" in model().capabilities().formats and "int8_w7" not in model().capabilities().formats
        assert model(formats=("int8_w7", "int4")).capabilities().formats == ("int4", "int8_w7")


def test_mac_costs_by_hand(setup):
    m, layers, inputs, _ = setup
    mac = MacModel()
    assert mac.macs(m, layers, inputs) == {"fc1": 2048, "fc2": 4096, "fc3": 1024}
    assert mac.cost(m, layers, {}, inputs) == 7168
    assert mac.cost(m, layers, {"fc1": "int8", "fc2": "int8", "fc3": "int8"}, inputs) == 7168 / 4
    assert mac.cost(m, layers, {"fc2": "fp16"}, inputs) == 2048 + 4096 / 2 + 1024
    assert mac.cost(m, layers, {"fc1": "int4"}, inputs) == 7168  # weight-only: MACs at hp rate
    custom = MacModel({"int8": 2.0})
    assert custom.cost(m, layers, {"fc3": "int8"}, inputs) == 2048 + 4096 + 512
    assert custom.key() != mac.key()
    with pytest.raises(AmpqError):
        MacModel({"int8": 0.0})


def test_mac_gain_table_by_hand(setup):
    m, layers, inputs, ranges = setup
    configs = [{"fc1": "int8"}, {"fc1": "int8", "fc2": "int8", "fc3": "int8"}, {"fc1": "int4"}]
    sg = time_subgraph(m, layers, configs, ranges, inputs, MacModel())
    gains = {tuple(v for v in c.formats.values()): c for c in sg.configs}
    assert sg.hp_time == 7168
    assert gains[("int8", "hp", "hp")].gain == 2048 * 0.75
    assert gains[("int8", "int8", "int8")].gain == 7168 * 0.75
    assert gains[("int4", "hp", "hp")].gain == 0 and not gains[("int4", "hp", "hp")].significant
    assert all(c.noise == 0 for c in sg.configs)


def test_memory_bytes_by_hand(setup):
    m, layers, inputs, ranges = setup
    mem = MemoryModel()
    assert mem.cost(m, layers, {}, inputs) == 2048 + 4096 + 1024
    # int8 w1: 512 B values + 32 fp32 scales (128 B) + 32 int8 zero points (32 B) = 672 B
    assert mem.cost(m, layers, {"fc1": "int8"}, inputs) == 672 + 4096 + 1024
    # int4 w1: K=16 padded to one block of 32 -> 16*32 values at 4 bits (256 B) + 1x32 fp32 scales (128 B)
    assert mem.cost(m, layers, {"fc1": "int4"}, inputs) == 384 + 4096 + 1024
    # fp16 w2: 32*32*2 = 2048 B
    assert mem.cost(m, layers, {"fc2": "fp16"}, inputs) == 2048 + 2048 + 1024
    sg = time_subgraph(m, layers, [{"fc1": "int8"}], ranges, inputs, mem)
    assert [c.gain for c in sg.configs] == [0.0, 2048 - 672]


def test_memory_with_activations_by_hand(setup):
    m, layers, inputs, _ = setup
    mem = MemoryModel(activations=True)
    # activations read by fc1/fc2/fc3: [4,16], [4,32], [4,32] fp32 = 256 + 512 + 512 B
    assert mem.cost(m, layers, {}, inputs) == 7168 + 1280
    # int8 fc1: its input activation is 1 byte per element: 64 B instead of 256 B
    assert mem.cost(m, layers, {"fc1": "int8"}, inputs) == 672 + 4096 + 1024 + 64 + 512 + 512
    # int4 is weight-only: activation stays fp32
    assert mem.cost(m, layers, {"fc1": "int4"}, inputs) == 384 + 4096 + 1024 + 1280


def test_cost_model_predicted_speedup(setup):
    m, layers, inputs, ranges = setup
    from ampq_pass.stages.timing import GainTable, measure_hp_total

    mac = MacModel()
    sg = time_subgraph(m, layers, [{l.name: "int8" for l in layers}], ranges, inputs, mac)
    total, noise = measure_hp_total(m, layers, inputs, mac)
    table = GainTable("mac", mac.key(), "mac", [sg], total, noise)
    assert predict_speedup(table, {l.name: "int8" for l in layers}) == pytest.approx(4.0)
