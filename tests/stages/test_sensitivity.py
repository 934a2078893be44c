"""Sensitivity: per-sample terms against finite differences, invariants, and the check that
the metric predicts the loss MSE of rewritten models measured in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import models
from ampq_pass.core.samples import Samples
from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.sensitivity.executor import Executor
from ampq_pass.core.formats import FORMATS, HP, Int8
from ampq_pass.core.graph import ensure_node_names, initializers
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.sensitivity.losses import make_loss
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.sensitivity import Sensitivity, predicted_mse, sensitivity
from ampq_pass.stages.verify import measured_loss_mse, run_batches
from ampq_pass.stages.calibrate import compute_ranges
from hardware import needs_exact_ort_int8

torch.set_num_threads(1)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def setup(model: onnx.ModelProto, n: int, seed: int = 3):
    model = ensure_node_names(model)
    layers = find_layers(model)
    samples = Samples(models.feeds_for(model, n=n, seed=seed))
    return model, layers, samples


# ----------------------------------------------------------------------------- exactness of the terms

def _finite_difference_terms(model, layer, fmt_name, ranges, feeds, loss, eps=1e-4) -> np.ndarray:
    """Per-sample first-order loss change for one layer/format, by central differences.

    Independent of sensitivity.py: the layer's weight, bias, input (and, for int8 Conv, output)
    are replaced in the executor by x + t·(Q(x) - x), with Q the formats.py references (int4
    weights with the calibrated clip ratios) and the rewrite's int32 bias, and dL/dt at t=0 is
    taken numerically (float64).
    """
    fmt = FORMATS[fmt_name]
    ex = Executor(model, dtype=torch.float64)
    inits = initializers(model)
    node = next(n for n in model.graph.node if n.name == layer.name)
    w = onnx.numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
    # the weight as the rewrite stores it: with the calibrated clip ratios where the format searches them
    e_w = torch.from_numpy(fmt.fake_weight(w, layer.channel_axis, ranges.clip(layer.weight, fmt_name)) - w).double()
    e_b = None
    if isinstance(fmt, Int8) and len(node.input) > 2 and node.input[2] in inits and layer.op_type != "MatMul":
        b = onnx.numpy_helper.to_array(inits[node.input[2]])
        emitted = fmt.bias_nodes("b", b, fmt.bias_scale(w, node, *ranges[layer.activation]))
        q, scale = (onnx.numpy_helper.to_array(t) for t in emitted.initializers[:2])
        e_b = torch.from_numpy(q.astype(np.float64) * scale - b)

    def act_err(x, name):
        if not fmt.quantizes_activation:
            return torch.zeros_like(x)
        x32 = x.detach().float().numpy()
        return torch.from_numpy(fmt.fake_activation(x32, *ranges[name])).double() - x.detach()

    def per_sample(t):
        def inp(slot, x):
            if slot == 0:
                return x + t * act_err(x, layer.activation)
            if slot == 1:
                return x + t * e_w
            return x + t * e_b if e_b is not None else x

        def out(slot, y):
            if fmt.quantizes_output(layer.op_type):
                return y + t * act_err(y, layer.output)
            return y

        with torch.no_grad():
            outputs = ex.run(feeds, input_hooks={layer.name: inp}, output_hooks={layer.name: out})
            return loss.per_sample(outputs, reference, 0, torch.Generator())

    with torch.no_grad():
        reference = ex.run(feeds)
    return ((per_sample(eps) - per_sample(-eps)) / (2 * eps)).numpy()


@pytest.mark.parametrize("name", ["cnn", "block"])
def test_values_equal_finite_difference_expectations(name, cnn_model, block_model):
    """s[l][p] = mean_x (dL/dt)^2 for every layer and format (Conv, Gemm, MatMul paths; int8 bias and
    output quantization of Conv included), with batches of 5 against whole-set differences."""
    model, layers, samples = setup({"cnn": cnn_model, "block": block_model}[name], n=12)
    ranges = compute_ranges(model, layers, samples)
    loss = make_loss("pseudo_label")  # deterministic, so both sides see the same loss
    sens = sensitivity(model, layers, ranges, samples, loss=loss, batch_size=5, progress=False,
                       dtype=torch.float64)
    assert sens.samples == 12
    for layer in layers:
        for fmt in layer.formats:
            if FORMATS[fmt].needs_range:
                terms = _finite_difference_terms(model, layer, fmt, ranges, samples.inputs, loss)
            else:  # dynamic scales depend on the batch: difference batch by batch, as the pass runs
                terms = np.concatenate([_finite_difference_terms(model, layer, fmt, ranges, b, loss)
                                        for b in samples.batches(5)])
            expected = float(np.mean(terms ** 2))
            assert sens.values[layer.name][fmt] == pytest.approx(expected, rel=2e-4, abs=1e-14), (layer.name, fmt)


def test_dynamic_scales_span_the_run_batch_not_the_calibration_batch(block_model):
    """With ``run_batch``, int8_dyn's scale is taken over ``run_batch`` samples at a time, as the
    model deployed at that batch computes it: the values equal finite differences run two samples
    at a time whatever the calibration batch, and differ from one scale over all 12 samples."""
    model, layers, samples = setup(block_model, n=12)
    ranges = compute_ranges(model, layers, samples)
    loss = make_loss("pseudo_label")
    kw = dict(loss=loss, formats=["int8_dyn"], progress=False, dtype=torch.float64)
    by_batch = {bs: sensitivity(model, layers, ranges, samples, batch_size=bs, run_batch=2, **kw) for bs in (4, 12)}
    whole = sensitivity(model, layers, ranges, samples, batch_size=12, **kw)
    assert by_batch[4].extra["run_batch"] == 2 and "run_batch" not in whole.extra
    dynamic = [l for l in layers if "int8_dyn" in l.formats]
    assert dynamic
    for layer in dynamic:
        pairs = np.concatenate([_finite_difference_terms(model, layer, "int8_dyn", ranges, b, loss)
                                for b in samples.batches(2)])
        expected = float(np.mean(pairs ** 2))
        for bs, sens in by_batch.items():
            assert sens.values[layer.name]["int8_dyn"] == pytest.approx(expected, rel=2e-4, abs=1e-14), (layer.name, bs)
        assert whole.values[layer.name]["int8_dyn"] != pytest.approx(expected, rel=1e-2), layer.name
    with pytest.raises(AmpqError, match="run_batch must be a positive integer"):
        sensitivity(model, layers, ranges, samples, run_batch=0, **kw)


def test_weight_activation_split_invariants(block_model):
    model, layers, samples = setup(block_model, n=16)
    ranges = compute_ranges(model, layers, samples)
    sens = sensitivity(model, layers, ranges, samples, progress=False)
    for layer in layers:
        per, w, a = sens.values[layer.name], sens.weight[layer.name], sens.activation[layer.name]
        assert set(per) == set(layer.formats)
        assert a["int4"] == 0.0 and per["int4"] == pytest.approx(w["int4"])  # weight-only format
        for f in per:
            assert 0 < per[f] <= 2 * (w[f] + a[f]) * (1 + 1e-9)  # (x+y)^2 <= 2x^2 + 2y^2, sample by sample
            assert w[f] > 0 and (a[f] > 0 or f == "int4")
        assert per["fp16"] < per["bf16"] < per["fp8_e4m3"]  # 11, 8 and 4 significant bits


def test_batch_size_does_not_change_values(cnn_model):
    model, layers, samples = setup(cnn_model, n=10)
    ranges = compute_ranges(model, layers, samples)
    a = sensitivity(model, layers, ranges, samples, loss="pseudo_label", batch_size=3, progress=False)
    b = sensitivity(model, layers, ranges, samples, loss="pseudo_label", batch_size=10, progress=False)
    for layer in layers:
        for f, v in a.values[layer.name].items():
            assert v == pytest.approx(b.values[layer.name][f], rel=1e-4)
    assert a.loss_mean == pytest.approx(b.loss_mean, rel=1e-5)


def test_formats_filter_and_json_roundtrip(mlp_model):
    model, layers, samples = setup(mlp_model, n=8)
    ranges = compute_ranges(model, layers, samples)
    sens = sensitivity(model, layers, ranges, samples, formats=["int4", "int8"], progress=False, probes=2)
    assert sens.values["fc1"].keys() == {"int4", "int8"} and sens.values["fc2"].keys() == {"int8"}  # Gemm: no int4
    again = Sensitivity.from_json(json.loads(json.dumps(sens.to_json())))
    assert again == sens and again.probes == 2 and again.loss == "projection"
    assert predicted_mse(sens, {"fc1": "int8", "fc2": HP, "fc3": "int4"}) == pytest.approx(
        sens.values["fc1"]["int8"] + sens.values["fc3"]["int4"])
    with pytest.raises(AmpqError, match="no sensitivity for format 'fp8_e4m3'"):
        predicted_mse(sens, {"fc1": "fp8_e4m3"})
    with pytest.raises(AmpqError, match="'nope'"):
        predicted_mse(sens, {"nope": "int8"})
    with pytest.raises(AmpqError, match="unknown format"):
        sensitivity(model, layers, ranges, samples, formats=["int7"], progress=False)


# ----------------------------------------------------------------------------- the metric predicts

def random_plans(layers, count: int, seed: int) -> list[dict[str, str]]:
    """Mixed plans: a random share of the layers quantized, each to a random candidate format."""
    rng = np.random.default_rng(seed)
    plans = []
    while len(plans) < count:
        share = rng.uniform(0.15, 1.0)
        plan = {l.name: (str(rng.choice(l.formats)) if rng.random() < share else HP) for l in layers}
        if any(f != HP for f in plan.values()):
            plans.append(plan)
    return plans


def predicted_vs_measured(model, layers, calib, held, plans, *, optimize=True, probes=4):
    ranges = compute_ranges(model, layers, calib)
    sens = sensitivity(model, layers, ranges, calib, progress=False, probes=probes)
    hp = run_batches(model, held, optimize=optimize)
    predicted = np.array([predicted_mse(sens, p) for p in plans])
    measured = np.array([measured_loss_mse(model, rewrite(model, layers, Plan(p), ranges), held, hp_outputs=hp,
                                           optimize=optimize) for p in plans])
    return predicted, measured, sens, ranges, hp


@needs_exact_ort_int8
def test_metric_predicts_measured_loss_mse_transformer_block(block_model):
    """24 random mixed plans on a BERT-style block, rewritten and run in ONNX Runtime (with its
    graph optimisations, i.e. the fused integer kernels) on held-out samples."""
    model, layers, samples = setup(block_model, n=128)
    calib, held = samples.split(64)
    plans = random_plans(layers, 24, seed=0)
    predicted, measured, *_ = predicted_vs_measured(model, layers, calib, held, plans)
    ratio = measured / predicted
    assert spearman(predicted, measured) >= 0.9
    assert 0.6 <= float(np.median(ratio)) <= 1.6
    assert predicted.max() / predicted.min() > 20  # the plans span a range worth ranking


def test_metric_predicts_the_loss_of_what_the_cpu_backend_offers_on_this_cpu(block_model):
    """What a user of ``ort:cpu`` gets on any CPU - ``int8`` / ``int8_dyn``, or ``int8_w7`` /
    ``int8_dyn_w7`` where the u8s8 GEMM saturates (tests/hardware.py), and int4 - predicted as
    ONNX Runtime measures it: 16 random mixed plans of those formats only."""
    import dataclasses

    from ampq_pass.backends.ort import OrtBackend

    offered = OrtBackend().capabilities().formats
    model = ensure_node_names(block_model)
    layers = [dataclasses.replace(l, formats=tuple(f for f in l.formats if f in offered))
              for l in find_layers(model, offered=offered)]
    assert {f for l in layers for f in l.formats} == set(offered) - {"int4_b128"}  # K = 64 here: one block
    samples = Samples(models.feeds_for(model, n=128, seed=3))
    calib, held = samples.split(64)
    plans = random_plans(layers, 16, seed=2)
    predicted, measured, *_ = predicted_vs_measured(model, layers, calib, held, plans)
    assert spearman(predicted, measured) >= 0.85
    assert 0.6 <= float(np.median(measured / predicted)) <= 1.6


def test_metric_predicts_measured_loss_mse_cnn():
    """The same on a CNN with BatchNorm/pooling/Resize/ConvTranspose, int8 Convs with quantized
    outputs. Measured with ONNX Runtime's graph optimisations off: with them on, ONNX Runtime
    drops a Relu that feeds an fp8 QuantizeLinear (seen with ONNX Runtime 1.32 on models.cnn),
    which changes what the rewritten graph computes (see benchmarks/results/sensitivity.md)."""
    model, layers, samples = setup(models.feature_cnn(), n=128)
    calib, held = samples.split(64)
    plans = random_plans(layers, 24, seed=1)
    predicted, measured, *_ = predicted_vs_measured(model, layers, calib, held, plans, optimize=False)
    assert spearman(predicted, measured) >= 0.85
    assert 0.5 <= float(np.median(measured / predicted)) <= 2.0


@needs_exact_ort_int8
def test_additivity_of_measured_loss_mse(block_model):
    """Measured MSE of a two-layer plan vs the sum of its one-layer plans (what M assumes)."""
    model, layers, samples = setup(block_model, n=96)
    calib, held = samples.split(48)
    pairs = [("/v/MatMul", "int8", "/ff1/MatMul", "int8"), ("/o/MatMul", "fp8_e4m3", "/ff2/MatMul", "int4")]
    plans = []
    for a, fa, b, fb in pairs:
        plans += [{a: fa}, {b: fb}, {a: fa, b: fb}]
    predicted, measured, *_ = predicted_vs_measured(model, layers, calib, held, plans)
    for i in range(0, len(plans), 3):
        single = measured[i] + measured[i + 1]
        assert 0.7 <= measured[i + 2] / single <= 1.4, (plans[i + 2], measured[i + 2], single)
        assert predicted[i + 2] == pytest.approx(predicted[i] + predicted[i + 1])
        assert 0.5 <= measured[i + 2] / predicted[i + 2] <= 2.0


@needs_exact_ort_int8
def test_metric_fails_when_errors_are_wrong(block_model, monkeypatch):
    """The prediction check can fail: with activation errors ignored the ratio leaves its band."""
    import ampq_pass.stages.sensitivity.taylor as module

    monkeypatch.setattr(module, "_activation_error", lambda fmt, x, *rest: torch.zeros_like(x))
    model, layers, samples = setup(block_model, n=96)
    calib, held = samples.split(48)
    plans = [{l.name: "int8" for l in layers}, {"/ff1/MatMul": "int8"}, {"/v/MatMul": "fp8_e4m3"}]
    predicted, measured, *_ = predicted_vs_measured(model, layers, calib, held, plans)
    assert not all(0.5 <= r <= 2.0 for r in measured / predicted)


# ----------------------------------------------------------------------------- CLI

def test_cli_sensitivity_table_and_json(tmp_path, block_model, capsys):
    from ampq_pass.cli import main

    model_path = tmp_path / "block.onnx"
    onnx.save(block_model, str(model_path))
    np.savez(tmp_path / "calib.npz", **models.feeds_for(block_model, n=12))
    out = tmp_path / "s.json"
    code = main(["sensitivity", str(model_path), "--calib", str(tmp_path / "calib.npz"), "--formats", "int8,int4",
                 "--json", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split() == ["node", "op", "int8", "int4"]
    data = json.loads(out.read_text())
    assert set(data["layers"]) == {l.name for l in find_layers(block_model)}
    assert all(set(v) == {"int8", "int4"} for v in data["layers"].values())
    worst = [max(data["layers"][line.split()[0]].values()) for line in lines[2:2 + len(data["layers"])]]
    assert worst == sorted(worst, reverse=True)
    assert data["samples"] == 12 and data["loss"] == "projection"
    assert main(["sensitivity", str(model_path), "--calib", str(tmp_path / "calib.npz"), "--loss", "kl"]) == 2
    assert "gradient is exactly zero" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bounded memory

class _LiveBytes:
    """Peak bytes of live CPU tensors written by torch ops (a dispatch mode; tensors made from
    numpy arrays are not counted). Deterministic: counts allocations, not time or RSS."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        import weakref

        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        storage = t.untyped_storage()
                        ptr, size = storage.data_ptr(), storage.nbytes()
                        if size and ptr not in owner.ptrs:
                            owner.ptrs.add(ptr)
                            owner.live += size
                            owner.peak = max(owner.peak, owner.live)
                            weakref.finalize(t, owner.free, ptr, size)
                return out

        self.mode, self.live, self.peak, self.ptrs = Mode(), 0, 0, set()

    def free(self, ptr, size):
        self.ptrs.discard(ptr)
        self.live -= size

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_working_set_does_not_grow_with_the_samples_of_a_batch():
    """With a memory budget, a batch of 32 samples is run in sub-batches: the peak of live
    tensors is that of a 4-sample batch (it grows ~8x without the budget)."""
    model, layers, _ = setup(models.feature_cnn(), n=4)
    peaks, subs = {}, {}
    for n, budget in [(4, 200_000), (32, 200_000), (4, 1 << 30), (32, 1 << 30)]:
        samples = Samples(models.feeds_for(model, n=n, seed=1))
        ranges = compute_ranges(model, layers, samples)
        with _LiveBytes() as live:
            sens = sensitivity(model, layers, ranges, samples, batch_size=n, progress=False, memory_budget=budget)
        peaks[n, budget], subs[n, budget] = live.peak, list(sens.extra["sub_batch"].values())
    assert subs[4, 200_000] == subs[32, 200_000] == [1] and subs[32, 1 << 30] == [32]
    assert peaks[32, 200_000] <= 1.2 * peaks[4, 200_000]
    assert peaks[32, 1 << 30] > 4 * peaks[32, 200_000]  # the check can fail: without sub-batches it grows


@pytest.mark.parametrize("loss", ["pseudo_label", "projection"])
def test_sub_batches_do_not_change_values(cnn_model, loss):
    """One sample per forward/backward (a tiny budget) gives the values of whole batches:
    the projection loss draws r per sample index, so batching does not change it either."""
    model, layers, samples = setup(cnn_model, n=10)
    ranges = compute_ranges(model, layers, samples)
    run = dict(loss=loss, batch_size=5, progress=False, probes=2, dtype=torch.float64)  # exact sums
    whole = sensitivity(model, layers, ranges, samples, **run)
    tiny = sensitivity(model, layers, ranges, samples, memory_budget=1, **run)
    assert list(tiny.extra["sub_batch"].values()) == [1] and list(whole.extra["sub_batch"].values()) == [5]
    for layer in layers:
        for f, v in whole.values[layer.name].items():
            assert tiny.values[layer.name][f] == pytest.approx(v, rel=1e-9), (layer.name, f)
    assert tiny.loss_sq_mean == pytest.approx(whole.loss_sq_mean, rel=1e-6)


def test_weight_errors_beyond_the_budget_are_recomputed_with_the_same_values(mlp_model):
    import ampq_pass.stages.sensitivity.taylor as module

    model, layers, samples = setup(mlp_model, n=8)
    ranges = compute_ranges(model, layers, samples)
    kept = module._WeightErrors(model, ranges, torch.float32, 1 << 30)
    none = module._WeightErrors(model, ranges, torch.float32, 0)
    items = module._prepare(model, layers, ranges, None, torch.float32)
    for item in items:
        a, b = kept.get(item), none.get(item)
        assert all(torch.equal(a[0][f], b[0][f]) for f in a[0])
    assert len(kept.kept) == len(items) and not none.kept and none.recomputed == len(items)


def test_formats_that_quantize_weights_alike_share_one_error_tensor(mlp_model):
    import ampq_pass.stages.sensitivity.taylor as module

    model, layers, samples = setup(mlp_model, n=8)
    ranges = compute_ranges(model, layers, samples)
    errors = module._WeightErrors(model, ranges, torch.float32, 1 << 30)
    item = next(i for i in module._prepare(model, layers, ranges, None, torch.float32)
                if {"int8", "int8_dyn", "int4"} <= set(i.formats))
    w_err, _ = errors.get(item)
    assert w_err["int8"] is w_err["int8_dyn"] and w_err["int4"] is not w_err["int8"]
    one = w_err["int8"].numel() * 4
    assert errors.kept_bytes == one * len({id(t) for t in w_err.values()})


# ----------------------------------------------------------------------------- saturated outputs

def saturated_classifier(seed: int = 0, classes: int = 10, gain: float = 400.0) -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm (logits, scaled up) -> Softmax: probabilities at 0/1 for most samples."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32) / np.float32(np.sqrt(32)), "w1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array(gain * rng.standard_normal((64, classes)).astype(np.float32) / np.float32(8), "w2"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "saturated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@needs_exact_ort_int8
def test_saturated_softmax_loss_is_read_on_the_logits():
    """A classifier whose softmax saturates: on the probabilities the first-order estimate is
    orders of magnitude below the measured change (their gradient is ~0); the default
    projection loss reads the logits before the final Softmax, where the estimate holds."""
    from ampq_pass.stages.sensitivity.losses import logit_tensors

    model = ensure_node_names(saturated_classifier())
    layers = find_layers(model)
    rng = np.random.default_rng(1)
    samples = Samples({"x": rng.standard_normal((128, 32)).astype(np.float32)})
    calib, held = samples.split(64)
    with torch.no_grad():
        probs = Executor(model).run({"x": calib.inputs["x"]})["probs"]
    assert float((probs.max(dim=1).values > 0.999).float().mean()) > 0.5  # saturated
    assert logit_tensors(model) == {"probs": "logits"}
    ranges = compute_ranges(model, layers, calib)
    hp = run_batches(model, held)
    ratios = {}
    for loss in ["projection", "projection_raw"]:
        sens = sensitivity(model, layers, ranges, calib, loss=loss, progress=False, probes=4)
        assert ("loss_tensors" in sens.extra) == (loss == "projection")
        plans = [{l.name: "int8" for l in layers}, {"fc1": "int8"}, {"fc2": "int8"}]
        ratios[loss] = [measured_loss_mse(model, rewrite(model, layers, Plan(p), ranges), held, loss, hp_outputs=hp)
                        / predicted_mse(sens, p) for p in plans]
    assert all(0.5 <= r <= 2.0 for r in ratios["projection"]), ratios
    assert not all(0.5 <= r <= 2.0 for r in ratios["projection_raw"]), ratios


# ----------------------------------------------------------------------------- constant outputs

def test_an_output_constant_over_the_samples_is_named_in_one_warning():
    """A saturated gate (2.0 for every sample) beside an output that varies: the projection loss
    sums both, the gate has no predicted change; the pass says so in one line, and names the
    gate when the loss reads it alone (no gradient at all: a refusal)."""
    from ampq_pass.stages.sensitivity import constant_output_warning

    model = ensure_node_names(models.saturated_gate())
    layers = find_layers(model)
    samples = Samples({"x": np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32)})
    ranges = compute_ranges(model, layers, samples)
    both = sensitivity(model, layers, ranges, samples, progress=False, batch_size=5)
    assert set(both.extra["constant_outputs"]["outputs"]) == {"gate"}
    line = constant_output_warning(both)
    assert "\n" not in line and "'gate'" in line and "constant over the 24 calibration samples" in line
    assert "1 other output ('y')" in line and "--max-loss-rmse" in line
    with pytest.raises(AmpqError, match=r"zero .*\(output 'gate' never varied over the 24 samples"):
        sensitivity(model, layers, ranges, samples, loss="projection:gate", progress=False)  # no gradient at all
    varying = sensitivity(model, layers, ranges, samples, loss="projection:y", progress=False)
    assert constant_output_warning(varying) is None and "constant_outputs" not in varying.extra
    assert constant_output_warning(Sensitivity.from_json(json.loads(json.dumps(both.to_json())))) == line


# ----------------------------------------------------------------------------- sums over parts (issue 16)

class InProcessPool:
    """The :class:`RayPool` interface (``len``, ``map``) run here, jobs in reverse order: the
    result must not depend on which part finishes first."""

    def __init__(self, workers: int):
        self.workers, self.jobs = workers, 0

    def __len__(self) -> int:
        return self.workers

    def map(self, fn, jobs):
        for tag, args in reversed(list(jobs)):
            self.jobs += 1
            yield tag, fn(None, *args)


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_sums_over_parts_give_the_sensitivity_of_the_whole(block_model, workers):
    """The calibration set split over workers (8 workers for 5 batches: some get none) gives
    the values of one run, up to float summation order; int8_dyn, whose scale is taken over
    the sub-batch, included."""
    model, layers, samples = setup(block_model, n=18)
    ranges = compute_ranges(model, layers, samples)
    run = dict(batch_size=4, progress=False, probes=2)
    local = sensitivity(model, layers, ranges, samples, **run)
    pool = InProcessPool(workers)
    pooled = sensitivity(model, layers, ranges, samples, pool=pool, **run)
    assert pool.jobs == min(workers, 5)
    assert "int8_dyn" in local.formats()
    for layer in layers:
        for f, v in local.values[layer.name].items():
            assert pooled.values[layer.name][f] == pytest.approx(v, rel=1e-5, abs=1e-12), (layer.name, f)
            assert pooled.weight[layer.name][f] == pytest.approx(local.weight[layer.name][f], rel=1e-5, abs=1e-12)
    assert pooled.samples == local.samples == 18
    assert pooled.loss_sq_mean == pytest.approx(local.loss_sq_mean, rel=1e-6)
    assert pooled.extra == local.extra


def test_constant_outputs_over_parts():
    """An output is constant over the whole set only if each part saw the same constant."""
    from ampq_pass.stages.sensitivity.losses import ConstantOutputs

    def seen(*values):
        c = ConstantOutputs()
        c.update({"g": torch.tensor([[v] for v in values]), "y": torch.randn(len(values), 2)}, ["g", "y"])
        return c

    same = seen(2.0, 2.0)
    same.add(seen(2.0, 2.0, 2.0))
    assert set(same.constant()) == {"g"} and same.samples == 5
    other = seen(2.0, 2.0)
    other.add(seen(3.0, 3.0))  # constant within each part, not over both
    assert other.constant() == {} and other.samples == 4
