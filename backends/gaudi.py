"""Intel Gaudi backend through PyTorch HPU (``habana_frameworks.torch``): bf16 hp vs fp8.

NOT RUN ON HARDWARE. No Gaudi exists on the machines this was written on; only the
logic (lowering of the rewritten ONNX subgraph to torch ops, fp8 config application,
``mark_step`` / synchronisation, the timing loop) is tested, with an injected fake
runtime on the CPU (tests/backends/test_gaudi.py). Device placement (floats on the
HPU, integers on the host) is checked only on torch's data-less ``meta`` device, which
fails on any host/device mix or host read of a float, for the test models; ops those
models lack (e.g. Resize, Clip, Pad) still read their float constants back to the host.

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
everything else runs through the sensitivity executor's op table
(``ampq_pass.stages.sensitivity.executor.OPS``, checked there against ONNX Runtime) with
every float in bf16 on the device, integer shape arithmetic on the host. A Q/DQ pair the
fusion does not take (e.g. before a Gemm with bias) runs as torch float8 casts, which
the HPU is documented to support but which were not run on one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.graph import ensure_node_names
from ampq_pass.core.measure import Backend, Capabilities, Protocol, Timing, interleave
from ampq_pass.stages.sensitivity.executor import OPS, Ctx, Executor, to_torch, unsupported_ops


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
#: the fused node's domain and its key in the executor's op table (a domain no ONNX model uses)
_FP8_DOMAIN = "ampq.gaudi"
_FP8_GEMM = f"{_FP8_DOMAIN}.Fp8Gemm"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _fuse_fp8_gemms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, set[str]]:
    """``model`` with every MatMul(DQ(Q(x)), DQ(w_fp8)) replaced by one Fp8Gemm node
    (x, x_scale, w, w_scale) and the Q/DQ nodes that only fed them removed; returns the
    model, the number of fused GEMMs and the fp8 weights read transposed (``name#T``)."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[int]] = {}
    for index, n in enumerate(g.node):
        for i in n.input:
            consumers.setdefault(i, []).append(index)
    zero_points = {t.name: t for t in g.initializer}
    fp8_init = {t.name for t in g.initializer if t.data_type in _FP8_TYPES}
    fused: dict[int, onnx.NodeProto] = {}
    transposed: set[str] = set()
    for index, n in enumerate(g.node):
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        if n.op_type == "Gemm" and (_attr(n, "transA", 0) or _attr(n, "alpha", 1.0) != 1.0
                                    or len(n.input) > 2 and n.input[2]):
            continue  # bias / transposed A / alpha: keep the generic path (dequantized hp)
        adq, wdq = producers.get(n.input[0]), producers.get(n.input[1])
        if not (adq and wdq and adq.op_type == wdq.op_type == "DequantizeLinear"):
            continue
        aq = producers.get(adq.input[0])
        if not (aq and aq.op_type == "QuantizeLinear" and wdq.input[0] in fp8_init):
            continue
        if len(aq.input) > 2 and aq.input[2]:  # the GEMM quantizes x with no zero point
            zp = zero_points.get(aq.input[2])
            zp = numpy_helper.to_array(zp) if zp is not None else None
            if zp is None or zp.dtype.itemsize != 1 or zp.astype(np.float32).any():
                continue
        w = wdq.input[0]
        if _attr(n, "transB", 0):
            transposed.add(w)
            w += "#T"
        fused[index] = onnx.helper.make_node("Fp8Gemm", [aq.input[0], aq.input[1], w, wdq.input[1]],
                                             [n.output[0]], name=n.name, domain=_FP8_DOMAIN)
    # Q/DQ nodes whose every consumer is a fused GEMM (or a skipped Q/DQ) need not run.
    outputs = {o.name for o in g.output}
    skip: set[int] = set()
    changed = True
    while changed:
        changed = False
        for index, d in enumerate(g.node):
            if d.op_type not in ("QuantizeLinear", "DequantizeLinear") or index in skip:
                continue
            users = consumers.get(d.output[0], [])
            if users and d.output[0] not in outputs and all(u in fused or u in skip for u in users):
                skip.add(index)
                changed = True
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(fused.get(i, n) for i, n in enumerate(g.node) if i not in skip)
    return ensure_node_names(out), len(fused), transposed  # the executor names nodes in its errors


class Lowered:
    """An ONNX model as a torch function on one device: the sensitivity executor's op table
    (floats in the hp dtype on the device, integer shape arithmetic on the host) plus the
    fused fp8 GEMMs; counts those GEMMs."""

    def __init__(self, model: onnx.ModelProto, rt: HabanaRuntime, hp_dtype):
        self.rt, self.hp = rt, hp_dtype
        fused, self.n_fp8, transposed = _fuse_fp8_gemms(model)
        ops = {**OPS, _FP8_GEMM: self._fp8_gemm}
        missing = unsupported_ops(fused, ops)
        if missing:
            raise AmpqError("gaudi backend: " + "; ".join(
                f"ONNX op {op} (node {name!r}) is not supported by the lowering" for op, name in missing.items()))
        self.executor = Executor(fused, dtype=hp_dtype, device=rt.device, one_float=True, ops=ops)
        for w in transposed:  # transposed once here, not on every run
            self.executor.constants[w + "#T"] = self.executor.constants[w].t().contiguous()

    def feeds(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """The model's inputs on the device (floats in hp), converted once before timing."""
        out = {}
        for k in self.executor.input_names:
            if k not in arrays:
                raise AmpqError(f"gaudi backend: timing inputs lack model input {k!r}")
            out[k] = to_torch(arrays[k], self.hp, device=self.rt.device, one_float=True)
        return out

    def __call__(self, feeds: dict[str, Any]) -> list[Any]:
        with self.rt.torch.no_grad():
            return list(self.executor.run(feeds).values())

    def _fp8_gemm(self, ctx: Ctx, x, x_scale, w, w_scale):
        torch = self.rt.torch
        x2 = x.reshape(-1, x.shape[-1])
        x_scale = x_scale.to(self.rt.device, torch.float32)
        w_scale = w_scale.to(self.rt.device, torch.float32)
        y = self.rt.fp8_gemm(self.rt.cast_to_fp8(x2, 1.0 / x_scale), w, self.hp, x_scale, w_scale)
        return y.reshape(*x.shape[:-1], y.shape[-1])


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
                "versions": dict(sorted(self.rt.versions.items())), "protocol": self.protocol.key()}

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
