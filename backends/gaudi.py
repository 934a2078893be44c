"""Intel Gaudi backend through PyTorch HPU (``habana_frameworks.torch``): bf16 hp vs fp8.

NOT RUN ON HARDWARE. No Gaudi exists on the machines this was written on; only the
logic (lowering of the rewritten ONNX subgraph to torch ops, fp8 config application,
``mark_step`` / synchronisation, the timing loop) is tested, with an injected fake
runtime on the CPU (tests/test_gaudi.py).

Written against Habana's documented API, looked up for this module:
- ``habana_frameworks.torch.core.mark_step()`` flushes the ops accumulated in lazy mode
  into one graph and launches it; it does not wait for the device, so each timed run
  also calls ``torch.hpu.synchronize()`` (docs.habana.ai, "mark_step").
- fp8 GEMM: ``torch.ops.hpu.cast_to_fp8_v2(x, scale_inv, stochastic_rounding, is_amax,
  dtype)[0]`` quantizes ``x * scale_inv``; ``torch.ops.hpu.fp8_gemm_v2(A, trans_A, B,
  trans_B, D, out_dtype, A_scale_inv, B_scale_inv, bias, accumulate)`` multiplies fp8
  operands and rescales by the two ``*_scale_inv`` factors (signatures as used by Intel
  Neural Compressor's fp8 modules). Passing a per-output-channel ``B_scale_inv`` follows
  public INC-derived code, not a page we could read in full: the first run on hardware
  should check it against the bf16 result (``GaudiBackend.check``).
- Gaudi 2 saturates e4m3 at +-240 (exponent bias 7), Gaudi 3 at +-448. The rewrite's
  fp8 scales map absmax to 448, so on Gaudi 2 the largest values would clip; the
  adapter reports the device generation in its key so cached timings never mix them.

The subgraph arrives as the rewritten ONNX model (QDQ nodes in it); it is lowered to a
torch function: a MatMul/Gemm whose weight comes from an fp8 DequantizeLinear and whose
activation passes an fp8 QuantizeLinear->DequantizeLinear pair becomes one fp8 GEMM;
everything else runs in bf16. Integer shape arithmetic stays on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.measure import Backend, Capabilities, Protocol, Timing, interleave


@dataclass
class HabanaRuntime:
    """The few entry points of the Habana stack the adapter uses; injectable for tests."""

    torch: Any
    device: Any
    mark_step: Callable[[], None]
    synchronize: Callable[[], None]
    cast_to_fp8: Callable[[Any, Any], Any]  # (x, scale_inv) -> fp8 tensor of x * scale_inv
    fp8_gemm: Callable[[Any, Any, Any, Any, Any], Any]  # (A, B, out_dtype, A_scale_inv, B_scale_inv) -> A@B
    versions: dict
    generation: str = "unknown"


def load_habana() -> HabanaRuntime:
    """The real runtime; a clear error where the Habana PyTorch stack is not installed."""
    try:
        import habana_frameworks.torch.core as htcore  # noqa: F401  (registers the hpu device)
        import habana_frameworks.torch.hpu as hthpu
        import torch
    except ImportError as exc:
        raise AmpqError("the gaudi backend needs Intel Gaudi's PyTorch stack (habana_frameworks.torch), "
                        f"which is not installed here ({exc}); use --backend ort:cpu, mac or memory") from None
    if not hthpu.is_available():
        raise AmpqError("habana_frameworks.torch is installed but no Gaudi device is available")
    fp8 = torch.float8_e4m3fn

    def cast_to_fp8(x, scale_inv):
        return torch.ops.hpu.cast_to_fp8_v2(x, scale_inv, False, False, fp8)[0]

    def fp8_gemm(a, b, out_dtype, a_scale_inv, b_scale_inv):
        kwargs = {}
        if getattr(b_scale_inv, "ndim", 0) == 1 and b_scale_inv.numel() > 1:
            kwargs["B_scale_shape"] = [int(b_scale_inv.numel())]  # per output channel
        return torch.ops.hpu.fp8_gemm_v2(a, False, b, False, None, out_dtype, a_scale_inv, b_scale_inv,
                                         None, False, **kwargs)

    name = hthpu.get_device_name() if hasattr(hthpu, "get_device_name") else "hpu"
    versions = {"torch": torch.__version__}
    try:
        import habana_frameworks.torch as ht

        versions["habana_frameworks"] = getattr(ht, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        pass
    return HabanaRuntime(torch, torch.device("hpu"), htcore.mark_step, hthpu.synchronize, cast_to_fp8, fp8_gemm,
                         versions, generation=str(name))


# ----------------------------------------------------------------------------- lowering

_FP8_TYPES = (onnx.TensorProto.FLOAT8E4M3FN,)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class Lowered:
    """An ONNX model as a torch function on one device; counts the fp8 GEMMs it contains."""

    def __init__(self, model: onnx.ModelProto, rt: HabanaRuntime, hp_dtype):
        self.rt, self.torch, self.hp = rt, rt.torch, hp_dtype
        g = model.graph
        self.inputs = [i.name for i in g.input]
        self.outputs = [o.name for o in g.output]
        self.nodes = list(g.node)
        self.consts: dict[str, Any] = {}
        raw = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        producers = {o: n for n in g.node for o in n.output}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        fp8_init = {t.name for t in g.initializer if t.data_type in _FP8_TYPES}
        # fp8 pattern: MatMul(DQ(Q(x)) , DQ(w_fp8)) -> one fp8 GEMM; the DQ/Q nodes that
        # only feed it are skipped.
        self.fp8: dict[str, tuple[str, str, str, str]] = {}  # matmul name -> (x, x_scale, w, w_scale)
        self.skip: set[str] = set()
        for n in g.node:
            if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
                continue
            if n.op_type == "Gemm" and (_attr(n, "transA", 0) or len(n.input) > 2 and n.input[2]):
                continue  # bias / transposed A: keep the generic path (dequantized bf16)
            adq, wdq = producers.get(n.input[0]), producers.get(n.input[1])
            if not (adq and wdq and adq.op_type == wdq.op_type == "DequantizeLinear"):
                continue
            aq = producers.get(adq.input[0])
            if not (aq and aq.op_type == "QuantizeLinear" and wdq.input[0] in fp8_init):
                continue
            if aq.input[2] if len(aq.input) > 2 else "":
                zp = raw.get(aq.input[2])
                if zp is None or zp.dtype.itemsize != 1 or zp.astype(np.float32).any():
                    continue
            self.fp8[n.name] = (aq.input[0], aq.input[1], wdq.input[0], wdq.input[1])
            if _attr(n, "transB", 0):
                self.fp8[n.name] = (aq.input[0], aq.input[1], wdq.input[0] + "#T", wdq.input[1])
        # Q/DQ nodes whose every consumer is a fused GEMM (or a skipped DQ) need not run.
        outputs = {o.name for o in g.output}
        changed = True
        while changed:
            changed = False
            for d in g.node:
                if d.op_type not in ("QuantizeLinear", "DequantizeLinear") or d.name in self.skip:
                    continue
                users = consumers.get(d.output[0], [])
                if users and d.output[0] not in outputs and all(c.name in self.fp8 or c.name in self.skip for c in users):
                    self.skip.add(d.name)
                    changed = True
        torch = self.torch
        for name, arr in raw.items():
            if arr.dtype.kind == "f" and arr.dtype.itemsize >= 2 and name not in fp8_init:
                self.consts[name] = torch.from_numpy(np.ascontiguousarray(arr.astype(np.float32))).to(rt.device, hp_dtype)
            elif name in fp8_init:
                w = torch.from_numpy(np.ascontiguousarray(arr.astype(np.float32))).to(torch.float8_e4m3fn)
                self.consts[name] = w.to(rt.device)
                self.consts[name + "#T"] = w.t().contiguous().to(rt.device)
            else:
                self.consts[name] = torch.from_numpy(np.ascontiguousarray(arr))  # host: shapes, indices
        for n in self.nodes:
            if n.op_type not in _OPS and n.name not in self.fp8:
                raise AmpqError(f"gaudi backend: ONNX op {n.op_type} (node {n.name!r}) is not supported by the lowering")

    @property
    def n_fp8(self) -> int:
        return len(self.fp8)

    def feeds(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        torch, out = self.torch, {}
        for k in self.inputs:
            if k in self.consts:
                continue
            if k not in arrays:
                raise AmpqError(f"gaudi backend: timing inputs lack model input {k!r}")
            t = torch.from_numpy(np.ascontiguousarray(arrays[k]))
            out[k] = t.to(self.rt.device, self.hp) if t.is_floating_point() else t
        return out

    def __call__(self, feeds: dict[str, Any]) -> list[Any]:
        env = dict(self.consts)
        env.update(feeds)
        for n in self.nodes:
            if n.name in self.skip:
                continue
            if n.name in self.fp8:
                x, xs, w, ws = self.fp8[n.name]
                env[n.output[0]] = self._fp8_matmul(env[x], env[xs], env[w], env[ws])
                continue
            args = [env[i] if i else None for i in n.input]
            res = _OPS[n.op_type](self, n, *args)
            for name, value in zip(n.output, res if isinstance(res, tuple) else (res,)):
                env[name] = value
        return [env[o] for o in self.outputs]

    def _fp8_matmul(self, x, x_scale, w, w_scale):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        x_scale = x_scale.to(self.rt.device, self.torch.float32)
        w_scale = w_scale.to(self.rt.device, self.torch.float32)
        xq = self.rt.cast_to_fp8(x2, 1.0 / x_scale)
        y = self.rt.fp8_gemm(xq, w, self.hp, x_scale, w_scale)
        return y.reshape(*lead, y.shape[-1])

    # helpers used by the op table
    def host_ints(self, t) -> list[int]:
        return [int(v) for v in (t.cpu() if hasattr(t, "cpu") else t).reshape(-1).tolist()]

    def float_like(self, t):
        return t.to(self.rt.device, self.hp) if hasattr(t, "is_floating_point") and t.is_floating_point() else t


def _bin(fn):
    def op(lw, n, a, b):
        if a.is_floating_point() != b.is_floating_point():  # e.g. a float tensor times an int scalar
            a, b = lw.float_like(a.float() if not a.is_floating_point() else a), lw.float_like(b.float() if not b.is_floating_point() else b)
        elif a.device != b.device:
            a, b = a.to(lw.rt.device), b.to(lw.rt.device)
        return fn(a, b)
    return op


def _reshape(lw, n, x, shape):
    dims = lw.host_ints(shape)
    dims = [x.shape[i] if d == 0 and not _attr(n, "allowzero", 0) else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _slice(lw, n, x, starts, ends, axes=None, steps=None):
    starts, ends = lw.host_ints(starts), lw.host_ints(ends)
    axes = lw.host_ints(axes) if axes is not None else list(range(len(starts)))
    steps = lw.host_ints(steps) if steps is not None else [1] * len(starts)
    idx = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise AmpqError("gaudi backend: Slice with step != 1 is not supported")
        dim = x.shape[a]
        s = max(0, min(dim, s + dim if s < 0 else s))
        e = max(0, min(dim, e + dim if e < 0 else e))
        idx[a] = slice(s, e)
    return x[tuple(idx)]


def _cast(lw, n, x):
    torch = lw.torch
    to = _attr(n, "to")
    if to in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE):
        return x.to(lw.rt.device, lw.hp)  # every float runs at the backend's hp
    dtype = {onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
             onnx.TensorProto.BOOL: torch.bool}.get(to)
    if dtype is None:
        raise AmpqError(f"gaudi backend: Cast to ONNX type {to} is not supported")
    return x.to(dtype)


def _gemm(lw, n, a, b, c=None):
    if _attr(n, "transA", 0):
        a = a.t()
    if _attr(n, "transB", 0):
        b = b.t()
    y = (a @ b) * _attr(n, "alpha", 1.0)
    return y + c * _attr(n, "beta", 1.0) if c is not None else y


def _layernorm(lw, n, x, scale, bias=None):
    axis = _attr(n, "axis", -1)
    shape = x.shape[axis:] if axis != -1 else x.shape[-1:]
    return lw.torch.nn.functional.layer_norm(x, tuple(shape), scale, bias, _attr(n, "epsilon", 1e-5))


def _dequantize(lw, n, x, scale, zp=None):
    # A DequantizeLinear the fp8 fusion did not take (e.g. int8 in a gaudi plan): run it in hp.
    v = x.to(lw.torch.float32)
    if zp is not None:
        v = v - zp.to(lw.torch.float32)
    axis = _attr(n, "axis", 1)
    if scale.ndim == 1 and scale.numel() > 1:
        shape = [1] * v.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return lw.float_like(v.to(lw.rt.device) * scale.to(lw.rt.device, lw.torch.float32))


def _quantize(lw, n, x, scale, zp=None):
    torch = lw.torch
    s = scale.to(lw.rt.device, torch.float32)
    if zp is not None and zp.dtype == torch.float8_e4m3fn:
        return lw.rt.cast_to_fp8(x.to(torch.float32), 1.0 / s)
    lo, hi = (0, 255) if zp is None or zp.dtype == torch.uint8 else (-128, 127)
    z = zp.to(torch.float32) if zp is not None else 0.0
    return torch.clamp(torch.round(x.to(torch.float32) / s) + z, lo, hi)


def _gather(lw, n, x, i):
    axis = _attr(n, "axis", 0) % x.ndim
    i = i.to(x.device)
    i = lw.torch.where(i < 0, i + x.shape[axis], i)
    out = lw.torch.index_select(x, axis, i.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(i.shape) + tuple(x.shape[axis + 1:]))


def _erf(lw, n, x):
    return lw.torch.erf(x)


def _reduce_mean(lw, n, x, axes=None):
    ax = _attr(n, "axes") if axes is None else lw.host_ints(axes)
    return x.mean(dim=tuple(ax), keepdim=bool(_attr(n, "keepdims", 1)))


def _unsqueeze(lw, n, x, axes=None):
    for a in sorted(_attr(n, "axes") if axes is None else lw.host_ints(axes)):
        x = x.unsqueeze(a)
    return x


def _squeeze(lw, n, x, axes=None):
    ax = _attr(n, "axes") if axes is None else lw.host_ints(axes)
    if ax is None:
        return x.squeeze()
    for a in sorted(ax, reverse=True):
        x = x.squeeze(a)
    return x


def _concat(lw, n, *xs):
    if any(x.is_floating_point() for x in xs):
        xs = [lw.float_like(x) for x in xs]
    return lw.torch.cat(xs, dim=_attr(n, "axis"))


def _where(lw, n, c, a, b):
    dev = lw.rt.device if (a.is_floating_point() or b.is_floating_point()) else c.device
    return lw.torch.where(c.to(dev), lw.float_like(a).to(dev), lw.float_like(b).to(dev))


def _const_of_shape(lw, n, shape):
    value = _attr(n, "value")
    arr = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    t = lw.torch.full(lw.host_ints(shape), arr.reshape(-1)[0].item(), dtype=lw.torch.from_numpy(arr).dtype)
    return lw.float_like(t)


def _constant(lw, n):
    t = lw.torch.from_numpy(np.array(numpy_helper.to_array(_attr(n, "value"))))
    return lw.float_like(t)


def _expand(lw, n, x, shape):
    dims = lw.host_ints(shape)
    out = list(np.broadcast_shapes(tuple(x.shape), tuple(dims)))
    return x.expand(out)


def _conv(lw, n, x, w, b=None):
    pads = _attr(n, "pads", [0, 0, 0, 0])
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        raise AmpqError("gaudi backend: asymmetric Conv padding is not supported")
    return lw.torch.nn.functional.conv2d(x, w, b, stride=_attr(n, "strides", 1), padding=pads[:half],
                                         dilation=_attr(n, "dilations", 1), groups=_attr(n, "group", 1))


_OPS: dict[str, Callable] = {
    "MatMul": _bin(lambda a, b: a @ b),
    "Gemm": _gemm,
    "Add": _bin(lambda a, b: a + b),
    "Sub": _bin(lambda a, b: a - b),
    "Mul": _bin(lambda a, b: a * b),
    "Div": _bin(lambda a, b: a / b),
    "Pow": _bin(lambda a, b: a ** b),
    "Equal": _bin(lambda a, b: a == b),
    "Sqrt": lambda lw, n, x: x.sqrt(),
    "Erf": _erf,
    "Tanh": lambda lw, n, x: x.tanh(),
    "Relu": lambda lw, n, x: lw.torch.relu(x),
    "Sigmoid": lambda lw, n, x: lw.torch.sigmoid(x),
    "Neg": lambda lw, n, x: -x,
    "Softmax": lambda lw, n, x: lw.torch.softmax(x, dim=_attr(n, "axis", -1)),
    "Reshape": _reshape,
    "Transpose": lambda lw, n, x: x.permute(*(_attr(n, "perm") or list(range(x.ndim))[::-1])),
    "Shape": lambda lw, n, x: lw.torch.tensor(list(x.shape), dtype=lw.torch.int64),
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Slice": _slice,
    "Cast": _cast,
    "Constant": _constant,
    "ConstantOfShape": _const_of_shape,
    "ReduceMean": _reduce_mean,
    "LayerNormalization": _layernorm,
    "Where": _where,
    "Expand": _expand,
    "Identity": lambda lw, n, x: x,
    "Flatten": lambda lw, n, x: x.reshape(int(np.prod(x.shape[:_attr(n, "axis", 1)])), -1),
    "Conv": _conv,
    "DequantizeLinear": _dequantize,
    "QuantizeLinear": _quantize,
}


# ----------------------------------------------------------------------------- backend

class GaudiBackend(Backend):
    """Times rewritten subgraphs on a Gaudi through PyTorch HPU in lazy mode."""

    name = "gaudi"

    def __init__(self, *, protocol: Protocol | None = None, runtime: HabanaRuntime | None = None, hp_dtype=None):
        self.protocol = protocol or Protocol()
        self.rt = runtime if runtime is not None else load_habana()
        self.hp_dtype = hp_dtype if hp_dtype is not None else self.rt.torch.bfloat16

    def capabilities(self) -> Capabilities:
        return Capabilities(("fp8_e4m3",), "bf16", f"gaudi:{self.rt.generation}")

    def key(self) -> dict:
        return {"backend": "gaudi", "device": f"gaudi:{self.rt.generation}", "hp": str(self.hp_dtype),
                "versions": dict(sorted(self.rt.versions.items())), "protocol": self.protocol.to_json()}

    def lower(self, model: onnx.ModelProto) -> Lowered:
        return Lowered(model, self.rt, self.hp_dtype)

    def run(self, lowered: Lowered, feeds: dict[str, Any]) -> list[Any]:
        """One inference: queue the ops, then ``mark_step`` to compile/launch the graph."""
        out = lowered(feeds)
        self.rt.mark_step()
        return out

    def time(self, models: dict[str, onnx.ModelProto], inputs: list[dict[str, np.ndarray]]) -> dict[str, Timing]:
        if not inputs:
            raise AmpqError("no timing inputs: capture activations at the subgraph inputs first")
        lowered = {k: self.lower(m) for k, m in models.items()}
        feeds = {k: [lw.feeds(b) for b in inputs] for k, lw in lowered.items()}
        runners = {k: (lambda i, k=k: self.run(lowered[k], feeds[k][i])) for k in lowered}
        # Warm-up also pays the graph compilation of each configuration (cached afterwards).
        return interleave(runners, self.protocol, n_inputs=len(inputs), sync=self.rt.synchronize)

    def check(self, model: onnx.ModelProto, reference: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> float:
        """Max |difference| between ``model`` and ``reference`` outputs on the device,
        relative to the reference's max magnitude: the first thing to run on real hardware."""
        lm, lr = self.lower(model), self.lower(reference)
        a = self.run(lm, lm.feeds(inputs))
        b = self.run(lr, lr.feeds(inputs))
        self.rt.synchronize()
        worst = 0.0
        for x, y in zip(a, b):
            x, y = x.float().cpu().numpy(), y.float().cpu().numpy()
            worst = max(worst, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-12)))
        return worst if math.isfinite(worst) else math.inf
