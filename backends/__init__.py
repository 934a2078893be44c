"""Backends: where time gains are measured (design.md §4).

Installed as ``ampq_pass.backends`` (see ``package-dir`` in pyproject.toml), so the
repository's top-level ``backends/`` folder never becomes a generic top-level module.

``get_backend("ort:cpu")`` (default), ``"ort:cuda"``, ``"ort:tensorrt"``, ``"ort:openvino"``
(when installed), ``"openvino:cpu"`` / ``"openvino:DEVICE"`` (the OpenVINO runtime itself, extra
``[openvino]``), ``"gaudi"``, ``"mac"``, ``"memory"``. Adapters import their runtime
lazily, so a missing optional stack only fails when that backend is asked for.
"""

from __future__ import annotations

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.measure import Backend, Capabilities, CostModel, Protocol, Timing

__all__ = ["Backend", "Capabilities", "CostModel", "Protocol", "Timing", "available_backends", "get_backend"]


def available_backends() -> list[str]:
    """Backend specs usable on this machine (gaudi only where habana_frameworks imports)."""
    from ampq_pass.backends.ort import available_providers

    from ampq_pass.backends.openvino import available_devices

    specs = [f"ort:{p}" for p in available_providers()]
    specs += [f"openvino:{d.lower()}" for d in available_devices()]
    specs += ["mac", "memory"]
    try:
        import habana_frameworks.torch  # noqa: F401
        specs.append("gaudi")
    except ImportError:
        pass
    return specs


def get_backend(spec: str = "ort:cpu", *, protocol: Protocol | None = None, threads: int = 2,
                formats: tuple[str, ...] | None = None) -> Backend | CostModel:
    """The backend named by ``spec`` (``ort[:provider]``, ``openvino[:device]``, ``gaudi``, ``mac``, ``memory``)."""
    kind, _, option = spec.partition(":")
    if kind == "ort":
        from ampq_pass.backends.ort import OrtBackend

        return OrtBackend(option or "cpu", threads=threads, protocol=protocol, formats=formats)
    if kind == "openvino":
        from ampq_pass.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(option or "cpu", threads=threads, protocol=protocol, formats=formats)
    if kind == "gaudi":
        from ampq_pass.backends.gaudi import GaudiBackend

        return GaudiBackend(protocol=protocol)
    if kind == "mac":
        from ampq_pass.backends.costmodels import MacModel

        return MacModel(formats=formats)
    if kind == "memory":
        from ampq_pass.backends.costmodels import MemoryModel

        return MemoryModel(activations=option == "activations", formats=formats)
    raise AmpqError(f"unknown backend {spec!r}; expected one of ort:cpu, ort:cuda, ort:tensorrt, ort:openvino, "
                    f"openvino:cpu (or openvino:DEVICE), gaudi, mac, memory")
