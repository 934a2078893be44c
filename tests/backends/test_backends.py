"""Backend interface, timing protocol and the ONNX Runtime adapter."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import models
from ampq_pass.backends import get_backend
from ampq_pass.core.measure import Capabilities, Protocol, Timing, interleave, median_ci
from ampq_pass.backends.costmodels import MacModel, MemoryModel
from ampq_pass.backends.ort import OrtBackend, available_providers, time_interleaved
from ampq_pass.core.ort import make_session
from ampq_pass.core.errors import AmpqError
from hardware import ORT_INT8, ORT_INT8_DYN

FAST = Protocol(warmup=1, min_repeats=3, max_repeats=6, rel_ci=0.5, max_seconds=5)


def test_median_ci_contains_median_and_narrows():
    rng = np.random.default_rng(0)
    small = rng.exponential(size=9)
    lo, hi = median_ci(small)
    assert lo <= np.median(small) <= hi
    big = rng.exponential(size=2000)
    lo2, hi2 = median_ci(big)
    assert lo2 <= np.log(2) <= hi2  # true median of Exp(1)
    assert hi2 - lo2 < hi - lo
    assert median_ci([3.0]) == (3.0, 3.0)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleave_stops_early_when_tight_and_rotates_order():
    clock, order = FakeClock(), []

    def runner(key, cost):
        def run(i):
            order.append((key, i))
            clock.now += cost
        return run

    p = Protocol(warmup=2, min_repeats=4, max_repeats=50, rel_ci=0.01, max_seconds=None)
    out = interleave({"a": runner("a", 1.0), "b": runner("b", 2.0)}, p, n_inputs=3, clock=clock)
    assert len(out["a"].samples) == 4  # constant times: CI is zero, stop at min_repeats
    assert out["a"].median == 1.0 and out["b"].median == 2.0 and out["b"].half_width == 0.0
    timed = order[4:]  # after 2 warm-ups each
    assert timed[:2] == [("a", 0), ("b", 0)] and timed[2:4] == [("b", 1), ("a", 1)]  # rotation; paired batches
    assert [i for _, i in timed] == [0, 0, 1, 1, 2, 2, 0, 0]


def test_interleave_runs_to_cap_when_noisy():
    clock = FakeClock()
    rng = np.random.default_rng(1)

    def noisy(i):
        clock.now += rng.choice([1.0, 3.0])

    p = Protocol(warmup=0, min_repeats=3, max_repeats=12, rel_ci=0.001, max_seconds=None)
    out = interleave({"x": noisy}, p, clock=clock)
    assert len(out["x"].samples) == 12


def test_timing_json_roundtrip():
    t = Timing.of([1.0, 2.0, 3.0, 4.0])
    assert Timing.from_json(t.to_json()) == t
    assert t.spread == pytest.approx(np.percentile([1, 2, 3, 4], 90) - np.percentile([1, 2, 3, 4], 10))


def test_cpu_capabilities_exclude_unfused_formats():
    caps = OrtBackend("cpu").capabilities()
    assert caps.formats == (ORT_INT8, ORT_INT8_DYN, "int4", "int4_b128") and caps.hp == "fp32"
    for slow in ("fp16", "bf16", "fp8_e4m3"):
        assert slow not in caps.formats
    assert caps.filter(("fp8_e4m3", "int4", "fp16", ORT_INT8)) == ("int4", ORT_INT8)
    assert OrtBackend("cpu", formats=(ORT_INT8,)).capabilities().formats == (ORT_INT8,)
    with pytest.raises(AmpqError, match="does not run 'fp16' fast"):
        OrtBackend("cpu", formats=("fp16",))


def test_where_the_u8s8_gemm_saturates_the_cpu_ep_offers_the_exact_int8s(monkeypatch):
    """On a CPU whose u8s8 GEMM saturates (x86 without VNNI) ``int8`` and ``int8_dyn`` give way
    to ``int8_pairs`` / ``int8_dyn_pairs``, the 7-bit ``int8_w7`` / ``int8_dyn_w7`` stay
    available on request, and a restriction to ``int8`` is refused saying why; elsewhere
    nothing changes."""
    import ampq_pass.backends.ort as module

    monkeypatch.setattr(module, "u8s8_saturates", lambda: True)
    b = OrtBackend("cpu")
    assert b.capabilities().formats == ("int8_pairs", "int8_dyn_pairs", "int4", "int4_b128")
    assert b.capabilities().rules is not None and b.key()["u8s8_saturates"] is True
    assert OrtBackend("cpu", formats=("int8_w7",)).capabilities().formats == ("int8_w7",)
    assert OrtBackend("cpu", formats=("int8_dyn_w7", "int8_pairs")).capabilities().formats == \
        ("int8_pairs", "int8_dyn_w7")
    kept = OrtBackend("cpu", formats=("int8",), saturating_int8=True)  # to time int8 as it runs there
    assert kept.capabilities().formats == ("int8",)
    with pytest.raises(AmpqError, match="saturates int16 pair sums.*'int8_pairs' \\(8-bit weights, neighbours "
                                        "bounded\\) and 'int8_w7' \\(7-bit weights\\) do"):
        OrtBackend("cpu", formats=("int8",))
    monkeypatch.setattr(module, "u8s8_saturates", lambda: False)
    assert OrtBackend("cpu").capabilities().formats == ("int8", "int8_dyn", "int4", "int4_b128")
    for name in ("int8_w7", "int8_pairs"):
        with pytest.raises(AmpqError, match=f"does not run '{name}' fast; it offers"):
            OrtBackend("cpu", formats=(name,))


def test_provider_errors():
    with pytest.raises(AmpqError, match="unknown ONNX Runtime provider"):
        OrtBackend("tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "cuda" not in available_providers()
        with pytest.raises(AmpqError, match="not installed"):
            OrtBackend("cuda")
    assert "cpu" in available_providers()


def test_key_records_what_timing_depends_on():
    k = OrtBackend("cpu", threads=2, protocol=FAST).key()
    assert k["onnxruntime"] == ort.__version__ and k["threads"] == 2 and k["provider"] == "CPUExecutionProvider"
    assert k["device"] and k["protocol"]["max_repeats"] == 6
    assert OrtBackend("cpu", threads=1).key() != OrtBackend("cpu", threads=2).key()


def test_ort_time_interleaves_all_models(mlp_model):
    feeds = models.feeds_for(mlp_model, n=4)
    b = OrtBackend("cpu", protocol=FAST)
    out = b.time({"one": mlp_model, "two": mlp_model}, [feeds, models.feeds_for(mlp_model, n=4, seed=2)])
    assert set(out) == {"one", "two"}
    for t in out.values():
        assert 3 <= len(t.samples) <= 6 and t.ci_low <= t.median <= t.ci_high and t.median > 0
    assert len(out["one"].samples) == len(out["two"].samples)  # same rounds: pairable
    with pytest.raises(AmpqError, match="no timing inputs"):
        b.time({"one": mlp_model}, [])
    with pytest.raises(AmpqError, match="lack model input 'x'"):
        b.time({"one": mlp_model}, [{"y": np.zeros((1, 16), np.float32)}])


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="onnxruntime-gpu with a GPU only (run on a lent GPU by benchmarks/gpu_check.sh)")
def test_cuda_backend_times_with_tensors_in_gpu_memory(mlp_model):
    from ampq_pass.backends.ort import io_device

    b = OrtBackend("cuda", protocol=FAST)
    session = b.session(mlp_model)
    assert session.get_providers()[0] == "CUDAExecutionProvider" and io_device(session) == ("cuda", 0)
    out = b.time({"one": mlp_model, "two": mlp_model}, [models.feeds_for(mlp_model, n=4)])
    assert set(out) == {"one", "two"} and all(t.median > 0 for t in out.values())
    assert b.key()["provider"] == "CUDAExecutionProvider" and b.capabilities().hp == "fp32"


def test_cpu_sessions_bind_host_memory(mlp_model):
    from ampq_pass.backends.ort import io_device

    assert io_device(OrtBackend("cpu").session(mlp_model)) == ("cpu", 0)


def test_time_interleaved_fixed_rounds(mlp_model):
    feeds = models.feeds_for(mlp_model, n=2)
    out = time_interleaved({"a": make_session(mlp_model)}, feeds, repeats=5, warmup=1)
    assert len(out["a"].samples) == 5 and out["a"].p10 <= out["a"].median <= out["a"].p90


def test_get_backend_specs():
    assert get_backend().name == "ort:cpu"
    assert isinstance(get_backend("mac"), MacModel)
    assert isinstance(get_backend("memory"), MemoryModel) and get_backend("memory:activations").activations
    with pytest.raises(AmpqError, match="unknown backend"):
        get_backend("tflite")
    try:
        import habana_frameworks.torch  # noqa: F401
    except ImportError:
        with pytest.raises(AmpqError, match="habana_frameworks"):
            get_backend("gaudi")  # not installed on these machines
    assert Capabilities(("int8",), "fp32", "x").filter(["fp16"]) == ()


def test_retry_keeps_the_tightest_attempt():
    clock, calls = FakeClock(), {"n": 0}
    noisy_then_quiet = iter([1.0, 5.0, 1.0, 5.0] + [2.0] * 100)  # a loaded first attempt

    def run(i):
        calls["n"] += 1
        clock.now += next(noisy_then_quiet)

    p = Protocol(warmup=0, min_repeats=3, max_repeats=4, rel_ci=0.05, max_seconds=None, retries=2)
    out = interleave({"x": run}, p, clock=clock)
    assert out["x"].median == 2.0 and out["x"].half_width == 0.0
    assert calls["n"] == 4 + 3  # first attempt to the cap, second stops once tight


def test_the_cpu_ep_computes_qdq_as_the_sensitivity_models_it_and_another_provider_is_asked(monkeypatch):
    from ampq_pass.backends import ort as ort_backend

    model = models.mlp()
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    assert not OrtBackend().own_numerics and OrtBackend().outputs(model, [feeds]) is None
    # a provider of its own (TensorRT builds its own engines): the CPU EP under another short
    # name stands in for it, so that the outputs path runs here
    monkeypatch.setitem(ort_backend.PROVIDERS, "other", ("CPUExecutionProvider", ("int8",), "fp32"))
    assert OrtBackend("other").own_numerics
    got = OrtBackend("other").outputs(model, [feeds, feeds])
    want = make_session(model).run(None, feeds)[0]
    assert len(got) == 2 and got[0]["y"].dtype == np.float64
    np.testing.assert_allclose(got[1]["y"], want, rtol=1e-6)


def test_the_cpu_ep_writes_its_models_after_onnx_runtimes_basic_optimisation(block_model):
    """What the pass writes for ort:cpu: the rewritten graph after ONNX Runtime's basic-level
    optimisation - ONNX operators only, fewer nodes, the same outputs, and a fixed point (its
    own optimisation finds nothing more to do); the cost models write the graph as it is."""
    import onnx

    from ampq_pass.core.graph import ensure_node_names
    from ampq_pass.stages.calibrate import compute_ranges
    from ampq_pass.core.samples import Samples
    from ampq_pass.stages.layers import find_layers
    from ampq_pass.stages.plan import Plan
    from ampq_pass.stages.rewrite import rewrite

    model = ensure_node_names(block_model)
    layers = find_layers(model)
    feeds = models.feeds_for(model, n=4)
    ranges = compute_ranges(model, layers, Samples(feeds))
    plan = Plan({l.name: ("int4" if "int4" in l.formats else "int8") for l in layers})
    written = rewrite(model, layers, plan, ranges)
    backend = OrtBackend()
    deployed = backend.deployed(written)
    onnx.checker.check_model(deployed)
    assert {n.domain for n in deployed.graph.node} <= {"", "ai.onnx"}
    assert len(deployed.graph.node) < len(written.graph.node)
    assert [i.name for i in deployed.graph.input] == [i.name for i in written.graph.input]
    want = make_session(written).run(None, feeds)
    got = make_session(deployed).run(None, feeds)
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(backend.deployed(deployed).graph.node) == len(deployed.graph.node)
    assert MacModel().deployed(written) is written
