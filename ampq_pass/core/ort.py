"""ONNX Runtime plumbing: the one session factory, batch runs, and runs with intermediate
tensors exposed (to capture subgraph inputs and read concrete shapes).

Every ONNX Runtime session of the package is made by :func:`make_session`, so thread
settings, log level and the conversion of runtime failures into one-line errors are
decided once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from ampq_pass.core.errors import runtime_errors
from ampq_pass.core.proto import copy_model, fits_protobuf, save_external


def make_session(model: onnx.ModelProto | str | os.PathLike | bytes, *, provider: str = "CPUExecutionProvider",
                 provider_options: dict | None = None, threads: int = 0, optimize: bool = True,
                 spinning: bool | None = None, optimized_path: str | None = None, log_level: int = 3,
                 what: str = "model"):
    """An ONNX Runtime session on one provider.

    ``threads`` > 0 fixes the intra-op threads (and one inter-op thread, sequential
    execution): timings are only comparable at equal threads. ``optimize=False`` keeps the
    graph exactly as written (no fusions). ``spinning=False`` stops idle thread pools from
    busy-waiting, which matters when several sessions are timed interleaved on few cores.
    A model above 2 GB is handed to ONNX Runtime through a temporary file with external
    data (its proto cannot be serialised in one piece). Failures become :class:`AmpqError`
    naming ``what``.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = log_level
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    providers = [(provider, provider_options)] if provider_options else [provider]
    with _source(model) as source, runtime_errors(what):
        return ort.InferenceSession(source, so, providers=providers)


@contextlib.contextmanager
def _source(model):
    if not isinstance(model, onnx.ModelProto):
        yield str(model) if isinstance(model, (str, os.PathLike)) else model
    elif fits_protobuf(model):
        yield model.SerializeToString()
    else:
        with tempfile.TemporaryDirectory(prefix="ampq-session-") as folder:
            path = Path(folder) / "model.onnx"
            save_external(model, path, "model.onnx.data")
            yield str(path)


def feeds_for(session, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of ``batch`` that ``session`` takes as inputs."""
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in batch.items() if k in names}


def run(session, feeds: dict[str, np.ndarray], *, what: str = "model") -> list[np.ndarray]:
    """Every output of ``session`` on ``feeds`` (extra feeds are ignored)."""
    with runtime_errors(what):
        return session.run(None, feeds_for(session, feeds))


def run_batches(model, batches: Iterable[dict[str, np.ndarray]], *, optimize: bool = True,
                threads: int = 0) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` batch by batch, by output name (float outputs as float64 copies)."""
    return session_outputs(make_session(model, optimize=optimize, threads=threads), batches)


def session_outputs(session, batches: Iterable[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs of ``session`` batch by batch, by output name (float outputs as float64 copies)."""
    names = [o.name for o in session.get_outputs()]
    out = []
    for batch in batches:
        values = run(session, batch)
        out.append({k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in zip(names, values)})
    return out


def run_exposed(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], names: list[str],
                *, what: str = "model") -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """For each batch of feeds, ``(batch, {name: value})`` of the tensors ``names``.

    The caller's model is not changed. Below 2 GB the probe is a copy with extra outputs;
    above, the outputs are added to the caller's model only while the session is built
    (a copy would double memory). Graph optimisations are off: fusions would change values
    and hide some of the exposed tensors.
    """
    large = not fits_protobuf(model)
    probe = model if large else copy_model(model)
    n_outputs = len(probe.graph.output)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names if t not in existing)
    try:
        sess = make_session(probe, optimize=False, what=what)
    finally:
        if large:
            while len(probe.graph.output) > n_outputs:
                probe.graph.output.pop()
    for batch in batches:
        feeds = feeds_for(sess, batch)
        with runtime_errors(what):
            values = dict(zip(names, sess.run(names, feeds))) if names else {}
        yield batch, values


def observed_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of tensors ``names`` for one run of ``model`` on ``feeds``.

    Symbolic dims (sequence length, shapes computed by Reshape chains) are only known for
    real inputs, so the model is run once with those tensors exposed.
    """
    _, outs = next(run_exposed(model, [feeds], names))
    return {n: tuple(int(d) for d in outs[n].shape) for n in names}
