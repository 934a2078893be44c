"""Small models built in the tests: an MLP, a residual CNN, a transformer encoder block."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper


def mlp(seed: int = 0, sizes=(16, 32, 32, 8)) -> onnx.ModelProto:
    """x -> MatMul+Add -> Relu -> Gemm(transB) -> Relu -> MatMul, built with onnx.helper."""
    rng = np.random.default_rng(seed)
    a, b, c, d = sizes
    inits = [
        numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32) / np.float32(np.sqrt(a)), "w1"),
        numpy_helper.from_array(rng.standard_normal(b).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((c, b)).astype(np.float32) / np.float32(np.sqrt(b)), "w2"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "b2"),
        numpy_helper.from_array(rng.standard_normal((c, d)).astype(np.float32) / np.float32(np.sqrt(c)), "w3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        helper.make_node("Relu", ["h1b"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", a])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _export(module: torch.nn.Module, args: tuple, input_names, output_names, dynamic_axes, opset=17) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, buf, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


class ResBlock(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class SmallCNN(torch.nn.Module):
    def __init__(self, c=8, classes=10):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 3, padding=1)
        self.block1 = ResBlock(c)
        self.block2 = ResBlock(c)
        self.head = torch.nn.Linear(c, classes)

    def forward(self, x):
        h = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))


def cnn(seed: int = 0) -> onnx.ModelProto:
    torch.manual_seed(seed)
    return _export(SmallCNN(), (torch.randn(2, 3, 16, 16),), ["image"], ["logits"],
                   {"image": {0: "batch"}, "logits": {0: "batch"}})


class EncoderBlock(torch.nn.Module):
    """Post-LN BERT-style block with explicit q/k/v projections and an attention mask."""

    def __init__(self, d=32, heads=4, ff=64):
        super().__init__()
        self.h, self.d = heads, d
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.ff1, self.ff2 = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        split = lambda z: z.reshape(b, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5 + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))


def transformer_block(seed: int = 0, d: int = 32) -> onnx.ModelProto:
    torch.manual_seed(seed)
    return _export(EncoderBlock(d=d), (torch.randn(2, 8, d), torch.ones(2, 8, dtype=torch.int64)),
                   ["hidden", "mask"], ["out"],
                   {"hidden": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}})


def feeds_for(model: onnx.ModelProto, n: int = 16, seed: int = 1, seq: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        shape = [n] + [d if d else seq for d in dims[1:]]
        if tt.elem_type == TensorProto.INT64:
            arr = np.ones(shape, np.int64)
            arr[: n // 2, -2:] = 0  # some padding in the mask
            out[vi.name] = arr
        else:
            out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def llama_decoder(seed: int = 0, layers: int = 2, hidden: int = 64) -> onnx.ModelProto:
    """A Llama-style decoder from a transformers config (random init: structure, not quality)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    hf = LlamaForCausalLM(cfg).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, 128, (2, 8))
    return _export(Wrapper(hf), (ids, torch.ones(2, 8, dtype=torch.int64)), ["input_ids", "attention_mask"], ["logits"],
                   {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                    "logits": {0: "batch", 1: "seq"}})


class FeatureCNN(torch.nn.Module):
    """Conv/BatchNorm/pooling/Resize/Concat/ConvTranspose: the CNN ops a ResNet/UNet-style export emits."""

    def __init__(self, c=8, classes=10):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(3, stride=2, padding=1)
        self.branch_a = torch.nn.Conv2d(c, c, 1)
        self.branch_b = torch.nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.avg = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.bn = torch.nn.BatchNorm2d(2 * c)  # after Concat: the exporter cannot fold it into a Conv
        self.up = torch.nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.mix = torch.nn.Conv2d(2 * c, c, 3, padding=1, stride=2)
        self.head = torch.nn.Linear(c, classes)
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        h = self.pool(torch.relu(self.stem(x)))
        h = torch.relu(self.bn(torch.cat([self.branch_a(h), self.branch_b(self.avg(h))], dim=1)))
        up = torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        lin = torch.nn.functional.interpolate(torch.relu(self.up(h)), size=up.shape[-2:], mode="bilinear",
                                              align_corners=False)
        h = torch.relu(self.mix(torch.cat([up[:, : h.shape[1] // 2], lin], dim=1)))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


def feature_cnn(seed: int = 0) -> onnx.ModelProto:
    torch.manual_seed(seed)
    return _export(FeatureCNN(), (torch.randn(2, 3, 16, 16),), ["image"], ["logits"],
                   {"image": {0: "batch"}, "logits": {0: "batch"}})


def single_matmul(w: np.ndarray) -> onnx.ModelProto:
    """y = x @ w with one MatMul named "mm" (x: [n, K])."""
    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def saturated_gate(seed: int = 0) -> onnx.ModelProto:
    """Two outputs: ``y`` = Gemm(x) varies; ``gate`` = 2 * Sigmoid(Gemm(x) + 50) is exactly 2.0 for
    every input (a saturated sigmoid, written through a Mul so no loss reads it on its logits)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32) / 4, "w1"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32) / 40, "w2"),
             numpy_helper.from_array(np.full(4, 50.0, np.float32), "b2"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["y"], name="fc1"),
             helper.make_node("Gemm", ["x", "w2", "b2"], ["z"], name="fc2"),
             helper.make_node("Sigmoid", ["z"], ["s"], name="sigmoid"),
             helper.make_node("Mul", ["s", "two"], ["gate"], name="scale")]
    graph = helper.make_graph(nodes, "gate", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8]),
                               helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["n", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def residual_cnn(seed: int = 0, c: int = 8, head: bool = True) -> onnx.ModelProto:
    """stem Conv -> Relu -> [Conv -> Relu -> Conv] + skip -> Add -> Relu -> MaxPool -> Conv -> Relu
    -> (GlobalAveragePool -> Flatten -> Gemm, or the last Relu as the output)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name, x, cin, cout):
        inits.append(numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin))
                                             .astype(np.float32), f"{name}.w"))
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}_out"], name=name, pads=[1] * 4))
        return f"{name}_out"

    def op(kind, inputs, name, **attrs):
        nodes.append(helper.make_node(kind, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    h = op("Relu", [conv("stem", "x", 3, c)], "stem_relu")
    b = conv("b", op("Relu", [conv("a", h, c, c)], "a_relu"), c, c)
    r = op("Relu", [op("Add", [h, b], "add")], "add_relu")
    p = op("MaxPool", [r], "pool", kernel_shape=[2, 2], strides=[2, 2])
    y = op("Relu", [conv("c", p, c, c)], "c_relu")
    if head:
        g = op("Flatten", [op("GlobalAveragePool", [y], "gap")], "flat")
        inits.append(numpy_helper.from_array((rng.standard_normal((10, c)) / np.sqrt(c)).astype(np.float32), "fc.w"))
        inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"))
        nodes.append(helper.make_node("Gemm", [g, "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])
    else:
        nodes.append(helper.make_node("Identity", [y], ["y"], name="out"))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c, 8, 8])
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def varied_tokens(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n`` tokens of ``k`` channels whose scales differ (lognormal), as a transformer's hidden states do."""
    return (rng.standard_normal((n, k)) * rng.lognormal(0, 1, k)).astype(np.float32)


def block_gram(x: np.ndarray, block: int) -> np.ndarray:
    """Mean over the tokens of ``x`` [n, K] of x_b x_b^T per block of ``block`` along K (zero-padded):
    the second moments int4's clip search reads, computed here independently of the pass."""
    xb = np.pad(x, ((0, 0), (0, (-x.shape[1]) % block))).reshape(len(x), -1, block)
    return np.einsum("tbi,tbj->bij", xb.astype(np.float64), xb) / len(x)


def shrunk_block_gram(x: np.ndarray, block: int) -> np.ndarray:
    """:func:`block_gram` with its off-diagonal entries shrunk toward zero by Schafer and
    Strimmer's intensity (the sum over i != j of each entry's estimated variance over the sum
    of its square), computed here from the tokens themselves (one outer product per token),
    not from the pass's running sums: what int4's clip search reads after calibration."""
    xb = np.pad(x, ((0, 0), (0, (-x.shape[1]) % block))).reshape(len(x), -1, block).astype(np.float64)
    s = block_gram(x, block)
    out = np.empty_like(s)
    off = ~np.eye(block, dtype=bool)
    for b in range(s.shape[0]):
        var = sum((np.outer(t, t) - s[b]) ** 2 for t in xb[:, b]) / len(x) ** 2
        spread = np.sum(s[b][off] ** 2)
        lam = min(1.0, np.sum(var[off]) / spread) if spread > 0 else 0.0
        out[b] = lam * np.diag(np.diag(s[b])) + (1 - lam) * s[b]
    return out