"""Evaluate an ONNX graph node by node with torch ops, so that gradients can be taken.

Sensitivity (design.md §3) needs dL/dW and dL/dA for every quantizable layer at the
high-precision point. ONNX Runtime has no autograd, so the graph is re-evaluated here
with torch: one small function per op and ONE table, :data:`OPS`, at the bottom of this
file (add an op: write a function, add a line). Every op type of a model is checked
against the table before anything runs, so a missing op costs no compute.

Hooks let a caller see and replace the tensors a node reads and writes (e.g. swap a
weight for a leaf that requires grad, add a zero leaf to a layer's input to get the
gradient of that use only). Float tensors are evaluated in ``dtype`` (float32 by
default, float64 for reference gradients); integer and boolean tensors keep their ONNX
types, as shape arithmetic needs exact integer semantics.

The same table lowers rewritten subgraphs for the Gaudi backend (backends/gaudi.py):
there float tensors live on ``device`` in one precision (``one_float``) while integer
tensors stay on the host, so op functions take devices and float types from their
inputs or from :class:`Ctx`, never from torch's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.graph import node_names

#: hook(node input/output index, tensor) -> tensor to use instead
Hook = Callable[[int, torch.Tensor], torch.Tensor]



@dataclass(frozen=True)
class Ctx:
    """What an op function may know about its node besides its inputs."""

    node: onnx.NodeProto
    opset: int
    dtype: torch.dtype  # the executor's float type: ONNX FLOAT maps to it
    device: torch.device | str | None = None  # where float tensors live (None: the CPU)
    one_float: bool = False  # every ONNX float type of 16+ bits maps to dtype (a device without float64)

    @property
    def name(self) -> str:
        return self.node.name

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def torch_type(self, onnx_type: int) -> torch.dtype:
        if onnx_type == onnx.TensorProto.FLOAT or (self.one_float and onnx_type in _WIDE_FLOATS):
            return self.dtype
        return _TORCH_TYPES[onnx_type]

    def tensor(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``array`` as the executor holds data: floats in its float type on its device."""
        return to_torch(array, self.dtype, device=self.device, one_float=self.one_float)

    def fail(self, message: str) -> AmpqError:
        return AmpqError(f"node {self.name!r} ({self.node.op_type}): {message}")


_TORCH_TYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn, onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2,
}
_WIDE_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
#: numpy (ml_dtypes) float8 types, which torch.from_numpy does not take: their bytes are reinterpreted
_FLOAT8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def to_torch(array: np.ndarray | torch.Tensor, dtype: torch.dtype, *, device: torch.device | str | None = None,
             one_float: bool = False) -> torch.Tensor:
    """A torch tensor of ``array``; float32/float64 data (with ``one_float``, any float of 16+ bits)
    becomes ``dtype``, other types stay. Float tensors move to ``device``; integers stay where they are."""
    if isinstance(array, torch.Tensor):
        t = array
    else:
        a = np.array(array, copy=True)
        t = torch.from_numpy(a.view(np.uint8)).view(_FLOAT8[a.dtype.name]) if a.dtype.name in _FLOAT8 \
            else torch.from_numpy(a)
    wide = t.dtype in (torch.float32, torch.float64) or (one_float and t.is_floating_point() and t.element_size() >= 2)
    if wide and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device) if device is not None and t.is_floating_point() else t


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ============================================================================ elementwise

def _add(ctx, a, b):
    return a + b


def _sub(ctx, a, b):
    return a - b


def _mul(ctx, a, b):
    return a * b


def _div(ctx, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates
    return a / b


def _pow(ctx, a, b):
    if b.numel() == 1 and a.is_floating_point() and b.device.type == "cpu":  # a device read would stall it
        e = b.reshape(()).item()
        if e == 2:  # x*x has the exact gradient 2x and matches ORT's Pow(x, 2) bit for bit
            return a * a
        return torch.pow(a, e)
    return torch.pow(a, b.to(a) if a.is_floating_point() else b)


def _mod(ctx, a, b):
    return torch.fmod(a, b) if ctx.attr("fmod", 0) else torch.remainder(a, b)


def _unary(fn):
    return lambda ctx, x: fn(x)


def _leaky_relu(ctx, x):
    return F.leaky_relu(x, ctx.attr("alpha", 0.01))


def _elu(ctx, x):
    return F.elu(x, ctx.attr("alpha", 1.0))


def _prelu(ctx, x, slope):
    return torch.where(x < 0, x * slope, x)


def _hard_sigmoid(ctx, x):
    return torch.clamp(ctx.attr("alpha", 0.2) * x + ctx.attr("beta", 0.5), 0, 1)


def _hard_swish(ctx, x):
    return x * torch.clamp(x / 6 + 0.5, 0, 1)


def _gelu(ctx, x):
    return F.gelu(x, approximate=ctx.attr("approximate", "none"))


def _clip(ctx, x, lo=None, hi=None):
    if ctx.opset < 11:
        lo, hi = ctx.attr("min", None), ctx.attr("max", None)
    lo = lo.item() if isinstance(lo, torch.Tensor) else lo
    hi = hi.item() if isinstance(hi, torch.Tensor) else hi
    return torch.clamp(x, lo, hi)


def _variadic(fn):
    def run(ctx, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return run


def _mean(ctx, *xs):
    return _variadic(torch.add)(ctx, *xs) / len(xs)


def _cast(ctx, x):
    dtype = ctx.torch_type(ctx.attr("to"))
    return x.to(device=ctx.device, dtype=dtype) if dtype.is_floating_point else x.to(dtype)


def _cast_like(ctx, x, like):
    return x.to(like)


def _where(ctx, c, a, b):
    return torch.where(c.to(a.device), a, b)  # a mask from shape arithmetic sits on the host


def _compare(fn):
    return lambda ctx, a, b: fn(a, b)


def _identity(ctx, x):
    return x


def _dropout(ctx, x, *rest):
    return x, torch.ones_like(x, dtype=torch.bool)  # inference: identity, mask all kept


# ============================================================================ shapes

def _shape(ctx, x):
    dims = list(x.shape)
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _size(ctx, x):
    return torch.tensor(x.numel(), dtype=torch.int64)


def _reshape(ctx, x, shape):
    target = _ints(shape)
    if not ctx.attr("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _flatten(ctx, x):
    axis = _axis(ctx.attr("axis", 1), x.dim())
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _axes(ctx, axes_input) -> list[int] | None:
    """Axes from the attribute (older opsets) or the input (newer ones)."""
    attr = ctx.attr("axes", None)
    if attr is not None:
        return list(attr)
    return _ints(axes_input) if axes_input is not None else None


def _unsqueeze(ctx, x, axes=None):
    axes = _axes(ctx, axes)
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(ctx, x, axes=None):
    axes = _axes(ctx, axes)
    if axes is None:
        return x.squeeze()
    for a in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _transpose(ctx, x):
    perm = ctx.attr("perm", None)
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def _concat(ctx, *xs):
    return torch.cat([x for x in xs if x is not None], dim=ctx.attr("axis"))


def _split(ctx, x, split=None):
    axis = ctx.attr("axis", 0)
    sizes = list(ctx.attr("split", None) or _ints(split))
    if not sizes:
        parts = ctx.attr("num_outputs", None) or len(ctx.node.output)
        chunk = math.ceil(x.shape[axis] / parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(ctx, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        dim = x.shape[axis]
        # ONNX clamps out-of-range starts/ends as python's slice.indices does, except that an end
        # below -dim with a negative step means "through index 0", which python spells None.
        end = None if (step < 0 and end < -dim) else end
        lo, hi, st = slice(start, end, step).indices(dim)
        if st > 0:
            x = x[(slice(None),) * axis + (slice(lo, hi, st),)]
        else:  # torch has no negative-step slicing
            x = x.index_select(axis, torch.arange(lo, hi, st, dtype=torch.int64, device=x.device))
    return x


def _gather(ctx, x, index):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    idx = torch.where(index < 0, index + x.shape[axis], index)
    out = x.index_select(axis, idx.reshape(-1).to(x.device))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _gather_elements(ctx, x, index):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    return torch.gather(x, axis, torch.where(index < 0, index + x.shape[axis], index).to(x.device))


def _expand(ctx, x, shape):
    # ONNX Expand broadcasts both ways: a target dim of 1 keeps the input's dim.
    target = np.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))  # torch's imports sympy: slow
    return x.expand(target)


def _tile(ctx, x, repeats):
    return x.repeat(*_ints(repeats))


def _constant(ctx):
    for a in ctx.node.attribute:
        if a.name == "value":
            return ctx.tensor(numpy_helper.to_array(a.t))
        if a.name in ("value_float", "value_floats"):
            return torch.tensor(helper.get_attribute_value(a), dtype=ctx.dtype, device=ctx.device)
        if a.name in ("value_int", "value_ints"):
            return torch.tensor(helper.get_attribute_value(a), dtype=torch.int64)
    raise ctx.fail("Constant without a supported value attribute")


def _constant_of_shape(ctx, shape):
    value = ctx.attr("value", None)
    fill = ctx.tensor(numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32))
    return torch.full(_ints(shape), fill.reshape(-1)[0].item(), dtype=fill.dtype, device=fill.device)


def _range(ctx, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


def _trilu(ctx, x, k=None):
    k = int(k.item()) if k is not None else 0
    return torch.triu(x, k) if ctx.attr("upper", 1) else torch.tril(x, k)


def _cumsum(ctx, x, axis):
    axis = _axis(int(axis.item()), x.dim())
    if ctx.attr("reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, axis)
    if ctx.attr("exclusive", 0):
        out = out - x
    return out.flip(axis) if ctx.attr("reverse", 0) else out


def _pad(ctx, x, pads=None, value=None, axes=None):
    pads = list(ctx.attr("pads", None) or _ints(pads))
    mode = ctx.attr("mode", "constant")
    rank = x.dim()
    axes = [_axis(a, rank) for a in _ints(axes)] if axes is not None else list(range(rank))
    n = len(axes)
    begin, end = dict(zip(axes, pads[:n])), dict(zip(axes, pads[n:]))
    torch_pads = []
    for a in reversed(range(rank)):  # F.pad lists the last axis first
        torch_pads += [begin.get(a, 0), end.get(a, 0)]
    fill = value.item() if value is not None and value.numel() else ctx.attr("value", 0.0)
    if mode == "constant":
        return F.pad(x, torch_pads, value=fill)
    if mode not in ("edge", "reflect", "wrap"):
        raise ctx.fail(f"mode {mode!r} is not supported")
    for a in range(rank):  # one index_select per padded axis: any axis, negative pads crop
        b, e = begin.get(a, 0), end.get(a, 0)
        if b == 0 and e == 0:
            continue
        n = x.shape[a]
        index = np.arange(-b, n + e)
        if mode == "edge":
            index = np.clip(index, 0, n - 1)
        elif mode == "wrap":
            index = np.mod(index, n)
        else:  # reflect about the first and last element (period 2n - 2)
            period = max(2 * n - 2, 1)
            index = np.mod(index, period)
            index = np.where(index >= n, period - index, index) if n > 1 else np.zeros_like(index)
        x = x.index_select(a, torch.from_numpy(index).to(x.device))
    return x


# ============================================================================ reductions

def _reduce(fn):
    def run(ctx, x, axes=None):
        axes = _axes(ctx, axes)
        keep = bool(ctx.attr("keepdims", 1))
        if not axes:
            if ctx.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [_axis(a, x.dim()) for a in axes], keep)
    return run


def _amax(x, axes, keep):
    return torch.amax(x, dim=axes, keepdim=keep)


def _amin(x, axes, keep):
    return torch.amin(x, dim=axes, keepdim=keep)


def _arg(fn):
    def run(ctx, x):
        axis = _axis(ctx.attr("axis", 0), x.dim())
        keep = bool(ctx.attr("keepdims", 1))
        if ctx.attr("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=keep)
    return run


def _masked_safe(fn, x: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax over ``dim`` whose fully masked (all -inf) rows are NaN forward, as in ONNX, but
    carry finite gradients: exported attention replaces those NaNs (IsNaN -> Where), yet a NaN
    softmax output would make its backward NaN and poison every upstream gradient."""
    dead = torch.isneginf(x).all(dim=dim, keepdim=True)
    if x.device.type == "cpu" and not bool(dead.any()):  # the shortcut reads back: not on a lazy device
        return fn(x, dim=dim)
    y = fn(torch.where(dead, torch.zeros_like(x), x), dim=dim)
    nan = torch.where(dead, torch.full_like(x, float("nan")), torch.zeros_like(x)).detach()
    return y + nan  # the add passes gradients through unchanged, the NaN term has none


def _softmax(fn):
    def run(ctx, x):
        if ctx.opset >= 13:
            return _masked_safe(fn, x, ctx.attr("axis", -1))
        axis = _axis(ctx.attr("axis", 1), x.dim())  # older opsets: softmax over flattened trailing dims
        return _masked_safe(fn, x.reshape(*x.shape[:axis], -1), -1).reshape(x.shape)
    return run


# ============================================================================ linear algebra

def _matmul(ctx, a, b):
    return torch.matmul(a, b)


def _gemm(ctx, a, b, c=None):
    a = a.transpose(0, 1) if ctx.attr("transA", 0) else a
    b = b.transpose(0, 1) if ctx.attr("transB", 0) else b
    y = ctx.attr("alpha", 1.0) * (a @ b)
    return y if c is None else y + ctx.attr("beta", 1.0) * c


def _einsum(ctx, *xs):
    return torch.einsum(ctx.attr("equation"), *xs)


# ============================================================================ normalisation

def _layer_norm(ctx, x, scale, bias=None):
    axis = _axis(ctx.attr("axis", -1), x.dim())
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    inv = 1 / torch.sqrt(var + ctx.attr("epsilon", 1e-5))
    y = centred * inv * scale
    y = y if bias is None else y + bias
    return (y, mean, inv) if len(ctx.node.output) > 1 else y  # optional Mean, InvStdDev outputs


def _batch_norm(ctx, x, scale, bias, mean, var):
    if ctx.attr("training_mode", 0):
        raise ctx.fail("training_mode=1 is not supported (inference graphs only)")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = torch.rsqrt(var.reshape(shape) + ctx.attr("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)


def _instance_norm(ctx, x, scale, bias):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + ctx.attr("epsilon", 1e-5)) * scale.reshape(shape) + bias.reshape(shape)


# ============================================================================ convolution and pooling

def _spatial_pads(ctx, x, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] after resolving ``auto_pad``."""
    n = len(kernel)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return list(ctx.attr("pads", None) or [0] * 2 * n)
    if auto == "VALID":
        return [0] * 2 * n
    begin, end = [], []
    for i in range(n):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


def _torch_pad_list(pads: list[int]) -> list[int]:
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[n + i]]
    return out


def _conv(ctx, x, w, b=None):
    kernel = list(w.shape[2:])
    n = len(kernel)
    strides = list(ctx.attr("strides", None) or [1] * n)
    dilations = list(ctx.attr("dilations", None) or [1] * n)
    pads = _spatial_pads(ctx, x, kernel, strides, dilations)
    if any(pads):
        x = F.pad(x, _torch_pad_list(pads))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return fn(x, w, b, stride=strides, padding=0, dilation=dilations, groups=ctx.attr("group", 1))


def _conv_transpose(ctx, x, w, b=None):
    kernel = list(w.shape[2:])
    n = len(kernel)
    strides = list(ctx.attr("strides", None) or [1] * n)
    dilations = list(ctx.attr("dilations", None) or [1] * n)
    out_pad = list(ctx.attr("output_padding", None) or [0] * n)
    if ctx.attr("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID") or ctx.attr("output_shape", None):
        raise ctx.fail("auto_pad SAME / output_shape are not supported; export with explicit pads")
    pads = list(ctx.attr("pads", None) or [0] * 2 * n)
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    y = fn(x, w, None, stride=strides, padding=0, output_padding=out_pad, groups=ctx.attr("group", 1),
           dilation=dilations)
    # Crop ONNX's (possibly asymmetric) pads from the full transposed output.
    for i in range(n):
        y = y.narrow(2 + i, pads[i], y.shape[2 + i] - pads[i] - pads[n + i])
    return y if b is None else y + b.reshape((1, -1) + (1,) * n)


def _pool_args(ctx, x):
    kernel = list(ctx.attr("kernel_shape"))
    n = len(kernel)
    strides = list(ctx.attr("strides", None) or [1] * n)
    dilations = list(ctx.attr("dilations", None) or [1] * n)
    pads = _spatial_pads(ctx, x, kernel, strides, dilations)
    return kernel, strides, dilations, pads


def _crop_ceil(ctx, y, x, kernel, strides, dilations, pads):
    """ONNX ceil_mode drops a last window that would start in the right padding; torch, which
    sees the padding as input here, keeps it."""
    n = len(kernel)
    for i in range(n):
        size = x.shape[2 + i] + pads[i] + pads[n + i]
        span = (kernel[i] - 1) * dilations[i] + 1
        out = math.ceil((size - span) / strides[i]) + 1
        if (out - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
            out -= 1
        y = y.narrow(2 + i, 0, min(out, y.shape[2 + i]))
    return y


def _max_pool(ctx, x):
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise ctx.fail("the Indices output of MaxPool is not supported")
    kernel, strides, dilations, pads = _pool_args(ctx, x)
    padded = F.pad(x, _torch_pad_list(pads), value=float("-inf")) if any(pads) else x
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    y = fn(padded, kernel, strides, 0, dilations, ceil_mode=bool(ctx.attr("ceil_mode", 0)))
    return _crop_ceil(ctx, y, x, kernel, strides, dilations, pads) if ctx.attr("ceil_mode", 0) else y


def _average_pool(ctx, x):
    kernel, strides, dilations, pads = _pool_args(ctx, x)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    ceil = bool(ctx.attr("ceil_mode", 0))
    if not any(pads):
        y = fn(x, kernel, strides, 0, ceil_mode=ceil)
    else:
        padded = F.pad(x, _torch_pad_list(pads))
        y = fn(padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
        if not ctx.attr("count_include_pad", 0):
            # Divide by the number of real (unpadded) elements under each window.
            mask = F.pad(torch.ones_like(x[:1, :1]), _torch_pad_list(pads))
            y = y / fn(mask, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return _crop_ceil(ctx, y, x, kernel, strides, dilations, pads) if ceil else y


def _global_average_pool(ctx, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max_pool(ctx, x):
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


# ============================================================================ resize

def _source_coordinates(ctx, out_size: int, in_size: int, scale: float,
                        roi: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Input coordinate of each output position (ONNX Resize coordinate_transformation_mode)."""
    x = np.arange(out_size, dtype=np.float64)
    mode = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        offset = in_size / 2 * (1 - out_size / (scale * in_size))
        return offset + (x + 0.5) / scale - 0.5
    if mode == "tf_crop_and_resize":
        start, end = roi
        if out_size > 1:
            return start * (in_size - 1) + x * (end - start) * (in_size - 1) / (out_size - 1)
        return np.full_like(x, 0.5 * (start + end) * (in_size - 1))
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_size > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    raise ctx.fail(f"coordinate_transformation_mode {mode!r} is not supported")


def _nearest_index(ctx, coords: np.ndarray) -> np.ndarray:
    mode = ctx.attr("nearest_mode", "round_prefer_floor")
    if mode == "round_prefer_floor":
        return np.ceil(coords - 0.5)
    if mode == "round_prefer_ceil":
        return np.floor(coords + 0.5)
    if mode == "floor":
        return np.floor(coords)
    if mode == "ceil":
        return np.ceil(coords)
    raise ctx.fail(f"nearest_mode {mode!r} is not supported")


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution weights for the taps at offsets -1, 0, 1, 2."""
    def k(d):
        d = np.abs(d)
        return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                        np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))
    return np.stack([k(t + 1), k(t), k(1 - t), k(2 - t)], axis=-1)


def _resize_matrix(ctx, out_size: int, in_size: int, scale: float,
                   roi: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] interpolation matrix of one axis (Resize is separable: one matmul per axis) and
    the output rows outside the input (tf_crop_and_resize writes extrapolation_value there)."""
    coords = _source_coordinates(ctx, out_size, in_size, scale, roi)
    outside = (coords < 0) | (coords > in_size - 1) if ctx.attr("coordinate_transformation_mode") == \
        "tf_crop_and_resize" else np.zeros(out_size, bool)
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    mode = ctx.attr("mode", "nearest")
    if mode == "nearest":
        m[rows, np.clip(_nearest_index(ctx, coords), 0, in_size - 1).astype(np.int64)] = 1.0
    elif mode == "linear":
        c = np.clip(coords, 0, in_size - 1)  # ONNX Runtime clamps the coordinate for linear
        lo = np.floor(c).astype(np.int64)
        hi = np.minimum(lo + 1, in_size - 1)
        frac = c - lo
        np.add.at(m, (rows, lo), 1 - frac)
        np.add.at(m, (rows, hi), frac)
    elif mode == "cubic":
        base = np.floor(coords).astype(np.int64)
        weights = _cubic_weights(coords - base, ctx.attr("cubic_coeff_a", -0.75))
        taps = base[:, None] + np.arange(-1, 3)[None, :]
        if ctx.attr("exclude_outside", 0):
            weights = np.where((taps >= 0) & (taps < in_size), weights, 0.0)
            weights = weights / weights.sum(axis=1, keepdims=True)
        np.add.at(m, (np.repeat(rows, 4), np.clip(taps, 0, in_size - 1).reshape(-1)), weights.reshape(-1))
    else:
        raise ctx.fail(f"mode {mode!r} is not supported")
    m[outside] = 0.0
    return m, outside


def _resize(ctx, x, roi=None, scales=None, sizes=None):
    if ctx.attr("antialias", 0):
        raise ctx.fail("antialias is not supported")
    if ctx.node.op_type == "Upsample":  # opset < 10: (X, scales)
        scales, roi = roi, None
    rank = x.dim()
    axes = [_axis(a, rank) for a in (ctx.attr("axes", None) or range(rank))]
    out_sizes, factors = list(x.shape), [1.0] * rank
    if sizes is not None and sizes.numel():
        wanted = _ints(sizes)
        policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            for a, o in zip(axes, wanted):
                out_sizes[a], factors[a] = o, o / x.shape[a]
        else:  # one scale for every listed axis: the largest that fits, or the smallest that covers
            pick = min if policy == "not_larger" else max
            scale = pick(o / x.shape[a] for a, o in zip(axes, wanted))
            for a in axes:
                out_sizes[a], factors[a] = int(math.floor(scale * x.shape[a] + 0.5)), scale
    else:
        for a, s in zip(axes, scales.reshape(-1).tolist()):
            # ONNX Runtime multiplies in float32: floor(5 * 1.4f) is 7, not the float64 product's 6
            out_sizes[a], factors[a] = int(np.floor(np.float32(x.shape[a]) * np.float32(s))), float(s)
    crop = ctx.attr("coordinate_transformation_mode") == "tf_crop_and_resize"
    box = [float(v) for v in roi.reshape(-1).tolist()] if crop and roi is not None and roi.numel() else []
    extrapolation = ctx.attr("extrapolation_value", 0.0)
    for i, axis in enumerate(axes):
        if out_sizes[axis] == x.shape[axis] and factors[axis] == 1.0 and not crop:
            continue  # every coordinate mode but a crop maps an unscaled axis onto itself
        span = (box[i], box[len(axes) + i]) if box else (0.0, 1.0)
        m, outside = _resize_matrix(ctx, out_sizes[axis], x.shape[axis], factors[axis], span)
        x = torch.movedim(torch.movedim(x, axis, -1) @ torch.from_numpy(m).to(x).T, -1, axis)
        if outside.any():  # rows outside the crop box are constant along every later axis too
            mask = torch.from_numpy(outside).to(x.device).reshape([-1 if a == axis else 1 for a in range(rank)])
            x = torch.where(mask, torch.full_like(x, extrapolation), x)
    return x


# ============================================================================ more elementwise

def _mish(ctx, x):
    return x * torch.tanh(F.softplus(x))


def _softsign(ctx, x):
    return x / (1 + x.abs())


def _selu(ctx, x):
    alpha, gamma = ctx.attr("alpha", 1.67326319217681884765625), ctx.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(torch.clamp(x, max=0)))


def _celu(ctx, x):
    alpha = ctx.attr("alpha", 1.0)
    return torch.clamp(x, min=0) + alpha * torch.expm1(torch.clamp(x, max=0) / alpha)


def _thresholded_relu(ctx, x):
    return torch.where(x > ctx.attr("alpha", 1.0), x, torch.zeros_like(x))


def _shrink(ctx, x):
    lambd, bias = ctx.attr("lambd", 0.5), ctx.attr("bias", 0.0)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


def _is_inf(ctx, x):
    out = torch.zeros_like(x, dtype=torch.bool)
    if ctx.attr("detect_positive", 1):
        out = out | torch.isposinf(x)
    if ctx.attr("detect_negative", 1):
        out = out | torch.isneginf(x)
    return out


def _bit_shift(ctx, a, b):
    fn = torch.bitwise_left_shift if ctx.attr("direction") == "LEFT" else torch.bitwise_right_shift
    return fn(a, b.to(a.dtype))


def _lp_normalization(ctx, x):
    axis, p = ctx.attr("axis", -1), ctx.attr("p", 2)
    norm = x.abs().sum(dim=axis, keepdim=True) if p == 1 else torch.sqrt((x * x).sum(dim=axis, keepdim=True))
    return x / norm


# ============================================================================ more indexing

def _gather_nd(ctx, x, indices):
    b = ctx.attr("batch_dims", 0)
    k = indices.shape[-1]
    idx = indices.to(device=x.device, dtype=torch.int64)
    dims = torch.tensor(x.shape[b:b + k], dtype=torch.int64, device=x.device)
    idx = torch.where(idx < 0, idx + dims, idx)
    xb = x.reshape(-1, *x.shape[b:])  # batch dims flattened into one (size 1 without batch dims)
    ib = idx.reshape(xb.shape[0], -1, k)
    rows = torch.arange(xb.shape[0], device=x.device).reshape(-1, 1).expand(-1, ib.shape[1])
    out = xb[(rows, *(ib[..., j] for j in range(k)))]
    return out.reshape(*indices.shape[:-1], *x.shape[b + k:])


_TORCH_REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_nd(ctx, x, indices, updates):
    reduction = ctx.attr("reduction", "none")
    if reduction != "none" and reduction not in _TORCH_REDUCTIONS:
        raise ctx.fail(f"reduction {reduction!r} is not supported")
    k = indices.shape[-1]
    idx = indices.reshape(-1, k).to(device=x.device, dtype=torch.int64)
    dims = torch.tensor(x.shape[:k], dtype=torch.int64, device=x.device)
    idx = torch.where(idx < 0, idx + dims, idx)
    strides = torch.tensor([int(np.prod(x.shape[i + 1:k])) for i in range(k)], dtype=torch.int64, device=x.device)
    lin = (idx * strides).sum(-1)  # one row of the [prod(x.shape[:k]), rest] view per index tuple
    flat = x.reshape(int(np.prod(x.shape[:k])), -1)
    upd = updates.reshape(idx.shape[0], -1).to(x.dtype)
    if reduction in ("none", "add"):
        out = flat.index_put((lin,), upd, accumulate=reduction == "add")
    else:
        out = flat.scatter_reduce(0, lin.reshape(-1, 1).expand_as(upd), upd, _TORCH_REDUCTIONS[reduction])
    return out.reshape(x.shape)


def _scatter_elements(ctx, x, indices, updates):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    idx = indices.to(device=x.device, dtype=torch.int64)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    reduction = ctx.attr("reduction", "none")
    if reduction == "none":
        return x.scatter(axis, idx, updates.to(x.dtype))
    if reduction not in _TORCH_REDUCTIONS:
        raise ctx.fail(f"reduction {reduction!r} is not supported")
    return x.scatter_reduce(axis, idx, updates.to(x.dtype), _TORCH_REDUCTIONS[reduction])


def _one_hot(ctx, indices, depth, values):
    d = int(depth.reshape(-1)[0].item())
    idx = indices.to(torch.int64)
    idx = torch.where(idx < 0, idx + d, idx)
    valid = (idx >= 0) & (idx < d)  # out-of-range indices give an all-"off" row
    hot = F.one_hot(torch.where(valid, idx, torch.zeros_like(idx)), d).bool() & valid.unsqueeze(-1)
    hot = torch.movedim(hot, -1, _axis(ctx.attr("axis", -1), indices.dim() + 1))
    v = values.reshape(-1)
    return torch.where(hot.to(v.device), v[1], v[0])


def _non_zero(ctx, x):
    return torch.nonzero(x).T.contiguous().cpu()  # [rank, count] int64 indices: shape data stays on the host


def _top_k(ctx, x, k):
    axis = _axis(ctx.attr("axis", -1), x.dim())
    values, index = torch.topk(x, int(k.reshape(-1)[0].item()), dim=axis, largest=bool(ctx.attr("largest", 1)),
                               sorted=True)
    return values, index


def _depth_to_space(ctx, x):
    b = ctx.attr("blocksize")
    n, c, h, w = x.shape
    if ctx.attr("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:  # CRD
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(ctx, x):
    b = ctx.attr("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


# ============================================================================ more normalisation

def _group_norm(ctx, x, scale, bias):
    groups = ctx.attr("num_groups")
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(dim=-1, keepdim=True)
    centred = g - mean
    var = (centred * centred).mean(dim=-1, keepdim=True)
    y = (centred / torch.sqrt(var + ctx.attr("epsilon", 1e-5))).reshape(x.shape)
    if ctx.opset < 21 and scale.numel() == groups:  # opsets 18-20: one scale and bias per group
        scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


def _lrn(ctx, x):
    size = ctx.attr("size")
    alpha, beta, bias = ctx.attr("alpha", 1e-4), ctx.attr("beta", 0.75), ctx.attr("bias", 1.0)
    sq = (x * x).unsqueeze(1)  # [N, 1, C, ...]: sum over a channel window [c - (size-1)//2, c + ceil((size-1)/2)]
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = F.pad(sq.reshape(sq.shape[0], 1, sq.shape[2], -1), (0, 0, front, back))
    window = F.avg_pool2d(sq, (size, 1), stride=1) * size
    return x / (bias + alpha / size * window.reshape(x.shape)) ** beta


# ============================================================================ recurrent layers

def _rnn_activation(name: str, alpha, beta):
    name = name.lower()
    fns = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "softsign": lambda x: x / (1 + x.abs()),
           "softplus": F.softplus,
           "leakyrelu": lambda x: F.leaky_relu(x, 0.01 if alpha is None else alpha),
           "thresholdedrelu": lambda x: torch.where(x > (1.0 if alpha is None else alpha), x, torch.zeros_like(x)),
           "elu": lambda x: F.elu(x, 1.0 if alpha is None else alpha),
           "hardsigmoid": lambda x: torch.clamp((0.2 if alpha is None else alpha) * x + (0.5 if beta is None else beta), 0, 1),
           "scaledtanh": lambda x: (1.0 if alpha is None else alpha) * torch.tanh((1.0 if beta is None else beta) * x),
           "affine": lambda x: (1.0 if alpha is None else alpha) * x + (0.0 if beta is None else beta)}
    return fns[name]


_ALPHA_ACTS, _BETA_ACTS = {"leakyrelu", "thresholdedrelu", "elu", "hardsigmoid", "scaledtanh", "affine"}, \
    {"hardsigmoid", "scaledtanh", "affine"}


def _rnn_activations(ctx, defaults: list[str], dirs: int) -> list[Callable]:
    names = list(ctx.attr("activations", None) or defaults * dirs)
    alphas, betas = list(ctx.attr("activation_alpha", None) or []), list(ctx.attr("activation_beta", None) or [])
    fns = []
    for name in names:  # alphas and betas are consumed in order by the activations that take them
        alpha = alphas.pop(0) if name.lower() in _ALPHA_ACTS and alphas else None
        beta = betas.pop(0) if name.lower() in _BETA_ACTS and betas else None
        try:
            fns.append(_rnn_activation(name, alpha, beta))
        except KeyError:
            raise ctx.fail(f"activation {name!r} is not supported") from None
    return fns


def _recurrent(ctx, x, w, r, b, seq_lens, initial, n_gates, defaults, cell):
    """The loop shared by RNN, GRU and LSTM: ``cell(t, gates_x, states, weights, acts) -> states``.

    ``initial`` holds the optional initial states ([dirs, batch, H], or [batch, dirs, H] with
    layout=1); returns Y [T, dirs, N, H] (or [N, T, dirs, H]) and the final states."""
    layout = ctx.attr("layout", 0)
    if layout:
        x = x.transpose(0, 1)
        initial = [s.transpose(0, 1) if s is not None else None for s in initial]
    direction = ctx.attr("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    hidden = ctx.attr("hidden_size", None) or r.shape[-1]
    steps, batch = x.shape[0], x.shape[1]
    acts = _rnn_activations(ctx, defaults, dirs)
    per_dir = len(acts) // dirs
    clip = ctx.attr("clip", None)
    lens = None if seq_lens is None else seq_lens.to(device=x.device, dtype=torch.int64)
    ys, finals = [], []
    for d in range(dirs):
        bias = b[d, :n_gates * hidden] if b is not None else None
        xw = x @ w[d].transpose(0, 1)  # every step's input projection at once: [T, N, gates*H]
        if bias is not None:
            xw = xw + bias
        states = [s[d] if s is not None else x.new_zeros(batch, hidden) for s in initial]
        out = [None] * steps
        order = range(steps - 1, -1, -1) if (direction == "reverse" or d == 1) else range(steps)
        for t in order:
            new = cell(xw[t], states, d, acts[d * per_dir:(d + 1) * per_dir], clip)
            if lens is not None:  # past a sequence's length its states hold and its output is 0
                keep = (t < lens).reshape(-1, 1)
                new = [torch.where(keep, n, s) for n, s in zip(new, states)]
                out[t] = torch.where(keep, new[0], torch.zeros_like(new[0]))
            else:
                out[t] = new[0]
            states = new
        ys.append(torch.stack(out) if steps else x.new_zeros(0, batch, hidden))
        finals.append(states)
    y = torch.stack(ys, 1)
    finals = [torch.stack([f[i] for f in finals]) for i in range(len(initial))]
    if layout:
        y = y.permute(2, 0, 1, 3)
        finals = [f.transpose(0, 1) for f in finals]
    return (y, *finals)


def _clip_gates(v, clip):
    return v if clip is None else torch.clamp(v, -clip, clip)


def _rnn(ctx, x, w, r, b=None, seq_lens=None, h0=None):
    hidden = ctx.attr("hidden_size", None) or r.shape[-1]

    def cell(xw, states, d, acts, clip):
        (h,) = states
        v = xw + h @ r[d].transpose(0, 1)
        if b is not None:
            v = v + b[d, hidden:]
        return [acts[0](_clip_gates(v, clip))]
    return _recurrent(ctx, x, w, r, b, seq_lens, [h0], 1, ["Tanh"], cell)


def _gru(ctx, x, w, r, b=None, seq_lens=None, h0=None):
    hidden = ctx.attr("hidden_size", None) or r.shape[-1]
    before_reset = ctx.attr("linear_before_reset", 0)

    def cell(xw, states, d, acts, clip):
        (h,) = states
        f, g = acts
        rz, rr, rh = r[d].split(hidden)
        bz, br, bh = b[d, 3 * hidden:].split(hidden) if b is not None else (0, 0, 0)
        xz, xr, xh = xw.split(hidden, dim=-1)
        z = f(_clip_gates(xz + h @ rz.T + bz, clip))
        reset = f(_clip_gates(xr + h @ rr.T + br, clip))
        if before_reset:
            cand = g(_clip_gates(xh + reset * (h @ rh.T + bh), clip))
        else:
            cand = g(_clip_gates(xh + (reset * h) @ rh.T + bh, clip))
        return [(1 - z) * cand + z * h]
    return _recurrent(ctx, x, w, r, b, seq_lens, [h0], 3, ["Sigmoid", "Tanh"], cell)


def _lstm(ctx, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
    hidden = ctx.attr("hidden_size", None) or r.shape[-1]
    input_forget = ctx.attr("input_forget", 0)

    def cell(xw, states, d, acts, clip):
        h, c = states
        f, g, act_h = acts
        v = xw + h @ r[d].transpose(0, 1)
        if b is not None:
            v = v + b[d, 4 * hidden:]
        i, o, fg, cand = v.split(hidden, dim=-1)  # gate order i, o, f, c
        pi, po, pf = p[d].split(hidden) if p is not None else (None, None, None)
        if p is not None:
            i, fg = i + pi * c, fg + pf * c
        i = f(_clip_gates(i, clip))
        fg = 1 - i if input_forget else f(_clip_gates(fg, clip))
        c_new = fg * c + i * g(_clip_gates(cand, clip))
        if p is not None:
            o = o + po * c_new
        o = f(_clip_gates(o, clip))
        return [o * act_h(c_new), c_new]
    return _recurrent(ctx, x, w, r, b, seq_lens, [h0, c0], 4, ["Sigmoid", "Tanh", "Tanh"], cell)


# ============================================================================ control flow

def _if(ctx, cond):
    # If needs the enclosing scope: Executor.run evaluates it (_run_if); the table entry marks it supported.
    raise ctx.fail("If runs only inside Executor.run (its branches read the enclosing scope)")


def _grid_sample(ctx, x, grid):
    mode = ctx.attr("mode", "linear" if ctx.opset >= 20 else "bilinear")
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode)
    if x.dim() != 4 and mode == "bicubic":
        raise ctx.fail("cubic GridSample is 2-D only")
    return F.grid_sample(x, grid.to(x), mode=mode, padding_mode=ctx.attr("padding_mode", "zeros"),
                         align_corners=bool(ctx.attr("align_corners", 0)))


# ============================================================================ quantization

def _quant_param(ctx, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scale or zero point shaped to broadcast against ``x``: per tensor, per ``axis``, or blocked."""
    block = ctx.attr("block_size", 0)
    if p.dim() == 0 or (p.numel() == 1 and not block):
        return p.reshape(())
    axis = _axis(ctx.attr("axis", 1), x.dim())
    if block:
        return p.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    return p.reshape([-1 if i == axis else 1 for i in range(x.dim())])


def _quantize(ctx, x, scale, zero=None):
    out = zero.dtype if zero is not None else ctx.torch_type(ctx.attr("output_dtype", 0) or onnx.TensorProto.UINT8)
    wide = torch.promote_types(x.dtype, torch.float32)  # ONNX divides in at least float32
    v = x.to(wide) / _quant_param(ctx, scale, x).to(wide)
    if out.is_floating_point:  # float8: no zero point; clamped here as devices' casts may not saturate
        if not ctx.attr("saturate", 1):
            raise ctx.fail("saturate=0 is not supported")
        return v.clamp(-torch.finfo(out).max, torch.finfo(out).max).to(out)
    v = torch.round(v)  # half to even, as ONNX
    if zero is not None:
        v = v + _quant_param(ctx, zero, x).to(v)
    return v.clamp(torch.iinfo(out).min, torch.iinfo(out).max).to(out)


def _dequantize(ctx, x, scale, zero=None):
    scale = _quant_param(ctx, scale, x)
    wide = torch.promote_types(scale.dtype, torch.float32)
    v = x.to(scale.device, wide)  # an integer weight sits on the host, its scale with the floats
    if zero is not None and not zero.is_floating_point():  # a float8 zero point is always 0
        v = v - _quant_param(ctx, zero, x).to(v)
    return (v * scale.to(wide)).to(scale.dtype)


# ============================================================================ the op table

_COMPARISONS = {"Equal": torch.eq, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "Less": torch.lt,
                "LessOrEqual": torch.le, "And": torch.logical_and, "Or": torch.logical_or,
                "Xor": torch.logical_xor, "BitShift": None}
_TRIG = {"Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh,
         "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh}

#: op type -> fn(ctx, *inputs) -> tensor or tuple of tensors. Missing optional inputs are None.
OPS: dict[str, Callable] = {
    # elementwise arithmetic
    "Add": _add, "Sub": _sub, "Mul": _mul, "Div": _div, "Pow": _pow, "Mod": _mod,
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal),
    "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Round": _unary(torch.round),
    "Sign": _unary(torch.sign), "Erf": _unary(torch.erf), "Cos": _unary(torch.cos), "Sin": _unary(torch.sin),
    "Tanh": _unary(torch.tanh), "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(torch.relu),
    "Softplus": _unary(F.softplus), "LeakyRelu": _leaky_relu, "Elu": _elu, "PRelu": _prelu,
    "HardSigmoid": _hard_sigmoid, "HardSwish": _hard_swish, "Gelu": _gelu, "Clip": _clip,
    "Min": _variadic(torch.minimum), "Max": _variadic(torch.maximum), "Sum": _variadic(torch.add), "Mean": _mean,
    "IsNaN": _unary(torch.isnan), "IsInf": _is_inf, "Not": _unary(torch.logical_not), "BitShift": _bit_shift,
    "Mish": _mish, "Softsign": _softsign, "Selu": _selu, "Celu": _celu, "ThresholdedRelu": _thresholded_relu,
    "Shrink": _shrink, **{k: _unary(v) for k, v in _TRIG.items()},
    **{k: _compare(v) for k, v in _COMPARISONS.items() if v is not None},
    "Where": _where, "Cast": _cast, "CastLike": _cast_like, "Identity": _identity, "Dropout": _dropout,
    # shapes and indexing
    "Shape": _shape, "Size": _size, "Reshape": _reshape, "Flatten": _flatten, "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze, "Transpose": _transpose, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherElements": _gather_elements, "ScatterND": _scatter_nd, "Expand": _expand,
    "Tile": _tile, "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Range": _range,
    "Trilu": _trilu, "CumSum": _cumsum, "Pad": _pad, "GatherND": _gather_nd, "ScatterElements": _scatter_elements,
    "Scatter": _scatter_elements, "OneHot": _one_hot, "NonZero": _non_zero, "TopK": _top_k,
    "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth,
    # reductions
    "ReduceMean": _reduce(lambda x, a, k: x.mean(dim=a, keepdim=k)),
    "ReduceSum": _reduce(lambda x, a, k: x.sum(dim=a, keepdim=k)),
    "ReduceMax": _reduce(_amax), "ReduceMin": _reduce(_amin),
    "ReduceProd": _reduce(lambda x, a, k: _reduce_prod(x, a, k)),
    "ReduceL2": _reduce(lambda x, a, k: torch.sqrt((x * x).sum(dim=a, keepdim=k))),
    "ReduceSumSquare": _reduce(lambda x, a, k: (x * x).sum(dim=a, keepdim=k)),
    "ReduceL1": _reduce(lambda x, a, k: x.abs().sum(dim=a, keepdim=k)),
    "ReduceLogSum": _reduce(lambda x, a, k: torch.log(x.sum(dim=a, keepdim=k))),
    "ReduceLogSumExp": _reduce(lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k)),
    "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin),
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    # linear algebra and normalisation
    "MatMul": _matmul, "Gemm": _gemm, "Einsum": _einsum,
    "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm, "GroupNormalization": _group_norm, "LRN": _lrn,
    "LpNormalization": _lp_normalization,
    # recurrent layers (unrolled torch loops, differentiable) and control flow
    "RNN": _rnn, "GRU": _gru, "LSTM": _lstm, "If": _if,
    # convolution, pooling, resampling
    "Conv": _conv, "ConvTranspose": _conv_transpose, "MaxPool": _max_pool, "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool, "GlobalMaxPool": _global_max_pool,
    "Resize": _resize, "Upsample": _resize, "GridSample": _grid_sample,
    # quantization (rewritten models: the Gaudi lowering runs the QDQ nodes its fp8 GEMMs do not take)
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
}


def _reduce_prod(x, axes, keep):
    for a in sorted(axes, reverse=True):
        x = torch.prod(x, dim=a, keepdim=keep)
    return x


# ============================================================================ executor

def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append((a.name, a.g))
        out += [(a.name, g) for g in a.graphs]
    return out


def _all_nodes(graph: onnx.GraphProto) -> Iterable[tuple[onnx.NodeProto, str | None]]:
    """Every node of ``graph`` and of its subgraphs (If branches...), with its name if it has one."""
    for node in graph.node:
        yield node, node.name or None
        for _, g in _subgraphs(node):
            yield from _all_nodes(g)


def unsupported_ops(model: onnx.ModelProto, ops: Mapping[str, Callable] = OPS) -> dict[str, str]:
    """Every op type of ``model`` (subgraphs included) missing from ``ops``, with one node name for each."""
    missing: dict[str, str] = {}
    for index, (node, name) in enumerate(_all_nodes(model.graph)):
        key = _op_key(node)
        if key not in ops and key not in missing:
            missing[key] = name or f"#{index}"
    return missing


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _is_data(value: onnx.ValueInfoProto) -> bool:
    """A graph input that carries sample data: any float tensor, any tensor of rank >= 1. A scalar
    integer or boolean input (a sample rate, a flag) is a setting the whole run shares."""
    t = value.type.tensor_type
    return t.elem_type in _FLOAT_TYPES or not t.HasField("shape") or len(t.shape.dim) > 0


def data_dependent_ifs(model: onnx.ModelProto) -> dict[str, str]:
    """If nodes whose condition is computed from sample data (name -> condition tensor).

    The executor runs an If whose condition is fixed by constants, shapes (Shape/Size cut the
    dependence on values) or scalar integer settings: the branch is then the same for every
    sample of a run. A condition computed from the values of the data would make the graph
    itself depend on the samples, which sensitivity (one fixed graph) cannot take."""
    found: dict[str, str] = {}

    def walk(graph: onnx.GraphProto, tainted: set[str]) -> set[str]:
        tainted = set(tainted)
        for node in graph.node:
            if node.op_type in ("Shape", "Size"):
                continue
            subs = _subgraphs(node)
            if node.op_type == "If" and node.domain in ("", "ai.onnx") and len(subs) == 2:
                if node.input[0] in tainted:
                    found[node.name or node.output[0]] = node.input[0]
                outs = [walk(g, tainted) for _, g in subs]
                for i, name in enumerate(node.output):
                    if any(g.output[i].name in t for (_, g), t in zip(subs, outs) if i < len(g.output)):
                        tainted.add(name)
                continue
            reads = set(node.input) | {n for _, g in subs for sub, _ in _all_nodes(g) for n in sub.input}
            if reads & tainted:
                tainted.update(node.output)
        return tainted

    walk(model.graph, {i.name for i in model.graph.input if _is_data(i)}
         - {t.name for t in model.graph.initializer})
    return found


def check_supported(model: onnx.ModelProto, ops: Mapping[str, Callable] = OPS) -> None:
    """Raise :class:`AmpqError` listing every op type the executor cannot run (before any compute),
    and naming any If whose condition depends on the data."""
    missing = unsupported_ops(model, ops)
    if missing:
        listed = ", ".join(f"{op} (e.g. node {name!r})" for op, name in sorted(missing.items()))
        raise AmpqError(f"the gradient executor does not support {len(missing)} op type(s): {listed}; "
                        f"add them to ampq_pass.stages.sensitivity.executor.OPS")
    dependent = data_dependent_ifs(model)
    if dependent:
        listed = ", ".join(f"node {name!r} (condition {cond!r})" for name, cond in sorted(dependent.items()))
        raise AmpqError(f"the gradient executor runs If nodes only with a condition fixed by constants, shapes or "
                        f"scalar integer inputs; data-dependent condition: {listed}")


@dataclass
class _Body:
    """One graph as the executor runs it: the model's graph or an If branch."""

    run_nodes: list  # (name, node, ctx) of every non-Constant node, in order
    constants: dict[str, torch.Tensor]  # the branch's initializers and Constant outputs (the model's: Executor.constants)
    last_use: dict[str, int]  # tensor name -> index of the last node reading it (branch reads count for their If)
    outputs: list[str]
    branches: dict[str, dict[str, "_Body"]]  # If node name -> {"then_branch": ..., "else_branch": ...}
    reads: list[set[str]]  # per run node: the tensors it reads, its branches' reads of the enclosing scope included


class Executor:
    """Runs an ONNX model with torch ops; float tensors in ``dtype`` on ``device``.

    Raises :class:`AmpqError` at construction if any op is unsupported. Weights are
    converted once; :meth:`run` may be called many times (with or without grad).
    ``one_float`` maps every ONNX float type to ``dtype``; ``ops`` may extend :data:`OPS`
    with a caller's fused nodes (keyed ``domain.op_type``). If nodes run the branch their
    condition picks (conditions fixed by constants, shapes or scalar settings; hooks reach
    branch nodes by name too).
    """

    def __init__(self, model: onnx.ModelProto, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, one_float: bool = False,
                 ops: Mapping[str, Callable] = OPS):
        check_supported(model, ops)
        self.dtype, self.device, self.one_float, self.ops = dtype, device, one_float, ops
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.nodes = list(model.graph.node)
        self.node_names = node_names(model)
        self.constants: dict[str, torch.Tensor] = {
            t.name: to_torch(numpy_helper.to_array(t), dtype, device=device, one_float=one_float)
            for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in self.constants]
        self.output_names = [o.name for o in model.graph.output]
        self._body = self._compile(model.graph, self.node_names, self.constants)
        self._run_nodes = self._body.run_nodes

    def _compile(self, graph: onnx.GraphProto, names: list[str], constants: dict[str, torch.Tensor]) -> _Body:
        """Constant nodes evaluated once here, not on every run; If branches compiled likewise."""
        run_nodes, branches, last, all_reads = [], {}, {}, []
        for node, name in zip(graph.node, names):
            ctx = Ctx(node, self.opset, self.dtype, self.device, self.one_float)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                constants[node.output[0]] = _constant(ctx)
                continue
            index = len(run_nodes)
            run_nodes.append((name, node, ctx))
            reads = set(node.input)
            if node.op_type == "If" and node.domain in ("", "ai.onnx"):
                branches[name] = {}
                for attr, g in _subgraphs(node):
                    inner = [n.name or f"{name}/{attr}/{n.op_type}_{i}" for i, n in enumerate(g.node)]
                    branches[name][attr] = self._compile(g, inner, {
                        t.name: to_torch(numpy_helper.to_array(t), self.dtype, device=self.device,
                                         one_float=self.one_float) for t in g.initializer})
                    reads |= {i for n, _ in _all_nodes(g) for i in n.input} | {o.name for o in g.output}
            reads.discard("")
            all_reads.append(reads)
            for r in reads:
                last[r] = index
        return _Body(run_nodes, constants, last, [o.name for o in graph.output], branches, all_reads)

    def run(self, feeds: Mapping[str, np.ndarray | torch.Tensor], *, outputs: Iterable[str] | None = None,
            keep: Iterable[str] = (), input_hooks: Mapping[str, Hook] | None = None,
            output_hooks: Mapping[str, Hook] | None = None) -> dict[str, torch.Tensor]:
        """Evaluate the graph on ``feeds``; returns the graph outputs (or ``outputs``) and ``keep`` tensors.

        ``input_hooks[node name](slot, tensor)`` is called for every input of that node and
        returns the tensor the node reads instead; ``output_hooks[node name](slot, tensor)``
        likewise for what the node writes (downstream nodes see the replacement).
        Intermediate tensors are dropped after their last use unless kept.
        """
        wanted = list(outputs) if outputs is not None else self.output_names
        retain = set(wanted) | set(keep)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise AmpqError(f"executor: model input {missing[0]!r} is not fed (given: {sorted(feeds)})")
        env: dict[str, torch.Tensor] = dict(self.constants)
        for name in self.input_names:
            env[name] = to_torch(feeds[name], self.dtype, device=self.device, one_float=self.one_float)
        self._execute(self._body, env, retain, input_hooks or {}, output_hooks or {})
        return {n: env[n] for n in [*wanted, *[k for k in keep if k not in wanted]]}

    def _execute(self, body: _Body, env: dict[str, torch.Tensor], retain: set[str],
                 input_hooks: Mapping[str, Hook], output_hooks: Mapping[str, Hook]) -> None:
        for index, (name, node, ctx) in enumerate(body.run_nodes):
            args = [env[i] if i else None for i in node.input]
            if name in input_hooks:
                hook = input_hooks[name]
                args = [hook(slot, a) if a is not None else None for slot, a in enumerate(args)]
            try:
                if name in body.branches:
                    result = self._run_if(name, ctx, args[0], body.branches[name], env, retain, input_hooks,
                                          output_hooks)
                else:
                    result = self.ops[_op_key(node)](ctx, *args)
            except AmpqError:
                raise
            except Exception as exc:  # a bug or an unsupported attribute combination: name the node
                raise AmpqError(f"executor: node {name!r} ({node.op_type}) failed: {exc}") from exc
            results = result if isinstance(result, tuple) else (result,)
            if name in output_hooks:
                results = tuple(output_hooks[name](slot, r) for slot, r in enumerate(results))
            for out_name, value in zip(node.output, results):
                if out_name:
                    env[out_name] = value
            for i in body.reads[index]:  # a set: a node may read one tensor twice (Mul(x, x))
                if body.last_use.get(i) == index and i not in retain and i not in body.constants:
                    env.pop(i, None)

    def _run_if(self, name: str, ctx: Ctx, cond: torch.Tensor, branches: dict[str, _Body],
                env: dict[str, torch.Tensor], retain: set[str], input_hooks, output_hooks) -> tuple:
        if cond is None or cond.numel() != 1:
            raise ctx.fail("the condition must have exactly one element")
        body = branches["then_branch" if bool(cond.reshape(-1)[0].item()) else "else_branch"]
        scope = {**env, **body.constants}  # the branch reads the enclosing scope; its own names stay in it
        self._execute(body, scope, retain | set(body.outputs), input_hooks, output_hooks)
        for k in retain & scope.keys():  # tensors kept from inside the branch
            env.setdefault(k, scope[k])
        return tuple(scope[o] for o in body.outputs)

    def node(self, name: str) -> tuple[onnx.NodeProto, Ctx]:
        """The node called ``name`` and its op context (to re-apply its op to other inputs)."""
        for node_name, node, ctx in self._run_nodes:
            if node_name == name:
                return node, ctx
        raise AmpqError(f"executor: no node named {name!r}")

    def apply(self, name: str, *inputs: torch.Tensor | None) -> torch.Tensor:
        """Run the op of node ``name`` on other inputs (e.g. the layer op on a quantization error)."""
        node, ctx = self.node(name)
        result = self.ops[_op_key(node)](ctx, *inputs)
        return result[0] if isinstance(result, tuple) else result
