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
where the kernels are exact, and skip elsewhere saying so. (The ONNX Runtime backend offers
``int8_pairs`` / ``int8_dyn_pairs`` there, whose same-sign neighbouring weights add up to at
most 128, and ``int8_w7`` / ``int8_dyn_w7`` (7-bit weights) on request: both keep the
kernels exact; their tests run on every CPU.)
"""

from __future__ import annotations

import pytest

from ampq_pass.core.machine import cpu_flags


def ort_int8_is_exact() -> bool:
    """Whether ONNX Runtime's CPU u8s8 GEMM computes int8 exactly here (the backend's own probe)."""
    from ampq_pass.backends.ort import u8s8_saturates

    return not u8s8_saturates()


def cpu_has_vnni() -> bool:
    """Whether the CPU lists an 8-bit dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX-INT8);
    non-x86 CPUs count as having one (their int8 kernels do not take the AVX2 path)."""
    flags = cpu_flags()
    if flags is None or "avx2" not in flags:
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


needs_exact_ort_int8 = pytest.mark.skipif(
    not ort_int8_is_exact(),
    reason="ONNX Runtime's u8s8 kernels saturate int16 pair sums on this CPU (x86 without VNNI): "
           "its int8 models differ from the QDQ arithmetic (tests/hardware.py)")
needs_exact_openvino_int8 = pytest.mark.skipif(
    not cpu_has_vnni(),
    reason="OpenVINO's CPU plugin halves int8 weights on x86 without VNNI (tests/hardware.py)")

#: the 8-bit formats the ONNX Runtime CPU backend offers on this machine: ``int8`` / ``int8_dyn``,
#: or where its u8s8 GEMM saturates their pair-bounded variants (tests of what the backend
#: offers and ships name these)
ORT_INT8 = "int8" if ort_int8_is_exact() else "int8_pairs"
ORT_INT8_DYN = "int8_dyn" if ort_int8_is_exact() else "int8_dyn_pairs"
