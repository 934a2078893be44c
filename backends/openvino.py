"""OpenVINO runtime backend (``openvino:cpu``, ``openvino:DEVICE``): compiled models with fixed,
recorded settings, timed with the shared interleaved protocol.

Installed by the optional extra ``pip install 'ampq-pass[openvino]'``; imported lazily, so a
machine without it only fails when this backend is asked for (one line, saying what to
install).

Settings every compiled model gets (all in :meth:`OpenVinoBackend.key`, so cached timings
never mix them):

- ``INFERENCE_NUM_THREADS`` = ``threads`` (2), ``PERFORMANCE_HINT`` = ``LATENCY``,
  ``NUM_STREAMS`` = 1: one stream, one request, a fixed thread count (no throughput streams).
- ``INFERENCE_PRECISION_HINT`` = ``f32``: on CPUs with AVX512_BF16/AMX the CPU plugin's
  default inference precision is bf16 (read from the device on this machine), which would run
  the "hp" model in bf16; the pass's hp is the model's own fp32, so it is pinned.
- ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` = 0 (CPU): by default the CPU plugin quantizes the
  *activations* of MatMuls with compressed (int4/int8-weight-only) weights to int8 per group
  of 32 at run time. That is what makes an int4 weight-only MatMul fast on many tokens (1.5x
  over fp32 on the 8 x 128-token probe below, 1.05x without it), but it is an activation error
  the sensitivity stage does not model, so it is off. Without it int4 stays a real
  compressed-weight kernel, fast where reading the weights is the cost (a decode step):
  ``int4``/``int4_b128`` are offered and the subgraph timings decide, as on ONNX Runtime.
- ``ENABLE_CPU_PINNING`` = False: several compiled models are alive during interleaved timing
  on cores shared with other processes; pinning threads of each one to fixed cores would make
  a neighbour's load hit one configuration more than another.

Formats offered (design.md §3: never a format the device would emulate slowly): the device's
``OPTIMIZATION_CAPABILITIES`` (INT8 -> ``int8_sym`` and ``int8``, FP16 -> ``fp16``, BF16 ->
``bf16``), narrowed to those measured fast *as the rewrite writes them* (:data:`MEASURED_FAST`).
On the CPU that is ``int8_sym`` (activations symmetric, zero point 0, no Q/DQ at a
convolution's output: what OpenVINO's own tools write) *and* ``int8`` (ONNX Runtime's uint8
asymmetric activations), and the time model chooses per layer: neither is faster everywhere.
Every conv of YOLOv8n ran 1.86x over fp32 in int8_sym against 1.46x in int8 (SiLU outputs);
MiniLM's plan at budget 0.1 ran 1.70x over OpenVINO's fp32 with int8 (28 of 36 layers) and
1.49x with int8_sym (27 of 36): symmetric activations cost accuracy on one-sided ranges, so
fewer layers fit the budget, and they were not faster there.
Measured on this repository's machine (Intel Xeon, Sapphire Rapids class: AVX512-VNNI, AMX,
AVX512_BF16, AVX512_FP16; OpenVINO 2026.4, 2 threads, two MatMuls 384x1536 / 1536x384, batch
8 x 128 tokens; ``benchmarks/bench_backends.py --probe``): see the table in
``benchmarks/results/backends.md``. ``int8_dyn`` (DynamicQuantizeLinear + MatMulInteger) is not
offered: OpenVINO does not fuse that ONNX pattern. ``int4``/``int4_b128`` (blocked weight
DequantizeLinear into MatMul, weight-only) compile to compressed-weight FullyConnected kernels:
one token through two 4096x4096 MatMuls ran 4.98 ms in fp32, 1.54 ms in int8_sym, 1.24 ms in
int4 and 1.13 ms in int4_b128, while 128 tokens through 384x1536 / 1536x384 ran 1.79 ms fp32 and
1.88 ms int4 (AMD EPYC, AVX-512 VNNI, 2 threads, 2026-11-27; the probe's decode shape, in
``benchmarks/results/backends_minilm.md`` int4 4.17x and int4_b128 4.43x over fp32 there). Like
ONNX Runtime's int4 they are offered because a shape exists where they win; the per-layer
screen drops them where they do not.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Mapping

import numpy as np
import onnx

from ampq_pass.backends.openvino_rules import OPENVINO_CPU_RULES
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import CUT_STATES
from ampq_pass.core.measure import Backend, Capabilities, Protocol, Timing, interleave
from ampq_pass.core.proto import fits_protobuf, save_external

__all__ = ["OpenVinoBackend", "available_devices", "import_openvino", "CAPABILITY_FORMATS", "MEASURED_FAST",
           "ON_REQUEST"]

INSTALL_HINT = "pip install 'ampq-pass[openvino]'"

#: whether a model is handed to OpenVINO from memory; larger ones (protobuf's 2 GB limit) go
#: through a temporary file with external data (a module attribute so tests can force it)
fits_in_memory = fits_protobuf

#: OPTIMIZATION_CAPABILITIES entry -> the project's formats it makes possible
#: (OPTIMIZATION_CAPABILITIES names no weight-compression entry; the CPU plugin's int4/int8
#: compressed-weight kernels come with its integer support, so INT8 stands for them too)
CAPABILITY_FORMATS: dict[str, tuple[str, ...]] = {"INT8": ("int8_sym", "int8", "int4", "int4_b128"),
                                                  "FP16": ("fp16",), "BF16": ("bf16",)}

#: per device type, the formats offered by default: measured faster than fp32 in the form the
#: rewrite writes them (int8_sym: symmetric per-tensor activation Q->DQ and int8 symmetric
#: per-channel weight DQ into the MatMul/Conv; fp16/bf16: Cast down/up pairs and weights
#: stored in 16 bits behind a Cast). See the module docstring for where this was measured; an
#: unknown device type offers int8_sym only when the device lists INT8.
MEASURED_FAST: dict[str, tuple[str, ...]] = {"CPU": ("int8_sym", "int8", "int4", "int4_b128")}

#: per device type, formats that also run in low-precision kernels as written but are not
#: offered by default: taken only when the user asks for them (``--formats``)
ON_REQUEST: dict[str, tuple[str, ...]] = {"CPU": ()}


def import_openvino():
    """The ``openvino`` module, or an :class:`AmpqError` with one line saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise AmpqError(f"backend openvino needs the OpenVINO runtime, which is not installed ({e}); "
                        f"run: {INSTALL_HINT}") from None
    return openvino


def available_devices() -> list[str]:
    """Devices OpenVINO lists here (``[]`` when it is not installed)."""
    try:
        ov = import_openvino()
    except AmpqError:
        return []
    return list(ov.Core().available_devices)


def _restrict(inputs, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` for a compiled model's ``inputs``: only the names it reads, contiguous, in
    canonical dtypes, reshaped where a static input shape has the same element count.

    numpy's ``longlong`` is int64 under another type number, which the OpenVINO bindings
    reject ("Unsupported data type: int64"); and an extracted subgraph may declare a scalar
    input that arrives as shape (1,) (ONNX Runtime accepts it, OpenVINO does not)."""
    out = {}
    for port in inputs:
        # a port carries every name of its tensor: where OpenVINO folds an op into a graph input
        # (a Pad after an 8-bit cut's feed), ``any_name`` may be the folded op's output
        name = next((n for n in sorted(port.get_names()) if n in feeds), port.any_name)
        if name not in feeds:
            raise AmpqError(f"timing inputs lack model input {name!r} (given: {sorted(feeds)})")
        v = np.asarray(feeds[name])
        v = np.ascontiguousarray(v, dtype=np.dtype(v.dtype.str))
        shape = port.get_partial_shape()
        if shape.is_static:
            want = tuple(int(d) for d in shape.to_shape())
            if v.shape != want and v.size == int(np.prod(want, dtype=np.int64)):
                v = v.reshape(want)
        out[name] = v
    return out


#: lines of OpenVINO's error text that are not the cause (where it was raised; the node and the failed ops are read apart)
_NOISE = ("Exception from", "Check '", "FrontEnd API failed", "Model wasn't fully converted", "Summary:",
          "While validating node", "While validating ONNX node", "-- ")


def openvino_reason(text: str) -> str:
    """One line from OpenVINO's multi-line error ``text``: the ONNX node it names and the first
    line that says why (its first line only says where in OpenVINO's sources it was raised)."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    node = next((l.split("': ")[0] + "'" for l in lines if l.startswith("While validating ONNX node")), "")
    # at inference the plugin names its own node: "[CPU] AvgPool node with name '...' Check '...' failed at ..."
    plugin = next((l for l in lines if l.startswith("[") and " node with name '" in l), "")
    node = node or plugin.split(" Check '")[0]
    why = next((l for l in lines if not l.startswith(_NOISE) and l != plugin), "")
    failed = next((l[3:] for l in lines if l.startswith("-- Conversion is failed for")), "")
    parts = [p for p in (node.replace("While validating ONNX node ", "node "), why, failed) if p]
    return "; ".join(parts) if parts else (lines[0] if lines else "")


class OpenVinoBackend(Backend):
    """The OpenVINO runtime on one device (``CPU`` by default)."""

    def __init__(self, device: str = "cpu", *, threads: int = 2, protocol: Protocol | None = None,
                 formats: tuple[str, ...] | None = None, core: Any = None, fusion: bool = True):
        ov = import_openvino()
        self._ov = ov
        self.core = core if core is not None else ov.Core()
        listed = list(self.core.available_devices)
        wanted = device.upper()
        if wanted not in listed:
            raise AmpqError(f"OpenVINO device {device!r} is not available; OpenVINO lists here: "
                            f"{', '.join(d.lower() for d in listed) or 'none'}")
        self.device = wanted
        self.threads = threads
        self.protocol = protocol or Protocol()
        self.device_caps = tuple(str(c) for c in self.core.get_property(wanted, "OPTIMIZATION_CAPABILITIES"))
        fast = self.fast_formats(wanted, self.device_caps)
        if formats is not None:  # a user's list: the fast formats, or those that run as written on request
            possible = self.requestable_formats(wanted, self.device_caps)
            unknown = [f for f in formats if f not in possible]
            if unknown:
                raise AmpqError(f"openvino:{device.lower()} does not run {unknown[0]!r} fast; it offers "
                                f"{', '.join(possible) or 'hp only'}")
            fast = tuple(f for f in possible if f in formats)
        rules = OPENVINO_CPU_RULES if fusion and wanted == "CPU" and set(fast) & set(CUT_STATES) else None
        # LPT's MatMul transformation takes two 8-bit activations: MiniLM's attention MatMuls in
        # int8_sym added 2.57x -> 2.62x over fp32 in the pass (benchmarks/results/peers.md)
        self._caps = Capabilities(fast, "fp32", self._device_name(), rules, activation_matmuls=rules is not None)
        self.name = f"openvino:{wanted.lower()}"

    @staticmethod
    def fast_formats(device: str, capabilities: tuple[str, ...]) -> tuple[str, ...]:
        """Formats the device lists in OPTIMIZATION_CAPABILITIES and that run fast as written."""
        measured = MEASURED_FAST.get(device.split(".")[0], ("int8_sym",))
        return tuple(f for c in capabilities for f in CAPABILITY_FORMATS.get(c, ()) if f in measured)

    @staticmethod
    def requestable_formats(device: str, capabilities: tuple[str, ...]) -> tuple[str, ...]:
        """The fast formats, then those (:data:`ON_REQUEST`) a user may ask for."""
        extra = ON_REQUEST.get(device.split(".")[0], ("int8",))
        listed = [f for c in capabilities for f in CAPABILITY_FORMATS.get(c, ())]
        fast = OpenVinoBackend.fast_formats(device, capabilities)
        return fast + tuple(f for f in listed if f in extra and f not in fast)

    def _device_name(self) -> str:
        try:
            name = str(self.core.get_property(self.device, "FULL_DEVICE_NAME"))
        except Exception:  # a plugin without the property: the device id is enough
            name = self.device
        if self.device == "CPU":
            name += f" ({os.cpu_count()} cpus)"
        return name

    def config(self) -> dict[str, Any]:
        """The properties every compiled model gets (recorded in :meth:`key`)."""
        cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
        if self.device == "CPU":
            cfg.update({"INFERENCE_NUM_THREADS": self.threads, "ENABLE_CPU_PINNING": False,
                        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
        return cfg

    def capabilities(self) -> Capabilities:
        return self._caps

    def key(self) -> dict:
        return {"backend": "openvino", "openvino": str(self._ov.get_version()), "onnx": onnx.__version__,
                "device": self.device, "device_name": self._caps.device, "optimization_capabilities": list(self.device_caps),
                "formats": list(self._caps.formats), "threads": self.threads,
                "config": {k: str(v) for k, v in sorted(self.config().items())}, "protocol": self.protocol.key(),
                "fusion": self._caps.rules.key() if self._caps.rules is not None else None}

    def compile(self, model: onnx.ModelProto):
        """A compiled model with the fixed settings this backend's timings are keyed by.

        The ModelProto is read from its bytes in memory; above 2 GB it goes through a
        temporary file with external data (the caller's proto is left unchanged)."""
        try:
            if fits_in_memory(model) and not _has_external_data(model):
                return self.core.compile_model(self.core.read_model(io.BytesIO(model.SerializeToString())),
                                               self.device, self.config())
            with tempfile.TemporaryDirectory(prefix="ampq-openvino-") as folder:
                path = os.path.join(folder, "model.onnx")
                save_external(model, path, "model.onnx.data")
                return self.core.compile_model(self.core.read_model(path), self.device, self.config())
        except AmpqError:
            raise
        except Exception as e:
            raise self._cannot_run(model, e) from None

    def check_runs(self, model: onnx.ModelProto, where: str, feeds: dict[str, np.ndarray] | None = None) -> None:
        # OpenVINO converts ONNX itself and has ops and attribute ranges ONNX Runtime runs but it
        # does not (an AveragePool whose kernel exceeds its input, a Conv on a dynamic-rank
        # input): compiling the whole model, and running it once where samples exist (with
        # dynamic shapes some checks wait for the first inference), costs seconds; finding out at
        # the first subgraph that holds such an op cost minutes (227 s on EfficientNet-B0).
        try:
            if feeds is None:
                self.compile(model)
            else:
                self.run(model, feeds)
        except AmpqError as exc:
            raise AmpqError(f"{where}: {exc}") from None

    def runner(self, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]):
        """``run(i)``: one synchronous inference on batch ``i``, inputs prepared beforehand."""
        compiled = self.compile(model)
        request = compiled.create_infer_request()
        prepared = [_restrict(compiled.inputs, b) for b in batches]

        def infer(i: int):
            try:
                return request.infer(prepared[i], share_inputs=True)
            except Exception as e:  # a shape check OpenVINO defers to the first inference
                raise self._cannot_run(model, e) from None

        return infer

    def run(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of one inference, by output name (for checks; timing uses :meth:`runner`)."""
        return self._infer(model, [feeds])[0]

    #: the CPU plugin's low-precision transformations compile a QDQ model their own way
    own_numerics = True

    def outputs(self, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Outputs of ``model`` on each batch, one compilation for all (float outputs as float64):
        the CPU plugin's low-precision transformations compile the QDQ model their own way."""
        return [{n: v.astype(np.float64) if v.dtype.kind == "f" else v for n, v in o.items()}
                for o in self._infer(model, batches)]

    def _infer(self, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """One compilation of ``model``, one inference per batch: outputs by the names the ONNX
        graph gives them (a tensor may carry several names in OpenVINO), copied out of the request."""
        compiled = self.compile(model)
        request = compiled.create_infer_request()
        wanted = {o.name for o in model.graph.output}
        names = [next((n for n in sorted(o.get_names()) if n in wanted), o.any_name) for o in compiled.outputs]
        out = []
        for batch in batches:
            try:
                request.infer(_restrict(compiled.inputs, batch))
            except AmpqError:
                raise
            except Exception as e:
                raise self._cannot_run(model, e) from None
            out.append({n: np.array(request.get_output_tensor(i).data) for i, n in enumerate(names)})
        return out

    def _cannot_run(self, model: onnx.ModelProto, e: Exception) -> AmpqError:
        # OpenVINO raises RuntimeError with multi-line text: keep what names the cause
        return AmpqError(f"OpenVINO cannot run the model {model.graph.name!r} on {self.device}: "
                         f"{openvino_reason(str(e)) or type(e).__name__}")

    def time_each(self, jobs: dict[str, tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]]) -> dict[str, Timing]:
        n = min((len(inputs) for _, inputs in jobs.values()), default=0)
        if jobs and n == 0:
            raise AmpqError("no timing inputs: capture activations at the subgraph inputs first")
        runners = {k: self.runner(m, inputs[:n]) for k, (m, inputs) in jobs.items()}
        return interleave(runners, self.protocol, n_inputs=n)

    def time(self, models: dict[str, onnx.ModelProto], inputs: list[dict[str, np.ndarray]]) -> dict[str, Timing]:
        if not inputs:
            raise AmpqError("no timing inputs: capture activations at the subgraph inputs first")
        runners = {k: self.runner(m, inputs) for k, m in models.items()}
        return interleave(runners, self.protocol, n_inputs=len(inputs))


def _has_external_data(model: onnx.ModelProto) -> bool:
    """Initializers still stored outside the proto cannot be serialised to bytes."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
