"""The host CPU: its model name and instruction-set flags, as Linux lists them in /proc/cpuinfo.

Which int8 kernels ONNX Runtime and OpenVINO take depends on these flags (VNNI or not), and the
project's machines differ in them between sessions, so the backends' keys, the tests that depend
on a kernel and every benchmark figure name them. (``platform`` gives neither the model name nor
the flags on Linux; ``py-cpuinfo`` would, for one function's sake.)
"""

from __future__ import annotations

import platform

_CPUINFO = "/proc/cpuinfo"


def _first_field(key: str, path: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.split(":", 1)[0].strip() == key:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name(path: str = _CPUINFO) -> str:
    """The first CPU's ``model name``; where there is none (not Linux, not x86), what
    :mod:`platform` says."""
    return _first_field("model name", path) or platform.processor() or platform.machine()


def cpu_flags(path: str = _CPUINFO) -> frozenset[str] | None:
    """The first CPU's ``flags`` (``avx2``, ``avx512_vnni``, ...); None where the file lists
    none (not Linux, or not x86: ARM lists ``Features``)."""
    line = _first_field("flags", path)
    return None if line is None else frozenset(line.split())
