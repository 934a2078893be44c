"""Run a model in ONNX Runtime with some of its intermediate tensors exposed as outputs.

Used to capture subgraph inputs and to read concrete shapes: both need the values the
unoptimised graph defines, for tensors that are not graph outputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from .errors import runtime_errors
from .model import _fits_protobuf, save_external


def run_exposed(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], names: list[str],
                *, what: str = "model") -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """For each batch of feeds, ``(batch, {name: value})`` of the tensors ``names``.

    The caller's model is not changed. Below 2 GB the probe is a copy with extra outputs;
    above, the outputs are added to the caller's model only while the session is built
    (a copy would double memory) and the session reads it from a temporary file.
    """
    import onnxruntime as ort

    large = not _fits_protobuf(model)
    probe = model if large else _with_copy(model)
    n_outputs = len(probe.graph.output)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names if t not in existing)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # No graph rewrites: fusions would change values and hide some of the exposed tensors.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory() as folder:
        try:
            with runtime_errors(what):
                if large:
                    path = Path(folder) / "probe.onnx"
                    save_external(probe, path, "probe.onnx.data")
                    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                else:
                    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        finally:
            if large:
                while len(probe.graph.output) > n_outputs:
                    probe.graph.output.pop()
        feed_names = {i.name for i in sess.get_inputs()}
        for batch in batches:
            feeds = {k: v for k, v in batch.items() if k in feed_names}
            with runtime_errors(what):
                values = dict(zip(names, sess.run(names, feeds))) if names else {}
            yield batch, values


def _with_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
