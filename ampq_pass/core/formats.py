"""Numeric formats: one small class per format, one table to add a format.

A format owns everything the stages ask about it: which layers can take it
(:meth:`Format.accepts`), which tensors of a layer it quantizes with a calibrated range
(:meth:`Format.calibrated_tensors`, the op's output included where the integer kernel
wants it), its bias arithmetic, its QDQ emission, its stored byte size and its nominal
MAC throughput (the ``mac`` cost model). Adding a format touches this file only.

The emission and its numpy reference must agree bit for bit:
- how a weight is stored and dequantized in the rewritten graph (:meth:`weight_nodes`),
- how an activation is quantized in the graph (:meth:`activation_nodes`),
- the same two operations in numpy (:meth:`fake_weight`, :meth:`fake_activation`), which
  sensitivity uses to compute the quantization errors E^W and E^A of design.md §3.

Graph conventions follow ONNX Runtime's QDQ format so that its CPU EP fuses kernels:
weights are stored quantized and enter the op through DequantizeLinear; activations go
through a QuantizeLinear -> DequantizeLinear pair. Scales are derived only from the weight
itself and from the calibrated :class:`~ampq_pass.calibration.Ranges`, so every stage
computes the same scales.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.ops import OPS

HP = "hp"
_SUB_BYTE_TYPES = (TensorProto.INT4, TensorProto.UINT4)


@dataclass
class Emitted:
    """New initializers and nodes for a rewrite, and the tensor name that replaces the original."""

    initializers: list[TensorProto]
    nodes: list[onnx.NodeProto]
    output: str


def _per_channel_absmax(w: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.asarray(np.abs(w).max(), dtype=np.float32)
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    return np.abs(w).max(axis=reduce).astype(np.float32)


def _expand(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


#: the most two same-sign weight codes may add up to where a kernel adds the pair of their
#: uint8 x int8 products in int16: 255 x 128 = 32640 <= 32767 (:class:`Int8PairBounded`)
PAIR_MAX = 128
#: output channels bounded at a time (a 4096 x 11008 MatMul: a few int16 copies of 1024 rows)
_PAIR_ROWS = 1024


def _bound_pair_run(rows: np.ndarray) -> None:
    """In place on int16 codes (channel, K): every two neighbours along K of the same sign
    held to ``|a| + |b| <= PAIR_MAX``, each over-full pair cut by its excess split evenly (the
    larger code gives the odd step: the nearest feasible integer pair), an element between
    two over-full pairs cut by the larger of its two shares. Cuts only shrink magnitudes, so
    no pair is made over-full and one sweep is enough."""
    a, b = rows[:, :-1], rows[:, 1:]
    excess = np.abs(a) + np.abs(b) - PAIR_MAX
    excess[(a > 0) != (b > 0)] = 0  # opposite signs (or a zero) cannot pass the bound
    np.maximum(excess, 0, out=excess)
    if not excess.any():
        return
    a_larger = np.abs(a) >= np.abs(b)
    share_a = np.where(a_larger, (excess + 1) // 2, excess // 2)
    cut = np.zeros_like(rows)
    cut[:, :-1] = share_a
    np.maximum(cut[:, 1:], excess - share_a, out=cut[:, 1:])
    rows -= np.sign(rows) * cut


def bound_pairs(q: np.ndarray, axis: int | None) -> np.ndarray:
    """Integer weight codes ``q`` (output channels along ``axis``; None: one channel) with every
    two neighbours along the reduction axes of the same sign summing to at most
    :data:`PAIR_MAX` in magnitude, in both orders an integer kernel reads them: the ONNX
    layout (MatMul's K; Conv's C/g x kH x kW) and the layout with the first reduction axis
    moved last (Conv's kH x kW x C/g, ONNX Runtime's NHWC im2col and packed filters). Pairs of
    consecutive K elements are what x86 ``vpmaddubsw`` adds in int16 without VNNI; any pairing
    of neighbours, even- or odd-aligned, per tap or across taps, is then exact. Returns int16."""
    q16 = q.astype(np.int16)
    lead = [] if axis is None else [axis % q.ndim]
    rest = [d for d in range(q.ndim) if d not in lead]
    for order in dict.fromkeys((tuple(lead + rest), tuple(lead + rest[1:] + rest[:1]))):
        t = np.ascontiguousarray(np.transpose(q16, order))
        rows = t.reshape(t.shape[0] if lead else 1, -1)
        for start in range(0, rows.shape[0], _PAIR_ROWS):
            _bound_pair_run(rows[start:start + _PAIR_ROWS])
        q16 = np.transpose(t, np.argsort(order))
    return np.ascontiguousarray(q16)


#: the codes a channel's largest weight may take, tried per channel by :class:`Int8PairBounded`:
#: 64 is int8_w7's scale (no pair can pass the bound), 127 int8's
PAIR_SCALE_CODES = (64, 72, 80, 88, 96, 104, 112, 120, 127)
#: weight elements searched at a time (float temporaries of 16 MB)
_PAIR_SEARCH_ELEMENTS = 1 << 22
#: scales searched so far, by the weight's content, shape, dtype and axis (oldest first).
#: The search is a pure function of the weight, and the stages quantize a layer's weight
#: many times: the timing stage rewrites it once per configuration it times (ResNet-50: 326
#: configurations), the rewrite asks for its scale again for the bias. Per-channel scales
#: only: a few MB at most.
_PAIR_SCALES: OrderedDict[tuple, np.ndarray] = OrderedDict()
_PAIR_SCALES_MAX = 4096


def _symmetric_codes(w: np.ndarray, scale: np.ndarray, axis: int | None, limit: int) -> np.ndarray:
    """int8 codes of ``w`` at ``scale``, rounded half to even and clipped to [-limit, limit]."""
    # in place after the division: one float temporary of the weight's size, not three
    # (a 256 MB weight of a >2 GB model would otherwise add 768 MB at a time)
    t = w / _expand(scale, w.ndim, axis)
    np.rint(t, out=t)
    np.clip(t, -limit, limit, out=t)
    return t.astype(np.int8)


def _pair_bounded_codes(w: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """int16 codes of ``w`` at ``scale`` in [-127, 127], then :func:`bound_pairs`."""
    return bound_pairs(_symmetric_codes(w, scale, axis, 127), axis)


def pair_bounded_scale(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Per output channel, the scale among absmax / f, f in :data:`PAIR_SCALE_CODES`, whose
    codes after :func:`bound_pairs` reconstruct the channel with the least squared error: a
    fine step costs the cuts of the over-full pairs, a coarse one rounding everywhere.
    Gaussian weights pick f of about 90 (about half the error of f = 64); uniform ones, whose
    neighbours are often both large, keep 64. f = 64 makes no cut, so no channel ends up
    worse than with 7-bit weights. A weight searched before is answered from
    :data:`_PAIR_SCALES`."""
    w = np.ascontiguousarray(w)
    axis = None if axis is None else axis % w.ndim
    key = (hashlib.blake2b(w.reshape(-1).view(np.uint8), digest_size=16).digest(), w.shape, w.dtype.str, axis)
    hit = _PAIR_SCALES.get(key)
    if hit is not None:
        return hit.copy()
    amax = _per_channel_absmax(w, axis)
    if axis is None:
        out = _best_pair_scale(w, None, amax)
    else:
        out = np.empty_like(amax)
        step = max(1, _PAIR_SEARCH_ELEMENTS // max(1, w.size // w.shape[axis]))
        for c0 in range(0, w.shape[axis], step):
            part = np.take(w, np.arange(c0, min(c0 + step, w.shape[axis])), axis=axis)
            out[c0:c0 + step] = _best_pair_scale(part, axis, amax[c0:c0 + step])
    _PAIR_SCALES[key] = out.copy()
    while len(_PAIR_SCALES) > _PAIR_SCALES_MAX:
        _PAIR_SCALES.popitem(last=False)
    return out


def _best_pair_scale(w: np.ndarray, axis: int | None, amax: np.ndarray) -> np.ndarray:
    reduce = None if axis is None else tuple(a for a in range(w.ndim) if a != axis)
    best, best_err = None, None
    for f in PAIR_SCALE_CODES:
        scale = _safe_scale(amax * np.float32(2.0) / np.float32(2 * f))  # f = 127: Int8.weight_scale
        q = _pair_bounded_codes(w, scale, axis)
        err = np.square(q.astype(np.float32) * _expand(scale, w.ndim, axis) - w).sum(axis=reduce)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = np.where(better, scale, best), np.where(better, err, best_err)
    return np.asarray(best, np.float32)


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    # An all-zero channel gets scale 1 (as ONNX Runtime's quantizer does): any scale is exact for 0.
    scale = np.asarray(scale, dtype=np.float32)
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale).astype(np.float32)


def _dq_node(name: str, inputs: list[str], output: str, axis: int | None, block_size: int | None = None):
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size is not None:
        attrs["block_size"] = block_size
    return helper.make_node("DequantizeLinear", inputs, [output], name=name, **attrs)


class Format:
    """Base class: a format for a layer's weight and (optionally) its input activation."""

    name: str = ""
    #: minimum default-domain opset for the nodes this format emits
    opset: int = 13
    #: whether the layer's input activation is quantized too
    quantizes_activation: bool = True
    #: whether the rewrite replaces the op itself (:meth:`op_nodes`) instead of only its inputs
    replaces_op: bool = False
    #: whether activation quantization reads the calibrated range (dynamic formats do not)
    needs_range: bool = True
    #: ops whose low-precision kernel also quantizes the op's output (QLinearConv ...)
    output_quantized_ops: tuple[str, ...] = ()
    #: whether the bias is stored quantized (int32 with scale = activation x weight scale)
    quantizes_bias: bool = False
    #: multiply-accumulates per unit time relative to hp on a matrix engine (``mac`` cost model)
    throughput: float = 1.0
    #: bytes per activation element entering the op (None: the activation stays hp)
    activation_bytes: float | None = None
    #: whether a cut tensor between subgraphs can carry this format's activation Q/DQ as its
    #: state (design.md §3 "Boundary states"): only formats whose Q/DQ the runtimes fuse across ops
    cut_state: bool = False
    #: a variant a backend offers in another format's place on some hardware: a layer's
    #: candidate only where the backend offers it (:func:`ampq_pass.stages.layers.candidate_formats`)
    on_request: bool = False
    #: the length along K of the weight blocks whose clipping calibration searches against the
    #: layer's input (:meth:`search_clip`; the ratios then reach :meth:`fake_weight` and
    #: :meth:`weight_nodes`); None: no search
    clip_block: int | None = None

    def accepts(self, op_type: str, weight_shape: tuple[int, ...] | None) -> bool:
        """Whether a layer of ``op_type`` (weight shape, None for activation x activation) can take it."""
        return op_type in OPS

    def calibrated_tensors(self, layer) -> list[str]:
        """Tensors of ``layer`` whose calibrated range this format's rewrite reads."""
        if not (self.quantizes_activation and self.needs_range):
            return []
        return list(layer.activations) + ([layer.output] if self.quantizes_output(layer.op_type) else [])

    def quantizes_output(self, op_type: str) -> bool:
        """Whether the rewrite quantizes the op's output too (the integer kernel produces integers)."""
        return op_type in self.output_quantized_ops

    def stored_bytes(self, w: np.ndarray, axis: int | None) -> int:
        """Bytes the rewrite stores for weight ``w``: values, scales and zero points (sub-byte
        types packed two to a byte, as in the file; numpy holds them one per byte)."""
        total = 0
        for t in self.weight_nodes("w", w, axis).initializers:
            n = int(np.prod(t.dims)) if t.dims else 1
            bits = 4 if t.data_type in _SUB_BYTE_TYPES else onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * 8
            total += (n * bits + 7) // 8
        return int(total)

    def fake_weight(self, w: np.ndarray, axis: int | None, clip: np.ndarray | None = None) -> np.ndarray:
        """``w`` quantized and dequantized; ``clip``: the calibrated clip ratios of
        :meth:`search_clip` (only formats with a :attr:`clip_block` get one)."""
        raise NotImplementedError

    def fake_activation(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        raise NotImplementedError

    def weight_nodes(self, name: str, w: np.ndarray, axis: int | None, clip: np.ndarray | None = None) -> Emitted:
        raise NotImplementedError

    def search_clip(self, w: np.ndarray, gram: np.ndarray) -> np.ndarray:
        """Clip ratios for ``w`` given its input's per-block second moments (formats with a :attr:`clip_block`)."""
        raise NotImplementedError

    def activation_nodes(self, name: str, lo: float, hi: float) -> Emitted:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<format {self.name}>"


class Int8(Format):
    """int8: weights symmetric per output channel in [-127, 127]; activations uint8 per tensor
    with asymmetric scale/zero-point (the U8S8 pair ONNX Runtime's x86 kernels are fastest at)."""

    name = "int8"
    opset = 13
    output_quantized_ops = ("Conv", "ConvTranspose")  # QLinearConv; MatMul/Gemm have float-output kernels
    quantizes_bias = True
    throughput = 4.0
    activation_bytes = 1.0
    cut_state = True
    #: largest weight code: weights are symmetric in [-WEIGHT_MAX, WEIGHT_MAX]
    WEIGHT_MAX = 127

    # ---- parameters
    @classmethod
    def weight_scale(cls, w: np.ndarray, axis: int | None) -> np.ndarray:
        # Vectorised over channels; ORT's compute_scale_zp works on one scalar range at a time.
        # Symmetric int8 in ORT maps [-absmax, absmax] to [-127, 127]: scale = 2*absmax/254.
        return _safe_scale(_per_channel_absmax(w, axis) * np.float32(2.0) / np.float32(2 * cls.WEIGHT_MAX))

    @staticmethod
    def activation_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
        from onnxruntime.quantization.quant_utils import compute_scale_zp

        zp, scale = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32),
                                     np.array(0, np.uint8), np.array(255, np.uint8))
        return np.float32(scale), np.uint8(zp)

    # ---- numpy reference
    def quantize_weight(self, w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
        scale = self.weight_scale(w, axis)
        return _symmetric_codes(w, scale, axis, self.WEIGHT_MAX), scale

    def fake_weight(self, w, axis, clip=None):
        q, scale = self.quantize_weight(w, axis)
        return (q.astype(np.float32) * _expand(scale, w.ndim, axis)).astype(np.float32)

    def activation_codes(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """``x`` quantized as the activation's QuantizeLinear does: round half to even (numpy's
        ``rint``, as the operator), add the zero point, saturate to the zero point's type."""
        scale, zp = self.activation_params(lo, hi)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(x.astype(np.float32) / scale) + np.float32(zp), info.min, info.max)
        return q.astype(zp.dtype)

    def fake_activation(self, x, lo, hi):
        scale, zp = self.activation_params(lo, hi)
        q = self.activation_codes(x, lo, hi).astype(np.float32)
        return ((q - np.float32(zp)) * scale).astype(np.float32)

    # ---- graph
    def weight_nodes(self, name, w, axis, clip=None):
        q, scale = self.quantize_weight(w, axis)
        base = f"{name}_{self.name}"
        inits = [numpy_helper.from_array(q, base),
                 numpy_helper.from_array(scale, base + "_scale"),
                 numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + "_zero_point")]
        dq = _dq_node(base + "_DequantizeLinear", [base, base + "_scale", base + "_zero_point"],
                      base + "_dequantized", axis if scale.ndim else None)
        return Emitted(inits, [dq], base + "_dequantized")

    def activation_nodes(self, name, lo, hi):
        scale, zp = self.activation_params(lo, hi)
        base = f"{name}_{self.name}"
        inits = [numpy_helper.from_array(np.asarray(scale, np.float32), base + "_scale"),
                 numpy_helper.from_array(np.asarray(zp), base + "_zero_point")]  # its type picks the codes'
        q = helper.make_node("QuantizeLinear", [name, base + "_scale", base + "_zero_point"],
                             [base + "_quantized"], name=base + "_QuantizeLinear")
        dq = _dq_node(base + "_DequantizeLinear", [base + "_quantized", base + "_scale", base + "_zero_point"],
                      base + "_dequantized", None)
        return Emitted(inits, [q, dq], base + "_dequantized")

    def bias_scale(self, w: np.ndarray, node: onnx.NodeProto, lo: float, hi: float) -> np.ndarray:
        """Per-output-channel scale of the int32 bias: activation scale x weight scale (what
        QLinearConv/QGemm expect), with the op's own channel mapping."""
        act_scale = self.activation_params(lo, hi)[0]
        w_scale = OPS[node.op_type].per_output_channel(self.weight_scale(w, self.channel_axis(node, w)), node)
        return _safe_scale(np.float32(act_scale) * w_scale.astype(np.float32))

    @staticmethod
    def channel_axis(node: onnx.NodeProto, w: np.ndarray) -> int | None:
        return OPS[node.op_type].channel_axis(node, w.ndim)

    @staticmethod
    def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(bias.astype(np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)

    def fake_bias(self, bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The bias as the int8 kernel sees it (numpy reference of :meth:`bias_nodes`)."""
        return (self.quantize_bias(bias, scale).astype(np.float32) * scale).astype(np.float32)

    def bias_nodes(self, name: str, bias: np.ndarray, scale: np.ndarray) -> Emitted:
        """int32 bias with the given :meth:`bias_scale`."""
        q = self.quantize_bias(bias, scale)
        base = f"{name}_int32"
        inits = [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, base + "_scale"),
                 numpy_helper.from_array(np.zeros(scale.shape, np.int32), base + "_zero_point")]
        dq = _dq_node(base + "_DequantizeLinear", [base, base + "_scale", base + "_zero_point"],
                      base + "_dequantized", 0 if scale.ndim else None)
        return Emitted(inits, [dq], base + "_dequantized")


class Int8Weights7(Int8):
    """:class:`Int8` with weights in [-64, 64] (7 bits: ONNX Runtime's quantizers call it
    ``reduce_range``). On x86 CPUs without VNNI ONNX Runtime's u8s8 GEMM (MLAS, ``vpmaddubsw``)
    adds pairs of uint8 x int8 products in int16, which saturates where a pair passes 32767
    (255 x 127 x 2 = 64770): the model then differs from the QDQ arithmetic by whole steps on
    some outputs (one 48x20 MatMul on a 2-core AMD EPYC without AVX-512: 11 of 160 outputs off
    by up to 7.6, each matching the int16-saturated sum to 1e-6). With |w| <= 64 a pair is at
    most 32640: the kernel is exact again, at half the weight resolution, and the sensitivity
    models what runs. The ONNX Runtime CPU backend offers it in place of ``int8`` where its
    probe finds the saturation."""

    name = "int8_w7"
    WEIGHT_MAX = 64
    on_request = True


class _PairBoundedWeights:
    """Weight scale and codes of the pair-bounded int8 formats (mixed in before the format)."""

    @classmethod
    def weight_scale(cls, w: np.ndarray, axis: int | None) -> np.ndarray:
        return pair_bounded_scale(w, axis)

    def quantize_weight(self, w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
        scale = self.weight_scale(w, axis)
        return _pair_bounded_codes(w, scale, axis).astype(np.int8), scale


class Int8PairBounded(_PairBoundedWeights, Int8):
    """:class:`Int8` with weights whose neighbours along K are held to a same-sign sum of at
    most 128 (:func:`bound_pairs`): an exact int8 for the CPUs :class:`Int8Weights7` is for.
    ``vpmaddubsw`` adds two uint8 x int8 products in int16, and 255 x (|a| + |b|) stays
    within it when |a| + |b| <= 128, so the kernel computes the QDQ arithmetic while the step
    is finer than int8_w7's: each channel's scale is the one of :func:`pair_bounded_scale`
    (about absmax / 90 for Gaussian weights), which trades the cuts of the over-full pairs
    against the rounding of the rest (ResNet-50's last 3x3 convolution: 7-bit weights made it
    0.18 of the model's loss MSE, a third of the every-layer plan's). The ONNX Runtime CPU
    backend offers it in place of ``int8`` where its probe finds the saturation."""

    name = "int8_pairs"
    on_request = True


class Int8Symmetric(Int8):
    """int8 with symmetric activations (zero point 0), the scheme OpenVINO's CPU plugin runs
    fastest: an activation whose calibrated range holds no negative value is uint8 over
    [0, hi], any other int8 over [-m, m] with m = max(|lo|, |hi|) (NNCF's default "performance"
    preset for OpenVINO; NVIDIA ModelOpt writes the same). Weights and bias as :class:`Int8`.

    The op's output is not quantized: OpenVINO's low-precision transformations carry the
    dequantization down to the next FakeQuantize themselves, so a Q/DQ at an int8 convolution's
    output (what ONNX Runtime's QLinearConv needs) is only one more rounding there. Measured on
    this repo's YOLOv8n plan on OpenVINO 2026.4 (2-core Xeon, 30 interleaved rounds): the same
    plan 1.70x over fp32 with uint8 asymmetric activations, 1.92x with symmetric ones, and 3%
    more without the 57 convolution-output Q/DQ pairs (``benchmarks/results/backends.md``).
    Where an 8-bit op needs the output (a residual Add), the fusion stage quantizes it
    (:attr:`ampq_pass.core.fusion.FusionRules.layer_outputs`).
    """

    name = "int8_sym"
    output_quantized_ops = ()

    @staticmethod
    def activation_params(lo: float, hi: float) -> tuple[np.float32, np.integer]:
        from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

        # ORT's symmetric int8 maps [-m, m] onto [-127, 127]; uint8 from 0 has zero point 0 anyway.
        signed = lo < 0
        qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8 if signed else TensorProto.UINT8, symmetric=signed)
        zp, scale = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), qmin, qmax,
                                     symmetric=signed)
        return np.float32(scale), (np.int8 if signed else np.uint8)(zp)


class Fp8E4M3(Format):
    """fp8 e4m3 (finite-only variant): scales map the absmax onto 448, the largest finite value;
    weights per output channel, activations per tensor. Needs opset 19 QDQ."""

    name = "fp8_e4m3"
    opset = 19
    throughput = 4.0
    activation_bytes = 1.0
    MAX = 448.0

    def _scale(self, absmax):
        return _safe_scale(np.asarray(absmax, np.float32) / np.float32(self.MAX))

    @staticmethod
    def _to_fp8(v: np.ndarray) -> np.ndarray:
        # QuantizeLinear saturates by default; a plain cast would turn overflow into NaN.
        return np.clip(v, -448.0, 448.0).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)

    def fake_weight(self, w, axis, clip=None):
        scale = _expand(self._scale(_per_channel_absmax(w, axis)), w.ndim, axis)
        return (self._to_fp8(w / scale).astype(np.float32) * scale).astype(np.float32)

    def fake_activation(self, x, lo, hi):
        scale = self._scale(max(abs(lo), abs(hi)))
        return (self._to_fp8(x.astype(np.float32) / scale).astype(np.float32) * scale).astype(np.float32)

    def weight_nodes(self, name, w, axis, clip=None):
        scale = self._scale(_per_channel_absmax(w, axis))
        q = self._to_fp8(w / _expand(scale, w.ndim, axis))
        base = f"{name}_fp8"
        inits = [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, base + "_scale"),
                 numpy_helper.from_array(np.zeros(scale.shape, ml_dtypes.float8_e4m3fn), base + "_zero_point")]
        dq = _dq_node(base + "_DequantizeLinear", [base, base + "_scale", base + "_zero_point"],
                      base + "_dequantized", axis if scale.ndim else None)
        return Emitted(inits, [dq], base + "_dequantized")

    def activation_nodes(self, name, lo, hi):
        scale = self._scale(max(abs(lo), abs(hi)))
        base = f"{name}_fp8"
        inits = [numpy_helper.from_array(np.asarray(scale, np.float32), base + "_scale"),
                 numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), base + "_zero_point")]
        q = helper.make_node("QuantizeLinear", [name, base + "_scale", base + "_zero_point"],
                             [base + "_quantized"], name=base + "_QuantizeLinear")
        dq = _dq_node(base + "_DequantizeLinear", [base + "_quantized", base + "_scale", base + "_zero_point"],
                      base + "_dequantized", None)
        return Emitted(inits, [q, dq], base + "_dequantized")


class _Float16Like(Format):
    """16-bit float: the weight is stored in 16 bits and Cast up into the op; the activation
    passes a Cast down/up pair. Backends that run 16-bit kernels fold the casts; ONNX
    Runtime's CPU EP does not, so its adapter does not offer these formats."""

    opset = 13
    needs_range = False  # a Cast has no scale
    throughput = 2.0
    activation_bytes = 2.0
    np_type: type = np.float16
    onnx_type: int = TensorProto.FLOAT16

    def fake_weight(self, w, axis, clip=None):
        return w.astype(self.np_type).astype(np.float32)

    def fake_activation(self, x, lo, hi):
        return x.astype(np.float32).astype(self.np_type).astype(np.float32)

    def weight_nodes(self, name, w, axis, clip=None):
        base = f"{name}_{self.name}"
        cast = helper.make_node("Cast", [base], [base + "_float"], name=base + "_Cast", to=TensorProto.FLOAT)
        return Emitted([numpy_helper.from_array(w.astype(self.np_type), base)], [cast], base + "_float")

    def activation_nodes(self, name, lo, hi):
        base = f"{name}_{self.name}"
        down = helper.make_node("Cast", [name], [base], name=base + "_CastDown", to=self.onnx_type)
        up = helper.make_node("Cast", [base], [base + "_float"], name=base + "_CastUp", to=TensorProto.FLOAT)
        return Emitted([], [down, up], base + "_float")


class Fp16(_Float16Like):
    name = "fp16"
    np_type = np.float16
    onnx_type = TensorProto.FLOAT16


class Bf16(_Float16Like):
    name = "bf16"
    np_type = ml_dtypes.bfloat16
    onnx_type = TensorProto.BFLOAT16


class Int4(Format):
    """int4 weight-only, block-wise along the reduction axis (K) with symmetric per-block
    scales (signed: the largest magnitude of a block is -8, as ONNX Runtime quantizes); the
    blocked DequantizeLinear (opset 21) -> MatMul pattern is what ONNX Runtime fuses into
    MatMulNBits. Activations stay in high precision.

    Calibration clips each block's range (:meth:`search_clip`): the ratio of the block's
    largest magnitude that minimises the error of the layer's output on the calibration
    inputs, not of the weight (NVIDIA ModelOpt's ``awq_clip``). Without calibration data the
    ratio is 1: round to nearest, as ONNX Runtime's quantizer."""

    name = "int4"
    opset = 21
    quantizes_activation = False
    needs_range = False
    BLOCK = 32
    #: the clip ratios searched, as ModelOpt's AWQ-clip (0.5 to 0.95 by 0.05, and 1)
    CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    #: weight elements searched at a time (whole columns): the search's temporaries are a few
    #: float arrays of this size (16 MB each), whatever the weight's size
    _SEARCH_ELEMENTS = 1 << 22

    @property
    def clip_block(self) -> int:
        return self.BLOCK

    def accepts(self, op_type, weight_shape):
        return op_type == "MatMul" and weight_shape is not None and len(weight_shape) == 2

    def quantize_weight(self, w: np.ndarray, clip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """int4 codes [K, N] and scales [ceil(K/BLOCK), N]; ``clip`` [ceil(K/BLOCK), N] scales each
        block's range (values beyond it saturate to -8 or 7)."""
        k, n = w.shape
        blocks, extreme = self._blocks(w)
        if clip is not None and clip.shape != extreme.shape:
            raise ValueError(f"{self.name} clip ratios have shape {list(clip.shape)}, expected "
                             f"{list(extreme.shape)} (blocks x columns)")
        scale = self._scale(extreme, None if clip is None else clip.astype(np.float32))
        q = self._codes(blocks, scale).reshape(-1, n)[:k]
        return q.astype(ml_dtypes.int4), scale

    def _blocks(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``w`` zero-padded to whole blocks [ceil(K/BLOCK), BLOCK, N], and each block's value of
        largest magnitude [ceil(K/BLOCK), N]."""
        pad = (-w.shape[0]) % self.BLOCK
        blocks = (np.pad(w, ((0, pad), (0, 0))) if pad else w).reshape(-1, self.BLOCK, w.shape[1])
        return blocks, np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]

    @staticmethod
    def _scale(extreme: np.ndarray, clip: np.ndarray | np.float32 | None) -> np.ndarray:
        # As ONNX Runtime's own block quantizer (MLAS's MlasQuantizeBlockwise, which
        # MatMulNBitsQuantizer's RTN calls): the block's value of largest magnitude maps to -8
        # exactly, its sign carried by the scale, so a block spans 8 steps of amax/8 where a
        # positive amax/7 would use 7 (the corpus's Llama, every MatMul block 128: logits error
        # 0.212 against ORT's 0.195)
        magnitude = np.abs(extreme) / np.float32(8.0)
        if clip is not None:
            magnitude = magnitude * clip
        magnitude = _safe_scale(magnitude)  # an all-zero block: 1
        return np.where(extreme > 0, -magnitude, magnitude).astype(np.float32)

    @staticmethod
    def _codes(blocks: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The blocks' int4 codes, as float32 [ceil(K/BLOCK), BLOCK, N]."""
        return np.clip(np.rint(blocks / scale[:, None, :]), -8, 7)

    def fake_weight(self, w, axis, clip=None):
        q, scale = self.quantize_weight(w, clip)
        return (q.astype(np.float32) * np.repeat(scale, self.BLOCK, axis=0)[: w.shape[0]]).astype(np.float32)

    def fake_activation(self, x, lo, hi):
        return x

    def search_clip(self, w, gram):
        """Per block b and output column n, the ratio r of :data:`CLIP_GRID` minimising

            e^T G_b e,  e = (w - Q_r(w))[block b, column n],  G_b = mean over tokens of x_b x_b^T

        where x_b is the block's slice of the layer's input: the mean squared error that the
        block's quantization adds to output n (ModelOpt's AWQ-clip objective, written with the
        block's second-moment matrix ``gram`` [ceil(K/BLOCK), BLOCK, BLOCK] instead of 64 sampled
        tokens). Ties keep the larger ratio, so a block whose inputs are zero keeps ratio 1."""
        k, n = w.shape
        nb = -(-k // self.BLOCK)
        if gram.shape != (nb, self.BLOCK, self.BLOCK):
            raise ValueError(f"{self.name} clip search needs a [{nb}, {self.BLOCK}, {self.BLOCK}] second-moment "
                             f"matrix for a {list(w.shape)} weight, got {list(gram.shape)}")
        gram = gram.astype(np.float32)
        best_ratio = np.ones((nb, n), np.float32)
        step = max(1, self._SEARCH_ELEMENTS // k)
        for c0 in range(0, n, step):
            # the blocks and their extremes once per chunk; each ratio only rescales
            blocks, extreme = self._blocks(np.ascontiguousarray(w[:, c0:c0 + step], dtype=np.float32))
            best = np.full(extreme.shape, np.inf, np.float32)
            for r in self.CLIP_GRID:
                scale = self._scale(extreme, np.float32(r))
                e = self._codes(blocks, scale) * scale[:, None, :] - blocks  # padded rows: 0 - 0
                loss = np.einsum("bkn,bkn->bn", e, gram @ e)
                better = loss < best
                best = np.where(better, loss, best)
                best_ratio[:, c0:c0 + extreme.shape[1]][better] = r
        return best_ratio

    def weight_nodes(self, name, w, axis, clip=None):
        if w.ndim != 2:
            raise ValueError(f"int4 block-wise needs a 2-D MatMul weight, {name!r} has shape {list(w.shape)}")
        q, scale = self.quantize_weight(w, clip)
        base = f"{name}_{self.name}"
        inits = [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, base + "_scale")]
        dq = _dq_node(base + "_DequantizeLinear", [base, base + "_scale"], base + "_dequantized", 0, self.BLOCK)
        return Emitted(inits, [dq], base + "_dequantized")

    def activation_nodes(self, name, lo, hi):
        return Emitted([], [], name)


class Int4Block128(Int4):
    """:class:`Int4` with blocks of 128 along K (ONNX Runtime's ``MatMulNBitsQuantizer`` default):
    a quarter of the scales to read, so MatMulNBits runs faster where reading the weights is the
    cost (a decode step of the corpus's Llama with every MatMul in int4: 2.21x and 2.30x over fp32
    against 1.89x and 2.05x with blocks of 32, two interleaved runs on a 2-core AMD EPYC), and
    one scale covers 4x the weights, so it is lossier. Offered beside block 32: the sensitivity
    and the measured times choose."""

    name = "int4_b128"
    BLOCK = 128

    def accepts(self, op_type, weight_shape):
        # With K <= 128 one block spans the whole reduction: that is int4 per output channel,
        # not the block-wise format (and where K <= 32, the same numbers as int4's one block).
        return super().accepts(op_type, weight_shape) and weight_shape[0] > self.BLOCK


class Int8Dynamic(Int8):
    """int8 with dynamic activation scales: weights as :class:`Int8` (symmetric per output
    channel); the activation's uint8 scale and zero point are computed from each batch at
    run time (ONNX ``DynamicQuantizeLinear``), so no calibrated range can clip an outlier.

    ONNX Runtime has no QDQ form of this: the MatMul itself is replaced by the standard
    DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul pattern (what its
    ``quantize_dynamic`` writes), which the CPU EP fuses into ``DynamicQuantizeMatMul``.
    """

    name = "int8_dyn"
    opset = 13
    replaces_op = True
    needs_range = False
    output_quantized_ops = ()
    quantizes_bias = False
    cut_state = False  # its activation is quantized inside the op, per batch: nothing for a cut to carry

    def accepts(self, op_type, weight_shape):
        return op_type == "MatMul" and weight_shape is not None and len(weight_shape) == 2

    @staticmethod
    def dynamic_params(x: np.ndarray) -> tuple[np.float32, np.float32]:
        # ONNX DynamicQuantizeLinear: range widened to include 0, uint8, round half to even.
        lo = np.float32(min(0.0, float(x.min())))
        hi = np.float32(max(0.0, float(x.max())))
        scale = np.float32((hi - lo) / np.float32(255.0))
        if scale == 0:
            return np.float32(1.0), np.float32(0.0)
        zp = np.float32(np.clip(np.rint(np.float32(0.0) - lo / scale), 0, 255))
        return scale, zp

    def fake_activation(self, x, lo, hi):
        x = np.asarray(x, np.float32)
        scale, zp = self.dynamic_params(x)
        q = np.clip(np.rint(x / scale) + zp, 0, 255)
        return ((q - zp) * scale).astype(np.float32)

    def activation_nodes(self, name, lo, hi):
        base = f"{name}_int8_dyn"
        node = helper.make_node("DynamicQuantizeLinear", [name],
                                [base + "_quantized", base + "_scale", base + "_zero_point"],
                                name=base + "_DynamicQuantizeLinear")
        return Emitted([], [node], base + "_quantized")

    def weight_nodes(self, name, w, axis, clip=None):
        q, scale = self.quantize_weight(w, axis)
        base = f"{name}_int8_dyn"
        inits = [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, base + "_scale"),
                 numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + "_zero_point")]
        return Emitted(inits, [], base)

    def op_nodes(self, node: onnx.NodeProto, x_q: str, w_q: str) -> list[onnx.NodeProto]:
        """MatMulInteger on the quantized tensors, rescaled to float into the node's output."""
        x_base, out, tag = x_q[: -len("_quantized")], node.output[0], f"{node.name}_int8_dyn"
        return [
            helper.make_node("Mul", [x_base + "_scale", w_q + "_scale"], [tag + "_scale"], name=tag + "_ScaleMul"),
            helper.make_node("MatMulInteger", [x_q, w_q, x_base + "_zero_point", w_q + "_zero_point"],
                             [tag + "_int32"], name=tag + "_MatMulInteger"),
            helper.make_node("Cast", [tag + "_int32"], [tag + "_float"], name=tag + "_Cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [tag + "_float", tag + "_scale"], [out], name=node.name),
        ]


class Int8DynamicWeights7(Int8Dynamic):
    """:class:`Int8Dynamic` with weights in [-64, 64], for the same CPUs and reason as
    :class:`Int8Weights7` (ONNX Runtime's ``quantize_dynamic(reduce_range=True)``)."""

    name = "int8_dyn_w7"
    WEIGHT_MAX = 64
    on_request = True


class Int8DynamicPairBounded(_PairBoundedWeights, Int8Dynamic):
    """:class:`Int8Dynamic` with the weights of :class:`Int8PairBounded`, for the same CPUs and reason."""

    name = "int8_dyn_pairs"
    on_request = True


#: The table of formats: add a class above and a line here.
FORMATS: dict[str, Format] = {f.name: f for f in (Int8(), Int8Symmetric(), Int8Dynamic(), Fp8E4M3(), Fp16(), Bf16(),
                                                   Int4(), Int4Block128(), Int8Weights7(), Int8DynamicWeights7(),
                                                   Int8PairBounded(), Int8DynamicPairBounded())}
ALL_FORMATS: tuple[str, ...] = (HP, *FORMATS)
#: the formats a cut tensor can carry as its state (:attr:`Format.cut_state`), in table order
CUT_STATES: tuple[str, ...] = tuple(name for name, f in FORMATS.items() if f.cut_state)


def get_format(name: str) -> Format:
    """The format named ``name``; an unknown name is the user's error."""
    try:
        return FORMATS[name]
    except KeyError:
        raise AmpqError(f"unknown format {name!r}; expected one of {', '.join(ALL_FORMATS)}") from None
