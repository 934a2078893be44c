"""ONNX Runtime sessions and interleaved wall-clock timing of whole models."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort


def make_session(model: onnx.ModelProto | str | bytes, *, threads: int = 2,
                 provider: str = "CPUExecutionProvider", optimized_path: str | None = None) -> ort.InferenceSession:
    """A session with fixed thread counts (timings are only comparable at equal threads)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, so, providers=[provider])


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


@dataclass
class Timing:
    """Wall-clock seconds of one model run: median, spread and every sample."""

    median: float
    p10: float
    p90: float
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        a = np.asarray(samples)
        return cls(float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90)), list(map(float, a)))


def time_interleaved(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], *,
                     repeats: int = 20, warmup: int = 3) -> dict[str, Timing]:
    """Time several sessions on the same inputs, round-robin, so machine drift hits all alike."""
    for sess in sessions.values():
        for _ in range(warmup):
            run(sess, feeds)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for key, sess in sessions.items():
            t0 = time.perf_counter()
            run(sess, feeds)
            samples[key].append(time.perf_counter() - t0)
    return {k: Timing.of(v) for k, v in samples.items()}
