"""What this machine's CPU kernels compute, for tests whose premise depends on it.

On x86 CPUs without VNNI (AVX2 only: this project's AMD EPYC sessions of 2026-11-28 had
neither AVX-512 nor AVX-VNNI) ONNX Runtime's u8s8 integer GEMM (MLAS, ``vpmaddubsw``) adds
pairs of uint8 x int8 products in int16, which saturates where two products exceed 32767
(255 x 127 x 2 = 64770): the int8 models it runs then differ from the QDQ arithmetic by
whole steps, on a few outputs (tests/core/test_formats.py's MatMul: 11 of 160 outputs off by
up to 7.6, each matching an int16-saturated sum to 1e-6). OpenVINO's CPU plugin (oneDNN) on
such CPUs halves the int8 weights to avoid the same overflow (relative error 2e-2 where VNNI
gives 1e-6). Tests that check a rewritten model against the formats' reference to float
rounding, or the sensitivity's prediction against ONNX Runtime's measured loss, hold only
where the kernels are exact, and skip elsewhere saying so.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest


@functools.lru_cache(maxsize=None)
def ort_int8_is_exact() -> bool:
    """Whether ONNX Runtime's CPU MatMulInteger (uint8 x int8) sums 255 x 127 over 64 terms exactly."""
    import onnx
    from onnx import TensorProto, helper

    from ampq_pass.core.ort import make_session

    k = 64
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])],
        [onnx.numpy_helper.from_array(np.full((k, 8), 127, np.int8), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    y = make_session(model).run(None, {"x": np.full((4, k), 255, np.uint8)})[0]
    return bool((y == 255 * 127 * k).all())


def cpu_has_vnni() -> bool:
    """Whether the CPU lists an 8-bit dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX-INT8);
    non-x86 CPUs count as having one (their int8 kernels do not take the AVX2 path)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None or "avx2" not in flags:
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


needs_exact_ort_int8 = pytest.mark.skipif(
    not ort_int8_is_exact(),
    reason="ONNX Runtime's u8s8 kernels saturate int16 pair sums on this CPU (x86 without VNNI): "
           "its int8 models differ from the QDQ arithmetic (tests/hardware.py)")
needs_exact_openvino_int8 = pytest.mark.skipif(
    not cpu_has_vnni(),
    reason="OpenVINO's CPU plugin halves int8 weights on x86 without VNNI (tests/hardware.py)")
