"""Losses: definitions, exact expectations, and the refusal of zero-gradient losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from ampq_pass.core.samples import Samples
from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.sensitivity.executor import Executor
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.sensitivity.losses import Loss, ProjectionLoss, PseudoLabelLoss, TaskLoss, load_labels, make_loss
from ampq_pass.stages.verify import measured_loss_mse, run_batches
from ampq_pass.stages.sensitivity import sensitivity
from ampq_pass.stages.calibrate import compute_ranges

torch.set_num_threads(1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_projection_is_linear_with_fresh_r_per_sample():
    f = {"y": torch.randn(64, 3, 5, dtype=torch.float64)}
    loss = ProjectionLoss()
    a = loss.per_sample(f, f, 0, gen(1))
    b = loss.per_sample({"y": 2 * f["y"]}, f, 0, gen(1))
    assert a.shape == (64,)
    assert torch.allclose(b, 2 * a)
    # A different r for each sample: identical samples get different losses.
    same = {"y": f["y"][:1].expand(64, 3, 5)}
    assert loss.per_sample(same, same, 0, gen(2)).std() > 0


def test_projection_expectation_is_output_mse():
    """E_r[(<r, f_q> - <r, f_hp>)^2] = ||f_q - f_hp||^2: Monte Carlo over r vs the exact value."""
    hp = {"a": torch.randn(4, 6, dtype=torch.float64), "b": torch.randn(4, 2, 3, dtype=torch.float64)}
    q = {k: v + 0.1 * torch.randn_like(v) for k, v in hp.items()}
    loss = ProjectionLoss()
    exact = loss.squared_change(q, hp, 0, gen())
    manual = sum(((q[k] - hp[k]) ** 2).reshape(4, -1).sum(1) for k in hp)
    assert torch.allclose(exact, manual)
    draws = torch.stack([(loss.per_sample(q, hp, 0, gen(s)) - loss.per_sample(hp, hp, 0, gen(s))) ** 2
                         for s in range(4000)])
    assert torch.allclose(draws.mean(0), exact, rtol=0.1)


def test_pseudo_label_cross_entropy_against_hp_argmax():
    logits = torch.randn(5, 7, 11, dtype=torch.float64, requires_grad=True)
    ref = {"logits": logits.detach()}
    value = PseudoLabelLoss().per_sample({"logits": logits}, ref, 0, gen())
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), ref["logits"].argmax(-1).reshape(-1),
                                                 reduction="none").reshape(5, 7).mean(1)
    assert torch.allclose(value, expected)
    (grad,) = torch.autograd.grad(value.sum(), [logits])
    assert grad.abs().max() > 1e-3  # non-zero at the hp point: softmax is not one-hot


def test_task_losses_use_labels_of_the_batch_and_ignore_index():
    labels = np.array([[1, 2], [0, -100], [3, 3]])
    loss = make_loss("cross_entropy", labels=labels)
    logits = torch.randn(2, 2, 4, dtype=torch.float64)
    got = loss.per_sample({"logits": logits}, {}, 1, gen())  # samples 1 and 2 of the set
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(got[0], ce(logits[0, :1], torch.tensor([0])))  # -100 ignored
    assert torch.allclose(got[1], ce(logits[1], torch.tensor([3, 3])))
    mse = make_loss("mse:y", labels=np.zeros((2, 3)))
    y = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    assert torch.allclose(mse.per_sample({"y": y, "z": y}, {}, 0, gen()), (y ** 2).mean(1))
    with pytest.raises(AmpqError, match="3 labels for at least 4 samples"):
        loss.per_sample({"logits": torch.randn(2, 2, 4)}, {}, 2, gen())


@pytest.mark.parametrize("spec, labels", [("kl", None), ("KL_div", None), ("mse", None), ("self_mse", None),
                                          ("kl", np.zeros(3))])
def test_self_referenced_losses_are_refused_with_the_reason(spec, labels):
    with pytest.raises(AmpqError) as err:
        make_loss(spec, labels=labels)
    message = str(err.value)
    assert "own high-precision output" in message and "gradient is exactly zero" in message
    assert "projection" in message


def test_why_self_mse_is_refused():
    """The reason given is true: MSE to the model's own output has a zero gradient at hp."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref = x.detach()
    (grad,) = torch.autograd.grad(((x - ref) ** 2).sum(), [x])
    assert float(grad.abs().max()) == 0.0


def test_loss_spec_errors():
    with pytest.raises(AmpqError, match="unknown loss 'hinge'"):
        make_loss("hinge")
    with pytest.raises(AmpqError, match="needs labels"):
        make_loss("cross_entropy")
    with pytest.raises(AmpqError, match="name one"):
        PseudoLabelLoss().per_sample({"a": torch.zeros(1, 2), "b": torch.zeros(1, 2)}, {}, 0, gen())
    with pytest.raises(AmpqError, match="no output 'nope'"):
        make_loss("projection:nope").per_sample({"a": torch.zeros(1, 2)}, {}, 0, gen())
    assert isinstance(make_loss("ce:logits", labels=np.zeros(2)), TaskLoss)
    assert isinstance(make_loss("pseudo"), PseudoLabelLoss)
    assert make_loss("projection", probes=3).probes == 3


def test_load_labels(tmp_path):
    np.save(tmp_path / "l.npy", np.arange(4))
    np.savez(tmp_path / "l.npz", labels=np.arange(3))
    np.savez(tmp_path / "two.npz", a=np.arange(3), b=np.arange(3))
    assert load_labels(str(tmp_path / "l.npy")).tolist() == [0, 1, 2, 3]
    assert load_labels(str(tmp_path / "l.npz")).tolist() == [0, 1, 2]
    with pytest.raises(AmpqError, match="exactly one array"):
        load_labels(str(tmp_path / "two.npz"))
    with pytest.raises(AmpqError, match="no such labels file"):
        load_labels(str(tmp_path / "missing.npy"))


class SelfMSE(Loss):
    """What make_loss refuses by name, given as an object: sensitivity must still catch it."""

    name = "self_mse"

    def per_sample(self, outputs, reference, start, generator):
        d = outputs["logits"] - reference["logits"]
        return (d * d).reshape(d.shape[0], -1).sum(1)


def test_zero_gradient_loss_object_is_caught_at_run_time(cnn_model):
    samples = Samples(models.feeds_for(cnn_model, n=4))
    layers = find_layers(cnn_model)
    ranges = compute_ranges(cnn_model, layers, samples)
    with pytest.raises(AmpqError, match="gradient of loss 'self_mse' is zero"):
        sensitivity(cnn_model, layers, ranges, samples, loss=SelfMSE(), progress=False)


def test_measured_task_loss_matches_manual(cnn_model):
    samples = Samples(models.feeds_for(cnn_model, n=6, seed=4))
    labels = np.array([0, 3, 9, 1, 1, 2])
    other = models.cnn(seed=1)  # stands in for a quantized model: same interface, other outputs
    got = measured_loss_mse(cnn_model, other, samples, "cross_entropy", labels=labels, batch_size=4)
    hp, q = (np.concatenate([b["logits"] for b in run_batches(m, samples)]) for m in (cnn_model, other))
    ce = lambda z: torch.nn.functional.cross_entropy(torch.from_numpy(z), torch.from_numpy(labels), reduction="none")  # noqa: E731
    assert got == pytest.approx(float(((ce(q) - ce(hp)) ** 2).mean()), rel=1e-9)
    with torch.no_grad():
        assert torch.allclose(Executor(cnn_model, dtype=torch.float64).run(samples.inputs)["logits"],
                              torch.from_numpy(hp), rtol=1e-4, atol=1e-5)


def test_logit_tensors_find_final_softmax_sigmoid_and_written_out_softmax():
    """Outputs written by Softmax/LogSoftmax/Sigmoid, or by a softmax spelled out as
    Div(Exp(Sub(z, max)), ReduceSum(Exp)) (tf2onnx/jax2tf), are read on their input z."""
    from onnx import TensorProto, helper

    from ampq_pass.stages.sensitivity.losses import logit_tensors, loss_tensors

    nodes = [helper.make_node("Softmax", ["z"], ["p"], axis=-1), helper.make_node("Sigmoid", ["z"], ["s"]),
             helper.make_node("ReduceMax", ["z"], ["m"], keepdims=1), helper.make_node("Sub", ["z", "m"], ["c"]),
             helper.make_node("Exp", ["c"], ["e"]), helper.make_node("ReduceSum", ["e"], ["t"], keepdims=1),
             helper.make_node("Div", ["e", "t"], ["q"]), helper.make_node("Relu", ["z"], ["r"])]
    v = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [v("z")], [v("p"), v("s"), v("q"), v("r")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert logit_tensors(model) == {}  # z is a graph input: nothing to read before it
    model.graph.node.insert(0, helper.make_node("Identity", ["x"], ["z"]))
    model.graph.input[0].name = "x"
    assert logit_tensors(model) == {"p": "z", "s": "z", "q": "z"}
    assert loss_tensors(model, make_loss("projection")) == {"p": "z", "s": "z", "q": "z"}
    assert loss_tensors(model, make_loss("projection_raw")) == {}
    assert loss_tensors(model, make_loss("pseudo_label:p")) == {"p": "z"}


def test_constant_outputs_found_while_streaming():
    from ampq_pass.stages.sensitivity.losses import ConstantOutputs

    found = ConstantOutputs()
    mask = torch.ones(3, 4)
    found.update({"mask": mask, "y": torch.randn(3, 4)}, ["mask", "y"])
    found.update({"mask": mask[:2] + 1e-9, "y": torch.randn(2, 4)}, ["mask", "y"])  # last-bit noise is no variance
    assert set(found.constant()) == {"mask"} and found.samples == 5
    assert "'mask' is constant over the 5 calibration samples" in ConstantOutputs.warning(found.to_json(), "projection")
    found.update({"mask": torch.ones(1, 5), "y": torch.randn(1, 4)}, ["mask", "y"])  # another shape varies
    assert found.constant() == {} and found.to_json() is None
    one = ConstantOutputs()
    one.update({"mask": mask[:1]}, ["mask"])
    assert one.constant() == {}  # one sample says nothing about variance
