"""The Gaudi adapter's logic with an injected fake runtime on the CPU.

Nothing here runs on a Gaudi (none exists on these machines). The fake implements the
two fp8 entry points with torch's own float8_e4m3fn casts and counts calls, so the tests
check what the adapter does (which GEMMs become fp8, mark_step/synchronize per run, the
timing loop) and that the lowered graphs compute what ONNX Runtime computes.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
import torch

import models
from ampq_pass.core.measure import Protocol
from ampq_pass.backends.gaudi import GaudiBackend, HabanaRuntime, load_habana
from ampq_pass.core.samples import Samples
from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.timing import time_subgraph


def fake_runtime(calls: Counter) -> HabanaRuntime:
    def cast(x, scale_inv):
        calls["cast_to_fp8"] += 1
        return (x.float() * scale_inv).clamp(-448, 448).to(torch.float8_e4m3fn)

    def gemm(a, b, out_dtype, a_scale_inv, b_scale_inv):
        calls["fp8_gemm"] += 1
        assert a.dtype == b.dtype == torch.float8_e4m3fn and a.ndim == 2
        return ((a.float() * a_scale_inv) @ (b.float() * b_scale_inv)).to(out_dtype)

    return HabanaRuntime(torch, torch.device("cpu"), lambda: calls.update(["mark_step"]),
                         lambda: calls.update(["synchronize"]), cast, gemm, {"fake": "0"}, "fake")


def reference(model, feeds):
    # ORT_DISABLE_ALL: at ORT_ENABLE_ALL, ORT 1.32's CPU EP returns wrong results for the
    # fp8 QDQ Gemm of the MLP (error ~ the output's magnitude); unoptimised it is exact QDQ.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return s.run(None, {k: v for k, v in feeds.items() if k in names})


def fp8_plan(m, feeds):
    layers = find_layers(m)
    return rewrite(m, layers, Plan.uniform(layers, "fp8_e4m3"), compute_ranges(m, layers, Samples(feeds)))


# MLP: fc2 is a Gemm with bias, so it keeps the generic (dequantized) path; CNN: Conv and
# a Gemm with bias, no fused GEMM, every fp8 Q/DQ runs through the executor's ops.
@pytest.mark.parametrize("which, fused", [("mlp", 2), ("block", 6), ("cnn", 0)])
def test_lowering_matches_onnxruntime_and_uses_fp8_gemms(which, fused):
    m = {"mlp": models.mlp, "block": models.transformer_block, "cnn": models.cnn}[which]()
    feeds = models.feeds_for(m, n=4)
    q = fp8_plan(m, feeds)
    calls = Counter()
    b = GaudiBackend(runtime=fake_runtime(calls), hp_dtype=torch.float32)
    for model, n_fp8 in ((m, 0), (q, fused)):
        lowered = b.lower(model)
        assert lowered.n_fp8 == n_fp8
        calls.clear()
        out = b.run(lowered, lowered.feeds(feeds))
        assert calls["fp8_gemm"] == n_fp8 and calls["mark_step"] == 1
        np.testing.assert_allclose(out[0].numpy(), reference(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_bf16_hp_runs_in_bf16():
    m = models.transformer_block()
    feeds = models.feeds_for(m, n=2)
    b = GaudiBackend(runtime=fake_runtime(Counter()))
    lowered = b.lower(m)
    out = b.run(lowered, lowered.feeds(feeds))[0]
    assert out.dtype == torch.bfloat16
    ref = reference(m, feeds)[0]
    assert np.abs(out.float().numpy() - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("which", ["mlp", "block", "llama"])
def test_floats_live_on_the_device_and_are_never_read_back(which):
    # The meta device holds no data: any host read of a float (a lazy HPU graph would stall
    # on it) or any mix of host and device tensors raises, so this checks the placement the
    # CPU fake cannot see: floats on the device, integer shape arithmetic on the host.
    m = {"mlp": models.mlp, "block": models.transformer_block, "llama": models.llama_decoder}[which]()
    feeds = ({"input_ids": np.zeros((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64)}
             if which == "llama" else models.feeds_for(m, n=2))
    calls = Counter()
    b = GaudiBackend(runtime=dataclasses.replace(fake_runtime(calls), device=torch.device("meta")))
    for model in (m,) if which == "llama" else (m, fp8_plan(m, feeds)):
        lowered = b.lower(model)
        out = b.run(lowered, lowered.feeds(feeds))
        assert all(o.device.type == "meta" and o.dtype == torch.bfloat16 for o in out)
    assert calls["fp8_gemm"] == {"mlp": 2, "block": 6, "llama": 0}[which]


def test_slice_steps_and_double_casts_run_in_hp():
    # The executor's Slice takes steps (the old Gaudi lowering refused them); a Cast to
    # double stays in the device's hp type (Gaudi has no float64).
    from onnx import TensorProto, helper, numpy_helper

    ints = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    g = helper.make_graph(
        [helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["s"], name="slice"),
         helper.make_node("Cast", ["s"], ["d"], name="to_double", to=TensorProto.DOUBLE),
         helper.make_node("Cast", ["d"], ["y"], name="to_float", to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [ints("starts", [1, -1]), ints("ends", [9, -10]), ints("axes", [1, 0]), ints("steps", [3, -1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    feeds = {"x": np.arange(18, dtype=np.float32).reshape(2, 9)}
    b = GaudiBackend(runtime=fake_runtime(Counter()))
    lowered = b.lower(model)
    out = b.run(lowered, lowered.feeds(feeds))[0]
    assert out.dtype == torch.bfloat16
    np.testing.assert_array_equal(out.float().numpy(), reference(model, feeds)[0])


def test_time_marks_and_synchronizes_every_run():
    m = models.mlp()
    layers = find_layers(m)
    feeds = models.feeds_for(m, n=4)
    ranges = compute_ranges(m, layers, Samples(feeds))
    calls = Counter()
    p = Protocol(warmup=2, min_repeats=5, max_repeats=5, rel_ci=0.0, max_seconds=None)
    b = GaudiBackend(runtime=fake_runtime(calls), protocol=p)
    sg = time_subgraph(m, layers, [{"fc1": "fp8_e4m3", "fc3": "fp8_e4m3"}], ranges, [feeds], b)
    runs = 2 * (2 + 5)  # two configs x (warm-up + rounds)
    assert calls["mark_step"] == runs and calls["synchronize"] == runs
    assert calls["fp8_gemm"] == 2 * (2 + 5)  # only the fp8 config, two GEMMs per run
    assert [c.formats["fc1"] for c in sg.configs] == ["hp", "fp8_e4m3"]
    assert all(len(c.formats) == 3 for c in sg.configs)


def test_capabilities_and_key():
    b = GaudiBackend(runtime=fake_runtime(Counter()))
    caps = b.capabilities()
    assert caps.formats == ("fp8_e4m3",) and caps.hp == "bf16" and caps.device == "gaudi:fake"
    assert b.key()["versions"] == {"fake": "0"} and b.key()["device"] == "gaudi:fake"


def test_unsupported_op_is_a_clear_error():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"], name="hm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    with pytest.raises(AmpqError, match=r"ONNX op Hardmax \(node 'hm'\) is not supported"):
        GaudiBackend(runtime=fake_runtime(Counter())).lower(helper.make_model(g))


def test_missing_habana_stack_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)  # import fails like an absent package
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", None)
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch.core", None)
    with pytest.raises(AmpqError, match="habana_frameworks.torch"):
        load_habana()


def test_check_compares_fp8_against_hp_on_the_device():
    m = models.transformer_block()
    feeds = models.feeds_for(m, n=2)
    q = fp8_plan(m, feeds)
    b = GaudiBackend(runtime=fake_runtime(Counter()), hp_dtype=torch.float32)
    assert b.check(m, m, feeds) == 0.0
    err = b.check(q, m, feeds)
    assert 0.0 < err < 0.2  # fp8 error: present, bounded
