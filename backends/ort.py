"""ONNX Runtime backend: sessions with fixed, recorded thread settings, and interleaved timing.

Which formats each execution provider runs *fast* (design.md §3: a format a backend
would emulate slowly is not offered):

- CPU EP, measured on an earlier machine of this project (AMD EPYC, AVX2, no AVX-512/VNNI,
  2 threads, ORT 1.32, two MatMuls 384x1536 / 1536x384, batch 8 x 128 tokens; the Intel Xeon
  with AVX-512 VNNI of later sessions gave int8 4.17x, int8_dyn 3.80x, int4 0.93x, fp16 0.92x,
  bf16 0.83x over fp32 on the same probe, benchmarks/results/backends.md):
  fp32 27.5 ms, int8 QDQ 9.3 ms (fused into QLinearMatMul / MatMulIntegerToFloat),
  int4 block QDQ 29-36 ms (fused into MatMulNBits: a real kernel, slower than fp32 at
  this shape on this CPU but faster for memory-bound shapes elsewhere, so it is offered
  and the measurement decides), fp16 37.8 ms, bf16 36.5 ms, fp8 QDQ 56.8 ms (not fused:
  Cast/DequantizeLinear run as separate ops before an fp32 MatMul). So the CPU EP offers
  int8 and int4 and not fp16/bf16/fp8.
- CUDA EP, measured on a lent H100 (ORT 1.31.1 CUDA 13 build, benchmarks/results/cuda.md):
  every format as written is slower than fp32. int8/fp8 QDQ stay separate Q/DQ ops around
  fp32 MatMuls (0.39-0.69x), int8_dyn's MatMulInteger falls back to the CPU (0.02-0.07x),
  int4 fuses into MatMulNBits only in part (0.54-0.57x), fp16/bf16 Cast pairs 0.71-0.83x.
  So nothing beyond hp is offered; a 16-bit compute format (the op itself in fp16) would be.
- CPU EP on x86 without VNNI (AVX2 only): its u8s8 integer GEMM adds pairs of products in
  int16 and saturates (:func:`u8s8_saturates` probes it), so int8 and int8_dyn would not
  compute what the sensitivity models; ``int8_pairs`` and ``int8_dyn_pairs`` (8-bit
  weights whose same-sign neighbours along K add up to at most 128, exact there) are offered
  in their place, ``int8_w7`` / ``int8_dyn_w7`` (7-bit weights, ORT's ``reduce_range``) on
  request.
- TensorRT EP: consumes explicit QDQ as int8 (and fp8 on GPUs that have it) kernels.
  Not measured here.
- OpenVINO EP: consumes int8 QDQ. Not measured here.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from ampq_pass.core.errors import AmpqError, runtime_errors
from ampq_pass.core.formats import CUT_STATES
from ampq_pass.core.machine import cpu_name
from ampq_pass.core.measure import Backend, Capabilities, Protocol, Timing, interleave
from ampq_pass.core.memory import release_freed_memory
from ampq_pass.core.ort import make_session, session_outputs
from ampq_pass.core.proto import fits_protobuf
from ampq_pass.backends.ort_rules import ORT_CPU_RULES

__all__ = ["OrtBackend", "Timing", "available_providers", "io_device", "time_interleaved"]

#: short name -> (ONNX Runtime provider, formats it runs fast, high-precision format)
PROVIDERS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "cpu": ("CPUExecutionProvider", ("int8", "int8_dyn", "int4", "int4_b128"), "fp32"),
    "cuda": ("CUDAExecutionProvider", (), "fp32"),
    "tensorrt": ("TensorrtExecutionProvider", ("int8", "fp8_e4m3"), "fp32"),
    "openvino": ("OpenVINOExecutionProvider", ("int8",), "fp32"),
}


#: the CPU EP's 8-bit formats -> the exact ones it offers in their place where its u8s8 GEMM
#: saturates: the first by default (8-bit weights, pairs bounded), the second on request
#: (``formats=``; 7-bit weights, a step twice as coarse: ResNet-50's every-layer plan measured
#: loss MSE 0.36 with them)
_EXACT_ON_SATURATING_CPU = {"int8": ("int8_pairs", "int8_w7"), "int8_dyn": ("int8_dyn_pairs", "int8_dyn_w7")}


@functools.lru_cache(maxsize=1)
def u8s8_saturates() -> bool:
    """Whether the CPU EP's uint8 x int8 MatMulInteger loses the exact sum of 255 x 127 over 64
    terms: on x86 without VNNI MLAS adds pairs of products in int16 (``vpmaddubsw``), which
    saturates at 32767 where a pair makes 64770. A run of the kernel, not a CPU-flag lookup:
    the kernel MLAS dispatches to is what decides. One tiny session (a few ms), run once per
    process (the answer is the machine's: every backend built after the first reuses it)."""
    from onnx import TensorProto, helper

    k = 64
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "u8s8_probe",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])],
        [onnx.numpy_helper.from_array(np.full((k, 8), 127, np.int8), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    y = make_session(model, what="u8s8 probe").run(None, {"x": np.full((4, k), 255, np.uint8)})[0]
    return not bool((y == 255 * 127 * k).all())


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build has (``cpu`` always)."""
    installed = set(ort.get_available_providers())
    return [short for short, (full, _, _) in PROVIDERS.items() if full in installed]


def time_interleaved(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
                     *, repeats: int = 20, warmup: int = 3, protocol: Protocol | None = None) -> dict[str, Timing]:
    """Time several sessions on the same inputs, round-robin, so machine drift hits all alike.

    Without ``protocol`` exactly ``repeats`` rounds are run (the demo's fixed budget).
    """
    batches = feeds if isinstance(feeds, list) else [feeds]
    protocol = protocol or Protocol(warmup=warmup, min_repeats=repeats, max_repeats=repeats, max_seconds=None)
    runners = {k: _runner(s, [_restrict(s, b) for b in batches]) for k, s in sessions.items()}
    return interleave(runners, protocol, n_inputs=len(batches))


def _runner(session: ort.InferenceSession, batches: list[dict[str, np.ndarray]]):
    """``run(i)``: one run of ``session`` on batch ``i`` through an IOBinding: inputs bound
    once, outputs left in ONNX Runtime's memory. ``session.run`` would copy every output into
    a fresh numpy array: for a subgraph timed alone that copy is of a whole activation (8 MB
    for a 64-channel 64x64 feature map at batch 8), a cost the model does not pay at a cut
    and one that shrinks 4x when the cut is uint8, which made int8 cuts look faster than they
    are (the repo's residual CNN: 4.6x predicted, 3.6x measured). On a GPU provider the
    inputs are copied to the device once and the outputs stay there, for the same reason:
    a host<->device copy of every cut tensor is paid by no subgraph inside the whole model."""
    device, device_id = io_device(session)
    bindings = []
    for feeds in batches:
        binding = session.io_binding()
        for name, value in feeds.items():
            if device == "cpu":
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, device_id))
        for out in session.get_outputs():
            binding.bind_output(out.name, device, device_id)
        bindings.append(binding)
    return lambda i: session.run_with_iobinding(bindings[i])


#: providers whose tensors live in GPU memory (ONNX Runtime's device name for an OrtValue)
_GPU_PROVIDERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def io_device(session: ort.InferenceSession) -> tuple[str, int]:
    """Where the first (preferred) provider of ``session`` keeps its tensors, and its device id."""
    first = session.get_providers()[0]
    device = _GPU_PROVIDERS.get(first, "cpu")
    if device == "cpu":
        return device, 0
    return device, int(session.get_provider_options().get(first, {}).get("device_id", 0))


def _restrict(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    missing = names - set(feeds)
    if missing:
        raise AmpqError(f"timing inputs lack model input {sorted(missing)[0]!r} (given: {sorted(feeds)})")
    return {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in names}


class OrtBackend(Backend):
    """ONNX Runtime on one execution provider (``ort:cpu`` by default).

    On a CPU whose u8s8 GEMM saturates (:func:`u8s8_saturates`) the CPU EP offers ``int8_pairs`` /
    ``int8_dyn_pairs`` in place of ``int8`` / ``int8_dyn`` (and ``int8_w7`` / ``int8_dyn_w7``
    where ``formats`` names them); ``saturating_int8=True`` keeps the latter (to time them:
    their loss there is not the QDQ arithmetic's)."""

    def __init__(self, provider: str = "cpu", *, threads: int = 2, protocol: Protocol | None = None,
                 device_id: int = 0, formats: tuple[str, ...] | None = None, fusion: bool = True,
                 saturating_int8: bool = False):
        if provider not in PROVIDERS:
            raise AmpqError(f"unknown ONNX Runtime provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
        if provider not in available_providers():
            raise AmpqError(f"ONNX Runtime provider {provider!r} ({PROVIDERS[provider][0]}) is not installed; "
                            f"available here: {', '.join(available_providers())}")
        self.provider = provider
        self.threads = threads
        self.protocol = protocol or Protocol()
        self.device_id = device_id
        full, fast, hp = PROVIDERS[provider]
        # ``saturating_int8``: int8 and int8_dyn stay offered where the GEMM saturates (timing
        # them is still right; their loss is not what the sensitivity models)
        self.saturates = provider == "cpu" and u8s8_saturates()
        on_request: tuple[str, ...] = ()
        if self.saturates and not saturating_int8:
            on_request = tuple(_EXACT_ON_SATURATING_CPU[f][1] for f in fast if f in _EXACT_ON_SATURATING_CPU)
            fast = tuple(_EXACT_ON_SATURATING_CPU[f][0] if f in _EXACT_ON_SATURATING_CPU else f for f in fast)
        if formats is not None:  # a user restriction can only narrow what runs fast
            unknown = [f for f in formats if f not in fast + on_request]
            if unknown:
                why = ""
                if self.saturates and unknown[0] in _EXACT_ON_SATURATING_CPU:
                    pairs, w7 = _EXACT_ON_SATURATING_CPU[unknown[0]]
                    why = (f" on this CPU: its u8s8 integer GEMM saturates int16 pair sums (x86 without VNNI), "
                           f"so {unknown[0]!r} would not compute its QDQ arithmetic; {pairs!r} (8-bit weights, "
                           f"neighbours bounded) and {w7!r} (7-bit weights) do")
                raise AmpqError(f"ort:{provider} does not run {unknown[0]!r} fast{why}; it offers "
                                f"{', '.join(fast + on_request) or 'hp only'}")
            fast = tuple(f for f in fast + on_request if f in formats)
        # the CPU EP's integer kernels between layers (ort_rules.py); ``fusion=False``: layers only
        rules = ORT_CPU_RULES if fusion and provider == "cpu" and set(fast) & set(CUT_STATES) else None
        self._caps = Capabilities(fast, hp, self._device(), rules)
        self.name = f"ort:{provider}"

    def _device(self) -> str:
        if self.provider == "cpu":
            return f"{cpu_name()} ({os.cpu_count()} cpus)"
        return f"{self.provider}:{self.device_id}"

    def capabilities(self) -> Capabilities:
        return self._caps

    def key(self) -> dict:
        return {"backend": "ort", "provider": PROVIDERS[self.provider][0], "device": self._caps.device,
                "onnxruntime": ort.__version__, "onnx": onnx.__version__, "threads": self.threads,
                "inter_op_threads": 1, "spinning": False, "io": "binding", "protocol": self.protocol.key(),
                "fusion": self._caps.rules.key() if self._caps.rules is not None else None,
                **({"u8s8_saturates": True} if self.saturates else {})}

    def session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        """A session with the fixed thread settings this backend's timings are keyed by.

        Spinning is off because several sessions are alive during interleaved timing: an
        idle session's pool would otherwise busy-wait on the cores the next session needs.
        The CPU memory arena stays on although each idle session keeps its largest run's
        activations in it: without it every run maps fresh memory, which slowed ResNet-50's
        int8 plan far more than its fp32 original (measured 1.26x with the arena, 0.96x
        without, same machine, interleaved) and so would mislead every timing.
        """
        options = None if self.provider == "cpu" else {"device_id": str(self.device_id)}
        return make_session(model, threads=self.threads, spinning=False, provider=PROVIDERS[self.provider][0],
                            provider_options=options, what=f"model on ort:{self.provider}")

    def deployed(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """On the CPU EP: ``model`` after ONNX Runtime's basic-level graph optimisations (constant
        folding, redundant-node and common-subexpression elimination: ONNX operators only, no
        provider's kernels), saved as ONNX Runtime saves an optimised model. ONNX Runtime runs
        such a file faster than the same graph it optimises while loading it (the corpus's
        Llama decode step, each file against its own pre-optimised copy, interleaved, 2-core AMD
        EPYC: every MatMul int4 1.99x -> 2.08-2.12x over fp32, every MatMul int8_dyn_w7 1.76x ->
        1.86x; fp32 itself 1.00x -> 0.99-1.01x), and ONNX Runtime's own quantizers write their
        models after the same optimisation. Other providers, and models above protobuf's 2 GB
        (ONNX Runtime would write their weights to a second file), get ``model`` itself."""
        if self.provider != "cpu" or not fits_protobuf(model):
            return model
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        with tempfile.TemporaryDirectory(prefix="ampq-deployed-") as tmp:
            so.optimized_model_filepath = str(Path(tmp) / "model.onnx")
            with runtime_errors("the rewritten model"):
                ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return onnx.load(so.optimized_model_filepath)

    @property
    def own_numerics(self) -> bool:
        """Every provider but the CPU EP (the semantics the sensitivity stage models)."""
        return self.provider != "cpu"

    def outputs(self, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]] | None:
        """None on the CPU EP, which runs QDQ as the sensitivity stage models it; on another
        provider (TensorRT builds its own int8 and fp8 engines) ``model``'s outputs there, by
        output name, float outputs as float64."""
        if not self.own_numerics:
            return None
        return session_outputs(self.session(model), batches)

    def time_each(self, jobs: dict[str, tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]]) -> dict[str, Timing]:
        sessions = {k: self.session(m) for k, (m, _) in jobs.items()}
        n = min(len(inputs) for _, inputs in jobs.values())
        if n == 0:
            raise AmpqError("no timing inputs: capture activations at the subgraph inputs first")
        prepared = {k: [_restrict(sessions[k], b) for b in inputs[:n]] for k, (_, inputs) in jobs.items()}
        runners = {k: _runner(s, prepared[k]) for k, s in sessions.items()}
        try:
            return interleave(runners, self.protocol, n_inputs=n)
        finally:
            del runners, sessions, prepared
            release_freed_memory()  # the sessions' weights and buffers, before the next subgraph's

    def time(self, models: dict[str, onnx.ModelProto], inputs: list[dict[str, np.ndarray]]) -> dict[str, Timing]:
        if not inputs:
            raise AmpqError("no timing inputs: capture activations at the subgraph inputs first")
        sessions = {k: self.session(m) for k, m in models.items()}
        try:
            return time_interleaved(sessions, inputs, protocol=self.protocol)
        finally:
            del sessions
            release_freed_memory()
